"""The matrix-product floor: linear shapes counted per model, the three products timed per shape, summed
over layers and micro-steps (bench_train's `--matmul-floor` is tested in test_bench_train.py)."""

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.matmul_floor import MatmulFloor, ShapeProducts, linear_shapes, matmul_floor


def tiny_gqa_model() -> GPT:
    return GPT(GPTConfig(sequence_len=16, vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))


def test_linear_shapes_counts_every_projection_and_the_head_but_not_the_embedding():
    assert linear_shapes(tiny_gqa_model()) == {
        (64, 64): 4,   # c_q and the attention output projection, two layers
        (32, 64): 4,   # c_k and c_v: two key/value heads of 16
        (256, 64): 2,  # MLP up
        (64, 256): 2,  # MLP down
        (96, 64): 1,   # lm_head
    }


def test_floor_sums_layers_and_micro_steps():
    shapes = (ShapeProducts(64, 64, layers=4, forward_ms=1.0, input_grad_ms=2.0, weight_grad_ms=3.0),
              ShapeProducts(96, 64, layers=1, forward_ms=0.5, input_grad_ms=0.5, weight_grad_ms=1.0))
    floor = MatmulFloor(rows=1000, micro_steps=3, dtype="bfloat16", shapes=shapes)
    assert floor.ms_per_step == pytest.approx(3 * (4 * 6.0 + 2.0))
    # three products of 2 * rows * out * in FLOPs in 6 ms
    assert shapes[0].tflops(1000) == pytest.approx(3 * 2 * 1000 * 64 * 64 / 6e-3 / 1e12)
    as_json = floor.as_json()
    assert as_json["ms_per_step"] == pytest.approx(78.0) and as_json["shapes"][1]["layers"] == 1


def test_matmul_floor_times_each_shape_of_the_model_on_cpu():
    floor = matmul_floor(tiny_gqa_model(), rows=128, micro_steps=2, dtype=torch.float32,
                         device=torch.device("cpu"), repeats=3)
    assert [(s.out_features, s.in_features, s.layers) for s in floor.shapes] == [
        (32, 64, 4), (64, 64, 4), (64, 256, 2), (96, 64, 1), (256, 64, 2)]
    assert all(s.forward_ms > 0 and s.input_grad_ms > 0 and s.weight_grad_ms > 0 for s in floor.shapes)
    assert floor.ms_per_step == pytest.approx(2 * sum(s.layers * s.ms_per_layer for s in floor.shapes))
    with pytest.raises(ValueError, match="must be positive"):
        matmul_floor(tiny_gqa_model(), rows=0, micro_steps=1, dtype=torch.float32, device=torch.device("cpu"))
