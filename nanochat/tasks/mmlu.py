"""MMLU (cais/mmlu): four-way multiple choice over 57 subjects. `auxiliary_train` (about 100K questions
from other exams) is midtraining data; `test` is the evaluation.

Rows: {"question", "subject", "choices": [4 strings], "answer": 0-3}. In some versions of the hub dataset
the auxiliary_train rows are nested under a "train" key; both shapes are read.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from nanochat.tasks.base import Task
from nanochat.tasks.multiple_choice import grade_letter, multiple_choice_example
from nanochat.tasks.sources import RowSource


class MMLU(Task):
    name: ClassVar[str] = "mmlu"
    kind: ClassVar[str] = "categorical"
    splits: ClassVar[tuple[str, ...]] = ("auxiliary_train", "test", "validation", "dev")
    hub_path: ClassVar[str] = "cais/mmlu"

    def __init__(self, split: str, source: RowSource | None = None, root: Path | None = None,
                 limit: int | None = None, subject: str | None = None):
        super().__init__(split, source, root, limit)
        self.subject = subject
        self._subject_rows: list[int] | None = None

    def hub_config(self, split: str) -> str:
        return "auxiliary_train" if split == "auxiliary_train" else "all"

    def hub_split(self, split: str) -> str:
        return "train" if split == "auxiliary_train" else split

    def _selected(self) -> list[int] | None:
        """Row numbers of the chosen subject (None: every row)."""
        if self.subject is None:
            return None
        if self._subject_rows is None:
            self._subject_rows = [i for i in range(len(self.rows))
                                  if _flat(self.rows[i]).get("subject") == self.subject]
        return self._subject_rows

    def __len__(self) -> int:
        selected = self._selected()
        count = len(self.rows) if selected is None else len(selected)
        return count if self.limit is None else min(count, self.limit)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"mmlu [{self.split}] has {len(self)} examples, not index {index}")
        selected = self._selected()
        return self.to_example(self.rows[index if selected is None else selected[index]])

    def to_example(self, row: Mapping[str, Any]) -> dict[str, Any]:
        row = _flat(row)
        return multiple_choice_example(row["question"], list(row["choices"]), int(row["answer"]),
                                       subject=row.get("subject", ""))

    def evaluate(self, example: Mapping[str, Any], completion: str) -> bool:
        return grade_letter(example, completion)


def _flat(row: Mapping[str, Any]) -> Mapping[str, Any]:
    nested = row.get("train")
    return nested if isinstance(nested, Mapping) and "question" not in row else row
