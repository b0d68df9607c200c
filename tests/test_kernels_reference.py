"""Kernels: every CPU backend against its reference (float64, forward and backward), hand-worked
cases for the references themselves, numerical stability, bf16, RoPE, backend dispatch and
streaming (split runs with a carried state)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_norm
from defocus_vlm.kernels import (
    apply_rope,
    causal_conv1d,
    defocus_attention,
    gated_group_rms_norm,
    retention,
    rope_angles,
    selective_scan,
)
from defocus_vlm.kernels.attention import decay_bias
from defocus_vlm.kernels.dispatch import BY_ARGUMENT, BY_ENV, BY_RULE, ENV_VAR, record_choices

F64 = torch.float64
# float64 parity: the backends re-associate sums (chunking, cumsum rescaling), nothing more.
TOL64 = dict(rtol=1e-9, atol=1e-11)

ATTN = importlib.import_module("defocus_vlm.kernels.attention")
RET = importlib.import_module("defocus_vlm.kernels.retention")
SCAN = importlib.import_module("defocus_vlm.kernels.selective_scan")
CONV = importlib.import_module("defocus_vlm.kernels.causal_conv1d")
GATE = importlib.import_module("defocus_vlm.kernels.gated_norm")


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def value_and_grads(fn, inputs: dict[str, torch.Tensor], seed: int = 123):
    """Run ``fn(**inputs)`` (a tensor or tuple of tensors) and differentiate a random linear
    functional of all outputs with respect to every input."""
    leaves = {k: leaf(v) for k, v in inputs.items()}
    outs = fn(**leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=F64).to(o.dtype)).sum() for o in outs)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [o.detach() for o in outs], dict(zip(leaves, grads, strict=True))


def assert_same(fn_a, fn_b, inputs, may_be_zero=(), **tol):
    """Outputs and gradients of ``fn_a`` and ``fn_b`` agree; every gradient is finite and, except
    those named in ``may_be_zero`` (mathematically zero in that case), non-zero."""
    tol = tol or TOL64
    outs_a, grads_a = value_and_grads(fn_a, inputs)
    outs_b, grads_b = value_and_grads(fn_b, inputs)
    assert len(outs_a) == len(outs_b)
    for a, b in zip(outs_a, outs_b, strict=True):
        torch.testing.assert_close(a, b, **tol)
    for name in inputs:
        assert torch.isfinite(grads_a[name]).all(), name
        if name not in may_be_zero:
            assert grads_a[name].abs().sum() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(grads_a[name], grads_b[name], **tol,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


# ----------------------------------------------------------------------------- selective scan
def scan_inputs(batch=2, dim=3, n=4, length=13, dtype=F64, D=False, z=False, state=False, delta_scale=1.0):
    inputs = dict(
        u=torch.randn(batch, dim, length, dtype=dtype),
        delta=F.softplus(torch.randn(batch, dim, length, dtype=dtype)) * delta_scale,
        A=-torch.exp(torch.randn(dim, n, dtype=dtype)),
        B=torch.randn(batch, n, length, dtype=dtype),
        C=torch.randn(batch, n, length, dtype=dtype),
    )
    if D:
        inputs["D"] = torch.randn(dim, dtype=dtype)
    if z:
        inputs["z"] = torch.randn(batch, dim, length, dtype=dtype)
    if state:
        inputs["initial_state"] = torch.randn(batch, dim, n, dtype=dtype)
    return inputs


def scan_fn(backend, max_chunk=5):
    def run(**kw):
        return selective_scan(**kw, return_last_state=True, max_chunk=max_chunk, backend=backend)

    return run


def test_scan_reference_by_hand():
    """d = n = 1, two steps, every term written out."""
    u, dt, a, b, c, d, z = [0.5, -1.5], [0.3, 0.8], -0.7, [2.0, -1.0], [1.5, 0.25], 0.4, [0.2, -1.1]
    h1 = dt[0] * b[0] * u[0]
    h2 = math.exp(dt[1] * a) * h1 + dt[1] * b[1] * u[1]
    silu = lambda v: v / (1 + math.exp(-v))  # noqa: E731
    expected = [(c[0] * h1 + d * u[0]) * silu(z[0]), (c[1] * h2 + d * u[1]) * silu(z[1])]
    t = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    for backend in ("reference", "chunked"):
        y, last = selective_scan(t([[u]]), t([[dt]]), t([[a]]), t([[b]]), t([[c]]), D=t([d]), z=t([[z]]),
                                 return_last_state=True, backend=backend)
        torch.testing.assert_close(y, t([[expected]]), **TOL64)
        torch.testing.assert_close(last, t([[[h2]]]), **TOL64)


@pytest.mark.parametrize("length", [1, 7, 13, 32])
@pytest.mark.parametrize("extras", ["plain", "D_z", "state", "D_z_state"])
def test_scan_chunked_matches_reference(length, extras):
    inputs = scan_inputs(length=length, D="D" in extras, z="z" in extras, state="state" in extras)
    if length > 5:  # the chunked path really chunks, with a padded last chunk
        size = SCAN.chunk_length(SCAN.max_decay_rate(inputs["delta"], inputs["A"]), 5, 600.0)
        assert size == 5 and length % size
    # with one token and no initial state the decay multiplies a zero state: dA is exactly 0
    zero = ("A",) if length == 1 and "state" not in extras else ()
    assert_same(scan_fn("chunked"), scan_fn("reference"), inputs, may_be_zero=zero)


def test_scan_chunked_data_limited_chunks_float64():
    """Large decays make the chunk shorter than max_chunk; still exact."""
    inputs = scan_inputs(length=29, D=True, z=True, state=True)
    step = (inputs["delta"][..., None] * inputs["A"][:, None]).abs().max()
    inputs["delta"] = inputs["delta"] * (140.0 / step)  # largest per-step log-decay: -140
    size = SCAN.chunk_length(SCAN.max_decay_rate(inputs["delta"], inputs["A"]), 128, 600.0)
    assert size == 5  # 1 + int(600 / 140): exp(-P) stays below exp(600) in float64
    assert_same(scan_fn("chunked", max_chunk=128), scan_fn("reference", max_chunk=128), inputs)


@pytest.mark.parametrize("step", [8.0, 300.0])
def test_scan_chunked_large_decay_float32_is_stable(step):
    """fp32: per-step log-decays of -step on some channels (tiny ones on others). A naive
    cumulative-sum scan would compute exp(+step * 63) = inf here; the chunked backend must stay
    finite, forward and backward, and agree with the float64 reference."""
    batch, dim, n, length = 2, 4, 4, 64
    u = torch.randn(batch, dim, length)
    delta = torch.rand(batch, dim, length) * 0.5 + 0.5
    A = -torch.tensor([[step, 1.0, 1e-3, step / 2]] * dim)
    A[0] = -1e-4  # a channel that barely decays next to ones that vanish in one step
    B, C = torch.randn(batch, n, length), torch.randn(batch, n, length)
    h0 = torch.randn(batch, dim, n)
    inputs = dict(u=u, delta=delta, A=A, B=B, C=C, initial_state=h0)
    outs, grads = value_and_grads(scan_fn("chunked", max_chunk=64), inputs)
    for t in outs + list(grads.values()):
        assert torch.isfinite(t).all()
    ref_inputs = {k: v.double() for k, v in inputs.items()}
    ref_outs, ref_grads = value_and_grads(scan_fn("reference", max_chunk=64), ref_inputs)
    for a, b in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    for name in inputs:
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grads[name].double(), ref_grads[name], rtol=1e-3, atol=1e-4 * scale,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


def test_scan_bf16_inputs_match_fp32_reference():
    """bf16 u/delta/B/C/D/z: the scan runs in fp32 and rounds once at the end. bf16 keeps 8
    significant bits, so rounding costs at most 2^-8 relative; allowed: 2^-7 relative (two
    roundings) + 1e-4 absolute, against the fp32 reference on the same (bf16-rounded) values."""
    inputs = scan_inputs(batch=2, dim=8, n=4, length=40, dtype=torch.float32, D=True, z=True)
    bf = {k: (v if k == "A" else v.bfloat16()) for k, v in inputs.items()}
    ref = {k: v.float() for k, v in bf.items()}
    expected = selective_scan(**ref, backend="reference")
    for backend in ("reference", "chunked"):
        y = selective_scan(**bf, backend=backend)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), expected, rtol=2**-7, atol=1e-4)


def test_scan_gradcheck_chunked():
    inputs = scan_inputs(batch=1, dim=2, n=2, length=6, D=True, z=True, state=True)
    names = list(inputs)

    def fn(*args):
        kw = dict(zip(names, args, strict=True))
        return selective_scan(**kw, return_last_state=True, max_chunk=4, backend="chunked")

    assert torch.autograd.gradcheck(fn, tuple(leaf(v) for v in inputs.values()))


# ----------------------------------------------------------------------------- retention
def ret_inputs(batch=2, heads=3, length=13, dk=4, dv=5, state=False, dtype=F64):
    inputs = dict(
        q=torch.randn(batch, heads, length, dk, dtype=dtype),
        k=torch.randn(batch, heads, length, dk, dtype=dtype),
        v=torch.randn(batch, heads, length, dv, dtype=dtype),
        log_decay=-torch.rand(heads, dtype=dtype) * 0.5 - 0.01,
    )
    if state:
        inputs["state"] = torch.randn(batch, heads, dk, dv, dtype=dtype)
    return inputs


def ret_fn(backend, chunk_size=4):
    return lambda **kw: retention(**kw, chunk_size=chunk_size, backend=backend)


def test_retention_parallel_by_hand():
    """One head, two tokens, scalar features: o_1 = q_1 k_1 v_1, o_2 = q_2 (g k_1 v_1 + k_2 v_2)."""
    g = 0.6
    q, k, v = [1.5, -2.0], [0.5, 3.0], [2.0, 0.25]
    t = lambda x: torch.tensor(x, dtype=F64).view(1, 1, 2, 1)  # noqa: E731
    s1 = k[0] * v[0]
    s2 = g * s1 + k[1] * v[1]
    for backend in ("parallel", "chunkwise", "recurrent"):
        log_g = torch.tensor([math.log(g)], dtype=F64)
        out, state = retention(t(q), t(k), t(v), log_g, chunk_size=1, backend=backend)
        torch.testing.assert_close(out.flatten(), torch.tensor([q[0] * s1, q[1] * s2], dtype=F64), **TOL64)
        torch.testing.assert_close(state.flatten(), torch.tensor([s2], dtype=F64), **TOL64)


@pytest.mark.parametrize("backend", ["chunkwise", "recurrent"])
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("length", [1, 13])
def test_retention_backends_match_parallel(backend, state, length):
    zero = ("log_decay",) if length == 1 and not state else ()  # one token: no decay applied
    assert_same(ret_fn(backend), ret_fn("parallel"), ret_inputs(length=length, state=state), may_be_zero=zero)


# ----------------------------------------------------------------------------- attention
def attn_inputs(batch=2, heads=3, q_len=7, k_len=7, dim=4, decay=True, dtype=F64):
    inputs = dict(
        q=torch.randn(batch, heads, q_len, dim, dtype=dtype),
        k=torch.randn(batch, heads, k_len, dim, dtype=dtype),
        v=torch.randn(batch, heads, k_len, dim, dtype=dtype),
    )
    if decay:
        inputs["log_decay"] = -torch.rand(heads, dtype=dtype) - 0.05
    return inputs


def attn_fn(backend, **kw):
    return lambda **inputs: defocus_attention(**inputs, **kw, backend=backend)


@pytest.mark.parametrize(
    "case",
    [
        dict(decay=True, causal=True),
        dict(decay=False, causal=True),  # SDPA's is_causal fast path
        dict(decay=True, causal=False),
        dict(decay=False, causal=False),
        dict(decay=True, causal=True, q_len=3, q_offset=4, scale=0.3),  # queries are a suffix (KV cache)
        dict(decay=False, causal=True, q_len=3, q_offset=4),
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_attention_sdpa_matches_reference(case):
    case = dict(case)
    inputs = attn_inputs(decay=case.pop("decay"), q_len=case.pop("q_len", 7))
    assert_same(attn_fn("sdpa", **case), attn_fn("reference", **case), inputs)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_attention_sdpa_inference_key_decay_matches_reference(dtype):
    """Without autograd the causal decay rides in an extra q.k dimension (SDPA's causal fast path): the same
    output as the bias; a decay too steep for it (|lambda| L > KEY_DECAY_MAX) keeps the bias path."""
    inputs = attn_inputs(batch=2, heads=3, q_len=11, k_len=11, dim=8, dtype=dtype)
    tol = TOL64 if dtype == F64 else dict(rtol=1e-5, atol=2e-6)
    with torch.no_grad():
        want = defocus_attention(**inputs, backend="reference")
        assert ATTN._key_decay_applies(**{k: inputs[k] for k in ("q", "k", "v", "log_decay")}, causal=True,
                                       q_offset=0)
        torch.testing.assert_close(defocus_attention(**inputs, backend="sdpa"), want, **tol)
        torch.testing.assert_close(ATTN._key_decay_sdpa(inputs["q"], inputs["k"], inputs["v"], inputs["log_decay"],
                                                        8**-0.5), want, **tol)
        steep = {**inputs, "log_decay": inputs["log_decay"] * ATTN.KEY_DECAY_MAX}
        assert not ATTN._key_decay_applies(steep["q"], steep["k"], steep["v"], steep["log_decay"], True, 0)
        torch.testing.assert_close(defocus_attention(**steep, backend="sdpa"),
                                   defocus_attention(**steep, backend="reference"), **tol)
    assert not ATTN._key_decay_applies(inputs["q"].requires_grad_(), inputs["k"], inputs["v"], inputs["log_decay"],
                                       True, 0)


def test_attention_decay_bias_by_hand():
    lam = [-0.7, -0.2]
    bias = decay_bias(torch.tensor(lam, dtype=F64), 3, 3, causal=True, q_offset=0, dtype=F64, device="cpu")
    inf = float("-inf")
    expected = torch.tensor([[[0, inf, inf], [l, 0, inf], [2 * l, l, 0]] for l in lam], dtype=F64)  # noqa: E741
    torch.testing.assert_close(bias, expected, **TOL64)
    bias_nc = decay_bias(torch.tensor(lam, dtype=F64), 3, 3, causal=False, q_offset=0, dtype=F64,
                         device="cpu")
    distance = torch.tensor([[0, 1, 2], [1, 0, 1], [2, 1, 0]], dtype=F64)  # |t - s| without causality
    torch.testing.assert_close(bias_nc, torch.stack([lam_h * distance for lam_h in lam]), **TOL64)
    assert decay_bias(None, 3, 3, causal=False, q_offset=0, dtype=F64, device="cpu") is None


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_attention_weights_by_hand(backend):
    """q = 0 leaves only the bias in the logits; v = I reads the attention weights out directly:
    row t is softmax(lambda * (t - s)) over s <= t."""
    lam = -0.7
    q = torch.zeros(1, 1, 3, 3, dtype=F64)
    k = torch.randn(1, 1, 3, 3, dtype=F64)
    v = torch.eye(3, dtype=F64).view(1, 1, 3, 3)
    out = defocus_attention(q, k, v, torch.tensor([lam], dtype=F64), causal=True, backend=backend)[0, 0]
    e1, e2 = math.exp(lam), math.exp(2 * lam)
    expected = torch.tensor([[1, 0, 0], [e1 / (1 + e1), 1 / (1 + e1), 0],
                             [e2 / (e2 + e1 + 1), e1 / (e2 + e1 + 1), 1 / (e2 + e1 + 1)]], dtype=F64)
    torch.testing.assert_close(out, expected, **TOL64)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_attention_query_suffix_equals_full(backend):
    """Streaming with a KV cache: the last queries at q_offset give the full run's last rows."""
    inputs = attn_inputs(q_len=9, k_len=9)
    full = defocus_attention(**inputs, backend=backend)
    part = defocus_attention(inputs["q"][:, :, 5:], inputs["k"], inputs["v"], inputs["log_decay"],
                             q_offset=5, backend=backend)
    torch.testing.assert_close(part, full[:, :, 5:], **TOL64)


def test_attention_bf16_matches_fp32_reference():
    """SDPA in bf16 (scores and softmax rounded to 8 bits): allowed 2^-5 of the output scale."""
    inputs = attn_inputs(batch=2, heads=2, q_len=16, k_len=16, dim=8, dtype=torch.float32)
    bf = {k: v.bfloat16() for k, v in inputs.items()}
    expected = defocus_attention(**{k: v.float() for k, v in bf.items()}, backend="reference")
    out = defocus_attention(**bf, backend="sdpa")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=2**-5 * expected.abs().max().item())


