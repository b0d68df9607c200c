"""Convert an official De-focus Mamba checkpoint (OpenGVLab/De-focus-Attention-Networks)
into a :class:`DefocusVisionForImageClassification` directory.

Official layout: ``patch_embed.proj.*``, ``cls_token``, ``blocks.{i}.norm.weight``,
``blocks.{i}.mixer.{in_proj,conv1d,x_proj,dt_proj,out_proj}.*``, ``blocks.{i}.mixer.{A_log,D,freq}``,
``norm.*``, ``head.*`` and ``head2.*`` (linear, or ``head.0/head.2`` MLP heads for IN-22k).
``head2`` is the auxiliary head applied to every patch token, hence ``aux_loss="token"``.
Sizes are inferred from the tensors.

A full training checkpoint of the official code (``classification/utils/utils.py``) also holds
``optimizer``, ``lr_scheduler``, ``epoch`` ... and ``config``, the run's yacs ``CfgNode``. That
config gives what the tensors cannot: the input size (``DATA.IMG_SIZE``), the resolution-transfer
factors (``MODEL.MAMBA.delta_scale_factor`` / ``rope_scale_factor``), ``group_norm_size`` and the
head type. ``torch.load(weights_only=True)`` refuses the CfgNode, so the file is read with a
restricted unpickler instead: tensors, plain containers and the CfgNode (as a plain dict) only;
any other global in the pickle is refused before anything is called.
"""

from __future__ import annotations

import codecs
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from .configuration_defocus import DefocusVisionConfig
from .modeling_defocus import DefocusVisionForImageClassification
from .user_files import existing_file

PREFIX = "defocus.encoder."
DOCS = "docs/official_checkpoints.md"
# What the official code assumes when a setting is not in the checkpoint (its yaml files set
# group_norm_size 64 for every released model; the factors are 1 at the training resolution).
DEFAULTS = {"img_size": 224, "delta_scale_factor": 1.0, "rope_scale_factor": 1.0, "group_norm_size": 64}


class CheckpointError(ValueError):
    """A checkpoint that does not have the official layout, with the offending key."""


# --------------------------------------------------------------------------- safe reading
class _ConfigNode(dict):
    """Takes the place of ``yacs.config.CfgNode`` while unpickling: a plain dict of the settings."""

    def __setstate__(self, state) -> None:
        pass  # yacs keeps only bookkeeping there (frozen flag, deprecated and renamed keys)


# Every global the restricted unpickler may resolve; anything else is refused unresolved. This is
# what torch.save writes for tensors and state dicts, plus the yacs config node.
_ALLOWED_GLOBALS: dict[str, object] = {
    "collections.OrderedDict": OrderedDict,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "builtins.set": set,  # yacs' deprecated-keys bookkeeping
    "builtins.frozenset": frozenset,
    "__builtin__.set": set,  # the names pickle protocol 2 writes for them (find_class sees them unmapped)
    "__builtin__.frozenset": frozenset,
    "_codecs.encode": codecs.encode,  # how pickle protocol 2 writes bytes
    "yacs.config.CfgNode": _ConfigNode,
}


class _RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside :data:`_ALLOWED_GLOBALS`."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:  # every global a pickle can name passes through here
        target = _ALLOWED_GLOBALS.get(f"{module}.{name}")
        if target is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return target


class _RestrictedPickle:
    """The ``pickle_module`` handed to torch.load: its storage handling, with our unpickler underneath."""

    Unpickler = _RestrictedUnpickler

    @staticmethod
    def load(file: IO[bytes], **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


def _plain(value):
    """Config values with every :class:`_ConfigNode` turned into a plain dict."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The top-level object of an official ``.pth`` file, read without running code from it."""
    path = existing_file(path, "an official checkpoint file (.pth)", CheckpointError, missing=FileNotFoundError)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickle)
    except _RefusedGlobal as err:
        raise CheckpointError(f"refusing to read {path}: its pickle references {err}, which is not a tensor, "
                              f"a plain container or a yacs config; expected an official checkpoint") from None
    except Exception as err:  # noqa: BLE001 - truncated/corrupt files raise many kinds of errors
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]  # torch's messages run long
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line} (expected a complete .pth file "
                              f"written by torch.save)") from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, expected a dict (a state dict, or a "
                              f"training checkpoint with 'model' / 'model_ema')")
    return _plain(ckpt)  # no stand-in class leaves this module


