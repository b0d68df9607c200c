"""The fused CPU selective scan (``backend="fused"``, a C++ op built just in time) against the
reference recurrence: float64 forward and backward for every option, odd shapes, strided inputs,
float32 / bf16, non-finite values, thread-count independence, the portable (non-AVX-512) build,
the automatic choice, and the fallback when the extension cannot be built. No timings here."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from defocus_vlm.kernels import selective_scan
from defocus_vlm.kernels.selective_scan_cpu import fused_selective_scan
from test_kernels_reference import F64, assert_same, leaf, scan_fn, scan_inputs, value_and_grads

SCAN = importlib.import_module("defocus_vlm.kernels.selective_scan")
FUSED = importlib.import_module("defocus_vlm.kernels.selective_scan_cpu")
EXT = importlib.import_module("defocus_vlm.kernels.cpu_extension")

pytestmark = pytest.mark.usefixtures("fused_scan_built")

OPTIONS = ["plain", "D", "z", "D_z", "state", "D_z_state"]


def options(extras: str) -> dict:
    return dict(D="D" in extras, z="z" in extras, state="state" in extras)


def fused_fn(tile: int = FUSED.DEFAULT_TILE, portable: bool = False):
    def run(**kw):
        return fused_selective_scan(**kw, tile=tile, portable=portable)

    return run


def zero_grads(length: int, extras: str) -> tuple[str, ...]:
    # one token from a zero state: the decay multiplies zero, so dA is exactly 0
    return ("A",) if length == 1 and "state" not in extras else ()


# (batch, dim, n, length): one token; odd lengths; lengths past one and several tiles (32 steps);
# channels not a multiple of a block (32 float64 channels); more states than the 8 float64 lanes
# (two reduction groups); many batch rows, where one work item runs several blocks and adds up
# their dB / dC
SHAPES = [(2, 3, 4, 1), (2, 3, 4, 13), (1, 40, 5, 33), (3, 17, 10, 70), (2, 16, 16, 64), (65, 70, 4, 9)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("extras", OPTIONS)
def test_fused_matches_reference_float64(shape, extras):
    batch, dim, n, length = shape
    inputs = scan_inputs(batch=batch, dim=dim, n=n, length=length, **options(extras))
    assert_same(scan_fn("fused"), scan_fn("reference"), inputs, may_be_zero=zero_grads(length, extras))


@pytest.mark.parametrize("tile", [1, 4, 7])
@pytest.mark.parametrize("extras", ["plain", "D_z_state"])
def test_fused_checkpoint_tiles_float64(tile, extras):
    """Short tiles: many checkpoints, a partial last tile, and the backward's tile-to-tile carry."""
    inputs = scan_inputs(batch=2, dim=20, n=6, length=23, **options(extras))
    assert_same(fused_fn(tile=tile), scan_fn("reference"), inputs)


@pytest.mark.parametrize("extras", ["plain", "D_z_state"])
def test_fused_strided_inputs_float64(extras):
    """The model passes delta (and z) as transposed views (channels contiguous); B / C may be
    views with gaps: the kernel reads them in place, with the same results and gradients."""
    inputs = scan_inputs(batch=2, dim=19, n=4, length=37, **options(extras))

    def strided(**kw):
        for name in ("delta", "z"):
            if name in kw:  # (B, D, L) view of a (B, L, D) tensor
                kw[name] = kw[name].transpose(1, 2).contiguous().transpose(1, 2)
        for name in ("B", "C"):  # (B, N, L) view with time stride 2
            kw[name] = torch.stack([kw[name], torch.zeros_like(kw[name])], dim=-1).flatten(-2)[..., ::2]
        assert kw["delta"].stride(1) == 1 and kw["B"].stride(-1) == 2
        return selective_scan(**kw, return_last_state=True, backend="fused")

    assert_same(strided, scan_fn("reference"), inputs)


