"""Fast kernel backends against their references.

- ``selective_scan`` "triton": the fused Triton kernels, forward and backward, run on CPU in Triton's
  interpreter. TRITON_INTERPRET=1 must be set before the kernel module is imported (``triton.jit``
  reads it when it decorates), and another test may already have imported it in this process, so
  the interpreter run happens once, in a subprocess with that variable set; it prints the errors as
  JSON and the tests below judge them case by case.
- ``defocus_attention`` "flex": on CPU, PyTorch's eager FlexAttention runs forward only, but
  gradients to ``log_decay`` do flow, so the score_mod / masking / offset logic and the decay
  gradient are checked here for real; q/k/v gradients and the compiled kernels need CUDA.
- ``retention`` "fla": fla's kernels are GPU-only, so on CPU the glue (layout, scale, initial state,
  routing of the decay so that it gets a gradient) is checked against a naive simple-GLA written
  here from fla's documented semantics; the real kernels are tested on CUDA when fla is installed.

Tolerances: kernels compute in fp32 and are compared with the float64 reference; errors are
measured as max |kernel - reference| / max |reference| per tensor. Seen on CPU (interpreter):
4e-8..2e-7 forward, 3e-8..3e-7 for gradients, up to 4e-6 for dA under strong decay (it uses
h_t - b_t, which cancels when exp(delta A) is tiny). Bounds: 2e-5 forward, 5e-5 gradients.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

scan_mod = importlib.import_module("defocus_vlm.kernels.selective_scan")
attn_mod = importlib.import_module("defocus_vlm.kernels.attention")
ret_mod = importlib.import_module("defocus_vlm.kernels.retention")

HAS_CUDA = torch.cuda.is_available()
FWD_TOL, GRAD_TOL = 2e-5, 5e-5


def _has(name: str) -> bool:
    from defocus_vlm.kernels.registry import importable

    return importable(name)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ----------------------------------------------------------------------------- selective scan

# name: (batch, dim, nstate, length, has_D, has_z, has_h0, block_t, block_d, block_d_bwd)
# Lengths 13 / 37 are multiples of no block size; several time tiles and channel blocks, a
# partial last block of each, a non-power-of-two state size, and default blocks.
SCAN_CASES = {
    "L13_D_z_h0": (2, 4, 4, 13, True, True, True, 8, None, None),
    "L37_plain_2dblocks": (2, 8, 4, 37, False, False, False, 8, 4, 2),
    "L37_N3_D_h0_partial_dblock": (2, 6, 3, 37, True, False, True, 16, 4, 4),
    "L37_z_default_blocks": (1, 5, 4, 37, False, True, False, 32, None, None),
    "L37_all_strong_decay": (2, 8, 4, 37, True, True, True, 8, 8, 4),
}

_WORKER = r"""
import json, os, sys
assert os.environ.get("TRITON_INTERPRET") == "1"
import torch
import torch.nn.functional as F
from defocus_vlm.kernels.selective_scan import _reference, selective_scan
from defocus_vlm.kernels.selective_scan_triton import selective_scan_triton

cases = json.loads(sys.argv[1])
names = ["u", "delta", "A", "B", "C", "D", "z", "h0"]

def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

out = {}
for name, (b, d, n, l, has_d, has_z, has_h0, bt, bd, bdb) in cases.items():
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    strong = "strong" in name
    delta = F.softplus(r(b, d, l)) * (4.0 if strong else 0.5)
    A = -torch.arange(1, n + 1, dtype=torch.float64).repeat(d, 1) * (4.0 if strong else 0.5)
    A = A * (1 + 0.1 * torch.rand(d, n, generator=g, dtype=torch.float64))
    args = [r(b, d, l), delta, A, r(b, n, l), r(b, n, l),
            r(d) if has_d else None, r(b, d, l) if has_z else None, r(b, d, n) if has_h0 else None]
    ref_in = [a.clone().requires_grad_() if a is not None else None for a in args]
    tri_in = [a.float().clone().requires_grad_() if a is not None else None for a in args]
    y_r, h_r = _reference(*ref_in, 128)
    y_t, h_t = selective_scan_triton(*tri_in, block_t=bt, block_d=bd, block_d_bwd=bdb)
    w_y, w_h = r(*y_r.shape), r(*h_r.shape)  # the last state's gradient is exercised too
    ((y_r * w_y).sum() + (h_r * w_h).sum()).backward()
    ((y_t * w_y.float()).sum() + (h_t * w_h.float()).sum()).backward()
    errs = {"y": rel(y_t, y_r), "last_state": rel(h_t, h_r)}
    for nm, a, t in zip(names, ref_in, tri_in):
        if a is not None:
            errs["d" + nm] = rel(t.grad, a.grad) if t.grad is not None else float("inf")
    grads_ok = all(torch.isfinite(t.grad).all() for t in tri_in if t is not None)
    errs["finite"] = bool(torch.isfinite(y_t).all() and grads_ok)
    out[name] = errs