@dataclass
class OfficialCheckpoint:
    """The weights picked from an official file, and the training config it carries (if any)."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    entry: str  # "model_ema", "model", or "" for a bare state dict
    config: dict | None  # the yacs config as nested dicts


def load_official_checkpoint(path: str | os.PathLike, ema: bool | None = None) -> OfficialCheckpoint:
    """``ema``: None takes ``model_ema`` when present (the official evaluation reports the EMA), True
    requires it, False takes ``model``."""
    ckpt = read_checkpoint(path)
    config = ckpt.get("config")
    if config is not None and not isinstance(config, dict):
        raise CheckpointError(f"{path}: 'config' is a {type(config).__name__}, expected the training config")
    if ema is None:
        ema = "model_ema" in ckpt
    entry = "model_ema" if ema else "model" if "model" in ckpt else ""
    return OfficialCheckpoint(Path(path), pick_state_dict(ckpt, ema, where=str(path)), entry, config)


def load_official_state_dict(path: str | os.PathLike, ema: bool | None = False) -> dict[str, torch.Tensor]:
    return load_official_checkpoint(path, ema).state_dict


def pick_state_dict(ckpt: dict, ema: bool = False, where: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The ``model`` (or ``model_ema``) entry of a training checkpoint, or a bare state dict."""
    key = "model_ema" if ema else "model"
    if isinstance(ckpt, dict) and key in ckpt:
        ckpt = ckpt[key]
    elif ema:
        raise CheckpointError(f"--ema asked for, but {where} has no 'model_ema' entry")
    if not isinstance(ckpt, dict) or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise CheckpointError(f"{where}: expected a state dict (or a dict with 'model' / 'model_ema') of tensors")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


