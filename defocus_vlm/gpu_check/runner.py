"""The GPU check's driver: every section in its own process, within its own time budget, results
written to ``out`` after every section (and every row, as JSON lines) so that a run cut short still
returns what it measured.

Sections run in forked children of this process, which has already imported torch, transformers and
the project (that saves their import time per section) but has not touched CUDA: a forked child can
only use CUDA if its parent never initialised it, so if something did, children are spawned instead.
A child that outlives its deadline is killed; its rows so far are kept, and the checks it planned but
never reported are listed as skipped. Deadlines are cumulative (section i must end by the sum of the
budgets up to i), so time a section leaves unused goes to the next ones and the whole check ends
within ``total_seconds``."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .context import Outcome, SectionContext
from .report import FAIL, Row, RowLog, counts, markdown, skipped

JSON_NAME, MARKDOWN_NAME, ROWS_NAME = "gpu_check.json", "gpu_check.md", "gpu_check_rows.jsonl"
DEFAULT_TOTAL_SECONDS = 500.0  # of the device command's 570 s: the rest installs the wheels and starts Python


@dataclass(frozen=True)
class Section:
    name: str
    budget_s: float  # planned share of the GPU run; scaled so that all selected sections fit the total
    runner: str  # "module:function" under defocus_vlm.gpu_check, imported in the child
    what: str


SECTIONS = (
    Section("env", 20, "environment:run", "device, packages, copy bandwidth and matrix-rate ceilings"),
    Section("cuda_tests", 100, "correctness:run_cuda_tests", "the suite's CUDA-only tests (pytest -k cuda)"),
    Section("correctness", 90, "correctness:run_backends", "every kernel backend vs float64, fp32 and bf16"),
    Section("speed", 120, "speed:run", "attention / selective scan / retention kernels side by side"),
    Section("training", 110, "throughput:run", "bf16 training img/s, project loop (ZeRO-0/2) vs DeiT-S"),
    Section("streaming", 60, "streaming:run", "streaming step at 16 vs 4096 tokens, VLM first-token latency"),
)


def _resolve(runner: str) -> Callable[[SectionContext], None]:
    import importlib

    module, name = runner.split(":")
    return getattr(importlib.import_module(f"defocus_vlm.gpu_check.{module}"), name)


def _child(section: Section, rows_path: str, deadline: float, dry_run: bool, repo: str, facts: dict) -> None:
    os.setpgrp()  # its own process group: stopping the section also stops what it started (compile workers)
    _allow_recompiles()
    if dry_run:
        import torch

        torch.set_num_threads(1)  # tiny ops on a shared CPU: more threads only spin and wait
    ctx = SectionContext(section.name, RowLog(Path(rows_path)), deadline, dry_run, Path(repo), facts)
    try:
        _resolve(section.runner)(ctx)
    except BaseException as err:  # noqa: BLE001 - the section's failure is a row; the check goes on
        import traceback

        ctx.emit(f"{section.name}: section error", "runs to the end",
                 Outcome("error", FAIL), error=f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}")
        raise


def _allow_recompiles(limit: int = 64) -> None:
    """A section runs the compiled FlexAttention at many shapes in one process (training sees one):
    past dynamo's default of 8 recompiles it would silently fall back to unfused eager attention."""
    import torch._dynamo.config as config

    for name in ("recompile_limit", "cache_size_limit"):  # torch renamed the second to the first
        if hasattr(config, name):
            setattr(config, name, max(limit, getattr(config, name)))


def _preload() -> None:
    """Import what every section needs once, here, so forked children start warm. Nothing here may
    initialise CUDA (no deepspeed, no fla: they query the device when imported)."""
    import pytest  # noqa: F401
    import timm  # noqa: F401
    import transformers.models.mamba.modeling_mamba  # noqa: F401

    import defocus_vlm  # noqa: F401
    import defocus_vlm.bench.encoders  # noqa: F401
    import defocus_vlm.bench.kernels  # noqa: F401
    import defocus_vlm.bench.stream  # noqa: F401
    import defocus_vlm.training.loop  # noqa: F401


