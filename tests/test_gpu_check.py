"""The prepared GPU check (benchmarks/gpu/): its CPU dry run end to end, and the driver's handling of
sections that overrun their budget or crash.

The dry run is the same script the device machine runs (run.sh: the tree mapped onto the package
layout, every section in its own process), at tiny sizes, with the CUDA-only rows skipped. It keeps
the check runnable between the rare sessions that get a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from defocus_vlm.gpu_check import runner
from defocus_vlm.gpu_check.context import Outcome, SectionContext
from defocus_vlm.gpu_check.report import FAIL, NO_CUDA, PASS, Goal, Row, RowLog, markdown, valid_status

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["env", "cuda_tests", "correctness", "speed", "training", "streaming"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if not hasattr(os, "fork"):
        pytest.skip("the driver forks its sections")
    out = tmp_path_factory.mktemp("gpu-check-out")
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, OUT=str(out),
               WORK=str(tmp_path_factory.mktemp("gpu-check-work")))
    env.pop("DEFOCUS_KERNELS", None)
    # a fresh machine's environment: earlier tests' in-process DeepSpeed runs leave rendezvous variables
    # (MASTER_PORT ...) that would make the check's own training rows join a process group long gone
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    start = time.time()
    proc = subprocess.run(["bash", str(REPO / "benchmarks/gpu/run.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    return out, proc, time.time() - start


def test_dry_run_completes_and_writes_its_files(dry_run):
    out, proc, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"gpu_check.json", "gpu_check.md", "gpu_check_rows.jsonl",
                                               "gpu_check.log"}
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["dry_run"] is True and doc["complete"] is True
    assert [s["name"] for s in doc["sections"]] == SECTIONS
    assert all(s["exit"] == "ok" for s in doc["sections"]), doc["sections"]
    assert "gpu check:" in proc.stdout.splitlines()[-1]


def test_dry_run_rows_each_have_value_goal_and_verdict(dry_run):
    out, _, _ = dry_run
    doc = json.loads((out / "gpu_check.json").read_text())
    rows = [Row(**r) for r in doc["rows"]]
    assert len(rows) > 60
    for row in rows:
        assert row.value and row.goal and valid_status(row.status), row
        assert "not reported" not in row.status and "budget" not in row.status, row  # nothing was cut off
    assert len({(r.section, r.check) for r in rows}) == len(rows)
    counted = doc["summary"]
    assert sum(counted.values()) == len(rows)
    assert counted["skipped"] == sum(r.status.startswith("skipped") for r in rows)
    # the Markdown table: a line per row, under the header
    table = [ln for ln in (out / "gpu_check.md").read_text().splitlines() if ln.startswith("| ")]
    assert table[0].startswith("| section | check | value | goal | result |") and len(table) == len(rows) + 2
    assert markdown(doc) == (out / "gpu_check.md").read_text()


def test_dry_run_skips_exactly_what_needs_cuda(dry_run):
    out, _, _ = dry_run
    rows = {(r["section"], r["check"]): r for r in json.loads((out / "gpu_check.json").read_text())["rows"]}
    by_section = {s: [r for (sec, _), r in rows.items() if sec == s] for s in SECTIONS}
    # the suite's CUDA-only tests are all found, and all skipped here
    tests = [r for r in by_section["cuda_tests"] if r["check"].startswith("pytest ")]
    assert len(tests) >= 11 and all(r["status"] == NO_CUDA for r in tests)
    assert rows[("cuda_tests", "CUDA-only tests (pytest)")]["status"] == NO_CUDA
    # the CPU backends are really compared with float64 (and pass); the CUDA ones are skipped
    for (sec, check), r in rows.items():
        if sec != "correctness":
            continue
        backend = check.split(" / ")[1]
        if backend in ("flex", "triton", "fla", "mamba_ssm", "causal_conv1d"):
            assert r["status"] == NO_CUDA, r
        else:
            assert r["status"] == PASS and r["details"]["errors"], r
    # performance goals are not judged on CPU, but the code measured what it could
    for sec in ("speed", "training", "streaming"):
        for r in by_section[sec]:
            if not r["check"].startswith("VLM"):  # its CPU failure is the transformers `cache` rename (lead's fix)
                assert r["status"] in (NO_CUDA, "info"), r
    deit = next(r for r in by_section["training"] if r["check"].startswith("DeiT-S"))
    assert deit["details"]["img_per_s"] > 0
    for r in by_section["training"][1:]:
        assert r["details"]["img_per_s"] > 0 and r["details"]["steps"] == 3 and len(r["details"]["losses"]) == 3
    zero_stages = sorted(r["details"]["zero_stage"] for r in by_section["training"][1:])
    assert zero_stages == [0, 0, 0, 2, 2, 2]
    assert all(r["details"]["times"]["chunked"]["ms"] > 0 for r in by_section["speed"]
               if "Triton vs chunked" in r["check"])


# ----------------------------------------------------------------------------- the driver, in isolation

def _planned_then_sleeps(ctx: SectionContext) -> None:
    ctx.plan(["first", "second"])
    ctx.check("first", "done", lambda: Outcome("1", PASS))
    time.sleep(60)  # outlives its deadline: the driver must stop it


def _raises(ctx: SectionContext) -> None:
    ctx.plan(["only"])
    raise RuntimeError("boom")


def _fails_one_check(ctx: SectionContext) -> None:
    ctx.plan(["bad", "good"])
    ctx.check("bad", "no error", lambda: 1 / 0)
    ctx.check("good", "<= 2", lambda: Outcome("1", ctx.judge(1.0, Goal("<=", 2.0), gpu_goal=False)))


def test_driver_stops_overrunning_sections_and_keeps_going(tmp_path, monkeypatch):
    if not hasattr(os, "fork"):
        pytest.skip("the driver forks its sections")
    fns = {"sleepy": _planned_then_sleeps, "crashy": _raises, "mixed": _fails_one_check}
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    monkeypatch.setattr(runner, "_start_method", lambda: "fork")  # the fakes live in this process only
    monkeypatch.setattr(runner, "SECTIONS", tuple(runner.Section(n, 1.0, n, n) for n in fns))
    monkeypatch.setattr(runner, "_resolve", lambda name: fns[name])
    start = time.time()
    doc = runner.run_gpu_check(tmp_path, dry_run=True, total_seconds=9.0)
    assert time.time() - start < 30
    rows = {(r["section"], r["check"]): r for r in doc["rows"]}
    assert rows[("sleepy", "first")]["status"] == PASS
    assert rows[("sleepy", "second")]["status"].startswith("skipped: time budget spent")
    assert doc["sections"][0]["exit"].startswith("time budget spent")
    assert rows[("crashy", "crashy: section error")]["status"] == FAIL
    assert "boom" in rows[("crashy", "crashy: section error")]["error"]
    assert rows[("crashy", "only")]["status"].startswith("skipped:")
    assert rows[("mixed", "bad")]["status"] == FAIL and "ZeroDivisionError" in rows[("mixed", "bad")]["error"]
    assert rows[("mixed", "good")]["status"] == PASS
    assert doc["complete"] and json.loads((tmp_path / "gpu_check.json").read_text())["summary"] == doc["summary"]


def test_goals_and_row_log(tmp_path):
    assert Goal("<=", 1.3).met(1.3) and not Goal("<=", 1.3).met(1.31)
    assert not Goal(">=", 0.5).met(float("nan")) and not Goal(">=", 0.5).met(None)
    with pytest.raises(ValueError, match="invalid status"):
        Row("s", "c", "v", "g", "passed")
    log = RowLog(tmp_path / "rows.jsonl")
    log.plan("s", ["a", "b"])
    log.add(Row("s", "a", "1", "g", PASS))
    with open(log.path, "a") as f:
        f.write('{"row": {"section": "s", "check": "b"')  # a write cut short by a kill
    plan, rows = log.read("s")
    assert plan == ["a", "b"] and [r.check for r in rows] == ["a"]
