"""The sweep menu: a TOML file naming the knobs to vary, the values every candidate shares, and the rules
that reject a combination before it runs.

```toml
[sweep]                 # defaults for the command-line flags (the flags win)
strategy = "random"     # grid | random | halving
candidates = 24
steps = 60
seed = 0
val_tokens = 65536
eta = 2                 # halving: keep 1/eta of the candidates per rung

[fixed]                 # base_train settings every candidate gets (over the site profile's)
max_seq_len = 2048

[knobs]                 # a list of values, or a range {min, max, log = true, num = K (grid only)}
depth = [10, 12]
matrix_lr = { min = 0.01, max = 0.04, log = true }

[constraints]           # name = expression over knobs and settings (see launch.sweep.expressions)
head_fits = "head_dim <= depth * aspect_ratio"
```
Knob and fixed names are `BaseTrainConfig` fields (`launch.sweep.trainer` lists which the sweep owns).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch.sweep import trainer
from launch.sweep.expressions import Constraint, parse_constraint
from nanochat.configargs import UsageError

STRATEGIES = ("grid", "random", "halving")
SWEEP_DEFAULT_KEYS = {"strategy": str, "candidates": int, "steps": int, "seed": int, "val_tokens": int, "eta": int}
SWEEP_MINIMUMS = {"candidates": 1, "steps": 1, "val_tokens": 1, "eta": 2}
TABLES = ("sweep", "fixed", "knobs", "constraints")
SIGNIFICANT_DIGITS = 4


@dataclass(frozen=True)
class ListKnob:
    name: str
    values: tuple

    def grid_values(self) -> tuple:
        return self.values

    def sample(self, rng) -> Any:
        return rng.choice(self.values)

    def describe(self) -> Any:
        return list(self.values)


@dataclass(frozen=True)
class RangeKnob:
    """A numeric interval; integers when both ends are integers. Sampled floats keep 4 significant digits."""

    name: str
    low: float
    high: float
    log: bool = False
    num: int | None = None

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def _tidy(self, value: float):
        if self.integer:
            return int(round(value))
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")

    def grid_values(self) -> tuple:
        if self.num is None:
            raise UsageError(f"knob {self.name} is a range: give it num = K points for the grid strategy, "
                             "or use --strategy random")
        if self.num == 1:
            return (self._tidy(self.low),)
        points = []
        for i in range(self.num):
            t = i / (self.num - 1)
            value = (math.exp(math.log(self.low) + t * (math.log(self.high) - math.log(self.low))) if self.log
                     else self.low + t * (self.high - self.low))
            points.append(self._tidy(value))
        return tuple(dict.fromkeys(points))

    def sample(self, rng) -> Any:
        if self.log:
            return self._tidy(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        if self.integer:
            return rng.randint(self.low, self.high)
        return self._tidy(rng.uniform(self.low, self.high))

    def describe(self) -> dict:
        return {"min": self.low, "max": self.high, "log": self.log, **({"num": self.num} if self.num else {})}


Knob = ListKnob | RangeKnob


@dataclass(frozen=True)
class Menu:
    knobs: tuple[Knob, ...]
    fixed: dict[str, Any]
    constraints: tuple[Constraint, ...]
    defaults: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict:
        """A JSON-able copy for the trajectory header (compared on resume)."""
        return {"knobs": {k.name: k.describe() for k in self.knobs}, "fixed": dict(self.fixed),
                "constraints": {c.name: c.text for c in self.constraints}}


def _check_type(name: str, value: Any, types: dict[str, tuple[type, tuple]], origin: str) -> Any:
    kind, choices = types[name]
    if choices and value not in choices:
        raise UsageError(f"{origin} {name} = {value!r}: base_train accepts {', '.join(map(repr, choices))}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise UsageError(f"{origin} {name} = {value!r}: expected true or false")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UsageError(f"{origin} {name} = {value!r}: expected a whole number")
    if kind in (str, float) and not isinstance(value, kind):
        raise UsageError(f"{origin} {name} = {value!r}: expected a {kind.__name__}")
    return value


def _setting_name(name: str, types: dict, origin: str) -> str:
    if name in trainer.KNOBS_THE_TRAINER_LACKS:
        raise UsageError(f"{origin} {name}: {trainer.KNOBS_THE_TRAINER_LACKS[name]}; remove it from the menu")
    if name in trainer.SWEEP_CONTROLLED:
        raise UsageError(f"{origin} {name}: the sweep sets this itself (use --steps / --val-tokens)")
    if name not in types:
        raise UsageError(f"{origin} {name}: base_train has no such setting; menu settings are: "
                         f"{', '.join(sorted(types))}")
    return name


def _parse_knob(name: str, spec: Any, types: dict) -> Knob:
    origin = "[knobs]"
    if isinstance(spec, list):
        if not spec:
            raise UsageError(f"{origin} {name} has no values")
        return ListKnob(name, tuple(_check_type(name, v, types, origin) for v in spec))
    if isinstance(spec, dict):
        unknown = set(spec) - {"min", "max", "log", "num"}
        if unknown or "min" not in spec or "max" not in spec:
            raise UsageError(f"{origin} {name}: a range is {{min = A, max = B, log = false, num = K}}"
                             + (f"; unknown {', '.join(sorted(unknown))}" if unknown else ""))
        low, high = (_check_type(name, spec[k], types, origin) for k in ("min", "max"))
        if types[name][0] not in (int, float):
            raise UsageError(f"{origin} {name}: ranges need a numeric setting; give a list of values")
        if not low < high:
            raise UsageError(f"{origin} {name}: min {low} must be below max {high}")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise UsageError(f"{origin} {name}: log must be true or false, got {log!r}")
        if log and low <= 0:
            raise UsageError(f"{origin} {name}: a log range needs min > 0")
        num = spec.get("num")
        if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
            raise UsageError(f"{origin} {name}: num must be a positive whole number")
        return RangeKnob(name, low, high, log, num)
    return ListKnob(name, (_check_type(name, spec, types, origin),))


def parse_menu(data: dict[str, Any]) -> Menu:
    """A Menu from parsed TOML; every problem is a UsageError naming the table and key."""
    unknown_tables = set(data) - set(TABLES)
    if unknown_tables:
        raise UsageError(f"menu: unknown table(s) {', '.join(sorted(unknown_tables))}; expected [sweep], [fixed], "
                         "[knobs], [constraints]")
    for table in TABLES:
        if not isinstance(data.get(table, {}), dict):
            raise UsageError(f"menu: [{table}] must be a table, got {table} = {data[table]!r}")
    types = trainer.setting_types()
    defaults = {}
    for key, value in data.get("sweep", {}).items():
        if key not in SWEEP_DEFAULT_KEYS:
            raise UsageError(f"[sweep] {key}: unknown; expected {', '.join(SWEEP_DEFAULT_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, SWEEP_DEFAULT_KEYS[key]):
            raise UsageError(f"[sweep] {key} = {value!r}: expected a {SWEEP_DEFAULT_KEYS[key].__name__}")
        if key in SWEEP_MINIMUMS and value < SWEEP_MINIMUMS[key]:
            raise UsageError(f"[sweep] {key} = {value!r}: expected a whole number >= {SWEEP_MINIMUMS[key]}")
        defaults[key] = value
    if defaults.get("strategy", "grid") not in STRATEGIES:
        raise UsageError(f"[sweep] strategy = {defaults['strategy']!r}: expected {', '.join(STRATEGIES)}")
    fixed = {_setting_name(n, types, "[fixed]"): _check_type(n, v, types, "[fixed]")
             for n, v in data.get("fixed", {}).items()}
    knobs = tuple(_parse_knob(_setting_name(n, types, "[knobs]"), spec, types)
                  for n, spec in data.get("knobs", {}).items())
    if not knobs:
        raise UsageError("menu: [knobs] is empty; name at least one base_train setting to vary")
    both = set(fixed) & {k.name for k in knobs}
    if both:
        raise UsageError(f"menu: {', '.join(sorted(both))} is both fixed and a knob; keep one")
    constraints = []
    for name, text in data.get("constraints", {}).items():
        if not isinstance(text, str):
            raise UsageError(f"[constraints] {name}: expected a string expression")
        constraints.append(parse_constraint(name, text, set(types)))
    return Menu(knobs=knobs, fixed=fixed, constraints=tuple(constraints), defaults=defaults)


def load_menu(path: Path) -> Menu:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"menu {path} does not exist (env/example-menu.toml is a documented example)") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"menu {path} is not valid TOML: {exc}") from None
    return parse_menu(data)
