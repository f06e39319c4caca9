"""Stage configs from the command line: types, booleans, optionals, and exit 2 on bad input."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from nanochat.configargs import EXIT_INTERRUPTED, EXIT_USAGE, UsageError, parse_config, require, run_stage


@dataclass
class Demo:
    depth: int = field(default=4, metadata={"help": "layers"})
    lr: float = 0.1
    name: str = "x"
    tag: str | None = None
    compile: bool | None = None
    resume: bool = True
    precision: Literal["bf16", "fp32"] = "bf16"

    def __post_init__(self):
        require(self.depth > 0, f"--depth must be positive, got {self.depth}")


def test_parse_types_and_spellings():
    c = parse_config(Demo, ["--depth", "6", "--lr=0.5", "--tag", "t", "--no-resume", "--compile",
                            "--precision", "fp32", "--name", "y"])
    assert (c.depth, c.lr, c.tag, c.resume, c.compile, c.precision, c.name) == (6, 0.5, "t", False, True, "fp32", "y")
    assert parse_config(Demo, ["--tag", "none"]).tag is None
    assert parse_config(Demo, []).compile is None


def test_validation_raises_usage_error():
    with pytest.raises(UsageError):
        parse_config(Demo, ["--depth", "0"])


def test_run_stage_exit_codes(capsys):
    assert run_stage(lambda c: 0, Demo, ["--depth", "3"]) == 0
    assert run_stage(lambda c: 0, Demo, ["--depth", "-1"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.strip() == "error: --depth must be positive, got -1"

    def failing_main(config):
        raise UsageError("no tokenizer: run `python -m scripts.tok_train` first")

    assert run_stage(failing_main, Demo, []) == EXIT_USAGE
    capsys.readouterr()

    def interrupted_main(config):
        raise KeyboardInterrupt

    assert run_stage(interrupted_main, Demo, []) == EXIT_INTERRUPTED
    assert capsys.readouterr().err.startswith("interrupted (Ctrl-C); run the same command again")
    with pytest.raises(SystemExit) as exc:
        run_stage(lambda c: 0, Demo, ["--precision", "fp64"])
    assert exc.value.code == 2
