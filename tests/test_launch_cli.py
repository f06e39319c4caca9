"""`python -m launch` end to end without running stages: detection, stage selection, dry-run, preflight."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import main
from launch.detect import GpuInfo, detect_site, parse_nvidia_smi
from launch.stages import select_stages
from nanochat.configargs import UsageError

REPO = Path(__file__).resolve().parents[1]
SITES = ["a100-slurm", "cpu", "gb10", "h100x8"]
H100 = GpuInfo("NVIDIA H100 80GB HBM3", 79.6)


def no_sbatch(_name: str):
    return None


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(REPO / "env", root / "env")
    return root


def launch(repo: Path, cache: Path, *argv: str, probe=list, free=lambda _p: 10**12):
    """main() against a temporary repo and cache, on a machine without SLURM."""
    return main(["--set", f"NANOCHAT_BASE_DIR={cache}", *argv], repo_root=repo,
                environ={"HOME": str(cache), "USER": "ada"}, probe=probe, which=no_sbatch, free=free)


def make_real_cache(cache: Path, shards: int, tokenizer: bool = True) -> None:
    (cache / "base_data").mkdir(parents=True)
    for i in range(shards):
        (cache / "base_data" / f"shard_{i:05d}.parquet").write_bytes(b"x")
    if tokenizer:
        (cache / "tokenizer").mkdir()
        (cache / "tokenizer" / "tokenizer.json").write_text("{}")
        (cache / "tokenizer" / "token_bytes.pt").write_bytes(b"x")


def test_detect_slurm_gb10_h100_cpu():
    assert detect_site(SITES, {"SLURM_JOB_ID": "7"}, no_sbatch, list)[0] == "a100-slurm"
    assert detect_site(SITES, {}, lambda n: "/usr/bin/sbatch", list)[0] == "a100-slurm"
    assert detect_site(SITES, {"NANOCHAT_SITE": "mycluster"}, lambda n: "/usr/bin/sbatch", list)[0] == "mycluster"
    assert detect_site(SITES, {}, lambda n: "/usr/bin/sbatch", list, preferred="other")[0] == "other"
    assert detect_site(SITES, {}, no_sbatch, lambda: [GpuInfo("NVIDIA GB10", 0.0)])[0] == "gb10"
    site, why = detect_site(SITES, {}, no_sbatch, lambda: [H100, H100])
    assert site == "h100x8" and "2 x" in why
    site, why = detect_site(SITES, {}, no_sbatch, list)
    assert site == "cpu" and "no CUDA" in why
    with pytest.raises(UsageError, match="pass --site"):
        detect_site(SITES, {}, no_sbatch, lambda: [GpuInfo("Tesla T4", 15.0)])


def test_parse_nvidia_smi():
    text = "NVIDIA H100 80GB HBM3, 81559 MiB\nNVIDIA A100-SXM4-40GB, 40960 MiB\nNVIDIA GB10, [N/A]\n"
    assert parse_nvidia_smi(text) == [GpuInfo("NVIDIA H100 80GB HBM3", 79.6), GpuInfo("NVIDIA A100-SXM4-40GB", 40.0),
                                      GpuInfo("NVIDIA GB10", 0.0)]


def test_detection_is_printed(repo, tmp_path, capsys):
    assert main(["--print-config"], repo_root=repo, environ={"HOME": str(tmp_path), "USER": "ada"},
                probe=list, which=no_sbatch) == 0
    assert "site cpu (no CUDA GPU found by nvidia-smi)" in capsys.readouterr().err


def test_stage_selection():
    assert select_stages("demo")[0] == "demo_data" and "chat_rl" not in select_stages("demo")
    assert select_stages("real")[0] == "tok_train"
    assert select_stages("real", start="mid_train") == ["mid_train", "chat_sft", "chat_eval", "report"]
    assert select_stages("demo", names="report,base_train") == ["base_train", "report"]
    assert select_stages("real", names="chat_rl") == ["chat_rl"]
    with pytest.raises(UsageError, match="valid stages: demo_data, tok_train"):
        select_stages("demo", names="base_trian")
    with pytest.raises(UsageError, match="needs --data demo"):
        select_stages("real", names="demo_data")


@pytest.mark.parametrize("names, start", [("", None), (",", None), (" , ", None), (None, "")])
def test_an_empty_stage_list_is_refused_not_read_as_the_whole_pipeline(names, start):
    # `--stages "$STAGES"` with STAGES unset must not run (or submit) every stage, nor none
    with pytest.raises(UsageError, match="valid stages: demo_data, tok_train"):
        select_stages("demo", names=names, start=start)


def test_dry_run_cpu_plain_python(repo, tmp_path, capsys):
    assert launch(repo, tmp_path / "cache", "--site", "cpu", "--dry-run") == 0
    out = capsys.readouterr().out
    python = sys.executable
    assert f"{python} -m scripts.demo_data --pretrain-megabytes 3 --seed 0" in out
    assert (f"{python} -m scripts.base_train --depth 2 --aspect-ratio 64 --head-dim 64 --max-seq-len 256 "
            "--device-batch-size 16 --total-batch-size 4096 --num-iterations 1600") in out
    assert "--no-compile --device-type cpu --model-tag d2" in out
    assert "torchrun" not in out
    assert f"NANOCHAT_BASE_DIR={tmp_path / 'cache'}" in out and "executor: local" in out


def test_dry_run_h100_torchrun_with_passthrough(repo, tmp_path, capsys):
    code = launch(repo, tmp_path / "cache", "--site", "h100x8", "--stages", "base_train,report", "--dry-run",
                  "--window-pattern", "SSSL", "--", "--extra-flag", "7")
    assert code == 0
    out = capsys.readouterr().out
    assert "torchrun --standalone --nproc_per_node 8 -m scripts.base_train --depth 20" in out
    assert "--window-pattern SSSL" in out and out.rstrip().count("--extra-flag 7") == 1
    assert f"{sys.executable} -m scripts.report" in out


def test_dry_run_uses_probed_gpu_count(repo, tmp_path, capsys):
    assert launch(repo, tmp_path / "c", "--site", "h100x8", "--stages", "base_train", "--dry-run",
                  probe=lambda: [H100, H100]) == 0
    assert "--nproc_per_node 2 -m scripts.base_train" in capsys.readouterr().out


def test_unknown_site_lists_sites(repo, tmp_path, capsys):
    assert launch(repo, tmp_path, "--site", "nope", "--dry-run") == 2
    assert "available sites: a100-slurm, cpu, cpu-slurm, gb10, h100x8" in capsys.readouterr().err


def test_bad_stage_lists_stages(repo, tmp_path, capsys):
    assert launch(repo, tmp_path, "--site", "cpu", "--stages", "tok_train,nope") == 2
    assert "valid stages: demo_data, tok_train, tok_eval, base_train" in capsys.readouterr().err


def test_bad_env_local_key_exits_2(repo, tmp_path, capsys):
    (repo / ".env.local").write_text("SBATCH_PARTITON=gpu\n")
    assert launch(repo, tmp_path, "--site", "cpu", "--check") == 2
    assert "did you mean SBATCH_PARTITION?" in capsys.readouterr().err


def test_unparsable_env_local_line_exits_2_naming_file_and_line(repo, tmp_path, capsys):
    """An unclosed quote must not silently drop SBATCH_ACCOUNT and submit to the default account."""
    (repo / ".env.local").write_text('GPU_MEMORY_GB=80\nSBATCH_ACCOUNT="physics\n')
    assert launch(repo, tmp_path, "--site", "a100-slurm", "--print-config") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and ".env.local, line 2" in err and "SBATCH_ACCOUNT" in err


def test_preflight_missing_shards_names_download(repo, tmp_path, capsys):
    cache = tmp_path / "cache"
    make_real_cache(cache, shards=3)
    assert launch(repo, cache, "--site", "a100-slurm", "--stages", "base_train", "--check") == 2
    out = capsys.readouterr().out
    assert "has 3 parquet shards, 240 needed -> fix: bash scripts/download_data.sh --site a100-slurm --shards 240" in out


def test_preflight_missing_tokenizer_names_tok_train(repo, tmp_path, capsys):
    cache = tmp_path / "cache"
    make_real_cache(cache, shards=240, tokenizer=False)
    assert launch(repo, cache, "--site", "a100-slurm", "--stages", "base_train") == 2
    err = capsys.readouterr().err
    assert "no trained tokenizer" in err and "fix: python -m launch --site a100-slurm --stages tok_train" in err
    assert "nothing was run or submitted" in err
    assert launch(repo, cache, "--site", "a100-slurm", "--stages", "tok_train,base_train", "--check") == 0


def test_preflight_from_needs_checkpoint_and_datasets(repo, tmp_path, capsys):
    cache = tmp_path / "cache"
    make_real_cache(cache, shards=240)
    assert launch(repo, cache, "--site", "a100-slurm", "--from", "mid_train", "--check") == 2
    out = capsys.readouterr().out
    assert "no base checkpoint" in out and "fix: python -m launch --site a100-slurm --from base_train" in out
    assert "dataset cais/mmlu is not in" in out
    (cache / "base_checkpoints" / "d20").mkdir(parents=True)
    (cache / "base_checkpoints" / "d20" / "meta_000100.json").write_text("{}")
    for name in ("HuggingFaceTB___smol-smoltalk", "cais___mmlu", "openai___gsm8k", "allenai___ai2_arc",
                 "datasets--openai--openai_humaneval"):
        (cache / "hf" / name).mkdir(parents=True)
    assert launch(repo, cache, "--site", "a100-slurm", "--from", "mid_train", "--check") == 0


def test_preflight_disk_batch_and_memory(repo, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert launch(repo, cache, "--site", "cpu", "--check", free=lambda _p: 10**6) == 2
    assert "GB free -> fix: free space there" in capsys.readouterr().out
    assert launch(repo, cache, "--site", "cpu", "--check", "--total-batch-size", "5000") == 2
    assert "fix: python -m launch --site cpu --total-batch-size 4096" in capsys.readouterr().out
    assert launch(repo, cache, "--site", "h100x8", "--stages", "base_train", "--check", "--depth", "26") == 2
    assert "fix: python -m launch --site h100x8 --device-batch-size 16" in capsys.readouterr().out


def test_preflight_refuses_a_wandb_run_name_without_wandb(repo, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr("launch.preflight.wandb_installed", lambda: False)
    assert launch(repo, cache, "--site", "cpu", "--run", "exp1") == 2
    err = capsys.readouterr().err
    assert ("RUN_NAME=exp1 logs base_train, mid_train, chat_sft to wandb, which is not installed here -> "
            "fix: pip install wandb, or unset RUN_NAME") in err
    assert "nothing was run or submitted" in err and not cache.exists()
    assert launch(repo, cache, "--site", "cpu", "--stages", "demo_data,tok_train", "--run", "exp1", "--check") == 0
    monkeypatch.setattr("launch.preflight.wandb_installed", lambda: True)
    assert launch(repo, cache, "--site", "cpu", "--run", "exp1", "--check") == 0


def test_gpu_site_without_gpus_is_refused(repo, tmp_path, capsys):
    assert launch(repo, tmp_path / "c", "--site", "gb10", "--stages", "report") == 2
    assert "nvidia-smi finds none here -> fix: python -m launch --site cpu" in capsys.readouterr().err


def test_module_help_runs():
    result = subprocess.run([sys.executable, "-m", "launch", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "--print-config" in result.stdout and "examples:" in result.stdout
