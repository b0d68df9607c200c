"""The packaged lmms-eval tasks on shapes-VQA (``defocus_shapes_vqa``: the test split,
``defocus_shapes_vqa_unseen``: test_unseen), read from the folder that ``defocus-vlm data shapes-vqa
--output-dir DIR`` wrote, named by the environment variable ``DEFOCUS_SHAPES_VQA_DIR`` (lmms-eval gives
tasks no arguments of their own). Prompts, images, targets and scores are easy-VQA's: greedy short
answers, exact match; each logged sample keeps its question's ``type``, ``region`` and ``combination``."""

from __future__ import annotations

import os
from pathlib import Path

from .easy_vqa_task import EasyVQATask, doc_to_target, doc_to_text, doc_to_visual, process_results

ENV_VAR = "DEFOCUS_SHAPES_VQA_DIR"

__all__ = ["ENV_VAR", "ShapesVQATask", "data_dir", "doc_to_target", "doc_to_text", "doc_to_visual", "process_results"]


def data_dir() -> Path:
    """The shapes-VQA export that ``DEFOCUS_SHAPES_VQA_DIR`` names."""
    folder = os.environ.get(ENV_VAR)
    if not folder:
        raise FileNotFoundError(
            f"the shapes-VQA tasks read the folder that `defocus-vlm data shapes-vqa --output-dir DIR` wrote: "
            f"set {ENV_VAR}=DIR"
        )
    return Path(folder)


class ShapesVQATask(EasyVQATask):
    benchmark = "shapes-vqa"

    def data_path(self) -> Path:
        return data_dir()
