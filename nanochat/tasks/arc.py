"""ARC (allenai/ai2_arc): grade-school science multiple choice, in an Easy and a Challenge set.

Rows: {"id", "question", "choices": {"text": [...], "label": [...]}, "answerKey"}. Labels are letters or,
in a few rows, digits; choices are shown as A, B, C, ... in their stored order either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from nanochat.tasks.base import Task
from nanochat.tasks.multiple_choice import grade_letter, multiple_choice_example


class _ARC(Task):
    kind: ClassVar[str] = "categorical"
    splits: ClassVar[tuple[str, ...]] = ("train", "validation", "test")
    hub_path: ClassVar[str] = "allenai/ai2_arc"
    subset: ClassVar[str]

    def hub_config(self, split: str) -> str:
        return self.subset

    def to_example(self, row: Mapping[str, Any]) -> dict[str, Any]:
        labels = [str(label) for label in row["choices"]["label"]]
        answer_key = str(row["answerKey"])
        if answer_key not in labels:
            raise ValueError(f"{self.name} row {row.get('id')!r}: answerKey {answer_key!r} is not among {labels}")
        return multiple_choice_example(row["question"], list(row["choices"]["text"]), labels.index(answer_key),
                                       id=row.get("id", ""))

    def evaluate(self, example: Mapping[str, Any], completion: str) -> bool:
        return grade_letter(example, completion)


class ARCEasy(_ARC):
    name: ClassVar[str] = "arc_easy"
    subset: ClassVar[str] = "ARC-Easy"


class ARCChallenge(_ARC):
    name: ClassVar[str] = "arc_challenge"
    subset: ClassVar[str] = "ARC-Challenge"
