"""The files and folders a user points the CLI at: text files and exported model directories are
checked here, so that what cannot be used gets one error naming the file and what was expected
(the CLI prints it as one line) instead of a traceback from deep inside a library."""

from __future__ import annotations

import json
import os
from pathlib import Path

# model_type in config.json -> what the directory holds, in words
MODEL_KINDS = {
    "defocus_vision": "a vision encoder or image classifier",
    "defocus_vlm": "a vision-language model",
    "defocus_clip": "a CLIP model",
}
# the weight files save_pretrained writes (single file or sharded with an index), safetensors first
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class UserFileError(ValueError):
    """A file or folder given by the user that cannot be used: names it and what was expected."""


def existing_file(path: str | os.PathLike, expected: str, error: type[Exception] = UserFileError,
                  missing: type[Exception] | None = None) -> Path:
    """``path`` when it is a file; else ``error`` (``missing`` for a path that does not exist, when
    given) naming it and ``expected``, what the file should be."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path} is a directory, expected {expected}")
    if not path.is_file():
        raise (missing or error)(f"{path} not found, expected {expected}")
    return path


def read_text(path: str | os.PathLike, expected: str) -> str:
    """The text of ``path`` decoded as UTF-8; ``expected`` says what the file should be (for the message)."""
    path = existing_file(path, expected)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a BOM from spreadsheet exports is not part of the first column name
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserFileError(f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}): "
                            f"expected {expected} in UTF-8; re-save it as UTF-8") from None


def _read_config_json(config_file: Path) -> dict:
    text = read_text(config_file, "the config.json written by save_pretrained")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserFileError(f"{config_file} is not valid JSON ({err}): expected the config.json written by "
                            f"save_pretrained") from None
    if not isinstance(config, dict):
        raise UserFileError(f"{config_file} holds a JSON {type(config).__name__}, expected an object of settings")
    return config


def _check_weight_files(model_dir: Path) -> None:
    present = [name for name in WEIGHT_FILES if (model_dir / name).is_file()]
    if not present:
        raise UserFileError(f"{model_dir} has config.json but no weights: expected model.safetensors (or "
                            f"pytorch_model.bin, or their sharded index) beside it; was the export interrupted?")
    name = present[0]
    if not name.startswith("model.safetensors"):
        return
    files = [model_dir / name]
    if name.endswith(".index.json"):
        index_file = model_dir / name
        try:
            weight_map = json.loads(read_text(index_file, "a safetensors index"))["weight_map"]
            files = [model_dir / shard for shard in sorted(set(weight_map.values()))]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise UserFileError(f"{index_file} is not a safetensors index (expected a JSON object with a "
                                f"'weight_map'): {err!r}") from None
    from safetensors import SafetensorError, safe_open

    for file in files:
        if not file.is_file():
            raise UserFileError(f"{file} not found: the index {name} lists it as a weight shard")
        try:  # reads and checks only the header: cheap, and catches truncated downloads
            with safe_open(file, "pt"):
                pass
        except SafetensorError as err:
            raise UserFileError(f"{file} is not a complete safetensors file ({err}): expected the weights "
                                f"written by save_pretrained; copy or download it again") from None


def check_model_dir(model_dir: str | os.PathLike, model_type: str) -> Path:
    """Check that ``model_dir`` is an exported model of ``model_type`` (a key of :data:`MODEL_KINDS`)
    whose config loads and whose weights are present and readable, before any loading starts."""
    from transformers import AutoConfig

    import defocus_vlm  # noqa: F401 - registers the model types with AutoConfig

    model_dir = Path(model_dir)
    wanted = f"{MODEL_KINDS[model_type]} (model_type {model_type!r})"
    if model_dir.exists() and not model_dir.is_dir():
        raise UserFileError(f"no model at {model_dir}: it is a file, expected a directory holding {wanted}")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        where = "" if model_dir.is_dir() else f"{model_dir} does not exist; "
        raise UserFileError(f"no model at {model_dir}: config.json missing ({where}expected a directory "
                            f"holding {wanted})")
    found = _read_config_json(config_file).get("model_type")
    if found != model_type:
        held = f"{MODEL_KINDS[found]} (model_type {found!r})" if found in MODEL_KINDS else f"model_type {found!r}"
        raise UserFileError(f"{config_file}: this is {held}, expected {wanted}")
    try:
        AutoConfig.from_pretrained(model_dir)
    except ValueError as err:  # the configs validate their fields with one clear ValueError
        raise UserFileError(f"{config_file}: {err}") from None
    _check_weight_files(model_dir)
    return model_dir
