"""The fused CPU ops of the Mamba mixer's element-wise parts (``backend="fused"``: the depthwise causal
conv and the gated group RMS norm, C++ built just in time) against their PyTorch references: float64
forward and backward for every option, odd sizes, strided (channel-last) inputs, bf16 error no larger
than the reference's, streaming, thread-count independence, bad input. No timings here."""

from __future__ import annotations

import pytest
import torch
from defocus_vlm.kernels import causal_conv1d, gated_group_rms_norm
from test_kernels_reference import F64, assert_same, conv_by_loops, conv_inputs, value_and_grads

pytestmark = pytest.mark.usefixtures("fused_scan_built")


def conv_fn(backend, activation):
    return lambda **kw: causal_conv1d(**kw, activation=activation, backend=backend)


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("dim, length, width, state", [
    (3, 11, 4, False), (3, 11, 4, True), (37, 2, 4, False), (37, 2, 4, True), (20, 5, 3, True),
    (16, 9, 1, False),  # a width-1 kernel carries no state
])
def test_conv_matches_loops_float64(activation, dim, length, width, state):
    """Every gradient (x, weight, bias, state), channels that do not fill a vector, sequences shorter
    than the kernel, a kernel of width 1."""
    inputs = conv_inputs(batch=2, dim=dim, length=length, width=width, state=state)
    assert_same(conv_fn("fused", activation), lambda **kw: conv_by_loops(**kw, activation=activation), inputs)


def test_conv_reads_channel_last_and_strided_inputs():
    """The mixer's input is a channel-last view of in_proj's output; the output is channel-last too."""
    base = torch.randn(2, 9, 2 * 24, dtype=F64)
    x = base[..., :24].transpose(1, 2)  # (B, D, L) with channel stride 1
    w, b = torch.randn(24, 4, dtype=F64), torch.randn(24, dtype=F64)
    for view in (x, x.contiguous(), x.contiguous()[:, ::2]):
        wv, bv = w[: view.shape[1]], b[: view.shape[1]]
        y, state = causal_conv1d(view, wv, bv, activation="silu", backend="fused")
        y_ref, state_ref = causal_conv1d(view, wv, bv, activation="silu", backend="reference")
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state, state_ref, rtol=0, atol=0)
    assert y.transpose(1, 2).is_contiguous()


def test_conv_streamed_equals_one_shot():
    inputs = conv_inputs(batch=2, dim=19, length=13, width=4, dtype=torch.float32)
    full, full_state = causal_conv1d(**inputs, activation="silu", backend="fused")
    for cut in (1, 2, 7):
        y1, s1 = causal_conv1d(inputs["x"][..., :cut], inputs["weight"], inputs["bias"], activation="silu",
                               backend="fused")
        y2, s2 = causal_conv1d(inputs["x"][..., cut:], inputs["weight"], inputs["bias"], state=s1,
                               activation="silu", backend="fused")
        torch.testing.assert_close(torch.cat([y1, y2], -1), full, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s2, full_state, rtol=0, atol=0)


def low_precision_errors(fn_fast, fn_ref, inputs, dtype):
    """Max error of each output / gradient against float64, for fn_fast and fn_ref run in ``dtype``."""
    exact_outs, exact_grads = value_and_grads(fn_ref, inputs)
    low = {k: v.to(dtype) if v.dtype == F64 and k != "D" else v.float() for k, v in inputs.items()}
    result = []
    for fn in (fn_fast, fn_ref):
        outs, grads = value_and_grads(fn, low)
        errs = [(o.double() - e).abs().max().item() for o, e in zip(outs[:1], exact_outs[:1], strict=True)]
        errs += [(grads[k].double() - exact_grads[k]).abs().max().item() for k in inputs]
        result.append(errs)
    return result


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv_low_precision_error_no_larger_than_the_reference(dtype):
    """Computed in float32 and rounded once: at most the reference's error (which computes in the input
    dtype) plus a rounding step, for the output and every gradient."""
    inputs = conv_inputs(batch=4, dim=40, length=33, width=4, state=True)
    fused, ref = low_precision_errors(conv_fn("fused", "silu"), conv_fn("reference", "silu"), inputs, dtype)
    for f, r in zip(fused, ref, strict=True):
        assert f <= 1.25 * r + 1e-6, (fused, ref)


def gate_inputs(batch=2, dim=12, length=7, dtype=F64):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(y=r(batch, dim, length), u=r(batch, dim, length), z=r(batch, dim, length), D=r(dim))


