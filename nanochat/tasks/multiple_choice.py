"""Multiple-choice questions as chat: the user sees the question and lettered choices, the assistant answers
with one letter. Shared by MMLU and ARC; graded by comparing the answer letter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

LETTERS = "ABCDEFGH"
_LEADING_LETTER = re.compile(r"\s*\(?([A-Za-z])(?![A-Za-z])")


def multiple_choice_prompt(question: str, choices: Sequence[str]) -> str:
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
    return f"{question}\n\n{options}\n\nAnswer with the letter of the correct choice."


def multiple_choice_example(question: str, choices: Sequence[str], answer_index: int,
                            **fields: Any) -> dict[str, Any]:
    """The conversation (the assistant's reply is the answer letter), the letters offered and the answer."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 2 to {len(LETTERS)} choices, got {len(choices)}")
    if not 0 <= answer_index < len(choices):
        raise ValueError(f"answer index {answer_index} is outside the {len(choices)} choices")
    letters = list(LETTERS[:len(choices)])
    answer = letters[answer_index]
    return {
        "messages": [{"role": "user", "content": multiple_choice_prompt(question, choices)},
                     {"role": "assistant", "content": answer}],
        "letters": letters,
        "answer": answer,
        **fields,
    }


def answer_letter(completion: str) -> str | None:
    """The letter a reply starts with ("B", "B.", "(b) ...") in upper case, or None."""
    match = _LEADING_LETTER.match(completion)
    return match.group(1).upper() if match else None


def grade_letter(example: Mapping[str, Any], completion: str) -> bool:
    return answer_letter(completion) == example["answer"]