@pytest.mark.parametrize("backend", ["parallel", "chunkwise", "recurrent"])
def test_retention_bf16_keeps_decays_and_state_in_fp32(backend):
    """bf16 inputs past 256 tokens (bf16 positions are not exact there), with a decay near 1 (0.998 is 1.0 in
    bf16): output, state and gradients within 2^-7 (relative norm) of the float32 result of the same inputs,
    which leaves room for the bf16 products only (the old all-bf16 code was 8-26 % off); state in float32."""
    torch.manual_seed(0)
    inputs = ret_inputs(batch=1, heads=2, length=300, dk=8, dv=8, dtype=torch.float32)
    inputs["log_decay"] = torch.tensor([-0.002, -0.03])
    bf = {k: (v if k == "log_decay" else v.bfloat16().requires_grad_()) for k, v in inputs.items()}
    fp = {k: v.detach().float().requires_grad_() for k, v in bf.items()}
    expected, expected_state = retention(**fp, backend="parallel")
    out, state = retention(**bf, chunk_size=64, backend=backend)
    assert (out.dtype, state.dtype) == (torch.bfloat16, torch.float32)
    assert rel_norm(out, expected) < 2**-7 and rel_norm(state, expected_state) < 2**-7
    grad = torch.randn_like(expected)
    expected.backward(grad)
    out.backward(grad.bfloat16())
    for name in ("q", "k", "v"):
        assert rel_norm(bf[name].grad, fp[name].grad) < 2**-7, name


