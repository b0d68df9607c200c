"""Training-step time of a Fashion-MNIST classification recipe (default: De-focus Mamba tiny,
configs/classification/fashion_defocus_mamba.yaml: batch 128, 28 px, one thread), with each of
the two CPU speed-ups of issue 20 on its own and together:

- the selective scan: the fused C++ op (``fused``) or the reference recurrence (``reference``),
  switched per block of steps inside one process (DEFOCUS_KERNELS is read at every call);
- the allocator: glibc's defaults, or the thresholds ``defocus-vlm`` sets at start-up
  (defocus_vlm.cli.MALLOC_TUNABLES), which only apply to a process started with them: one child
  process per setting and round, the two settings alternating.

A step is forward (cross-entropy + the recipe's pooled auxiliary loss), backward and an AdamW
update on random images; no data loading. Medians over every timed step of every round.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_step.py --rounds 3 --out benchmarks/cpu_train_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCANS = ("reference", "fused")


def child(config: str, steps: int, blocks: int) -> dict:
    """Run in a fresh process: blocks of ``steps`` steps, scan backends alternating."""
    import torch
    from defocus_vlm.training.classification import build_model_config
    from defocus_vlm.training.config import load_config

    from defocus_vlm import DefocusVisionForImageClassification

    cfg = load_config(config, stage="classification")
    torch.set_num_threads(cfg.train.cpu_threads or torch.get_num_threads())
    torch.manual_seed(0)
    model = DefocusVisionForImageClassification(build_model_config(cfg, [str(i) for i in range(10)])).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    d, batch = cfg.data, cfg.train.batch_size
    x = torch.randn(batch, d.in_chans, d.img_size, d.img_size)
    y = torch.randint(0, 10, (batch,))

    def step() -> float:
        start = time.perf_counter()
        loss = model(pixel_values=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) * 1e3

    times: dict[str, list[float]] = {s: [] for s in SCANS}
    for block in range(blocks):
        for scan in SCANS if block % 2 == 0 else SCANS[::-1]:
            os.environ["DEFOCUS_KERNELS"] = f"selective_scan={scan}"
            step()  # the first step after a switch warms that path's allocations
            times[scan] += [step() for _ in range(steps)]
    return {"times_ms": times, "threads": torch.get_num_threads(), "torch": torch.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="fashion_defocus_mamba")
    parser.add_argument("--rounds", type=int, default=3, help="child processes per allocator setting")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per block")
    parser.add_argument("--blocks", type=int, default=2, help="blocks per scan backend and child")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.config, args.steps, args.blocks)))
        return 0
    from defocus_vlm.cli import MALLOC_TUNABLES

    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DEFOCUS_KERNELS")}
    base.setdefault("OMP_NUM_THREADS", "1")
    settings = {"glibc_default": base, "tuned": {**base, "GLIBC_TUNABLES": MALLOC_TUNABLES}}
    samples: dict[tuple[str, str], list[float]] = {(a, s): [] for a in settings for s in SCANS}
    info: dict = {}
    for r in range(args.rounds):
        for alloc in settings if r % 2 == 0 else list(settings)[::-1]:
            cmd = [sys.executable, __file__, "--child", "--config", args.config, "--steps", str(args.steps),
                   "--blocks", str(args.blocks)]
            out = subprocess.run(cmd, env=settings[alloc], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            info = {k: v for k, v in result.items() if k != "times_ms"}
            for scan, ts in result["times_ms"].items():
                samples[(alloc, scan)] += ts
            print(f"round {r + 1} {alloc}: " + ", ".join(
                f"{s} {statistics.median(t):.0f} ms" for s, t in result["times_ms"].items()), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in samples.items()}
    before = med[("glibc_default", "reference")]
    rows = [{"scan": s, "allocator": a, "median_ms": round(med[(a, s)], 1), "steps": len(samples[(a, s)]),
             "speedup_vs_before": round(before / med[(a, s)], 2)} for a in settings for s in SCANS]
    result = {"config": args.config, **info, "omp_num_threads": base["OMP_NUM_THREADS"],
              "malloc_tunables": MALLOC_TUNABLES, "rounds": args.rounds,
              "steps_per_setting": args.steps * args.blocks * args.rounds, "rows": rows,
              "note": "before = reference scan with glibc's default allocator; medians over all timed steps"}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
