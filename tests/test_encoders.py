"""Encoders at tiny size: every preset builds and trains, causality, streaming, drop path,
class-token placement, position embeddings, tied RoPE and the plain-Mamba baseline."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import ALL_PRESETS, CAUSAL_FAMILIES, FAMILIES, images, rel_norm, tiny_encoder, tiny_encoder_config
from defocus_vlm.encoders import DefocusEncoder, get_preset
from defocus_vlm.encoders.layers import drop_path, drop_path_rates
from defocus_vlm.encoders.mixers import DefocusMambaMixer

F64 = torch.float64
NUM_PATCHES = 16  # 16 px images, 4 px patches
MIXERS_MOD = importlib.import_module("defocus_vlm.encoders.mixers")


def tokens(enc: DefocusEncoder, x: torch.Tensor, **kw) -> torch.Tensor:
    return enc(x, **kw)[0]


# ----------------------------------------------------------------------------- building
@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_every_preset_builds_and_runs_at_tiny_size(preset):
    enc = tiny_encoder(preset)
    cfg = get_preset(preset)
    assert enc.cfg.mixer == cfg["mixer"] and enc.cfg.causal == cfg.get("causal", True)
    out, hidden, attentions = enc(images(), output_hidden_states=True)
    assert attentions is None
    assert out.shape == (2, NUM_PATCHES + 1, 32)
    assert len(hidden) == 3 and all(h.shape == out.shape for h in hidden)
    assert torch.isfinite(out).all()


def test_presets_follow_the_paper():
    for size in ("tiny", "small", "base", "large"):
        for mixer in ("vit", "retnet", "mamba"):
            p = get_preset(f"defocus_{mixer}_{size}")
            assert (p["decay"], p["rope"], p.get("cls_position", "end"), p.get("pos_embed", "none")) == (
                "learnable", "learnable", "end", "none")
        assert get_preset(f"vit_{size}")["causal"] is False
        assert get_preset(f"vit_{size}")["cls_position"] == "start"
        assert get_preset(f"causal_mamba_{size}")["group_norm_size"] == 0
    small = get_preset("defocus_mamba_small")
    assert (small["embed_dim"], small["depth"]) == (384, 24)
    assert get_preset("defocus_mamba_large")["head_type"] == "mlp"


# ----------------------------------------------------------------------------- gradients
def _filter_params_of(block, mixer: str):
    """(decay name, rope name, module owning them) of a block's mixer."""
    m = block.mixer
    return ("A_log", "freq", m) if mixer == "mamba" else ("decay_log", "rope_freq", m.filter)


@pytest.mark.parametrize("mixer", ["vit", "retnet", "mamba"])
@pytest.mark.parametrize("decay, rope", [("learnable", "learnable"), ("fixed", "fixed"), ("none", "none"),
                                         ("learnable", "none"), ("none", "fixed")])
def test_forward_backward_and_filter_parameters(mixer, decay, rope):
    enc = tiny_encoder(f"defocus_{mixer}_tiny", decay=decay, rope=rope).train()
    (tokens(enc, images(), drop_path_rate=0.0) * torch.randn(2, NUM_PATCHES + 1, 32)).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    decay_name, rope_name, owner = _filter_params_of(enc.blocks[0], mixer)
    params = dict(owner.named_parameters(recurse=False))
    buffers = dict(owner.named_buffers(recurse=False))
    for name, mode in ((decay_name, decay), (rope_name, rope)):
        value = getattr(owner, name)
        if mode == "learnable":
            assert name in params and name not in buffers
            assert value.grad.abs().sum() > 0, f"no gradient reaches {name}"
        elif mode == "fixed":
            assert name in buffers and name not in params
            assert f"blocks.0.{'mixer' if mixer == 'mamba' else 'mixer.filter'}.{name}" in enc.state_dict()
        else:
            assert value is None and name not in params and name not in buffers
    for block in enc.blocks:  # every layer, not only the first
        _, _, o = _filter_params_of(block, mixer)
        assert (getattr(o, decay_name) is None) == (decay == "none")
        assert (getattr(o, rope_name) is None) == (rope == "none")


