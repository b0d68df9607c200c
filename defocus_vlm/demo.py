"""The main job end to end, as the CLI commands a user would type (``defocus-vlm demo``).

Two lanes. The chain, on one vision tower and one domain (easy-VQA's images): stage 1 trains a
De-focus ViT classifier on their 24 colour-shape classes; stage 2 aligns that tower with a small text
tower on captions of the same images (CLIP); stage 3 instruction-tunes a VLM (stage 2's tower, frozen,
+ a small Llama) on their questions. The showcase: a De-focus ViT classifier on Fashion-MNIST. Then
each is evaluated (top-1, zero-shot top-1 and retrieval, easy-VQA exact match on the whole test
split), an over-focus picture is drawn, and a final table, naming the checkpoint each stage started
from, is printed and written.

Every step is a ``defocus-vlm`` command line, printed before it runs, so any step can be re-run by
hand. A step whose outputs exist is reused unless ``force``; the table records each step's time.
Its training configs ask for bf16 (DeepSpeed's bf16 mode, float32 master weights) on the CPU as on a GPU,
to fit the demo's time on slower CPUs (README, "Why bf16"); a CPU without native bf16 would rather have
``train.precision: fp32`` in these four configs.

On a CPU machine with at least two cores the lanes run side by side, one core each (every training
config uses ``train.cpu_threads: 1``): the Fashion-MNIST lane in the foreground with its progress
bars, the chain as subprocesses logging to ``out/logs``."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from defocus_vlm.data.classification import FASHION_MNIST_DIR

SOURCE_KEY = "model.vision.source="  # the override that hands a stage the previous stage's tower
OUTPUT_KEY = "train.output_dir="
# the training steps, named once: the final table reads its rows back by these names
FASHION = "Fashion-MNIST classification"
STAGE1 = "stage 1: classification (easy-VQA colour-shape classes)"
STAGE2 = "stage 2: CLIP alignment (easy-VQA captions)"
STAGE3 = "stage 3: instruction tuning (easy-VQA questions)"
VQA_EVAL = "eval: easy-VQA exact match"


@dataclass
class Step:
    name: str
    argv: list[str]  # the defocus-vlm command line
    output: str  # a file the step writes last: its presence means the step is done
    lane: int = 0  # 0: the Fashion-MNIST showcase and its readers; 1: the easy-VQA chain (independent of lane 0)

    def command(self) -> list[str]:
        """``argv``, plus ``--resume`` for a training step interrupted after a checkpoint (the run
        refuses to start over a run directory holding checkpoints)."""
        out = next((a[len(OUTPUT_KEY):] for a in self.argv if a.startswith(OUTPUT_KEY)), None)
        interrupted = self.argv[0] == "train" and out and (Path(out) / "checkpoints" / "latest").is_file()
        return [*self.argv, "--resume"] if interrupted else self.argv

    def source(self) -> str | None:
        """The checkpoint (or preset) this step's tower starts from, when the step names one."""
        return next((a[len(SOURCE_KEY):] for a in self.argv if a.startswith(SOURCE_KEY)), None)


def demo_steps(out: Path, fast: bool = False) -> list[Step]:
    """The pipeline. ``fast``: a few steps per stage (the test suite's smoke run), not the real budget."""
    fm, s1, s2, s3, ev = out / "fashion", out / "stage1", out / "stage2", out / "stage3", out / "eval"
    data = out / "data" / "easy_vqa"
    tiny = ["train.max_steps=2", "data.limit_val=64"] if fast else []
    tiny_vqa = ["train.max_steps=2"] if fast else []
    limit = ["--limit", "64"] if fast else []
    export_limit = ["--limit", "3000"] if fast else []
    return [
        Step(FASHION,
             ["train", "classification", "--config", "demo_fashion", *tiny,
              f"train.output_dir={fm}"], str(fm / "metrics.json")),
        Step("eval: Fashion-MNIST top-1",
             ["eval", "classification", "--model", str(fm / "model"), "--data", FASHION_MNIST_DIR, *limit,
              "--output", str(ev / "fashion_classification.json")], str(ev / "fashion_classification.json")),
        Step("over-focus picture (Fashion-MNIST model)",
             ["analyze", "--model", str(fm / "model"), "--image", "fashion-mnist:0", "--image", "fashion-mnist:1",
              "--output-dir", str(out / "focus")], str(out / "focus" / "metrics.json")),
        Step("data: easy-VQA (LLaVA JSON + colour-shape classes)",
             ["data", "easy-vqa", "--output-dir", str(data), *export_limit], str(data / "test.json"), lane=1),
        Step(STAGE1,
             ["train", "classification", "--config", "easy_vqa_chain", *tiny,
              f"data.path={data / 'classes'}", f"train.output_dir={s1}"], str(s1 / "metrics.json"), lane=1),
        Step(STAGE2,
             ["train", "clip", "--config", "easy_vqa_chain", *tiny,
              f"{SOURCE_KEY}{s1 / 'model'}", f"train.output_dir={s2}"], str(s2 / "metrics.json"), lane=1),
        Step("eval: zero-shot top-1 (24 colour-shape classes)",
             ["eval", "zeroshot", "--model", str(s2 / "model"), "--data", str(data / "classes"),
              "--classnames", "easy-vqa", *limit, "--output", str(ev / "zeroshot.json")],
             str(ev / "zeroshot.json"), lane=1),
        Step(STAGE3,
             ["train", "instruct", "--config", "easy_vqa_chain", *tiny_vqa,
              f"{SOURCE_KEY}{s2 / 'model'}", f"data.train_json={data / 'train.json'}", f"train.output_dir={s3}"],
             str(s3 / "metrics.json"), lane=1),
        Step(VQA_EVAL,
             ["eval", "vqa", "--model", str(s3 / "model"), "--benchmark", "easy-vqa", "--data", str(data / "test.json"),
              *DEMO_VQA_EVAL, *limit, "--output-dir", str(ev / "easy_vqa")], str(ev / "easy_vqa" / "metrics.json"),
             lane=1),
    ]


