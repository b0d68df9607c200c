"""``defocus-vlm chat``: the streamed one-shot answer is the greedy answer, and the interactive form
keeps the conversation."""

from __future__ import annotations

import torch
from PIL import Image
from test_vqa_model import save_tiny_vlm

from defocus_vlm.cli import main
from defocus_vlm.inference import VLMAnswerer


def test_chat_streams_the_greedy_answer(tmp_path, capsys, monkeypatch):
    torch.set_num_threads(1)
    model_dir = save_tiny_vlm(tmp_path / "vlm")
    image = tmp_path / "red.png"
    Image.new("RGB", (24, 20), (255, 0, 0)).save(image)
    expected = VLMAnswerer(model_dir, max_new_tokens=6)([(Image.open(image), "What colour is it?")])[0]
    assert main(["chat", "--model", str(model_dir), "--image", str(image), "What colour is it?",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == expected  # (deepspeed may log a line first)

    answers = iter(["What colour is it?", "And its shape?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert main(["chat", "--model", str(model_dir), "--image", str(image), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 2 and expected in out


def test_chat_reports_a_missing_image_before_loading(tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path), "--image", str(tmp_path / "none.png"), "hi"]) == 2
    assert "none.png not found, expected an image file" in capsys.readouterr().err
