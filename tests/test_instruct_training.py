"""Stage 3 (instruct) on the shared DeepSpeed loop: ZeRO-3 training, exact resume, an export that
reloads to the same outputs, the model's own loss, freezing per tuning mode, config errors.

Data: a toy LLaVA set of coloured squares with single-image, multi-turn, two-image and text-only
conversations; model: tiny De-focus ViT + tiny Llama + the character tokenizer (tiny_cpu.yaml)."""

from __future__ import annotations

import json

import pytest
import torch
from defocus_vlm.training.config import ConfigError, load_config
from PIL import Image

torch.set_num_threads(1)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def turn(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    (root / "images").mkdir()
    names = list(COLOURS)
    for i in range(6):
        for name, rgb in COLOURS.items():
            Image.new("RGB", (16, 16), rgb).save(root / "images" / f"{name}{i}.png")
    records = []
    for i in range(6):
        for k, name in enumerate(names):
            other = names[(k + i) % 3]
            records.append({"id": f"one{i}{k}", "image": f"{name}{i}.png",
                            "conversations": turn("<image>\nwhat colour?", name)})
            records.append({"id": f"two{i}{k}", "image": [f"{name}{i}.png", f"{other}{i}.png"],
                            "conversations": turn("<image> <image> same?", "yes" if other == name else "no")
                            + turn("and the first?", name)})
    records.append({"id": "text", "conversations": turn("say hi", "hi")})
    (root / "train.json").write_text(json.dumps(records))
    (root / "eval.json").write_text(json.dumps(records[:8]))
    return root


def tiny(toy_data, out, *extra: str):
    return load_config("tiny_cpu", [f"data.train_json={toy_data / 'train.json'}",
                                    f"data.eval_json={toy_data / 'eval.json'}", "data.limit_train=0",
                                    "data.limit_eval=0", "train.batch_size=8", "train.epochs=2",
                                    "train.deepspeed=zero3", "train.checkpoint_every=2", "train.tensorboard=false",
                                    f"train.output_dir={out}", *extra], stage="instruct")


@pytest.fixture(scope="module")
def zero3_run(toy_data, tmp_path_factory):
    from defocus_vlm.training.instruct import run

    out = tmp_path_factory.mktemp("zero3")
    return out, run(tiny(toy_data, out))


def test_zero3_run_trains_and_exports(zero3_run):
    out, summary = zero3_run
    assert summary["zero_stage"] == 3 and summary["steps"] == 2 * (37 // 8) == len(summary["losses"])
    assert summary["losses"][-1] < summary["losses"][0]
    val = summary["val"]["raw"]
    assert val["samples"] == 8 and 0 <= val["exact_match"] <= 100 and val["loss"] > 0
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
                 "chat_template.jinja", "generation_config.json"):
        assert (out / "model" / name).is_file(), name


def test_zero3_resume_reproduces_the_uninterrupted_run(zero3_run, toy_data, tmp_path):
    from defocus_vlm.training.instruct import run

    _, full = zero3_run
    first = run(tiny(toy_data, tmp_path, "train.stop_after=3"))  # mid-epoch (4 steps per epoch)
    assert first.get("interrupted") and len(first["losses"]) == 3
    rest = run(tiny(toy_data, tmp_path), resume=True)
    assert rest["losses"] == full["losses"]  # exact: weights, optimiser state and data order restored
    assert rest["val"] == full["val"]


def test_export_reloads_to_the_same_outputs(zero3_run, toy_data, tmp_path):
    """The exported directory, loaded again (Auto classes and init_from), gives the trained model's
    evaluation loss and answers, and AutoModelForImageTextToText loads it with its processor."""
    from defocus_vlm.training.instruct import InstructTask
    from defocus_vlm.training.loop import StepContext
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out, summary = zero3_run
    task = InstructTask(tiny(toy_data, tmp_path, f"model.init_from={out / 'model'}"))
    task.build_data()
    model = task.build_model()
    ctx = StepContext(0, 0, 0.0, 1, 0, 1, torch.device("cpu"), torch.float32, 0)
    again = task.evaluate(model, ctx)
    assert again["exact_match"] == summary["val"]["raw"]["exact_match"]
    assert again["loss"] == pytest.approx(summary["val"]["raw"]["loss"], abs=1e-5)

    auto = AutoModelForImageTextToText.from_pretrained(out / "model")
    processor = AutoProcessor.from_pretrained(out / "model")
    assert type(auto).__name__ == "DefocusVLMForConditionalGeneration"
    for key, value in model.state_dict().items():
        assert torch.equal(auto.state_dict()[key], value), key
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nwhat colour?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (16, 16), COLOURS["red"]), text=text, return_tensors="pt")
    ours = task.processor(images=Image.new("RGB", (16, 16), COLOURS["red"]), text=text, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], ours["input_ids"])
    assert torch.equal(inputs["input_ids"][0], torch.as_tensor(task.encoder.encode_prompt(
        [{"role": "user", "content": "<image>\nwhat colour?"}])))


