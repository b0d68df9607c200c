"""Named architectures: the three De-focus encoders and the baselines they are compared with.

A preset is a dict of config overrides (encoder fields plus the classification head's
``head_type``), so ``DefocusVisionConfig.from_preset(name, **overrides)`` can change anything.
"""

from __future__ import annotations

import difflib

_SIZES = {
    # name: (embed_dim, attention depth, heads, mamba depth)
    "tiny": (192, 12, 3, 24),
    "small": (384, 12, 6, 24),
    "base": (768, 12, 12, 24),
    "large": (1024, 24, 16, 48),
}

_FAMILIES = {
    # De-focus: learnable decay + learnable RoPE, class token at the end, no position embedding.
    "defocus_vit": dict(mixer="vit", causal=True, decay="learnable", rope="learnable"),
    "defocus_retnet": dict(mixer="retnet", causal=True, decay="learnable", rope="learnable"),
    "defocus_mamba": dict(mixer="mamba", decay="learnable", rope="learnable", group_norm_size=64),
    # Baselines: plain causal models keep an absolute position embedding (DeiT / Vim style).
    "causal_vit": dict(mixer="vit", causal=True, decay="none", rope="none", pos_embed="learned"),
    "vit": dict(mixer="vit", causal=False, decay="none", rope="none", pos_embed="learned",
                cls_position="start"),
    "causal_mamba": dict(mixer="mamba", decay="learnable", rope="none", group_norm_size=0,
                         pos_embed="learned"),
}


def _build() -> dict[str, dict]:
    table = {}
    for family, base in _FAMILIES.items():
        for size, (dim, att_depth, heads, mamba_depth) in _SIZES.items():
            cfg = dict(base, embed_dim=dim, num_heads=heads)
            cfg["depth"] = mamba_depth if base["mixer"] == "mamba" else att_depth
            if family == "defocus_mamba" and size == "large":
                cfg["head_type"] = "mlp"  # the official IN-22k heads: Linear(D, 3D), Tanh, Linear
            table[f"{family}_{size}"] = cfg
    return table


PRESETS: dict[str, dict] = _build()


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint} Known presets: {', '.join(list_presets())}")
    return dict(PRESETS[name])
