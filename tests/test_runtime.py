"""The runtime set-up's process-group arguments: NCCL on high-priority streams unless the user chose."""

import pytest
import torch
import torch.distributed as dist

from nanochat.configargs import UsageError
from nanochat.runtime import process_group_options, torchrun_ranks


class FakeNCCL:
    class Options:
        def __init__(self, is_high_priority_stream: bool = False):
            self.is_high_priority_stream = is_high_priority_stream


def test_torchrun_ranks_default_to_one_process():
    assert torchrun_ranks({}) == (0, 0, 1)
    assert torchrun_ranks({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == (3, 1, 4)


@pytest.mark.parametrize("environ, message", [
    ({"WORLD_SIZE": "x"}, "WORLD_SIZE='x' is not a whole number"),
    ({"RANK": ""}, "RANK='' is not a whole number"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' is not a whole number >= 0"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' is not a whole number >= 1"),
    ({"RANK": "1"}, "RANK=1 is not below WORLD_SIZE=1"),
])
def test_garbage_torchrun_variables_name_the_variable_and_the_fix(environ, message):
    with pytest.raises(UsageError) as caught:
        torchrun_ranks(environ)
    assert str(caught.value).startswith(message) and "unset" in str(caught.value)


def test_gloo_gets_no_extra_arguments():
    assert process_group_options("gloo", {}) == {}


def test_nccl_gets_high_priority_streams(monkeypatch):
    monkeypatch.setattr(dist, "ProcessGroupNCCL", FakeNCCL, raising=False)
    options = process_group_options("nccl", {"PATH": "/usr/bin"})
    assert set(options) == {"pg_options"}
    assert options["pg_options"].is_high_priority_stream is True


@pytest.mark.parametrize("value", ["0", "1"])
def test_users_own_setting_is_left_to_torch(monkeypatch, value):
    monkeypatch.setattr(dist, "ProcessGroupNCCL", FakeNCCL, raising=False)
    assert process_group_options("nccl", {"TORCH_NCCL_HIGH_PRIORITY": value}) == {}


@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(), reason="needs CUDA and NCCL")
def test_one_rank_nccl_group_runs_collectives_with_the_options(tmp_path):
    device = torch.device("cuda", 0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            device_id=device, **process_group_options("nccl", {}))
    try:
        backend = dist.distributed_c10d._get_default_group()._get_backend(device)
        assert backend.options.is_high_priority_stream
        tensor = torch.arange(4.0, device=device)
        dist.all_reduce(tensor)
        gathered = torch.empty(4, device=device)
        dist.all_gather_into_tensor(gathered, tensor)
        assert torch.equal(gathered.cpu(), torch.arange(4.0))
    finally:
        dist.destroy_process_group()
