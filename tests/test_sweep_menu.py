"""Recipe-lab menus: parsing, safe constraint expressions, the trainer's own validation, strategies."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from launch.sweep.candidates import Candidate, candidate_id, order_by_shape, rejection_reason
from launch.sweep.expressions import parse_constraint
from launch.sweep.menu import load_menu, parse_menu
from launch.sweep.strategies import grid_candidates, halving_budgets, random_candidates, survivors
from launch.sweep.trainer import trainer_defaults
from nanochat.configargs import UsageError

REPO = Path(__file__).resolve().parents[1]
NAMES = {"depth", "aspect_ratio", "head_dim", "device_batch_size", "max_seq_len", "total_batch_size"}
MENU = {
    "fixed": {"head_dim": 16, "total_batch_size": 512},
    "knobs": {"depth": [1, 2], "aspect_ratio": [8, 32], "device_batch_size": [4, 8], "max_seq_len": [64, 128],
              "matrix_lr": {"min": 0.005, "max": 0.05, "log": True, "num": 3}},
    "constraints": {"head_fits": "head_dim <= depth * aspect_ratio",
                    "batch_divides": "total_batch_size % (device_batch_size * max_seq_len) == 0"},
}


@pytest.mark.parametrize("text", [
    "__import__('os').system('true')", "depth.real > 0", "open('x')", "(lambda: 1)()", "[d for d in depth]",
    "depth[0]", "(x := 1)", "depth if depth else 1", "{1: 2}",
])
def test_constraints_refuse_anything_but_arithmetic_and_comparisons(text):
    with pytest.raises(UsageError):
        parse_constraint("bad", text, NAMES | {"x"})


def test_constraints_evaluate_arithmetic_boolean_logic_and_chains():
    rule = parse_constraint("r", "not (depth < 1) and 0 < head_dim <= depth * aspect_ratio or depth ** 2 == -1", NAMES)
    assert rule.holds({"depth": 2, "head_dim": 16, "aspect_ratio": 8})
    assert not rule.holds({"depth": 1, "head_dim": 16, "aspect_ratio": 8})
    with pytest.raises(UsageError, match="no knob"):
        parse_constraint("r", "depht > 1", NAMES)


def test_menu_rejects_unknown_knobs_and_what_the_trainer_lacks():
    with pytest.raises(UsageError, match="n-kv-head-ratio"):
        parse_menu({"knobs": {"n_kv_head_ratio": [1, 2]}})
    with pytest.raises(UsageError, match="no such setting"):
        parse_menu({"knobs": {"dept": [1, 2]}})
    with pytest.raises(UsageError, match="the sweep sets"):
        parse_menu({"knobs": {"num_iterations": [1, 2]}})
    with pytest.raises(UsageError, match="whole number"):
        parse_menu({"knobs": {"depth": [1.5]}})
    with pytest.raises(UsageError, match="accepts"):
        parse_menu({"knobs": {"precision": ["fp16"]}})


@pytest.mark.parametrize(("data", "message"), [
    ({"sweep": 3, "knobs": {"depth": [1]}}, r"\[sweep\] must be a table"),
    ({"knobs": [1, 2]}, r"\[knobs\] must be a table"),
    ({"knobs": {"depth": [1]}, "fixed": "x"}, r"\[fixed\] must be a table"),
    ({"knobs": {"depth": {"min": 1, "max": 4, "log": "yes"}}}, "log must be true or false"),
    ({"knobs": {"depth": {"min": 1, "max": 4, "num": True}}}, "num must be a positive whole number"),
    ({"sweep": {"steps": 0}, "knobs": {"depth": [1]}}, r"\[sweep\] steps = 0: expected a whole number >= 1"),
    ({"sweep": {"candidates": -3}, "knobs": {"depth": [1]}}, r"\[sweep\] candidates = -3"),
    ({"sweep": {"val_tokens": 0}, "knobs": {"depth": [1]}}, r"\[sweep\] val_tokens = 0"),
    ({"sweep": {"eta": 1}, "knobs": {"depth": [1]}}, r"\[sweep\] eta = 1: expected a whole number >= 2"),
    ({"sweep": {"steps": True}, "knobs": {"depth": [1]}}, r"\[sweep\] steps = True"),
])
def test_menu_refuses_wrong_shapes_types_and_counts(data, message):
    with pytest.raises(UsageError, match=message):
        parse_menu(data)


def test_rejection_reasons_come_from_constraints_then_base_train_and_derive():
    menu = parse_menu(MENU)
    base = {**trainer_defaults(), "device_type": "cpu", **menu.fixed}

    def reason(**knobs):
        return rejection_reason(Candidate({"depth": 2, "aspect_ratio": 32, "device_batch_size": 4,
                                           "max_seq_len": 64, "matrix_lr": 0.01, **knobs}), menu, base, 10, 512, 512)

    assert reason() is None
    assert "head_fits" in reason(depth=1, aspect_ratio=8)
    assert "batch_divides" in reason(device_batch_size=8, max_seq_len=128)
    assert reason(window_pattern="SXL").startswith("base_train:")
    odd = parse_menu({"fixed": {"head_dim": 15}, "knobs": {"depth": [2]}})
    assert rejection_reason(Candidate({"depth": 2}), odd, {**base, "head_dim": 15}, 10, 512, 512).startswith("derive:")


def test_grid_random_and_stable_ids():
    menu = parse_menu(MENU)
    grid = grid_candidates(menu, None, 0)
    assert len(grid) == 2 * 2 * 2 * 2 * 3
    assert [c.id for c in grid_candidates(menu, 5, 1)] == [c.id for c in grid_candidates(menu, 5, 1)]
    assert candidate_id({"a": 1, "b": 2}) == candidate_id({"b": 2, "a": 1})
    draws = random_candidates(parse_menu({"knobs": {"matrix_lr": {"min": 0.001, "max": 0.1, "log": True},
                                                    "depth": {"min": 1, "max": 4}}}), 30, 3)
    assert len({c.id for c in draws}) == 30
    assert all(0.001 <= c.knobs["matrix_lr"] <= 0.1 and c.knobs["depth"] in (1, 2, 3, 4) for c in draws)


def test_candidates_of_one_shape_run_back_to_back():
    menu = parse_menu(MENU)
    ordered = order_by_shape(grid_candidates(menu, None, 0), {**trainer_defaults(), **menu.fixed})
    shapes = [(c.knobs["depth"], c.knobs["aspect_ratio"], c.knobs["device_batch_size"], c.knobs["max_seq_len"])
              for c in ordered]
    changes = sum(a != b for a, b in zip(shapes, shapes[1:]))
    assert changes == len(set(shapes)) - 1


def test_successive_halving_budgets_and_survivors():
    assert halving_budgets(16, 64, 2) == [8, 16, 32, 64]  # 16, 8, 4, then 2 candidates at the full budget
    assert halving_budgets(16, 8, 2) == [2, 4, 8]  # limited by the minimum steps per rung
    assert halving_budgets(9, 60, 3) == [20, 60]
    assert halving_budgets(3, 60, 3) == [60]
    assert survivors([("a", 2.0), ("b", None), ("c", 1.0), ("d", 3.0), ("e", 1.5)], 2) == ["c", "e", "a"]
    assert survivors([("a", None), ("b", None)], 2) == []
    with pytest.raises(UsageError):
        halving_budgets(4, 10, 1)


def test_example_menu_is_valid():
    path = REPO / "env" / "example-menu.toml"
    assert tomllib.loads(path.read_text())
    menu = load_menu(path)
    assert menu.constraints and menu.knobs