def test_retention_bf16_streamed_matches_one_shot():
    """A bf16 stream (the float32 state carried between calls, one token per call) gives the one-shot output
    and final state within 2^-7: the state is not rounded to bf16 at every step."""
    torch.manual_seed(0)
    inputs = {k: (v if k == "log_decay" else v.bfloat16())
              for k, v in ret_inputs(batch=1, heads=2, length=40, dtype=torch.float32).items()}
    one_shot, final = retention(**inputs, backend="parallel")
    state, outs = None, []
    for t in range(40):
        step = {k: (v if k == "log_decay" else v[..., t:t + 1, :]) for k, v in inputs.items()}
        out, state = retention(**step, state=state)
        outs.append(out)
    assert rel_norm(torch.cat(outs, dim=-2), one_shot) < 2**-7 and rel_norm(state, final) < 2**-7


# ----------------------------------------------------------------------------- causal conv1d
def conv_inputs(batch=2, dim=3, length=11, width=4, state=False, dtype=F64):
    inputs = dict(x=torch.randn(batch, dim, length, dtype=dtype), weight=torch.randn(dim, width, dtype=dtype),
                  bias=torch.randn(dim, dtype=dtype))
    if state:
        inputs["state"] = torch.randn(batch, dim, width - 1, dtype=dtype)
    return inputs