# --------------------------------------------------------------------------- the training config
def _get(config: Mapping, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def config_settings(config: Mapping, where: str) -> dict[str, tuple[str, object]]:
    """Converter settings from an official training config: name -> (config key, value)."""
    out: dict[str, tuple[str, object]] = {}
    for name, key, kind in (("img_size", "DATA.IMG_SIZE", int),
                            ("delta_scale_factor", "MODEL.MAMBA.delta_scale_factor", float),
                            ("rope_scale_factor", "MODEL.MAMBA.rope_scale_factor", float),
                            ("group_norm_size", "MODEL.MAMBA.group_norm_size", int)):
        value = _get(config, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or kind(value) != value:
            expected = "an integer" if kind is int else "a number"
            raise CheckpointError(f"{where}: config {key} is {value!r}, expected {expected}")
        out[name] = (key, kind(value))
    head = _get(config, "MODEL.head_type")
    if head is not None:
        # official names: IN1k_cls (linear), IN22k_cls and IN22kto1k_cls (Linear-Tanh-Linear)
        if not isinstance(head, str) or "cls" not in head or not ("IN22k" in head or "IN1k" in head):
            raise CheckpointError(f"{where}: config MODEL.head_type {head!r} is not supported; expected a class-token "
                                  f"head (IN1k_cls, IN22k_cls or IN22kto1k_cls)")
        out["head_type"] = ("MODEL.head_type", "mlp" if "IN22k" in head else "linear")
    if _get(config, "MODEL.patch_embed_change_res"):
        raise CheckpointError(f"{where}: config MODEL.patch_embed_change_res is set: its patches come in another "
                              f"order, which this converter does not reproduce")
    if _get(config, "MODEL.use_pos_embed"):
        raise CheckpointError(f"{where}: config MODEL.use_pos_embed is set: absolute position embeddings of the "
                              f"official layout are not supported by this converter")
    return out


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
    inner = in_proj.shape[0] // 2
    if in_proj.shape[0] % 2 or inner % dim:
        # the model's inner width is expand x width; a remainder would surface as a shape mismatch on A_log
        raise CheckpointError(f"key 'blocks.0.mixer.in_proj.weight' {tuple(in_proj.shape)}: inner width "
                              f"{in_proj.shape[0] / 2:g} is not a multiple of the width {dim}; only inner widths "
                              f"of expand x width (an integer expand) can be converted")
    a_log = _require(sd, "blocks.0.mixer.A_log", 2)
    dt_proj = _require(sd, "blocks.0.mixer.dt_proj.weight", 2)
    conv = _require(sd, "blocks.0.mixer.conv1d.weight", 3)
    mlp_head = "head.0.weight" in sd
    head_w = sd.get("head.2.weight" if mlp_head else "head.weight")
    values = dict(
        mixer="mamba", img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=dim, depth=depth,
        expand=inner // dim, d_state=a_log.shape[1], dt_rank=dt_proj.shape[1], d_conv=conv.shape[2],
        rope="learnable" if "blocks.0.mixer.freq" in sd else "none", decay="learnable", rope_tied=False,
        group_norm_size=DEFAULTS["group_norm_size"], pos_embed="none",
        cls_position="end" if "cls_token" in sd else "none",
        head_type="mlp" if mlp_head else "linear",
        head_hidden_mult=(sd["head.0.weight"].shape[0] // dim) if mlp_head else 3,
        aux_loss="token" if any(k.startswith("head2.") for k in sd) else "none",
        num_labels=head_w.shape[0] if head_w is not None else 0,
    )
    values.update(overrides)
    return DefocusVisionConfig(**values)


def check_config_matches(config: Mapping, model_config: DefocusVisionConfig, where: str) -> None:
    """The training config must describe these weights (a config from another run would mislead)."""
    pairs = (("MODEL.MAMBA.intermediate_size", model_config.d_inner), ("MODEL.MAMBA.state_size", model_config.d_state),
             ("MODEL.MAMBA.time_step_rank", model_config.dt_rank), ("MODEL.MAMBA.conv_kernel", model_config.d_conv),
             ("MODEL.depth", model_config.depth), ("MODEL.NUM_CLASSES", model_config.num_labels),
             ("MODEL.use_rope", model_config.rope != "none"), ("MODEL.use_aux_loss", model_config.aux_loss == "token"))
    for key, from_weights in pairs:
        value = _get(config, key)
        if value is not None and value != from_weights:
            raise CheckpointError(f"{where}: config {key} is {value!r} but the weights say {from_weights!r}; "
                                  f"expected the config of the run that wrote these weights")


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


def resolve_settings(ckpt: OfficialCheckpoint, given: Mapping[str, object],
                     say: Callable[[str], None]) -> dict[str, object]:
    """Converter settings: flags given by the user, else the checkpoint's training config, else
    :data:`DEFAULTS`; says where each came from when it matters."""
    from_config = config_settings(ckpt.config, str(ckpt.path)) if ckpt.config else {}
    settings: dict[str, object] = {**DEFAULTS, **{name: value for name, (_, value) in from_config.items()}}
    for name, value in given.items():
        if name in from_config and from_config[name][1] != value:
            key, config_value = from_config[name]
            say(f"{name}={value} as given, instead of the checkpoint's {key} = {config_value}")
        settings[name] = value
    used = [f"{name}={settings[name]}" for name in from_config if name not in given]
    if used:
        say("from the checkpoint's training config: " + ", ".join(used))
    elif not from_config and not given:
        say(f"{ckpt.path} carries no training config: img_size 224 and scale factors 1 are assumed; "
            f"{DOCS} lists the flags each released file needs")
    return settings


def convert(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, ema: bool | None = None,
            img_size: int | None = None, say: Callable[[str], None] | None = None,
            **overrides) -> DefocusVisionForImageClassification:
    """Read, check, convert and save; returns the converted model.

    ``ema``: None takes ``model_ema`` when the file has it, True requires it, False takes ``model``.
    ``img_size`` and ``overrides`` (e.g. ``delta_scale_factor``) left at None come from the
    checkpoint's training config, else :data:`DEFAULTS`. ``say`` receives what was chosen and why."""
    from .image_processing_defocus import DefocusImageProcessor

    say = say or (lambda message: None)
    ckpt = load_official_checkpoint(checkpoint, ema=ema)
    if ckpt.entry == "model_ema" and ema is None:
        say(f"converting 'model_ema' (the EMA weights, which the official evaluation reports) of {ckpt.path}; "
            f"--raw converts 'model' instead")
    given = {k: v for k, v in {"img_size": img_size, **overrides}.items() if v is not None}
    settings = resolve_settings(ckpt, given, say)
    head_type = settings.pop("head_type", None)
    config = infer_config(ckpt.state_dict, **settings)
    if head_type is not None and head_type != config.head_type:
        raise CheckpointError(f"{ckpt.path}: config MODEL.head_type asks for a {head_type} head, but the weights "
                              f"hold a {config.head_type} head")
    if ckpt.config:
        check_config_matches(ckpt.config, config, str(ckpt.path))
    if config.num_labels == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        config.id2label = {i: info.index_to_description(i) for i in range(1000)}
        config.label2id = {v: k for k, v in config.id2label.items()}
    model = convert_state_dict(ckpt.state_dict, config)
    model.save_pretrained(out_dir)
    DefocusImageProcessor(size=config.img_size, num_channels=config.in_chans).save_pretrained(out_dir)
    return model
