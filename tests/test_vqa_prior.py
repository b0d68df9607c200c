"""The answer-prior baseline (eval/vqa_prior.py, ``eval vqa --answer-prior``): the most common training
answer per type or per question text, ties broken the same way every time, unseen texts falling back to
their type, and the CLI scoring it like a model on a shapes-VQA export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from defocus_vlm.eval.vqa_prior import PriorAnswerer, prior_answers

from defocus_vlm.cli import main
from defocus_vlm.data.vqa import VQASample, build_prompt


def _sample(qid: str, question: str, answer: str, qtype: str) -> VQASample:
    return VQASample(qid, question, Path("unused.png"), (answer,), tags=(("type", qtype),))


TRAIN = [
    _sample("t0", "How many red shapes?", "2", "count"),
    _sample("t1", "How many red shapes?", "2", "count"),
    _sample("t2", "How many red shapes?", "1", "count"),
    _sample("t3", "How many circles?", "1", "count"),
    _sample("t4", "How many circles?", "1", "count"),
    _sample("t5", "Is there a red circle?", "yes", "exist"),
    _sample("t6", "Is there a blue circle?", "no", "exist"),
]


def test_prior_per_type_and_per_question():
    test = [_sample("q0", "How many red shapes?", "1", "count"), _sample("q1", "How many squares?", "0", "count"),
            _sample("q2", "Is there a red circle?", "no", "exist")]
    by_type = prior_answers(TRAIN, test, "type")
    # count: "1" three times, "2" twice; exist: a tie, settled by sorted order
    assert [by_type[build_prompt(s)] for s in test] == ["1", "1", "no"]
    by_question = prior_answers(TRAIN, test, "question")
    assert [by_question[build_prompt(s)] for s in test] == ["2", "1", "yes"]  # "How many squares?": its type's
    assert PriorAnswerer(by_question)([(None, build_prompt(test[0]))]) == ["2"]


def test_prior_needs_types_known_in_training():
    with pytest.raises(ValueError, match="never occurs in the training split"):
        prior_answers(TRAIN, [_sample("q", "What size is it?", "small", "query_size")], "type")
    untagged = VQASample("q", "?", Path("x.png"), ("a",))
    with pytest.raises(ValueError, match="has no type tag"):
        prior_answers([untagged], [untagged], "type")
    with pytest.raises(ValueError, match="one of type, question"):
        prior_answers(TRAIN, TRAIN, "image")


def test_cli_scores_the_prior_on_shapes_vqa(tmp_path, capsys):
    data = tmp_path / "set"
    flags = ["--images", "240", "--test-images", "80", "--questions-per-image", "4"]  # as test_shapes_vqa.py
    assert main(["data", "shapes-vqa", "--output-dir", str(data), *flags]) == 0
    out = tmp_path / "prior"
    assert main(["eval", "vqa", "--answer-prior", "type", "--benchmark", "shapes-vqa", "--data", str(data),
                 "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    answers = json.loads((data / "scenes.json").read_text())["answers"]
    for qtype, found in metrics["accuracy_by_type"].items():  # balanced answers: the type prior is chance
        assert found["accuracy"] == pytest.approx(100 / len(answers[qtype]))
    with pytest.raises(SystemExit):  # --model or a prior
        main(["eval", "vqa", "--benchmark", "shapes-vqa", "--data", str(data)])
    assert "one of the arguments --model --answer-prior is required" in capsys.readouterr().err
