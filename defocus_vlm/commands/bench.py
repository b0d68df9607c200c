"""Benchmarks with JSON output. ``kernels``: every backend of every op, forward and
forward+backward, at several lengths and widths. ``encoders``: images/s and memory of every
Small preset next to timm's deit_small_patch16_224, plus the streaming step time. ``stream``: the
VLM's time to first token after an image's last patch, streaming prefill vs one shot. ``gpu``: the
prepared GPU check (correctness, kernel speed, training throughput, streaming; one JSON and a
Markdown table; see benchmarks/gpu/README.md), or its CPU dry run with ``--dry-run``. ``train``: img/s of
``train classification``'s step beside a bare PyTorch loop and timm, with the phase split. ``models``: the
model alone, a config and its variants (pieces switched off) beside timm's ViT of the same dims. The benchmarks
themselves live in :mod:`defocus_vlm.bench`, the GPU check in :mod:`defocus_vlm.gpu_check`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from defocus_vlm.cli_options import add_device, add_output_dir, add_output_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    k = sub.add_parser("kernels", help="time each kernel backend")
    add_device(k)
    k.add_argument("--ops", nargs="+", default=None,  # the names of bench.kernels.OPS (importing it loads torch)
                   choices=["attention", "retention", "selective_scan", "scan_softplus", "causal_conv1d", "gated_norm"])
    k.add_argument("--lengths", nargs="+", type=int, default=[197, 1024, 4096])
    k.add_argument("--widths", nargs="+", default=["small", "base"], choices=["small", "base"])
    k.add_argument("--repeats", type=int, default=3)
    k.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    k.add_argument("--max-sequential-length", type=int, default=None,
                   help="skip token-by-token loops above this length (default 1024 on CPU)")
    k.add_argument("--shapes", nargs="+", default=None, metavar="BATCH,WIDTH,LENGTH",
                   help="time these shapes instead of the widths x lengths grid (batch 1), e.g. 128,64,50 "
                        "(the Fashion-MNIST De-focus Mamba: width 64, 49 patches + class token)")
    add_output_file(k)
    e = sub.add_parser("encoders", help="images/s and memory of the Small presets vs timm DeiT-S")
    add_device(e)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--img-size", type=int, default=224)
    e.add_argument("--presets", nargs="+", default=None)
    e.add_argument("--repeats", type=int, default=3)
    e.add_argument("--stream-positions", nargs="+", type=int, default=[16, 4096])
    e.add_argument("--compare-reference", action="store_true",
                   help="also time each forward with DEFOCUS_KERNELS=reference and report the speed-up")
    add_output_file(e)
    s = sub.add_parser("stream", help="VLM time to first token after the last patch: streaming vs one shot")
    add_device(s)
    s.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096], help="patches per (square) image")
    s.add_argument("--chunk-size", type=int, default=256, help="encoder tokens per streamed chunk")
    s.add_argument("--llm", default="tiny-llama",
                   help="tiny-llama | tiny-mamba (random, small) | smollm2-135m-instruct | any LM path or name")
    s.add_argument("--vision-preset", default="defocus_vit_tiny")
    s.add_argument("--vision-depth", type=int, default=4, help="encoder blocks (keeps the CPU default quick)")
    s.add_argument("--repeats", type=int, default=3)
    add_output_file(s)
    g = sub.add_parser("gpu", help="the GPU check: correctness, kernel speed, training img/s, streaming")
    add_output_dir(g, help="folder for gpu_check.json, gpu_check.md and the rows")
    g.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU; CUDA-only rows are skipped")
    g.add_argument("--sections", nargs="+", default=None,
                   help="run only these (env cuda_tests correctness speed training streaming)")
    g.add_argument("--total-seconds", type=float, default=None, help="wall-time budget of the whole check")
    g.add_argument("--repo", default=None, help="the source tree (its tests/); default: where the package lives")
    t = sub.add_parser("train", help="img/s of the training step vs a bare PyTorch loop and timm (phase split)")
    t.add_argument("--config", default="fashion_defocus_vit", help="a classification run config (name or file)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides")
    add_device(t)
    t.add_argument("--steps", type=int, default=5, help="timed steps per contender and round")
    t.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    t.add_argument("--kernels", nargs="+", default=[], metavar="SPEC",
                   help="extra project contenders under DEFOCUS_KERNELS=SPEC (e.g. selective_scan=reference)")
    t.add_argument("--pil", action="store_true", help="extra project contender on the per-image PIL data path")
    add_output_file(t)
    m = sub.add_parser("models", help="the model alone: a config and its variants beside timm's ViT, interleaved")
    m.add_argument("--config", default="fashion_defocus_vit", help="a classification run config (name or file)")
    m.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides (every contender)")
    m.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME [KEY=VALUE | kernels=SPEC]",
                   help="one more contender: the config with these overrides on top (kernels=SPEC: "
                        "DEFOCUS_KERNELS=SPEC around its calls); repeat for more")
    m.add_argument("--no-timm", dest="timm", action="store_false", help="leave out timm's ViT of the same dims")
    m.add_argument("--inference", action="store_true", help="forward only, in eval and inference mode")
    m.add_argument("--batch-size", type=int, default=None, help="default: the config's train.batch_size")
    m.add_argument("--repeats", type=int, default=9, help="interleaved rounds (medians)")
    add_device(m)
    add_output_file(m)


def _emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    if args.what == "gpu":
        return _run_gpu_check(args)
    if args.what == "train":
        return _run_train(args)
    if args.what == "models":
        return _run_models(args)
    from defocus_vlm.inference import resolve_device

    device = str(resolve_device(args.device))
    progress = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if args.what == "kernels":
        from defocus_vlm.bench.kernels import parse_shape, run_kernel_benchmarks

        shapes = [parse_shape(s) for s in args.shapes] if args.shapes else None
        result = run_kernel_benchmarks(device, args.ops, args.lengths, args.widths, args.repeats, args.dtype,
                                       args.max_sequential_length, progress, shapes)
    elif args.what == "stream":
        from defocus_vlm.bench.stream import run_stream_benchmark

        result = run_stream_benchmark(device, args.lengths, args.chunk_size, args.llm, args.vision_preset,
                                      args.vision_depth, repeats=args.repeats, progress=progress)
    else:
        from defocus_vlm.bench.encoders import run_encoder_benchmarks

        result = run_encoder_benchmarks(device, args.batch_size, args.img_size, args.presets, args.repeats,
                                        args.stream_positions, progress, args.compare_reference)
    _emit(result, args.output)
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from defocus_vlm.bench.train import run_train_benchmark, table

    progress = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    result = run_train_benchmark(args.config, args.overrides, args.device, args.steps, args.rounds, args.kernels,
                                 args.pil, progress)
    _emit(result, args.output)
    print(table(result), file=sys.stderr)
    return 0


def _run_models(args: argparse.Namespace) -> int:
    from defocus_vlm.bench.models import run_model_benchmark, table
    from defocus_vlm.inference import resolve_device

    progress = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    result = run_model_benchmark(args.config, args.overrides, args.variant, args.timm, args.inference,
                                 args.batch_size, args.repeats, str(resolve_device(args.device)), progress=progress)
    _emit(result, args.output)
    print(table(result), file=sys.stderr)
    return 0


def _run_gpu_check(args: argparse.Namespace) -> int:
    """Exit 0 when the check ran to its end (its rows say what passed), 1 if a section was stopped."""
    from defocus_vlm.gpu_check.report import markdown
    from defocus_vlm.gpu_check.runner import DEFAULT_TOTAL_SECONDS, run_gpu_check

    total = args.total_seconds if args.total_seconds is not None else DEFAULT_TOTAL_SECONDS
    doc = run_gpu_check(Path(args.output_dir), args.dry_run, args.sections, total, args.repo)
    print(markdown(doc))
    # last, so that a short tail of the output still says what failed
    for row in doc["rows"]:
        if row["status"] == "fail":
            print(f"FAIL {row['section']}: {row['check']}: {row['value']}"
                  + (f" ({row['error'].strip().splitlines()[-1][:200]})" if row["error"] else ""))
    c = doc["summary"]
    print(f"gpu check: {c['pass']} pass, {c['fail']} fail, {c['info']} info, {c['skipped']} skipped in "
          f"{doc['wall_s']:.0f} s; {Path(args.output_dir) / 'gpu_check.json'}")
    return 0 if doc["complete"] and all(s["exit"] == "ok" for s in doc["sections"]) else 1
