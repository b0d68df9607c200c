"""The main job end to end, as the CLI commands a user would type (``defocus-vlm demo``).

Stage 1 trains a De-focus ViT classifier on Fashion-MNIST; stage 2 aligns a De-focus image tower
with a small text tower on Fashion-MNIST captions (CLIP); stage 3 instruction-tunes a VLM (De-focus
encoder + small Llama) on easy-VQA. Then each is evaluated (classification top-1, zero-shot top-1,
easy-VQA exact match), an over-focus picture is drawn, and a final table is printed and written.

Every step is a ``defocus-vlm`` command line, printed before it runs, so any step can be re-run by
hand. A step whose outputs exist is reused unless ``force``; the table records each step's time.
On a GPU the configs switch to CUDA + bf16 by themselves (``train.precision: auto``).

The steps form two independent lanes: stage 1 (and what reads its model), and stages 2-3. On a
CPU machine with at least two cores they run side by side, one core each (every training config
uses ``train.cpu_threads: 1``): the first lane in the foreground with its progress bars, the second
as subprocesses logging to ``out/logs``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from defocus_vlm.data.classification import FASHION_MNIST_DIR


@dataclass
class Step:
    name: str
    argv: list[str]  # the defocus-vlm command line
    output: str  # a file the step writes last: its presence means the step is done
    lane: int = 0  # 0: stage 1 and its readers; 1: stages 2-3 (independent of lane 0)


def demo_steps(out: Path, fast: bool = False) -> list[Step]:
    """The pipeline. ``fast``: a few steps per stage (the test suite's smoke run), not the real budget."""
    s1, s2, s3, data, ev = out / "stage1", out / "stage2", out / "stage3", out / "data" / "easy_vqa", out / "eval"
    tiny = ["train.max_steps=2", "data.limit_val=64"] if fast else []
    tiny_clip = ["train.max_steps=2", "data.limit_val=64"] if fast else []
    tiny_vqa = ["train.max_steps=2", "data.limit_eval=8"] if fast else []
    limit = ["--limit", "64"] if fast else []
    return [
        Step("stage 1: classification (Fashion-MNIST)",
             ["train", "classification", "--config", "fashion_defocus_vit", *DEMO_STAGE1, *tiny,
              f"train.output_dir={s1}"], str(s1 / "metrics.json")),
        Step("eval: classification top-1",
             ["eval", "classification", "--model", str(s1 / "model"), "--data", FASHION_MNIST_DIR, *limit,
              "--output", str(ev / "classification.json")], str(ev / "classification.json")),
        Step("stage 2: CLIP alignment (Fashion-MNIST captions)",
             ["train", "clip", "--config", "fashion_cpu", *DEMO_STAGE2, *tiny_clip, f"train.output_dir={s2}"],
             str(s2 / "metrics.json"), lane=1),
        Step("eval: zero-shot top-1",
             ["eval", "zeroshot", "--model", str(s2 / "model"), "--data", FASHION_MNIST_DIR,
              "--classnames", "fashion-mnist", *limit, "--output", str(ev / "zeroshot.json")],
             str(ev / "zeroshot.json"), lane=1),
        Step("data: easy-VQA as LLaVA JSON",
             ["data", "easy-vqa", "--output-dir", str(data)], str(data / "test.json"), lane=1),
        Step("stage 3: instruction tuning (easy-VQA)",
             ["train", "instruct", "--config", "easy_vqa_cpu", *DEMO_STAGE3, *tiny_vqa,
              f"data.train_json={data / 'train.json'}", f"data.eval_json={data / 'test.json'}",
              f"train.output_dir={s3}"], str(s3 / "metrics.json"), lane=1),
        Step("eval: easy-VQA exact match",
             ["eval", "vqa", "--model", str(s3 / "model"), "--benchmark", "easy-vqa", *DEMO_VQA_EVAL, *limit,
              "--output-dir", str(ev / "easy_vqa")], str(ev / "easy_vqa" / "metrics.json"), lane=1),
        Step("over-focus picture (stage-1 model)",
             ["analyze", "--model", str(s1 / "model"), "--image", "fashion-mnist:0", "--image", "fashion-mnist:1",
              "--output-dir", str(out / "focus")], str(out / "focus" / "metrics.json")),
    ]


# The real budget of each stage (over the packaged configs), chosen so the whole demo fits in
# 15 minutes on 2 CPU cores; README "make demo" gives the measured times.
DEMO_STAGE1 = ["train.epochs=1", "optim.warmup_epochs=0.1"]
DEMO_STAGE2 = ["train.epochs=1"]
DEMO_STAGE3 = ["train.max_steps=300", "data.limit_eval=200"]
DEMO_VQA_EVAL = ["--limit", "1000", "--max-new-tokens", "4", "--batch-size", "64"]


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def results_table(out: Path, times: dict[str, float]) -> list[dict]:
    """Rows of the final table, read back from what the steps wrote."""
    ev = out / "eval"
    cls, zs = _read(ev / "classification.json"), _read(ev / "zeroshot.json")
    vqa = _read(ev / "easy_vqa" / "metrics.json")
    top1 = (cls.get("ema") or cls.get("model") or {}).get("top1")
    rows = [
        {"stage": "1 classification", "model": str(out / "stage1" / "model"), "metric": "Fashion-MNIST top-1 (%)",
         "value": top1},
        {"stage": "2 CLIP", "model": str(out / "stage2" / "model"), "metric": "Fashion-MNIST zero-shot top-1 (%)",
         "value": zs.get("top1")},
        {"stage": "3 VLM", "model": str(out / "stage3" / "model"), "metric": "easy-VQA exact match (%)",
         "value": vqa.get("accuracy")},
    ]
    for row, key in zip(rows, ("stage 1", "stage 2", "stage 3")):
        row["train_s"] = next((round(v, 1) for k, v in times.items() if k.startswith(key)), None)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| stage | metric | value | training time (s) | model |", "|---|---|---|---|---|"]
    for r in rows:
        value = "n/a" if r["value"] is None else f"{r['value']:.2f}"
        lines.append(f"| {r['stage']} | {r['metric']} | {value} | {r['train_s']} | `{r['model']}` |")
    return "\n".join(lines)


def default_jobs() -> int:
    """2 lanes side by side on a CPU machine with 2+ cores; 1 (in order) on a GPU, which one run fills."""
    import torch

    return 1 if torch.cuda.is_available() or (os.cpu_count() or 1) < 2 else 2


RENDEZVOUS_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class SubprocessSteps:
    """Runs steps as their own ``python -m defocus_vlm.cli`` processes, output to a log file; the
    running one can be stopped from another thread (when the other lane fails or is interrupted)."""

    def __init__(self):
        self.running: subprocess.Popen | None = None
        self.stopped = False

    def __call__(self, argv: list[str], log: Path) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            if self.stopped:
                return -1
            self.running = subprocess.Popen([sys.executable, "-m", "defocus_vlm.cli", *argv], stdout=handle,
                                            stderr=subprocess.STDOUT, env=self.child_env())
            return self.running.wait()

    @staticmethod
    def child_env() -> dict[str, str]:
        """This process's environment without the single-process rendezvous a training step in the
        foreground lane set up (MASTER_PORT etc.): the child would try to listen on the same port."""
        return {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}

    def stop(self) -> None:
        self.stopped = True
        if self.running is not None and self.running.poll() is None:
            self.running.terminate()


class _Runner:
    """Runs the steps of one lane in order and records their times (shared by the lanes)."""

    def __init__(self, steps: list[Step], out: Path, force: bool, times: dict[str, float]):
        self.steps, self.out, self.force, self.times = steps, out, force, times
        self.lock = threading.Lock()
        self.state_file = out / "demo_state.json"

    def run_lane(self, lanes: set[int], command: Callable[[int, Step], int], prefix: str = "") -> None:
        for i, step in enumerate(self.steps, 1):
            if step.lane not in lanes:
                continue
            line = "defocus-vlm " + " ".join(step.argv)
            if Path(step.output).is_file() and not self.force:
                print(f"\n{prefix}[{i}/{len(self.steps)}] {step.name}: done before, reused ({step.output})", flush=True)
                continue
            print(f"\n{prefix}[{i}/{len(self.steps)}] {step.name}\n{prefix}$ {line}", flush=True)
            t0 = time.time()
            code = command(i, step)
            if code:
                raise RuntimeError(f"demo step {step.name!r} failed (exit {code}); command: {line}")
            if not Path(step.output).is_file():
                raise RuntimeError(f"demo step {step.name!r} did not write {step.output}")
            with self.lock:
                self.times[step.name] = time.time() - t0
                self.state_file.write_text(json.dumps({"times": self.times}, indent=2) + "\n")
            if prefix:
                print(f"\n{prefix}[{i}/{len(self.steps)}] {step.name}: done in {time.time() - t0:.0f}s", flush=True)


def run_demo(out: str | Path = "runs/demo", force: bool = False, fast: bool = False,
             run_command: Callable[[list[str]], int] | None = None, jobs: int | None = None,
             background_command: Callable[[list[str], Path], int] | None = None) -> dict:
    """Run (or reuse) every step, then print and write the final table (``out/results.{md,json}``).

    jobs: 2 runs the stage-2/3 lane beside the stage-1 lane, through ``background_command`` (default:
    a subprocess per step, logged to ``out/logs``); 1 runs every step in order through ``run_command``
    (default: the CLI in this process). Default: :func:`default_jobs`."""
    from defocus_vlm.cli import main as cli_main

    run_command = run_command or cli_main
    subprocesses = SubprocessSteps()
    background_command = background_command or subprocesses
    jobs = default_jobs() if jobs is None else jobs
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = _read(out / "demo_state.json").get("times", {}) if not force else {}
    start = time.time()
    steps = demo_steps(out, fast)
    runner = _Runner(steps, out, force, times)

    def foreground(i: int, step: Step) -> int:
        return run_command(step.argv)

    if jobs < 2:
        runner.run_lane({0, 1}, foreground)
    else:
        logs = out / "logs"
        print(f"two lanes side by side: stage 1 here, stages 2-3 in the background (logs: {logs})", flush=True)
        failure: list[BaseException] = []

        def in_background(i: int, step: Step) -> int:
            return background_command(step.argv, logs / f"{i}_{_slug(step.name)}.log")

        def background() -> None:
            try:
                runner.run_lane({1}, in_background, prefix="[lane 2] ")
            except BaseException as err:  # re-raised in the caller's thread
                failure.append(err)

        thread = threading.Thread(target=background, name="demo-lane-2")
        thread.start()
        try:
            runner.run_lane({0}, foreground)
        except BaseException:
            subprocesses.stop()  # the table needs both lanes: stop the other one too
            raise
        finally:
            if thread.is_alive():
                print("\nwaiting for the stages 2-3 lane to finish ...", flush=True)
            thread.join()
        if failure:
            raise failure[0]
    rows = results_table(out, times)
    table = format_table(rows)
    total = time.time() - start
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "step_seconds": times, "this_run_s": round(total, 1),
                                                  "lanes": jobs}, indent=2) + "\n")
    print(f"\n{table}\n\nthis run: {total / 60:.1f} min; step times: "
          + "; ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    print(f"results: {out / 'results.md'}, {out / 'results.json'}; over-focus figures: {out / 'focus'}")
    print(f"models: AutoModelForImageClassification <- {out / 'stage1' / 'model'}, "
          f"AutoModelForImageTextToText <- {out / 'stage3' / 'model'}")
    return {"rows": rows, "times": times, "seconds": total}


def _slug(name: str) -> str:
    return "_".join("".join(c if c.isalnum() else " " for c in name.lower()).split())
