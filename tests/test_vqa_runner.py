"""The VQA runner with fake answerers: batching does not change results, interrupted runs resume,
metrics per benchmark kind."""

from __future__ import annotations

import json
import os
import zlib

import pytest
from defocus_vlm.eval.vqa import compute_metrics, read_predictions, run_vqa_eval
from PIL import Image

from defocus_vlm.data.vqa import VQASample

WORDS = ("red", "blue", "circle", "yes", "no")


def _samples(tmp_path, n=37):
    colors = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    paths = []
    for i, c in enumerate(colors):
        paths.append(tmp_path / "img" / f"{i}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), c).save(paths[-1])
    return [
        VQASample(f"q{i}", f"question {i}?", paths[i % 3], answers=(WORDS[i % len(WORDS)],)) for i in range(n)
    ]


class FakeAnswerer:
    """Answers from the image's pixels and the prompt only, and records the batch sizes it saw."""

    def __init__(self, fail_on_call: int | None = None):
        self.batch_sizes: list[int] = []
        self.prompts: list[str] = []
        self.fail_on_call = fail_on_call

    def __call__(self, batch):
        if self.fail_on_call is not None and len(self.batch_sizes) == self.fail_on_call:
            raise KeyboardInterrupt  # an interrupted run
        self.batch_sizes.append(len(batch))
        self.prompts += [prompt for _, prompt in batch]
        return [WORDS[zlib.crc32(image.tobytes() + prompt.encode()) % len(WORDS)] for image, prompt in batch]


def test_batch_size_does_not_change_results(tmp_path):
    samples = _samples(tmp_path)
    one, sixteen = FakeAnswerer(), FakeAnswerer()
    m1 = run_vqa_eval(one, samples, "easy-vqa", tmp_path / "bs1", batch_size=1, progress=False)
    m16 = run_vqa_eval(sixteen, samples, "easy-vqa", tmp_path / "bs16", batch_size=16, progress=False)
    assert one.batch_sizes == [1] * 37 and sixteen.batch_sizes == [16, 16, 5]
    assert m1 == m16 and m1["samples"] == 37 and 0 < m1["accuracy"] < 100
    assert (tmp_path / "bs1" / "predictions.jsonl").read_text() == (tmp_path / "bs16" / "predictions.jsonl").read_text()
    assert json.loads((tmp_path / "bs16" / "metrics.json").read_text()) == m16


def test_interrupted_run_resumes(tmp_path):
    samples = _samples(tmp_path)
    reference = run_vqa_eval(FakeAnswerer(), samples, "easy-vqa", tmp_path / "ref", batch_size=8, progress=False)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_vqa_eval(FakeAnswerer(fail_on_call=2), samples, "easy-vqa", out, batch_size=8, progress=False)
    assert len(read_predictions(out / "predictions.jsonl")) == 16  # two whole batches were kept
    with (out / "predictions.jsonl").open("a") as f:
        f.write('{"question_id": "q16", "predic')  # a record cut off mid-write
    resumed = FakeAnswerer()
    metrics = run_vqa_eval(resumed, samples, "easy-vqa", out, batch_size=8, progress=False)
    assert resumed.batch_sizes == [8, 8, 5]  # only the 21 missing questions, the cut-off one included
    assert resumed.prompts[0].startswith("question 16?")
    assert metrics == reference
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 37
    # nothing left to do: no calls at all
    idle = FakeAnswerer()
    assert run_vqa_eval(idle, samples, "easy-vqa", out, batch_size=8, progress=False) == reference
    assert idle.batch_sizes == []


def test_an_output_dir_in_use_is_refused(tmp_path):
    """Another evaluation (here: a lock held in this process) owns the directory: nothing is answered or
    written; once it is released, the evaluation runs."""
    from defocus_vlm.run_lock import RunDirError, RunLock

    samples, out = _samples(tmp_path, n=4), tmp_path / "run"
    held = RunLock(out)
    idle = FakeAnswerer()
    with pytest.raises(RunDirError, match=f"is in use by another run \\(pid {os.getpid()} on "):
        run_vqa_eval(idle, samples, "easy-vqa", out, progress=False)
    assert idle.batch_sizes == [] and not (out / "predictions.jsonl").exists()
    held.release()
    assert run_vqa_eval(FakeAnswerer(), samples, "easy-vqa", out, progress=False)["samples"] == 4


def test_resume_after_a_last_record_without_its_newline(tmp_path):
    samples = _samples(tmp_path, n=10)
    reference = run_vqa_eval(FakeAnswerer(), samples, "easy-vqa", tmp_path / "ref", batch_size=4, progress=False)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_vqa_eval(FakeAnswerer(fail_on_call=1), samples, "easy-vqa", out, batch_size=4, progress=False)
    path = out / "predictions.jsonl"
    path.write_text(path.read_text().rstrip("\n"))  # the last record is whole; only its newline is lost
    resumed = FakeAnswerer()
    assert run_vqa_eval(resumed, samples, "easy-vqa", out, batch_size=4, progress=False) == reference
    assert resumed.batch_sizes == [4, 2]  # the four whole records were kept
    lines = path.read_text().splitlines()
    assert len(lines) == 10 and [json.loads(line)["question_id"] for line in lines][3:5] == ["q3", "q4"]
    idle = FakeAnswerer()  # the rerun reads the file it left (a glued line 4 made it fail)
    assert run_vqa_eval(idle, samples, "easy-vqa", out, batch_size=4, progress=False) == reference
    assert idle.batch_sizes == []


def test_bad_predictions_file_and_answerer(tmp_path):
    samples = _samples(tmp_path, n=3)
    (tmp_path / "predictions.jsonl").write_text('{"question_id": "q0", "prediction": "red"}\nnot json\n{}\n')
    with pytest.raises(ValueError, match=r"predictions.jsonl: line 2 is not a prediction record"):
        run_vqa_eval(FakeAnswerer(), samples, "easy-vqa", tmp_path, progress=False)
    with pytest.raises(ValueError, match="returned 1 answers for 3 questions"):
        run_vqa_eval(lambda batch: ["red"], samples, "easy-vqa", tmp_path / "other", progress=False)
    with pytest.raises(ValueError, match="batch size must be positive"):
        run_vqa_eval(FakeAnswerer(), samples, "easy-vqa", tmp_path / "other", batch_size=0)
    with pytest.raises(ValueError, match="question_id 'q0' occurs twice"):
        run_vqa_eval(FakeAnswerer(), samples + samples[:1], "easy-vqa", tmp_path / "other")


def _sample(qid, answers, choices=()):
    return VQASample(qid, "q?", image=None, answers=tuple(answers), choices=tuple(choices))


def test_compute_metrics_per_benchmark_kind():
    ten = ["2"] * 3 + ["3"] * 7
    vqa = [_sample("a", ten), _sample("b", ten)]
    assert compute_metrics("vqav2", vqa, {"a": "two", "b": "3"})["accuracy"] == pytest.approx(95.0)  # (0.9 + 1) / 2
    # unanimous answers: VQAv2 compares raw strings, TextVQA normalises both sides
    unanimous = [_sample("a", ["STOP"] * 10)]
    assert compute_metrics("vqav2", unanimous, {"a": "stop"})["accuracy"] == 0.0
    assert compute_metrics("textvqa", unanimous, {"a": "stop"})["accuracy"] == 100.0

    gqa = [_sample("a", ["red"]), _sample("b", ["left"]), _sample("c", ["2"])]
    assert compute_metrics("gqa", gqa, {"a": "Red.", "b": "right", "c": "two"})["accuracy"] == pytest.approx(100 / 3)

    pope = [_sample("a", ["yes"]), _sample("b", ["no"]), _sample("c", ["no"])]
    m = compute_metrics("pope", pope, {"a": "Yes", "b": "Yes, there is", "c": "No"})
    assert (m["accuracy"], m["precision"], m["recall"]) == pytest.approx((200 / 3, 50, 100))
    assert (m["predicted_yes_ratio"], m["label_yes_ratio"]) == pytest.approx((200 / 3, 100 / 3))

    mc = [_sample("a", ["B"], ["cat", "dog"]), _sample("b", ["A"], ["cat", "dog"]), _sample("c", ["A"], ["x", "y"])]
    answers = {"a": "(B) dog", "b": "cat", "c": "A. x"}
    # ScienceQA reads letters only ("(B) dog" fails); MMBench also reads "(B)" and option texts
    m = compute_metrics("scienceqa", mc, answers)
    assert m == {"benchmark": "scienceqa", "samples": 3, "accuracy": pytest.approx(100 / 3), "unparsed": 2}
    m = compute_metrics("mmbench", mc, answers)
    assert m == {"benchmark": "mmbench", "samples": 3, "accuracy": pytest.approx(100.0), "unparsed": 0}

    with pytest.raises(ValueError, match="no prediction for 1 question.*'b'"):
        compute_metrics("gqa", gqa[:2], {"a": "red"})
