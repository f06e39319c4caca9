"""MuonAdamW: Newton-Schulz, the AdamW and Muon updates, state_dict round trip, and the 2-process gloo step."""

import copy

import pytest
import torch
import torch.multiprocessing as mp

from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import MuonAdamW, newton_schulz
from tests.fixtures.process_group import joined_process_group

VOCAB = 41
LRS = dict(unembedding_lr=0.01, embedding_lr=0.1, matrix_lr=0.02, scalar_lr=0.05, weight_decay=0.01)


def tiny_model(seed: int = 0, n_layer: int = 1) -> GPT:
    """A tiny model with GQA, so the Muon groups hold 1 or 2 matrices (odd counts exercise the padding)."""
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=16, vocab_size=VOCAB, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=32,
                       window_pattern="SL", short_window=4)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0.0, 0.1)
            block.mlp.c_proj.weight.normal_(0.0, 0.05)
    return model


def batch(seed: int, rows: int = 4, length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (rows, length + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def train_steps(model: GPT, optimizer: MuonAdamW, steps, rows: slice = slice(None)) -> list[float]:
    losses = []
    for step in steps:
        inputs, targets = batch(step)
        loss = model(inputs[rows], targets[rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("shape", [(3, 32, 64), (2, 64, 32), (48, 48)])
def test_newton_schulz_equals_the_quintic_iteration_written_out(shape):
    a, b, c = 3.4445, -4.7750, 2.0315
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    x = grad.mT if shape[-2] > shape[-1] else grad
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(5):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    expected = x.mT if shape[-2] > shape[-1] else x
    torch.testing.assert_close(newton_schulz(grad, steps=5), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 48)])
def test_newton_schulz_is_near_orthogonal(shape):
    torch.manual_seed(0)
    grad = torch.randn(shape)
    singular_values = torch.linalg.svdvals(newton_schulz(grad, steps=5))
    assert singular_values.min() > 0.5 and singular_values.max() < 1.3
    assert torch.linalg.svdvals(grad).max() / torch.linalg.svdvals(grad).min() > 3  # the input was not
    # left and right singular vectors are kept: the result is close to U V^T
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    cosine = torch.nn.functional.cosine_similarity(newton_schulz(grad).flatten(), (u @ vh).flatten(), dim=0)
    assert cosine > 0.95


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_adamw_groups_match_torch_adamw(device):
    torch.manual_seed(0)
    weights = torch.randn(5, 7)
    ours = torch.nn.Parameter(weights.clone().to(device))
    reference = torch.nn.Parameter(weights.clone().to(device))
    optimizer = MuonAdamW([dict(params=[ours], kind="adamw", lr=0.01, betas=(0.8, 0.95), eps=1e-10,
                                weight_decay=0.1)])
    torch_adamw = torch.optim.AdamW([reference], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1,
                                    foreach=False)
    for step in range(5):
        grad = torch.randn(5, 7, generator=torch.Generator().manual_seed(step)).to(device)
        ours.grad, reference.grad = grad.clone(), grad.clone()
        optimizer.step()
        torch_adamw.step()
    assert torch.allclose(ours, reference, atol=1e-6)
    assert optimizer.state[ours]["step"].device == ours.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adamw_on_cuda_resumes_from_step_counts_loaded_onto_the_cpu(tmp_path):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(5, 7, device="cuda"))
    optimizer = MuonAdamW([dict(params=[param], kind="adamw", lr=0.01)])
    for _ in range(3):
        param.grad = torch.randn(5, 7, device="cuda")
        optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    saved_param = param.detach().clone()
    grad = torch.randn(5, 7, device="cuda")
    param.grad = grad.clone()
    optimizer.step()

    resumed_param = torch.nn.Parameter(saved_param)
    resumed = MuonAdamW([dict(params=[resumed_param], kind="adamw", lr=0.01)])
    resumed.load_state_dict(torch.load(tmp_path / "optimizer.pt", map_location="cpu"))
    resumed_param.grad = grad.clone()
    resumed.step()
    assert torch.equal(resumed_param, param)


def test_muon_update_is_scaled_orthogonal_direction():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(64, 16))
    before = param.detach().clone()
    optimizer = MuonAdamW([dict(params=[param], kind="muon", lr=0.1, momentum=0.0, nesterov=False)])
    param.grad = torch.randn(64, 16)
    optimizer.step()
    step = (before - param.detach()) / 0.1
    assert torch.allclose(step, newton_schulz(param.grad) * 2.0, atol=1e-5)  # sqrt(64 / 16) = 2


def test_optimizer_decreases_loss_on_a_toy_problem():
    model = tiny_model()
    optimizer = model.setup_optimizer(**LRS)
    inputs, targets = batch(0)
    losses = []
    for _ in range(30):
        loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_lr_is_scheduled_through_initial_lr():
    model = tiny_model()
    optimizer = model.setup_optimizer(**LRS)
    before = copy.deepcopy(model.state_dict())
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * 0.0
    train_steps(model, optimizer, [0])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def resume_and_compare(edit_saved_state=lambda state: None) -> tuple[MuonAdamW, MuonAdamW]:
    """Train 3 steps, save the model and optimizer state, train 2 more; a fresh model and optimizer loaded from
    the saved state (after `edit_saved_state` changes the optimizer's) must reach the same weights."""
    model = tiny_model()
    optimizer = model.setup_optimizer(**LRS)
    train_steps(model, optimizer, range(3))
    model_state = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    edit_saved_state(optimizer_state)
    train_steps(model, optimizer, [3, 4])

    resumed = tiny_model(seed=99)
    resumed_optimizer = resumed.setup_optimizer(**LRS)
    resumed.load_state_dict(model_state)
    resumed_optimizer.load_state_dict(optimizer_state)
    train_steps(resumed, resumed_optimizer, [3, 4])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    return optimizer, resumed_optimizer


