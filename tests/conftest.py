"""Shared helpers for the test suite: tiny configs, preset families, deterministic seeds.

Everything here is CPU-only and tiny (embed_dim 32, depth 2, 16 px images, 4 px patches),
so the whole suite runs in about a minute on two cores.
"""

from __future__ import annotations

import pytest
import torch
from defocus_vlm.encoders import EncoderConfig, list_presets
from defocus_vlm.kernels.dispatch import ENV_VAR

# Tiny overrides valid for every preset: 16 patches (+1 class token) of width 32, 2 blocks.
TINY = dict(
    embed_dim=32,
    depth=2,
    num_heads=2,
    img_size=16,
    patch_size=4,
    mlp_ratio=2.0,
    d_state=8,
    dt_rank=8,
    group_norm_size=16,  # d_inner = 64 -> 4 groups, so the group norm really groups
)

FAMILIES = ("defocus_vit", "defocus_retnet", "defocus_mamba", "causal_vit", "vit", "causal_mamba")
CAUSAL_FAMILIES = tuple(f for f in FAMILIES if f != "vit")
ALL_PRESETS = tuple(list_presets())


def _tiny_values(preset: str, overrides: dict) -> dict:
    from defocus_vlm.encoders import get_preset

    base = get_preset(preset)
    values = {k: v for k, v in base.items() if k in EncoderConfig.field_names()}
    values.update(TINY)
    if base.get("group_norm_size") == 0:  # the plain-Mamba baselines keep their norm switched off
        values["group_norm_size"] = 0
    values.update(overrides)
    return values


def tiny_encoder_config(preset: str = "defocus_mamba_small", **overrides) -> EncoderConfig:
    """A validated :class:`EncoderConfig` of ``preset`` shrunk to test size (overrides win)."""
    return EncoderConfig.from_dict(_tiny_values(preset, overrides))


def tiny_config(preset: str = "defocus_mamba_small", **overrides):
    """A :class:`DefocusVisionConfig` of ``preset`` at test size; HF fields (num_labels, aux_loss,
    head_type, id2label, ...) may be given in ``overrides`` too."""
    from defocus_vlm import DefocusVisionConfig

    encoder_overrides = {k: v for k, v in overrides.items() if k in EncoderConfig.field_names()}
    other = {k: v for k, v in overrides.items() if k not in encoder_overrides}
    values = _tiny_values(preset, encoder_overrides)
    return DefocusVisionConfig.from_preset(preset, **values, **other)


def tiny_encoder(preset: str = "defocus_mamba_small", dtype: torch.dtype = torch.float32, **overrides):
    from defocus_vlm.encoders import DefocusEncoder

    return DefocusEncoder(tiny_encoder_config(preset, **overrides)).to(dtype).eval()


def images(batch: int = 2, size: int = 16, channels: int = 3, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, dtype=dtype)


def rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against ``b`` in norm, computed in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(autouse=True)
def _seed_and_clean_env(monkeypatch):
    """Same seed for every test; no kernel override leaking in from the caller's shell."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def fused_scan_built() -> None:
    """The fused CPU selective scan (a C++ op built just in time, once per machine: the build is
    cached under TORCH_EXTENSIONS_DIR). Tests that need it skip, saying why, where it cannot be
    built (no compiler or ninja)."""
    from defocus_vlm.kernels.cpu_extension import load_error

    error = load_error()
    if error is not None:
        pytest.skip(f"the fused CPU selective scan could not be built here: {error}")