def conv_by_loops(x, weight, bias, state=None, activation=None):
    """y[b, d, t] = bias[d] + sum_j weight[d, j] * x[b, d, t - (K - 1) + j], with the state (or
    zeros) standing in for the K - 1 inputs before t = 0."""
    width = weight.shape[-1]
    if state is None:
        state = torch.zeros(x.shape[0], x.shape[1], width - 1, dtype=x.dtype)
    past = torch.cat([state, x], dim=-1)
    y = torch.zeros_like(x)
    for t in range(x.shape[-1]):
        for j in range(width):
            y[..., t] += weight[:, j] * past[..., t + j]
    y = y + bias[:, None]
    # past.shape[-1] - (K - 1), not -(K - 1): at K = 1 the state is empty, not everything
    return (F.silu(y) if activation == "silu" else y), past[..., past.shape[-1] - (width - 1):]


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_loops(backend, state, activation):
    inputs = conv_inputs(state=state)
    assert_same(lambda **kw: causal_conv1d(**kw, activation=activation, backend=backend),
                lambda **kw: conv_by_loops(**kw, activation=activation), inputs)


def test_causal_conv1d_accepts_conv_module_weight_and_gradcheck():
    inputs = conv_inputs(batch=1, dim=2, length=5, width=3, state=True)
    y3, _ = causal_conv1d(inputs["x"], inputs["weight"][:, None], inputs["bias"], inputs["state"])
    y2, _ = causal_conv1d(inputs["x"], inputs["weight"], inputs["bias"], inputs["state"])
    torch.testing.assert_close(y3, y2, rtol=0, atol=0)
    names = list(inputs)
    fn = lambda *a: causal_conv1d(**dict(zip(names, a, strict=True)), activation="silu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(leaf(v) for v in inputs.values()))


# ----------------------------------------------------------------------------- RoPE
def scores(q, k, freqs, length):
    """S[t, s] = rot(q, t) . rot(k, s) for the same q, k at every position."""
    angles = rope_angles(torch.arange(length), freqs)
    qs = apply_rope(q.expand(length, -1), angles)
    ks = apply_rope(k.expand(length, -1), angles)
    return qs @ ks.T


def test_rope_tied_scores_are_relative():
    length = 9
    q, k = torch.randn(1, 8, dtype=F64), torch.randn(1, 8, dtype=F64)
    pair_freqs = torch.rand(4, dtype=F64) + 0.1
    tied = scores(q, k, pair_freqs.repeat_interleave(2), length)
    # S[t, s] depends on t - s only: constant along every diagonal
    torch.testing.assert_close(tied[1:, 1:], tied[:-1, :-1], **TOL64)
    assert not torch.allclose(tied[0], tied[0, 0].expand(length))  # and it does depend on t - s
    # the official untied form (one frequency per element) is not relative
    untied = scores(q, k, torch.rand(8, dtype=F64) + 0.1, length)
    assert (untied[1:, 1:] - untied[:-1, :-1]).abs().max() > 1e-3


def test_rope_rotation_by_hand_and_norm():
    x = torch.tensor([[1.0, 0.0, 2.0, 3.0]], dtype=F64)
    angles = torch.tensor([[math.pi / 2, math.pi / 2, math.pi, math.pi]], dtype=F64)
    expected = torch.tensor([[0.0, 1.0, -2.0, -3.0]], dtype=F64)
    torch.testing.assert_close(apply_rope(x, angles), expected, **TOL64)
    y = torch.randn(5, 6, dtype=F64)
    a = rope_angles(torch.arange(5), torch.rand(3, dtype=F64).repeat_interleave(2))
    assert a.shape == (5, 6)
    torch.testing.assert_close(apply_rope(y, a).norm(dim=-1), y.norm(dim=-1), **TOL64)  # a rotation
    with pytest.raises(ValueError, match="even"):
        apply_rope(torch.randn(2, 5), torch.zeros(2, 5))


@pytest.mark.parametrize("layout", ["contiguous", "stacked_qkv_view", "odd_offset"])
def test_rope_tied_matches_the_reference_forward_and_backward(layout):
    """apply_rope_tied (one complex multiply) == apply_rope with each pair's angle repeated, float64, grads too."""
    from defocus_vlm.kernels.rope import apply_rope_tied

    g = torch.Generator().manual_seed(0)
    if layout == "contiguous":
        x = leaf(torch.randn(3, 4, 7, 8, dtype=F64, generator=g))
        view = x
    elif layout == "stacked_qkv_view":  # q and k as the attention mixer hands them: a permuted view of qkv
        x = leaf(torch.randn(3, 7, 3, 4, 8, dtype=F64, generator=g))  # (B, L, q k v, H, head_dim)
        view = x.permute(2, 0, 3, 1, 4)[:2]  # (2, B, H, L, head_dim)
    else:  # a storage offset of one element: view_as_complex cannot take it, the reference path runs
        x = leaf(torch.randn(3 * 4 * 7 * 8 + 1, dtype=F64, generator=g))
        view = x[1:].view(3, 4, 7, 8)
    angles = leaf(torch.randn(4, 7, 4, dtype=F64, generator=g))  # (H, L, pairs)
    got = apply_rope_tied(view, angles)
    want = apply_rope(view, angles.repeat_interleave(2, dim=-1))
    torch.testing.assert_close(got, want, **TOL64)
    cot = torch.randn(got.shape, dtype=F64, generator=g)
    got_grads = torch.autograd.grad(got, (x, angles), cot)
    want_grads = torch.autograd.grad(want, (x, angles), cot)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **TOL64)
    half = apply_rope_tied(view.detach().to(torch.bfloat16), angles.detach())  # no complex bf16: the reference
    torch.testing.assert_close(half.float(), want.detach().float(), rtol=0.02, atol=0.05)


