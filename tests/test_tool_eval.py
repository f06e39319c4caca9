"""The calculator tool: correct answers, and thousands of hostile inputs that are refused fast and run nothing."""

import builtins
import os
import random
import subprocess
import time
from types import SimpleNamespace

import pytest

from nanochat import tool_eval
from nanochat.tool_eval import evaluate


@pytest.mark.parametrize("expression,expected", [
    ("2+2", "4"),
    (" 12 * 3 - 4 ", "32"),
    ("12/4", "3.0"),
    ("7//2", "3"),
    ("-7 % 3", "2"),
    ("(1 + 2) * -3", "-9"),
    ("+5", "5"),
    ("2**10", "1024"),
    ("2**-2", "0.25"),
    ("-3**2", "-9"),
    ("1.5 * 4", "6.0"),
    ("10**100", str(10 ** 100)),
    ("'strawberry'.count('r')", "3"),
    ('"banana".count("an") * 2', "4"),
    ("'abc'.count('')", "4"),
])
def test_arithmetic_and_count(expression, expected):
    assert evaluate(expression) == expected


@pytest.mark.parametrize("expression", [
    "", "x", "x + 1", "abs(-1)", "len('abc')", "().__class__.__bases__", "__import__('os')",
    "'a'*10**9", "'a' + 'b'", "'abc'", "9**9**9", "10**10000", "10**101", "2**0.5**-400", "1e400",
    "(-8) ** 0.5", "1/0", "5 % 0", "0 ** -1", "True + 1", "None", "[1][0]", "{1: 2}", "lambda: 1",
    "[i for i in range(9)]", "f'{1}'", "'__class__'.count('_')", "'abc'.count('a', 1)", "'a'.upper()",
    "str(1).count('1')", "'abc'.count(x)", "1 if 1 else 2", "1 < 2", "1 and 2", "b'ab'.count(b'a')",
    "1j * 1j", "1" * 101, "-" * 500 + "1", "'" + "a" * 1001 + "'.count('a')", "2 +", "import os",
    "(1).__class__", "1; 2", "~1", "1 << 400", "1 @ 2",
])
def test_refused_inputs_give_none(expression):
    assert evaluate(expression) is None


def test_length_and_depth_caps():
    assert evaluate("1+" * 150 + "1") == "151"
    assert evaluate("1+" * (tool_eval.MAX_DEPTH + 1) + "1") is None
    assert evaluate("1+" * 600 + "1") is None  # over MAX_EXPRESSION_CHARS


ATOMS = ["1", "2", "9", "10", "0", "3.5", "1e308", "99999999999", "x", "os", "__import__", "'a'", '"ab"',
         "'__class__'", "()", "[]", "{}", "None", "True", "lambda: 0", "open", "eval", "exec", "self"]
OPERATORS = ["+", "-", "*", "/", "//", "%", "**", "<<", "&", "|", " if 1 else ", " and ", ", ", " for i in "]
SUFFIXES = [".__class__", ".__bases__", "[0]", "()", "('os')", ".count('a')", ".system('true')",
            ".__subclasses__()", "**9**9", "**10000", "*10**9"]
HOSTILE = ["().__class__.__bases__[0].__subclasses__()", "__import__('os').system('touch /tmp/pwned')",
           "open('/etc/passwd').read()", "9**9**9", "10**10000", "'a'*10**9", "(lambda: 1)()",
           "[x for x in range(10**9)]", "eval('1')", "exec('import os')", "'" + "a" * 5000 + "'",
           "(" * 300 + "1" + ")" * 300, "getattr(1, '__class__')", "'%s' % 1", "f'{__import__(\"os\")}'"]


def random_expression(rng: random.Random, depth: int = 0) -> str:
    """Token soup from a small grammar: numbers, names, operators, calls, attributes and known attacks."""
    roll = rng.random()
    if depth > 4 or roll < 0.3:
        text = rng.choice(ATOMS)
    elif roll < 0.55:
        text = random_expression(rng, depth + 1) + rng.choice(OPERATORS) + random_expression(rng, depth + 1)
    elif roll < 0.7:
        text = "(" + random_expression(rng, depth + 1) + ")"
    elif roll < 0.8:
        text = rng.choice("-+~") + random_expression(rng, depth + 1)
    elif roll < 0.9:
        text = rng.choice(HOSTILE)
    else:
        text = random_expression(rng, depth + 1) + rng.choice(SUFFIXES)
    return text


def test_fuzz_is_fast_and_never_executes_anything(monkeypatch):
    rng = random.Random(1234)
    inputs = [random_expression(rng) for _ in range(5000)]
    calls: list[str] = []

    def forbidden(name):
        def record(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called during calculator evaluation")
        return record

    monkeypatch.setattr(os, "system", forbidden("os.system"))
    monkeypatch.setattr(os, "popen", forbidden("os.popen"))
    monkeypatch.setattr(subprocess, "Popen", forbidden("subprocess.Popen"))
    for name in ("open", "eval", "exec", "__import__"):  # __import__ last: monkeypatch itself imports
        monkeypatch.setattr(builtins, name, forbidden(name))

    slowest = 0.0
    results = []
    start = time.monotonic()
    try:
        for expression in inputs:
            t0 = time.monotonic()
            results.append(evaluate(expression))
            slowest = max(slowest, time.monotonic() - t0)
    finally:
        elapsed = time.monotonic() - start
        monkeypatch.undo()

    assert calls == []
    assert elapsed < 10.0, f"5000 evaluations took {elapsed:.1f} s"
    assert slowest < 1.0, f"one evaluation took {slowest:.2f} s"
    assert all(result is None or isinstance(result, str) for result in results)
    answered = sum(result is not None for result in results)
    assert 0 < answered < len(inputs)  # the grammar produces both valid arithmetic and refusals


def test_deadline_is_enforced(monkeypatch):
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(tool_eval, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    assert evaluate("1+2+3", timeout_s=5) is None
