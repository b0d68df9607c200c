"""Section ``speed``: the kernels side by side, bf16, Small and Base widths, lengths 197 / 1024 /
4096, forward and forward+backward, CUDA-event medians (``defocus_vlm.bench.timing.median_ms``).

- attention: De-focus attention with decay (the "flex" backend) against PyTorch SDPA's flash causal
  kernel without decay: the cost of the decay (goal <= 1.3x). The SDPA call with the decay as a dense
  bias is timed too, for reference.
- selective scan: the Triton kernel against the chunked PyTorch scan and transformers' Mamba slow
  path (``mamba_selective_scan``, its pure-PyTorch fallback) on the same tensors; and the Triton
  time against the memory-bound floor (bytes that must move / measured copy bandwidth; goal <= 3x).
- retention: the fla backend against the chunkwise PyTorch form.

Inputs come from the kernel benchmark (defocus_vlm/bench/kernels.py) at a batch that keeps about as many
tokens in flight as a training batch (128 images of 197 tokens)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from defocus_vlm.bench.kernels import WIDTHS, op_calls, op_inputs
from defocus_vlm.bench.timing import copy_bandwidth, median_ms
from defocus_vlm.kernels.registry import usable

from .context import Outcome, SectionContext
from .report import Goal, skipped

LENGTHS, DRY_LENGTHS = (197, 1024, 4096), (16, 40)
DRY_WIDTHS = {"small": 64, "base": 128}  # one and two heads of 64: the dry run's tiny models
TOKENS_PER_BATCH = 128 * 197
ATTENTION_GOAL = Goal("<=", 1.3, "x SDPA flash causal (no decay)")
SCAN_FLOOR_GOAL = Goal("<=", 3.0, "x the memory-bound floor")
RETENTION_GOAL = Goal(">=", 1.0, "x (fla faster)")
# the backends each op compares (names from op_calls), first the one under test
COMPARED = {"attention": ("flex", "baseline:sdpa_causal_no_decay", "sdpa"),
            "selective_scan": ("triton", "chunked", "transformers_slow"),
            "retention": ("fla", "chunkwise")}


def batch_for(length: int, dry: bool) -> int:
    return 1 if dry else max(1, round(TOKENS_PER_BATCH / length))


def _transformers_slow_path(args) -> Callable[[], torch.Tensor] | None:
    try:
        from transformers.models.mamba.modeling_mamba import mamba_selective_scan
    except ImportError:
        return None
    u, delta, a, b, c = args
    return lambda: mamba_selective_scan(u, delta, a, b, c)


def _calls(op: str, args, dev: torch.device) -> dict[str, Callable[[], torch.Tensor] | str]:
    """Name -> call, or -> the reason it cannot run here."""
    available = op_calls(op, args, dev)
    if op == "selective_scan":
        slow = _transformers_slow_path(args)
        available["transformers_slow"] = slow if slow is not None else "this transformers has no mamba_selective_scan"
    out: dict[str, Callable[[], torch.Tensor] | str] = {}
    for name in COMPARED[op]:
        if name not in available:
            out[name] = "not available here"
        elif not name.startswith("baseline:") and name != "transformers_slow" and not usable(op, name, dev):
            out[name] = "no CUDA" if dev.type != "cuda" else "its package is not importable here"
        else:
            out[name] = available[name]
    return out


def _time(call: Callable[[], torch.Tensor], args, backward: bool, dev: torch.device, dry: bool) -> dict:
    leaves = [t for t in args if t.requires_grad]
    repeats = dict(warmup=0, min_repeats=1, target_ms=0.0) if dry else {}  # the dry run proves the path only
    if not backward:
        return median_ms(call, dev, **repeats)
    grad_out = torch.randn_like(call())
    return median_ms(lambda: torch.autograd.backward(call(), grad_out), dev, grads=leaves, **repeats)


def _scan_floor_ms(args, backward: bool, copy_gbps: float) -> tuple[float, int]:
    """The fewest bytes the scan must move: every input read and the output written once; with the
    backward, the inputs read again, the output's gradient read and every input's gradient written."""
    inputs = sum(t.numel() * t.element_size() for t in args)
    output = args[0].numel() * args[0].element_size()
    nbytes = inputs + output if not backward else 3 * inputs + 2 * output
    return nbytes / (copy_gbps * 1e9) * 1e3, nbytes


def _measure(op: str, width: str, length: int, backward: bool, ctx: SectionContext) -> dict:
    args = op_inputs(op, (DRY_WIDTHS if ctx.dry_run else WIDTHS)[width], length, ctx.device, torch.bfloat16,
                   backward, batch=batch_for(length, ctx.dry_run))
    results: dict[str, dict | str] = {}
    for name, call in _calls(op, args, ctx.device).items():
        if isinstance(call, str):
            results[name] = call
        elif ctx.time_left() < 3:
            results[name] = "section time budget spent"
        else:
            try:
                results[name] = _time(call, args, backward, ctx.device, ctx.dry_run)
            except Exception as err:  # noqa: BLE001 - one backend's failure leaves the others' times
                print(f"[gpu-check] speed: {op} {name} failed: {type(err).__name__}: {err}", flush=True)
                results[name] = f"error: {type(err).__name__}: {str(err)[:300]}"
        if ctx.cuda:
            torch.cuda.empty_cache()
    return {"args": args, "times": results, "batch": args[0].shape[0]}


def _ms(results: dict, name: str) -> float | None:
    r = results.get(name)
    return r["ms"] if isinstance(r, dict) else None


def _show(results: dict, name: str) -> str:
    ms = _ms(results, name)
    return f"{ms:.3g} ms" if ms is not None else f"- ({results.get(name)})"


def _attention_row(m: dict, ctx: SectionContext) -> Outcome:
    t = m["times"]
    flex, flash = _ms(t, "flex"), _ms(t, "baseline:sdpa_causal_no_decay")
    ratio = flex / flash if flex is not None and flash else None
    value = (f"{ratio:.2f}x" if ratio is not None else "-") + (
        f" (flex+decay {_show(t, 'flex')}, SDPA flash {_show(t, 'baseline:sdpa_causal_no_decay')}, "
        f"SDPA dense-bias decay {_show(t, 'sdpa')}; batch {m['batch']})")
    return Outcome(value, ctx.judge(ratio, ATTENTION_GOAL), {"ratio": ratio, "batch": m["batch"], "times": t})


def _scan_rows(m: dict, backward: bool, ctx: SectionContext) -> tuple[Outcome, Outcome]:
    t = m["times"]
    tri, chunked, slow = _ms(t, "triton"), _ms(t, "chunked"), _ms(t, "transformers_slow")
    fastest = tri is not None and all(x is None or tri < x for x in (chunked, slow)) and (chunked or slow)
    speedups = ", ".join(f"{x / tri:.3g}x over {n}" for n, x in (("chunked", chunked), ("HF slow", slow))
                         if tri and x)
    value = (f"Triton {_show(t, 'triton')}, chunked {_show(t, 'chunked')}, HF slow {_show(t, 'transformers_slow')}"
             + (f" (Triton speed-up {speedups})" if speedups else "") + f"; batch {m['batch']}")
    side_by_side = Outcome(value, ctx.verdict(bool(fastest)), {"batch": m["batch"], "times": t})

    gbps = ctx.facts.get("copy_gbps") or copy_bandwidth(ctx.device, 2 * 2**30 if ctx.cuda else 64 * 2**20)["gb_per_s"]
    floor, nbytes = _scan_floor_ms(m["args"], backward, gbps)
    ratio = tri / floor if tri is not None else None
    achieved = f" = {nbytes / (tri * 1e-3) / 1e9:.0f} GB/s" if tri else ""
    value = (f"{ratio:.2f}x" if ratio is not None else "-") + (
        f" (Triton {_show(t, 'triton')}{achieved} vs floor {floor:.3g} ms = {nbytes / 1e6:.0f} MB at {gbps:.0f} GB/s)")
    return side_by_side, Outcome(value, ctx.judge(ratio, SCAN_FLOOR_GOAL),
                                 {"ratio": ratio, "floor_ms": floor, "bytes": nbytes, "copy_gb_per_s": gbps})


def _retention_row(m: dict, ctx: SectionContext) -> Outcome:
    t = m["times"]
    fla, chunkwise = _ms(t, "fla"), _ms(t, "chunkwise")
    speedup = chunkwise / fla if fla and chunkwise is not None else None
    value = (f"{speedup:.2f}x" if speedup is not None else "-") + (
        f" (fla {_show(t, 'fla')}, chunkwise {_show(t, 'chunkwise')}; batch {m['batch']})")
    return Outcome(value, ctx.judge(speedup, RETENTION_GOAL), {"speedup": speedup, "batch": m["batch"], "times": t})


def run(ctx: SectionContext) -> None:
    lengths = DRY_LENGTHS if ctx.dry_run else LENGTHS
    # Small before Base, short before long: a budget cut loses the least-used shapes first
    items = [(width, length, op, mode) for width in WIDTHS for length in lengths
             for op in COMPARED for mode in ("fwd", "fwd+bwd")]
    names = {}
    for width, length, op, mode in items:
        key = f"{op} {width} L={length} {mode}"
        if op == "attention":
            names[(width, length, op, mode)] = [(f"{key}: flex with decay / SDPA flash causal", str(ATTENTION_GOAL))]
        elif op == "selective_scan":
            names[(width, length, op, mode)] = [(f"{key}: Triton vs chunked vs transformers slow path",
                                                 "Triton fastest"),
                                                (f"{key}: Triton vs memory-bound floor", str(SCAN_FLOOR_GOAL))]
        else:
            names[(width, length, op, mode)] = [(f"{key}: fla / chunkwise speed-up", str(RETENTION_GOAL))]
    ctx.plan([n for rows in names.values() for n, _ in rows])
    for item in items:
        width, length, op, mode = item
        rows = names[item]
        if ctx.time_left() < (5 if ctx.cuda else 0):
            for name, goal in rows:
                ctx.emit(name, goal, Outcome("-", skipped("section time budget spent")))
            continue
        cache: dict = {}

        def measure(i=item, c=cache) -> dict:
            if "m" not in c:
                c["m"] = _measure(i[2], i[0], i[1], i[3] == "fwd+bwd", ctx)
            return c["m"]

        if op == "attention":
            ctx.check(rows[0][0], rows[0][1], lambda: _attention_row(measure(), ctx))
        elif op == "retention":
            ctx.check(rows[0][0], rows[0][1], lambda: _retention_row(measure(), ctx))
        else:
            pair: dict = {}

            def both(m=measure, p=pair, bwd=mode == "fwd+bwd") -> tuple[Outcome, Outcome]:
                if "rows" not in p:
                    p["rows"] = _scan_rows(m(), bwd, ctx)
                return p["rows"]

            ctx.check(rows[0][0], rows[0][1], lambda: both()[0])
            ctx.check(rows[1][0], rows[1][1], lambda: both()[1])
        cache.clear()