def _start_method() -> str:
    import torch

    return "spawn" if torch.cuda.is_initialized() else "fork"


def _finish_section(log: RowLog, section: Section, exit_note: str | None) -> list[Row]:
    plan, rows = log.read(section.name)
    seen = {r.check for r in rows}
    reason = exit_note or "not reported by the section"
    missing = [Row(section.name, c, "-", "-", skipped(reason)) for c in plan if c not in seen]
    if not plan and not rows:
        missing = [Row(section.name, f"{section.name}: section", "-", "runs to the end", FAIL,
                       error=exit_note or "the section reported nothing")]
    for row in missing:
        log.add(row)
    return rows + missing


def run_gpu_check(out: Path, dry_run: bool = False, sections: list[str] | None = None,
                  total_seconds: float = DEFAULT_TOTAL_SECONDS, repo: Path | None = None) -> dict:
    """Run the check; returns the JSON document also written to ``out``."""
    from .correctness import repo_root_default

    start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    repo = Path(repo) if repo is not None else repo_root_default()
    chosen = [s for s in SECTIONS if sections is None or s.name in sections]
    unknown = set(sections or []) - {s.name for s in SECTIONS}
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; known: {[s.name for s in SECTIONS]}")
    scale = total_seconds / sum(s.budget_s for s in chosen)
    log = RowLog(out / ROWS_NAME)
    log.path.unlink(missing_ok=True)
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # an availability check must not touch CUDA
    _preload()
    doc = {"schema": 1, "dry_run": dry_run, "started": datetime.now(UTC).isoformat(timespec="seconds"),
           "total_budget_s": total_seconds, "repo": str(repo), "environment": {}, "sections": [], "rows": [],
           "complete": False}
    facts: dict = {}
    planned_end = start
    for section in chosen:
        planned_end += section.budget_s * scale
        deadline = min(planned_end, start + total_seconds)
        method = _start_method()
        print(f"[gpu-check] section {section.name}: {section.what} (until +{deadline - start:.0f} s, {method})",
              flush=True)
        t0 = time.time()
        proc = mp.get_context(method).Process(
            target=_child, args=(section, str(log.path), deadline, dry_run, str(repo), facts), daemon=False)
        proc.start()
        proc.join(timeout=max(0.0, deadline - time.time()))
        exit_note = None
        if proc.is_alive():
            exit_note = f"time budget spent: the section was stopped after {time.time() - t0:.0f} s"
        elif proc.exitcode != 0:
            exit_note = f"the section's process ended with exit code {proc.exitcode}"
        _stop_group(proc)
        rows = _finish_section(log, section, exit_note)
        _learn(rows, facts, doc)
        doc["rows"] += [r.to_json() for r in rows]
        doc["sections"].append({"name": section.name, "what": section.what,
                                "budget_s": round(section.budget_s * scale, 1), "wall_s": round(time.time() - t0, 1),
                                "exit": exit_note or "ok", "start_method": method})
        _write(out, doc, start, complete=False)
    return _write(out, doc, start, complete=[s["name"] for s in doc["sections"]] == [s.name for s in chosen])


def _stop_group(proc) -> None:
    """Kill the section's process group (the section, and any worker it left behind), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the section ended and left nothing running
    proc.join()


def _learn(rows: list[Row], facts: dict, doc: dict) -> None:
    """Carry what later sections need (the copy bandwidth) and the environment into the document."""
    for row in rows:
        if "environment" in row.details:
            doc["environment"].update(row.details["environment"])
        if row.check.startswith("copy bandwidth") and "gb_per_s" in row.details:
            facts["copy_gbps"] = row.details["gb_per_s"]


def _write(out: Path, doc: dict, start: float, complete: bool) -> dict:
    doc["wall_s"] = round(time.time() - start, 1)
    doc["complete"] = complete
    doc["finished"] = datetime.now(UTC).isoformat(timespec="seconds") if complete else None
    doc["summary"] = counts([Row(**r) for r in doc["rows"]])
    tmp = out / (JSON_NAME + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, out / JSON_NAME)  # a reader (or a kill) never sees half a file
    (out / MARKDOWN_NAME).write_text(markdown(doc))
    return doc
