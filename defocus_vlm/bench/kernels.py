"""Kernel benchmarks (``defocus-vlm bench kernels``): every usable backend of every op, forward and
forward+backward, the backends of one op and shape interleaved (:func:`.timing.time_interleaved`);
forward+backward differentiates a fixed random cotangent of the output (no loss ops inside the timing).

``scan_softplus`` is the scan with ``delta_softplus=True`` as the mixer calls it (raw Delta a channel-last
view): the fused backend applies the softplus inside the kernel, the others first; ``fused_softplus_first``
is torch's softplus, then the fused scan (what the mixer did before): the two fused rows side by side.

Selective-scan rows also give the bytes the op must move at least (its inputs read once, its
outputs written once: :func:`scan_floor_bytes`), that over the time, and the time that traffic
takes at the triad bandwidth measured in the same run (:func:`triad_bandwidth`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from defocus_vlm.kernels import causal_conv1d, defocus_attention, gated_group_rms_norm, retention, selective_scan
from defocus_vlm.kernels.attention import BACKENDS as ATTENTION_BACKENDS
from defocus_vlm.kernels.causal_conv1d import BACKENDS as CONV_BACKENDS
from defocus_vlm.kernels.gated_norm import BACKENDS as GATE_BACKENDS
from defocus_vlm.kernels.registry import importable, usable
from defocus_vlm.kernels.retention import BACKENDS as RETENTION_BACKENDS
from defocus_vlm.kernels.selective_scan import BACKENDS as SCAN_BACKENDS

from .timing import time_interleaved, triad_bandwidth

WIDTHS = {"small": 384, "base": 768}  # model width; heads of 64, d_inner = 2 * width, d_state 16
SCAN_STATE = 16
GATE_GROUP = 64  # De-focus Mamba's group RMS norm size
OPS = ("attention", "retention", "selective_scan", "scan_softplus", "causal_conv1d", "gated_norm")
SCANS = ("selective_scan", "scan_softplus")
SOFTPLUS_FIRST = "_softplus_first"


def scan_floor_bytes(batch: int, dim: int, length: int, nstate: int, itemsize: int, backward: bool) -> int:
    """Least traffic of one selective scan (no D, z or initial state): forward reads u, delta, B, C
    and writes y and the last state; the backward also reads u, delta, dy, B, C and writes du,
    delta's gradient, dB, dC (A's, (D, N), is negligible)."""
    seq, bc, state = batch * dim * length, batch * nstate * length, batch * dim * nstate
    elements = 3 * seq + 2 * bc + state
    if backward:
        elements += 5 * seq + 4 * bc
    return elements * itemsize


def op_inputs(op: str, width: int, length: int, device: torch.device, dtype: torch.dtype, grad: bool,
            batch: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype).requires_grad_(grad)  # noqa: E731
    heads = width // 64
    if op in ("attention", "retention"):
        q, k, v = r(batch, heads, length, 64), r(batch, heads, length, 64), r(batch, heads, length, 64)
        lam = torch.log(1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float32))).to(device).requires_grad_(grad)
        return q, k, v, lam
    inner = 2 * width
    if op in SCANS:
        u = r(batch, inner, length)
        if op == "selective_scan":  # delta already softplus'd
            delta = (torch.rand(batch, inner, length, generator=g) * 0.1).to(device, dtype).requires_grad_(grad)
        else:  # softplus's input, a channel-last view as the mixer passes it (dt_proj's output)
            delta = (torch.randn(batch, length, inner, generator=g) - 2).to(device, dtype).transpose(1, 2)
            delta.requires_grad_(grad)
        a = (-torch.arange(1, SCAN_STATE + 1, dtype=torch.float32).repeat(inner, 1)).to(device).requires_grad_(grad)
        return u, delta, a, r(batch, SCAN_STATE, length), r(batch, SCAN_STATE, length)
    # the mixer's layouts: u, z are channel-last views of in_proj's output, y is the scan's (B, D, L)
    last = lambda: torch.randn(batch, length, inner, generator=g).to(device, dtype).transpose(1, 2).requires_grad_(
        grad)  # noqa: E731
    if op == "gated_norm":  # y, u, z, D
        return r(batch, inner, length), last(), last(), r(inner)
    return last(), r(inner, 4), r(inner)


def op_calls(op: str, args: tuple[torch.Tensor, ...], device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """Backend name -> zero-argument call; external baselines are named ``baseline:*``."""
    calls: dict[str, Callable[[], torch.Tensor]] = {}
    if op == "attention":
        q, k, v, lam = args
        for name in ATTENTION_BACKENDS:
            calls[name] = lambda n=name: defocus_attention(q, k, v, lam, backend=n)
        calls["baseline:sdpa_causal_no_decay"] = lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True)
    elif op == "retention":
        q, k, v, lam = args
        for name in RETENTION_BACKENDS:
            if name != "reference":
                calls[name] = lambda n=name: retention(q, k, v, lam, backend=n)[0]
        if device.type == "cuda" and importable("fla.ops.retention"):
            from fla.ops.retention import chunk_retention

            calls["baseline:fla_chunk_retention"] = lambda: chunk_retention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))[0]
    elif op == "selective_scan":
        for name in SCAN_BACKENDS:
            calls[name] = lambda n=name: selective_scan(*args, backend=n)
        if device.type == "cuda" and importable("mamba_ssm.ops.selective_scan_interface"):
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

            calls["baseline:mamba_ssm"] = lambda: selective_scan_fn(*args)
    elif op == "scan_softplus":
        u, delta, a, b, c = args
        for name in SCAN_BACKENDS:
            calls[name] = lambda n=name: selective_scan(*args, backend=n, delta_softplus=True)
        calls["fused" + SOFTPLUS_FIRST] = lambda: selective_scan(u, torch.nn.functional.softplus(delta), a, b, c,
                                                                 backend="fused")
    elif op == "gated_norm":
        for name in GATE_BACKENDS:
            calls[name] = lambda n=name: gated_group_rms_norm(*args, GATE_GROUP, backend=n)
    else:
        x, w, b = args
        for name in CONV_BACKENDS:
            calls[name] = lambda n=name: causal_conv1d(x, w, b, backend=n)[0]
    return calls


def parse_shape(text: str) -> tuple[int, int, int]:
    """"BATCH,WIDTH,LENGTH" (model width: d_inner = 2 * width) -> ints."""
    try:
        batch, width, length = (int(v) for v in text.split(","))
    except ValueError as err:
        raise ValueError(f"a shape is BATCH,WIDTH,LENGTH (e.g. 128,64,50), got {text!r}") from err
    if min(batch, width, length) < 1 or width % 64:
        raise ValueError(f"shape {text!r}: positive sizes, width a multiple of 64 (heads of 64)")
    return batch, width, length


def run_kernel_benchmarks(device: str = "cpu", ops: list[str] | None = None, lengths: list[int] | None = None,
                          widths: list[str] | None = None, repeats: int = 3, dtype: str = "float32",
                          max_sequential_length: int | None = None,
                          progress: Callable[[str], None] | None = None,
                          shapes: list[tuple[int, int, int]] | None = None) -> dict:
    """Time every usable backend. Token-by-token loops (the sequential scan reference and the
    recurrent retention) are skipped above ``max_sequential_length`` (default: 1024 on CPU),
    where one fwd+bwd takes minutes; their rows are then absent, not estimated. ``shapes``
    ((batch, width, length) each) replaces the widths x lengths grid (batch 1)."""
    dev = torch.device(device)
    dt = getattr(torch, dtype)
    if max_sequential_length is None:
        max_sequential_length = 1024 if dev.type == "cpu" else 1 << 30
    ops = ops or list(OPS)
    if shapes is None:
        shapes = [(1, WIDTHS[w], length) for w in widths or list(WIDTHS) for length in lengths or [197, 1024, 4096]]
    names = {v: k for k, v in WIDTHS.items()}
    bandwidth = triad_bandwidth() if dev.type == "cpu" and set(SCANS) & set(ops) else None
    rows = []
    for op in ops:
        for batch, width, length in shapes:
            for backward in (False, True):
                args = op_inputs(op, width, length, dev, dt, backward, batch)
                calls = {}
                for name, call in op_calls(op, args, dev).items():
                    if not name.startswith("baseline:") and not usable(op, name.removesuffix(SOFTPLUS_FIRST), dev):
                        continue
                    sequential = (op, name) in (*((scan, "reference") for scan in SCANS), ("retention", "recurrent"))
                    if sequential and length > max_sequential_length:
                        continue
                    calls[name] = call
                mode = "fwd+bwd" if backward else "fwd"
                if progress:
                    progress(f"{op} {', '.join(calls)} batch={batch} width={width} L={length} {mode}")
                results = time_interleaved(calls, backward, dev, repeats, leaves=args if backward else ())
                ref = results.get("reference", results.get("parallel"))
                base = next((v for k, v in results.items() if k.startswith("baseline:")), None)
                for name, (ms, mem) in results.items():
                    row = {
                        "op": op, "backend": name, "batch": batch, "width": names.get(width, str(width)),
                        "length": length, "mode": mode, "ms": round(ms, 3), "mem_mb": round(mem, 2),
                        "speedup_vs_reference": round(ref[0] / ms, 2) if ref else None,
                        "time_ratio_to_baseline": round(ms / base[0], 2) if base else None,
                    }
                    if op in SCANS:
                        moved = scan_floor_bytes(batch, 2 * width, length, SCAN_STATE, args[0].element_size(), backward)
                        row["floor_mb"] = round(moved / 1e6, 3)
                        row["floor_gb_per_s"] = round(moved / ms / 1e6, 2)
                        if bandwidth:
                            row["x_memory_floor"] = round(ms / (moved / bandwidth / 1e6), 1)
                    rows.append(row)
    out = {"device": str(dev), "device_name": _device_name(dev), "dtype": dtype, "torch": torch.__version__,
           "memory": "peak allocated (CUDA)" if dev.type == "cuda" else "bytes saved for backward (CPU)",
           "timing": f"median of {repeats}, backends interleaved; fwd+bwd differentiates a fixed random cotangent",
           "rows": rows}
    if bandwidth:
        out["triad_gb_per_s"] = round(bandwidth, 2)
        out["floor"] = ("floor_mb: least bytes the scan moves (inputs read once, outputs written once); "
                        "floor_gb_per_s = floor_mb / ms; x_memory_floor = ms / (floor_mb at the triad bandwidth)")
    return out


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