# through the public op and its dispatcher, bf16 in / bf16 out
g = torch.Generator().manual_seed(7)
u, z = (torch.randn(2, 4, 13, generator=g) for _ in range(2))
delta = F.softplus(torch.randn(2, 4, 13, generator=g))
A = -torch.rand(4, 4, generator=g) - 0.5
B, C = (torch.randn(2, 4, 13, generator=g) for _ in range(2))
D = torch.randn(4, generator=g)
bf = [t.bfloat16() for t in (u, delta)] + [A] + [t.bfloat16() for t in (B, C)] + [D, z.bfloat16()]
y, last = selective_scan(*bf, return_last_state=True, backend="triton")
y_ref, last_ref = _reference(*(t.double() for t in bf), None, 128)
out["dispatch_bf16"] = {"dtype": str(y.dtype), "y": rel(y, y_ref), "last_state": rel(last, last_ref)}
print("RESULTS" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton", reason="triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("DEFOCUS_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER, json.dumps(SCAN_CASES)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter run failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULTS"):])


@pytest.mark.parametrize("case", sorted(SCAN_CASES))
def test_triton_scan_matches_reference_in_interpreter(interpreter_results, case):
    errs = dict(interpreter_results[case])
    assert errs.pop("finite"), f"non-finite values: {errs}"
    has_d, has_z, has_h0 = SCAN_CASES[case][4:7]
    expected = {"y", "last_state", "du", "ddelta", "dA", "dB", "dC"}
    expected |= {"dD"} if has_d else set()
    expected |= {"dz"} if has_z else set()
    expected |= {"dh0"} if has_h0 else set()
    assert set(errs) == expected
    for key, err in errs.items():
        tol = FWD_TOL if key in ("y", "last_state") else GRAD_TOL
        assert err <= tol, f"{case}: {key} relative error {err:.2e} > {tol:.0e} (all: {errs})"


def test_triton_scan_dispatch_bf16_in_interpreter(interpreter_results):
    res = interpreter_results["dispatch_bf16"]
    assert res["dtype"] == "torch.bfloat16"
    assert res["y"] <= 1e-2  # bf16 output rounding (2^-8) on top of an fp32 computation
    assert res["last_state"] <= FWD_TOL  # the state is returned in fp32


def test_triton_scan_registered_and_never_auto_on_cpu():
    assert "triton" in scan_mod.BACKENDS
    u = torch.zeros(1, 2, 3)
    assert scan_mod.OP.auto(u) in ("fused", "reference")  # the CPU choices: never the interpreter


