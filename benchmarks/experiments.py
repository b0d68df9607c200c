"""Run a plan of training experiments that may span sessions, and collect their results.

    .venv/bin/python benchmarks/experiments.py benchmarks/plans/fashion_claim.yaml [--jobs 2] [--only GROUP ...]
    .venv/bin/python benchmarks/experiments.py benchmarks/plans/fashion_claim.yaml --collect

A plan (YAML) names a stage, shared overrides and groups of rows x seeds; each (row, seed) is one
``defocus-vlm train STAGE --config CONFIG [overrides] train.seed=S train.output_dir=DIR`` command.
Running a plan again picks up where it stopped: a run whose ``metrics.json`` exists is done, a run
with a checkpoint continues with ``--resume`` (exact), anything else in its directory (a run killed
before its first checkpoint) is started afresh. ``--collect`` (also done after every finished run)
writes the plan's results JSON: every run's final metrics and command, and per row the mean and
standard deviation over seeds, plus the per-epoch validation curve."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = str(ROOT / ".venv" / "bin" / "defocus-vlm")


@dataclass
class Job:
    group: str
    row: str
    seed: int
    argv: list[str]  # the defocus-vlm command line, without --resume
    out: Path

    @property
    def name(self) -> str:
        return f"{self.row}-seed{self.seed}"

    @property
    def done(self) -> bool:
        return (self.out / "metrics.json").is_file()

    def resumable(self) -> bool:
        return (self.out / "checkpoints" / "latest").is_file()


def load_plan(path: Path) -> dict:
    plan = yaml.safe_load(path.read_text())
    for key in ("name", "stage", "output_root", "results", "groups"):
        if key not in plan:
            raise SystemExit(f"{path}: the plan has no '{key}' (expected name, stage, output_root, results, groups)")
    return plan


def plan_jobs(plan: dict, only: list[str] | None = None) -> list[Job]:
    """Every (row, seed) of the plan, in plan order (group, seed, row)."""
    root = ROOT / plan["output_root"]
    common = [*plan.get("common", []), *plan.get("budget", [])]
    jobs = []
    for group in plan["groups"]:
        if only and group["name"] not in only:
            continue
        for seed in group["seeds"]:
            for row, spec in group["rows"].items():
                out = root / f"{row}-seed{seed}"
                argv = ["train", plan["stage"], "--config", spec["config"], *common, *spec.get("set", []),
                        f"train.seed={seed}", f"train.output_dir={out.relative_to(ROOT)}"]
                jobs.append(Job(group["name"], row, seed, argv, out))
    return jobs


def unique(jobs: list[Job]) -> list[Job]:
    """A row shared by two groups (same name, same settings: its output directory) runs once."""
    first: dict[Path, Job] = {}
    for job in jobs:
        first.setdefault(job.out, job)
    return list(first.values())


def start(job: Job) -> subprocess.Popen:
    argv = list(job.argv)
    if job.resumable():
        argv.append("--resume")
    elif job.out.exists():
        shutil.rmtree(job.out)  # killed before its first checkpoint: nothing to keep
    job.out.parent.mkdir(parents=True, exist_ok=True)
    log = open(job.out.parent / f"{job.name}.log", "a")  # noqa: SIM115 (closed with the process)
    print(f"[{time.strftime('%H:%M:%S')}] start {job.name}: defocus-vlm {' '.join(argv)}", flush=True)
    return subprocess.Popen([CLI, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def run(jobs: list[Job], parallel: int, on_finish) -> int:
    """Run the unfinished jobs, ``parallel`` at a time; the number that failed."""
    pending = [j for j in unique(jobs) if not j.done]
    running: dict[str, tuple[Job, subprocess.Popen]] = {}
    failed = 0
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            running[job.name] = (job, start(job))
        time.sleep(5)
        for name, (job, proc) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            ok = proc.returncode == 0 and job.done
            failed += not ok
            print(f"[{time.strftime('%H:%M:%S')}] {'done' if ok else 'FAILED'} {name} (exit {proc.returncode})",
                  flush=True)
            on_finish()
    return failed


def val_curve(out: Path) -> list[dict]:
    """The per-evaluation validation records of a run's history (epoch ends)."""
    history = out / "history.jsonl"
    if not history.is_file():
        return []
    records = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    last = {r["step"]: r for r in records if "val" in r}  # a resumed run may repeat steps: the last one counts
    return [last[step] for step in sorted(last)]


def collect(plan: dict, jobs: list[Job]) -> dict:
    runs, rows = [], {}
    for job in jobs:
        entry = {"group": job.group, "row": job.row, "seed": job.seed, "command": "defocus-vlm " + " ".join(job.argv),
                 "done": job.done}
        if job.done:
            metrics = json.loads((job.out / "metrics.json").read_text())
            entry |= {"val": metrics["val"], "steps": metrics["steps"], "wall_s": metrics["wall_s"],
                      "curve": val_curve(job.out)}
            for kind, values in metrics["val"].items():
                for key, value in values.items():
                    rows.setdefault((job.group, job.row), {}).setdefault(f"{kind}.{key}", []).append(value)
        runs.append(entry)
    summary = []
    for (group, row), metrics in rows.items():
        line = {"group": group, "row": row, "seeds": len(next(iter(metrics.values())))}
        for key, values in metrics.items():
            line[key] = {"mean": round(statistics.fmean(values), 3),
                         "std": round(statistics.stdev(values), 3) if len(values) > 1 else None,
                         "values": values}
        summary.append(line)
    return {"plan": plan["name"], "budget": plan.get("budget", []), "common": plan.get("common", []),
            "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": summary, "runs": runs}


def write_results(plan: dict, jobs: list[Job]) -> None:
    path = ROOT / plan["results"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(collect(plan, jobs), indent=1) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", type=Path)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each uses train.cpu_threads)")
    parser.add_argument("--only", nargs="*", help="run only these groups")
    parser.add_argument("--collect", action="store_true", help="only (re)write the results JSON")
    parser.add_argument("--list", action="store_true", help="print each run's state and command")
    args = parser.parse_args(argv)
    plan = load_plan(args.plan)
    jobs = plan_jobs(plan, args.only)
    if args.list:
        for job in unique(jobs):
            state = "done" if job.done else "resume" if job.resumable() else "todo"
            print(f"{state:6s} {job.name:40s} defocus-vlm {' '.join(job.argv)}")
        return 0
    if not args.collect:
        failed = run(jobs, args.jobs, lambda: write_results(plan, plan_jobs(plan)))
        if failed:
            print(f"{failed} run(s) failed; see the logs in {plan['output_root']}", file=sys.stderr)
    write_results(plan, plan_jobs(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