def assert_float32_close_to_float64(fn, ref_fn, inputs: dict) -> None:
    """fn on float32 inputs: float32 outputs and gradients within the fused scan's float32 tolerance of ref_fn
    on the same inputs in float64."""
    outs, grads = value_and_grads(fn, inputs)
    ref_outs, ref_grads = value_and_grads(ref_fn, {k: v.double() for k, v in inputs.items()})
    assert all(o.dtype == torch.float32 for o in outs)
    for a, b in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
    for name in inputs:
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grads[name].double(), ref_grads[name], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


def raw_delta(inputs: dict, scale: float = 4.0) -> dict:
    """delta as softplus's input: spread over both signs, with values past torch's threshold (20) and far
    below zero, where softplus is x itself / underflows towards 0."""
    raw = torch.randn_like(inputs["delta"]) * scale
    flat = raw.view(-1)
    flat[::7], flat[3::11] = 25.0, -30.0
    return {**inputs, "delta": raw}


def softplus_fn(backend: str, **kw):
    def run(**inputs):
        return selective_scan(**inputs, return_last_state=True, backend=backend, delta_softplus=True, **kw)

    return run


def softplus_first(**inputs):
    """The definition: torch's softplus, then the reference scan."""
    inputs = {**inputs, "delta": torch.nn.functional.softplus(inputs["delta"])}
    return selective_scan(**inputs, return_last_state=True, backend="reference")