def test_triton_scan_refuses_cpu_outside_interpreter(monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    u = torch.zeros(1, 2, 3)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        scan_mod.selective_scan(u, u, -torch.ones(2, 4), torch.zeros(1, 4, 3), torch.zeros(1, 4, 3),
                                backend="triton")


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (Triton GPU kernels; on CPU see the interpreter tests)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_scan_cuda(dtype):  # pragma: no cover - GPU only
    g = torch.Generator(device="cuda").manual_seed(0)
    b, d, n, length = 2, 96, 16, 301
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    args = [r(b, d, length), torch.nn.functional.softplus(r(b, d, length)) * 0.1,
            -torch.arange(1, n + 1, device="cuda").float().repeat(d, 1), r(b, n, length), r(b, n, length),
            r(d), r(b, d, length), r(b, d, n)]
    ref_in = [a.double().requires_grad_() for a in args]
    low = [a.to(dtype) if i not in (2, 5, 7) else a.clone() for i, a in enumerate(args)]
    tri_in = [a.requires_grad_() for a in low]
    y_r, h_r = scan_mod._reference(*ref_in, 128)
    y_t, h_t = scan_mod.selective_scan(*tri_in, return_last_state=True, backend="triton")
    w = torch.randn_like(y_r)
    (y_r * w).sum().backward()
    (y_t.double() * w).sum().backward()
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    assert _rel(y_t, y_r) <= tol and _rel(h_t, h_r) <= tol
    for a, t in zip(ref_in, tri_in, strict=True):
        assert _rel(t.grad, a.grad) <= (5e-5 if dtype == torch.float32 else 5e-2)


# ----------------------------------------------------------------------------- flex attention

FLEX_CASES = [  # (q_len, k_len, q_offset, causal)
    (13, 13, 0, True),  # training shape: block-sparse causal mask
    (13, 13, 0, False),  # bidirectional decay |t - s|
    (5, 18, 13, True),  # streaming chunk: queries are the keys' suffix, causality in the score_mod
    (1, 9, 8, True),  # one streamed token
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lq, lk, offset, causal", FLEX_CASES)
def test_flex_cpu_forward_and_decay_grad(lq, lk, offset, causal, dtype):
    """Real FlexAttention (eager) on CPU: same output and same d(log_decay) as the reference."""
    g = torch.Generator().manual_seed(lq * 100 + lk)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=dtype) for n in (lq, lk, lk))
    ld_flex = (-torch.rand(3, generator=g, dtype=dtype)).requires_grad_()
    ld_ref = ld_flex.detach().clone().requires_grad_()
    out = attn_mod.defocus_attention(q, k, v, ld_flex, causal, offset, backend="flex")
    ref = attn_mod.defocus_attention(q, k, v, ld_ref, causal, offset, backend="reference")
    w = torch.randn(out.shape, generator=g, dtype=dtype)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert _rel(out, ref) <= tol
    assert _rel(ld_flex.grad, ld_ref.grad) <= tol


def test_flex_cpu_no_decay_matches_sdpa():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 11, 8, generator=g) for _ in range(3))
    out = attn_mod.defocus_attention(q, k, v, None, True, backend="flex")
    ref = attn_mod.defocus_attention(q, k, v, None, True, backend="reference")
    assert _rel(out, ref) <= 1e-5


def test_flex_cpu_refuses_qkv_backward_clearly():
    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    with pytest.raises(NotImplementedError, match="no CPU backward"):
        attn_mod.defocus_attention(q, q.detach(), q.detach(), -torch.ones(1), backend="flex")


def test_flex_auto_rule_on_cpu_is_sdpa():
    q = torch.zeros(1, 1, 2, 4)
    assert "flex" in attn_mod.BACKENDS
    assert attn_mod.OP.auto(q, q, -torch.ones(1)) == "sdpa"
    assert attn_mod.OP.auto(q, q, None) == "sdpa"


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (FlexAttention compiled kernels)")
@pytest.mark.parametrize("lq, lk, offset, causal", FLEX_CASES + [(200, 200, 0, True)])
def test_flex_cuda_forward_backward(lq, lk, offset, causal):  # pragma: no cover - GPU only
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda n: torch.randn(2, 4, n, 64, generator=g, device="cuda")  # noqa: E731
    base = [mk(lq), mk(lk), mk(lk), -torch.rand(4, generator=g, device="cuda")]
    flex_in = [t.clone().requires_grad_() for t in base]
    ref_in = [t.double().requires_grad_() for t in base]
    out = attn_mod.defocus_attention(*flex_in, causal, offset, backend="flex")
    ref = attn_mod.defocus_attention(*ref_in, causal, offset, backend="reference")
    w = torch.randn_like(ref)
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()
    assert _rel(out, ref) <= 1e-3
    for a, b in zip(flex_in, ref_in, strict=True):
        assert a.grad is not None, "a gradient did not reach its input (log_decay included)"
        assert _rel(a.grad, b.grad) <= 5e-3


# ----------------------------------------------------------------------------- fla retention


def _naive_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                      output_final_state=False, cu_seqlens=None):
    """fla's simple-GLA contract, (B, T, H, K) layout, written out as a loop. Like fla, g_gamma
    gets no gradient (detached) while g does."""
    b, t_len, h, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    if g_gamma is not None:
        g = g_gamma.detach()[None, None, :].expand(b, t_len, h)
    state = q.new_zeros(b, h, dk, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    outs = []
    for t in range(t_len):
        state = g[:, t, :, None, None].to(q.dtype).exp() * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * (q[:, t, :, None, :] @ state)[..., 0, :])
    return torch.stack(outs, dim=1), (state if output_final_state else None)


def _naive_head_first(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False,
                      head_first=True):
    """An older fla signature: no g_gamma, layout switch defaulting to (B, H, T, K)."""
    assert head_first is False, "the wrapper must ask for the (B, T, H, K) layout"
    return _naive_simple_gla(q, k, v, g=g, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state)


