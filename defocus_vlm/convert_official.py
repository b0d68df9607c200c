"""Convert an official De-focus Mamba checkpoint (OpenGVLab/De-focus-Attention-Networks)
into a :class:`DefocusVisionForImageClassification` directory.

Official layout: ``patch_embed.proj.*``, ``cls_token``, ``blocks.{i}.norm.weight``,
``blocks.{i}.mixer.{in_proj,conv1d,x_proj,dt_proj,out_proj}.*``, ``blocks.{i}.mixer.{A_log,D,freq}``,
``norm.*``, ``head.*`` and ``head2.*`` (linear, or ``head.0/head.2`` MLP heads for IN-22k).
``head2`` is the auxiliary head applied to every patch token, hence ``aux_loss="token"``.
Sizes are inferred from the tensors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .configuration_defocus import DefocusVisionConfig
from .modeling_defocus import DefocusVisionForImageClassification

PREFIX = "defocus.encoder."


class CheckpointError(ValueError):
    """A checkpoint that does not have the official layout, with the offending key."""


def load_official_state_dict(path: str | os.PathLike, ema: bool = False) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated/corrupt files raise many kinds of errors
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    return pick_state_dict(ckpt, ema)


def pick_state_dict(ckpt: dict, ema: bool = False) -> dict[str, torch.Tensor]:
    """The ``model`` (or ``model_ema``) entry of a training checkpoint, or a bare state dict."""
    key = "model_ema" if ema else "model"
    if isinstance(ckpt, dict) and key in ckpt:
        ckpt = ckpt[key]
    elif ema:
        raise CheckpointError("--ema asked for, but the checkpoint has no 'model_ema' entry")
    if not isinstance(ckpt, dict) or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise CheckpointError("expected a state dict (or a dict with 'model' / 'model_ema') of tensors")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def _require(sd: dict[str, torch.Tensor], key: str, dims: int) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"missing key {key!r} in the official checkpoint")
    if sd[key].dim() != dims:
        raise CheckpointError(f"key {key!r}: expected a {dims}-d tensor, found shape {tuple(sd[key].shape)}")
    return sd[key]


def infer_config(sd: dict[str, torch.Tensor], img_size: int = 224, **overrides) -> DefocusVisionConfig:
    patch = _require(sd, "patch_embed.proj.weight", 4)
    dim, in_chans, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise CheckpointError("no 'blocks.{i}.*' keys found: not a De-focus Mamba checkpoint")
    in_proj = _require(sd, "blocks.0.mixer.in_proj.weight", 2)
    a_log = _require(sd, "blocks.0.mixer.A_log", 2)
    dt_proj = _require(sd, "blocks.0.mixer.dt_proj.weight", 2)
    conv = _require(sd, "blocks.0.mixer.conv1d.weight", 3)
    mlp_head = "head.0.weight" in sd
    head_w = sd.get("head.2.weight" if mlp_head else "head.weight")
    values = dict(
        mixer="mamba", img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=dim, depth=depth,
        expand=in_proj.shape[0] // 2 // dim, d_state=a_log.shape[1], dt_rank=dt_proj.shape[1], d_conv=conv.shape[2],
        rope="learnable" if "blocks.0.mixer.freq" in sd else "none", decay="learnable", rope_tied=False,
        group_norm_size=64, pos_embed="none", cls_position="end" if "cls_token" in sd else "none",
        head_type="mlp" if mlp_head else "linear",
        head_hidden_mult=(sd["head.0.weight"].shape[0] // dim) if mlp_head else 3,
        aux_loss="token" if any(k.startswith("head2.") for k in sd) else "none",
        num_labels=head_w.shape[0] if head_w is not None else 0,
    )
    values.update(overrides)
    return DefocusVisionConfig(**values)


def rename_key(key: str) -> str:
    if key.startswith("head2."):
        return "aux_head." + key[len("head2."):]
    if key.startswith("head."):
        return key
    return PREFIX + key


def convert_state_dict(sd: dict[str, torch.Tensor], config: DefocusVisionConfig) -> DefocusVisionForImageClassification:
    """Build the model and load the renamed tensors, checking every key and shape."""
    with torch.device("meta"):
        model = DefocusVisionForImageClassification(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    renamed = {rename_key(k): v for k, v in sd.items()}
    for key, shape in expected.items():
        if key not in renamed:
            raise CheckpointError(f"missing key {_official_name(key)!r} (expected shape {tuple(shape)})")
        if renamed[key].shape != shape:
            raise CheckpointError(f"key {_official_name(key)!r}: expected shape {tuple(shape)}, "
                                  f"found {tuple(renamed[key].shape)}")
    unexpected = sorted(set(renamed) - set(expected))
    if unexpected:
        names = [_official_name(k) for k in unexpected[:5]]
        raise CheckpointError(f"unexpected keys in the official checkpoint: {names}")
    model = model.to_empty(device="cpu")
    model.load_state_dict({k: renamed[k].float() for k in expected}, strict=True, assign=True)
    return model.eval()


def _official_name(key: str) -> str:
    if key.startswith("aux_head."):
        return "head2." + key[len("aux_head."):]
    return key.removeprefix(PREFIX)


def convert(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, ema: bool = False, img_size: int = 224,
            **overrides) -> DefocusVisionForImageClassification:
    """Read, check, convert and save; returns the converted model."""
    from .image_processing_defocus import DefocusImageProcessor

    sd = load_official_state_dict(checkpoint, ema=ema)
    config = infer_config(sd, img_size=img_size, **overrides)
    if config.num_labels == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        config.id2label = {i: info.index_to_description(i) for i in range(1000)}
        config.label2id = {v: k for k, v in config.id2label.items()}
    model = convert_state_dict(sd, config)
    model.save_pretrained(out_dir)
    DefocusImageProcessor(size=img_size, num_channels=config.in_chans).save_pretrained(out_dir)
    return model