# Each stage's budget is its config's (configs/*/demo_fashion.yaml, easy_vqa_chain.yaml), chosen so
# the whole demo fits in 15 minutes on 2 CPU cores; README "The demo" gives the measured times.
# The answers are one word (+ end of turn): two new tokens, big batches.
DEMO_VQA_EVAL = ["--max-new-tokens", "2", "--batch-size", "512"]


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _val(metrics: dict) -> dict:
    """The final validation of a training step's ``metrics.json`` (EMA weights where there are some)."""
    val = metrics.get("val", {})
    return val.get("ema") or val.get("raw") or {}


def results_table(out: Path, times: dict[str, float], fast: bool = False) -> list[dict]:
    """Rows of the final table, read back from what the steps wrote; ``from`` is the checkpoint (or
    the preset, for a tower trained from scratch) each stage started from."""
    steps = {s.name: s for s in demo_steps(out, fast)}
    ev = out / "eval"
    fashion, zeroshot = _read(ev / "fashion_classification.json"), _read(ev / "zeroshot.json")
    stage1, stage2 = _val(_read(out / "stage1" / "metrics.json")), _val(_read(out / "stage2" / "metrics.json"))
    vqa = _read(ev / "easy_vqa" / "metrics.json")
    retrieval = [stage2.get("i2t_r1"), stage2.get("t2i_r1")]
    rows = [
        (FASHION, "Fashion-MNIST top-1, 10k test images (%)",
         (fashion.get("ema") or fashion.get("model") or {}).get("top1"), "fashion"),
        (STAGE1, "top-1, 24 classes, test images (%)",
         stage1.get("top1"), "stage1"),
        (STAGE2, "zero-shot top-1, 24 classes (%)", zeroshot.get("top1"),
         "stage2"),
        (STAGE2, "retrieval R@1 image->text / text->image, test split (%)",
         None if None in retrieval else retrieval, "stage2"),
        (STAGE3, "easy-VQA exact match, whole test split (%)",
         vqa.get("accuracy"), "stage3"),
    ]
    table = []
    for step_name, metric, value, folder in rows:
        step = steps[step_name]
        table.append({"stage": step_name, "metric": metric, "value": value, "train_s": _rounded(times.get(step_name)),
                      "from": step.source() or _config_source(step), "model": str(out / folder / "model")})
    return table


def _config_source(step: Step) -> str:
    """The tower a step's config file names (``model.vision.source``) when the command line does not."""
    from defocus_vlm.training.config import load_config

    stage, config = step.argv[1], step.argv[step.argv.index("--config") + 1]
    return load_config(config, [], stage).model.vision.source + " (random init)"


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def format_table(rows: list[dict]) -> str:
    lines = ["| stage | started from | metric | value | training time (s) | model |", "|---|---|---|---|---|---|"]
    for r in rows:
        value = r["value"]
        text = "n/a" if value is None else " / ".join(f"{v:.2f}" for v in value) if isinstance(value, list) \
            else f"{value:.2f}"
        lines.append(f"| {r['stage']} | `{r['from']}` | {r['metric']} | {text} | {r['train_s']} | `{r['model']}` |")
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

    def __init__(self, steps: list[Step], out: Path, force: bool, times: dict[str, float],
                 cpu_times: dict[str, float]):
        self.steps, self.out, self.force, self.times, self.cpu_times = steps, out, force, times, cpu_times
        self.lock = threading.Lock()
        self.state_file = out / "demo_state.json"

    def run_lane(self, lanes: set[int], command: Callable[[int, Step, list[str]], int], cpu_clock: Callable[[], float],
                 prefix: str = "") -> None:
        """cpu_clock: the CPU seconds (user + sys) so far of whatever runs this lane's commands."""
        for i, step in enumerate(self.steps, 1):
            if step.lane not in lanes:
                continue
            argv = step.command()
            line = "defocus-vlm " + " ".join(argv)
            if Path(step.output).is_file() and not self.force:
                print(f"\n{prefix}[{i}/{len(self.steps)}] {step.name}: done before, reused ({step.output})", flush=True)
                continue
            print(f"\n{prefix}[{i}/{len(self.steps)}] {step.name}\n{prefix}$ {line}", flush=True)
            t0, cpu0 = time.time(), cpu_clock()
            code = command(i, step, argv)
            if code:
                raise RuntimeError(f"demo step {step.name!r} failed (exit {code}); command: {line}")
            if not Path(step.output).is_file():
                raise RuntimeError(f"demo step {step.name!r} did not write {step.output}")
            with self.lock:
                self.times[step.name] = time.time() - t0
                self.cpu_times[step.name] = cpu_clock() - cpu0
                self.state_file.write_text(json.dumps({"times": self.times, "cpu_seconds": self.cpu_times},
                                                      indent=2) + "\n")
            if prefix:
                print(f"\n{prefix}[{i}/{len(self.steps)}] {step.name}: done in {time.time() - t0:.0f}s", flush=True)


