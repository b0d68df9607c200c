"""lmms-eval runs the packaged easy-VQA tasks offline on a tiny exported VLM through the plugin: the model
is found through the ``lmms_eval.models`` entry point, the tasks through the plugin's task folder."""

from __future__ import annotations

import math

import pytest
import torch

lmms_eval = pytest.importorskip(
    "lmms_eval", reason="lmms-eval is not installed (pip install 'defocus-vlm[eval]'); the plugin cannot be tested"
)
easy_vqa = pytest.importorskip("easy_vqa", reason="the packaged tasks read the easy-vqa package (pip install easy-vqa)")

from defocus_vlm.eval import lmms_eval_plugin  # noqa: E402
from defocus_vlm.eval.vqa_metrics import exact_match  # noqa: E402

from defocus_vlm.modeling_vlm import tiny_vlm  # noqa: E402

torch.set_num_threads(1)


def test_lmms_eval_discovers_the_plugin():
    from lmms_eval.models import get_model, get_model_manifest
    from lmms_eval.tasks import TaskManager

    # the entry point in pyproject.toml registers the model with lmms-eval's model registry
    assert get_model_manifest("defocus_vlm").simple_class_path == lmms_eval_plugin.MODEL_CLASS_PATH
    model_class = get_model("defocus_vlm")
    assert model_class.__name__ == "DefocusVLM" and model_class.is_simple
    # the task folder is what --include_path gets
    tasks = TaskManager("WARNING", include_path=str(lmms_eval_plugin.TASKS_DIR), include_defaults=False)
    assert {"defocus_easy_vqa", "defocus_easy_vqa_mc"} <= set(tasks.all_tasks)


def test_lmms_eval_runs_easy_vqa_tasks_on_a_tiny_model(tmp_path, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    torch.manual_seed(0)
    model, processor = tiny_vlm("llama")
    model.save_pretrained(tmp_path / "tiny_vlm")
    processor.save_pretrained(tmp_path / "tiny_vlm")
    # only the plugin's folder is indexed (lmms-eval's ~2000 built-in tasks take ~20 s to index)
    tasks = TaskManager("WARNING", include_path=str(lmms_eval_plugin.TASKS_DIR), include_defaults=False)
    results = simple_evaluate(
        model="defocus_vlm",
        model_args=f"pretrained={tmp_path / 'tiny_vlm'},max_new_tokens=4",
        tasks=["defocus_easy_vqa", "defocus_easy_vqa_mc"],
        task_manager=tasks,
        batch_size=2,
        device="cpu",
        limit=3,
        log_samples=True,
        bootstrap_iters=0,
        verbosity="WARNING",
    )
    answered = results["samples"]["defocus_easy_vqa"]
    assert len(answered) == 3
    assert answered[0]["target"] == "triangle"  # the first test question of easy-VQA: "what is the red shape?"
    answers = [s["filtered_resps"][0] for s in answered]
    assert all(isinstance(a, str) for a in answers)
    expected = sum(exact_match(a, s["target"]) for a, s in zip(answers, answered)) / 3
    assert results["results"]["defocus_easy_vqa"]["exact_match,none"] == pytest.approx(expected)

    ranked = results["samples"]["defocus_easy_vqa_mc"]
    assert len(ranked) == 3
    choices = easy_vqa.get_answers()
    correct = 0
    for sample in ranked:
        nll = [float(value) for value, _ in sample["filtered_resps"]]  # one (NLL, is_greedy) per answer
        assert len(nll) == len(choices) == 13 and all(math.isfinite(x) and x > 0 for x in nll)
        correct += choices[min(range(13), key=nll.__getitem__)] == sample["target"]
    assert results["results"]["defocus_easy_vqa_mc"]["acc,none"] == pytest.approx(correct / 3)
