"""ViT-S inference (batch 8, 224 px, no autograd): De-focus ViT-S with the causal decay through SDPA's causal
fast path (kernels/attention.py, the extra q.k dimension) and through the full (L, L) bias (the path before,
forced with KEY_DECAY_MAX = 0), next to the plain causal ViT-S preset and timm's deit_small_patch16_224. The
four alternate call by call; medians. (To move into ``defocus-vlm bench`` with the other benchmarks.)

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vit_small_inference.py --repeats 9 \
        --out benchmarks/cpu_vit_small_inference.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from defocus_vlm.kernels import attention

from defocus_vlm.bench.encoders import build
from defocus_vlm.commands.bench import _emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {name: build(name, 224).eval() for name in
              ("defocus_vit_small", "causal_vit_small", "timm:deit_small_patch16_224")}
    x = torch.randn(args.batch_size, 3, 224, 224)
    limit = attention.KEY_DECAY_MAX
    runs = {"defocus_vit_small": ("defocus_vit_small", limit),
            "defocus_vit_small_bias_path": ("defocus_vit_small", 0.0),
            "causal_vit_small": ("causal_vit_small", limit), "timm_deit_small": ("timm:deit_small_patch16_224", limit)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    load = os.getloadavg()[0]
    with torch.inference_mode():
        for r in range(args.repeats + 1):
            for name, (model, key_limit) in runs.items():
                attention.KEY_DECAY_MAX = key_limit
                start = time.perf_counter()
                models[model](x)
                if r:  # the first round warms up
                    times[name].append((time.perf_counter() - start) * 1e3)
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {"batch": args.batch_size, "img_size": 224, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "load_average_1min": [load, os.getloadavg()[0]], "median_ms": {k: round(v, 1) for k, v in med.items()},
              "ratio_vs_timm": {k: round(v / med["timm_deit_small"], 3) for k, v in med.items()},
              "ratio_vs_causal_vit": {k: round(v / med["causal_vit_small"], 3) for k, v in med.items()}}
    _emit(result, args.out)  # print it, and write it to --out


if __name__ == "__main__":
    main()
