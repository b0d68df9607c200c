"""shapes-VQA (``defocus-vlm data shapes-vqa``): the same files on every run (and a committed fingerprint),
every answer re-derived from the scene description by independent code, balanced answers, shapes inside
the canvas and apart, held-out combinations, the card, the CLI, the reader and the per-type metrics."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defocus_vlm.cli import main
from defocus_vlm.data.shapes_vqa import (
    COLORS,
    HELD_OUT_COMBINATIONS,
    SPLITS,
    ShapesVQAConfig,
    answer_counts,
    card_table,
    fingerprint,
    make_scene,
    render,
)
from defocus_vlm.data.vqa import SHORT_ANSWER_PROMPT

# The small set every test reads: 240 train scenes, 80 each for test and test_unseen, 96 px.
SMALL = ["--images", "240", "--test-images", "80", "--questions-per-image", "4", "--img-size", "96"]
SMALL_CONFIG = ShapesVQAConfig(images=240, test_images=80, questions_per_image=4, img_size=96)
# fingerprint() of SMALL with the default seed: a change here means the generator writes other data
# (then bump shapes_vqa.VERSION, update this and the fingerprint in docs/shapes_vqa.md)
SMALL_FINGERPRINT = "fc9b514db96a7e1b2e82995f7e68cd3ad8800925396477a5275538eb01c05af0"
MARGIN_PX = 8  # the documented rule at 96 px: centres at least 8 px apart for a relation or a quarter
PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "small"
    assert main(["data", "shapes-vqa", "--out", str(out), *SMALL]) == 0  # --out: the alias of --output-dir
    return out


def _scenes(out: Path) -> dict:
    return json.loads((out / "scenes.json").read_text())


def _file_hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}


def test_generation_is_deterministic_and_fingerprinted(small_set, tmp_path, capsys):
    capsys.readouterr()
    assert main(["data", "shapes-vqa", "--output-dir", str(tmp_path / "again"), *SMALL]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert _file_hashes(tmp_path / "again") == _file_hashes(small_set)  # byte for byte, PNGs included
    assert summary["fingerprint"] == fingerprint(small_set) == SMALL_FINGERPRINT
    assert summary["questions"] == {s: sum(sum(c.values()) for c in answer_counts(SMALL_CONFIG, s).values())
                                    for s in SPLITS}  # fmt: skip
    # a scene is a function of (seed, split, index) alone: made on its own, it is the one in the set
    scene = _scenes(small_set)["splits"]["test"]["scenes"][3]
    alone = make_scene(SMALL_CONFIG, "test", scene["index"]).to_json()
    assert alone == scene
    assert np.array_equal(np.asarray(render(make_scene(SMALL_CONFIG, "test", scene["index"]))),
                          np.asarray(Image.open(small_set / "images" / scene["image"]).convert("RGB")))  # fmt: skip
    other = make_scene(ShapesVQAConfig(seed=1, images=240, test_images=80), "test", scene["index"]).to_json()
    assert other["objects"] != scene["objects"]


# --- an independent reading of the questions -----------------------------------------------------

_TEMPLATES = [
    ("count_all", r"How many shapes are there\?"),
    ("count", r"How many (circles|squares|triangles|crosses) are there\?"),
    ("count", r"How many (\w+) shapes are there\?"),
    ("compare", r"Are there more (\w+) shapes than (\w+) shapes\?"),
    ("compare", r"Are there more (\w+) than (\w+)\?"),
    ("exist", r"Is there a (\w+) (\w+)\?"),
    ("spatial", r"Is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?"),
    ("position", r"What color is the shape in the (top|bottom)-(left|right) quarter of the image\?"),
    ("query_color", r"What color is the (\w+)\?"),
    ("query_shape", r"What shape is the (\w+) object\?"),
    ("query_size", r"What size is the (\w+) (\w+)\?"),
]


def _parse(text: str) -> tuple[str, tuple[str, ...]]:
    for qtype, pattern in _TEMPLATES:
        found = re.fullmatch(pattern, text)
        if found:
            return qtype, found.groups()
    raise AssertionError(f"no template reads {text!r}")


def _select(objects: list[dict], word: str) -> list[int]:
    """Indices of the objects a word names: a plural shape, a colour or a size."""
    if word in PLURAL:
        return [i for i, o in enumerate(objects) if o["shape"] == PLURAL[word]]
    key = "color" if word in COLORS else "size"
    assert word in COLORS or word in ("small", "large"), word
    return [i for i, o in enumerate(objects) if o[key] == word]


def _the(objects: list[dict], color: str, shape: str) -> int:
    found = [i for i, o in enumerate(objects) if o["color"] == color and o["shape"] == shape]
    assert len(found) == 1, f"'the {color} {shape}' names {len(found)} objects"
    return found[0]


def _solve(qtype: str, words: tuple[str, ...], objects: list[dict], size: int) -> tuple[str, list[int], str]:
    """(answer, evidence objects, form) from the object list alone, with the ambiguity rules asserted."""
    if qtype == "count_all":
        return str(len(objects)), list(range(len(objects))), ""
    if qtype == "count":
        found = _select(objects, words[0])
        form = "shape" if words[0] in PLURAL else "color" if words[0] in COLORS else "size"
        return str(len(found)), found, form
    if qtype == "compare":
        a, b = _select(objects, words[0]), _select(objects, words[1])
        assert len(a) != len(b), "a comparison of equal counts"
        return ("yes" if len(a) > len(b) else "no"), sorted(a + b), "shape" if words[0] in PLURAL else "color"
    if qtype == "exist":
        found = [i for i, o in enumerate(objects) if (o["color"], o["shape"]) == words]
        return ("yes" if found else "no"), found, ""
    if qtype == "spatial":
        i, j = _the(objects, words[0], words[1]), _the(objects, words[3], words[4])
        a, b = objects[i], objects[j]
        dx, dy = b["x"] - a["x"], b["y"] - a["y"]  # a is left of b when dx > 0, above b when dy > 0
        delta = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[words[2]]
        assert abs(delta) >= MARGIN_PX, f"{words[2]} asked about centres {abs(delta)} px apart"
        return ("yes" if delta > 0 else "no"), [i, j], words[2]
    if qtype == "position":
        def depth(o):  # how far the centre lies inside the quarter, in pixels (negative: outside)
            inside_y = size / 2 - o["y"] if words[0] == "top" else o["y"] - size / 2
            inside_x = size / 2 - o["x"] if words[1] == "left" else o["x"] - size / 2
            return min(inside_x, inside_y)

        inside = [i for i, o in enumerate(objects) if depth(o) > 0]
        assert len(inside) == 1, f"{len(inside)} shapes in the {words[0]}-{words[1]} quarter"
        assert depth(objects[inside[0]]) >= MARGIN_PX, "the shape is not clearly inside its quarter"
        assert all(depth(o) <= -MARGIN_PX for i, o in enumerate(objects) if i != inside[0]), "another shape is close"
        return objects[inside[0]]["color"], inside, ""
    key, given = {"query_color": ("shape", "color"), "query_shape": ("color", "shape")}.get(qtype, (None, None))
    if key:
        found = [i for i, o in enumerate(objects) if o[key] == words[0]]
        assert len(found) == 1, f"'the {words[0]}' names {len(found)} objects"
        return objects[found[0]][given], found, ""
    i = _the(objects, words[0], words[1])
    return objects[i]["size"], [i], ""


def test_every_answer_is_rederived_from_the_scene_description(small_set):
    meta = _scenes(small_set)
    held_out = {tuple(p) for p in meta["held_out_combinations"]}
    checked = Counter()
    for split in SPLITS:
        scenes = {s["image"]: s for s in meta["splits"][split]["scenes"]}
        for q in meta["splits"][split]["questions"]:
            scene = scenes[q["image"]]
            qtype, words = _parse(q["question"])
            assert qtype == q["type"], q
            answer, evidence, _ = _solve(qtype, words, scene["objects"], scene["img_size"])
            assert answer == q["answer"], q
            assert q["objects"] == evidence, q
            halves = {"top" if o["y"] < scene["img_size"] / 2 else "bottom" for o in map(scene["objects"].__getitem__,
                                                                                      evidence)}  # fmt: skip
            assert q["region"] == (halves.pop() if len(halves) == 1 else "both" if halves else "none"), q
            named = {(words[0], words[1])} if qtype in ("exist", "query_size") else set()
            if qtype == "spatial":
                named = {(words[0], words[1]), (words[3], words[4])}
            touched = named | {(scene["objects"][i]["color"], scene["objects"][i]["shape"]) for i in evidence}
            assert q["unseen"] == bool(touched & held_out), q
            checked[qtype] += 1
    assert set(checked) == {qtype for qtype, _ in _TEMPLATES}  # every type was checked
    assert sum(checked.values()) > 1000


def test_answers_are_balanced_per_type_and_form(small_set):
    meta = _scenes(small_set)
    for split in SPLITS:
        scenes = {s["image"]: s for s in meta["splits"][split]["scenes"]}
        by_type, by_form = {}, {}
        for q in meta["splits"][split]["questions"]:
            qtype, words = _parse(q["question"])
            _, _, form = _solve(qtype, words, scenes[q["image"]]["objects"], 96)
            by_type.setdefault(q["type"], Counter())[q["answer"]] += 1
            by_form.setdefault((q["type"], form), Counter())[q["answer"]] += 1
        expected = answer_counts(SMALL_CONFIG, split)
        assert {t: dict(c) for t, c in by_type.items()} == expected, split
        for (qtype, form), counts in by_form.items():
            assert set(counts) == set(meta["answers"][qtype]), (split, qtype, form)  # every answer occurs
            assert len(set(counts.values())) == 1, (split, qtype, form, counts)  # ... equally often


def test_llava_records_match_the_scene_file(small_set):
    meta = _scenes(small_set)
    for split in SPLITS:
        records = json.loads((small_set / f"{split}.json").read_text())
        questions = meta["splits"][split]["questions"]
        assert [r["id"] for r in records] == [q["id"] for q in questions]
        for record, q in zip(records, questions):
            human, gpt = record["conversations"]
            assert human == {"from": "human", "value": f"<image>\n{q['question']}\n{SHORT_ANSWER_PROMPT}"}
            assert gpt == {"from": "gpt", "value": q["answer"]} and record["image"] == q["image"]
            assert (small_set / "images" / record["image"]).is_file()
    answers = (small_set / "answers.txt").read_text().split("\n")[:-1]
    assert sorted(answers) == sorted({a for values in meta["answers"].values() for a in values})


def _check_rendering(out: Path, scene: dict, overlap: str) -> None:
    size, objects = scene["img_size"], scene["objects"]
    for o in objects:
        assert o["r"] <= o["x"] <= size - 1 - o["r"] and o["r"] <= o["y"] <= size - 1 - o["r"], o  # inside
    for k, a in enumerate(objects):
        for b in objects[k + 1 :]:
            d = ((a["x"] - b["x"]) ** 2 + (a["y"] - b["y"]) ** 2) ** 0.5
            if overlap == "none":
                assert d >= a["r"] + b["r"] + 2, (a, b)  # 2 px between their discs
            else:
                assert d > max(a["r"], b["r"]), (a, b)  # neither centre under the other shape
    pixels = np.asarray(Image.open(out / "images" / scene["image"]).convert("RGB")).astype(int)
    for o in objects:
        assert tuple(pixels[o["y"], o["x"]]) == COLORS[o["color"]], o  # each shape is drawn where it is said to be
    # every pixel that is not the light grey background belongs to a shape's disc
    grey = (pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2]) & (pixels[..., 0] >= 180)
    yy, xx = np.nonzero(~grey)
    covered = np.zeros(len(yy), dtype=bool)
    for o in objects:
        covered |= (xx - o["x"]) ** 2 + (yy - o["y"]) ** 2 <= o["r"] ** 2
    assert covered.all(), scene["image"]


def test_shapes_are_inside_the_canvas_apart_and_drawn_as_described(small_set, tmp_path):
    meta = _scenes(small_set)
    for split in SPLITS:
        for scene in meta["splits"][split]["scenes"][:40]:
            _check_rendering(small_set, scene, "none")
    assert main(["data", "shapes-vqa", "--output-dir", str(tmp_path), *SMALL, "--overlap", "partial",
                 "--background", "plain"]) == 0  # fmt: skip
    overlapping = 0
    for scene in _scenes(tmp_path)["splits"]["test"]["scenes"]:
        _check_rendering(tmp_path, scene, "partial")
        objects = scene["objects"]
        overlapping += any((a["x"] - b["x"]) ** 2 + (a["y"] - b["y"]) ** 2 < (a["r"] + b["r"]) ** 2
                           for k, a in enumerate(objects) for b in objects[k + 1 :])  # fmt: skip
    assert overlapping > 0  # the rule really lets shapes overlap
    assert {s["background"]["kind"] for s in _scenes(tmp_path)["splits"]["test"]["scenes"]} == {"plain"}
    assert {s["background"]["kind"] for s in meta["splits"]["test"]["scenes"]} == {"plain", "checker", "stripes"}


def test_held_out_combinations_appear_only_in_test_unseen(small_set):
    meta = _scenes(small_set)
    held_out = set(HELD_OUT_COMBINATIONS)
    for split in SPLITS:
        scenes = meta["splits"][split]["scenes"]
        with_held_out = [any((o["color"], o["shape"]) in held_out for o in s["objects"]) for s in scenes]
        texts = " ".join(q["question"] for q in meta["splits"][split]["questions"])
        named = {pair for pair in held_out if f"{pair[0]} {pair[1]}" in texts}
        if split == "test_unseen":
            assert all(with_held_out) and named == held_out
            unseen = [q["unseen"] for q in meta["splits"][split]["questions"]]
            assert 0 < sum(unseen) < len(unseen)
        else:
            assert not any(with_held_out) and not named
            assert not any(q["unseen"] for q in meta["splits"][split]["questions"])


def test_the_card_in_docs_is_the_generators():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "shapes_vqa.md").read_text()
    assert card_table(ShapesVQAConfig()) in docs, "docs/shapes_vqa.md is stale: paste card_table(ShapesVQAConfig())"
    assert "defocus-vlm data shapes-vqa --output-dir" in docs


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--img-size", "32"], "--img-size must be an integer in [64, 512], got 32"),
        (["--questions-per-image", "0"], "--questions-per-image must be an integer in [1, 32], got 0"),
        (["--images", "-1"], "--images must be an integer in [1, 1000000], got -1"),
        (["--images", "100"], "--test-images (default: --images / 10) x --questions-per-image must give at least 108"),
        (["--images", "4", "--test-images", "4", "--questions-per-image", "32"], "raise --images"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    assert main(["data", "shapes-vqa", "--output-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_reader_tags_and_per_type_accuracy(small_set):
    from defocus_vlm.eval.vqa import compute_metrics

    from defocus_vlm.data.vqa import build_prompt, read_benchmark

    samples = read_benchmark("shapes-vqa", small_set)  # the test split by default
    questions = _scenes(small_set)["splits"]["test"]["questions"]
    assert [s.question_id for s in samples] == [q["id"] for q in questions]
    assert build_prompt(samples[0]) == f"{questions[0]['question']}\n{SHORT_ANSWER_PROMPT}"
    assert samples[0].load_image().size == (96, 96)
    # right on every count question, wrong elsewhere
    predictions = {s.question_id: s.answers[0] if dict(s.tags)["type"] == "count" else "purple" for s in samples}
    metrics = compute_metrics("shapes-vqa", samples, predictions)
    by_type = metrics["accuracy_by_type"]
    counts = sum(answer_counts(SMALL_CONFIG, "test")["count"].values())
    assert by_type["count"] == {"accuracy": 100.0, "samples": counts}
    purple = sum(q["answer"] == "purple" for q in questions if q["type"] == "position")
    assert by_type["position"]["accuracy"] == pytest.approx(100 * purple / by_type["position"]["samples"])
    assert by_type["spatial"]["accuracy"] == 0.0
    assert sum(v["samples"] for v in metrics["accuracy_by_region"].values()) == len(samples)
    assert set(metrics["accuracy_by_region"]) <= {"top", "bottom", "both", "none"}
    by_cell = metrics["accuracy_by_type_region"]  # type x region: where a tower loses which type
    assert {k: v["samples"] for k, v in by_cell.items()} == Counter(f"{q['type']}/{q['region']}" for q in questions)
    assert {k: v["accuracy"] for k, v in by_cell.items() if k.split("/")[0] in ("count", "spatial")} == {
        k: 100.0 if k.startswith("count/") else 0.0 for k in by_cell if k.split("/")[0] in ("count", "spatial")}
    unseen = read_benchmark("shapes-vqa", small_set, "test_unseen")
    assert {dict(s.tags)["combination"] for s in unseen} == {"seen", "unseen"}