def test_decay_bias_reuses_distances_not_the_decay():
    """The cached |t - s| and causal mask are constants: each call multiplies in its own log_decay (and its grad)."""
    for causal, offset in ((True, 0), (False, 0), (True, 3)):
        lam = leaf(-torch.rand(2, dtype=F64))
        dist = (torch.arange(offset, offset + 4)[:, None] - torch.arange(7)[None, :]).to(F64)
        kept = dist.abs().masked_fill((dist < 0) & causal, 0)
        for scale in (1.0, 2.0):  # the second call hits the cache
            bias = decay_bias(lam * scale, 4, 7, causal, offset, F64, torch.device("cpu"))
            want = (lam * scale)[:, None, None] * dist.abs()
            if causal:
                want = want.masked_fill(dist < 0, float("-inf"))
            torch.testing.assert_close(bias, want, **TOL64)
            (grad,) = torch.autograd.grad(bias.masked_fill(bias.isinf(), 0).sum(), lam)
            torch.testing.assert_close(grad, (scale * kept.sum()).expand(2), **TOL64)
    assert decay_bias(None, 3, 3, False, 0, F64, torch.device("cpu")) is None


# ----------------------------------------------------------------------------- dispatch
def _spy(monkeypatch, module, calls):
    for name, fn in list(module.BACKENDS.items()):
        def wrapped(*a, _fn=fn, _name=name, **kw):
            calls.append(_name)
            return _fn(*a, **kw)

        monkeypatch.setitem(module.BACKENDS, name, wrapped)


