"""Section ``env``: the device, the packages the check relies on, and the two ceilings (copy
bandwidth, bf16 matrix rate) that the kernel rows are read against."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys

import torch

from defocus_vlm.bench.timing import copy_bandwidth, matmul_rate
from defocus_vlm.kernels.registry import importable

from .context import Outcome, SectionContext
from .report import NO_CUDA, PASS

# import name -> distribution name; the first three are needed for the full check
PACKAGES = {"triton": "triton", "deepspeed": "deepspeed", "fla": "fla-core", "transformers": "transformers",
            "timm": "timm", "mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d"}
REQUIRED = ("triton", "deepspeed", "fla")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit(ctx: SectionContext) -> str | None:
    """The tree's commit; on the device (no .git there) the one prepare_wheels.sh noted in .whl/source.txt."""
    try:
        out = subprocess.run(["git", "-C", str(ctx.repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    noted = ctx.repo / ".whl" / "source.txt"
    return "when the wheels were prepared: " + " / ".join(noted.read_text().split("\n")).strip(" /") \
        if noted.is_file() else None


def _device(ctx: SectionContext) -> Outcome:
    if not ctx.cuda:
        return Outcome(f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", NO_CUDA)
    p = torch.cuda.get_device_properties(0)
    value = (f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
             f"CUDA {torch.version.cuda}")
    return Outcome(value, PASS, {"name": p.name, "capability": [p.major, p.minor],
                                 "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count})


def _packages(ctx: SectionContext) -> Outcome:
    found = {name: _version(dist) if importable(name) else None for name, dist in PACKAGES.items()}
    missing = [name for name in REQUIRED if found[name] is None]
    value = ", ".join(f"{name} {v}" if v else f"{name} absent" for name, v in found.items())
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if ctx.cuda else "cpu (dry run)",
           "git_commit": _git_commit(ctx), **found}
    return Outcome(value, ctx.verdict(not missing), {"environment": env, "missing": missing})


def run(ctx: SectionContext) -> None:
    checks = {
        "device": ("a CUDA GPU", lambda: _device(ctx)),
        "packages": (f"{', '.join(REQUIRED)} importable", lambda: _packages(ctx)),
        "copy bandwidth (device to device, read + write)": (
            "none: the memory-bound ceiling of the scan rows",
            lambda: _ceiling_copy(ctx)),
        "bf16 matrix product": ("none: the arithmetic ceiling", lambda: _ceiling_matmul(ctx)),
    }
    ctx.plan(list(checks))
    for name, (goal, fn) in checks.items():
        ctx.check(name, goal, fn)


def _ceiling_copy(ctx: SectionContext) -> Outcome:
    res = copy_bandwidth(ctx.device, 2 * 2**30 if ctx.cuda else 64 * 2**20)
    return ctx.info(f"{res['gb_per_s']:.0f} GB/s ({res['bytes'] / 2**30:.2f} GiB copied)", res)


def _ceiling_matmul(ctx: SectionContext) -> Outcome:
    res = matmul_rate(ctx.device, 8192 if ctx.cuda else 256, torch.bfloat16)
    return ctx.info(f"{res['tflop_per_s']:.1f} TFLOP/s ({res['n']}^3)", res)