@pytest.mark.parametrize("shape", [(2, 3, 4, 13), (3, 17, 10, 70), (65, 70, 4, 9)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("extras", ["plain", "D_z_state"])
def test_fused_softplus_in_the_kernel_float64(shape, extras):
    """delta_softplus=True (mamba-ssm's flag): the kernel's softplus and its derivative against torch's,
    forward and backward, with padded channel lanes, several tiles and strided delta."""
    batch, dim, n, length = shape
    inputs = raw_delta(scan_inputs(batch=batch, dim=dim, n=n, length=length, **options(extras)))
    assert_same(softplus_fn("fused"), softplus_first, inputs)
    assert_same(softplus_fn("reference"), softplus_first, inputs)

    def strided(**kw):  # the model's layout: (B, D, L) view of a (B, L, D) tensor
        kw["delta"] = kw["delta"].transpose(1, 2).contiguous().transpose(1, 2)
        return softplus_fn("fused")(**kw)

    assert_same(strided, softplus_first, inputs)


def test_fused_softplus_float32_and_portable_build():
    """In float32 the kernel's softplus is within a few ulp of torch's, the whole scan within the fused
    scan's usual float32 tolerance; the portable build agrees with the default one."""
    inputs = raw_delta(scan_inputs(batch=3, dim=40, n=16, length=50, dtype=torch.float32, D=True, z=True))
    assert_float32_close_to_float64(softplus_fn("fused"), softplus_first, inputs)
    # softplus alone: one step from a zero state with u = B = C = 1 and A = 0 gives y = softplus(x) per channel.
    # Against float64: the value and its derivative within 4e-7 (about 3 ulp) everywhere, down to 1e-38 (x = -88)
    x = torch.cat([torch.linspace(-40, 40, 4001), torch.tensor([20.0, 20.0001, 19.9999, -88.0, 88.0, 1e-7])])
    x = x.view(1, -1, 1).requires_grad_()
    ones = torch.ones(1, 1, 1)
    y, _ = fused_selective_scan(torch.ones_like(x), x, torch.zeros(x.shape[1], 1), ones, ones, delta_softplus=True)
    (gx,) = torch.autograd.grad(y.sum(), x)
    x64 = x.detach().double().requires_grad_()
    expected = torch.nn.functional.softplus(x64)
    (expected_gx,) = torch.autograd.grad(expected.sum(), x64)
    for got, want in ((y, expected.detach()), (gx, expected_gx)):
        rel = ((got.double() - want) / want).abs()
        assert rel.max() < 4e-7
    if EXT.load_error(portable=True) is None:
        a = fused_selective_scan(**inputs, delta_softplus=True, portable=True)
        b = fused_selective_scan(**inputs, delta_softplus=True)
        for p, q in zip(a, b, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_fused_float32_close_to_float64_reference():
    inputs = scan_inputs(batch=3, dim=40, n=16, length=50, dtype=torch.float32, D=True, z=True, state=True)
    assert_float32_close_to_float64(scan_fn("fused"), scan_fn("reference"), inputs)


def test_fused_bf16_inputs_match_fp32_reference():
    """As the other backends: bf16 in, float32 inside, one rounding at the end (see
    test_scan_bf16_inputs_match_fp32_reference); the gradients reach the bf16 leaves."""
    inputs = scan_inputs(batch=2, dim=8, n=4, length=40, dtype=torch.float32, D=True, z=True)
    bf = {k: (v if k == "A" else v.bfloat16()) for k, v in inputs.items()}
    expected = selective_scan(**{k: v.float() for k, v in bf.items()}, backend="reference")
    leaves = {k: leaf(v) for k, v in bf.items()}
    y = selective_scan(**leaves, backend="fused")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=2**-7, atol=1e-4)
    y.float().sum().backward()
    assert all(v.grad is not None and v.grad.dtype == v.dtype for v in leaves.values())


def test_fused_empty_sequence_passes_the_state_through():
    inputs = scan_inputs(batch=2, dim=3, n=4, length=0, state=True)
    y, last = selective_scan(**inputs, return_last_state=True, backend="fused")
    ref_y, ref_last = selective_scan(**inputs, return_last_state=True, backend="reference")
    assert y.shape == ref_y.shape == (2, 3, 0)
    torch.testing.assert_close(last, ref_last, rtol=0, atol=0)


def test_fused_non_finite_values_propagate_like_the_reference():
    """Never silently finite: a NaN decay, an overflowing positive decay (exp -> inf), a NaN
    input, and a decay that underflows to exactly 0 give the reference's NaN / inf / finite pattern."""
    inputs = scan_inputs(batch=1, dim=6, n=3, length=9)
    inputs["A"][0, 1] = float("nan")
    inputs["A"][1, 0] = 200.0  # delta * A up to ~ 200 * softplus: exp overflows in float32
    inputs["u"][0, 2, 4] = float("nan")
    inputs["A"][3, :] = -1e4  # exp(-1e4 * delta) == 0
    for dtype in (torch.float32, F64):
        cast = {k: v.to(dtype) for k, v in inputs.items()}
        y, last = selective_scan(**cast, return_last_state=True, backend="fused")
        ref_y, ref_last = selective_scan(**cast, return_last_state=True, backend="reference")
        for a, b in ((y, ref_y), (last, ref_last)):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isposinf(), b.isposinf())
            assert torch.equal(a.isneginf(), b.isneginf())
            finite = b.isfinite()
            torch.testing.assert_close(a[finite], b[finite], rtol=1e-5 if dtype == torch.float32 else 1e-10,
                                       atol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("shape", [(1, 100, 16, 45), (80, 70, 4, 9), (3, 33, 5, 70)],
                         ids=["one-row-many-groups", "many-rows", "odd"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_fused_same_bits_for_any_thread_count(shape, dtype):
    """Work is split by shape alone and cross-item sums run in a fixed order: one thread and
    several give bit-identical outputs and gradients."""
    batch, dim, n, length = shape
    inputs = scan_inputs(batch=batch, dim=dim, n=n, length=length, dtype=dtype, D=True, z=True, state=True)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            results.append(value_and_grads(scan_fn("fused"), inputs))
    finally:
        torch.set_num_threads(before)
    (outs1, grads1), (outs3, grads3) = results
    for a, b in zip(outs1, outs3, strict=True):
        assert torch.equal(a, b)
    for name in inputs:
        assert torch.equal(grads1[name], grads3[name]), name


@pytest.mark.parametrize("extras", ["plain", "D_z_state"])
def test_portable_build_matches_reference_float64(extras):
    """The generic-vector build (what CPUs without AVX-512 run: no scalef / roundscale, 2^k from
    exponent bits) is a separate extension; it builds once and must agree too."""
    if EXT.load_error(portable=True) is not None:
        pytest.skip(f"the portable build failed: {EXT.load_error(portable=True)}")
    assert EXT.ops(portable=True).variant() == "portable"
    inputs = scan_inputs(batch=2, dim=20, n=10, length=37, **options(extras))
    assert_same(fused_fn(portable=True), scan_fn("reference"), inputs)
    # and float32, down to the subnormal / overflow edges of 2^k
    x = scan_inputs(batch=1, dim=20, n=10, length=37, dtype=torch.float32, **options(extras))
    x["A"][:4] = -torch.logspace(-3, 3, 40).view(4, 10)
    x["A"][4] = 30.0
    a = fused_selective_scan(**x, portable=True)
    b = fused_selective_scan(**x)
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p.isfinite(), q.isfinite())
        torch.testing.assert_close(p[p.isfinite()], q[q.isfinite()], rtol=1e-5, atol=1e-30)


def test_auto_picks_fused_on_cpu(monkeypatch):
    assert SCAN.auto_backend("cpu") == "fused"
    calls = []
    original = SCAN.BACKENDS["fused"]
    monkeypatch.setitem(SCAN.BACKENDS, "fused", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    inputs = scan_inputs(batch=1, dim=2, n=2, length=5, dtype=torch.float32)
    selective_scan(**inputs)
    with torch.no_grad():
        selective_scan(**inputs)
    assert calls == [1, 1]


def test_fallback_to_the_recurrence_when_the_build_fails(monkeypatch, caplog):
    """No compiler, no ninja, a failed build: one warning, the automatic choice keeps the
    reference recurrence (same results), and an explicit backend='fused' says why it cannot run."""
    def broken(portable: bool = False) -> None:
        raise RuntimeError("Error building extension: no C++ compiler found")

    monkeypatch.setattr(EXT, "_load", broken)
    EXT.load_error.cache_clear()
    SCAN.OP.rule.cache_clear()  # the automatic choice was cached while the build worked
    try:
        with caplog.at_level(logging.WARNING, logger=EXT.__name__):
            assert SCAN.auto_backend("cpu") == "reference"
            assert SCAN.auto_backend("cpu") == "reference"
            inputs = scan_inputs(batch=2, dim=3, n=4, length=7, D=True, z=True, state=True)
            y = selective_scan(**inputs)
        warnings = [r for r in caplog.records if r.name == EXT.__name__ and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
        torch.testing.assert_close(y, selective_scan(**inputs, backend="reference"), rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="unavailable here.*no C\\+\\+ compiler"):
            selective_scan(**inputs, backend="fused")
    finally:
        EXT.load_error.cache_clear()  # the real loader again (the ops are already registered)
        SCAN.OP.rule.cache_clear()


def test_extension_is_cached_per_cpu_capability_and_respects_torch_extensions_dir(monkeypatch, tmp_path):
    """The build name carries torch's CPU capability (a shared cache never serves code built for
    instructions this CPU lacks); the cache location is torch's: TORCH_EXTENSIONS_DIR when set."""
    from torch.utils.cpp_extension import _get_build_directory

    opts = EXT.build_options()
    capability = torch.backends.cpu.get_cpu_capability().lower()
    assert opts["name"].endswith(capability) and EXT.build_options(portable=True)["name"].endswith("_portable")
    assert opts["sources"] == [str(p) for p in EXT.SOURCES] and all(p.exists() for p in EXT.SOURCES)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert _get_build_directory(opts["name"], verbose=False).startswith(str(tmp_path))
