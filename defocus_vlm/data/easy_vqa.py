"""easy-VQA (PyPI ``easy-vqa``, MIT: 64x64 images with one coloured shape, 13 single-word answers), read
here and only here: the split reader every user of the package goes through (image-text pairs,
the VQA benchmark reader, the export), the colour-shape phrase each image's questions pin down, and
the LLaVA export of ``defocus-vlm data easy-vqa``.

The export writes LLaVA's conversation format: ``DIR/train.json`` and ``DIR/test.json`` (one record
per question, the answer as the assistant turn, so the test split doubles as the evaluation set),
images under ``DIR/images/{train,test}/`` (record paths are relative to ``DIR/images``) and the answer
vocabulary in ``DIR/answers.txt``. ``DIR/classes/{train,val}/<colour>_<shape>/`` holds the same images
as an image-folder classification set (24 classes; an image whose colour or shape its questions leave
open is left out) for pretraining an encoder with ``train classification``. ``group_by_image`` writes
each training image once with all of its questions as one multi-turn conversation (about 10 turns):
a tenth of the image tokens, but earlier answers give later ones away ("is there a red shape?" "yes"
... "what color is the shape?"), so a model trained on it learns to read the conversation instead of
the image and does worse on single questions."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from defocus_vlm.constants import IMAGE_TOKEN

from .classification import DataError
from .vqa import SHORT_ANSWER_PROMPT

SPLITS = ("train", "test")
SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black")
_SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test", "validation": "test"}


def read_split(split: str) -> tuple[list[tuple[str, str, int]], dict[int, str], list[str]]:
    """``(question, answer, image id)`` rows of a split (``val`` / ``validation`` name the test split),
    image id -> image path, and the answer vocabulary."""
    if split not in _SPLIT_ALIASES:
        raise DataError(f"easy-VQA has the splits train and test (val = test), not {split!r}")
    try:
        import easy_vqa
    except ImportError as err:
        raise DataError("easy-VQA is read from the easy-vqa package, which is not installed: pip install easy-vqa "
                        "(or pip install 'defocus-vlm[train]'); a `defocus-vlm data easy-vqa` export works too "
                        "where a command takes --data") from err
    name = _SPLIT_ALIASES[split]
    questions, answers, image_ids = getattr(easy_vqa, f"get_{name}_questions")()
    paths = getattr(easy_vqa, f"get_{name}_image_paths")()
    return list(zip(questions, answers, image_ids)), paths, list(easy_vqa.get_answers())


def is_colour_and_shape(phrase: str) -> bool:
    """True for a phrase of :func:`easy_vqa_phrases` that names both attributes ("blue circle")."""
    words = phrase.split()
    return len(words) == 2 and words[1] != "shape"


def easy_vqa_phrases(texts: Sequence[str], answers: Sequence[str], image_ids: Sequence[int]) -> dict[int, str]:
    """image id -> "colour shape" phrase from easy-VQA's (question, answer, image id) triples."""
    seen: dict[int, dict[str, set]] = {}
    for question, answer, image_id in zip(texts, answers, image_ids):
        words = question.rstrip("?").split()
        facts = seen.setdefault(image_id, {"yes": set(), "no": set()})
        if answer in ("yes", "no"):  # "is there (not) a red shape?": the named attribute is there or not
            present = (answer == "yes") != bool({"not", "no"} & set(words))
            facts["yes" if present else "no"].update(words)
        else:  # "what is the blue shape?" -> "rectangle": both the answer and the named attribute are there
            facts["yes"].update([*words, answer])
    phrases = {}
    for image_id, facts in seen.items():
        parts = []
        for options in (COLOURS, SHAPES):
            present = [w for w in options if w in facts["yes"]]
            left = [w for w in options if w not in facts["no"]]
            value = present[0] if len(present) == 1 else left[0] if len(left) == 1 else None
            parts.append(value)
        colour, shape = parts
        if colour or shape:
            phrases[image_id] = f"{colour} {shape}" if colour and shape else shape or f"{colour} shape"
    return phrases


