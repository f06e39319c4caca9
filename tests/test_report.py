"""report.md assembly: results table, plots and per-stage sections."""

import pytest

from nanochat.report import (
    file_fingerprints,
    previous_result,
    read_sections,
    render_markdown,
    results_table,
    write_section,
)
from scripts.report import ReportConfig, main


def _sections(root):
    write_section("base_train", {"seconds": 12.5, "settings": {"depth": 4}, "final_val_bpb": 1.2345,
                                 "loss_history": [[1, 5.0], [2, 4.0]], "val_history": [[0, 3.0, 3.5], [2, 2.0, 3.5]]},
                  root=root)
    write_section("base_eval", {"phase": "BASE", "metrics": {"CORE": 0.1}}, root=root)
    write_section("chat_eval_sft", {"phase": "SFT", "metrics": {"ARC-Easy": 0.75, "GSM8K": 0.5}}, root=root)


def test_results_table(tmp_path):
    _sections(tmp_path)
    table = results_table(read_sections(tmp_path))
    lines = table.splitlines()
    assert lines[0] == "| Metric | BASE | SFT |"
    assert "| CORE | 0.1000 | - |" in lines
    assert "| ARC-Easy | - | 0.7500 |" in lines
    assert "| MMLU | - | - |" in lines


def test_report_written_with_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    _sections(tmp_path)
    assert main(ReportConfig()) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Environment" in report and "git commit" in report
    assert "![train_loss](train_loss.png)" in report and "![val_bpb](val_bpb.png)" in report
    assert "- final_val_bpb: 1.2345" in report and "- time: 12.5 s" in report
    for name in ("train_loss.png", "val_bpb.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_sections_is_a_usage_error(tmp_path, monkeypatch, capsys):
    from scripts.report import cli

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert cli([]) == 2
    assert "run the pipeline's stages first" in capsys.readouterr().err


def test_previous_result_matches_only_the_same_inputs(tmp_path):
    data = tmp_path / "shard.parquet"
    data.write_bytes(b"1234")
    inputs = {"settings": {"split_tokens": 1024, "model_tag": None}, "files": file_fingerprints([data])}
    assert previous_result("base_eval", inputs, root=tmp_path) is None
    write_section("base_eval", {"inputs": inputs, "val_bpb": 1.5}, root=tmp_path)
    assert previous_result("base_eval", inputs, root=tmp_path)["val_bpb"] == 1.5
    assert previous_result("base_eval", {**inputs, "settings": {"split_tokens": 2048, "model_tag": None}},
                           root=tmp_path) is None
    data.write_bytes(b"12345")  # rewritten input: another size (and modification time)
    assert previous_result("base_eval", {**inputs, "files": file_fingerprints([data])}, root=tmp_path) is None
    (tmp_path / "report" / "base_eval.json").write_text("{not json")
    assert previous_result("base_eval", inputs, root=tmp_path) is None


BROKEN_SECTIONS = [
    ('{"stage": "base_train", "seconds": 1', "base_train.json"),  # cut short
    ("[1, 2]", "not a JSON object"),
    ('{"seconds": "12"}', "'seconds' is not a number"),
    ('{"phase": "SFT", "metrics": {"GSM8K": "high"}}', "a metric is not a number"),
    ('{"loss_history": [1, 2, 3]}', "'loss_history' is not a list of [step, value] points"),
]


@pytest.mark.parametrize("text,message", BROKEN_SECTIONS, ids=[m for _, m in BROKEN_SECTIONS])
def test_broken_section_is_a_usage_error_naming_the_file(tmp_path, monkeypatch, capsys, text, message):
    from scripts.report import cli

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    _sections(tmp_path)
    (tmp_path / "report" / "base_train.json").write_text(text)
    assert cli([]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'report' / 'base_train.json'} is not a readable report section")
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "report" / "report.md").exists()


def test_report_marks_an_evaluation_whose_checkpoint_changed_since(tmp_path):
    weights = tmp_path / "model_000010.pt"
    weights.write_bytes(b"weights")
    inputs = {"settings": {}, "files": file_fingerprints([weights])}
    write_section("chat_eval_sft", {"phase": "SFT", "metrics": {"GSM8K": 0.5}, "inputs": inputs}, root=tmp_path)
    write_section("base_eval", {"phase": "BASE", "metrics": {"CORE": 0.1}, "inputs": inputs}, root=tmp_path)
    assert "stale" not in render_markdown(read_sections(tmp_path), {}, [])
    weights.write_bytes(b"retrained weights")
    report = render_markdown(read_sections(tmp_path), {}, [])
    assert report.count("**stale**") == 2
    assert f"(e.g. {weights}); run `python -m scripts.chat_eval --source sft` again" in report
    assert "run `python -m scripts.base_eval` again" in report
