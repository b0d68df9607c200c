"""Kernel benchmarks: every available backend of every op, forward and forward+backward.

Memory: on CUDA the peak allocated memory; on CPU (no peak counter exists) the bytes that
autograd saves for the backward pass, which is what grows with sequence length.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .attention import BACKENDS as ATTENTION_BACKENDS
from .attention import defocus_attention
from .causal_conv1d import BACKENDS as CONV_BACKENDS
from .causal_conv1d import causal_conv1d
from .registry import importable
from .retention import BACKENDS as RETENTION_BACKENDS
from .retention import retention
from .selective_scan import BACKENDS as SCAN_BACKENDS
from .selective_scan import selective_scan

WIDTHS = {"small": 384, "base": 768}  # model width; heads of 64, d_inner = 2 * width, d_state 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _SavedBytes:
    """Sum of tensor bytes autograd keeps for backward (a CPU stand-in for peak memory)."""

    def __init__(self) -> None:
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.total += t.numel() * t.element_size()
        return t

    def __enter__(self) -> _SavedBytes:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def time_call(fn: Callable[[], torch.Tensor], backward: bool, device: torch.device, repeats: int,
              warmup: int = 1) -> tuple[float, float]:
    """Median milliseconds and memory in MB of ``fn`` (and its backward when asked)."""

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with _SavedBytes() as saved:
            out = fn()
            if backward:
                out.float().square().mean().backward()
        _sync(device)
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return saved.total / 2**20

    for _ in range(warmup):
        once()
    times, mem = [], 0.0
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        mem = once()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), mem


def _inputs(op: str, width: int, length: int, device: torch.device, dtype: torch.dtype, grad: bool,
            batch: int = 1):
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype).requires_grad_(grad)  # noqa: E731
    heads = width // 64
    if op in ("attention", "retention"):
        q, k, v = r(batch, heads, length, 64), r(batch, heads, length, 64), r(batch, heads, length, 64)
        lam = torch.log(1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float32))).to(device).requires_grad_(grad)
        return q, k, v, lam
    inner = 2 * width
    if op == "selective_scan":
        u = r(batch, inner, length)
        delta = (torch.rand(batch, inner, length, generator=g) * 0.1).to(device, dtype).requires_grad_(grad)
        a = (-torch.arange(1, 17, dtype=torch.float32).repeat(inner, 1)).to(device).requires_grad_(grad)
        return u, delta, a, r(batch, 16, length), r(batch, 16, length)
    return r(batch, inner, length), r(inner, 4), r(inner)


def _op_calls(op: str, args, device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
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
    else:
        x, w, b = args
        for name in CONV_BACKENDS:
            calls[name] = lambda n=name: causal_conv1d(x, w, b, backend=n)[0]
    return calls


def _usable(op: str, name: str, device: torch.device) -> bool:
    needs = {"mamba_ssm": "mamba_ssm.ops.selective_scan_interface", "causal_conv1d": "causal_conv1d",
             "fla": "fla.ops.simple_gla", "triton": "triton", "flex": "torch.nn.attention.flex_attention"}
    if name in needs:
        return device.type == "cuda" and importable(needs[name])
    return name != "torch" or op != "causal_conv1d"  # "torch" is an alias of the reference there


def run_kernel_benchmarks(device: str = "cpu", ops: list[str] | None = None, lengths: list[int] | None = None,
                          widths: list[str] | None = None, repeats: int = 3, dtype: str = "float32",
                          max_sequential_length: int | None = None,
                          progress: Callable[[str], None] | None = None) -> dict:
    """Time every usable backend. Token-by-token loops (the sequential scan reference and the
    recurrent retention) are skipped above ``max_sequential_length`` (default: 1024 on CPU),
    where one fwd+bwd takes minutes; their rows are then absent, not estimated."""
    dev = torch.device(device)
    dt = getattr(torch, dtype)
    if max_sequential_length is None:
        max_sequential_length = 1024 if dev.type == "cpu" else 1 << 30
    ops = ops or ["attention", "retention", "selective_scan", "causal_conv1d"]
    rows = []
    for op in ops:
        for width_name in widths or list(WIDTHS):
            for length in lengths or [197, 1024, 4096]:
                for backward in (False, True):
                    args = _inputs(op, WIDTHS[width_name], length, dev, dt, backward)
                    results = {}
                    for name, call in _op_calls(op, args, dev).items():
                        if not name.startswith("baseline:") and not _usable(op, name, dev):
                            continue
                        sequential = (op, name) in (("selective_scan", "reference"), ("retention", "recurrent"))
                        if sequential and length > max_sequential_length:
                            continue
                        if progress:
                            progress(f"{op} {name} {width_name} L={length} {'fwd+bwd' if backward else 'fwd'}")
                        for t in args:
                            t.grad = None
                        ms, mem = time_call(call, backward, dev, repeats)
                        results[name] = (ms, mem)
                    ref = results.get("reference", results.get("parallel"))
                    base = next((v for k, v in results.items() if k.startswith("baseline:")), None)
                    for name, (ms, mem) in results.items():
                        rows.append({
                            "op": op, "backend": name, "width": width_name, "length": length,
                            "mode": "fwd+bwd" if backward else "fwd", "ms": round(ms, 3), "mem_mb": round(mem, 2),
                            "speedup_vs_reference": round(ref[0] / ms, 2) if ref else None,
                            "time_ratio_to_baseline": round(ms / base[0], 2) if base else None,
                        })
    return {"device": str(dev), "device_name": _device_name(dev), "dtype": dtype, "torch": torch.__version__,
            "memory": "peak allocated (CUDA)" if dev.type == "cuda" else "bytes saved for backward (CPU)",
            "rows": rows}


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
