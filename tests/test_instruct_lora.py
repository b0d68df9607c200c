"""LoRA instruction tuning: train -> export the adapter (+ base) -> reload -> merge, with the same
outputs at every stage; only LoRA and projector weights train; merge-lora's CLI."""

from __future__ import annotations

import pytest
import torch
from defocus_vlm.training.config import load_config

torch.set_num_threads(1)
pytest.importorskip("peft", reason="LoRA needs peft (pip install 'defocus-vlm[train]')")
pytest.importorskip("easy_vqa", reason="the test data comes from easy-vqa (pip install 'defocus-vlm[train]')")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from defocus_vlm.training.instruct import run

    from defocus_vlm.data.easy_vqa import export as export_easy_vqa

    data = tmp_path_factory.mktemp("easy_vqa")
    export_easy_vqa(data, instruction="", limit=32)
    out = tmp_path_factory.mktemp("lora")
    cfg = load_config("tiny_cpu", [f"data.train_json={data / 'train.json'}", f"data.eval_json={data / 'test.json'}",
                                   "data.limit_eval=12", "model.vision.freeze=true", "model.lora.r=4",
                                   "model.lora.alpha=8", "model.lora.target_modules=[q_proj, v_proj, down_proj]",
                                   "optim.lr=0.02",
                                   "train.epochs=1", "train.batch_size=8", "train.tensorboard=false",
                                   f"train.output_dir={out}"], stage="instruct")
    return cfg, out, run(cfg)


def evaluator(cfg):
    from defocus_vlm.training.instruct import InstructTask
    from defocus_vlm.training.loop import StepContext

    task = InstructTask(cfg)
    task.build_data()  # evaluation needs the data and the processor only: the model evaluated is the one passed in
    ctx = StepContext(0, 0, 0.0, 1, 0, 1, torch.device("cpu"), torch.float32, 0)
    return lambda model: task.evaluate(model, ctx)


def test_only_lora_and_projector_weights_train(lora_run, tmp_path):
    from defocus_vlm.training.instruct import InstructTask

    cfg, _, _ = lora_run
    task = InstructTask(cfg)
    task.build_data()
    model = task.build_model()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n or "multi_modal_projector" in n for n in trained)
    lora = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trained if ".lora_" in n}
    assert lora == {"q_proj", "v_proj", "down_proj"}
    assert all("language_model" in n for n in trained if ".lora_" in n)


def test_adapter_reloads_and_merges_to_the_same_outputs(lora_run, tmp_path):
    from defocus_vlm.training.lora import load_lora
    from transformers import AutoModelForImageTextToText

    from defocus_vlm.cli import main

    cfg, out, summary = lora_run
    adapter = out / "model"
    for name in ("adapter_config.json", "adapter_model.safetensors", "base/config.json", "base/model.safetensors",
                 "base/processor_config.json"):
        assert (adapter / name).is_file(), name
    evaluate = evaluator(cfg)
    trained = summary["val"]["raw"]

    peft_model, _ = load_lora(adapter)
    reloaded = evaluate(peft_model)
    assert reloaded["exact_match"] == trained["exact_match"]
    assert reloaded["loss"] == pytest.approx(trained["loss"], abs=1e-5)

    assert main(["merge-lora", "--model", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    after = evaluate(merged)
    assert after["exact_match"] == trained["exact_match"]
    assert after["loss"] == pytest.approx(trained["loss"], abs=1e-5)

    # the merge changed the targeted weights (LoRA learned something) and nothing else in the LLM
    base = AutoModelForImageTextToText.from_pretrained(adapter / "base")
    changed = {k.rsplit(".", 2)[-2] for k, v in merged.state_dict().items()
               if k.startswith("language_model") and not torch.equal(v, base.state_dict()[k])}
    assert changed == {"q_proj", "v_proj", "down_proj"}
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5)


def test_merge_lora_errors(tmp_path, capsys):
    from defocus_vlm.cli import main

    assert main(["merge-lora", "--model", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "adapter_config.json missing" in capsys.readouterr().err
