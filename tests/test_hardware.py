"""Peak FLOP/s lookup for MFU."""

import pytest

from nanochat.configargs import UsageError
from nanochat.hardware import peak_flops


def test_known_devices(monkeypatch):
    monkeypatch.delenv("NANOCHAT_PEAK_FLOPS", raising=False)
    assert peak_flops("NVIDIA H100 80GB HBM3").flops == 989e12
    assert peak_flops("NVIDIA H100 PCIe").flops == 756e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp8").flops == 1979e12
    assert peak_flops("NVIDIA A100-SXM4-40GB").flops == 312e12
    assert peak_flops("NVIDIA A100-SXM4-40GB", "fp8").flops == 312e12
    assert peak_flops("NVIDIA GB10").flops == 62e12
    assert peak_flops("NVIDIA H200").flops == 989e12
    assert peak_flops("NVIDIA B200").flops == 2.25e15


def test_unknown_device_and_override(monkeypatch):
    monkeypatch.delenv("NANOCHAT_PEAK_FLOPS", raising=False)
    assert peak_flops("Some Future GPU") is None
    monkeypatch.setenv("NANOCHAT_PEAK_FLOPS", "1.5e14")
    peak = peak_flops("Some Future GPU")
    assert peak.flops == 1.5e14 and peak.source == "NANOCHAT_PEAK_FLOPS"


@pytest.mark.parametrize("value", ["fast", "0", "-1e14", "inf", "nan"])
def test_an_override_that_is_not_a_positive_number_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("NANOCHAT_PEAK_FLOPS", value)
    with pytest.raises(UsageError, match=f"NANOCHAT_PEAK_FLOPS='{value}' is not a positive number of FLOP/s"):
        peak_flops("NVIDIA H100 80GB HBM3")