def _call_all():
    q = torch.randn(1, 2, 5, 4)
    defocus_attention(q, q, q, torch.tensor([-0.1, -0.2]))
    retention(q, q, q, torch.tensor([-0.1, -0.2]))
    s = scan_inputs(batch=1, dim=2, n=2, length=5, dtype=torch.float32)
    selective_scan(**s)
    causal_conv1d(torch.randn(1, 2, 5), torch.randn(2, 4))
    gated_group_rms_norm(torch.randn(1, 4, 5), torch.randn(1, 4, 5), torch.randn(1, 4, 5), torch.randn(4), 2)


@pytest.mark.parametrize(
    "env, expected",
    [
        (None, dict(attention="sdpa", retention="parallel", selective_scan="auto", causal_conv1d="auto",
                    gated_norm="auto")),
        ("reference", dict(attention="reference", retention="reference", selective_scan="reference",
                           causal_conv1d="reference", gated_norm="reference")),
        ("selective_scan=reference, retention=recurrent",
         dict(attention="sdpa", retention="recurrent", selective_scan="reference", causal_conv1d="auto",
              gated_norm="auto")),
    ],
)
def test_env_var_selects_backend(monkeypatch, env, expected):
    if env is not None:
        monkeypatch.setenv(ENV_VAR, env)
    # the fused C++ ops where they build, else the recurrence / the PyTorch references
    fused = SCAN.auto_backend("cpu") == "fused"
    auto = dict(selective_scan="fused" if fused else "reference", causal_conv1d="fused" if fused else "torch",
                gated_norm="fused" if fused else "reference")
    expected = {op: auto[op] if name == "auto" else name for op, name in expected.items()}
    calls = {op: [] for op in expected}
    modules = dict(attention=ATTN, retention=RET, selective_scan=SCAN, causal_conv1d=CONV, gated_norm=GATE)
    for op, module in modules.items():
        _spy(monkeypatch, module, calls[op])
    _call_all()
    assert {op: c for op, c in calls.items()} == {op: [name] for op, name in expected.items()}


def test_cpu_auto_rules():
    """CPU: the fused C++ scan (the recurrence where it cannot be built), with or without autograd;
    the parallel retention for inputs of one chunk with a small score tensor, chunkwise otherwise."""
    from defocus_vlm.kernels.cpu_extension import fused_available

    scan = "fused" if fused_available() else "reference"
    s = scan_inputs(batch=1, dim=2, n=2, length=5, dtype=torch.float32)
    assert SCAN.OP.auto(s["u"]) == scan
    assert RET.OP.auto(torch.zeros(128, 2, 50, 4)) == "parallel"  # one chunk (Fashion-MNIST)
    assert RET.OP.auto(torch.zeros(1, 2, 197, 4)) == "chunkwise"  # a 224 px image: chunkwise was faster
    assert RET.OP.auto(torch.zeros(1, 2, 1024, 4)) == "chunkwise"  # long: chunkwise
    assert 1024 * 128 * 64 * 64 > RET.PARALLEL_MAX_SCORES
    assert RET.OP.auto(torch.zeros(1024, 128, 64, 1)) == "chunkwise"  # short but many scores
    s = {k: (v.requires_grad_() if k == "u" else v) for k, v in s.items()}
    with record_choices() as choices:
        selective_scan(**s)
        assert choices["selective_scan"] == (scan, BY_RULE)
        with torch.no_grad():
            selective_scan(**s)
    assert choices["selective_scan"] == (scan, BY_RULE)


