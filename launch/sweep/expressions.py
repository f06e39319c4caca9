"""Menu constraints: small expressions over knob names, parsed with `ast` and evaluated without `eval`.

Allowed: numbers, strings, booleans, knob names, `+ - * / // % **`, unary `-`/`+`/`not`, comparisons
(chains included), `and`/`or`, and parentheses. Anything else (calls, attributes, subscripts, lambdas,
comprehensions, imports, walrus, ...) is refused when the menu is read, before any candidate runs.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from dataclasses import dataclass

from nanochat.configargs import UsageError

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
MAX_POWER_EXPONENT = 64


class ConstraintError(ValueError):
    """An expression that cannot be evaluated for these values (division by zero, bad operand types)."""


@dataclass(frozen=True)
class Constraint:
    """A named rule; `holds(values)` is True when the candidate may run."""

    name: str
    text: str
    tree: ast.Expression

    @property
    def names(self) -> set[str]:
        return {node.id for node in ast.walk(self.tree) if isinstance(node, ast.Name)}

    def holds(self, values: Mapping[str, object]) -> bool:
        return bool(_evaluate(self.tree.body, values))


def parse_constraint(name: str, text: str, known_names: set[str]) -> Constraint:
    """Parse and vet `text`; a UsageError names the first thing that is not allowed."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise UsageError(f"constraint {name} = {text!r} is not an expression: {exc.msg}") from None
    for node in ast.walk(tree):
        if not _allowed(node):
            raise UsageError(f"constraint {name} = {text!r}: {type(node).__name__} is not allowed (only knob names, "
                             "numbers, arithmetic, comparisons and and/or/not)")
        if isinstance(node, ast.Name) and node.id not in known_names:
            raise UsageError(f"constraint {name} = {text!r} uses {node.id!r}, which is no knob or setting of "
                             f"base_train")
    return Constraint(name, text, tree)


def _allowed(node: ast.AST) -> bool:
    if isinstance(node, (ast.Expression, ast.Load, ast.Name, ast.BoolOp, ast.And, ast.Or, ast.Compare)):
        return True
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float, str, bool))
    if isinstance(node, ast.BinOp):
        return type(node.op) in _BINARY
    if isinstance(node, ast.UnaryOp):
        return type(node.op) in _UNARY
    return type(node) in _BINARY or type(node) in _UNARY or type(node) in _COMPARE


def _evaluate(node: ast.AST, values: Mapping[str, object]):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.BoolOp):
        results = (_evaluate(value, values) for value in node.values)
        return all(results) if isinstance(node.op, ast.And) else any(results)
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, values))
    try:
        if isinstance(node, ast.BinOp):
            left, right = _evaluate(node.left, values), _evaluate(node.right, values)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_POWER_EXPONENT:
                raise ConstraintError(f"exponent {right} is larger than {MAX_POWER_EXPONENT}")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.Compare):
            left = _evaluate(node.left, values)
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                right = _evaluate(comparator, values)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
    except ZeroDivisionError:
        raise ConstraintError("division by zero") from None
    except TypeError as exc:
        raise ConstraintError(str(exc)) from None
    raise ConstraintError(f"cannot evaluate {type(node).__name__}")