def test_state_dict_round_trip_gives_identical_next_step():
    optimizer, resumed_optimizer = resume_and_compare()
    assert [g["initial_lr"] for g in resumed_optimizer.param_groups] == [g["initial_lr"] for g in optimizer.param_groups]


def test_adamw_resumes_from_step_counts_saved_as_integers():
    """Checkpoints written before the fused AdamW kernel kept each step count as a Python int."""

    def as_integers(optimizer_state: dict) -> None:
        counted = [state for state in optimizer_state["state"].values() if "step" in state]
        assert counted and all(state["step"].item() == 3 for state in counted)
        for state in counted:
            state["step"] = int(state["step"].item())

    resume_and_compare(as_integers)


def test_param_group_validation():
    matrix = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(params=[matrix], lr=0.1)])
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW([dict(params=[matrix, torch.nn.Parameter(torch.zeros(4, 2))], kind="muon", lr=0.1)])
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([dict(params=[torch.nn.Parameter(torch.zeros(4))], kind="muon", lr=0.1)])
    with pytest.raises(ValueError, match="lr"):
        MuonAdamW([dict(params=[matrix], kind="adamw")])


@pytest.mark.parametrize("config_path", ["scripts.base_train:BaseTrainConfig", "scripts.mid_train:MidTrainConfig",
                                         "scripts.chat_sft:ChatSFTConfig", "scripts.chat_rl:ChatRLConfig"])
@pytest.mark.parametrize("argv, message", [
    (["--matrix-lr", "-0.02"], "--matrix-lr must be a finite number >= 0, got -0.02"),
    (["--embedding-lr", "nan"], "--embedding-lr must be a finite number >= 0, got nan"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0, got inf"),
])
def test_every_training_stage_refuses_negative_or_non_finite_learning_rates(config_path, argv, message):
    import importlib

    from nanochat.configargs import UsageError, parse_config

    module, name = config_path.split(":")
    with pytest.raises(UsageError) as caught:
        parse_config(getattr(importlib.import_module(module), name), argv)
    assert str(caught.value) == message


def test_finetune_stages_refuse_an_infinite_lr_scale():
    from nanochat.configargs import UsageError, parse_config
    from scripts.mid_train import MidTrainConfig

    with pytest.raises(UsageError, match="--lr-scale must be a finite positive number, got inf"):
        parse_config(MidTrainConfig, ["--lr-scale", "inf"])


def overlapped_train_steps(model: GPT, optimizer: MuonAdamW, steps, rows: slice, micro_steps: int) -> None:
    """train_steps with gradients reduced during backward (on the last micro-step's backward only)."""
    for step in steps:
        inputs, targets = batch(step)
        inputs, targets = inputs[rows], targets[rows]
        per_micro = inputs.size(0) // micro_steps
        for micro in range(micro_steps):
            chunk = slice(micro * per_micro, (micro + 1) * per_micro)
            optimizer.reduce_in_backward = micro == micro_steps - 1
            (model(inputs[chunk], targets[chunk]) / micro_steps).backward()
            # nothing is sent before the last micro-step; then every gradient is sent during backward
            expected = len(list(model.parameters())) if micro == micro_steps - 1 else 0
            assert optimizer.reductions_started == expected
        optimizer.step()
        assert optimizer.reductions_started == 0
        optimizer.zero_grad(set_to_none=True)


def distributed_worker(rank: int, world_size: int, store_path: str, out_dir: str, mode: str) -> None:
    torch.set_num_threads(1)
    with joined_process_group("gloo", store_path, rank, world_size):
        model = tiny_model(n_layer=2)
        optimizer = model.setup_optimizer(**LRS)
        rows_per_rank = 4 // world_size
        rows = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)
        if mode == "reduce-in-step":
            train_steps(model, optimizer, range(3), rows=rows)
        else:
            assert optimizer.overlap_reductions(model.backward_order())
            overlapped_train_steps(model, optimizer, range(3), rows, micro_steps=2 if mode == "overlap-2-micro" else 1)
        torch.save(model.state_dict(), f"{out_dir}/rank{rank}.pt")


def test_backward_order_lists_every_parameter_once():
    model = tiny_model(n_layer=2)
    order = model.backward_order()
    assert len(order) == len(set(order)) == len(list(model.parameters()))
    assert order[0] is model.lm_head.weight and order[-3] is model.transformer.wte.weight
    optimizer = model.setup_optimizer(**LRS)
    assert optimizer.overlap_reductions(order) is False  # one process: nothing to reduce, no hooks


@pytest.mark.parametrize("mode", ["reduce-in-step", "overlap", "overlap-2-micro"])
def test_two_process_gloo_step_matches_single_process(tmp_path, mode):
    mp.spawn(distributed_worker, args=(2, str(tmp_path / "store"), str(tmp_path), mode), nprocs=2, join=True)
    single = tiny_model(n_layer=2)
    optimizer = single.setup_optimizer(**LRS)
    train_steps(single, optimizer, range(3))
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    start = tiny_model(n_layer=2).state_dict()
    for name, expected in single.state_dict().items():
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.allclose(rank0[name], expected, atol=1e-4, rtol=0), name
        assert not torch.equal(expected, start[name]), name
