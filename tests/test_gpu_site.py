"""GPU site fixes: each decision from faked device properties, environment and filesystem."""

import pytest

from nanochat.gpu_site import DeviceProps, apply_site_fixes
from nanochat.hardware import peak_flops

GB10 = DeviceProps("NVIDIA GB10", 12, 1, 48)
H100 = DeviceProps("NVIDIA H100 80GB HBM3", 9, 0, 132)
RTX5090 = DeviceProps("NVIDIA GeForce RTX 5090", 12, 0, 170)


def run(props, environ=None, files=(), on_path=None, versions=None):
    calls = {"patched": 0, "allocator": 0, "notices": []}
    environ = {} if environ is None else environ
    fixes = apply_site_fixes(
        props, environ=environ, exists=lambda p: p in files, which=lambda name: on_path,
        version_of=lambda p: (versions or {}).get(p),
        patch_is_big_gpu=lambda: calls.__setitem__("patched", calls["patched"] + 1),
        apply_allocator_now=lambda: calls.__setitem__("allocator", calls["allocator"] + 1),
        notify=calls["notices"].append)
    return {f.name for f in fixes}, environ, calls


def test_gb10_gets_ptxas_big_gpu_patch_and_allocator():
    names, env, calls = run(GB10, files={"/usr/local/cuda/bin/ptxas"},
                            versions={"/usr/local/cuda/bin/ptxas": (13, 0)})
    assert names == {"allocator", "ptxas", "is_big_gpu"}
    assert env == {"PYTORCH_ALLOC_CONF": "expandable_segments:True",
                   "TRITON_PTXAS_PATH": "/usr/local/cuda/bin/ptxas"}
    assert calls["patched"] == 1 and calls["allocator"] == 1
    assert len(calls["notices"]) == 3 and all(n.startswith("SITE FIX [") for n in calls["notices"])


def test_h100_gets_only_the_allocator_setting():
    names, env, calls = run(H100, files={"/usr/local/cuda/bin/ptxas"}, versions={"/usr/local/cuda/bin/ptxas": (13, 0)})
    assert names == {"allocator"} and "TRITON_PTXAS_PATH" not in env and calls["patched"] == 0


def test_user_settings_are_never_overridden():
    environ = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512", "TRITON_PTXAS_PATH": "/opt/my/ptxas"}
    names, env, calls = run(GB10, environ=environ, files={"/usr/local/cuda/bin/ptxas"},
                            versions={"/usr/local/cuda/bin/ptxas": (13, 0)})
    assert names == {"is_big_gpu"}
    assert env["TRITON_PTXAS_PATH"] == "/opt/my/ptxas" and "PYTORCH_ALLOC_CONF" not in env
    assert calls["allocator"] == 0


def test_old_ptxas_is_skipped_for_a_newer_one_on_path():
    names, env, _ = run(GB10, files={"/usr/local/cuda/bin/ptxas", "/opt/cuda13/bin/ptxas"},
                        on_path="/opt/cuda13/bin/ptxas",
                        versions={"/usr/local/cuda/bin/ptxas": (12, 8), "/opt/cuda13/bin/ptxas": (13, 1)})
    assert env["TRITON_PTXAS_PATH"] == "/opt/cuda13/bin/ptxas"


def test_no_suitable_ptxas_is_reported_not_guessed():
    names, env, calls = run(RTX5090, files={"/usr/local/cuda/bin/ptxas"},
                            versions={"/usr/local/cuda/bin/ptxas": (12, 8)})
    assert "ptxas-missing" in names and "TRITON_PTXAS_PATH" not in env
    assert calls["patched"] == 0  # 170 SMs: inductor's check passes on its own
    assert any("TRITON_PTXAS_PATH" in n for n in calls["notices"])


@pytest.mark.parametrize("precision,expected", [("bf16", 62e12), ("fp8", 124e12), ("nvfp4", 500e12)])
def test_gb10_peaks(precision, expected):
    assert peak_flops("NVIDIA GB10", precision).flops == expected


def test_nvfp4_peak_falls_back_to_bf16_where_unknown():
    assert peak_flops("NVIDIA H100 80GB HBM3", "nvfp4").flops == 989e12
