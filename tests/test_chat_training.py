"""Conversation batching (assistant-only targets, padding, packing, exact resume) and the mid_train and
chat_sft stages end to end on the tiny demo cache: checkpoints, stop-signal resume, reports, offline errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanochat import checkpoint as ckpt
from nanochat.chat_data import PackedChatLoader, PaddedChatLoader, padded_batch, render
from nanochat.tasks import TaskMixture, make_task
from nanochat.tokenizer import Tokenizer
from tests.conftest import REPO, run_stage

BASE = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "16", "--max-seq-len", "64", "--device-batch-size",
        "4", "--total-batch-size", "512", "--num-iterations", "4", "--device-type", "cpu", "--eval-tokens", "512",
        "--sample-every", "-1", "--tokenizer-threads", "1", "--window-pattern", "SL"]
COMMON = ["--device-batch-size", "4", "--device-type", "cpu", "--eval-batches", "2"]


@pytest.fixture(scope="module")
def chat_setup(tiny_cache_template):
    tokenizer = Tokenizer.load(tiny_cache_template / "tokenizer")
    tasks = [make_task(n, s, root=tiny_cache_template) for n, s in (("smoltalk", "train"), ("gsm8k", "train"),
                                                                   ("mmlu", "auxiliary_train"))]
    return tokenizer, TaskMixture(tasks, seed=0)


def test_padded_targets_are_assistant_tokens_only(chat_setup):
    tokenizer, mixture = chat_setup
    rendered = [tokenizer.render_conversation(mixture[i], 10_000) for i in range(6)]
    inputs, targets = padded_batch(rendered, tokenizer.bos_id)
    assert inputs.shape == targets.shape == (6, max(len(ids) for ids, _ in rendered) - 1)
    for row, (ids, mask) in enumerate(rendered):
        n = len(ids) - 1
        assert inputs[row, :n].tolist() == ids[:-1]
        for t in range(n):
            assert targets[row, t].item() == (ids[t + 1] if mask[t + 1] else -1)
        assert (targets[row, n:] == -1).all()


def test_padded_loader_truncates_only_what_does_not_fit(chat_setup):
    tokenizer, mixture = chat_setup
    lengths = [len(tokenizer.render_conversation(mixture[i], 10_000)[0]) for i in range(8)]
    seq_len = sorted(lengths)[4]
    loader = PaddedChatLoader(mixture, tokenizer, 8, seq_len)
    inputs, targets = next(loader)
    assert inputs.shape[1] <= seq_len
    assert loader.truncated == sum(n > seq_len + 1 for n in lengths)
    for row, n in enumerate(lengths):
        if n <= seq_len + 1:
            ids, _, cut = render(tokenizer, mixture[row], seq_len + 1)
            assert not cut and inputs[row, :n - 1].tolist() == ids[:-1]


def test_packed_rows_start_with_bos_and_resume_exactly(chat_setup):
    tokenizer, mixture = chat_setup
    loader = PackedChatLoader(mixture, tokenizer, 3, 96, buffer_size=8)
    for _ in range(2):
        inputs, targets = next(loader)
    assert inputs.shape == targets.shape == (3, 96) and (inputs[:, 0] == tokenizer.bos_id).all()
    assert ((targets == -1) | (targets >= 0)).all() and (targets >= 0).any()
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [next(loader) for _ in range(3)]
    resumed = PackedChatLoader(mixture, tokenizer, 3, 96, buffer_size=8, state=state)
    for (x, y), (rx, ry) in zip(expected, [next(resumed) for _ in range(3)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_ranks_take_disjoint_examples(chat_setup):
    tokenizer, mixture = chat_setup
    seen = []
    for rank in range(2):
        loader = PaddedChatLoader(mixture, tokenizer, 4, 512, rank=rank, world_size=2)
        next(loader)
        seen.append({loader.stream.rank + i * 2 for i in range(loader.stream.position)})
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == 8


def _losses(cache, phase):
    directory = cache / f"{phase}_checkpoints" / "d2"
    meta = ckpt.read_meta(directory, ckpt.latest_complete_step(directory))
    assert meta["finished"]
    return meta["loop_state"]["loss_history"]


def _stop_with_signal(cache, module, args, at_step):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", f"scripts.{module}", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        if line.startswith(f"step {at_step:06d}/"):
            proc.send_signal(signal.SIGUSR1)
            break
        assert time.monotonic() < deadline
    out = proc.stdout.read()
    assert proc.wait() == 75, out
    assert "SIGUSR1 received" in out


def test_mid_and_sft_end_to_end(tiny_cache):
    run_stage("base_train", *BASE, cache=tiny_cache)
    twin = tiny_cache / "twin"
    shutil.copytree(tiny_cache, twin, ignore=shutil.ignore_patterns("twin"))

    mid = [*COMMON, "--num-iterations", "12", "--eval-every", "6", "--total-batch-size", "512"]
    assert "attention kernel of the 1 sliding-window layers: sdpa" in run_stage("mid_train", *mid, cache=twin).stdout
    _stop_with_signal(tiny_cache, "mid_train", mid, at_step=3)
    directory = tiny_cache / "mid_checkpoints" / "d2"
    stopped = ckpt.latest_complete_step(directory)
    assert 3 <= stopped < 12 and not ckpt.read_meta(directory, stopped)["finished"]
    again = run_stage("mid_train", *mid, cache=tiny_cache)
    assert f"resumed from {directory} at step {stopped}" in again.stdout
    assert _losses(tiny_cache, "mid") == _losses(twin, "mid")
    meta = ckpt.read_meta(directory, 12)
    assert meta["model_config"]["n_layer"] == 2 and meta["source"]["phase"] == "base"
    assert "nothing to do" in run_stage("mid_train", *mid, cache=tiny_cache).stdout
    written = sorted(p.name for p in directory.iterdir())
    proc = run_stage("mid_train", *mid, "--force", "--attention", "cudnn", cache=tiny_cache, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--attention cudnn needs a CUDA GPU" in lines[0]
    assert sorted(p.name for p in directory.iterdir()) == written
    report = json.loads((tiny_cache / "report" / "mid_train.json").read_text())
    assert report["phase"] == "MID" and len(report["loss_history"]) == 12
    assert [v[0] for v in report["val_history"]] == [0, 6, 12] and report["seconds"] > 0
    assert report["settings"]["num_iterations"] == 12

    sft = [*COMMON, "--num-iterations", "12", "--eval-every", "6", "--pretrain-mix", "0.5",
           "--examples-per-step", "4", "--tokenizer-threads", "1"]
    _stop_with_signal(tiny_cache, "chat_sft", sft, at_step=2)
    run_stage("chat_sft", *sft, cache=tiny_cache)
    sft_dir = tiny_cache / "chatsft_checkpoints" / "d2"
    meta = ckpt.read_meta(sft_dir, 12)
    assert meta["finished"] and meta["source"]["phase"] == "mid" and meta["source"]["step"] == 12
    assert meta["loader_states"][0]["pretrain"] is not None
    report = json.loads((tiny_cache / "report" / "chat_sft.json").read_text())
    assert report["phase"] == "SFT" and len(report["loss_history"]) == 12
    assert report["text_rows_per_batch"] == 2 and report["examples_seen"] == 12 * 4
    assert [v[0] for v in report["val_history"]] == [0, 6, 12]

    # a step whose loss is not finite ends the run with 3; every checkpoint left holds only finite losses
    boom = run_stage("chat_sft", *sft, "--lr-scale", "1e20", "--save-every", "1", cache=twin, check=False)
    assert boom.returncode == 3, boom.stdout[-2000:] + boom.stderr[-2000:]
    assert "training diverged" in boom.stdout and "--lr-scale" in boom.stdout
    boom_dir = twin / "chatsft_checkpoints" / "d2"
    last_good = ckpt.latest_complete_step(boom_dir)
    if last_good is not None:
        history = ckpt.read_meta(boom_dir, last_good)["loop_state"]["loss_history"]
        assert len(history) == last_good and all(math.isfinite(loss) for _, loss in history)

    # the same cache seen as a real-data cache, offline: one line naming the download step, nothing written
    (tiny_cache / "DEMO").unlink()
    before = sorted(p.name for p in sft_dir.iterdir())
    proc = run_stage("chat_sft", *sft, "--force", cache=tiny_cache, check=False,
                     extra_env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "bash scripts/download_data.sh" in lines[0] and "allenai/ai2_arc/ARC-Easy" in lines[0]
    assert sorted(p.name for p in sft_dir.iterdir()) == before


def test_resume_with_other_training_settings_is_refused_in_one_line(tiny_cache):
    run_stage("base_train", *BASE, cache=tiny_cache)
    mid = [*COMMON, "--num-iterations", "12", "--eval-every", "-1", "--total-batch-size", "512"]
    _stop_with_signal(tiny_cache, "mid_train", mid, at_step=2)
    directory = tiny_cache / "mid_checkpoints" / "d2"
    stopped = ckpt.complete_steps(directory)
    # a shorter run resumed past its end trained on forever; another mixture was a loader traceback
    for changed, named in ((["--num-iterations", "1"], "--num-iterations 12"),
                           (["--lr-scale", "2"], "--lr-scale 1.0"),
                           (["--smoltalk-limit", "5"], "--smoltalk-limit None")):
        proc = run_stage("mid_train", *mid, *changed, cache=tiny_cache, check=False, timeout=30)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and named in lines[0] and "--force" in lines[0], proc.stderr
    assert ckpt.complete_steps(directory) == stopped
    identity = tiny_cache / "tasks" / "identity.jsonl"  # data that changed since (here one conversation more)
    original = identity.read_text()
    identity.write_text(original + original.splitlines(keepends=True)[0])
    proc = run_stage("mid_train", *mid, cache=tiny_cache, check=False, timeout=30)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "cannot resume" in lines[0], proc.stderr
    identity.write_text(original)
    again = run_stage("mid_train", *mid, "--device-batch-size", "2", "--total-batch-size", "512", cache=tiny_cache)
    assert f"resumed from {directory} at step {stopped[-1]}" in again.stdout


def test_a_run_that_dies_writing_its_report_writes_it_when_run_again(tiny_cache):
    run_stage("base_train", *BASE, cache=tiny_cache)
    mid = [*COMMON, "--num-iterations", "4", "--eval-every", "-1", "--save-every", "2", "--total-batch-size", "512"]
    section = tiny_cache / "report" / "mid_train.json"
    section.mkdir(parents=True)  # the section cannot be written: the stage dies there, as if killed
    assert run_stage("mid_train", *mid, cache=tiny_cache, check=False).returncode == 1
    section.rmdir()
    again = run_stage("mid_train", *mid, cache=tiny_cache)
    assert "nothing to do" not in again.stdout  # it used to skip the finished run, and the section never came
    assert len(json.loads(section.read_text())["loss_history"]) == 4


def test_two_process_mid_train_sums_counts_over_ranks(tiny_cache):
    """torchrun with two CPU (gloo) workers: each step's token counts and loss are summed over both ranks."""
    run_stage("base_train", *BASE, cache=tiny_cache)
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tiny_cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    mid = [*COMMON, "--num-iterations", "4", "--eval-every", "-1", "--total-batch-size", "512"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "scripts.mid_train", *mid], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tiny_cache / "report" / "mid_train.json").read_text())
    # 4 rows of 64 tokens per rank and step: 512 tokens a step only when both ranks' counts are summed
    assert report["world_size"] == 2 and report["grad_accum_steps"] == 1
    assert report["tokens_seen"] == 4 * 512
    assert 0 < report["supervised_tokens"] <= report["tokens_seen"]
    assert all(math.isfinite(loss) for _, loss in report["loss_history"]) and len(report["loss_history"]) == 4
    again = subprocess.run(proc.args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("nothing to do") == 1, again.stdout + again.stderr[-3000:]


def test_bad_flags_exit_2(tiny_cache):
    proc = run_stage("chat_sft", "--pretrain-mix", "1.5", cache=tiny_cache, check=False)
    assert proc.returncode == 2 and "--pretrain-mix" in proc.stderr
    proc = run_stage("mid_train", *COMMON, cache=tiny_cache, check=False)
    assert proc.returncode == 2 and "python -m scripts.base_train" in proc.stderr
