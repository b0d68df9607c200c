"""What a section of the GPU check gets: the device, its deadline, the row log, and the facts
earlier sections measured (e.g. the copy bandwidth the selective-scan rows compare with)."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .report import FAIL, INFO, NO_CUDA, PASS, Goal, Row, RowLog, skipped


@dataclass
class Outcome:
    """What one check measured: the table's value, the verdict, and the numbers behind them."""

    value: str
    status: str
    details: dict[str, Any] = field(default_factory=dict)


class SectionContext:
    def __init__(self, section: str, log: RowLog, deadline: float, dry_run: bool, repo: Path,
                 facts: dict[str, Any] | None = None):
        self.section, self.log, self.deadline, self.dry_run, self.repo = section, log, deadline, dry_run, repo
        self.facts = dict(facts or {})
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")

    def time_left(self) -> float:
        return self.deadline - time.time()

    def plan(self, checks: list[str]) -> None:
        """Announce the checks up front, so that those a time-out cuts off are still listed (as skipped)."""
        self.log.plan(self.section, checks)

    def emit(self, check: str, goal: str, outcome: Outcome, error: str | None = None,
             seconds: float | None = None) -> None:
        self.log.add(Row(self.section, check, outcome.value, goal, outcome.status, outcome.details, error,
                         None if seconds is None else round(seconds, 2)))

    def verdict(self, ok: bool, gpu_goal: bool = True) -> str:
        """pass/fail; a goal about GPU performance is not judged on CPU (the dry run)."""
        if gpu_goal and not self.cuda:
            return NO_CUDA
        return PASS if ok else FAIL

    def judge(self, value: float | None, goal: Goal, gpu_goal: bool = True) -> str:
        return self.verdict(goal.met(value), gpu_goal)

    def check(self, check: str, goal: str, fn: Callable[[], Outcome], min_seconds: float = 0.0) -> Outcome | None:
        """Run one check unless the section's budget is spent; an exception becomes a failing row
        with the error, and the section carries on with its next check."""
        if self.time_left() < min_seconds:
            self.emit(check, goal, Outcome("-", skipped(f"section time budget spent ({self.section})")))
            return None
        start = time.time()
        try:
            outcome = fn()
        except Exception as err:  # noqa: BLE001 - any failure is this row's result, not the run's end
            tb = traceback.format_exc()
            print(f"[gpu-check] {self.section}: {check} failed:\n{tb}", flush=True)
            self.emit(check, goal, Outcome("error", FAIL), error=f"{type(err).__name__}: {err}\n{tb[-1500:]}",
                      seconds=time.time() - start)
            if self.cuda:
                torch.cuda.empty_cache()
            return None
        self.emit(check, goal, outcome, seconds=time.time() - start)
        print(f"[gpu-check] {self.section}: {check}: {outcome.value} [{outcome.status}] "
              f"({time.time() - start:.1f} s)", flush=True)
        return outcome

    def info(self, value: str, details: dict[str, Any] | None = None) -> Outcome:
        return Outcome(value, INFO, details or {})