def test_mamba_decay_none_means_a_is_zero_and_fixed_keeps_s4d_init():
    none = tiny_encoder("defocus_mamba_tiny", decay="none").blocks[0].mixer
    assert torch.equal(none.decay_matrix(), torch.zeros(64, 8))
    fixed = tiny_encoder("defocus_mamba_tiny", decay="fixed").blocks[0].mixer
    torch.testing.assert_close(fixed.decay_matrix(), -torch.arange(1.0, 9.0).expand(64, 8))


# ----------------------------------------------------------------------------- causality
def perturb_patches_after(x: torch.Tensor, t: int, patch: int = 4) -> torch.Tensor:
    """Add noise to every patch whose raster index is > t."""
    y = x.clone()
    grid_w = x.shape[-1] // patch
    for i in range(t + 1, (x.shape[-2] // patch) * grid_w):
        r, c = divmod(i, grid_w)
        y[..., r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] += torch.randn(
            x.shape[0], x.shape[1], patch, patch, dtype=x.dtype)
    return y


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_causal_prefix_invariance(family):
    enc = tiny_encoder(f"{family}_tiny", dtype=F64)
    x = images(dtype=F64)
    out = tokens(enc, x)
    for t in (0, 5, 14):
        out2 = tokens(enc, perturb_patches_after(x, t))
        # token i is patch i (class token last): outputs up to t must not move at all
        torch.testing.assert_close(out2[:, : t + 1], out[:, : t + 1], rtol=0, atol=1e-12)
        assert (out2[:, t + 1] - out[:, t + 1]).abs().max() > 1e-6  # the next token does see it
        assert (out2[:, -1] - out[:, -1]).abs().max() > 1e-6  # and so does the class token


def test_non_causal_vit_is_not_prefix_invariant():
    enc = tiny_encoder("vit_tiny", dtype=F64)
    x = images(dtype=F64)
    out, out2 = tokens(enc, x), tokens(enc, perturb_patches_after(x, 5))
    # class token first, then patches: patch 0 (token 1) sees the later patches
    assert (out2[:, 1] - out[:, 1]).abs().max() > 1e-6
    assert (out2[:, 0] - out[:, 0]).abs().max() > 1e-6


# ----------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_stream_equals_one_shot(family):
    enc = tiny_encoder(f"{family}_tiny")
    x = images()
    with torch.no_grad():
        full = tokens(enc, x)
        for chunk in (1, 3, 7, NUM_PATCHES + 1, 100):
            parts = list(enc.stream(x, chunk))
            assert [p.shape[1] for p in parts[:-1]] == [chunk] * (len(parts) - 1)
            torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


def test_stream_retnet_longer_than_a_kernel_chunk():
    """65 tokens: the one-shot retention crosses its 64-token chunk boundary, the stream does not."""
    enc = tiny_encoder("defocus_retnet_tiny", img_size=32)
    x = images(size=32)
    with torch.no_grad():
        full = tokens(enc, x)
        assert full.shape[1] == 65
        torch.testing.assert_close(torch.cat(list(enc.stream(x, 7)), 1), full, rtol=0, atol=1e-5)


def test_stream_rejects_non_causal_and_bad_chunk():
    with pytest.raises(ValueError, match="causal"):
        list(tiny_encoder("vit_tiny").stream(images(), 4))
    with pytest.raises(ValueError, match="chunk_size"):
        list(tiny_encoder("defocus_mamba_tiny").stream(images(), 0))


# ----------------------------------------------------------------------------- drop path
def test_drop_path_rate_per_call_and_eval_mode():
    enc = tiny_encoder("defocus_vit_tiny")
    x = images(batch=8)
    with torch.no_grad():
        ref = tokens(enc, x)
        torch.testing.assert_close(tokens(enc, x, drop_path_rate=0.9), ref, rtol=0, atol=0)  # eval: no-op
        enc.train()
        torch.testing.assert_close(tokens(enc, x, drop_path_rate=0.0), ref, rtol=0, atol=0)
        torch.manual_seed(1)
        a = tokens(enc, x, drop_path_rate=0.9)
        torch.manual_seed(2)
        b = tokens(enc, x, drop_path_rate=0.9)
        assert not torch.allclose(a, b), "drop path with rate 0.9 must be stochastic in training"
        assert not torch.allclose(a, ref)


def test_drop_path_uses_config_rate_when_none_is_passed():
    enc = tiny_encoder("defocus_mamba_tiny", drop_path_rate=0.9).train()
    x = images(batch=8)
    with torch.no_grad():
        torch.manual_seed(1)
        a = tokens(enc, x)
        torch.manual_seed(2)
        b = tokens(enc, x)
        assert not torch.allclose(a, b)
        torch.testing.assert_close(tokens(enc, x, drop_path_rate=0.0), tokens(enc, x, drop_path_rate=0.0))


def test_drop_path_linspace_per_layer(monkeypatch):
    enc = tiny_encoder("defocus_retnet_tiny", depth=4).train()
    seen = []
    for block in enc.blocks:
        original = block.forward

        def spy(x, drop_rate=0.0, cache=None, offset=0, _orig=original):
            seen.append(drop_rate)
            return _orig(x, drop_rate, cache=cache, offset=offset)

        monkeypatch.setattr(block, "forward", spy)
    enc(images(), drop_path_rate=0.3)
    assert seen == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert drop_path_rates(0.5, 3) == pytest.approx([0.0, 0.25, 0.5])


def test_drop_path_drops_whole_samples_and_rescales():
    x = torch.ones(1000, 3, 2)
    y = drop_path(x, 0.25, training=True)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()
    assert 0.18 < (per_sample[:, 0] == 0).float().mean() < 0.32
    assert torch.equal(drop_path(x, 0.25, training=False), x)


def test_grad_checkpointing_gives_the_same_outputs_and_grads():
    enc = tiny_encoder("defocus_mamba_tiny").train()
    x = images()
    w = torch.randn(2, NUM_PATCHES + 1, 32)
    (tokens(enc, x, drop_path_rate=0.0) * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in enc.named_parameters()}
    enc.zero_grad()
    enc.set_grad_checkpointing(True)
    (tokens(enc, x, drop_path_rate=0.0) * w).sum().backward()
    for n, p in enc.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


# ----------------------------------------------------------------------------- class token
@pytest.mark.parametrize("family", ["defocus_vit", "defocus_mamba"])
def test_cls_position(family):
    x, x2 = images(), images()
    for position, length in (("end", NUM_PATCHES + 1), ("start", NUM_PATCHES + 1), ("none", NUM_PATCHES)):
        enc = tiny_encoder(f"{family}_tiny", cls_position=position)
        with torch.no_grad():
            out, out2 = tokens(enc, x), tokens(enc, x2)
        assert out.shape[1] == length
        assert enc.patch_tokens(out).shape[1] == NUM_PATCHES
        pooled = enc.pooled(out)
        if position == "end":
            assert torch.equal(pooled, out[:, -1])
            assert not torch.allclose(pooled, enc.pooled(out2))  # the last token sees the image
        elif position == "start":
            assert torch.equal(pooled, out[:, 0])
            # a causal class token at the start sees only itself: independent of the image
            torch.testing.assert_close(pooled, enc.pooled(out2), rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(pooled, out.mean(1))
            assert enc.cls_token is None


# ----------------------------------------------------------------------------- position embedding
@pytest.mark.parametrize("side", [(8, 8), (24, 24), (16, 24)])
def test_learned_pos_embed_at_another_image_size(side):
    enc = tiny_encoder("causal_vit_tiny")
    out = tokens(enc, torch.randn(2, 3, *side))
    assert out.shape == (2, (side[0] // 4) * (side[1] // 4) + 1, 32)
    assert torch.isfinite(out).all()


def test_pos_embed_interpolation_keeps_rows_and_columns():
    enc = tiny_encoder("causal_vit_tiny")
    with torch.no_grad():  # value = row index on the 4x4 grid (class token slot last)
        rows = torch.arange(4.0).repeat_interleave(4)
        enc.pos_embed[0, :-1] = rows[:, None]
    assert torch.equal(enc._patch_pos_embed((4, 4)), enc.pos_embed[:, :-1])
    wider = enc._patch_pos_embed((4, 7))  # only the width changes: each row stays constant
    torch.testing.assert_close(wider[0], torch.arange(4.0).repeat_interleave(7)[:, None].expand(28, 32),
                               rtol=0, atol=1e-5)
    assert enc._patch_pos_embed((6, 6)).shape == (1, 36, 32)


def test_mamba_runs_at_another_image_size_without_pos_embed():
    enc = tiny_encoder("defocus_mamba_tiny")
    assert enc.pos_embed is None
    assert tokens(enc, torch.randn(1, 3, 24, 20)).shape == (1, 31, 32)


# ----------------------------------------------------------------------------- tied RoPE, group norm
def _capture_scan(monkeypatch):
    calls = []
    original = MIXERS_MOD.selective_scan

    def spy(u, delta, A, B, C, D=None, z=None, **kw):
        calls.append(dict(A=A, B=B, C=C, D=D, z=z))
        return original(u, delta, A, B, C, D=D, z=z, **kw)

    monkeypatch.setattr(MIXERS_MOD, "selective_scan", spy)
    return calls


@pytest.mark.parametrize("tied", [True, False])
def test_rope_tied_gives_relative_bc_scores(monkeypatch, tied):
    cfg = tiny_encoder_config("defocus_mamba_tiny", rope_tied=tied)
    mixer = DefocusMambaMixer(cfg).double()
    with torch.no_grad():  # spread the frequencies so every rotation is visible over 12 tokens
        mixer.freq.copy_(torch.linspace(0.2, 1.5, mixer.freq.numel(), dtype=F64))
    assert mixer.freq.shape == ((4,) if tied else (8,))
    calls = _capture_scan(monkeypatch)
    x = torch.randn(1, 1, 32, dtype=F64).expand(1, 12, 32)  # the same token everywhere
    out = mixer(x)
    assert torch.isfinite(out).all()
    B, C = calls[0]["B"][0], calls[0]["C"][0]  # (N, L); before RoPE every token >= 3 is identical
    scores = C.T @ B  # scores[t, s] = C_t . B_s
    s = scores[3:, 3:]
    diag_gap = (s[1:, 1:] - s[:-1, :-1]).abs().max()
    A = mixer.decay_matrix()
    if tied:
        assert diag_gap < 1e-10  # depends on t - s only (the paper's Eq. 9)
        assert torch.equal(A[:, 0::2], A[:, 1::2])
    else:
        assert diag_gap > 1e-3  # the official untied form is not relative
        assert not torch.equal(A[:, 0::2], A[:, 1::2])


def test_mamba_group_norm_size_zero_is_plain_mamba(monkeypatch):
    calls = _capture_scan(monkeypatch)
    plain = tiny_encoder("defocus_mamba_tiny", group_norm_size=0)
    defocus = tiny_encoder("defocus_mamba_tiny")
    defocus.load_state_dict(plain.state_dict())  # the norm has no weights: same parameters
    x = images()
    with torch.no_grad():
        a, b = tokens(plain, x), tokens(defocus, x)
    assert torch.isfinite(a).all()
    assert not torch.allclose(a, b)
    n = len(plain.blocks)
    # plain Mamba gates inside the scan (D, z given); De-focus normalises first, then adds D x
    assert all(c["D"] is not None and c["z"] is not None for c in calls[:n])
    assert all(c["D"] is None and c["z"] is None for c in calls[n:])
    baseline = tiny_encoder("causal_mamba_tiny")
    assert baseline.cfg.group_norm_size == 0 and baseline.cfg.rope == "none"
    assert torch.isfinite(tokens(baseline, x)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_float64_and_bf16_forward(family):
    enc64 = tiny_encoder(f"{family}_tiny", dtype=F64)
    x = images(dtype=F64)
    ref = tokens(enc64, x)
    assert ref.dtype == F64
    enc16 = tiny_encoder(f"{family}_tiny").bfloat16()
    enc16.load_state_dict(enc64.state_dict())
    with torch.no_grad():
        out = tokens(enc16, x.bfloat16())
    assert torch.isfinite(out.float()).all()
    # LayerNormed outputs are O(1); bf16 through two blocks stays within a few 1e-2
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=0.15)


def test_rope_angles_stay_accurate_in_bf16():
    """A bf16 model rotates at positions up to ~200 (224 px images): the angles position * freq
    must not be rounded to bf16 (0.5 rad steps near 200 rad). Against a float32 filter holding the
    same bf16-rounded frequencies, the rotated bf16 values may differ by their own rounding only."""
    from defocus_vlm.encoders.band_pass import BandPassFilter

    f16 = BandPassFilter(2, 16, "learnable", "learnable", 10000.0).bfloat16()
    f32 = BandPassFilter(2, 16, "learnable", "learnable", 10000.0)
    with torch.no_grad():
        f32.rope_freq.copy_(f16.rope_freq.float())
    x = torch.randn(1, 2, 200, 16).bfloat16()
    with torch.no_grad():
        expected = f32.rotate(x.float(), 0)
        got = f16.rotate(x, 0)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=2**-6 * expected.abs().max().item())


def test_rms_norm_bf16_is_rounded_once_and_keeps_its_output_dtype():
    """bf16 in, bf16 weight: normalised and scaled in float32, rounded once (error of rounding the exact result;
    rounding before the scale put it at 1.4x). The output dtype is the weight's when that is half precision
    (a float32 residual in, bf16 out), else that of weight * x."""
    from defocus_vlm.encoders.layers import RMSNorm

    norm = RMSNorm(32, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    half = RMSNorm(32, 1e-5).bfloat16()
    half.load_state_dict(norm.state_dict())
    exact = RMSNorm(32, 1e-5).double()
    exact.load_state_dict(half.state_dict())
    x = torch.randn(4, 200, 32).bfloat16()
    with torch.no_grad():
        want, got = exact(x.double()), half(x)
        assert got.dtype == torch.bfloat16 and half(x.float()).dtype == torch.bfloat16
        assert norm(x).dtype == torch.float32 and exact(x.float()).dtype == F64
    assert rel_norm(got, want) < 1.1 * rel_norm(want.bfloat16(), want)


def test_mamba_delta_adds_the_dt_bias_in_fp32_under_bf16(monkeypatch):
    """mamba-ssm adds dt_proj's bias (-2.3 to -6.9) to W dt in float32: rounding the sum to bf16 costs Delta
    ~0.6 % on average, rounding W dt alone ~0.02 %. Delta (after its softplus) of a bf16 mixer against a float32
    mixer holding the same bf16 weights, on the same bf16 input."""
    cfg = tiny_encoder_config("defocus_mamba_tiny", embed_dim=64)
    half = DefocusMambaMixer(cfg).bfloat16()
    full = DefocusMambaMixer(cfg)
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    deltas = []
    scan = MIXERS_MOD.selective_scan

    def spy(u, delta, *args, delta_softplus=False, **kw):
        assert delta.dtype != torch.bfloat16
        deltas.append(torch.nn.functional.softplus(delta.double()) if delta_softplus else delta.double())
        return scan(u, delta, *args, delta_softplus=delta_softplus, **kw)

    monkeypatch.setattr(MIXERS_MOD, "selective_scan", spy)
    x = torch.randn(2, 100, 64).bfloat16()
    with torch.no_grad():
        full(x.float())
        half(x)
    want, got = deltas
    assert ((got - want).abs() / want).mean() < 1e-3
