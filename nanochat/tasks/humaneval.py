"""HumanEval (openai/openai_humaneval): write a Python function from its signature and docstring.

Rows: {"task_id", "prompt", "canonical_solution", "test", "entry_point"}. The conversation asks for the
prompt's function and answers with the prompt plus the canonical body. Grading runs code, which happens
elsewhere in a sandbox: `program(example, completion)` builds the script to run there (the completion's
code, then the dataset's tests, then `check(entry_point)`); it passes when the script exits 0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from nanochat.tasks.base import Task

_FENCED = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The first fenced code block of a reply, or the whole reply when it has none."""
    match = _FENCED.search(completion)
    return match.group(1) if match else completion


def program(example: Mapping[str, Any], completion: str) -> str:
    """A script that exits 0 exactly when the completion's function passes the task's tests."""
    code = extract_code(completion)
    if not re.search(rf"^\s*def\s+{re.escape(example['entry_point'])}\s*\(", code, re.MULTILINE):
        code = example["prompt"] + code
    return f"{code}\n\n{example['test']}\n\ncheck({example['entry_point']})\n"


class HumanEval(Task):
    name: ClassVar[str] = "humaneval"
    kind: ClassVar[str] = "generative"
    splits: ClassVar[tuple[str, ...]] = ("test",)
    hub_path: ClassVar[str] = "openai/openai_humaneval"

    def to_example(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}],
            "task_id": row["task_id"],
            "prompt": row["prompt"],
            "test": row["test"],
            "entry_point": row["entry_point"],
        }

    def evaluate(self, example: Mapping[str, Any], completion: str) -> bool:
        raise NotImplementedError("HumanEval is graded by running `program(example, completion)` in the sandbox")
