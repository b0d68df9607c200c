"""VQA evaluation of a real (tiny, randomly initialised) exported VLM: batch size 1 and 16 give the same
answers and scores; the likelihood used for multiple choice; the ``defocus-vlm eval vqa`` command."""

from __future__ import annotations

import json

import pytest
import torch
from defocus_vlm.eval.vqa import run_vqa_eval
from PIL import Image
from vlm_helpers import tiny_vlm

from defocus_vlm.cli import main
from defocus_vlm.data.vqa import SHORT_ANSWER_PROMPT, VQASample
from defocus_vlm.inference import VLMAnswerer

torch.set_num_threads(1)

COLORS = [(255, 0, 0), (0, 128, 255), (20, 200, 40), (250, 250, 0), (90, 0, 90)]


def save_tiny_vlm(path):
    """A tiny random VLM (character tokenizer) saved to ``path``; larger-than-usual initial weights make
    its greedy answers differ between inputs, so that equal answers mean something."""
    torch.manual_seed(0)
    model, processor = tiny_vlm("llama", text_overrides={"initializer_range": 0.3})
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def write_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i}.png" for i in range(len(COLORS))]
    for path, color in zip(paths, COLORS):
        Image.new("RGB", (20 + 4 * len(path.stem), 24), color).save(path)
    return paths


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


def test_batch_size_1_and_16_give_identical_answers_and_scores(model_dir, tmp_path):
    images = write_images(tmp_path / "img")
    # questions of different lengths, so a batch of 16 is left-padded unevenly
    samples = [
        VQASample(f"q{i}", "what color?" + " is it" * (i % 4), images[i % len(images)], answers=("red",))
        for i in range(20)
    ]
    answerer = VLMAnswerer(model_dir, device="cpu", max_new_tokens=6)
    m1 = run_vqa_eval(answerer, samples, "easy-vqa", tmp_path / "bs1", batch_size=1, progress=False)
    m16 = run_vqa_eval(answerer, samples, "easy-vqa", tmp_path / "bs16", batch_size=16, progress=False)
    p1 = (tmp_path / "bs1" / "predictions.jsonl").read_text()
    assert p1 == (tmp_path / "bs16" / "predictions.jsonl").read_text()
    assert m1 == m16
    assert len({json.loads(line)["prediction"] for line in p1.splitlines()}) > 1  # answers depend on the input


def test_continuation_logprob_matches_a_plain_forward(model_dir):
    answerer = VLMAnswerer(model_dir, device="cpu")
    image = Image.new("RGB", (16, 16), (255, 0, 0))
    context = answerer.chat_text("what shape?")
    assert context.endswith("assistant\n") and "<image>\nwhat shape?" in context
    inputs = answerer.processor(images=[image], text=[context + "circle"], return_tensors="pt")
    with torch.no_grad():
        logits = answerer.model(**inputs).logits[0].float()
    ids = inputs["input_ids"][0]
    n = ids.shape[0] - len("circle")  # one token per character
    expected = torch.log_softmax(logits[n - 1 : -1], -1).gather(-1, ids[n:, None]).sum().item()
    logprob, is_greedy = answerer.continuation_logprob(image, "what shape?", "circle")
    assert logprob == pytest.approx(expected, abs=1e-4)
    assert is_greedy == bool((logits[n - 1 : -1].argmax(-1) == ids[n:]).all())
    # the greedy answer is, by definition, greedy
    greedy_id = logits[n - 1].argmax().item()
    greedy_char = answerer.tokenizer.convert_ids_to_tokens(greedy_id)
    if len(greedy_char) == 1:  # a character token (not a special one)
        assert answerer.continuation_logprob(image, "what shape?", greedy_char)[1]


def _llava_export(folder, n=6):
    """easy-VQA-like data in the layout `defocus-vlm data easy-vqa` writes."""
    write_images(folder / "images" / "test")
    records = [
        {
            "id": f"easy_vqa_test_{i}",
            "image": f"test/{i % len(COLORS)}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\nwhat color is the shape?\n{SHORT_ANSWER_PROMPT}"},
                {"from": "gpt", "value": "red"},
            ],
        }
        for i in range(n)
    ]
    (folder / "test.json").write_text(json.dumps(records))
    return folder


def test_eval_vqa_command(model_dir, tmp_path, capsys):
    data = _llava_export(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["eval", "vqa", "--model", str(model_dir), "--benchmark", "easy-vqa", "--data", str(data)]
    argv += ["--batch-size", "4", "--max-new-tokens", "4", "--device", "cpu", "--output-dir", str(out)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == 6 and printed["split"] == "test" and "accuracy" in printed
    assert json.loads((out / "metrics.json").read_text())["samples"] == 6
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["question_id"] for line in lines] == [f"easy_vqa_test_{i}" for i in range(6)]

    # a rerun resumes: nothing new is answered and the scores are the same
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == printed["accuracy"]
    assert (out / "predictions.jsonl").read_text().splitlines() == lines

    # predictions made with other settings are not mixed in
    other = list(argv)
    other[other.index("--max-new-tokens") + 1] = "8"
    assert main(other) == 2
    assert "holds predictions of another run" in capsys.readouterr().err


def test_eval_vqa_command_errors(tmp_path, capsys):
    assert main(["eval", "vqa", "--model", str(tmp_path), "--benchmark", "gqa"]) == 2
    assert "'gqa' needs --data" in capsys.readouterr().err
    data = _llava_export(tmp_path / "data")
    assert main(["eval", "vqa", "--model", str(tmp_path), "--benchmark", "easy-vqa", "--data", str(data)]) == 2
    assert "config.json missing" in capsys.readouterr().err
