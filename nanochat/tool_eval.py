"""The calculator the model calls between <|python_start|> and <|python_end|>: safe by construction.

The text is parsed into a Python syntax tree (`ast.parse`, which never runs anything) and a small
interpreter walks it, accepting only:
- int and float literals (at most MAX_LITERAL_DIGITS digits), parentheses, unary + and -;
- + - * / // % between numbers, and ** with |exponent| <= MAX_EXPONENT whose result is estimated from
  logarithms before it is computed, so `9**9**9` or `10**10000` are refused without any work;
- `"string literal".count("substring literal")`, the only call (the GSM8K / spelling idiom), with both
  strings short and free of dunders.
Every value must stay within MAX_MAGNITUDE, the walk is depth- and time-limited, and anything else (names,
attributes, subscripts, other calls, lambdas, comprehensions, f-strings, string arithmetic...) gives None.
The answer is the result's `str()`, or None when the input is refused or fails (e.g. division by zero).
"""

from __future__ import annotations

import ast
import math
import time
import warnings

MAX_EXPRESSION_CHARS = 1000
MAX_STRING_CHARS = 1000
MAX_LITERAL_DIGITS = 100
MAX_EXPONENT = 100
MAX_MAGNITUDE = 10 ** 100
MAX_LOG10_MAGNITUDE = 100
MAX_DEPTH = 200
DEFAULT_TIMEOUT_S = 0.1


class Refused(Exception):
    """The expression is outside the calculator's language or limits."""


_BINARY_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}


def evaluate(expression: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> str | None:
    """The value of a calculator expression as text, or None if it is refused, invalid or fails."""
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    try:
        with warnings.catch_warnings():  # odd input such as `1()` makes the parser warn; it is refused anyway
            warnings.simplefilter("ignore")
            tree = ast.parse(expression.strip(), mode="eval")
        value = _Interpreter(time.monotonic() + timeout_s).number(tree.body, depth=0)
    except (Refused, SyntaxError, ValueError, ArithmeticError, RecursionError, MemoryError, TypeError):
        return None
    return str(value)


class _Interpreter:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def _check(self, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise Refused("expression nested too deeply")
        if time.monotonic() > self.deadline:
            raise Refused("time limit")

    def number(self, node: ast.AST, depth: int) -> int | float:
        self._check(depth)
        if isinstance(node, ast.Constant):
            value = _numeric_literal(node.value)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            operand = self.number(node.operand, depth + 1)
            value = -operand if isinstance(node.op, ast.USub) else operand
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            value = _bounded_power(self.number(node.left, depth + 1), self.number(node.right, depth + 1))
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
            left, right = self.number(node.left, depth + 1), self.number(node.right, depth + 1)
            value = _BINARY_OPS[type(node.op)](left, right)
        elif isinstance(node, ast.Call):
            value = self.count_call(node)
        else:
            raise Refused(f"{type(node).__name__} is not allowed")
        return _bounded(value)

    def count_call(self, node: ast.Call) -> int:
        func = node.func
        if not (isinstance(func, ast.Attribute) and func.attr == "count" and not node.keywords
                and len(node.args) == 1):
            raise Refused("the only call allowed is 'text'.count('part')")
        return _string_literal(func.value).count(_string_literal(node.args[0]))


def _numeric_literal(value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Refused("only int and float literals")
    if isinstance(value, int) and abs(value) >= 10 ** MAX_LITERAL_DIGITS:
        raise Refused("literal too large")
    return value


def _string_literal(node: ast.AST) -> str:
    if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        raise Refused("count works on string literals only")
    if len(node.value) > MAX_STRING_CHARS or "__" in node.value:
        raise Refused("string too long or dunder")
    return node.value


def _bounded_power(base: int | float, exponent: int | float) -> int | float:
    if abs(exponent) > MAX_EXPONENT:
        raise Refused("exponent too large")
    if base != 0 and abs(base) != 1 and exponent * math.log10(abs(base)) > MAX_LOG10_MAGNITUDE:
        raise Refused("power too large")
    return base ** exponent


def _bounded(value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Refused("result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise Refused("result is not finite")
    if abs(value) > MAX_MAGNITUDE:
        raise Refused("result too large")
    return value
