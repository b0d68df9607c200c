"""lmms-eval plugin: the model ``defocus_vlm`` and two offline tasks on easy-VQA's test split,
``defocus_easy_vqa`` (greedy short answers, exact match) and ``defocus_easy_vqa_mc`` (the 13 easy-VQA
answers ranked by the model's likelihood); ``defocus_shapes_vqa`` and ``defocus_shapes_vqa_unseen`` on
shapes-VQA's test splits (the export that ``DEFOCUS_SHAPES_VQA_DIR`` names; see ``shapes_vqa_task``).

How lmms-eval 0.7 finds them (read from its source):

- models: the Python entry-point group ``lmms_eval.models``. This package's entry point (pyproject.toml)
  is :func:`model_manifest`, so ``--model defocus_vlm`` works once defocus-vlm is installed.
- tasks: there is no entry point for tasks; lmms-eval indexes the YAMLs under ``--include_path DIR``
  (``python -m defocus_vlm.eval.lmms_eval_plugin`` prints this package's task folder) or takes a YAML
  path as ``--tasks``. Its ``LMMS_EVAL_PLUGINS`` variable does not help in 0.7: the plugin's task folder
  is added to the include path only after the task index has been built.

Run::

    lmms-eval --model defocus_vlm --model_args pretrained=DIR --device cpu \\
        --include_path "$(python -m defocus_vlm.eval.lmms_eval_plugin)" \\
        --tasks defocus_easy_vqa,defocus_easy_vqa_mc --limit 100
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmms_eval.models.registry_v2 import ModelManifest

TASKS_DIR = Path(__file__).parent / "tasks"
MODEL_NAME = "defocus_vlm"
MODEL_CLASS_PATH = "defocus_vlm.eval.lmms_eval_plugin.model.DefocusVLM"


def model_manifest() -> ModelManifest:
    """The ``lmms_eval.models`` entry point: registers :class:`~.model.DefocusVLM` as ``defocus_vlm``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS_PATH)
