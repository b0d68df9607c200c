"""The vision tower of every stage, from its ``model.vision`` (:class:`~.config.VisionTowerConfig`):
a preset's config (the stage builds the randomly initialised model), or the encoder saved in an export
directory (a vision model or classifier, a CLIP model, a VLM)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ConfigError, VisionTowerConfig

if TYPE_CHECKING:
    from defocus_vlm.configuration_defocus import DefocusVisionConfig
    from defocus_vlm.modeling_defocus import DefocusVisionModel

KEY = "model.vision"  # where every stage's run config keeps its VisionTowerConfig


def is_export(v: VisionTowerConfig) -> bool:
    """Whether ``source`` names a directory (else it is a preset name)."""
    return Path(v.source).is_dir()


def saved_model_type(v: VisionTowerConfig) -> str:
    """The ``model_type`` of the export in ``v.source``."""
    config = Path(v.source) / "config.json"
    if not config.is_file():
        raise ConfigError(f"{KEY}.source: no model at {v.source} (config.json missing; expected a De-focus vision "
                          "model, classifier, CLIP or VLM directory)")
    return json.loads(config.read_text()).get("model_type", "")


def tower_config(v: VisionTowerConfig, saved: Any = None, **fixed: Any) -> DefocusVisionConfig:
    """The DefocusVisionConfig of preset ``v.source`` (``saved`` None) or of an export's ``saved`` config,
    with ``v.overrides``. ``fixed``: the fields the stage sets itself (from its data or other keys)."""
    from defocus_vlm import DefocusVisionConfig

    for name in fixed:
        if name in v.overrides:
            raise ConfigError(f"{KEY}.overrides.{name} is set by the stage (from data.* / model.*); remove it")
    try:
        if saved is None:
            return DefocusVisionConfig.from_preset(v.source, **fixed, **v.overrides)
        architecture = {"preset": saved.preset, "head_type": saved.head_type, "aux_loss": saved.aux_loss,
                        "head_hidden_mult": saved.head_hidden_mult, "initializer_range": saved.initializer_range,
                        **saved.encoder_config().to_dict()}
        return DefocusVisionConfig(**{**architecture, **v.overrides, **fixed})
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{KEY}: {err}") from err


def refuse_reshaped(v: VisionTowerConfig, reshaped: list[tuple[str, Any, Any]]) -> None:
    """One line naming the export weights whose shape the configured tower does not have."""
    if reshaped:
        name, saved, configured = sorted(reshaped)[0]
        more = f" (+{len(reshaped) - 1} more)" if len(reshaped) > 1 else ""
        raise ConfigError(f"{KEY}: the weights saved in {v.source} do not fit the configured tower ({name} is "
                          f"{list(saved)} there, {list(configured)} here{more}); {KEY}.overrides={{}} takes the "
                          "export as it is (the stage's data.in_chans must suit it)")


def load_weights(module: Any, encoder: Any, v: VisionTowerConfig) -> None:
    """``encoder``'s weights into ``module`` (a DefocusVisionModel built from a changed config)."""
    saved, own = encoder.state_dict(), module.state_dict()
    refuse_reshaped(v, [(k, saved[k].shape, own[k].shape) for k in own if k in saved
                        and saved[k].shape != own[k].shape])
    module.load_state_dict(saved)


def load_encoder(v: VisionTowerConfig, apply_overrides: bool = True) -> DefocusVisionModel:
    """The DefocusVisionModel saved in directory ``v.source`` (a vision model or classifier, a CLIP model's
    image tower or a VLM's vision tower), rebuilt with ``v.overrides`` when there are any."""
    from defocus_vlm import DefocusCLIPModel, DefocusVisionModel
    from defocus_vlm.modeling_vlm import DefocusVLMForConditionalGeneration

    kind = saved_model_type(v)
    if kind == "defocus_vlm":
        encoder = DefocusVLMForConditionalGeneration.from_pretrained(v.source).vision_tower
    elif kind == "defocus_clip":
        encoder = DefocusCLIPModel.from_pretrained(v.source).vision_model
    elif kind == "defocus_vision":
        encoder = DefocusVisionModel.from_pretrained(v.source)
    else:
        raise ConfigError(f"{KEY}.source: {v.source} holds a {kind or 'unknown'} model, not a De-focus vision "
                          "model, classifier, CLIP model or VLM")
    if not (apply_overrides and v.overrides):  # as loaded (rebuilding would draw from the random generator)
        return encoder
    rebuilt = DefocusVisionModel(tower_config(v, encoder.config))
    load_weights(rebuilt, encoder, v)
    return rebuilt
