"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations, used as they are.

Rows: {"messages": [{"role", "content"}, ...]} with an optional leading system message (the tokenizer
merges it into the first user turn). Nothing to grade: it is training and validation-loss data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from nanochat.tasks.base import Task


class SmolTalk(Task):
    name: ClassVar[str] = "smoltalk"
    kind: ClassVar[str] = "generative"
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    hub_path: ClassVar[str] = "HuggingFaceTB/smol-smoltalk"

    def to_example(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
