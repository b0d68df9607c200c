"""``python -m defocus_vlm.eval.lmms_eval_plugin`` prints the task folder for lmms-eval's ``--include_path``."""

from . import TASKS_DIR

print(TASKS_DIR)
