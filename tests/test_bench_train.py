"""bench_train on CPU: one JSON line per configuration with throughput, losses and the kernel table; bad
flags exit 2; `--matmul-floor` reports the linear layers' products beside the step. Also the profiler
table helper it uses."""

import json

import pytest
import torch

from nanochat.profiling import profile_steps
from scripts import bench_train

TINY = ["--depth", "1", "--aspect-ratio", "32", "--head-dim", "16", "--max-seq-len", "32", "--vocab-size", "64",
        "--device-batch-size", "2", "--steps", "2", "--warmup", "1", "--no-compile", "--device-type", "cpu"]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_bench_train_reports_each_configuration_with_losses_and_kernels(capsys):
    assert bench_train.cli(TINY + ["--kernels", "3", "--configs", "grad_accum=1;grad_accum=2,kernel=native"]) == 0
    out = capsys.readouterr().out
    first, second = json_lines(out)
    assert (first["grad_accum"], second["grad_accum"]) == (1, 2)
    for result in (first, second):
        assert result["tok_per_s"] > 0 and result["world_size"] == 1 and result["overlap"] is False
        assert len(result["losses"]) == 3 and all(3.0 < loss < 5.0 for loss in result["losses"])  # ~ln(64)
        top = result["kernels"]["top"]
        assert len(top) == 3 and any(row["name"].startswith("aten::") for row in top)
        assert top[0]["ms_per_step"] >= top[1]["ms_per_step"] >= top[2]["ms_per_step"]
    assert second["tokens_per_step"] == 2 * first["tokens_per_step"]
    assert "operators" in out and "d1 L b2x2 bf16 native sdpa eager" in out


@pytest.mark.parametrize("flag,message", [(["--window-pattern", "SX"], "--window-pattern"),
                                          (["--configs", "depth20"], "--configs: bad override"),
                                          (["--configs", "depth=x"], "--configs: depth=x: expected an int"),
                                          (["--configs", "compile=maybe"], "--configs: compile=maybe: expected"),
                                          (["--configs", "kernel=foo"], "--configs: kernel=foo: expected one of "
                                                                        "native, liger")])
def test_bench_train_bad_flags_exit_2(flag, message, capsys):
    assert bench_train.cli(TINY + flag) == 2
    assert message in capsys.readouterr().err


def test_bench_train_refuses_an_out_it_cannot_append_to_before_measuring(tmp_path, capsys):
    assert bench_train.cli(TINY + ["--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder" in capsys.readouterr().err
    assert bench_train.cli(TINY + ["--out", str(tmp_path / "missing" / "b.jsonl")]) == 2
    captured = capsys.readouterr()
    assert f"{tmp_path / 'missing'} does not exist" in captured.err and "tok_per_s" not in captured.out


def test_profile_steps_ranks_operators_by_time_per_step():
    matrix = torch.randn(256, 256)
    table = profile_steps(lambda: (matrix @ matrix).relu(), 4, "cpu")
    names = {row.name: row for row in table.rows}
    assert names["aten::mm"].calls_per_step == 1.0 and table.unit == "operators"
    assert table.rows[0].share == max(row.share for row in table.rows)
    assert abs(sum(row.share for row in table.rows) - 1.0) < 1e-6
    assert table.lines(2)[0].endswith("operators") and len(table.lines(2)) == 3
    with pytest.raises(ValueError, match="at least one step"):
        profile_steps(lambda: None, 0, "cpu")


def test_bench_train_reports_the_floor_beside_the_step(capsys):
    assert bench_train.cli(TINY + ["--matmul-floor", "--grad-accum", "2"]) == 0
    out = capsys.readouterr().out
    (result,) = json_lines(out)
    floor = result["matmul_floor"]
    assert floor["rows"] == 2 * 32 and floor["micro_steps"] == 2 and floor["dtype"] == "bfloat16"
    assert {(s["out"], s["in"]) for s in floor["shapes"]} == {(32, 32), (128, 32), (32, 128), (64, 32)}
    assert result["matmul_floor_share"] == pytest.approx(floor["ms_per_step"] / result["step_ms"], rel=1e-3)
    assert "linear layers' products alone" in out


def test_bench_train_refuses_the_floor_for_float8(capsys):
    assert bench_train.cli(TINY + ["--matmul-floor", "--precision", "fp8"]) == 2
    assert "--matmul-floor times bf16 or fp32 products" in capsys.readouterr().err
