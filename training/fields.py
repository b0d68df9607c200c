"""Config fields that declare their valid values, and the check generated from those declarations.

``num(default, ge=0)`` / ``choice(default, *options)`` are ``dataclasses.field``s whose metadata holds
the range or the options; :func:`check_fields` walks a run config and refuses the first value outside
its declaration (naming the key and the range), and the configuration reference prints the same
declaration. A section may add ``rules()``: its cross-field checks, as (ok, message) pairs.

``resume_free=True`` (``num``, ``choice``, ``free``) declares a field that ``--resume`` may change: it
touches neither the data order, nor the model, nor the optimiser state (logging, checkpoint and eval
cadence, workers, the stopping point). Every other field is fixed for the life of a run, so a new field
is refused on resume until it declares otherwise; :func:`resume_changes` compares two configs that way."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

CHECK = "check"  # the metadata key of a field's declared valid values
RESUME_FREE = "resume_free"  # the metadata key: True when --resume may change the field


class ConfigError(ValueError):
    """A run configuration that cannot be used, with the key and the reason."""


@dataclass(frozen=True)
class Range:
    """Bounds of a number; ``None`` = unbounded; ``*_open``: the bound itself is outside."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def describe(self) -> str:
        return f"in {self}" if self.lo is not None and self.hi is not None else str(self)

    def __str__(self) -> str:
        lo, hi = _plain(self.lo), _plain(self.hi)
        if self.lo is not None and self.hi is not None:
            return f"{'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        return f"{'<' if self.hi_open else '<='} {hi}"


@dataclass(frozen=True)
class Choice:
    options: tuple

    def ok(self, value: Any) -> bool:
        return value in self.options

    def __str__(self) -> str:
        return " / ".join(str(o) for o in self.options)

    def describe(self) -> str:
        return f"one of {self}"


def _plain(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


def num(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, resume_free: bool = False) -> Any:
    """A number (or a list of numbers, each checked) in the given bounds; ``None`` values are not checked."""
    if ge is not None and gt is not None or le is not None and lt is not None:
        raise ValueError("give one lower bound (ge or gt) and one upper bound (le or lt)")
    bounds = Range(gt if gt is not None else ge, lt if lt is not None else le, gt is not None, lt is not None)
    if default is not None and not all(bounds.ok(v) for v in (default if isinstance(default, list) else [default])):
        raise ValueError(f"default {default!r} is outside {bounds}")
    metadata = {CHECK: bounds, RESUME_FREE: resume_free}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def choice(default: Any, *options: Any, resume_free: bool = False) -> Any:
    """One of ``options`` (``default`` must be one of them)."""
    if default not in options:
        raise ValueError(f"default {default!r} is not among {options}")
    return field(default=default, metadata={CHECK: Choice(tuple(options)), RESUME_FREE: resume_free})


def free(default: Any) -> Any:
    """A field of any value that ``--resume`` may change (a path, a switch)."""
    return field(default=default, metadata={RESUME_FREE: True})


def declared(f: dataclasses.Field) -> Range | Choice | None:
    """The valid values a field declares (None: any value of its type)."""
    return f.metadata.get(CHECK)


def check_fields(section: Any, prefix: str = "") -> None:
    """Raise :class:`ConfigError` for the first field of ``section`` (a config dataclass, walked into its
    nested sections) outside its declared range or options, then for the first failed ``rules()``."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_fields(value, key + ".")
            continue
        valid = declared(f)
        if valid is None or value is None:
            continue
        if not all(valid.ok(v) for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"{key} must be {valid.describe()}, got {value!r}")
    rules = getattr(section, "rules", None)
    for ok, message in rules() if rules is not None else ():
        if not ok:
            raise ConfigError(message)


def resume_changes(saved: dict, section: Any, prefix: str = "") -> tuple[list[str], list[str]]:
    """(fixed, free): the keys of ``section`` (a run config) whose values differ from ``saved`` (the same
    config as a dict, e.g. read back from YAML), each as ``key: old -> new``; split by whether the field
    may change on ``--resume``. A key missing from ``saved`` counts as its field's default."""
    fixed: list[str] = []
    changed_free: list[str] = []
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}{f.name}"
        old = saved.get(f.name, _default(f)) if isinstance(saved, dict) else None
        old = dataclasses.asdict(old) if dataclasses.is_dataclass(old) else old
        if dataclasses.is_dataclass(value):
            more = resume_changes(old if isinstance(old, dict) else {}, value, key + ".")
            fixed += more[0]
            changed_free += more[1]
        elif old != value:
            (changed_free if f.metadata.get(RESUME_FREE) else fixed).append(f"{key}: {old!r} -> {value!r}")
    return fixed, changed_free


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None
