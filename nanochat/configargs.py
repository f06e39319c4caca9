"""Typed stage configs from the command line: a dataclass's fields become flags, bad input becomes exit 2.

Stages define a `@dataclass` whose `__post_init__` validates and raises `UsageError`; `run_stage` builds
the parser from the fields, calls `main(config)` and turns a `UsageError` anywhere into one line on stderr
and exit status 2. Nothing here runs at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_RESUMABLE = 75
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C where there was nothing to save (128 + SIGINT, as shells report it)
STOP_FILE_ENV = "NANOCHAT_STOP_FILE"  # a file the launcher writes when asked to stop a stage (nanochat.stopping)


class UsageError(ValueError):
    """Bad input the user can fix; the message names the fix. Stages exit 2 on it and write nothing."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def require_appendable(path: str, flag: str) -> None:
    """A flag naming a file that results are appended to must name a file in an existing folder, so a bad
    path fails before the work whose results it would receive."""
    target = Path(path)
    require(not target.is_dir(), f"{flag} {path} is a folder; name a file to append to")
    require(target.parent.is_dir(), f"{flag} {path}: the folder {target.parent} does not exist; create it first")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _converter(tp: Any, name: str) -> tuple[Callable[[str], Any], list[Any] | None]:
    if get_origin(tp) is Literal:
        choices = list(get_args(tp))
        return type(choices[0]), choices
    if tp in (int, float, str):
        return tp, None
    raise TypeError(f"config field {name!r} has unsupported type {tp!r}")


def build_parser(config_cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description or (config_cls.__doc__ or "").strip())
    hints = get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if not field.init:
            continue
        dashed = field.name.replace("_", "-")
        names = [f"--{dashed}"] + ([f"--{field.name}"] if dashed != field.name else [])
        help_text = field.metadata.get("help", "")
        default = field.default if field.default is not dataclasses.MISSING else None
        if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = field.default_factory()  # type: ignore[misc]
        tp, optional = _unwrap_optional(hints[field.name])
        if tp is bool:
            parser.add_argument(*names, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
            continue
        convert, choices = _converter(tp, field.name)
        if optional:
            base_convert = convert

            def convert(text: str, _c=base_convert):  # noqa: E731 - closure over the field's base type
                return None if text.lower() in ("none", "") else _c(text)
            convert.__name__ = base_convert.__name__
        parser.add_argument(*names, dest=field.name, type=convert, choices=choices, default=default,
                            help=f"{help_text} (default: {default})".strip())
    return parser


def parse_config(config_cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None) -> T:
    """Parse argv into config_cls; argparse errors exit 2, validation errors raise UsageError."""
    parser = build_parser(config_cls, prog=prog)
    namespace = parser.parse_args(list(argv) if argv is not None else None)
    return config_cls(**vars(namespace))


def run_stage(main: Callable[[T], int], config_cls: type[T], argv: Sequence[str] | None = None,
              prog: str | None = None) -> int:
    """The thin command-line wrapper every stage uses: parse, run, map UsageError to exit 2 and a Ctrl-C that
    reaches it (before a training stage's own handler exists, or a second one) to one line and exit 130."""
    try:
        config = parse_config(config_cls, argv, prog=prog)
        return int(main(config) or 0)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); run the same command again to go on from what was saved", file=sys.stderr,
              flush=True)
        return EXIT_INTERRUPTED


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


__all__ = [
    "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_DIVERGED", "EXIT_RESUMABLE", "EXIT_INTERRUPTED", "STOP_FILE_ENV",
    "UsageError", "require", "require_appendable",
    "build_parser", "parse_config", "run_stage", "config_to_dict", "typing",
]
