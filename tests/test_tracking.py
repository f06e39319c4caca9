"""wandb tracking: off by default, a clear usage error when asked for without wandb, rank 0 only."""

import importlib.machinery
import importlib.util
import sys
import types

import pytest

from nanochat.configargs import EXIT_USAGE, UsageError, run_stage
from nanochat.tracking import require_tracker, start_tracking
from nanochat.training_loop import FinetuneConfig
from scripts.base_train import BaseTrainConfig
from scripts.base_train import main as base_train_main


@pytest.fixture
def no_wandb(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "wandb" else real_find_spec(name, *args))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init = lambda **kwargs: calls.append(kwargs) or "run"
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_tracking_off_needs_no_wandb(no_wandb):
    require_tracker("dummy")
    assert start_tracking("dummy", True, {"depth": 4}) is None


def test_a_run_name_without_wandb_is_a_usage_error(no_wandb):
    with pytest.raises(UsageError, match="pip install wandb, or leave out --run"):
        require_tracker("my-run")
    with pytest.raises(UsageError, match="--run my-run"):
        FinetuneConfig(run="my-run")


def test_base_train_refuses_the_run_name_before_any_work(no_wandb, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    code = run_stage(base_train_main, BaseTrainConfig, ["--run", "my-run", "--device-type", "cpu"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --run my-run logs to wandb, which is not installed: pip install wandb, or leave out --run"]
    assert list(tmp_path.iterdir()) == []


def test_rank_zero_starts_the_run_in_the_chosen_project(fake_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "class-cluster")
    assert start_tracking("my-run", False, {"depth": 4}) is None
    assert fake_wandb == []
    assert start_tracking("my-run", True, {"depth": 4}, job_type="mid_train") == "run"
    assert fake_wandb == [{"project": "class-cluster", "name": "my-run", "job_type": "mid_train",
                           "config": {"depth": 4}}]


def test_project_defaults_to_nanochat(fake_wandb, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    start_tracking("my-run", True, {})
    assert fake_wandb[0]["project"] == "nanochat"