def test_the_step_loss_is_the_models_own_loss_of_the_full_logits(toy_data, tmp_path):
    """micro_loss is the model's forward(labels=...) (logits only at trained positions), equal to the next-token
    cross-entropy of the full logits; the evaluation's summed loss is the same sum."""
    from defocus_vlm.training.instruct import InstructTask
    from defocus_vlm.training.loop import StepContext

    task = InstructTask(tiny(toy_data, tmp_path))
    ds = task.build_data()
    model = task.build_model().eval()
    batch = task.collate_fn()([ds[i] for i in range(6)])
    ctx = StepContext(0, 0, 0.0, 1, 0, 1, torch.device("cpu"), torch.float32, 0)
    with torch.no_grad():
        step = task.micro_loss(model, batch, ctx)
        logits = model(**task._inputs(batch, ctx)).logits
        summed = model(**task._inputs(batch, ctx), labels=batch["labels"], num_items_in_batch=1).loss
    targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    trained = int((targets != -100).sum())
    assert step.item() == pytest.approx(full.item() / trained, rel=1e-5)
    assert summed.item() == pytest.approx(full.item(), rel=1e-5)


def test_data_and_model_share_one_processor_in_either_order(toy_data, tmp_path):
    """The processor the data is encoded with is the one exported, its config the model's, whichever of build_data
    and build_model runs first; the image tokens per sample are the model's count."""
    from defocus_vlm.training.instruct import InstructTask

    first_data = InstructTask(tiny(toy_data, tmp_path))
    ds = first_data.build_data()
    processor = first_data.processor
    model = first_data.build_model()
    assert first_data.processor is processor and processor.vlm_config is model.config
    per_image = model.config.num_image_tokens()
    assert int((ds[0]["input_ids"] == processor.image_token_id).sum()) == per_image

    first_model = InstructTask(tiny(toy_data, tmp_path))
    again = first_model.build_model()
    again_ds = first_model.build_data()
    assert first_model.processor.vlm_config is again.config
    assert torch.equal(again_ds[0]["input_ids"], ds[0]["input_ids"])


def test_gradient_checkpointing_gives_the_same_gradients(toy_data, tmp_path):
    from defocus_vlm.training.instruct import InstructTask

    grads = []
    for checkpointing in (False, True):
        task = InstructTask(tiny(toy_data, tmp_path, f"model.gradient_checkpointing={checkpointing}"))
        ds = task.build_data()
        torch.manual_seed(0)
        model = task.build_model().train()
        batch = task.collate_fn()([ds[i] for i in range(4)])
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=batch["pixel_values"], labels=batch["labels"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.language_model.modules())
    assert all(block.gradient_checkpointing for block in model.vision_tower.encoder.blocks)
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


@pytest.mark.parametrize("tune, vision_frozen, trained", [
    ("projector", True, {"multi_modal_projector"}),
    ("finetune", True, {"multi_modal_projector", "language_model"}),
    ("finetune", False, {"multi_modal_projector", "language_model", "vision_tower"}),
])
def test_tuning_modes_train_the_right_parts(toy_data, tmp_path, tune, vision_frozen, trained):
    from defocus_vlm.training.instruct import InstructTask

    task = InstructTask(tiny(toy_data, tmp_path, f"model.tune={tune}", f"model.vision.freeze={vision_frozen}"))
    task.build_data()
    model = task.build_model()
    parts = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert parts == trained


def test_custom_chat_template_is_used_and_kept(toy_data, tmp_path):
    from defocus_vlm.training.instruct import InstructTask

    template = ("{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")
    (tmp_path / "template.jinja").write_text(template)
    task = InstructTask(tiny(toy_data, tmp_path, f"data.chat_template={tmp_path / 'template.jinja'}"))
    ds = task.build_data()
    task.build_model()
    assert task.processor.chat_template == template  # exported with the model
    text = task.processor.tokenizer.decode(ds[0]["input_ids"])
    assert text.startswith("[user] <image>") and text.endswith("[assistant] red\n")


def test_word_tokenizer_is_built_from_the_training_words_and_exported(toy_data, tmp_path):
    """model.llm.tokenizer=words: one token per word of the training conversations (the same id in
    a question and as an answer), assistant-only labels, and the export carries the vocabulary."""
    from defocus_vlm.training.instruct import InstructTask
    from transformers import AutoTokenizer

    task = InstructTask(tiny(toy_data, tmp_path, "model.llm.tokenizer=words"))
    ds = task.build_data()
    model = task.build_model()
    tokenizer = task.processor.tokenizer
    vocab = tokenizer.get_vocab()
    assert {"what", "colour", "?", "same", "red", "say", "hi", "user", "assistant"} <= set(vocab)
    assert len(vocab) < 30 and model.config.text_config.vocab_size == len(tokenizer)
    words = tokenizer.convert_ids_to_tokens(ds[0]["input_ids"].tolist())
    assert words[-4:] == ["<|im_start|>", "assistant", "red", "<|im_end|>"] and "<image>" in words
    trained = [w for w, label in zip(words, ds[0]["labels"].tolist()) if label != -100]
    assert trained == ["red", "<|im_end|>"]
    assert tokenizer.decode(tokenizer("what colour is it ?")["input_ids"]) == "what colour <unk> <unk>?"
    tokenizer.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again(task.processor.tokenizer.decode(ds[1]["input_ids"]))["input_ids"] == ds[1]["input_ids"].tolist()