def gate_fn(backend, group_size):
    return lambda **kw: gated_group_rms_norm(**kw, group_size=group_size, backend=backend)


def gate_by_hand(y, u, z, D, group_size):
    g = y.unflatten(1, (-1, group_size))
    yn = (g / (g.pow(2).mean(2, keepdim=True) + 1e-6).sqrt()).flatten(1, 2)
    return (yn + D[:, None] * u) * z * torch.sigmoid(z)


@pytest.mark.parametrize("dim, group_size", [(12, 4), (12, 12), (40, 8), (64, 64), (5, 1)])
def test_gate_matches_by_hand_float64(dim, group_size):
    inputs = gate_inputs(dim=dim)
    assert_same(gate_fn("fused", group_size), lambda **kw: gate_by_hand(**kw, group_size=group_size), inputs)
    assert_same(gate_fn("reference", group_size), lambda **kw: gate_by_hand(**kw, group_size=group_size), inputs)


def test_gate_reads_channel_last_inputs_and_returns_y_dtype():
    proj = torch.randn(2, 9, 2 * 32, dtype=torch.float32)
    u, z = proj[..., :32].transpose(1, 2), proj[..., 32:].transpose(1, 2)
    y, D = torch.randn(2, 32, 9), torch.randn(32)
    out = gated_group_rms_norm(y, u, z, D, 8, backend="fused")
    torch.testing.assert_close(out, gated_group_rms_norm(y, u, z, D, 8, backend="reference"), rtol=1e-5, atol=1e-6)
    assert out.dtype == y.dtype and out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gate_low_precision_error_no_larger_than_the_reference(dtype):
    inputs = gate_inputs(batch=4, dim=64, length=21)
    fused, ref = low_precision_errors(gate_fn("fused", 16), gate_fn("reference", 16), inputs, dtype)
    for f, r in zip(fused, ref, strict=True):
        assert f <= 1.25 * r + 1e-6, (fused, ref)


def test_results_do_not_depend_on_the_thread_count():
    conv = conv_inputs(batch=5, dim=33, length=17, width=4, state=True, dtype=torch.float32)
    gate = gate_inputs(batch=5, dim=64, length=17, dtype=torch.float32)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            runs.append((value_and_grads(conv_fn("fused", "silu"), conv), value_and_grads(gate_fn("fused", 16), gate)))
    finally:
        torch.set_num_threads(threads)
    for (outs_a, grads_a), (outs_b, grads_b) in zip(runs[0], runs[1], strict=True):
        for a, b in zip(outs_a, outs_b, strict=True):
            assert torch.equal(a, b)
        for name in grads_a:
            assert torch.equal(grads_a[name], grads_b[name]), name


def test_bad_input_is_a_clear_error():
    y = torch.randn(1, 6, 3)
    with pytest.raises(ValueError, match="group size must divide the channels \\(6\\), got 4"):
        gated_group_rms_norm(y, y, y, torch.randn(6), 4)
    with pytest.raises(ValueError, match="expected y, u, z"):
        gated_group_rms_norm(y, y[:, :3], y, torch.randn(6), 3)
    with pytest.raises(RuntimeError, match="x must be float64, float32, bfloat16 or float16"):
        causal_conv1d(torch.ones(1, 2, 3, dtype=torch.int32), torch.ones(2, 4, dtype=torch.int32), backend="fused")


def test_the_mixer_is_the_same_function_with_every_backend(monkeypatch):
    """A De-focus Mamba mixer in float64 on the fused ops and on the references: the output, the input's
    gradient and every parameter's."""
    from defocus_vlm.encoders.config import EncoderConfig
    from defocus_vlm.encoders.mixers import DefocusMambaMixer
    from defocus_vlm.kernels.dispatch import ENV_VAR, record_choices

    torch.manual_seed(0)
    mixer = DefocusMambaMixer(EncoderConfig(mixer="mamba", embed_dim=32, depth=1, dt_rank=4,
                                            group_norm_size=16)).double()
    x = torch.randn(2, 11, 32, dtype=F64, requires_grad=True)
    cotangent = torch.randn(2, 11, 32, dtype=F64)
    results = []
    for backend in ("fused", "reference"):
        monkeypatch.setenv(ENV_VAR, f"causal_conv1d={backend},gated_norm={backend}")
        with record_choices() as choices:
            out = mixer(x)
        assert choices["causal_conv1d"][0] == backend and choices["gated_norm"][0] == backend
        grads = torch.autograd.grad((out * cotangent).sum(), [x, *mixer.parameters()])
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
