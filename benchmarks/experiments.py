"""Run a plan of training experiments that may span sessions, and collect their results.

    .venv/bin/python benchmarks/experiments.py benchmarks/plans/fashion_claim.yaml [--jobs 2] [--only GROUP ...]
        [--rows ROW ...] [--seeds S ...] [--rerun]
    .venv/bin/python benchmarks/experiments.py benchmarks/plans/fashion_claim.yaml --collect
    .venv/bin/python benchmarks/experiments.py benchmarks/plans/fashion_claim.yaml --table KEY ... [--only GROUP ...]
        [--per-seed KEY | --paired ROW BASELINE]

A plan (YAML) names a stage, shared overrides and groups of rows x seeds; each (row, seed) is one
``defocus-vlm train STAGE --config CONFIG [overrides] train.seed=S train.output_dir=DIR`` command.
Running a plan again picks up where it stopped: a run whose ``metrics.json`` exists is done, a run
with a checkpoint continues with ``--resume`` (exact), anything else in its directory (a run killed
before its first checkpoint) is started afresh. The results JSON is the plan's record across machines (run
directories and checkpoints are never committed): a run it records as done, with the same commands, is not run
again, and its recorded numbers are kept, unless a run still to do needs its directory (a stage-1 tower whose
files are gone), which trains it again. ``--collect`` (also done after every finished run)
writes the plan's results JSON: every run's final metrics and command, and per row the mean and
standard deviation over seeds, plus the per-epoch validation curve.

Chains (a stage-1 tower, then stage 3 on it, then its evaluation): a group may set its own ``stage``
(``none``: no training, evaluations only) and ``budget`` (added after the plan's); ``{out:ROW}`` in a
row's ``set`` is ROW's output directory at the same seed, and the run waits until ROW is done (a
failed ROW fails it). A group's ``evals`` (name -> a defocus-vlm command line, ``{out}`` standing for
the run's directory, nested lists spliced in; a row's own ``evals`` add to them) run after its
training, each with ``--output-dir OUT/NAME`` added. A run is done when its ``metrics.json`` (if it
trains) and every ``OUT/NAME/metrics.json`` exist; the results JSON has their numbers as ``NAME.<key>``."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = str(ROOT / ".venv" / "bin" / "defocus-vlm")


OUT_REF = re.compile(r"\{out:([^}]+)\}")  # {out:ROW}: ROW's output directory at the same seed
NO_TRAINING = "none"  # a group's stage when its rows only run evaluations
POLL_S = 5.0  # seconds between looks at the running processes


@dataclass
class Job:
    group: str
    row: str
    seed: int
    argv: list[str] | None  # the defocus-vlm training command line, without --resume; None: no training
    out: Path
    evals: dict[str, list[str]] = field(default_factory=dict)  # name -> command line, without --output-dir
    needs: list[Path] = field(default_factory=list)  # output directories of the runs this one waits for
    record: dict | None = None  # this run's entry in the results JSON, when it records it done with these commands

    @property
    def name(self) -> str:
        return f"{self.row}-seed{self.seed}"

    @property
    def trained(self) -> bool:
        return self.argv is None or (self.out / "metrics.json").is_file()

    def eval_dir(self, name: str) -> Path:
        return self.out / name

    def eval_argv(self, name: str) -> list[str]:
        return [*self.evals[name], "--output-dir", str(self.eval_dir(name).relative_to(ROOT))]

    @property
    def done(self) -> bool:
        """Finished here: its metrics files exist."""
        return self.trained and all((self.eval_dir(n) / "metrics.json").is_file() for n in self.evals)

    @property
    def finished(self) -> bool:
        """Finished here or recorded as finished (on another machine, whose files are gone)."""
        return self.done or self.record is not None

    @property
    def command(self) -> str:
        """Its whole work as one shell line: the training, then each evaluation."""
        commands = ([self.argv] if self.argv else []) + [self.eval_argv(name) for name in self.evals]
        return " && ".join("defocus-vlm " + " ".join(c) for c in commands)

    def resumable(self) -> bool:
        return (self.out / "checkpoints" / "latest").is_file()

    def next_command(self) -> list[str] | None:
        """What is left to run: the training (with --resume when it can), then each evaluation not done."""
        if not self.trained:
            return [*self.argv, "--resume"] if self.resumable() else self.argv
        for name in self.evals:
            if not (self.eval_dir(name) / "metrics.json").is_file():
                return self.eval_argv(name)
        return None


def load_plan(path: Path) -> dict:
    plan = yaml.safe_load(path.read_text())
    for key in ("name", "stage", "output_root", "results", "groups"):
        if key not in plan:
            raise SystemExit(f"{path}: the plan has no '{key}' (expected name, stage, output_root, results, groups)")
    return plan


def flatten(args: list) -> list:
    """A command line with nested lists (a YAML alias shared by several commands) spliced in."""
    return [a for arg in args for a in (flatten(arg) if isinstance(arg, list) else [arg])]


def fill_paths(arg: str, root: Path, seed: int, out: Path) -> str:
    """``arg`` with ``{out:ROW}`` (ROW's directory at ``seed``) and ``{out}`` (``out``) written out."""
    arg = OUT_REF.sub(lambda ref: str((root / f"{ref[1]}-seed{seed}").relative_to(ROOT)), arg)
    return arg.replace("{out}", str(out.relative_to(ROOT)))


def recorded_runs(plan: dict) -> dict[tuple[str, str, int], dict]:
    """The runs the plan's results JSON records as done, by (group, row, seed)."""
    path = ROOT / plan["results"]
    if not path.is_file():
        return {}
    try:
        runs = json.loads(path.read_text())["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        expected = "expected an object with 'runs'"
        raise SystemExit(f"{path}: not a results JSON of this runner ({expected}): {error}") from None
    return {(r["group"], r["row"], r["seed"]): r for r in runs if r.get("done")}


def plan_jobs(plan: dict, only: list[str] | None = None) -> list[Job]:
    """Every (row, seed) of the plan, in plan order (group, seed, row), each with its record if it has one."""
    root = ROOT / plan["output_root"]
    records = recorded_runs(plan)
    jobs = []
    for group in plan["groups"]:
        if only and group["name"] not in only:
            continue
        stage = group.get("stage", plan["stage"])
        common = [*plan.get("common", []), *plan.get("budget", []), *group.get("budget", [])]
        for seed in group["seeds"]:
            for row, spec in group["rows"].items():
                out = root / f"{row}-seed{seed}"
                overrides = [fill_paths(a, root, seed, out) for a in spec.get("set", [])]
                needs = [root / f"{ref}-seed{seed}" for a in spec.get("set", []) for ref in OUT_REF.findall(a)]
                argv = None if stage == NO_TRAINING else [
                    "train", stage, "--config", spec["config"], *common, *overrides,
                    f"train.seed={seed}", f"train.output_dir={out.relative_to(ROOT)}"]
                evals = {name: [fill_paths(str(a), root, seed, out) for a in flatten(cmd)]
                         for name, cmd in {**group.get("evals", {}), **spec.get("evals", {})}.items()}
                job = Job(group["name"], row, seed, argv, out, evals, needs)
                record = records.get((job.group, job.row, job.seed))
                job.record = record if record and record["command"] == job.command else None
                jobs.append(job)
    return jobs


def unique(jobs: list[Job]) -> list[Job]:
    """A row shared by two groups (same name, same settings: its output directory) runs once."""
    first: dict[Path, Job] = {}
    for job in jobs:
        first.setdefault(job.out, job)
    return list(first.values())


def start(job: Job) -> subprocess.Popen:
    argv = job.next_command()
    if not job.trained and not job.resumable() and job.out.exists():
        shutil.rmtree(job.out)  # killed before its first checkpoint: nothing to keep
    job.out.mkdir(parents=True, exist_ok=True)
    log = open(job.out.parent / f"{job.name}.log", "a")  # noqa: SIM115 (closed with the process)
    print(f"[{time.strftime('%H:%M:%S')}] start {job.name}: defocus-vlm {' '.join(argv)}", flush=True)
    return subprocess.Popen([CLI, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def run(jobs: list[Job], parallel: int, on_finish) -> int:
    """Run the unfinished jobs, ``parallel`` at a time, each once the runs it needs are done; the number
    that failed (a job whose needed run failed, or is neither done nor planned, fails too)."""
    planned = {j.out: j for j in unique(jobs)}
    wanted = {out for out, j in planned.items() if not j.finished}
    # a recorded run whose files are gone runs again when a run still to do needs them (a stage-1 tower)
    stack = list(wanted)
    while stack:
        for need in planned[stack.pop()].needs:
            if need in planned and not planned[need].done and need not in wanted:
                wanted.add(need)
                stack.append(need)
    pending = [j for out, j in planned.items() if out in wanted]
    running: dict[str, tuple[Job, subprocess.Popen]] = {}
    failed: set[Path] = set()

    def ready(need: Path) -> bool:
        return planned[need].done if need in planned else (need / "metrics.json").is_file()

    while pending or running:
        for job in list(pending):
            broken = [n for n in job.needs if n in failed or (n not in planned and not ready(n))]
            if broken:
                pending.remove(job)
                failed.add(job.out)
                print(f"[{time.strftime('%H:%M:%S')}] SKIPPED {job.name}: it needs {broken[0].name}, which failed "
                      "or is neither done nor in this run", flush=True)
        for job in [j for j in pending if all(ready(n) for n in j.needs)]:
            if len(running) >= parallel:
                break
            pending.remove(job)
            running[job.name] = (job, start(job))
        time.sleep(POLL_S)
        for name, (job, proc) in list(running.items()):
            if proc.poll() is None:
                continue
            if proc.returncode == 0 and job.next_command() is not None:  # trained: its evaluations next
                running[name] = (job, start(job))
                continue
            del running[name]
            ok = proc.returncode == 0 and job.done
            if not ok:
                failed.add(job.out)
            print(f"[{time.strftime('%H:%M:%S')}] {'done' if ok else 'FAILED'} {name} (exit {proc.returncode})",
                  flush=True)
            on_finish()
    return len(failed)


def val_curve(out: Path) -> list[dict]:
    """The per-evaluation validation records of a run's history (epoch ends)."""
    history = out / "history.jsonl"
    if not history.is_file():
        return []
    records = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    last = {r["step"]: r for r in records if "val" in r}  # a resumed run may repeat steps: the last one counts
    return [last[step] for step in sorted(last)]


def numbers(metrics: dict, prefix: str) -> dict[str, float]:
    """The numeric leaves of a metrics dict as ``prefix.key.subkey`` (sample counts left out)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out |= numbers(value, f"{prefix}.{key}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "samples":
            out[f"{prefix}.{key}"] = value
    return out


def summarise(pairs: list[tuple[int, float]]) -> dict:
    """One key of a row: the (seed, value) pairs of its runs as mean, std over seeds, values and seeds."""
    values = [value for _, value in pairs]
    return {"mean": round(statistics.fmean(values), 3),
            "std": round(statistics.stdev(values), 3) if len(values) > 1 else None,
            "values": values, "seeds": [seed for seed, _ in pairs]}


def collect(plan: dict, jobs: list[Job]) -> dict:
    runs, rows = [], {}
    for job in jobs:
        entry = {"group": job.group, "row": job.row, "seed": job.seed, "command": job.command, "done": job.done}
        if job.done:
            if job.argv:
                metrics = json.loads((job.out / "metrics.json").read_text())
                entry |= {"val": metrics["val"], "steps": metrics["steps"], "wall_s": metrics["wall_s"],
                          "wall_s_total": metrics.get("wall_s_total"), "curve": val_curve(job.out)}
            for name in job.evals:
                entry.setdefault("evals", {})[name] = json.loads((job.eval_dir(name) / "metrics.json").read_text())
        elif job.record:
            entry = job.record  # finished on another machine: its recorded numbers stand
        if entry["done"]:
            found = {f"{kind}.{key}": value for kind, values in entry.get("val", {}).items()
                     for key, value in values.items()}
            for name, metrics in entry.get("evals", {}).items():
                found |= numbers(metrics, name)
            for key, value in found.items():
                rows.setdefault((job.group, job.row), {}).setdefault(key, []).append((job.seed, value))
        runs.append(entry)
    summary = [{"group": group, "row": row, "seeds": len(next(iter(metrics.values())))}
               | {key: summarise(pairs) for key, pairs in metrics.items()}
               for (group, row), metrics in rows.items()]
    groups = {g["name"]: {"stage": g.get("stage", plan["stage"]), "budget": g.get("budget", [])}
              for g in plan["groups"]}
    return {"plan": plan["name"], "budget": plan.get("budget", []), "common": plan.get("common", []),
            "groups": groups, "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": summary, "runs": runs}


def with_curves(results: dict) -> dict:
    """``results`` with each row's learning curve as keys ``epochN.METRIC`` (``epoch5.top1``: the raw weights'
    validation at the end of epoch N, from the finished runs' curves), so that --table and --paired show how fast
    the rows learn, not only where they end."""
    curves: dict[tuple[str, str], dict[str, list]] = {}
    for run in results["runs"]:
        for record in run.get("curve", []) if run["done"] else []:
            metrics = {key: value for key, value in record["val"].items() if key != "epoch"}
            for key, value in numbers(metrics, f"epoch{record['val']['epoch']}").items():
                curves.setdefault((run["group"], run["row"]), {}).setdefault(key, []).append((run["seed"], value))
    rows = [line | {key: summarise(pairs) for key, pairs in curves.get((line["group"], line["row"]), {}).items()}
            for line in results["rows"]]
    return results | {"rows": rows}


def seeded(value: dict) -> list[tuple[int | None, float]]:
    """A row's values of one key with their seeds; results written before the runner kept each value's seed
    have the values alone, in seed order (seed None)."""
    return list(zip(value.get("seeds") or [None] * len(value["values"]), value["values"]))


def paired(results: dict, first: str, second: str, keys: list[str], groups: list[str] | None = None) -> str:
    """A Markdown table of ``first`` - ``second`` per key over the seeds both rows finished: each seed's
    difference, their mean +- std and the paired t statistic (mean / (std / sqrt(n)), n - 1 degrees of freedom;
    "-" where it is undefined). Rows are looked up in ``groups`` (all if None); a row in several groups is the
    same runs in each (the side-by-side's ``defocus_mamba`` is also each ablation's baseline)."""
    lines = {}
    for line in results["rows"]:
        if not groups or line["group"] in groups:
            lines.setdefault(line["row"], line)
    for name in (first, second):
        if name not in lines:
            raise ValueError(f"no finished row {name!r} to pair (rows: {', '.join(lines)})")
    out = [f"| {first} - {second} | seeds | per seed | mean ± std | paired t |", "|---|---|---|---|---|"]
    for key in keys:
        a, b = ({s if s is not None else i: v for i, (s, v) in enumerate(seeded(lines[name][key]))}
                if key in lines[name] else {} for name in (first, second))
        seeds = sorted(set(a) & set(b))
        diffs = [a[s] - b[s] for s in seeds]
        mean = statistics.fmean(diffs) if diffs else None
        std = statistics.stdev(diffs) if len(diffs) > 1 else None
        t = mean / (std / math.sqrt(len(diffs))) if std else None
        out.append(f"| {key} | {len(seeds)} | " + ", ".join(f"s{s} {d:+.2f}" for s, d in zip(seeds, diffs))
                   + " | " + ("-" if mean is None else f"{mean:+.2f}" + (f" ± {std:.2f}" if std is not None else ""))
                   + " | " + ("-" if t is None else f"{t:.1f}") + " |")
    return "\n".join(out)


def table(results: dict, keys: list[str], groups: list[str] | None = None, per_seed: str | None = None) -> str:
    """A Markdown table: one line per row of ``results`` (from :func:`collect`) in ``groups`` (all if None), the
    mean +- std of each key; a group column when a row name is in more than one of them (the side-by-side's
    ``defocus_mamba`` is also each ablation's baseline); with ``per_seed``, a last column of that key's value at
    each seed (``s0 90.81, s1 90.63``)."""
    def cell(line: dict, key: str) -> str:
        if key not in line:
            return "-"
        value = line[key]
        return f"{value['mean']:.2f}" + (f" ± {value['std']:.2f}" if value["std"] is not None else "")

    def seeds_cell(line: dict) -> str:
        if per_seed not in line:
            return "-"
        return ", ".join(("" if s is None else f"s{s} ") + f"{v:.2f}" for s, v in seeded(line[per_seed]))

    shown = [line for line in results["rows"] if not groups or line["group"] in groups]
    names = [line["row"] for line in shown]
    by_group = len(set(names)) < len(names)
    head = ["group"] * by_group + ["row", "seeds", *keys] + [f"{per_seed} per seed"] * bool(per_seed)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([line["group"]] * by_group + [line["row"], str(line["seeds"])]
                                + [cell(line, k) for k in keys] + [seeds_cell(line)] * bool(per_seed)) + " |"
              for line in shown]
    return "\n".join(lines)


def write_results(plan: dict, jobs: list[Job]) -> None:
    path = ROOT / plan["results"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # one per runner: two runners may finish runs at once
    tmp.write_text(json.dumps(collect(plan, jobs), indent=1) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", type=Path)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each uses train.cpu_threads)")
    parser.add_argument("--only", nargs="*", help="run only these groups")
    parser.add_argument("--rows", nargs="*", help="run only these rows (the runs a session has time to finish)")
    parser.add_argument("--seeds", nargs="*", type=int, help="run only these seeds")
    parser.add_argument("--rerun", action="store_true",
                        help="run the picked runs again even where the results JSON records them (to get their "
                             "files back, or to check that a run reproduces); their new numbers replace the record's")
    parser.add_argument("--collect", action="store_true", help="only (re)write the results JSON")
    parser.add_argument("--list", action="store_true", help="print each run's state and command")
    parser.add_argument("--table", nargs="+", metavar="KEY",
                        help="print the results JSON's rows (of the --only groups) as a Markdown table of these keys "
                             "(mean +- std): raw.top1, ema.top5, ..., or epochN.top1 for the validation after epoch N")
    parser.add_argument("--per-seed", metavar="KEY", help="with --table: a last column of KEY's value at each seed")
    parser.add_argument("--paired", nargs=2, metavar=("ROW", "BASELINE"),
                        help="with --table: ROW - BASELINE for each key, seed by seed (mean +- std, paired t)")
    args = parser.parse_args(argv)
    plan = load_plan(args.plan)
    if args.table:
        results = with_curves(json.loads((ROOT / plan["results"]).read_text()))
        try:
            print(paired(results, *args.paired, args.table, args.only) if args.paired
                  else table(results, args.table, args.only, args.per_seed))
        except ValueError as error:
            raise SystemExit(f"{plan['results']}: {error}") from None
        return 0
    jobs = [j for j in plan_jobs(plan, args.only)
            if (not args.rows or j.row in args.rows) and (not args.seeds or j.seed in args.seeds)]
    for job in jobs if args.rerun else []:
        job.record = None
    if args.list:
        for job in unique(jobs):
            state = ("done" if job.done else "record" if job.record else "resume" if job.resumable()
                     else "eval" if job.trained else "todo")
            print(f"{state:6s} {job.name:40s} defocus-vlm {' '.join(job.next_command() or job.argv or [])}")
        return 0
    if not args.collect:
        failed = run(jobs, args.jobs, lambda: write_results(plan, plan_jobs(plan)))
        if failed:
            print(f"{failed} run(s) failed; see the logs in {plan['output_root']}", file=sys.stderr)
    write_results(plan, plan_jobs(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
