"""lmms-eval runs the packaged easy-VQA and shapes-VQA tasks offline on a tiny exported VLM through the
plugin: the model is found through the ``lmms_eval.models`` entry point, the tasks through the plugin's
task folder."""

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
from vlm_helpers import tiny_vlm  # noqa: E402

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
    expected = {"defocus_easy_vqa", "defocus_easy_vqa_mc", "defocus_shapes_vqa", "defocus_shapes_vqa_unseen"}
    assert expected <= set(tasks.all_tasks)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model, processor = tiny_vlm("llama")
    folder = tmp_path_factory.mktemp("lmms") / "tiny_vlm"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _evaluate(model_dir, task_names: list[str], limit: int, monkeypatch) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # only the plugin's folder is indexed (lmms-eval's ~2000 built-in tasks take ~20 s to index)
    tasks = TaskManager("WARNING", include_path=str(lmms_eval_plugin.TASKS_DIR), include_defaults=False)
    return simple_evaluate(
        model="defocus_vlm",
        model_args=f"pretrained={model_dir},max_new_tokens=4",
        tasks=task_names,
        task_manager=tasks,
        batch_size=2,
        device="cpu",
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
        verbosity="WARNING",
    )


def test_lmms_eval_runs_easy_vqa_tasks_on_a_tiny_model(tiny_model_dir, monkeypatch):
    results = _evaluate(tiny_model_dir, ["defocus_easy_vqa", "defocus_easy_vqa_mc"], 3, monkeypatch)
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


def test_lmms_eval_runs_shapes_vqa_tasks_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    import json

    from defocus_vlm.eval.lmms_eval_plugin import shapes_vqa_task

    from defocus_vlm.data.shapes_vqa import ShapesVQAConfig, write_shapes_vqa
    from defocus_vlm.data.vqa import SHORT_ANSWER_PROMPT

    monkeypatch.delenv(shapes_vqa_task.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match=f"set {shapes_vqa_task.ENV_VAR}=DIR"):
        shapes_vqa_task.data_dir()
    config = ShapesVQAConfig(images=240, test_images=80)
    write_shapes_vqa(tmp_path, config, SHORT_ANSWER_PROMPT, splits=("test", "test_unseen"))
    monkeypatch.setenv(shapes_vqa_task.ENV_VAR, str(tmp_path))
    results = _evaluate(tiny_model_dir, ["defocus_shapes_vqa", "defocus_shapes_vqa_unseen"], 2, monkeypatch)
    scenes = json.loads((tmp_path / "scenes.json").read_text())["splits"]
    for task, split in (("defocus_shapes_vqa", "test"), ("defocus_shapes_vqa_unseen", "test_unseen")):
        answered = results["samples"][task]
        questions = scenes[split]["questions"][:2]
        assert [s["target"] for s in answered] == [q["answer"] for q in questions]
        tags = [(q["type"], q["region"]) for q in questions]
        assert [(s["doc"]["type"], s["doc"]["region"]) for s in answered] == tags  # logged with each sample
        answers = [s["filtered_resps"][0] for s in answered]
        expected = sum(exact_match(a, s["target"]) for a, s in zip(answers, answered)) / 2
        assert results["results"][task]["exact_match,none"] == pytest.approx(expected)
