"""Device timing: CUDA events around each call (the host clock on CPU), the median of repeats,
warm-up (compilation, autotuning) untimed, and L2 flushed between repeats so that inputs smaller
than the cache are not timed from it. Plus the two ceilings the kernel rows are read against:
device-to-device copy bandwidth and the bf16 matrix-product rate."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

_FLUSH: dict[str, torch.Tensor] = {}
FLUSH_BYTES = 256 * 2**20  # several times the H200's 60 MB L2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flush_l2(device: torch.device) -> None:
    if device.type != "cuda":
        return
    if "buf" not in _FLUSH:
        _FLUSH["buf"] = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    _FLUSH["buf"].zero_()


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
