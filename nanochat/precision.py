"""`--precision` for training: what autocast runs in, which block matmuls are converted, and a check that
the request was really applied.

| precision | autocast | block linear layers | embedding, lm_head, attention |
|---|---|---|---|
| auto | bf16 on CUDA, float32 elsewhere | as autocast | as autocast |
| bf16 | bf16 | bf16 | bf16 |
| fp32 | off (float32, TF32 matmuls) | float32 | float32 |
| fp8 | bf16 | float8 (`nanochat.fp8`, Hopper/Blackwell) | bf16 |
| nvfp4 | bf16 | NVFP4 (`nanochat.nvfp4`, TransformerEngine, Blackwell) | bf16 |

`apply_precision` converts the layers, counts those actually running in the requested format and raises
UsageError when none are (a request silently not applied is refused, not logged and ignored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from nanochat.configargs import UsageError

PRECISIONS = ("auto", "bf16", "fp32", "fp8", "nvfp4")
LOW_PRECISIONS = ("fp8", "nvfp4")


def autocast_precision(precision: str) -> str:
    """The precision `nanochat.runtime.setup_runtime` should use: fp8/nvfp4 runs the rest of the model in bf16."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return "bf16" if precision in LOW_PRECISIONS else precision


@dataclass(frozen=True)
class PrecisionReport:
    precision: str
    converted_layers: int
    block_linear_layers: int

    def describe(self) -> str:
        if self.precision not in LOW_PRECISIONS:
            return f"precision {self.precision}: no layers converted"
        return (f"precision {self.precision}: {self.converted_layers} of {self.block_linear_layers} block linear "
                f"layers run in {self.precision}; embedding and lm_head stay bf16; evaluation runs in bf16")


def apply_precision(model: nn.Module, precision: str, device_type: str, device_name: str = "",
                    capability: tuple[int, int] = (0, 0)) -> PrecisionReport:
    """Convert `model.transformer.h`'s linear layers for fp8/nvfp4 (in place) and verify the conversion.

    bf16/fp32/auto change nothing here (autocast does the work). Raises UsageError for fp8/nvfp4 off CUDA,
    on a GPU without the needed tensor cores, or when no layer could be converted.
    """
    autocast_precision(precision)
    blocks = model.transformer.h
    block_linears = sum(1 for m in blocks.modules() if isinstance(m, nn.Linear))
    if precision not in LOW_PRECISIONS:
        return PrecisionReport(precision, 0, block_linears)
    if device_type != "cuda":
        raise UsageError(f"--precision {precision} needs a CUDA GPU; use --precision bf16 or fp32 on {device_type}")
    if precision == "fp8":
        from nanochat.fp8 import check_fp8_support, convert_blocks_to_fp8, count_fp8_layers

        check_fp8_support(device_name, capability)
        convert_blocks_to_fp8(blocks)
        converted = count_fp8_layers(model)
    else:
        from nanochat.nvfp4 import (
            check_nvfp4_support,
            convert_blocks_to_nvfp4,
            count_nvfp4_layers,
            import_transformer_engine,
            nvfp4_recipe,
        )

        check_nvfp4_support(device_name, capability)
        te = import_transformer_engine()
        convert_blocks_to_nvfp4(blocks, te, nvfp4_recipe(te, capability))
        converted = count_nvfp4_layers(model)
    if converted == 0:
        raise UsageError(f"--precision {precision} was requested but no block linear layer could be converted "
                         f"(dimensions must be multiples of 16); use --precision bf16")
    return PrecisionReport(precision, converted, block_linears)
