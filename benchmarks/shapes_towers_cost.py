"""CPU cost of the shapes-VQA tower comparison's steps per tower (benchmarks/plans/shapes_towers.yaml), to
size its budget: per preset, the process CPU time of a stage-1 training step (configs/classification/
shapes_objects.yaml: forward with the auxiliary loss, backward, AdamW; batch 64 of 96 px images) and of the
frozen tower's forward in stage 3 (batch 32, no gradient), on random images, one thread, no data loading.
Process CPU time, not wall time: the machine is shared, and CPU time is what a core-hour budget counts.
Medians of every timed step; the presets take turns, round after round.

    .venv/bin/python benchmarks/shapes_towers_cost.py --rounds 3 --out benchmarks/cpu_shapes_towers_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

PRESETS = ("vit_tiny", "causal_vit_tiny", "defocus_vit_tiny", "defocus_retnet_tiny", "causal_mamba_tiny",
           "defocus_mamba_tiny")


def build(preset: str):
    import torch
    from defocus_vlm.training.classification import build_model_config
    from defocus_vlm.training.config import load_config

    from defocus_vlm import DefocusVisionForImageClassification

    extra = ["model.vision.overrides.group_norm_size=32"] if preset == "defocus_mamba_tiny" else []
    cfg = load_config("shapes_objects", [f"model.vision.source={preset}", *extra], stage="classification")
    model = DefocusVisionForImageClassification(build_model_config(cfg, [str(i) for i in range(40)]))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), cfg.data.img_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per preset and round")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    models = {p: build(p) for p in PRESETS}
    train: dict[str, list[float]] = {p: [] for p in PRESETS}
    frozen: dict[str, list[float]] = {p: [] for p in PRESETS}
    for _ in range(args.rounds):
        for preset, (model, optim, size) in models.items():
            images, labels = torch.randn(64, 3, size, size), torch.randint(0, 40, (64,))
            for step in range(args.steps + 1):  # the first is a warm-up
                start = time.process_time()
                loss = model(pixel_values=images, labels=labels).loss
                loss.backward()
                optim.step()
                optim.zero_grad()
                if step:
                    train[preset].append(time.process_time() - start)
                start = time.process_time()
                with torch.no_grad():
                    model.defocus(pixel_values=images[:32])
                if step:
                    frozen[preset].append(time.process_time() - start)
    rows = [{"preset": p, "stage1_step_cpu_s": round(statistics.median(train[p]), 4),
             "stage3_tower_forward_cpu_s": round(statistics.median(frozen[p]), 4)} for p in PRESETS]
    result = {"what": "process CPU seconds per step, one thread, median", "torch": torch.__version__,
              "rounds": args.rounds, "steps": args.steps, "rows": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
