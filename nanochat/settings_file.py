"""Settings files in python-dotenv format (`env/<site>.env`, `.env.local`), read strictly.

python-dotenv skips a line it cannot parse (an unclosed quote, a stray word) with a warning that names no
file, so the setting silently falls back to its default. `read_settings_file` refuses such a file instead,
naming the file and the line. Values are raw text: no variable interpolation (whoever uses a value as a
path expands `~` and `$USER` itself); a key without a value reads as "".
"""

from __future__ import annotations

from pathlib import Path

from dotenv.parser import parse_stream

from nanochat.configargs import UsageError


def read_settings_file(path: Path) -> dict[str, str]:
    """Every key of the file and its raw value, or a UsageError naming the first line that does not parse."""
    with open(path, encoding="utf-8") as stream:
        bindings = list(parse_stream(stream))
    for binding in bindings:
        if binding.error:
            text = binding.original.string
            line = binding.original.line + text[:len(text) - len(text.lstrip())].count("\n")
            raise UsageError(f"{path}, line {line}: cannot parse {text.strip()!r}; write KEY=value")
    return {binding.key: binding.value or "" for binding in bindings if binding.key is not None}