def _turns(question: str, answer: str, instruction: str, with_image: bool) -> list[dict]:
    text = question + (f"\n{instruction}" if instruction else "")
    image = f"{IMAGE_TOKEN}\n" if with_image else ""
    return [{"from": "human", "value": image + text}, {"from": "gpt", "value": answer}]


def _records(split: str, rows: list, instruction: str, group: bool) -> list[dict]:
    if not group:
        return [{"id": f"easy_vqa_{split}_{i}", "image": f"{split}/{image_id}.png",
                 "conversations": _turns(q, a, instruction, True)} for i, (q, a, image_id) in enumerate(rows)]
    by_image: dict[int, list] = {}
    for q, a, image_id in rows:
        by_image.setdefault(image_id, []).append((q, a))
    return [{"id": f"easy_vqa_{split}_image_{image_id}", "image": f"{split}/{image_id}.png",
             "conversations": [t for k, (q, a) in enumerate(qa) for t in _turns(q, a, instruction, k == 0)]}
            for image_id, qa in by_image.items()]


def class_folder(phrase: str) -> str:
    """The image-folder class of a colour-shape phrase: "blue circle" -> ``blue_circle``."""
    return phrase.replace(" ", "_")


def class_names() -> list[str]:
    """The 24 colour-shape phrases in the label order of the ``classes/`` export (sorted folder names),
    for zero-shot classification of that folder (``eval zeroshot --classnames easy-vqa``)."""
    phrases = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
    return sorted(phrases, key=class_folder)


def _write_classes(root: Path, rows: list, image_dir: Path) -> None:
    """Image-folder layout ``root/<colour>_<shape>/<id>.png`` of the images whose colour and shape
    the questions pin down (:func:`easy_vqa_phrases`)."""
    phrases = easy_vqa_phrases(*zip(*rows)) if rows else {}
    for image_id, phrase in phrases.items():
        if is_colour_and_shape(phrase):
            folder = root / class_folder(phrase)
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image_dir / f"{image_id}.png", folder / f"{image_id}.png")


def balance_answers(records: list[dict]) -> list[dict]:
    """Each single-question record repeated round(most common answer's count / its answer's count)
    times among the records with the same question text (a yes/no question asked of 8 colours
    becomes about half yes, half no). Multi-turn records are kept once."""
    from collections import Counter

    def key(record: dict) -> tuple[str, str] | None:
        turns = record["conversations"]
        return (turns[0]["value"], turns[1]["value"]) if len(turns) == 2 else None

    counts = Counter(k for k in map(key, records) if k is not None)
    most = Counter()
    for (question, _), n in counts.items():
        most[question] = max(most[question], n)
    out = []
    for record in records:
        k = key(record)
        out.extend([record] * (max(1, round(most[k[0]] / counts[k])) if k else 1))
    return out


def export(out: str | Path, instruction: str = SHORT_ANSWER_PROMPT, group_by_image: bool = False,
           limit: int = 0, balance: bool = False) -> dict[str, int]:
    """Write easy-VQA under ``out`` (layout in the module docstring); returns records per split."""
    if limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    out = Path(out)
    counts = {}
    for split in SPLITS:
        rows, paths, answers = read_split(split)
        rows = rows[:limit] if limit else rows
        image_dir = out / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        for image_id in sorted({image_id for _, _, image_id in rows}):
            shutil.copyfile(paths[image_id], image_dir / f"{image_id}.png")
        _write_classes(out / "classes" / ("val" if split == "test" else split), rows, image_dir)
        records = _records(split, rows, instruction, group_by_image and split == "train")
        if balance and split == "train":
            records = balance_answers(records)
        (out / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n")
        counts[split] = len(records)
    (out / "answers.txt").write_text("\n".join(answers) + "\n")
    return counts
