"""Train a model: ``defocus-vlm train classification --config FILE [dotted.key=value ...] [--resume]``.

Runs on a DeepSpeed engine (CPU + gloo, or CUDA + bf16), alone or under ``torchrun`` /
``deepspeed``. The config is a YAML file (a path, or a name under the packaged
configs/<stage>/, e.g. ``tiny_cpu``); ``key=value`` arguments override it
(``train.epochs=10 model.vision.overrides.depth=6``)."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from defocus_vlm.training import STAGES

    parser.add_argument("stage", choices=sorted(STAGES), help="training stage")
    # nargs="+": overrides may follow the file directly (argparse would not match a second run of
    # positionals after an option)
    parser.add_argument(
        "--config",
        required=True,
        nargs="+",
        metavar="FILE [key=value ...]",
        help="YAML run config (path or packaged name), optionally followed by overrides",
    )
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from defocus_vlm.training import get_stage
    from defocus_vlm.training.config import config_to_dict, load_config

    config_file, *more = args.config
    cfg = load_config(config_file, list(args.overrides) + more, stage=args.stage)
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=2))
        return 0
    summary = get_stage(args.stage).run(cfg, resume=args.resume)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2), file=sys.stdout)
    return 0
