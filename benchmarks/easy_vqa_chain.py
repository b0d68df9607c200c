"""What each stage of the demo's chain adds (README "The demo"): the demo's stage 3 (its config and
budget, same data) from three towers: a random one (the stage-1 architecture, untrained), stage 1's
classifier, and stage 2's CLIP tower (the demo's own stage 3, reused). Each is scored like the demo's,
on the whole easy-VQA test split.

Usage: .venv/bin/python benchmarks/easy_vqa_chain.py [DEMO_OUTPUT_DIR]   (default runs/demo)
It needs a finished ``defocus-vlm demo`` in that folder and writes DIR/chain/. Resumable: a finished
row is skipped, an interrupted training run continues from its checkpoint (``--resume``), an
interrupted evaluation from its predictions. Each step is printed as its command line; the process
CPU time of each training run is recorded beside its wall time."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from defocus_vlm.cli import main as cli_main
from defocus_vlm.demo import SOURCE_KEY, STAGE3, VQA_EVAL, demo_steps


def random_tower() -> list[str]:
    """Stage 1's tower as its config declares it (configs/classification/easy_vqa_chain.yaml), untrained."""
    from defocus_vlm.training.config import load_config

    stage1 = load_config("easy_vqa_chain", stage="classification")
    dims = {**stage1.model.vision.overrides, "img_size": stage1.data.img_size}
    return [f"{SOURCE_KEY}{stage1.model.vision.source}", *(f"model.vision.overrides.{k}={v}" for k, v in dims.items())]


def swap(argv: list[str], old: str, new: str) -> list[str]:
    return [a.replace(old, new) for a in argv]


def main(demo: Path) -> dict:
    steps = {s.name: s for s in demo_steps(demo)}
    train, evaluate = steps[STAGE3], steps[VQA_EVAL]
    own_tower = train.source()
    towers = {"random": random_tower(), "stage 1": [f"{SOURCE_KEY}{demo / 'stage1' / 'model'}"],
              "stage 2": [f"{SOURCE_KEY}{own_tower}"]}
    out = demo / "chain"
    results = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    for row, tower in towers.items():
        if row == "stage 2":  # the demo's own stage 3 and its evaluation
            run, scored = demo / "stage3", Path(evaluate.output).parent
        else:
            run, scored = out / row.replace(" ", ""), out / row.replace(" ", "") / "eval"
        argv = [a for a in train.argv if not a.startswith(SOURCE_KEY)] + tower
        argv = swap(argv, f"train.output_dir={demo / 'stage3'}", f"train.output_dir={run}")
        if not (run / "metrics.json").is_file():
            resume = ["--resume"] if (run / "checkpoints" / "latest").exists() else []
            results[row] = {"train": timed([*argv, "train.progress=false", *resume])}
        if not (scored / "metrics.json").is_file():
            timed(swap(swap(evaluate.argv, str(demo / "stage3" / "model"), str(run / "model")),
                       str(Path(evaluate.output).parent), str(scored)))
        results.setdefault(row, {})["exact_match"] = json.loads((scored / "metrics.json").read_text())["accuracy"]
        results[row]["tower"] = tower[0][len(SOURCE_KEY):]
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


def timed(argv: list[str]) -> dict:
    """Run one CLI step in this process; its wall time and this process's CPU time (user + sys) for it."""
    print("$ defocus-vlm " + " ".join(argv), flush=True)
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    if cli_main(argv):
        raise SystemExit(f"failed: defocus-vlm {' '.join(argv)}")
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall_s": round(time.time() - t0, 1), "cpu_s": round(cpu, 1)}


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