def test_cpu_attention_rule_trains_low_precision_on_the_reference():
    """CPU: bf16/fp16 under autograd up to REFERENCE_MAX_LENGTH keys -> the reference (SDPA's CPU kernels are
    slow there); float32, inference and longer inputs -> SDPA."""
    def q_of(dtype, length=50, grad=True):
        return torch.zeros(2, 2, length, 4, dtype=dtype, requires_grad=grad)

    decay = -torch.ones(2)
    for dtype in (torch.bfloat16, torch.float16):
        assert ATTN.OP.auto(q_of(dtype), q_of(dtype), decay) == "reference"
        assert ATTN.OP.auto(q_of(dtype), q_of(dtype), None) == "reference"
        with torch.no_grad():
            assert ATTN.OP.auto(q_of(dtype), q_of(dtype), decay) == "sdpa"
        assert ATTN.OP.auto(q_of(dtype, grad=False), q_of(dtype, grad=False), decay) == "sdpa"
        long = q_of(dtype, ATTN.REFERENCE_MAX_LENGTH + 1)
        assert ATTN.OP.auto(long, long, decay) == "sdpa"
    assert ATTN.OP.auto(q_of(torch.float32), q_of(torch.float32), decay) == "sdpa"


@pytest.mark.parametrize("log_decay", [None, torch.tensor([-0.3, -0.05])])
@pytest.mark.parametrize("causal", [True, False])
def test_low_precision_reference_keeps_logits_in_float32(log_decay, causal):
    """bf16 inputs: the reference's softmax runs on float32 logits, so it is as close to float64 as SDPA's
    fused CPU kernel (which accumulates in float32), forward and backward; its output stays bf16."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 17, 8, generator=g, dtype=torch.float64) for _ in range(3))
    rounded = [t.to(torch.bfloat16).double().requires_grad_() for t in (q, k, v)]
    exact = defocus_attention(*rounded, log_decay=None if log_decay is None else log_decay.double(),
                              causal=causal, backend="reference")
    exact.sum().backward()
    errors = {}
    for backend in ("reference", "sdpa"):
        low = [t.detach().to(torch.bfloat16).requires_grad_() for t in rounded]
        out = defocus_attention(*low, log_decay=log_decay, causal=causal, backend=backend)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        errors[backend] = max([(out.double() - exact).abs().max().item()]
                              + [(a.grad.double() - b.grad).abs().max().item() for a, b in zip(low, rounded)])
    assert errors["reference"] <= 2 * errors["sdpa"] + 1e-3, errors
    assert errors["reference"] < 0.1, errors


def test_choices_are_recorded_only_when_asked(monkeypatch):
    """Outside record_choices() a call writes nothing; inside, each op's latest choice and how it
    was made; a nested block records into its own dict and the outer one resumes after it."""
    q = torch.randn(1, 2, 5, 4)
    defocus_attention(q, q, q)
    with record_choices() as outer:
        assert outer == {}
        defocus_attention(q, q, q, backend="reference")
        with record_choices() as inner:
            monkeypatch.setenv(ENV_VAR, "attention=sdpa")
            defocus_attention(q, q, q)
        assert inner == {"attention": ("sdpa", BY_ENV)}
        assert outer == {"attention": ("reference", BY_ARGUMENT)}
        causal_conv1d(torch.randn(1, 2, 5), torch.randn(2, 4))
    defocus_attention(q, q, q, backend="reference")
    conv = "fused" if SCAN.auto_backend("cpu") == "fused" else "torch"  # the C++ ops where they build
    assert outer == {"attention": ("reference", BY_ARGUMENT), "causal_conv1d": (conv, BY_RULE)}


def test_the_automatic_rule_runs_once_per_kind_of_input():
    """The rule's answer is cached per (device type, shape class): more calls of the same kind,
    here differently sized but all short, are cache hits; a long input is a new kind."""
    RET.OP.rule.cache_clear()
    lam = torch.tensor([-0.1, -0.2])
    for length in (3, 5, 7):
        q = torch.randn(1, 2, length, 4)
        retention(q, q, q, lam)
    info = RET.OP.rule.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    q = torch.randn(1, 2, RET.PARALLEL_MAX_LENGTH + 1, 4)
    retention(q, q, q, lam)
    assert RET.OP.rule.cache_info().misses == 2


def test_dispatch_traces_without_graph_breaks_or_cache_warnings():
    """Under torch.compile(fullgraph=True) the choice is made in traced code: no graph break, no
    warning about tracing through the LRU cache, the scan's traceable recurrence, the same result."""
    import warnings

    def f(q, lam, s):
        return defocus_attention(q, q, q, lam).sum() + selective_scan(**s).sum()

    q, lam = torch.randn(1, 2, 5, 4), torch.tensor([-0.1, -0.2])
    s = scan_inputs(batch=1, dim=2, n=2, length=5, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with record_choices() as choices:
            compiled = torch.compile(f, fullgraph=True, backend="eager")(q, lam, s)
    assert choices["selective_scan"] == ("reference", BY_RULE)
    torch.testing.assert_close(compiled, f(q, lam, s))


def test_explicit_backend_beats_env_var(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "selective_scan=reference")
    u = torch.zeros(1, 2, 3)
    assert SCAN.OP.choose("chunked", u) == "chunked"
    assert SCAN.OP.choose("auto", u) == "reference"


def test_env_var_per_op_entry_beats_the_bare_one(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference, retention=recurrent")
    q = torch.zeros(1, 2, 3, 4)
    assert RET.OP.choose("auto", q) == "recurrent"
    assert ATTN.OP.choose("auto", q, q, None) == "reference"


def test_unknown_backend_names_the_available_ones(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*selective_scan.*'chunked'.*'reference'"):
        selective_scan(**scan_inputs(batch=1, dim=2, n=2, length=3), backend="fast")
    monkeypatch.setenv(ENV_VAR, "retention=fused")
    with pytest.raises(ValueError, match=r"'fused'.*retention.*chunkwise.*parallel.*recurrent"):
        retention(**ret_inputs(length=3))
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(ValueError, match=r"'triton'.*attention.*reference.*sdpa"):
        defocus_attention(**attn_inputs())
    with pytest.raises(ValueError, match=r"'triton'.*causal_conv1d.*reference"):
        causal_conv1d(torch.randn(1, 2, 5), torch.randn(2, 4))


# ----------------------------------------------------------------------------- streaming splits
@pytest.mark.parametrize("backend", ["parallel", "chunkwise", "recurrent"])
@pytest.mark.parametrize("initial", [False, True])
def test_retention_two_halves_equal_one_pass(backend, initial):
    inp = ret_inputs(length=13, state=initial)
    full, full_state = retention(**inp, chunk_size=4, backend=backend)
    cut = 6
    first = {k: (v[:, :, :cut] if k in "qkv" else v) for k, v in inp.items()}
    second = {k: (v[:, :, cut:] if k in "qkv" else v) for k, v in inp.items() if k != "state"}
    out1, s1 = retention(**first, chunk_size=4, backend=backend)
    out2, s2 = retention(**second, state=s1, chunk_size=4, backend=backend)
    torch.testing.assert_close(torch.cat([out1, out2], dim=2), full, **TOL64)
    torch.testing.assert_close(s2, full_state, **TOL64)


@pytest.mark.parametrize("backend", ["reference", "chunked", "fused"])
@pytest.mark.parametrize("initial", [False, True])
def test_selective_scan_two_halves_equal_one_pass(backend, initial, request):
    if backend == "fused":
        request.getfixturevalue("fused_scan_built")
    inp = scan_inputs(length=13, D=True, z=True, state=initial)
    full, full_last = selective_scan(**inp, return_last_state=True, max_chunk=4, backend=backend)
    cut = 6
    seq = ("u", "delta", "B", "C", "z")
    first = {k: (v[..., :cut] if k in seq else v) for k, v in inp.items()}
    second = {k: (v[..., cut:] if k in seq else v) for k, v in inp.items() if k != "initial_state"}
    y1, h1 = selective_scan(**first, return_last_state=True, max_chunk=4, backend=backend)
    y2, h2 = selective_scan(**second, initial_state=h1, return_last_state=True, max_chunk=4, backend=backend)
    torch.testing.assert_close(torch.cat([y1, y2], dim=-1), full, **TOL64)
    torch.testing.assert_close(h2, full_last, **TOL64)


@pytest.mark.parametrize("cut", [1, 2, 6])  # shorter and longer than the K - 1 = 3 carried inputs
def test_causal_conv1d_two_halves_equal_one_pass(cut):
    inp = conv_inputs(length=11)
    full, full_state = causal_conv1d(**inp, activation="silu")
    y1, s1 = causal_conv1d(inp["x"][..., :cut], inp["weight"], inp["bias"], activation="silu")
    y2, s2 = causal_conv1d(inp["x"][..., cut:], inp["weight"], inp["bias"], state=s1, activation="silu")
    torch.testing.assert_close(torch.cat([y1, y2], dim=-1), full, **TOL64)
    torch.testing.assert_close(s2, full_state, **TOL64)
    torch.testing.assert_close(full_state, inp["x"][..., -3:], rtol=0, atol=0)
