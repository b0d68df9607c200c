"""Timing shared by every benchmark and the GPU check.

- :func:`time_interleaved`: the benchmark timer. Several calls run round-robin (repeat r of each before
  repeat r + 1 of any) and report medians, so load on a shared machine hits them alike; memory is the
  CUDA peak, or on the CPU (no peak counter) the bytes autograd saves for backward.
- :func:`median_ms`: the GPU check's timer. CUDA events around each call (the host clock on the CPU),
  warm-up (compilation, autotuning) untimed, L2 flushed between repeats so that inputs smaller than
  the cache are not timed from it, and a repeat count that fits a time budget.
- The ceilings rows are read against: CPU triad bandwidth, device copy bandwidth, bf16 matmul rate.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence

import torch

FLUSH_BYTES = 256 * 2**20  # several times the H200's 60 MB L2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SavedBytes:
    """Sum of tensor bytes autograd keeps for backward (a CPU stand-in for peak memory)."""

    def __init__(self) -> None:
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.total += t.numel() * t.element_size()
        return t

    def __enter__(self) -> SavedBytes:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def time_interleaved(calls: dict[str, Callable[[], torch.Tensor]], backward: bool, device: torch.device,
                     repeats: int, leaves: tuple = (), warmup: int = 1) -> dict[str, tuple[float, float]]:
    """Median milliseconds and memory in MB of each call (and its backward when asked), the calls
    run round-robin. The backward differentiates one fixed random cotangent; the leaves' grads are
    cleared before every run (outside the timing) so no accumulation is timed."""
    cotangent: dict[tuple, torch.Tensor] = {}

    def once(fn: Callable[[], torch.Tensor]) -> tuple[float, float]:
        for t in leaves:
            t.grad = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        start = time.perf_counter()
        with SavedBytes() as saved:
            out = fn()
            if backward:
                key = (tuple(out.shape), out.dtype)
                if key not in cotangent:
                    g = torch.Generator(device="cpu").manual_seed(1)
                    cotangent[key] = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
                out.backward(cotangent[key])
        sync(device)
        ms = (time.perf_counter() - start) * 1e3
        mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else saved.total / 2**20
        return ms, mem

    for _ in range(warmup):
        for fn in calls.values():
            once(fn)
    times: dict[str, list[float]] = {name: [] for name in calls}
    mem: dict[str, float] = {}
    for _ in range(repeats):
        for name, fn in calls.items():
            ms, mem[name] = once(fn)
            times[name].append(ms)
    return {name: (statistics.median(times[name]), mem[name]) for name in calls}


def time_call(fn: Callable[[], torch.Tensor], backward: bool, device: torch.device, repeats: int,
              warmup: int = 1) -> tuple[float, float]:
    """Median milliseconds and memory in MB of one call (and its backward when asked)."""
    return time_interleaved({"call": fn}, backward, device, repeats, warmup=warmup)["call"]


def triad_bandwidth(n: int = 1 << 24, repeats: int = 10) -> float:
    """STREAM triad a = b + s * c on float32 arrays far beyond the caches, with torch's current
    threads: best-of GB/s, counting 12 bytes per element (two reads, one write) as STREAM does."""
    b, c, a = torch.rand(n), torch.rand(n), torch.empty(n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best = min(best, time.perf_counter() - start)
    return 12 * n / best / 1e9


@functools.lru_cache(maxsize=1)
def _flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)


def _flush_l2(device: torch.device) -> None:
    if device.type == "cuda":
        _flush_buffer(device).zero_()


def median_ms(fn: Callable[[], object], device: torch.device, grads: Sequence[torch.Tensor] = (),
              warmup: int = 1, min_repeats: int = 3, max_repeats: int = 30, target_ms: float = 250.0) -> dict:
    """Median milliseconds of ``fn()``. ``grads``: tensors whose ``.grad`` is cleared before each call
    (so a backward never adds into last call's gradient). The repeat count fits ``target_ms`` of work."""

    def clear() -> None:
        for t in grads:
            t.grad = None

    for _ in range(warmup):
        clear()
        fn()
    sync(device)
    clear()
    start = time.perf_counter()
    fn()
    sync(device)
    estimate = (time.perf_counter() - start) * 1e3
    repeats = max(min_repeats, min(max_repeats, int(target_ms / max(estimate, 1e-3))))
    times: list[float] = []
    events = []
    for _ in range(repeats):
        clear()
        _flush_l2(device)
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            events.append((begin, end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    sync(device)
    times += [b.elapsed_time(e) for b, e in events]
    return {"ms": statistics.median(times), "min_ms": min(times), "repeats": repeats}


def copy_bandwidth(device: torch.device, nbytes: int) -> dict:
    """Device-to-device copy: bytes read plus bytes written over the median time (GB/s)."""
    src = torch.randint(0, 2**30, (nbytes // 4,), dtype=torch.int32, device=device)
    dst = torch.empty_like(src)
    timing = median_ms(lambda: dst.copy_(src), device, warmup=2, min_repeats=10)
    return {"gb_per_s": 2 * src.nbytes / (timing["ms"] * 1e-3) / 1e9, "bytes": src.nbytes, **timing}


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype) -> dict:
    """n x n x n products on random data (never zeros: they run faster than real data), TFLOP/s."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    timing = median_ms(lambda: a @ b, device, warmup=3, min_repeats=10)
    return {"tflop_per_s": 2 * n**3 / (timing["ms"] * 1e-3) / 1e12, "n": n, "dtype": str(dtype), **timing}
