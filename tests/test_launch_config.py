"""Launcher settings: layer precedence and sources, env-file parsing, unknown keys, the 40 GB batch rule."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from launch.config import SOURCE_ADJUSTED, format_config, resolve_config
from launch.detect import GpuInfo
from launch.sites import available_sites, read_env_file
from nanochat.configargs import UsageError

REPO = Path(__file__).resolve().parents[1]
ENVIRON = {"HOME": "/home/ada", "USER": "ada"}


def no_gpus() -> list[GpuInfo]:
    return []


@pytest.fixture
def repo(tmp_path) -> Path:
    """A repository root with the real site files and no .env.local."""
    shutil.copytree(REPO / "env", tmp_path / "env")
    return tmp_path


def resolve(repo: Path, site: str, cli=None, probe=no_gpus):
    return resolve_config(site, repo, cli or {}, ENVIRON, probe, cpu_count=lambda: 4)


def test_every_shipped_site_resolves(repo):
    assert available_sites(repo) == ["a100-slurm", "cpu", "cpu-slurm", "gb10", "h100x8"]
    for site in available_sites(repo):
        config = resolve(repo, site)
        assert config.site.name == site
        assert config.stage_env["NANOCHAT_BASE_DIR"] == str(config.site.cache_dir)


def test_precedence_cli_over_local_over_site_over_default(repo):
    (repo / ".env.local").write_text("DEPTH=6\nMAX_SEQ_LEN=256\nSBATCH_ACCOUNT=physics\n")
    config = resolve(repo, "cpu", {"DEPTH": "8"})
    assert (config.run.depth, config.sources["DEPTH"]) == (8, "cli")
    assert (config.run.max_seq_len, config.sources["MAX_SEQ_LEN"]) == (256, ".env.local")
    assert (config.run.vocab_size, config.sources["VOCAB_SIZE"]) == (1024, "env/cpu.env")
    assert (config.slurm.account, config.sources["SBATCH_ACCOUNT"]) == ("physics", ".env.local")
    assert config.sources["SIGNAL_LEAD_SECONDS"] == "default"
    text = format_config(config)
    assert "DEPTH" in text and "[cli]" in text and "[.env.local]" in text and "[env/cpu.env]" in text


def test_cache_dir_expands_user_and_home(repo):
    assert resolve(repo, "a100-slurm").site.cache_dir == Path("/scratch/ada/nanochat-cache")
    assert resolve(repo, "cpu").site.cache_dir == Path("/home/ada/.cache/nanochat/demo")


def test_exported_cache_dir_beats_files_but_not_cli(repo):
    (repo / ".env.local").write_text("NANOCHAT_BASE_DIR=/data/local-choice\n")
    environ = {**ENVIRON, "NANOCHAT_BASE_DIR": "/scratch/$USER/exported"}
    config = resolve_config("cpu", repo, {}, environ, no_gpus, cpu_count=lambda: 4)
    assert config.site.cache_dir == Path("/scratch/ada/exported")
    assert config.sources["NANOCHAT_BASE_DIR"] == "$NANOCHAT_BASE_DIR (exported)"
    config = resolve_config("cpu", repo, {"NANOCHAT_BASE_DIR": "/cli/choice"}, environ, no_gpus, cpu_count=lambda: 4)
    assert config.site.cache_dir == Path("/cli/choice")


def test_exported_sbatch_variables_beat_files_but_not_cli(repo):
    """sbatch applies an exported $SBATCH_TIMELIMIT over the job script, so the launcher reports and uses it."""
    (repo / ".env.local").write_text("SBATCH_TIMELIMIT=04:00:00\nSBATCH_PARTITION=gpu\n")
    environ = {**ENVIRON, "SBATCH_TIMELIMIT": "01:30:00", "SBATCH_ACCOUNT": "physics"}
    config = resolve_config("a100-slurm", repo, {}, environ, no_gpus, cpu_count=lambda: 4)
    assert (config.slurm.timeout_minutes, config.slurm.account, config.slurm.partition) == (90, "physics", "gpu")
    assert config.sources["SBATCH_TIMELIMIT"] == "$SBATCH_TIMELIMIT (exported)"
    assert config.sources["SBATCH_PARTITION"] == ".env.local"
    config = resolve_config("a100-slurm", repo, {"SBATCH_TIMELIMIT": "02:00:00"}, environ, no_gpus,
                            cpu_count=lambda: 4)
    assert config.slurm.timeout_minutes == 120 and config.sources["SBATCH_TIMELIMIT"] == "cli"


def test_an_empty_cache_dir_is_refused_not_read_as_the_current_folder(repo):
    with pytest.raises(UsageError, match=r"NANOCHAT_BASE_DIR is empty \(from cli\)"):
        resolve_config("cpu", repo, {"NANOCHAT_BASE_DIR": ""}, ENVIRON, no_gpus, cpu_count=lambda: 4)


def test_model_tag_defaults_to_depth(repo):
    assert resolve(repo, "cpu").run.model_tag == "d2"
    assert resolve(repo, "cpu", {"DEPTH": "6"}).run.model_tag == "d6"
    with pytest.raises(UsageError, match="--model-tag '../d6' is not a folder name"):
        resolve(repo, "cpu", {"MODEL_TAG": "../d6"})


def test_unknown_key_in_env_local_names_closest(repo):
    (repo / ".env.local").write_text("SBATCH_ACOUNT=physics\n")
    with pytest.raises(UsageError, match=r"unknown key SBATCH_ACOUNT in .*\.env\.local; did you mean SBATCH_ACCOUNT\?"):
        resolve(repo, "cpu")


def test_env_file_parsing_comments_and_pass_through(tmp_path):
    path = tmp_path / "x.env"
    path.write_text("# comment\nDEPTH=4  # trailing\nNCCL_SOCKET_IFNAME=ib0\nWANDB_PROJECT='my proj'\n")
    assert read_env_file(path) == {"DEPTH": "4", "NCCL_SOCKET_IFNAME": "ib0", "WANDB_PROJECT": "my proj"}


def test_env_file_line_that_does_not_parse_is_a_usage_error(tmp_path):
    path = tmp_path / "x.env"
    path.write_text("DEPTH=4\n# comment\n\nthis is not a setting\n")
    with pytest.raises(UsageError, match=r"x\.env, line 4: cannot parse 'this is not a setting'"):
        read_env_file(path)


def test_bad_values_are_usage_errors(repo):
    with pytest.raises(UsageError, match="PRECISION='fp64'"):
        resolve(repo, "cpu", {"PRECISION": "fp64"})
    with pytest.raises(UsageError, match="expected int"):
        resolve(repo, "cpu", {"DEPTH": "four"})
    with pytest.raises(UsageError, match="SBATCH_TIMELIMIT"):
        resolve(repo, "a100-slurm", {"SBATCH_TIMELIMIT": "twelve hours"})



@pytest.mark.parametrize("key, value", [("TARGET_PARAM_DATA_RATIO", "inf"), ("DEMO_MEGABYTES", "inf"),
                                        ("PRICE_PER_GPU_HOUR", "nan"), ("GPU_MEMORY_GB", "-inf")])
def test_a_float_setting_must_be_a_finite_number(repo, key, value):
    with pytest.raises(UsageError, match=f"{key}='{value}' in cli: expected a finite number"):
        resolve(repo, "cpu", {key: value})


@pytest.mark.parametrize("key, value, message", [
    ("BASE_ITERATIONS", "0", r"BASE_ITERATIONS \(--num-iterations\) must be positive or -1, got 0"),
    ("MID_ITERATIONS", "-5", r"MID_ITERATIONS \(--mid-iterations\) must be positive or -1, got -5"),
    ("SFT_ITERATIONS", "0", "SFT_ITERATIONS"), ("RL_ITERATIONS", "0", "RL_ITERATIONS"),
    ("EVAL_MAX_PER_TASK", "0", "EVAL_MAX_PER_TASK"), ("FINETUNE_EVAL_EVERY", "0", "FINETUNE_EVAL_EVERY"),
    ("EVAL_EVERY", "-1", r"EVAL_EVERY \(--eval-every\) must be positive, got -1"),
    ("EVAL_TOKENS", "0", "EVAL_TOKENS"), ("EVAL_SPLIT_TOKENS", "0", "EVAL_SPLIT_TOKENS"),
    ("CHAT_MAX_NEW_TOKENS", "0", "CHAT_MAX_NEW_TOKENS"), ("TOKENIZER_MAX_CHARS", "0", "TOKENIZER_MAX_CHARS"),
    ("ASPECT_RATIO", "0", "ASPECT_RATIO"), ("HEAD_DIM", "-64", "HEAD_DIM"),
    ("TARGET_PARAM_DATA_RATIO", "0", "TARGET_PARAM_DATA_RATIO"),
    ("VOCAB_SIZE", "264", r"VOCAB_SIZE \(--vocab-size\) must be at least 265 \(256 bytes \+ special tokens\), got 264"),
    ("SEED", "-1", r"SEED \(--seed\) must be zero or positive, got -1"),
    ("DEMO_MEGABYTES", "10001", r"DEMO_MEGABYTES \(--pretrain-megabytes\) must be in \(0, 10000\], got 10001"),
])
def test_values_the_stages_would_refuse_are_refused_before_launch(repo, key, value, message):
    """A value a stage rejects must fail at launch, not after earlier stages ran (or a SLURM job queued)."""
    with pytest.raises(UsageError, match=message):
        resolve(repo, "a100-slurm", {key: value})


def test_the_launchers_limits_are_the_stages_own():
    from launch import config
    from nanochat.demo_data import DemoCorpusConfig
    from nanochat.tokenizer import MIN_VOCAB_SIZE

    assert config.MIN_VOCAB_SIZE == MIN_VOCAB_SIZE
    DemoCorpusConfig(pretrain_megabytes=config.MAX_DEMO_MEGABYTES)
    with pytest.raises(UsageError, match="--pretrain-megabytes"):
        DemoCorpusConfig(pretrain_megabytes=config.MAX_DEMO_MEGABYTES * 1.001)


def test_minus_one_still_means_the_stage_derives_the_count(repo):
    config = resolve(repo, "cpu", {"BASE_ITERATIONS": "-1", "MID_ITERATIONS": "-1", "EVAL_MAX_PER_TASK": "-1"})
    assert (config.run.base_iterations, config.run.mid_iterations, config.run.eval_max_per_task) == (-1, -1, -1)

def test_timelimit_minutes(repo):
    assert resolve(repo, "a100-slurm").slurm.timeout_minutes == 720
    assert resolve(repo, "a100-slurm", {"SBATCH_TIMELIMIT": "1-02:30:00"}).slurm.timeout_minutes == 1590


@pytest.mark.parametrize(("text", "minutes"), [
    ("90", 90), ("30:00", 30), ("30:01", 31), ("4:00:00", 240), ("2-12", 3600), ("1-02:30", 1590)])
def test_timelimit_reads_every_sbatch_format_as_sbatch_does(repo, text, minutes):
    """SBATCH_TIMELIMIT is sbatch's own variable: "30:00" is 30 minutes there (minutes:seconds), not 30 hours."""
    assert resolve(repo, "a100-slurm", {"SBATCH_TIMELIMIT": text}).slurm.timeout_minutes == minutes


