"""Make saved directories loadable with ``trust_remote_code=True`` in a process that never
imported ``defocus_vlm``: a one-line module that imports the installed package, plus an
``auto_map`` pointing at it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SHIM = "defocus_remote.py"
_EXPORTS = (
    "DefocusVisionConfig", "DefocusVisionModel", "DefocusVisionForImageClassification",
    "DefocusImageProcessor",
    "DefocusCLIPConfig", "DefocusCLIPModel", "DefocusCLIPProcessor",
    "DefocusVLMConfig", "DefocusVLMForConditionalGeneration", "DefocusVLMProcessor",
)


def write_remote_code(save_dir: str | os.PathLike, auto_map: dict[str, str], config_file: str) -> None:
    """Write the shim next to the weights and add ``auto_map`` to ``config_file`` (a JSON in save_dir)."""
    save_dir = Path(save_dir)
    (save_dir / SHIM).write_text(
        '"""Written by defocus_vlm: the model classes live in the installed package '
        '(pip install defocus-vlm)."""\n'
        f"from defocus_vlm import {', '.join(_EXPORTS)}  # noqa: F401\n"
    )
    path = save_dir / config_file
    data = json.loads(path.read_text())
    data["auto_map"] = {auto: f"{SHIM[:-3]}.{name}" for auto, name in auto_map.items()}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class RemoteCodeMixin:
    """For a ``PreTrainedModel`` (listed before it in the bases): ``save_pretrained`` also writes the
    shim and the ``auto_map`` of :meth:`remote_auto_map` into config.json (on the main process)."""

    def remote_auto_map(self) -> dict[str, str]:
        """Auto class -> class name of this package, for config.json's ``auto_map``."""
        raise NotImplementedError

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, is_main_process: bool = True,
                        **kwargs: Any) -> None:
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            write_remote_code(save_directory, self.remote_auto_map(), "config.json")
