"""Parameter counts of the full-size presets against the published numbers, built on the meta
device (no memory, no init cost). Classification model, 1000 classes, with the auxiliary head."""

from __future__ import annotations

import pytest
import torch

from defocus_vlm import DefocusVisionConfig, DefocusVisionForImageClassification


def count(preset: str, **overrides) -> int:
    cfg = DefocusVisionConfig.from_preset(preset, num_labels=1000, **overrides)
    with torch.device("meta"):
        model = DefocusVisionForImageClassification(cfg)
    assert model.aux_head is not None
    assert all(p.device.type == "meta" for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "preset, expected",
    [
        # the official De-focus Mamba checkpoints (Mamba-L: IN-22k MLP heads)
        ("defocus_mamba_small", 25_092_944),
        ("defocus_mamba_base", 92_650_832),
        ("defocus_mamba_large", 330_117_840),
    ],
)
def test_mamba_counts_match_official_exactly(preset, expected):
    assert count(preset) == expected


def test_mamba_base_without_aux_head():
    """The paper's 91.88M for Mamba-B is without the auxiliary head (768 * 1000 + 1000 fewer)."""
    cfg = DefocusVisionConfig.from_preset("defocus_mamba_base", num_labels=1000, aux_loss="none")
    with torch.device("meta"):
        model = DefocusVisionForImageClassification(cfg)
    assert model.aux_head is None
    assert sum(p.numel() for p in model.parameters()) == 92_650_832 - (768 * 1000 + 1000)


@pytest.mark.parametrize(
    "preset, published",
    [("defocus_vit_small", 22.4e6), ("defocus_vit_base", 87.4e6), ("defocus_retnet_base", 94.1e6)],
)
def test_attention_counts_within_half_a_percent(preset, published):
    n = count(preset)
    assert abs(n - published) / published < 0.005, f"{preset}: {n:,} vs {published:,.0f}"
