"""List the model presets (name, mixer, width, depth, parameters with a 1000-class head)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def count_parameters(name: str, num_labels: int = 1000) -> int:
    """Parameters of the classification model (class + aux heads), built on the meta device."""
    import torch

    from defocus_vlm import DefocusVisionConfig, DefocusVisionForImageClassification

    with torch.device("meta"):
        model = DefocusVisionForImageClassification(DefocusVisionConfig.from_preset(name, num_labels=num_labels))
    return sum(p.numel() for p in model.parameters())


def run(args: argparse.Namespace) -> int:
    from defocus_vlm.encoders.presets import PRESETS

    rows = []
    for name in sorted(PRESETS):
        cfg = PRESETS[name]
        rows.append({"name": name, "mixer": cfg["mixer"], "embed_dim": cfg["embed_dim"], "depth": cfg["depth"],
                     "params_m": round(count_parameters(name) / 1e6, 2)})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'preset':<22} {'mixer':<7} {'dim':>5} {'depth':>5} {'params (M)':>11}")
        for r in rows:
            print(f"{r['name']:<22} {r['mixer']:<7} {r['embed_dim']:>5} {r['depth']:>5} {r['params_m']:>11.2f}")
    return 0