def test_signal_lead_must_fit_inside_the_time_limit(repo):
    """A 5-minute job signalled 300 s before its end would be told to save and requeue as it starts, every time."""
    with pytest.raises(UsageError, match="SIGNAL_LEAD_SECONDS=300 .* SBATCH_TIMELIMIT=00:05:00"):
        resolve(repo, "a100-slurm", {"SBATCH_TIMELIMIT": "00:05:00"})
    assert resolve(repo, "a100-slurm", {"SBATCH_TIMELIMIT": "00:06:00"}).slurm.timeout_minutes == 6


def test_40gb_gpus_halve_site_batch_and_keep_total(repo):
    config = resolve(repo, "a100-slurm")
    assert config.run.device_batch_size == 16
    assert config.run.total_batch_size == 524288
    assert config.sources["DEVICE_BATCH_SIZE"] == SOURCE_ADJUSTED
    assert any("32 -> 16" in note for note in config.notes)


def test_40gb_rule_respects_explicit_batch_and_80gb(repo):
    assert resolve(repo, "a100-slurm", {"DEVICE_BATCH_SIZE": "32"}).run.device_batch_size == 32
    (repo / ".env.local").write_text("GPU_MEMORY_GB=80\n")
    config = resolve(repo, "a100-slurm")
    assert config.run.device_batch_size == 32 and not config.notes


