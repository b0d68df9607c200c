"""Readers for the official local file formats of the VQA benchmarks.

Each reader turns a benchmark's files into a list of :class:`VQASample`. ``data`` is the dataset's
folder (the expected file names are below) or, where one file holds everything, that file itself;
``image_dir`` overrides where the images are looked up.

- ``vqav2`` (splits val, train): ``v2_OpenEnded_mscoco_{split}2014_questions.json`` and
  ``v2_mscoco_{split}2014_annotations.json``; images ``{split}2014/COCO_{split}2014_{image_id:012d}.jpg``.
- ``textvqa`` (val, train): ``TextVQA_0.5.1_{split}.json``; images ``train_images/{image_id}.jpg``.
- ``gqa`` (testdev, val, ...): ``{split}_balanced_questions.json``; images ``images/{imageId}.jpg``.
- ``pope`` (random, popular, adversarial): ``coco_pope_{split}.json`` (JSON lines); images ``val2014/{image}``.
- ``scienceqa`` (test, val, train): ``problems.json``, only the questions with an image (ScienceQA-IMG);
  images ``images/{split}/{pid}/{image}``.
- ``mmbench`` (dev, test): ``MMBench_{SPLIT}_EN.tsv`` with the images base64-encoded in the file
  (plain single-pass accuracy, not MMBench's circular evaluation).
- ``easy-vqa`` (test, train): no files, read from the ``easy-vqa`` package; or the LLaVA-JSON export
  of ``defocus-vlm data easy-vqa --output-dir DIR``: ``DIR/{split}.json``, images under ``DIR/images``.
- ``shapes-vqa`` (test, test_unseen, train): the export of ``defocus-vlm data shapes-vqa --output-dir DIR``:
  ``DIR/{split}.json`` as easy-VQA's, each question tagged from ``DIR/scenes.json`` with its type, region
  and attribute combination (seen / unseen in training), which the metrics are broken down by.

A missing file or field raises one ``FileNotFoundError`` / ``ValueError`` naming the file and the
field; a missing image is reported when it is loaded (:class:`~defocus_vlm.image_io.ImageError`).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from defocus_vlm.constants import IMAGE_TOKEN
from defocus_vlm.image_io import ImageError, load_image, to_pil

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def choice_letters(num_choices: int) -> str:
    if not 1 <= num_choices <= len(LETTERS):
        raise ValueError(f"expected 1 to {len(LETTERS)} choices, got {num_choices}")
    return LETTERS[:num_choices]



SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class EncodedImage:
    """An image stored inside a data file as base64 (MMBench); decoded only when it is used."""

    data: str
    origin: str  # "file.tsv row 12", for error messages


@dataclass(frozen=True)
class VQASample:
    """One question about one image.

    ``answers`` holds the ground truth: the ten annotator answers (VQAv2, TextVQA), the single answer
    (GQA, easy-VQA), "yes"/"no" (POPE) or the option letter (ScienceQA, MMBench). ``choices`` are
    the option texts of a multiple-choice question, lettered A, B, ... in order. ``tags`` are (key, value)
    pairs that the accuracy is also reported by (shapes-VQA: ``("type", "count")``, ``("region", "top")``)."""

    question_id: str
    question: str
    image: Path | EncodedImage
    answers: tuple[str, ...]
    choices: tuple[str, ...] = ()
    hint: str = ""
    tags: tuple[tuple[str, str], ...] = ()

    def load_image(self) -> Image.Image:
        if isinstance(self.image, EncodedImage):
            try:
                raw = base64.b64decode(self.image.data, validate=True)
                with Image.open(io.BytesIO(raw)) as img:
                    img.load()
                    return to_pil(img.copy())
            except (binascii.Error, OSError, ValueError) as err:
                raise ImageError(f"cannot decode the base64 image of {self.image.origin}: {err}") from err
        return to_pil(load_image(self.image))


# --- shared helpers ------------------------------------------------------------------------------


_JSON_NAMES = {dict: "object", list: "list"}


def _load_json(path: Path, kind: type) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"expected the file {path}, but it does not exist")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(obj, kind):
        raise ValueError(f"{path}: expected a JSON {_JSON_NAMES[kind]} at the top level, found {type(obj).__name__}")
    return obj


def _field(entry: Any, key: str, path: Path, where: str, kind: type | None = None) -> Any:
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: {where} should be a JSON object, found {type(entry).__name__}")
    if entry.get(key) is None:
        raise ValueError(f"{path}: {where} has no '{key}' field")
    if kind is not None and not isinstance(entry[key], kind):
        found = type(entry[key]).__name__
        raise ValueError(f"{path}: '{key}' of {where} should be a JSON {_JSON_NAMES[kind]}, found {found}")
    return entry[key]


def _data_file(data: Path, name: str) -> Path:
    """``data`` itself when it is a file, else ``data/name``."""
    path = data if data.is_file() else data / name
    if not path.is_file():
        raise FileNotFoundError(f"expected the file {path}, but it does not exist")
    return path


def _image_folder(image_dir: str | os.PathLike | None, default: Path) -> Path:
    folder = Path(image_dir) if image_dir is not None else default
    if not folder.is_dir():
        raise FileNotFoundError(f"expected the image folder {folder}, but it does not exist (set --image-dir)")
    return folder


def _strip_prompt(text: str) -> str:
    """A question without the image placeholder or an answer-format instruction already in it."""
    for extra in (IMAGE_TOKEN, SHORT_ANSWER_PROMPT, MULTIPLE_CHOICE_PROMPT):
        text = text.replace(extra, "")
    return text.strip()


# --- readers -------------------------------------------------------------------------------------


def read_vqav2(data: Path, split: str, image_dir: str | os.PathLike | None = None) -> list[VQASample]:
    if data.is_file():
        raise ValueError(f"VQAv2 needs the folder with its questions and annotations files, got the file {data}")
    questions_path = _data_file(data, f"v2_OpenEnded_mscoco_{split}2014_questions.json")
    annotations_path = _data_file(data, f"v2_mscoco_{split}2014_annotations.json")
    questions_json = _load_json(questions_path, dict)
    questions = _field(questions_json, "questions", questions_path, "the top level", list)
    subtype = questions_json.get("data_subtype", f"{split}2014")
    annotations = _field(_load_json(annotations_path, dict), "annotations", annotations_path, "the top level", list)
    answers_by_id = {}
    for i, ann in enumerate(annotations):
        where = f"annotation {i}"
        answers = _field(ann, "answers", annotations_path, where, list)
        answers_by_id[_field(ann, "question_id", annotations_path, where)] = tuple(
            str(_field(a, "answer", annotations_path, f"{where} answer {j}")) for j, a in enumerate(answers)
        )
    folder = _image_folder(image_dir, questions_path.parent / subtype)
    samples = []
    for i, q in enumerate(questions):
        qid = _field(q, "question_id", questions_path, f"question {i}")
        if qid not in answers_by_id:
            raise ValueError(f"{annotations_path}: no annotation for question_id {qid} of {questions_path.name}")
        image_id = int(_field(q, "image_id", questions_path, f"question {i}"))
        samples.append(
            VQASample(
                question_id=str(qid),
                question=str(_field(q, "question", questions_path, f"question {i}")),
                image=folder / f"COCO_{subtype}_{image_id:012d}.jpg",
                answers=answers_by_id[qid],
            )
        )
    return samples


def read_textvqa(data: Path, split: str, image_dir: str | os.PathLike | None = None) -> list[VQASample]:
    path = _data_file(data, f"TextVQA_0.5.1_{split}.json")
    entries = _field(_load_json(path, dict), "data", path, "the top level", list)
    folder = _image_folder(image_dir, path.parent / ("test_images" if split == "test" else "train_images"))
    samples = []
    for i, e in enumerate(entries):
        where = f"entry {i}"
        samples.append(
            VQASample(
                question_id=str(_field(e, "question_id", path, where)),
                question=str(_field(e, "question", path, where)),
                image=folder / f"{_field(e, 'image_id', path, where)}.jpg",
                answers=tuple(str(a) for a in _field(e, "answers", path, where, list)),
            )
        )
    return samples


def read_gqa(data: Path, split: str, image_dir: str | os.PathLike | None = None) -> list[VQASample]:
    path = _data_file(data, f"{split}_balanced_questions.json")
    entries = _load_json(path, dict)
    folder = _image_folder(image_dir, path.parent / "images")
    samples = []
    for qid, e in entries.items():
        where = f"question {qid}"
        samples.append(
            VQASample(
                question_id=str(qid),
                question=str(_field(e, "question", path, where)),
                image=folder / f"{_field(e, 'imageId', path, where)}.jpg",
                answers=(str(_field(e, "answer", path, where)),),
            )
        )
    return samples


def read_pope(data: Path, split: str, image_dir: str | os.PathLike | None = None) -> list[VQASample]:
    path = _data_file(data, f"coco_pope_{split}.json")
    folder = _image_folder(image_dir, path.parent / "val2014")
    samples = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {line_no} is not valid JSON: {err}") from err
        where = f"line {line_no}"
        label = str(_field(e, "label", path, where)).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"{path}: line {line_no} has label {label!r}, expected 'yes' or 'no'")
        samples.append(
            VQASample(
                question_id=str(_field(e, "question_id", path, where)),
                question=str(_field(e, "text", path, where)),
                image=folder / str(_field(e, "image", path, where)),
                answers=(label,),
            )
        )
    return samples


def read_scienceqa(data: Path, split: str, image_dir: str | os.PathLike | None = None) -> list[VQASample]:
    path = _data_file(data, "problems.json")
    problems = _load_json(path, dict)
    folder = _image_folder(image_dir, path.parent / "images")
    samples = []
    for pid, p in problems.items():
        where = f"problem {pid}"
        if _field(p, "split", path, where) != split or not p.get("image"):
            continue  # ScienceQA-IMG: only the questions that come with an image
        choices = tuple(str(c) for c in _field(p, "choices", path, where, list))
        answer = _field(p, "answer", path, where)
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{path}: {where} has answer {answer!r}, expected an index below {len(choices)}")
        samples.append(
            VQASample(
                question_id=str(pid),
                question=str(_field(p, "question", path, where)),
                image=folder / split / str(pid) / str(p["image"]),
                answers=(choice_letters(len(choices))[answer],),
                choices=choices,
                hint=str(p.get("hint") or ""),
            )
        )
    return samples


def _tsv_cell(row: dict, key: str) -> str:
    value = (row.get(key) or "").strip()
    return "" if value.lower() == "nan" else value  # pandas writes missing cells as "nan"


def read_mmbench(data: Path, split: str, image_dir: str | os.PathLike | None = None) -> list[VQASample]:
    del image_dir  # images are inside the TSV
    path = _data_file(data, f"MMBench_{split.upper()}_EN.tsv")
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default cell limit
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    header = set(rows[0]) if rows else set()
    missing = [c for c in ("index", "question", "image", "answer", "A", "B") if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (expected an MMBench TSV)")
    images = {_tsv_cell(r, "index"): _tsv_cell(r, "image") for r in rows}
    samples = []
    for row_no, row in enumerate(rows, start=1):
        index = _tsv_cell(row, "index")
        choices = tuple(_tsv_cell(row, c) for c in LETTERS if _tsv_cell(row, c))
        answer = _tsv_cell(row, "answer")
        if answer not in LETTERS[: len(choices)]:
            raise ValueError(f"{path}: row {row_no} has answer {answer!r}, expected one of its {len(choices)} options")
        image = _tsv_cell(row, "image")
        if len(image) < 64 and image in images:  # a short image cell refers to the row that holds the picture
            image = images[image]
        if not image:
            raise ValueError(f"{path}: row {row_no} has no 'image'")
        samples.append(
            VQASample(
                question_id=index,
                question=_tsv_cell(row, "question"),
                image=EncodedImage(image, f"{path.name} row {row_no}"),
                answers=(answer,),
                choices=choices,
                hint=_tsv_cell(row, "hint"),
            )
        )
    return samples


def read_easy_vqa_package(split: str) -> list[VQASample]:
    from .easy_vqa import read_split

    rows, paths, _ = read_split(split)
    return [VQASample(question_id=f"{split}-{i}", question=text, image=Path(paths[image_id]), answers=(answer,))
            for i, (text, answer, image_id) in enumerate(rows)]


def read_llava_json(data: Path, split: str, image_dir: str | os.PathLike | None = None) -> list[VQASample]:
    """A LLaVA conversation file as ``defocus-vlm data easy-vqa`` writes it: ``DIR/{split}.json`` with
    image paths relative to ``DIR/images`` (or to ``DIR`` when there is no such folder). Each
    user/assistant pair of turns is one sample; records must have exactly one image."""
    from .llava import read_llava_json as read_conversations

    path = _data_file(data, f"{split}.json")
    default_images = path.parent / "images"
    folder = _image_folder(image_dir, default_images if default_images.is_dir() else path.parent)
    samples = []
    for conversation in read_conversations(path):
        if len(conversation.images) != 1:
            raise ValueError(f"{path}: record {conversation.id} has {len(conversation.images)} images, expected one")
        turns = conversation.messages
        pairs = [
            (question["content"], answer["content"])
            for question, answer in zip(turns, turns[1:])
            if question["role"] == "user" and answer["role"] == "assistant"
        ]
        for k, (question, answer) in enumerate(pairs):
            samples.append(
                VQASample(
                    question_id=conversation.id if len(pairs) == 1 else f"{conversation.id}-{k}",
                    question=_strip_prompt(question),
                    image=folder / conversation.images[0],
                    answers=(answer.strip(),),
                )
            )
    return samples


def read_easy_vqa(data: Path | None, split: str, image_dir: str | os.PathLike | None = None) -> list[VQASample]:
    return read_easy_vqa_package(split) if data is None else read_llava_json(data, split, image_dir)


def read_shapes_vqa(data: Path, split: str, image_dir: str | os.PathLike | None = None) -> list[VQASample]:
    """The questions of ``DIR/{split}.json``, each tagged with its type, region, combination and
    type/region from ``DIR/scenes.json``."""
    if data.is_file():
        raise ValueError(f"shapes-VQA needs the folder that `defocus-vlm data shapes-vqa` wrote, got the file {data}")
    path = _data_file(data, "scenes.json")
    splits = _field(_load_json(path, dict), "splits", path, "the top level", dict)
    if split not in splits:
        raise ValueError(f"{path}: no split {split!r}; it has {', '.join(splits) or 'none'}")
    tags = {}
    for i, q in enumerate(_field(splits[split], "questions", path, f"split {split}", list)):
        where = f"{split} question {i}"
        combination = "unseen" if _field(q, "unseen", path, where) else "seen"
        qtype, region = str(_field(q, "type", path, where)), str(_field(q, "region", path, where))
        # type_region: whether a tower loses a question type where its evidence lies (top / bottom half)
        tags[str(_field(q, "id", path, where))] = (
            ("type", qtype), ("region", region), ("combination", combination), ("type_region", f"{qtype}/{region}"),
        )
    samples = read_llava_json(data, split, image_dir)
    for s in samples:
        if s.question_id not in tags:
            raise ValueError(f"{path}: no question {s.question_id!r} of {split}.json in split {split}")
    return [replace(s, tags=tags[s.question_id]) for s in samples]


@dataclass(frozen=True)
class Benchmark:
    reader: Callable[..., list[VQASample]]
    default_split: str
    multiple_choice: bool = False
    needs_data: bool = True


BENCHMARKS: dict[str, Benchmark] = {
    "easy-vqa": Benchmark(read_easy_vqa, "test", needs_data=False),
    "shapes-vqa": Benchmark(read_shapes_vqa, "test"),
    "vqav2": Benchmark(read_vqav2, "val"),
    "textvqa": Benchmark(read_textvqa, "val"),
    "gqa": Benchmark(read_gqa, "testdev"),
    "pope": Benchmark(read_pope, "random"),
    "scienceqa": Benchmark(read_scienceqa, "test", multiple_choice=True),
    "mmbench": Benchmark(read_mmbench, "dev", multiple_choice=True),
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def read_benchmark(
    name: str,
    data: str | os.PathLike | None = None,
    split: str | None = None,
    image_dir: str | os.PathLike | None = None,
) -> list[VQASample]:
    """The samples of ``name`` (a key of :data:`BENCHMARKS`) in file order."""
    benchmark = get_benchmark(name)
    if data is None and benchmark.needs_data:
        raise ValueError(f"benchmark {name!r} needs --data (its folder or file)")
    path = None if data is None else Path(data)
    if path is not None and not path.exists():
        raise FileNotFoundError(f"expected the dataset at {path}, but it does not exist")
    return benchmark.reader(path, split or benchmark.default_split, image_dir)


def build_prompt(sample: VQASample) -> str:
    """LLaVA's evaluation prompt: the question and the short-answer instruction, or hint, question,
    lettered options and the multiple-choice instruction."""
    if not sample.choices:
        return f"{sample.question}\n{SHORT_ANSWER_PROMPT}"
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, sample.choices))
    context = f"{sample.hint}\n" if sample.hint else ""
    return f"{context}{sample.question}\n{options}\n{MULTIPLE_CHOICE_PROMPT}"

