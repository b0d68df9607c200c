"""Readers of the benchmarks' official file formats, on tiny hand-made files; clear errors for bad ones."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from defocus_vlm.data.vqa import (
    MULTIPLE_CHOICE_PROMPT,
    SHORT_ANSWER_PROMPT,
    build_prompt,
    read_benchmark,
)
from defocus_vlm.image_io import ImageError


def _png(path, color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def test_vqav2(tmp_path):
    _write_json(
        tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json",
        {"data_subtype": "val2014", "questions": [{"question_id": 7, "image_id": 42, "question": "How many?"}]},
    )
    answers = [{"answer": "2", "answer_id": i + 1, "answer_confidence": "yes"} for i in range(10)]
    ann = _write_json(
        tmp_path / "v2_mscoco_val2014_annotations.json",
        {"annotations": [{"question_id": 7, "image_id": 42, "answers": answers}]},
    )
    _png(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    [s] = read_benchmark("vqav2", tmp_path)
    assert (s.question_id, s.question, s.answers) == ("7", "How many?", ("2",) * 10)
    assert s.load_image().size == (8, 8)
    assert build_prompt(s) == f"How many?\n{SHORT_ANSWER_PROMPT}"

    with pytest.raises(ValueError, match="VQAv2 needs the folder"):
        read_benchmark("vqav2", ann)
    _write_json(ann, {"annotations": [{"question_id": 8, "answers": answers}]})
    with pytest.raises(ValueError, match="no annotation for question_id 7"):
        read_benchmark("vqav2", tmp_path)
    _write_json(ann, {"annotations": [{"question_id": 7}]})
    with pytest.raises(ValueError, match="v2_mscoco_val2014_annotations.json: annotation 0 has no 'answers' field"):
        read_benchmark("vqav2", tmp_path)
    ann.write_text("{not json")
    with pytest.raises(ValueError, match="annotations.json is not valid JSON"):
        read_benchmark("vqav2", tmp_path)
    ann.unlink()
    with pytest.raises(FileNotFoundError, match="v2_mscoco_val2014_annotations.json"):
        read_benchmark("vqav2", tmp_path)


def test_textvqa(tmp_path):
    entry = {"question_id": 3, "question": "What brand?", "image_id": "abc", "answers": ["nokia"] * 10}
    path = _write_json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "data": [entry]})
    _png(tmp_path / "train_images" / "abc.jpg")
    [s] = read_benchmark("textvqa", tmp_path)
    assert (s.question_id, s.answers[0], s.image.name) == ("3", "nokia", "abc.jpg")
    _write_json(path, {"data": {"not": "a list"}})
    with pytest.raises(ValueError, match="'data' of the top level should be a JSON list, found dict"):
        read_benchmark("textvqa", tmp_path)


def test_gqa_and_image_dir(tmp_path):
    _write_json(
        tmp_path / "testdev_balanced_questions.json",
        {"q1": {"imageId": "n1", "question": "What color?", "answer": "red", "fullAnswer": "It is red."}},
    )
    with pytest.raises(FileNotFoundError, match="image folder .*images"):
        read_benchmark("gqa", tmp_path)
    _png(tmp_path / "elsewhere" / "n1.jpg")
    [s] = read_benchmark("gqa", tmp_path, image_dir=tmp_path / "elsewhere")
    assert (s.question_id, s.answers) == ("q1", ("red",))
    assert s.load_image().mode == "RGB"
    _write_json(tmp_path / "testdev_balanced_questions.json", [{"question": "?"}])
    with pytest.raises(ValueError, match="testdev_balanced_questions.json: expected a JSON object at the top level"):
        read_benchmark("gqa", tmp_path, image_dir=tmp_path / "elsewhere")


def test_pope(tmp_path):
    lines = [
        {"question_id": 1, "image": "COCO_val2014_1.jpg", "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_1.jpg", "text": "Is there a cat in the image?", "label": "no"},
    ]
    path = tmp_path / "coco_pope_adversarial.json"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (tmp_path / "val2014").mkdir()
    samples = read_benchmark("pope", path, split="adversarial")  # a file works as --data too
    assert [s.answers for s in samples] == [("yes",), ("no",)]
    with pytest.raises(ImageError, match="COCO_val2014_1.jpg not found, expected an image file"):
        samples[0].load_image()
    path.write_text(json.dumps({**lines[0], "label": "maybe"}))
    with pytest.raises(ValueError, match="line 1 has label 'maybe'"):
        read_benchmark("pope", path)


def test_scienceqa_keeps_image_questions_of_the_split(tmp_path):
    problems = {
        "10": {"question": "Which is a mammal?", "choices": ["shark", "whale"], "answer": 1, "hint": "Look.",
               "image": "image.png", "split": "test"},
        "11": {"question": "No picture", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
               "split": "test"},
        "12": {"question": "Train", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png",
               "split": "train"},
    }  # fmt: skip
    path = _write_json(tmp_path / "problems.json", problems)
    _png(tmp_path / "images" / "test" / "10" / "image.png")
    [s] = read_benchmark("scienceqa", tmp_path)
    assert (s.question_id, s.choices, s.answers) == ("10", ("shark", "whale"), ("B",))
    assert build_prompt(s) == f"Look.\nWhich is a mammal?\nA. shark\nB. whale\n{MULTIPLE_CHOICE_PROMPT}"
    assert s.load_image().size == (8, 8)
    problems["10"]["answer"] = 2
    _write_json(path, problems)
    with pytest.raises(ValueError, match="problem 10 has answer 2, expected an index below 2"):
        read_benchmark("scienceqa", tmp_path)


def _b64_png(color):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_mmbench_tsv(tmp_path):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [
        ["0", "What is it?", "nan", "cat", "dog", "nan", "nan", "B", "x", _b64_png((0, 0, 255))],
        ["1", "Same image?", "A hint", "yes", "no", "maybe", "nan", "A", "x", "0"],  # refers to row 0's image
    ]
    path = tmp_path / "MMBench_DEV_EN.tsv"
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    a, b = read_benchmark("mmbench", tmp_path)
    assert (a.choices, a.answers, a.hint) == (("cat", "dog"), ("B",), "")
    assert (b.choices, b.answers, b.hint) == (("yes", "no", "maybe"), ("A",), "A hint")
    assert b.load_image().getpixel((0, 0)) == (0, 0, 255)
    rows[0][-1] = "@@not base64@@" * 10
    path.write_text("\n".join("\t".join(r) for r in [header, rows[0]]) + "\n")
    with pytest.raises(ImageError, match="base64 image of MMBench_DEV_EN.tsv row 1"):
        read_benchmark("mmbench", path)[0].load_image()
    path.write_text("index\tquestion\n0\tq\n")
    with pytest.raises(ValueError, match="missing column.*image, answer, A, B"):
        read_benchmark("mmbench", path)


def test_easy_vqa_package():
    pytest.importorskip("easy_vqa", reason="the easy-vqa package is not installed (pip install easy-vqa)")
    samples = read_benchmark("easy-vqa", None, "test")
    assert len(samples) == 9673  # the package's test questions
    assert len({s.question_id for s in samples}) == len(samples)
    answers = {s.answers[0] for s in samples}
    assert {"yes", "no", "circle", "rectangle", "triangle"} <= answers and len(answers) == 13
    assert samples[0].load_image().size == (64, 64)
    # one reader for every user of the package: val names the test split, as for the image-text pairs
    assert [s.answers for s in read_benchmark("easy-vqa", None, "val")] == [s.answers for s in samples]
    with pytest.raises(ValueError, match="splits train and test"):
        read_benchmark("easy-vqa", None, "dev")


def test_easy_vqa_llava_json_export(tmp_path):
    # the layout of `defocus-vlm data easy-vqa --output-dir DIR`: DIR/test.json, paths relative to DIR/images
    _png(tmp_path / "images" / "test" / "0.png")
    records = [
        {"id": "q0", "image": "test/0.png",
         "conversations": [{"from": "human", "value": f"<image>\nWhat shape is it?\n{SHORT_ANSWER_PROMPT}"},
                           {"from": "gpt", "value": "circle"}]},
        {"id": "q1", "image": "test/0.png",
         "conversations": [{"from": "human", "value": "<image>\nIs it red?"}, {"from": "gpt", "value": "yes"},
                           {"from": "human", "value": "What color?"}, {"from": "gpt", "value": "red"}]},
    ]  # fmt: skip
    path = _write_json(tmp_path / "test.json", records)
    samples = read_benchmark("easy-vqa", tmp_path, "test")
    assert [(s.question_id, s.question, s.answers[0]) for s in samples] == [
        ("q0", "What shape is it?", "circle"),
        ("q1-0", "Is it red?", "yes"),
        ("q1-1", "What color?", "red"),
    ]
    assert build_prompt(samples[0]) == f"What shape is it?\n{SHORT_ANSWER_PROMPT}"  # instruction not doubled
    assert samples[0].load_image().size == (8, 8)
    records[1]["image"] = ["test/0.png", "test/0.png"]
    records[1]["conversations"][2]["value"] += "<image>"
    _write_json(path, records)
    with pytest.raises(ValueError, match="record q1 has 2 images, expected one"):
        read_benchmark("easy-vqa", path)


def test_shapes_vqa_export_is_read_with_its_tags(tmp_path):
    # the layout of `defocus-vlm data shapes-vqa --output-dir DIR`: easy-VQA's, plus DIR/scenes.json
    _png(tmp_path / "images" / "test" / "00000.png")
    human = {"from": "human", "value": f"<image>\nHow many shapes are there?\n{SHORT_ANSWER_PROMPT}"}
    record = {"id": "q0", "image": "test/00000.png", "conversations": [human, {"from": "gpt", "value": "3"}]}
    path = _write_json(tmp_path / "test.json", [record])
    question = {"id": "q0", "type": "count_all", "region": "both", "unseen": False}
    scenes = _write_json(tmp_path / "scenes.json", {"splits": {"test": {"questions": [question]}}})
    [s] = read_benchmark("shapes-vqa", tmp_path)
    assert (s.question_id, s.question, s.answers) == ("q0", "How many shapes are there?", ("3",))
    assert s.tags == (("type", "count_all"), ("region", "both"), ("combination", "seen"),
                      ("type_region", "count_all/both"))
    assert build_prompt(s) == f"How many shapes are there?\n{SHORT_ANSWER_PROMPT}"

    with pytest.raises(ValueError, match="shapes-VQA needs the folder .* got the file"):
        read_benchmark("shapes-vqa", path)
    with pytest.raises(ValueError, match="scenes.json: no split 'test_unseen'; it has test"):
        read_benchmark("shapes-vqa", tmp_path, "test_unseen")
    _write_json(scenes, {"splits": {"test": {"questions": [{**question, "region": None}]}}})
    with pytest.raises(ValueError, match="scenes.json: test question 0 has no 'region' field"):
        read_benchmark("shapes-vqa", tmp_path)
    _write_json(scenes, {"splits": {"test": {"questions": [{**question, "id": "q1"}]}}})
    with pytest.raises(ValueError, match="scenes.json: no question 'q0' of test.json"):
        read_benchmark("shapes-vqa", tmp_path)
    scenes.unlink()
    with pytest.raises(FileNotFoundError, match="scenes.json"):
        read_benchmark("shapes-vqa", tmp_path)


def test_unknown_benchmark_and_missing_data(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'okvqa'"):
        read_benchmark("okvqa", tmp_path)
    with pytest.raises(ValueError, match="'gqa' needs --data"):
        read_benchmark("gqa", None)
    with pytest.raises(FileNotFoundError, match="dataset at .*nowhere"):
        read_benchmark("gqa", tmp_path / "nowhere")
