"""Temporaries of killed writers: removed when their process is gone from this host or they have not changed
for an hour; a live writer's (here or on another node of a shared filesystem) are never touched."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanochat.leftovers import STALE_AFTER_SECONDS, remove_leftovers, temp_name
from tests.conftest import run_stage

HOST = socket.gethostname()


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _age(path: Path, seconds: float) -> None:
    """Make `path` and everything in it look untouched for `seconds`."""
    then = time.time() - seconds
    for inner in sorted(path.rglob("*"), reverse=True) if path.is_dir() else []:
        os.utime(inner, (then, then))
    os.utime(path, (then, then))


def _folder(path: Path) -> Path:
    path.mkdir()
    (path / "tokenizer.json").write_text("{}")
    return path


def test_temp_name_carries_host_and_process():
    assert temp_name("tokenizer") == f".tokenizer.tmp-{HOST}-{os.getpid()}"
    assert temp_name("eval_bundle", "extract") == f".eval_bundle.extract-{HOST}-{os.getpid()}"


def test_a_dead_writer_on_this_host_is_cleaned_at_once_a_live_one_never(tmp_path, dead_pid):
    dead = _folder(tmp_path / f".tokenizer.tmp-{HOST}-{dead_pid}")
    retired = _folder(tmp_path / f".tokenizer.old-{HOST}-{dead_pid}")
    live = _folder(tmp_path / temp_name("tokenizer"))
    _age(live, 2 * STALE_AFTER_SECONDS)  # even untouched for long: its process is still here
    assert remove_leftovers(tmp_path, "tokenizer") == sorted([dead.name, retired.name])
    assert live.is_dir()


def test_another_hosts_writer_is_cleaned_only_once_untouched_for_an_hour(tmp_path, dead_pid):
    """On a shared filesystem the process id says nothing here: a writer elsewhere touches its temporary."""
    writing = tmp_path / f".shard_00001.parquet.tmp-other-node-{dead_pid}"
    writing.write_bytes(b"PAR1")
    abandoned = tmp_path / f".shard_00002.parquet.tmp-other-node-{dead_pid}"
    abandoned.write_bytes(b"PAR1")
    _age(abandoned, STALE_AFTER_SECONDS + 60)
    unpacking = _folder(tmp_path / f".eval_bundle.extract-other-node-{dead_pid}")
    _age(unpacking, 2 * STALE_AFTER_SECONDS)
    (unpacking / "core.yaml").write_text("tasks: []\n")  # still being written into
    assert remove_leftovers(tmp_path, "shard_*.parquet") == [abandoned.name]
    assert remove_leftovers(tmp_path, "eval_bundle") == []
    assert writing.exists() and unpacking.is_dir()


def test_names_from_before_the_host_was_added_are_cleaned_by_age(tmp_path, dead_pid):
    old_style = [tmp_path / f".tokenizer.tmp{dead_pid}", tmp_path / f".eval_bundle.old-{dead_pid}"]
    for path in old_style:
        _folder(path)
    fresh = _folder(tmp_path / f".tokenizer.old{dead_pid + 1}")
    for path in old_style:
        _age(path, STALE_AFTER_SECONDS + 60)
    assert remove_leftovers(tmp_path, "tokenizer") == [old_style[0].name]
    assert remove_leftovers(tmp_path, "eval_bundle") == [old_style[1].name]
    assert fresh.is_dir()


def test_only_temporaries_of_the_named_outputs_are_touched(tmp_path, dead_pid):
    keep = [tmp_path / "tokenizer", tmp_path / f".tokenizer.json.tmp-{HOST}-{dead_pid}",
            tmp_path / f".tokenizers.tmp-{HOST}-{dead_pid}", tmp_path / f".tokenizer.partial-{HOST}-{dead_pid}",
            tmp_path / f"tokenizer.tmp-{HOST}-{dead_pid}"]
    for path in keep:
        _folder(path)
    assert remove_leftovers(tmp_path, "tokenizer") == []
    assert remove_leftovers(tmp_path / "missing", "tokenizer") == []
    assert all(path.is_dir() for path in keep)


def test_tok_train_removes_its_killed_runs_folders_and_keeps_a_live_ones(tiny_cache, dead_pid):
    killed = [_folder(tiny_cache / f".tokenizer.tmp-{HOST}-{dead_pid}"),
              _folder(tiny_cache / f".tokenizer.old-{HOST}-{dead_pid}")]
    live = _folder(tiny_cache / temp_name("tokenizer"))
    out = run_stage("tok_train", "--vocab-size", "512", cache=tiny_cache).stdout
    assert all(not path.exists() for path in killed) and live.is_dir()
    assert f"removed {killed[1].name}, {killed[0].name} from {tiny_cache}: left by a killed run" in out
    assert "already trained" in out


def test_demo_data_removes_its_killed_runs_temporaries(tiny_cache, dead_pid):
    killed = [tiny_cache / "base_data" / f".shard_00001.parquet.tmp-{HOST}-{dead_pid}",
              tiny_cache / "tasks" / f".gsm8k_train.jsonl.tmp-{HOST}-{dead_pid}",
              tiny_cache / f".DEMO.partial.tmp-{HOST}-{dead_pid}"]
    for path in killed:
        path.write_bytes(b"half")
    out = run_stage("demo_data", "--pretrain-megabytes", "0.3", "--num-shards", "3", cache=tiny_cache).stdout
    assert not [path for path in killed if path.exists()]
    assert out.count("left by a killed run") == 3 and "already present" in out


def test_the_eval_bundle_download_removes_a_killed_extraction(tmp_path, dead_pid):
    from scripts.download_data import DownloadDataConfig, download_eval_bundle

    cache = tmp_path / "cache"
    (cache / "eval_bundle").mkdir(parents=True)
    (cache / "eval_bundle" / "core.yaml").write_text("tasks: []\n")
    killed = _folder(cache / f".eval_bundle.extract-{HOST}-{dead_pid}")
    result = download_eval_bundle("http://127.0.0.1:9/unused.zip", cache, DownloadDataConfig())
    assert result.status == "skipped-verified" and not killed.exists()