def run_demo(out: str | Path = "runs/demo", force: bool = False, fast: bool = False,
             run_command: Callable[[list[str]], int] | None = None, jobs: int | None = None,
             background_command: Callable[[list[str], Path], int] | None = None) -> dict:
    """Run (or reuse) every step, then print and write the final table (``out/results.{md,json}``).

    jobs: 2 runs the easy-VQA chain beside the Fashion-MNIST lane, through ``background_command`` (default:
    a subprocess per step, logged to ``out/logs``); 1 runs every step in order through ``run_command``
    (default: the CLI in this process). Default: :func:`default_jobs`."""
    from defocus_vlm.cli import main as cli_main

    run_command = run_command or cli_main
    subprocesses = SubprocessSteps()
    background_command = background_command or subprocesses
    jobs = default_jobs() if jobs is None else jobs
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = _read(out / "demo_state.json") if not force else {}
    times: dict[str, float] = state.get("times", {})
    cpu_times: dict[str, float] = state.get("cpu_seconds", {})
    start = time.time()
    steps = demo_steps(out, fast)
    runner = _Runner(steps, out, force, times, cpu_times)

    def foreground(i: int, step: Step, argv: list[str]) -> int:
        return run_command(argv)

    if jobs < 2:
        runner.run_lane({0, 1}, foreground, _cpu_seconds)
    else:
        logs = out / "logs"
        print(f"two lanes side by side: Fashion-MNIST here, the easy-VQA chain in the background (logs: {logs})",
              flush=True)
        failure: list[BaseException] = []

        def in_background(i: int, step: Step, argv: list[str]) -> int:
            return background_command(argv, logs / f"{i}_{_slug(step.name)}.log")

        def background() -> None:
            try:
                runner.run_lane({1}, in_background, _children_cpu_seconds, prefix="[lane 2] ")
            except BaseException as err:  # re-raised in the caller's thread
                failure.append(err)

        thread = threading.Thread(target=background, name="demo-lane-2")
        thread.start()
        try:
            runner.run_lane({0}, foreground, _cpu_seconds)
        except BaseException:
            subprocesses.stop()  # the table needs both lanes: stop the other one too
            raise
        finally:
            if thread.is_alive():
                print("\nwaiting for the easy-VQA chain to finish ...", flush=True)
            thread.join()
        if failure:
            raise failure[0]
    rows = results_table(out, times, fast)
    table = format_table(rows)
    total = time.time() - start
    (out / "results.md").write_text(table + "\n")
    commands = {step.name: "defocus-vlm " + " ".join(step.argv) for step in steps}
    lane_cpu = {lane: round(sum(cpu_times.get(s.name, 0.0) for s in steps if s.lane == lane), 1) for lane in (0, 1)}
    (out / "results.json").write_text(json.dumps(
        {"rows": rows, "step_seconds": times, "step_cpu_seconds": cpu_times, "lane_cpu_seconds": lane_cpu,
         "this_run_s": round(total, 1), "lanes": jobs, "commands": commands}, indent=2) + "\n")
    print(f"\n{table}\n\nthis run: {total / 60:.1f} min; CPU time per lane: Fashion-MNIST {lane_cpu[0]:.0f} s, "
          f"easy-VQA chain {lane_cpu[1]:.0f} s; step times: " + "; ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    print(f"results: {out / 'results.md'}, {out / 'results.json'}; over-focus figures: {out / 'focus'}")
    print(f"models: AutoModelForImageClassification <- {out / 'fashion' / 'model'}, {out / 'stage1' / 'model'}; "
          f"CLIP <- {out / 'stage2' / 'model'}; AutoModelForImageTextToText <- {out / 'stage3' / 'model'}")
    return {"rows": rows, "times": times, "seconds": total}


def _cpu_seconds() -> float:
    """User + sys CPU time of this process (the foreground lane runs its commands in it)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _children_cpu_seconds() -> float:
    """User + sys CPU time of this process's finished children (the background lane's commands)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _slug(name: str) -> str:
    return "_".join("".join(c if c.isalnum() else " " for c in name.lower()).split())
