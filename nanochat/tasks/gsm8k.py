"""GSM8K (openai/gsm8k, config "main"): grade-school word problems with worked solutions.

Rows: {"question", "answer"}; the answer is a worked solution whose calculations are annotated
`<<expr=result>>` and whose last line is `#### <number>`. For training the assistant reply becomes parts:
each annotation turns into a python part `expr` (the model writes the calculation) followed by a
python_output part `result` (the tool's answer, not trained on), and the text around it is kept. Grading
reads the number after `####` in the model's reply and compares it with the reference.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from nanochat.tasks.base import Task

CALCULATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
FINAL_ANSWER = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def solution_parts(answer: str) -> list[dict[str, str]]:
    """The worked solution as assistant parts: text, then python/python_output for each `<<expr=result>>`."""
    parts: list[dict[str, str]] = []
    position = 0
    for match in CALCULATION.finditer(answer):
        if match.start() > position:
            parts.append({"type": "text", "text": answer[position:match.start()]})
        parts.append({"type": "python", "text": match.group(1)})
        parts.append({"type": "python_output", "text": match.group(2)})
        position = match.end()
    if position < len(answer):
        parts.append({"type": "text", "text": answer[position:]})
    return parts


def final_number(text: str) -> str | None:
    """The number after the last `####`, without thousands separators ("1,000" -> "1000"), or None."""
    matches = FINAL_ANSWER.findall(text)
    if not matches:
        return None
    number = matches[-1].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


class GSM8K(Task):
    name: ClassVar[str] = "gsm8k"
    kind: ClassVar[str] = "generative"
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    hub_path: ClassVar[str] = "openai/gsm8k"

    def hub_config(self, split: str) -> str:
        return "main"

    def to_example(self, row: Mapping[str, Any]) -> dict[str, Any]:
        reference = final_number(row["answer"])
        if reference is None:
            raise ValueError(f"gsm8k answer without a '#### <number>' line: {row['answer'][-80:]!r}")
        return {
            "messages": [{"role": "user", "content": row["question"]},
                         {"role": "assistant", "content": solution_parts(row["answer"])}],
            "answer": reference,
        }

    def evaluate(self, example: Mapping[str, Any], completion: str) -> bool:
        return final_number(completion) == example["answer"]
