"""NVFP4 training for the transformer blocks' matmuls through TransformerEngine (Blackwell only).

TransformerEngine's `NVFP4BlockScaling` recipe quantises activations, weights and gradients to 4-bit E2M1
with an E4M3 scale per 16 values and a float32 scale per tensor. Its random Hadamard transform (RHT) and
stochastic rounding crash or misbehave on the consumer/desktop Blackwell parts (sm_120, sm_121: GB10,
RTX 50xx; TransformerEngine issue 2372), so `nvfp4_recipe` turns both off there and leaves TE's defaults
on datacenter Blackwell (sm_100).

Each converted block linear keeps its own float32 weight (state dict and optimizer unchanged) and, in
training, calls a TransformerEngine `Linear` that shares that weight, inside TE's autocast with the recipe.
In eval mode (or without gradients) it is a plain bf16 linear, so evaluation runs in bf16. The embedding and
lm_head are never converted. TransformerEngine modules are not torch.compile friendly: run NVFP4 with
compile off. TransformerEngine is imported only when NVFP4 is requested; a missing install is a UsageError.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.configargs import UsageError

MIN_CAPABILITY = (10, 0)
# TransformerEngine's NVFP4 GEMMs need dimensions that are multiples of 16 (one scale block).
NVFP4_ALIGNMENT = 16


def import_transformer_engine():
    """The `transformer_engine` package, or UsageError naming the install command."""
    try:
        return importlib.import_module("transformer_engine")
    except ImportError as exc:
        raise UsageError("--precision nvfp4 needs TransformerEngine: pip install -e \".[gpu]\" "
                         "(or use --precision bf16)") from exc


def check_nvfp4_support(device_name: str, capability: tuple[int, int]) -> None:
    """Raise UsageError unless the GPU is a Blackwell part (compute capability 10.0 or later)."""
    if tuple(capability) < MIN_CAPABILITY:
        raise UsageError(f"--precision nvfp4 needs a Blackwell GPU (compute capability 10.0+); {device_name} is "
                         f"{capability[0]}.{capability[1]}: use --precision fp8 (Hopper) or bf16")


def needs_rht_and_sr_off(capability: tuple[int, int]) -> bool:
    """sm_120/sm_121 (GB10, consumer Blackwell): TE's Hadamard transform and stochastic rounding must be off."""
    return capability[0] == 12


def nvfp4_recipe(te, capability: tuple[int, int]):
    """TE's NVFP4BlockScaling recipe for this GPU (E2M1 data; RHT and stochastic rounding off on sm_12x)."""
    recipe = importlib.import_module(f"{te.__name__}.common.recipe")
    kwargs = {"fp4_format": recipe.Format.E2M1}
    if needs_rht_and_sr_off(capability):
        kwargs.update(disable_rht=True, disable_stochastic_rounding=True)
    return recipe.NVFP4BlockScaling(**kwargs)


def te_autocast(te, recipe):
    """TE's quantised-autocast context for `recipe` (`autocast` in newer TE, `fp8_autocast` in older)."""
    te_pytorch = importlib.import_module(f"{te.__name__}.pytorch")
    if hasattr(te_pytorch, "autocast"):
        return te_pytorch.autocast(enabled=True, recipe=recipe)
    return te_pytorch.fp8_autocast(enabled=True, fp8_recipe=recipe)


class NVFP4Linear(nn.Linear):
    """An nn.Linear (same parameters and state dict) whose training forward runs TE's NVFP4 GEMMs."""

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            with te_autocast(self._te, self._recipe):
                return self._te_linear(x)
        return F.linear(x, self.weight, self.bias)


def nvfp4_eligible(linear: nn.Linear) -> bool:
    out_features, in_features = linear.weight.shape
    return linear.bias is None and out_features % NVFP4_ALIGNMENT == 0 and in_features % NVFP4_ALIGNMENT == 0


def convert_blocks_to_nvfp4(blocks: nn.Module, te, recipe) -> int:
    """Turn every eligible nn.Linear under `blocks` into an NVFP4Linear in place; returns how many.

    The TE Linear of each layer shares the layer's weight Parameter and is kept out of the module tree, so
    `state_dict()`, `parameters()` and the optimizer see exactly the original model.
    """
    te_pytorch = importlib.import_module(f"{te.__name__}.pytorch")
    converted = 0
    for module in blocks.modules():
        if type(module) is not nn.Linear or not nvfp4_eligible(module):
            continue
        out_features, in_features = module.weight.shape
        te_linear = te_pytorch.Linear(in_features, out_features, bias=False, params_dtype=module.weight.dtype,
                                      device=module.weight.device)
        te_linear.weight = module.weight
        module.__class__ = NVFP4Linear
        object.__setattr__(module, "_te_linear", te_linear)
        object.__setattr__(module, "_te", te)
        object.__setattr__(module, "_recipe", recipe)
        converted += 1
    return converted


def count_nvfp4_layers(model: nn.Module) -> int:
    return sum(1 for module in model.modules() if isinstance(module, NVFP4Linear))