@pytest.mark.parametrize("fn", [_naive_simple_gla, _naive_head_first], ids=["fla>=0.2", "old_head_first"])
@pytest.mark.parametrize("with_state", [False, True])
def test_fla_glue_on_cpu(fn, with_state):
    """Layout, scale=1.0, initial state and decay-gradient routing of the fla wrapper."""
    g = torch.Generator().manual_seed(3)
    b, h, length, dk, dv = 2, 3, 11, 4, 5
    q, k = (torch.randn(b, h, length, dk, generator=g) * 0.5 for _ in range(2))
    v = torch.randn(b, h, length, dv, generator=g)
    state = torch.randn(b, h, dk, dv, generator=g) if with_state else None
    ld = torch.log(torch.tensor([0.95, 0.8, 0.5]))
    base = [q, k, v, ld] + ([state] if with_state else [])
    glue_in = [t.clone().requires_grad_() for t in base]
    ref_in = [t.clone().requires_grad_() for t in base]
    out, last = ret_mod._fla_call(fn, *glue_in[:4], glue_in[4] if with_state else None)
    ref, ref_last = ret_mod._parallel(*ref_in[:4], ref_in[4] if with_state else None, 64)
    assert out.shape == ref.shape and last.shape == ref_last.shape
    assert _rel(out, ref) <= 1e-5 and _rel(last, ref_last) <= 1e-5
    w, w_last = torch.randn_like(out), torch.randn_like(last)
    ((out * w).sum() + (last * w_last).sum()).backward()
    ((ref * w).sum() + (ref_last * w_last).sum()).backward()
    for name, a, r in zip(["q", "k", "v", "log_decay", "state"], glue_in, ref_in, strict=False):
        assert a.grad is not None, f"no gradient reached {name}"
        assert _rel(a.grad, r.grad) <= 1e-5, name


def test_fla_glue_inference_uses_g_gamma():
    seen = {}

    def spy(q, k, v, g=None, g_gamma=None, **kw):
        seen["g"], seen["g_gamma"] = g, g_gamma
        return _naive_simple_gla(q, k, v, g=g, g_gamma=g_gamma, **kw)

    q = torch.randn(1, 2, 5, 4)
    ld = torch.log(torch.tensor([0.9, 0.7])).requires_grad_()
    with torch.no_grad():
        out, _ = ret_mod._fla_call(spy, q, q, q, ld, None)
    assert seen["g"] is None and seen["g_gamma"] is not None
    assert _rel(out, ret_mod._parallel(q, q, q, ld.detach(), None, 64)[0]) <= 1e-5


def test_fla_auto_rule_never_picks_fla_on_cpu():
    assert "fla" in ret_mod.BACKENDS
    assert ret_mod.OP.auto(torch.zeros(1, 1, 2, 4)) == "parallel"
    assert ret_mod.OP.auto(torch.zeros(1, 1, 2**14, 4)) == "chunkwise"


@pytest.mark.skipif(not (HAS_CUDA and _has("fla.ops.simple_gla")),
                    reason="needs CUDA and fla-core (flash-linear-attention Triton kernels)")
@pytest.mark.parametrize("length", [8, 130])  # recurrent kernel / chunked kernel
@pytest.mark.parametrize("with_state", [False, True])
def test_fla_cuda(length, with_state):  # pragma: no cover - GPU only
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, d = 2, 4, 64
    mk = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    base = [mk(b, h, length, d) * d ** -0.5, mk(b, h, length, d), mk(b, h, length, d),
            torch.log(torch.linspace(0.8, 0.99, h, device="cuda"))]
    if with_state:
        base.append(mk(b, h, d, d))
    fla_in = [t.clone().requires_grad_() for t in base]
    ref_in = [t.double().requires_grad_() for t in base]
    st = (lambda xs: xs[4] if with_state else None)
    out, last = ret_mod.retention(*fla_in[:4], st(fla_in), backend="fla")
    ref, ref_last = ret_mod.retention(*ref_in[:4], st(ref_in), backend="parallel")
    w, w_last = torch.randn_like(ref), torch.randn_like(ref_last)
    ((out.double() * w).sum() + (last.double() * w_last).sum()).backward()
    ((ref * w).sum() + (ref_last * w_last).sum()).backward()
    assert _rel(out, ref) <= 2e-3 and _rel(last, ref_last) <= 2e-3
    for a, r in zip(fla_in, ref_in, strict=True):
        assert a.grad is not None and _rel(a.grad, r.grad) <= 5e-3
