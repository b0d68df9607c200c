"""benchmarks/experiments.py, the plan runner: chains of runs (a group's own stage and budget, ``{out:ROW}``
naming another run's directory and waiting for it, evaluations after training, evaluation-only groups),
run with a stand-in for the defocus-vlm CLI that records what it was asked to do."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("experiments", ROOT / "benchmarks" / "experiments.py")
experiments = importlib.util.module_from_spec(spec)
sys.modules["experiments"] = experiments  # dataclasses look their module up
spec.loader.exec_module(experiments)

# Records its command line; `train` writes metrics.json (exit 1 when told to fail), `eval` writes its metrics.
FAKE_CLI = f"""#!{sys.executable}
import json, sys
from pathlib import Path
argv = sys.argv[1:]
with open("calls.txt", "a") as log:
    log.write(" ".join(argv) + "\\n")
if argv[0] == "train":
    if "fail=1" in argv:
        sys.exit(1)
    values = dict(a.split("=", 1) for a in argv if "=" in a)
    out = Path(values["train.output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    seed = int(values["train.seed"])
    (out / "metrics.json").write_text(json.dumps({{"val": {{"raw": {{"top1": 50 + seed}}}}, "steps": 3, "wall_s": 1}}))
else:
    out = Path(argv[argv.index("--output-dir") + 1])
    out.mkdir(parents=True, exist_ok=True)
    metrics = {{"accuracy": 40.0, "samples": 9, "accuracy_by_type": {{"count": {{"accuracy": 30.0, "samples": 3}}}}}}
    (out / "metrics.json").write_text(json.dumps(metrics))
"""

PLAN = {
    "name": "chain", "stage": "instruct", "output_root": "runs/chain", "results": "results/chain.json",
    "common": ["train.cpu_threads=1"],
    "groups": [
        {"name": "stage1", "stage": "classification", "budget": ["train.epochs=2"], "seeds": [0, 1],
         "rows": {"objects-a": {"config": "objects", "set": ["model.vision.source=a"]},
                  "objects-b": {"config": "objects", "set": ["model.vision.source=b", "fail=1"]}}},
        {"name": "towers", "budget": ["train.epochs=1"], "seeds": [0, 1],
         "evals": {"test": [["eval", "vqa", "--split"], "test", "--model", "{out}/model"]},
         "rows": {"a": {"config": "vqa", "set": ["model.vision.source={out:objects-a}/model"]},
                  "b": {"config": "vqa", "set": ["model.vision.source={out:objects-b}/model"]}}},
        {"name": "prior", "stage": "none", "seeds": [0],
         "rows": {"prior": {"evals": {"test": ["eval", "vqa", "--answer-prior", "type"]}}}},
    ],
}


@pytest.fixture
def root(tmp_path, monkeypatch):
    cli = tmp_path / "fake-cli"
    cli.write_text(FAKE_CLI)
    cli.chmod(0o755)
    monkeypatch.setattr(experiments, "ROOT", tmp_path)
    monkeypatch.setattr(experiments, "CLI", str(cli))
    monkeypatch.setattr(experiments, "POLL_S", 0.05)
    return tmp_path


def test_plan_resolves_chains(root):
    jobs = {j.name: j for j in experiments.plan_jobs(PLAN)}
    a1 = jobs["a-seed1"]
    assert a1.argv == ["train", "instruct", "--config", "vqa", "train.cpu_threads=1", "train.epochs=1",
                       "model.vision.source=runs/chain/objects-a-seed1/model", "train.seed=1",
                       "train.output_dir=runs/chain/a-seed1"]
    assert a1.needs == [root / "runs/chain/objects-a-seed1"]
    assert a1.eval_argv("test") == ["eval", "vqa", "--split", "test", "--model", "runs/chain/a-seed1/model",
                                    "--output-dir", "runs/chain/a-seed1/test"]
    assert jobs["objects-a-seed0"].argv[:2] == ["train", "classification"] and "train.epochs=2" in jobs[
        "objects-a-seed0"].argv
    assert jobs["prior-seed0"].argv is None and jobs["prior-seed0"].trained
    assert jobs["prior-seed0"].next_command()[-2:] == ["--output-dir", "runs/chain/prior-seed0/test"]


def test_run_waits_for_needed_runs_and_skips_after_a_failure(root, capsys):
    jobs = experiments.plan_jobs(PLAN)
    finished = []
    failed = experiments.run(jobs, parallel=2, on_finish=lambda: finished.append(1))
    calls = (root / "calls.txt").read_text().splitlines()
    # objects-b fails at both seeds; b waits for it and is skipped, never started
    assert failed == 4 and "SKIPPED b-seed0" in capsys.readouterr().out
    assert not any("objects-b-seed0/model" in c for c in calls)
    for seed in (0, 1):
        train = calls.index(next(c for c in calls if c.endswith(f"train.output_dir=runs/chain/a-seed{seed}")))
        needed = calls.index(next(c for c in calls if c.endswith(f"output_dir=runs/chain/objects-a-seed{seed}")))
        evaluation = calls.index(next(c for c in calls if c.endswith(f"runs/chain/a-seed{seed}/test")))
        assert needed < train < evaluation
    assert {j.name for j in jobs if j.done} == {"objects-a-seed0", "objects-a-seed1", "a-seed0", "a-seed1",
                                                "prior-seed0"}
    results = experiments.collect(PLAN, jobs)
    row = next(r for r in results["rows"] if r["row"] == "a")
    assert row["raw.top1"]["values"] == [50, 51] and row["test.accuracy"]["mean"] == 40.0
    assert row["test.accuracy_by_type.count.accuracy"]["std"] == 0.0
    assert "test.samples" not in row and results["groups"]["stage1"]["stage"] == "classification"
    lines = experiments.table(results, ["raw.top1", "test.accuracy"]).splitlines()
    assert lines[0] == "| row | seeds | raw.top1 | test.accuracy |"
    assert "| a | 2 | 50.50 ± 0.71 | 40.00 ± 0.00 |" in lines and "| objects-a | 2 | 50.50 ± 0.71 | - |" in lines
    assert "| prior | 1 | - | 40.00 |" in lines
    # each value with its seed, as a last column
    assert row["raw.top1"]["seeds"] == [0, 1]
    lines = experiments.table(results, ["raw.top1"], per_seed="raw.top1").splitlines()
    assert lines[0] == "| row | seeds | raw.top1 | raw.top1 per seed |"
    assert "| a | 2 | 50.50 ± 0.71 | s0 50.00, s1 51.00 |" in lines and "| prior | 1 | - | - |" in lines
    # a row name in two groups (a shared baseline): each line names its group; --only picks groups
    shared = {**results, "rows": results["rows"] + [{**results["rows"][0], "group": "ablation"}]}
    lines = experiments.table(shared, ["raw.top1"]).splitlines()
    assert lines[0] == "| group | row | seeds | raw.top1 |" and "| ablation | objects-a | 2 | 50.50 ± 0.71 |" in lines
    assert experiments.table(shared, ["raw.top1"], groups=["towers"]).splitlines() == [
        "| row | seeds | raw.top1 |", "|---|---|---|", "| a | 2 | 50.50 ± 0.71 |"]
    # a second run has nothing left but the failures: the finished runs are not started again
    (root / "calls.txt").unlink()
    assert experiments.run(experiments.plan_jobs(PLAN), parallel=1, on_finish=lambda: None) == 4
    assert all("objects-b" in c for c in (root / "calls.txt").read_text().splitlines())


def test_a_trained_run_only_evaluates(root):
    job = next(j for j in experiments.plan_jobs(PLAN) if j.name == "a-seed0")
    job.out.mkdir(parents=True)
    (job.out / "metrics.json").write_text(json.dumps({"val": {}, "steps": 1, "wall_s": 1}))
    (root / "runs/chain/objects-a-seed0").mkdir(parents=True)
    (root / "runs/chain/objects-a-seed0/metrics.json").write_text("{}")
    assert experiments.run([job], parallel=1, on_finish=lambda: None) == 0
    assert (root / "calls.txt").read_text().split() [:2] == ["eval", "vqa"] and job.done


@pytest.mark.parametrize("plan_file", sorted((ROOT / "benchmarks" / "plans").glob("*.yaml")), ids=lambda p: p.stem)
def test_committed_plans_parse_and_their_configs_load(plan_file):
    """Every run of a committed plan: its commands parse with today's CLI, its config + overrides load,
    and every run it waits for is in the plan."""
    from defocus_vlm.training.config import load_config

    from defocus_vlm.cli import build_parser

    jobs = experiments.plan_jobs(experiments.load_plan(plan_file))
    outs = {j.out for j in jobs}
    parser = build_parser()
    for job in jobs:
        assert set(job.needs) <= outs, job.name
        for argv in ([job.argv] if job.argv else []) + [job.eval_argv(n) for n in job.evals]:
            args = parser.parse_args(argv)
            if args.command == "train":
                config_file, *more = args.config
                load_config(config_file, list(args.overrides) + more, stage=args.stage)


def test_the_results_json_is_the_record_across_machines(root):
    """A fresh machine (no run directories) with the committed results JSON: recorded runs are not run again and
    their numbers stay; a recorded stage-1 run is trained again only because a run still to do needs its files;
    a record whose commands differ from the plan's does not count."""
    experiments.run(experiments.plan_jobs(PLAN), parallel=2, on_finish=lambda: None)
    experiments.write_results(PLAN, experiments.plan_jobs(PLAN))
    record = json.loads((root / "results/chain.json").read_text())
    # another machine: a-seed1's stage-3 run never finished there, a-seed0's record is from an older plan
    record["runs"] = [r for r in record["runs"] if (r["row"], r["seed"]) != ("a", 1)]
    next(r for r in record["runs"] if (r["row"], r["seed"]) == ("a", 0))["command"] += " train.epochs=9"
    (root / "results/chain.json").write_text(json.dumps(record))
    shutil.rmtree(root / "runs")
    (root / "calls.txt").unlink()

    jobs = experiments.plan_jobs(PLAN)
    assert {j.name for j in jobs if j.record} == {"objects-a-seed0", "objects-a-seed1", "prior-seed0"}
    assert experiments.run(jobs, parallel=1, on_finish=lambda: None) == 4  # objects-b and b fail again
    calls = [c.split("output_dir=")[-1] for c in (root / "calls.txt").read_text().splitlines() if "train" in c]
    assert "runs/chain/objects-a-seed0" in calls and "runs/chain/a-seed0" in calls  # a-seed0 needs its tower
    assert "runs/chain/objects-a-seed1" in calls and "runs/chain/a-seed1" in calls
    assert not any("prior" in c for c in (root / "calls.txt").read_text().splitlines())  # recorded, needed by none

    (root / "calls.txt").unlink()
    shutil.rmtree(root / "runs/chain/objects-a-seed0")  # gone again, but nothing still to do needs it now
    jobs = experiments.plan_jobs(PLAN)
    assert experiments.run(jobs, parallel=1, on_finish=lambda: None) == 4
    assert all("objects-b" in c for c in (root / "calls.txt").read_text().splitlines())
    results = experiments.collect(PLAN, jobs)
    prior = next(r for r in results["runs"] if r["row"] == "prior")
    assert prior["done"] and prior["evals"]["test"]["accuracy"] == 40.0  # kept from the record
    objects_a = next(r for r in results["rows"] if r["row"] == "objects-a")
    assert objects_a["raw.top1"]["values"] == [50, 51]  # seed 0 from the record, seed 1 from its files


def test_a_results_json_that_is_not_a_record_is_refused(root):
    (root / "results").mkdir()
    (root / "results/chain.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match=r"results/chain.json: not a results JSON of this runner"):
        experiments.plan_jobs(PLAN)


def test_rows_and_seeds_pick_the_runs(root, capsys):
    import yaml

    plan = root / "chain.yaml"
    plan.write_text(yaml.safe_dump(PLAN))
    assert experiments.main([str(plan), "--list", "--rows", "a", "objects-a", "--seeds", "1"]) == 0
    listed = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    assert listed == [["todo", "objects-a-seed1"], ["todo", "a-seed1"]]


def test_rerun_runs_recorded_runs_again(root, capsys):
    import yaml

    experiments.run(experiments.plan_jobs(PLAN), parallel=2, on_finish=lambda: None)
    experiments.write_results(PLAN, experiments.plan_jobs(PLAN))
    shutil.rmtree(root / "runs")
    plan = root / "chain.yaml"
    plan.write_text(yaml.safe_dump(PLAN))
    capsys.readouterr()
    assert experiments.main([str(plan), "--list", "--rows", "a", "objects-a", "--seeds", "0"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["record", "record"]
    (root / "calls.txt").unlink()
    assert experiments.main([str(plan), "--rows", "a", "objects-a", "--seeds", "0", "--rerun"]) == 0
    calls = (root / "calls.txt").read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["train", "train", "eval"] and "objects-a-seed0" in calls[0]


def test_paired_differences_match_by_seed():
    """--paired: ROW - BASELINE on the seeds both finished (a missing seed drops out, it is not shifted), with the
    mean, std and paired t; seedless values of older results pair by position; an unknown row names the rows."""
    def row(name, seeds, values, group="g"):
        return {"group": group, "row": name, "seeds": len(values),
                "raw.top1": {"mean": 0, "std": 0, "values": values, "seeds": seeds}}

    results = {"plan": "p", "rows": [row("base", [0, 1, 2], [90.0, 91.0, 92.0]),
                                     row("new", [0, 2, 3], [91.0, 92.5, 99.0]),
                                     row("old", None, [90.5, 92.0], group="h")]}
    lines = experiments.paired(results, "new", "base", ["raw.top1", "ema.top1"]).splitlines()
    assert lines[0] == "| new - base | seeds | per seed | mean ± std | paired t |"
    # seeds 0 and 2: +1.0 and +0.5; mean 0.75, std 0.354, t = 0.75 / (0.354 / sqrt 2) = 3.0
    assert lines[2] == "| raw.top1 | 2 | s0 +1.00, s2 +0.50 | +0.75 ± 0.35 | 3.0 |"
    assert lines[3] == "| ema.top1 | 0 |  | - | - |"
    assert experiments.paired(results, "old", "base", ["raw.top1"]).splitlines()[2] == \
        "| raw.top1 | 2 | s0 +0.50, s1 +1.00 | +0.75 ± 0.35 | 3.0 |"
    with pytest.raises(ValueError, match=r"no finished row 'old' to pair \(rows: base, new\)"):
        experiments.paired(results, "old", "base", ["raw.top1"], groups=["g"])


def test_learning_curves_become_epoch_keys():
    """--table epochN.top1: each row's validation after epoch N, mean over the seeds whose run finished (an
    unfinished run's partial curve is left out), beside the final numbers."""
    def run(seed, curve, done=True):
        return {"group": "g", "row": "r", "seed": seed, "done": done,
                "curve": [{"step": 10 * (e + 1), "val": {"epoch": e + 1, "samples": 5, "top1": t}}
                          for e, t in enumerate(curve)]}

    results = {"plan": "p", "rows": [{"group": "g", "row": "r", "seeds": 2,
                                      "raw.top1": {"mean": 91.0, "std": 1.0, "values": [90.0, 92.0],
                                                   "seeds": [0, 1]}}],
               "runs": [run(0, [70.0, 90.0]), run(1, [74.0, 92.0]), run(2, [10.0], done=False)]}
    lines = experiments.table(experiments.with_curves(results), ["epoch1.top1", "epoch2.top1", "raw.top1",
                                                                 "epoch3.top1"]).splitlines()
    assert lines[2] == "| r | 2 | 72.00 ± 2.83 | 91.00 ± 1.41 | 91.00 ± 1.00 | - |"
    assert "epoch1.top1" not in results["rows"][0]  # the record itself is left as it is
    assert set(experiments.with_curves(results)["rows"][0]) == {  # the epoch counter is no metric
        "group", "row", "seeds", "raw.top1", "epoch1.top1", "epoch2.top1"}
