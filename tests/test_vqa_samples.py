"""``eval vqa-samples`` (eval/vqa_samples.py): which questions it draws (per type, skipping, by id), the
runs it reads, and the PNG it writes from `eval vqa` prediction files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from defocus_vlm.eval.vqa_samples import pick_samples, read_runs
from PIL import Image

from defocus_vlm.cli import main
from defocus_vlm.data.vqa import VQASample, read_benchmark


def _sample(qid: str, qtype: str) -> VQASample:
    return VQASample(qid, "?", Path("x.png"), ("a",), tags=(("type", qtype),))


def test_pick_per_type_in_order_of_first_appearance():
    samples = [_sample("c0", "count"), _sample("e0", "exist"), _sample("c1", "count"), _sample("e1", "exist"),
               _sample("c2", "count")]
    assert [s.question_id for s in pick_samples(samples, 1)] == ["c0", "e0"]
    assert [s.question_id for s in pick_samples(samples, 2, skip=1)] == ["c1", "c2", "e1"]
    assert [s.question_id for s in pick_samples(samples, 1, questions=["e1", "c0"])] == ["e1", "c0"]
    with pytest.raises(ValueError, match="no question 'zz'"):
        pick_samples(samples, 1, questions=["zz"])


def test_bad_runs_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="NAME=EVAL_DIR"):
        read_runs(["just-a-folder"])
    with pytest.raises(FileNotFoundError, match="output folder of `defocus-vlm eval vqa`"):
        read_runs([f"m={tmp_path}"])


def test_cli_draws_the_picture(tmp_path):
    data = tmp_path / "set"
    flags = ["--images", "240", "--test-images", "80", "--questions-per-image", "4"]  # as test_shapes_vqa.py
    assert main(["data", "shapes-vqa", "--output-dir", str(data), *flags]) == 0
    samples = read_benchmark("shapes-vqa", data, "test")
    run = tmp_path / "run"
    run.mkdir()
    with (run / "predictions.jsonl").open("w") as f:  # right on every other question
        for k, s in enumerate(samples):
            f.write(json.dumps({"question_id": s.question_id, "prediction": s.answers[0] if k % 2 else "no"}) + "\n")
    out = tmp_path / "samples.png"
    assert main(["eval", "vqa-samples", "--benchmark", "shapes-vqa", "--data", str(data), "--run", f"m={run}",
                 "--per-type", "2", "--output", str(out)]) == 0
    width, height = Image.open(out).size
    assert width > 600 and height > width  # 9 types x 2 questions: 6 rows of 3 panels
