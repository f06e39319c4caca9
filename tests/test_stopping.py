"""Stop requests: one process stops at the first boundary after a signal; under torch.distributed every rank
stops at the same boundary, one after the one where any rank had the signal (the vote is read late)."""

import json
import os
import signal

import pytest
import torch
import torch.multiprocessing as mp

from nanochat.configargs import STOP_FILE_ENV
from nanochat.stopping import STOP_SIGNALS, StopRequest
from tests.fixtures.process_group import joined_process_group

BOUNDARIES = 6
SIGNALLED_AT = 2


def test_one_process_stops_at_the_first_boundary_after_a_signal():
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    stop = StopRequest().install()
    try:
        assert not stop.should_stop(torch.device("cpu"), distributed=False)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop(torch.device("cpu"), distributed=False)
        assert stop.signal_name == "SIGUSR1"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_first_ctrl_c_stops_gracefully_and_a_second_quits(capfd):
    previous = {sig: signal.getsignal(sig) for sig in (*STOP_SIGNALS, signal.SIGINT)}
    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.should_stop(torch.device("cpu"), distributed=False) and stop.signal_name == "SIGINT"
        assert "press Ctrl-C again to quit without saving" in capfd.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize(("written", "expected"), [(None, None), ("SIGTERM", "SIGTERM"), ("", "stop")],
                         ids=["no-stop-file", "stop-file", "stop-file-being-written"])
def test_install_takes_over_a_stop_the_launcher_requested_before(tmp_path, monkeypatch, written, expected):
    """Until its handlers exist a launched stage ignores the launcher's signal; the stop file tells it."""
    stop_file = tmp_path / "base_train.stop"
    if written is not None:
        stop_file.write_text(written)
    monkeypatch.setenv(STOP_FILE_ENV, str(stop_file))
    previous = {sig: signal.getsignal(sig) for sig in (*STOP_SIGNALS, signal.SIGINT)}
    try:
        stop = StopRequest().install()
        assert stop.signal_name == expected
        assert stop.should_stop(torch.device("cpu"), distributed=False) == (expected is not None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def vote_worker(rank: int, world_size: int, backend: str, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    with joined_process_group(backend, store_path, rank, world_size):
        stop = StopRequest()
        decisions = []
        for boundary in range(BOUNDARIES):
            if rank == 1 and boundary == SIGNALLED_AT:
                stop.signal_name = "SIGUSR1"
            decisions.append(stop.should_stop(device, distributed=True))
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(decisions, f)


@pytest.mark.parametrize("backend", [
    "gloo",
    pytest.param("nccl", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")),
])
def test_every_rank_stops_at_the_same_boundary_one_after_the_signal(tmp_path, backend):
    mp.spawn(vote_worker, args=(2, backend, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    expected = [boundary > SIGNALLED_AT for boundary in range(BOUNDARIES)]
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected
