"""Sections ``cuda_tests`` and ``correctness``.

``cuda_tests`` runs the test suite's CUDA-only tests with pytest (on CPU they are skipped, which the
dry run checks: the selection must still find them all). ``correctness`` compares every kernel
backend with its float64 reference, forward and backward (every input's gradient), in fp32 and bf16.
Inputs are drawn in float64 and rounded through the kernel's input dtype first, so one float64
reference per case serves both dtypes and measures only the kernel's arithmetic. Error measure, as in
tests/test_triton_kernels.py: max |kernel - reference| / max |reference| per tensor; NaN never passes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from defocus_vlm.kernels import causal_conv1d, defocus_attention, retention, selective_scan
from defocus_vlm.kernels.attention import BACKENDS as ATTENTION_BACKENDS
from defocus_vlm.kernels.causal_conv1d import BACKENDS as CONV_BACKENDS
from defocus_vlm.kernels.registry import usable
from defocus_vlm.kernels.retention import BACKENDS as RETENTION_BACKENDS
from defocus_vlm.kernels.selective_scan import BACKENDS as SCAN_BACKENDS

from .context import Outcome, SectionContext
from .report import FAIL, NO_CUDA, PASS, fmt, skipped

# (outputs, gradients) bounds per kernel dtype. fp32: far below 1e-3 unless TF32 creeps in (the
# suite's CUDA tests use the same bounds); bf16: 8-bit mantissas on the inputs of an fp32 computation.
TOLERANCES = {torch.float32: (1e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}
CUDA_TEST_FILES = ("tests/test_triton_kernels.py",)
CUDA_TEST_KEYWORD = "cuda"
MIN_CUDA_TESTS = 11  # the CUDA-only tests of the suite when this check was written; more is fine


# ----------------------------------------------------------------------------- cuda_tests

class _PytestRows:
    """pytest plugin: the selected tests become the section's plan, each result a row."""

    def __init__(self, ctx: SectionContext):
        self.ctx, self.selected, self.results = ctx, 0, {"passed": 0, "failed": 0, "skipped": 0}

    def pytest_collection_finish(self, session: Any) -> None:
        self.selected = len(session.items)
        self.ctx.plan([f"pytest {item.nodeid}" for item in session.items] + ["CUDA-only tests (pytest)"])

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when != "call" and report.passed:
            return
        name = f"pytest {report.nodeid}" + ("" if report.when != "teardown" else " (teardown)")
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            reason = reason.removeprefix("Skipped: ")
            status, value = (NO_CUDA if not self.ctx.cuda else skipped(reason)), "skipped"
        else:
            status, value = (PASS, "passed") if report.passed else (FAIL, "failed")
        if report.when != "teardown":
            self.results[value] += 1
        error = report.longreprtext[-1500:] if report.failed else None
        self.ctx.emit(name, "passes on CUDA", Outcome(value, status, {"duration_s": round(report.duration, 2)}),
                      error=error, seconds=report.duration)


def run_cuda_tests(ctx: SectionContext) -> None:
    import pytest

    files = [ctx.repo / f for f in CUDA_TEST_FILES]
    goal = f">= {MIN_CUDA_TESTS} selected, all pass"
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        ctx.plan(["CUDA-only tests (pytest)"])
        ctx.emit("CUDA-only tests (pytest)", goal, Outcome("-", FAIL), error=f"test files not found: {missing}")
        return
    rows = _PytestRows(ctx)
    code = pytest.main([*map(str, files), "-k", CUDA_TEST_KEYWORD, "-q", "-p", "no:cacheprovider",
                        "-o", "addopts=", "--rootdir", str(ctx.repo)], plugins=[rows])
    r = rows.results
    value = f"{r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped of {rows.selected} selected"
    enough = rows.selected >= MIN_CUDA_TESTS
    if not ctx.cuda:  # the dry run still proves the selection finds every CUDA-only test
        status = NO_CUDA if enough and r["skipped"] == rows.selected else FAIL
    else:
        status = PASS if enough and r["passed"] == rows.selected else FAIL
    ctx.emit("CUDA-only tests (pytest)", goal, Outcome(value, status, {**r, "selected": rows.selected,
                                                                         "pytest_exit_code": int(code)}))


# ----------------------------------------------------------------------------- correctness

def rel_error(x: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    if x is None or ref is None:
        return math.inf  # a gradient that did not arrive
    x, ref = x.detach().double(), ref.detach().double()
    if x.shape != ref.shape or not torch.isfinite(x).all():
        return math.inf
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@dataclass
class OpSpec:
    """One op: its backends, its cases (name, shape), how to draw float64 inputs, which inputs the
    kernel takes in the low-precision dtype (the rest stay fp32, as in the model), and how to call it."""

    name: str
    backends: dict
    cases: Callable[[bool], list[tuple[str, dict]]]
    make: Callable[[dict, torch.Generator, torch.device], dict[str, torch.Tensor]]
    low_precision: frozenset[str]
    call: Callable[[dict[str, torch.Tensor], dict, str], tuple[torch.Tensor, ...]]
    outputs: tuple[str, ...]


def _randn(g: torch.Generator, device: torch.device, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, device=device, dtype=torch.float64)


def _decays(heads: int, device: torch.device) -> torch.Tensor:
    return torch.log(1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float64, device=device)))


def _attention_inputs(s: dict, g: torch.Generator, dev: torch.device) -> dict[str, torch.Tensor]:
    return {"q": _randn(g, dev, s["b"], s["h"], s["lq"], s["d"]), "k": _randn(g, dev, s["b"], s["h"], s["lk"], s["d"]),
            "v": _randn(g, dev, s["b"], s["h"], s["lk"], s["d"]), "log_decay": _decays(s["h"], dev)}


def _retention_inputs(s: dict, g: torch.Generator, dev: torch.device) -> dict[str, torch.Tensor]:
    shape = (s["b"], s["h"], s["l"], s["d"])
    t = {"q": _randn(g, dev, *shape) * s["d"] ** -0.5, "k": _randn(g, dev, *shape), "v": _randn(g, dev, *shape),
         "log_decay": _decays(s["h"], dev)}
    if s.get("state"):
        t["state"] = _randn(g, dev, s["b"], s["h"], s["d"], s["d"])
    return t


def _scan_inputs(s: dict, g: torch.Generator, dev: torch.device) -> dict[str, torch.Tensor]:
    b, d, n, length = s["b"], s["d"], s["n"], s["l"]
    return {"u": _randn(g, dev, b, d, length), "delta": F.softplus(_randn(g, dev, b, d, length)) * 0.1,
            "A": -torch.arange(1, n + 1, device=dev, dtype=torch.float64).repeat(d, 1),
            "B": _randn(g, dev, b, n, length), "C": _randn(g, dev, b, n, length), "D": _randn(g, dev, d),
            "z": _randn(g, dev, b, d, length), "h0": _randn(g, dev, b, d, n)}


def _conv_inputs(s: dict, g: torch.Generator, dev: torch.device) -> dict[str, torch.Tensor]:
    t = {"x": _randn(g, dev, s["b"], s["d"], s["l"]), "weight": _randn(g, dev, s["d"], 4) * 0.5,
         "bias": _randn(g, dev, s["d"])}
    if s.get("state"):
        t["state"] = _randn(g, dev, s["b"], s["d"], 3)
    return t


def _cases(gpu: list[tuple[str, dict]], dry: list[tuple[str, dict]]) -> Callable[[bool], list[tuple[str, dict]]]:
    return lambda is_dry: dry if is_dry else gpu


# selective scan first: its Triton kernel is the one that has never run on a GPU (a budget cut hits last)
OPS = [
    OpSpec("selective_scan", SCAN_BACKENDS,
           _cases([("L197", dict(b=2, d=256, n=16, l=197)), ("L1031", dict(b=2, d=256, n=16, l=1031))],
                  [("L13", dict(b=1, d=8, n=4, l=13)), ("L37", dict(b=2, d=6, n=3, l=37))]),
           _scan_inputs, frozenset({"u", "delta", "B", "C", "z"}),
           lambda t, s, b: selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"],
                                          initial_state=t["h0"], return_last_state=True, backend=b),
           ("y", "last_state")),
    OpSpec("attention", ATTENTION_BACKENDS,
           # two shapes, two compiled variants (block-sparse mask; causality in the score_mod) per dtype:
           # FlexAttention compiles per variant, and compile time is the budget's largest unknown
           _cases([("L197", dict(b=2, h=6, lq=197, lk=197, off=0, d=64)),
                   ("stream q64 of k1024", dict(b=2, h=6, lq=64, lk=1024, off=960, d=64))],
                  [("L13", dict(b=1, h=2, lq=13, lk=13, off=0, d=8)),
                   ("stream q5 of k18", dict(b=1, h=2, lq=5, lk=18, off=13, d=8))]),
           _attention_inputs, frozenset({"q", "k", "v"}),
           lambda t, s, b: (defocus_attention(t["q"], t["k"], t["v"], t["log_decay"], True, s["off"], backend=b),),
           ("out",)),
    OpSpec("retention", RETENTION_BACKENDS,
           _cases([("L197", dict(b=2, h=6, l=197, d=64)), ("L1031 + state", dict(b=2, h=6, l=1031, d=64, state=True))],
                  [("L13", dict(b=1, h=2, l=13, d=8)), ("L37 + state", dict(b=1, h=2, l=37, d=8, state=True))]),
           _retention_inputs, frozenset({"q", "k", "v", "state"}),
           lambda t, s, b: retention(t["q"], t["k"], t["v"], t["log_decay"], t.get("state"), backend=b),
           ("out", "state")),
    OpSpec("causal_conv1d", CONV_BACKENDS,
           _cases([("L197", dict(b=2, d=512, l=197)), ("L1031 + state", dict(b=2, d=512, l=1031, state=True))],
                  [("L13", dict(b=1, d=8, l=13)), ("L37 + state", dict(b=2, d=6, l=37, state=True))]),
           _conv_inputs, frozenset({"x", "weight", "bias", "state"}),
           lambda t, s, b: causal_conv1d(t["x"], t["weight"], t["bias"], t.get("state"), "silu", backend=b),
           ("y", "state")),
]


def _rounded(inputs: dict[str, torch.Tensor], low_precision: frozenset[str]) -> dict[str, torch.Tensor]:
    """float64 values exactly representable in what the kernel will receive (bf16 or fp32)."""
    return {k: v.to(torch.bfloat16 if k in low_precision else torch.float32).double() for k, v in inputs.items()}


def _run_with_grads(spec: OpSpec, tensors: dict[str, torch.Tensor], shape: dict, backend: str,
                    cotangents: list[torch.Tensor] | None, g: torch.Generator | None = None):
    """Outputs, input gradients and the cotangents used (drawn from ``g`` after the forward if None)."""
    leaves = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    outs = list(spec.call(leaves, shape, backend))
    if cotangents is None:
        cotangents = [_randn(g, o.device, *o.shape) for o in outs]
    pairs = [(o.double(), c) for o, c in zip(outs, cotangents) if o.requires_grad]
    torch.autograd.backward([o for o, _ in pairs], [c for _, c in pairs])
    return [o.detach() for o in outs], {k: v.grad for k, v in leaves.items()}, cotangents


class _References:
    """float64 reference outputs and gradients per (op, case), computed once and shared by every
    backend and dtype (their inputs are the same rounded values)."""

    def __init__(self, device: torch.device, dry: bool):
        self.device, self.dry = device, dry
        self.cache: dict = {}

    def get(self, spec: OpSpec, index: int) -> tuple[str, dict, dict[str, torch.Tensor], list[torch.Tensor],
                                                     list[torch.Tensor], dict[str, torch.Tensor | None]]:
        key = (spec.name, index)
        if key not in self.cache:
            name, shape = spec.cases(self.dry)[index]
            g = torch.Generator(device=self.device).manual_seed(1000 * index + len(spec.name))
            inputs = _rounded(spec.make(shape, g, self.device), spec.low_precision)
            outs, grads, cotangents = _run_with_grads(spec, inputs, shape, "reference", None, g)
            self.cache[key] = (name, shape, inputs, cotangents, outs, grads)
        return self.cache[key]


def _compare(spec: OpSpec, backend: str, dtype: torch.dtype, refs: _References) -> dict[str, dict[str, float]]:
    """Per case: relative error of each output and each input's gradient."""
    errors = {}
    for index in range(len(spec.cases(refs.dry))):
        name, shape, inputs, cotangents, ref_outs, ref_grads = refs.get(spec, index)
        kernel_in = {k: v.to(dtype if k in spec.low_precision else torch.float32) for k, v in inputs.items()}
        outs, grads, _ = _run_with_grads(spec, kernel_in, shape, backend, cotangents)
        errs = {out_name: rel_error(o, r) for out_name, o, r in zip(spec.outputs, outs, ref_outs)}
        errs |= {f"d{k}": rel_error(grads[k], ref_grads[k]) for k in inputs}
        errors[name] = errs
    return errors


def _summarise(errors: dict[str, dict[str, float]], outputs: tuple[str, ...], dtype: torch.dtype,
               ctx: SectionContext) -> Outcome:
    tol_out, tol_grad = TOLERANCES[dtype]
    worst = {"out": (0.0, ""), "grad": (0.0, "")}
    ok = True
    for case, errs in errors.items():
        for tensor, err in errs.items():
            kind = "out" if tensor in outputs else "grad"
            bound = tol_out if kind == "out" else tol_grad
            ok &= err <= bound  # inf and NaN fail
            if not err <= worst[kind][0]:
                worst[kind] = (err, f"{tensor}, {case}")
    value = (f"out {fmt(worst['out'][0])} ({worst['out'][1]}), grad {fmt(worst['grad'][0])} "
             f"({worst['grad'][1]})")
    return Outcome(value, ctx.verdict(ok, gpu_goal=False), {"errors": errors})


def run_backends(ctx: SectionContext) -> None:
    refs = _References(ctx.device, ctx.dry_run)
    plan = []
    for spec in OPS:
        for backend in spec.backends:
            if backend == "reference":
                continue
            for dtype in (torch.float32, torch.bfloat16):
                plan.append((spec, backend, dtype))
    ctx.plan([_name(s, b, d) for s, b, d in plan])
    for spec, backend, dtype in plan:
        tol_out, tol_grad = TOLERANCES[dtype]
        goal = f"out <= {tol_out:g}, grads <= {tol_grad:g} (max rel. error vs float64)"
        if not usable(spec.name, backend, ctx.device) and not _is_alias(spec, backend):
            ctx.emit(_name(spec, backend, dtype), goal,
                     Outcome("-", NO_CUDA if not ctx.cuda else skipped("its package is not importable here")))
            continue
        ctx.check(_name(spec, backend, dtype), goal,
                  lambda s=spec, b=backend, d=dtype: _summarise(_compare(s, b, d, refs), s.outputs, d, ctx),
                  min_seconds=2.0 if ctx.cuda else 0.0)


def _is_alias(spec: OpSpec, backend: str) -> bool:
    """causal_conv1d's "torch" backend is its reference function, usable everywhere."""
    return spec.backends.get(backend) is spec.backends.get("reference")


def _name(spec: OpSpec, backend: str, dtype: torch.dtype) -> str:
    return f"{spec.name} / {backend} / {str(dtype).removeprefix('torch.')}"


def repo_root_default() -> Path:
    """The source tree (the package's files resolve into it through run.sh's links)."""
    return Path(__file__).resolve().parents[2]
