"""Where De-focus ViT tiny's forward+backward time goes beside timm's ViT of the same dims (Fashion-MNIST
recipe: 28 px, patch 4, width 64, depth 4, 2 heads, batch 128, one thread): the model with its RoPE and
decay, without each, without both, without the auxiliary loss, and timm. Model only (loss + backward, no
optimiser, random images); the six alternate step by step; medians.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vit_tiny_ablation.py --rounds 15 \
        --out benchmarks/cpu_vit_tiny_ablation.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from defocus_vlm.training.classification import build_model_config
from defocus_vlm.training.config import load_config

from defocus_vlm import DefocusVisionForImageClassification
from defocus_vlm.bench.train import timm_vit
from defocus_vlm.commands.bench import _emit

VARIANTS = {"defocus_vit": [], "no_rope": ["model.vision.overrides.rope=none"],
            "no_decay": ["model.vision.overrides.decay=none"],
            "neither": ["model.vision.overrides.rope=none", "model.vision.overrides.decay=none"],
            "no_aux_loss": ["model.aux_loss=none"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    classes = [str(i) for i in range(10)]
    models = {name: DefocusVisionForImageClassification(
        build_model_config(load_config("fashion_defocus_vit", extra), classes)).train()
        for name, extra in VARIANTS.items()}
    models["timm"] = timm_vit(models["defocus_vit"].config, 0.0).train()
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))

    def step(name: str) -> float:
        start = time.perf_counter()
        m = models[name]
        loss = F.cross_entropy(m(x), y) if name == "timm" else m(pixel_values=x, labels=y, drop_path_rate=0.0).loss
        loss.backward()
        return (time.perf_counter() - start) * 1e3

    load = os.getloadavg()[0]
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.rounds + 1):
        for name in models:
            ms = step(name)
            if r:  # the first round warms up
                times[name].append(ms)
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {"rounds": args.rounds, "load_average_1min": [load, os.getloadavg()[0]],
              "median_ms": {k: round(v, 1) for k, v in med.items()},
              "ratio_vs_timm": {k: round(v / med["timm"], 3) for k, v in med.items()}}
    _emit(result, args.out)  # print it, and write it to --out


if __name__ == "__main__":
    main()
