"""The matrix-product floor of a training step: every linear layer's three products, each timed alone.

A linear layer y = x W^T costs three products per micro-step: the forward, the input gradient dX = dY W
and the weight gradient dW = dY^T X. `linear_shapes(model)` counts a model's linear layers by
(out_features, in_features); `matmul_floor(...)` times the three products of each shape on random data
at the micro-step's rows, in the layouts autograd uses, and adds them up over the step. No step can be
faster than that sum plus attention, whatever happens to the element-wise work, so `scripts.bench_train
--matmul-floor` reports it beside the measured step. (The optimizer's own products, such as Muon's
Newton-Schulz iterations, are not included.)
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn


def linear_shapes(model: nn.Module) -> Counter[tuple[int, int]]:
    """How many linear layers the model has of each (out_features, in_features)."""
    return Counter((module.out_features, module.in_features) for module in model.modules()
                   if isinstance(module, nn.Linear))


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of `fn` over `repeats` calls after two untimed ones (CUDA events on CUDA)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - begin))
    return statistics.median(times)


@dataclass(frozen=True)
class ShapeProducts:
    """The three products of one linear shape at `rows` rows, and how many such layers a step runs."""

    out_features: int
    in_features: int
    layers: int
    forward_ms: float
    input_grad_ms: float
    weight_grad_ms: float

    @property
    def ms_per_layer(self) -> float:
        return self.forward_ms + self.input_grad_ms + self.weight_grad_ms

    def tflops(self, rows: int) -> float:
        """Achieved TFLOP/s over the three products."""
        return 3 * 2 * rows * self.out_features * self.in_features / (self.ms_per_layer / 1000) / 1e12


@dataclass(frozen=True)
class MatmulFloor:
    """Every linear shape's products; `ms_per_step` is their sum over layers and micro-steps."""

    rows: int
    micro_steps: int
    dtype: str
    shapes: tuple[ShapeProducts, ...]

    @property
    def ms_per_step(self) -> float:
        return self.micro_steps * sum(shape.layers * shape.ms_per_layer for shape in self.shapes)

    def as_json(self) -> dict:
        return {"rows": self.rows, "micro_steps": self.micro_steps, "dtype": self.dtype,
                "ms_per_step": round(self.ms_per_step, 3),
                "shapes": [{"out": s.out_features, "in": s.in_features, "layers": s.layers,
                            "forward_ms": round(s.forward_ms, 4), "input_grad_ms": round(s.input_grad_ms, 4),
                            "weight_grad_ms": round(s.weight_grad_ms, 4), "tflops": round(s.tflops(self.rows), 1)}
                           for s in self.shapes]}


def time_shape(out_features: int, in_features: int, layers: int, rows: int, dtype: torch.dtype,
               device: torch.device, repeats: int) -> ShapeProducts:
    """The three products of one linear shape on random data, in the layouts autograd uses."""
    x = torch.randn(rows, in_features, device=device, dtype=dtype)
    weight = torch.randn(out_features, in_features, device=device, dtype=dtype)
    grad_out = torch.randn(rows, out_features, device=device, dtype=dtype)
    return ShapeProducts(out_features, in_features, layers,
                         forward_ms=time_ms(lambda: x @ weight.t(), device, repeats),
                         input_grad_ms=time_ms(lambda: grad_out @ weight, device, repeats),
                         weight_grad_ms=time_ms(lambda: grad_out.t() @ x, device, repeats))


def matmul_floor(model: nn.Module, rows: int, micro_steps: int, dtype: torch.dtype, device: torch.device,
                 repeats: int = 10) -> MatmulFloor:
    """Time each linear shape of `model` at `rows` rows per micro-step (see the module docstring)."""
    if rows <= 0 or micro_steps <= 0 or repeats <= 0:
        raise ValueError(f"rows, micro_steps and repeats must be positive, got {rows}, {micro_steps}, {repeats}")
    shapes = tuple(time_shape(out_features, in_features, layers, rows, dtype, device, repeats)
                   for (out_features, in_features), layers in sorted(linear_shapes(model).items()))
    return MatmulFloor(rows, micro_steps, str(dtype).removeprefix("torch."), shapes)