def test_word_tokenizer_needs_training_data():
    from defocus_vlm.training.config import ConfigError
    from defocus_vlm.training.instruct import load_tokenizer

    with pytest.raises(ConfigError, match="data.train_json"):
        load_tokenizer("words", None)


@pytest.mark.parametrize("override, message", [
    ("model.tune=everything", "model.tune"),
    ("model.llm.name=smollm2-135m-instruct", "exactly one of model.llm.name"),
    ("model.lora.r=4", None),  # fine with finetune
    ("data.overlong=cut", "data.overlong"),
    ("train.ema_decay=0.99", "ema_decay"),
])
def test_config_is_validated(toy_data, tmp_path, override, message):
    if message is None:
        tiny(toy_data, tmp_path, override)
        with pytest.raises(ConfigError, match="model.tune: finetune"):
            tiny(toy_data, tmp_path, override, "model.tune=projector")
        return
    with pytest.raises(ConfigError, match=message):
        tiny(toy_data, tmp_path, override)


def test_cli_reports_missing_data_in_one_line(capsys, tmp_path):
    from defocus_vlm.cli import main

    code = main(["train", "instruct", "--config", "tiny_cpu", f"data.train_json={tmp_path / 'none.json'}",
                 f"train.output_dir={tmp_path / 'run'}"])
    assert code == 2 and "none.json" in capsys.readouterr().err


def test_flips_follow_the_sample_seed_and_spare_evaluation(tmp_path):
    """data.hflip / vflip mirror a training image by the sampler's per-sample seed (the same seed, the
    same image: resume stays exact); evaluation items (plain indices) are never flipped."""
    import numpy as np

    from defocus_vlm import DefocusImageProcessor
    from defocus_vlm.data.llava import EncodedSample, LlavaDataset

    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[:2, :4] = 255  # a white bar in the top-left corner
    Image.fromarray(pixels).save(tmp_path / "a.png")
    ids = np.zeros(3, np.int64)
    processor = DefocusImageProcessor(size=8, crop_pct=1.0, image_mean=[0, 0, 0], image_std=[1, 1, 1])
    plain = LlavaDataset([EncodedSample("a", ids, ids, ["a.png"])], tmp_path, processor)[0]["pixel_values"][0, 0]
    both = LlavaDataset([EncodedSample("a", ids, ids, ["a.png"])], tmp_path, processor, hflip=1.0, vflip=1.0)
    assert torch.equal(both[0]["pixel_values"][0, 0], plain)
    assert torch.equal(both[(0, 7)]["pixel_values"][0, 0], plain.flip(0, 1))
    half = LlavaDataset([EncodedSample("a", ids, ids, ["a.png"])], tmp_path, processor, hflip=0.5)
    seen = {tuple(half[(0, seed)]["pixel_values"][0, 0, 0].tolist()) for seed in range(16)}
    assert seen == {tuple(plain[0].tolist()), tuple(plain[0].flip(0).tolist())}
    assert torch.equal(half[(0, 3)]["pixel_values"], half[(0, 3)]["pixel_values"])


def test_unreadable_images_follow_on_corrupt_from_start_up(tmp_path):
    """data.on_corrupt=fail refuses the data while it is built (before any model); skip warns, and a
    sample whose image cannot be read is replaced by the next one."""
    from defocus_vlm.training.instruct import InstructTask

    from defocus_vlm.data.classification import DataError

    (tmp_path / "images").mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (16, 16), rgb).save(tmp_path / "images" / f"{name}.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    names = [*COLOURS, "broken"]
    records = [{"id": n, "image": f"{n}.png", "conversations": turn("<image>\nwhat colour?", n)} for n in names]
    (tmp_path / "train.json").write_text(json.dumps(records))
    base = [f"data.train_json={tmp_path / 'train.json'}", "data.eval_json=", "data.limit_train=0",
            f"train.output_dir={tmp_path}"]
    with pytest.raises(DataError, match=r"train split: 1 of all 4 images cannot be read \(first: sample 3 \(broken"):
        InstructTask(load_config("tiny_cpu", [*base, "data.on_corrupt=fail"], stage="instruct")).build_data()
    with pytest.warns(UserWarning, match="1 of all 4 images are unreadable and will be skipped"):
        train = InstructTask(load_config("tiny_cpu", [*base, "data.on_corrupt=skip"], stage="instruct")).build_data()
    with pytest.warns(UserWarning, match="skipping a sample with an unreadable image"):
        item = train[3]
    assert torch.equal(item["input_ids"], train[0]["input_ids"])  # the next sample (wrapping round) instead
