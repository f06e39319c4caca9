"""Checkpoints become visible only when complete; truncated or meta-less ones are never loaded."""

import json

import pytest
import torch

from nanochat import checkpoint as ckpt
from nanochat import paths
from nanochat.configargs import UsageError
from tests.conftest import run_stage


def _save(directory, step, world_size=1):
    model_state = {"w": torch.arange(10.0) + step}
    for rank in reversed(range(world_size)):  # rank 0 last: it writes the meta once the shards exist
        ckpt.save_checkpoint(directory, step, model_state, {"m": torch.ones(3) * rank}, {"note": "x"},
                             rank=rank, world_size=world_size)


def test_round_trip_and_latest(tmp_path):
    _save(tmp_path, 5)
    _save(tmp_path, 10)
    assert ckpt.complete_steps(tmp_path) == [5, 10]
    model_state, optim_state, meta = ckpt.load_checkpoint(tmp_path, 10, "cpu")
    assert torch.equal(model_state["w"], torch.arange(10.0) + 10)
    assert torch.equal(optim_state["m"], torch.zeros(3))
    assert meta["note"] == "x" and meta["step"] == 10 and meta["world_size"] == 1


def test_meta_less_checkpoint_is_invisible(tmp_path):
    _save(tmp_path, 5)
    _save(tmp_path, 10)
    ckpt.meta_path(tmp_path, 10).unlink()
    assert ckpt.latest_complete_step(tmp_path) == 5
    with pytest.raises(ValueError):
        ckpt.load_checkpoint(tmp_path, 10, "cpu")


def test_truncated_model_file_is_invisible(tmp_path):
    _save(tmp_path, 5)
    _save(tmp_path, 10)
    path = ckpt.model_path(tmp_path, 10)
    path.write_bytes(path.read_bytes()[:-7])
    assert ckpt.latest_complete_step(tmp_path) == 5


def test_missing_rank_shard_is_invisible(tmp_path):
    _save(tmp_path, 3, world_size=2)
    assert ckpt.latest_complete_step(tmp_path) == 3
    ckpt.optim_path(tmp_path, 3, 1).unlink()
    assert ckpt.latest_complete_step(tmp_path) is None


def test_corrupt_meta_is_invisible(tmp_path):
    _save(tmp_path, 7)
    ckpt.meta_path(tmp_path, 7).write_text("{not json")
    assert ckpt.latest_complete_step(tmp_path) is None
    _save(tmp_path, 8)
    meta = json.loads(ckpt.meta_path(tmp_path, 8).read_text())
    meta["step"] = 9
    ckpt.meta_path(tmp_path, 8).write_text(json.dumps(meta))
    assert ckpt.latest_complete_step(tmp_path) is None
    _save(tmp_path, 9)
    ckpt.meta_path(tmp_path, 9).write_text("[9]")  # JSON, but not a meta
    assert ckpt.latest_complete_step(tmp_path) is None


@pytest.mark.parametrize("damage", [lambda data: bytes(len(data)), lambda data: data[:100] + bytes(len(data) - 100)])
@pytest.mark.parametrize("file", ["model", "optim"])
def test_a_corrupt_file_of_the_right_size_is_named_with_the_fix(tmp_path, damage, file):
    _save(tmp_path, 5)
    _save(tmp_path, 10)
    path = ckpt.model_path(tmp_path, 10) if file == "model" else ckpt.optim_path(tmp_path, 10, 0)
    path.write_bytes(damage(path.read_bytes()))  # zeroed after a crash: the size still matches the meta
    with pytest.raises(UsageError) as caught:
        ckpt.load_checkpoint(tmp_path, 10, "cpu")
    message = str(caught.value)
    assert str(path) in message and "meta_000010.json" in message and "\n" not in message
    assert ckpt.latest_complete_step(tmp_path) == 10  # nothing was deleted


def test_stale_temporaries_and_pruning(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    (tmp_path / ".model_000005.pt.tmp123").write_bytes(b"partial")
    assert ckpt.remove_stale_temporaries(tmp_path) == 1
    assert ckpt.prune_checkpoints(tmp_path, keep=2) == [1, 2]
    assert ckpt.complete_steps(tmp_path) == [3, 4]
    assert not list(tmp_path.glob("*_000001*"))


def test_latest_tag(tmp_path):
    assert ckpt.latest_tag(tmp_path) is None
    _save(tmp_path / "d4", 1)
    (tmp_path / "broken").mkdir()
    assert ckpt.latest_tag(tmp_path) == "d4"


def test_save_with_keep_prunes_older_checkpoints(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.zeros(2)}, {"m": torch.ones(1)}, {}, keep=2)
    assert ckpt.complete_steps(tmp_path) == [2, 3]
    ckpt.save_checkpoint(tmp_path, 4, {"w": torch.zeros(2)}, {"m": torch.ones(1)}, {})
    assert ckpt.complete_steps(tmp_path) == [2, 3, 4]


@pytest.mark.parametrize("tag", ["../escape", "a/b", "..", "."])
def test_a_tag_that_is_not_one_folder_name_is_refused(tmp_path, tag):
    with pytest.raises(UsageError, match="is not a folder name"):
        paths.checkpoint_dir("base", tag, tmp_path)
    assert paths.checkpoint_dir("base", "d20-long.v2", tmp_path) == tmp_path / "base_checkpoints" / "d20-long.v2"


def test_base_train_refuses_a_path_as_its_tag_before_writing_anything(tmp_path):
    proc = run_stage("base_train", "--depth", "1", "--model-tag", "../escape", "--device-type", "cpu",
                     cache=tmp_path, check=False)
    assert proc.returncode == 2 and "--model-tag '../escape' is not a folder name" in proc.stderr
    assert not (tmp_path / "escape").exists() and not (tmp_path / "base_checkpoints").exists()