def test_probe_sets_gpu_count_and_memory_for_local_sites(repo):
    four = [GpuInfo("NVIDIA H100 80GB HBM3", 79.6)] * 4
    config = resolve(repo, "h100x8", probe=lambda: four)
    assert config.site.gpus_per_node == 4 and config.sources["GPUS_PER_NODE"] == "nvidia-smi"
    assert config.site.gpu_memory_gb == 79.6
    small = [GpuInfo("NVIDIA A100-SXM4-40GB", 40.0)] * 8
    assert resolve(repo, "h100x8", probe=lambda: small).run.device_batch_size == 16


def test_omp_threads_auto(repo):
    assert resolve(repo, "cpu").stage_env["OMP_NUM_THREADS"] == "4"
    assert resolve(repo, "a100-slurm").stage_env["OMP_NUM_THREADS"] == str(64 // 8)


def test_site_environment_variables(repo):
    gb10 = resolve(repo, "gb10").stage_env
    assert gb10["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert gb10["TORCHINDUCTOR_MAX_AUTOTUNE_GEMM"] == "1"
    slurm = resolve(repo, "a100-slurm").stage_env
    assert (slurm["HF_HUB_OFFLINE"], slurm["HF_DATASETS_OFFLINE"], slurm["WANDB_MODE"]) == ("1", "1", "offline")
    assert "HF_HUB_OFFLINE" not in resolve(repo, "cpu").stage_env
