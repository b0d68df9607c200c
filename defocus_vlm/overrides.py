"""``key=value`` assignments as typed on command lines (run-config overrides, ``PRESET:key=value`` model
specs): the key split at dots, the value read as YAML so numbers, booleans and lists keep their type."""

from __future__ import annotations

from typing import Any

import yaml


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=10"`` -> ``(["train", "epochs"], 10)``; a malformed one raises ValueError."""
    if "=" not in text:
        raise ValueError(f"{text!r} must look like dotted.key=value (e.g. train.epochs=10)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"{text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ValueError(f"{text!r}: cannot parse value: {err}") from err
    return key.split("."), value
