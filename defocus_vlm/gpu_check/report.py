"""Rows of the GPU check: one verdict each, written as JSON lines while the check runs, then
assembled into one JSON document and a Markdown table.

A row's ``status`` is ``pass`` or ``fail`` (its goal met or not; an error is a ``fail`` with
``error`` set), ``info`` (a measurement with no goal, e.g. the copy-bandwidth ceiling), or
``skipped: <why>`` (no CUDA in a dry run, a package missing, the section's time budget spent)."""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PASS, FAIL, INFO = "pass", "fail", "info"
NO_CUDA = "skipped: no CUDA"
ROW_KEYS = ("section", "check", "value", "goal", "status", "details", "error", "seconds")


def skipped(reason: str) -> str:
    return f"skipped: {reason}"


def valid_status(status: str) -> bool:
    return status in (PASS, FAIL, INFO) or (status.startswith("skipped: ") and len(status) > len("skipped: "))


@dataclass(frozen=True)
class Goal:
    """``value <op> threshold``, e.g. Goal("<=", 1.3, "x SDPA flash time")."""

    op: str
    threshold: float
    unit: str = ""

    def met(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):  # NaN or a missing measurement never passes
            return False
        compare: Callable[[float, float], bool] = {"<=": operator.le, ">=": operator.ge,
                                                   "<": operator.lt, ">": operator.gt}[self.op]
        return compare(value, self.threshold)

    def __str__(self) -> str:
        return f"{self.op} {self.threshold:g}{self.unit}"


@dataclass
class Row:
    section: str
    check: str
    value: str
    goal: str
    status: str
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if not valid_status(self.status):
            raise ValueError(f"row {self.check!r}: invalid status {self.status!r}")

    def to_json(self) -> dict:
        return asdict(self)


def fmt(x: float | None, digits: int = 3) -> str:
    """Numbers for the table: 3 significant digits, scientific notation below 1e-3."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return str(x)
    if x != 0 and abs(x) < 1e-3:
        return f"{x:.1e}"
    return f"{x:.{digits}g}"


class RowLog:
    """Append-only JSON-lines file shared by the sections (one process writes at a time): a section
    first writes its plan (the checks it means to run), then each row as soon as it is known."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()

    def plan(self, section: str, checks: list[str]) -> None:
        self._append({"plan": section, "checks": checks})

    def add(self, row: Row) -> None:
        self._append({"row": row.to_json()})

    def read(self, section: str) -> tuple[list[str], list[Row]]:
        """(planned checks, rows) of ``section``; a line cut short by a killed process is ignored."""
        plan: list[str] = []
        rows: list[Row] = []
        if not self.path.is_file():
            return plan, rows
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("plan") == section:
                plan += [c for c in record["checks"] if c not in plan]
            elif "row" in record and record["row"]["section"] == section:
                rows.append(Row(**record["row"]))
        return plan, rows


def counts(rows: list[Row]) -> dict[str, int]:
    out = {"pass": 0, "fail": 0, "info": 0, "skipped": 0}
    for row in rows:
        out["skipped" if row.status.startswith("skipped") else row.status] += 1
    return out


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(document: dict) -> str:
    """The short table: one line per row (value, goal, result), errors abbreviated."""
    env = document.get("environment", {})
    c = document["summary"]
    title = "GPU check" + (" (DRY RUN on CPU: tiny sizes, CUDA rows skipped)" if document["dry_run"] else "")
    lines = [f"# {title}", "",
             f"{env.get('device', '?')} | torch {env.get('torch', '?')} | triton {env.get('triton', '?')} | "
             f"transformers {env.get('transformers', '?')} | wall {document['wall_s']:.0f} s of "
             f"{document['total_budget_s']:.0f} s budget | {'complete' if document['complete'] else 'INCOMPLETE'}",
             "", f"**{c['pass']} pass, {c['fail']} fail, {c['info']} info, {c['skipped']} skipped**", "",
             "| section | check | value | goal | result |", "| --- | --- | --- | --- | --- |"]
    for row in document["rows"]:
        row = row if isinstance(row, Row) else Row(**row)
        result = row.status.upper() if row.status in (PASS, FAIL) else row.status
        value = row.value
        if row.error:
            value = f"{value} — error: {row.error.strip().splitlines()[-1][:160]}"
        lines.append(f"| {row.section} | {_cell(row.check)} | {_cell(value)} | {_cell(row.goal)} | {_cell(result)} |")
    return "\n".join(lines) + "\n"
