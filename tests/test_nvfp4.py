"""NVFP4 bookkeeping with a fake `transformer_engine` package (NVFP4 itself needs Blackwell hardware):
the recipe per GPU, conversion counts, shared weights, TE autocast in training only, refusals."""

import enum
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat import nvfp4
from nanochat.configargs import UsageError
from nanochat.gpt import GPT, GPTConfig
from nanochat.precision import apply_precision


@pytest.fixture
def fake_te(monkeypatch):
    """Install a minimal transformer_engine: recipe classes, a Linear that records calls, autocast."""
    te = types.ModuleType("transformer_engine")
    common = types.ModuleType("transformer_engine.common")
    recipe = types.ModuleType("transformer_engine.common.recipe")
    pytorch = types.ModuleType("transformer_engine.pytorch")

    class Format(enum.Enum):
        E2M1 = "e2m1"
        E4M3 = "e4m3"

    @dataclass
    class NVFP4BlockScaling:
        fp4_format: Format = Format.E2M1
        disable_rht: bool = False
        disable_stochastic_rounding: bool = False

    state = {"active": None, "calls": 0}

    @contextmanager
    def autocast(enabled=True, recipe=None):
        state["active"] = recipe
        try:
            yield
        finally:
            state["active"] = None

    class Linear(nn.Linear):
        def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
            super().__init__(in_features, out_features, bias=bias, dtype=params_dtype, device=device)

        def forward(self, x):
            assert state["active"] is not None, "TE Linear called outside TE autocast"
            state["calls"] += 1
            return F.linear(x, self.weight)

    recipe.Format, recipe.NVFP4BlockScaling = Format, NVFP4BlockScaling
    pytorch.Linear, pytorch.autocast = Linear, autocast
    te.common, te.pytorch, common.recipe = common, pytorch, recipe
    for name, module in [("transformer_engine", te), ("transformer_engine.common", common),
                         ("transformer_engine.common.recipe", recipe), ("transformer_engine.pytorch", pytorch)]:
        monkeypatch.setitem(sys.modules, name, module)
    te.state = state
    return te


def small_gpt(n_embd=32):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=n_embd))
    model.init_weights()
    return model


@pytest.mark.parametrize("capability,off", [((12, 1), True), ((12, 0), True), ((10, 0), False)])
def test_recipe_turns_rht_and_stochastic_rounding_off_only_on_sm12x(fake_te, capability, off):
    recipe = nvfp4.nvfp4_recipe(fake_te, capability)
    assert recipe.fp4_format.name == "E2M1"
    assert recipe.disable_rht is off and recipe.disable_stochastic_rounding is off


def test_conversion_shares_weights_and_runs_te_only_in_training(fake_te):
    model = small_gpt()
    keys = list(model.state_dict())
    params = list(model.parameters())
    recipe = nvfp4.nvfp4_recipe(fake_te, (12, 1))
    assert nvfp4.convert_blocks_to_nvfp4(model.transformer.h, fake_te, recipe) == 12
    assert nvfp4.count_nvfp4_layers(model) == 12
    assert list(model.state_dict()) == keys and list(model.parameters()) == params
    layer = model.transformer.h[0].attn.c_q
    assert layer._te_linear.weight is layer.weight
    idx = torch.randint(0, 64, (2, 16))
    model(idx, idx).backward()
    assert fake_te.state["calls"] == 12
    model.eval()
    with torch.no_grad():
        model(idx)
    assert fake_te.state["calls"] == 12


def test_apply_precision_nvfp4_counts_and_refuses(fake_te, monkeypatch):
    report = apply_precision(small_gpt(), "nvfp4", "cuda", "NVIDIA GB10", (12, 1))
    assert report.converted_layers == 12
    with pytest.raises(UsageError, match="Blackwell"):
        apply_precision(small_gpt(), "nvfp4", "cuda", "NVIDIA H100", (9, 0))
    with pytest.raises(UsageError, match="no block linear layer could be converted"):
        apply_precision(small_gpt(n_embd=24), "nvfp4", "cuda", "NVIDIA GB10", (12, 1))


def test_missing_transformer_engine_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    with pytest.raises(UsageError, match=r'pip install -e "\.\[gpu\]"'):
        apply_precision(small_gpt(), "nvfp4", "cuda", "NVIDIA GB10", (12, 1))
