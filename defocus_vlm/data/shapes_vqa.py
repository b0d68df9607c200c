"""shapes-VQA: generated scenes of 2-6 coloured shapes with questions that need the whole image
(counting, comparison, spatial relations, position, existence, attributes), balanced answers per question
type, and a held-out split of colour-shape combinations never seen in training. Deterministic: the same
seed writes the same data on every machine.

Why: easy-VQA (one shape per image) is solved by a single class token, so it cannot tell a causal
encoder, whose top patches never see the bottom ones, from a non-causal one. Here most answers depend
on objects anywhere in the image, and each question records where its evidence lies (``region``).

Layout written by :func:`write_shapes_vqa` (``defocus-vlm data shapes-vqa --output-dir DIR``), like the
easy-VQA export: ``DIR/{train,test,test_unseen}.json`` in LLaVA's format (one record per question, the
answer as the assistant turn), images ``DIR/images/<split>/<index>.png`` (record paths are relative to
``DIR/images``), ``DIR/scenes.json`` (every scene's objects, and per question its type, region, the
objects its answer depends on and whether one of them is a held-out combination), ``DIR/answers.txt``
and ``DIR/README.md`` (the card: counts, chance per question type, fingerprint).

A scene is a pure function of (seed, split, index): its integers come from the raw output of a PCG64
bit generator seeded by ``SeedSequence(seed, spawn_key=(0, split, index))``. NumPy keeps SeedSequence and
the PCG64 stream fixed across releases, but not ``Generator.integers`` / ``choice`` (NEP 19), so those
are not used. Shapes are integer pixel masks (no anti-aliasing, no fonts): the same pixels with any
Pillow. Each question's answer is computed from the scene's objects by its type's answer function; the
questions of a split are then drawn per (type, form, answer) in equal numbers, so each answer of a type
is equally likely (chance = 1 / number of answers), also within each form ("How many red shapes" vs
"How many circles"; "left of" vs "above")."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from defocus_vlm.constants import IMAGE_TOKEN

VERSION = 1  # goes into scenes.json; bump with any change to what the generator writes

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "purple": (140, 50, 170),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES = ("small", "large")
RADIUS_FRACTION = {"small": 0.07, "large": 0.11}  # radius of the disc around a shape / image side
# Never drawn in train or test: one per shape, each with another colour, so that every colour and
# every shape is seen in training, only not these pairs. test_unseen has at least one in every image.
HELD_OUT_COMBINATIONS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "cross"),
    ("yellow", "square"),
)
ALL_COMBINATIONS = tuple((c, s) for c in COLORS for s in SHAPES)
SEEN_COMBINATIONS = tuple(p for p in ALL_COMBINATIONS if p not in HELD_OUT_COMBINATIONS)

SPLITS = ("train", "test", "test_unseen")
MIN_OBJECTS, MAX_OBJECTS = 2, 6
GAP = 2  # px between the discs of two shapes when overlap is "none"
MARGIN_FRACTION = 0.08  # of the image side: how clearly apart centres must be for a relation or quadrant
RELATIONS = ("left of", "right of", "above", "below")
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
OVERLAP_RULES = ("none", "partial")
BACKGROUNDS = ("mixed", "plain", "textured")
BACKGROUND_KINDS = ("plain", "checker", "stripes")
FINGERPRINT_IMAGES = 16  # images per split that the fingerprint hashes, besides every JSON file

_SCENE_STREAM, _SELECT_STREAM = 0, 1  # first spawn-key word: which use a random stream serves
_MAX_TRIES, _MAX_RESTARTS = 200, 100  # placement attempts per shape, and fresh starts per scene


class _Stream:
    """Uniform integers from PCG64's raw 64-bit words (stable across NumPy releases, unlike Generator's)."""

    def __init__(self, seed: int, *key: int) -> None:
        self._bits = np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key))
        self._words: list[int] = []

    def below(self, n: int) -> int:
        """Uniform in ``range(n)``; words above the largest multiple of n are redrawn, so none is favoured."""
        limit = (1 << 64) - (1 << 64) % n
        while True:
            if not self._words:
                self._words = self._bits.random_raw(64).tolist()[::-1]
            word = self._words.pop()
            if word < limit:
                return word % n

    def between(self, low: int, high: int) -> int:
        return low + self.below(high - low + 1)

    def sample(self, n: int, k: int) -> list[int]:
        """``k`` distinct indices of ``range(n)`` (a partial Fisher-Yates shuffle, kept sparse)."""
        moved: dict[int, int] = {}
        out = []
        for i in range(k):
            j = i + self.below(n - i)
            out.append(moved.get(j, j))
            moved[j] = moved.get(i, i)
        return out


# --- configuration -------------------------------------------------------------------------------


_LIMITS = {  # field -> (lowest, highest) allowed; the flag is --field-name
    "seed": (0, 2**63 - 1),
    "images": (1, 1_000_000),
    "test_images": (0, 1_000_000),
    "questions_per_image": (1, 32),
    "img_size": (64, 512),
}


@dataclass(frozen=True)
class ShapesVQAConfig:
    """What to generate. ``images`` is the number of train scenes; ``test_images`` that of test and of
    test_unseen each (0: a tenth of ``images``). Each split gets about ``questions_per_image`` questions
    per scene, drawn from all of them (a scene may get none and is then not written)."""

    seed: int = 0
    images: int = 5000
    test_images: int = 0
    questions_per_image: int = 4
    img_size: int = 96
    overlap: str = "none"
    background: str = "mixed"

    def __post_init__(self) -> None:
        for name, (low, high) in _LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer in [{low}, {high}], got {value!r}")
        if self.overlap not in OVERLAP_RULES:
            raise ValueError(f"--overlap must be one of {', '.join(OVERLAP_RULES)}, got {self.overlap!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"--background must be one of {', '.join(BACKGROUNDS)}, got {self.background!r}")
        need = min_questions_per_split()
        for split in SPLITS:
            if self.split_questions(split) < need:
                flag = "--images" if split == "train" else "--test-images (default: --images / 10)"
                raise ValueError(
                    f"{flag} x --questions-per-image must give at least {need} questions per split (one per "
                    f"type, form and answer); {split} gets {self.split_images(split)} x {self.questions_per_image}"
                )

    def split_images(self, split: str) -> int:
        _check_split(split)
        return self.images if split == "train" else (self.test_images or max(1, self.images // 10))

    def split_questions(self, split: str) -> int:
        return self.split_images(split) * self.questions_per_image

    def quota(self, split: str, qtype: QuestionType) -> int:
        """Questions per (form, answer) of ``qtype`` in ``split``: equal for all, so answers are balanced."""
        per_type = self.split_questions(split) // len(QUESTION_TYPES)
        return per_type // (len(qtype.forms) * len(qtype.answers))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"shapes-VQA has the splits {', '.join(SPLITS)}, got {split!r}")


# --- scenes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeObject:
    """One shape: attributes, integer centre and the radius of the disc it lies in."""

    color: str
    shape: str
    size: str
    x: int
    y: int
    r: int


@dataclass(frozen=True)
class Scene:
    split: str
    index: int
    img_size: int
    background: dict
    objects: tuple[ShapeObject, ...]

    @property
    def image(self) -> str:
        """The image path, relative to ``DIR/images``."""
        return f"{self.split}/{self.index:05d}.png"

    def to_json(self) -> dict:
        return {"image": self.image, "index": self.index, "img_size": self.img_size,
                "background": self.background, "objects": [asdict(o) for o in self.objects]}  # fmt: skip


def radius(size: str, img_size: int) -> int:
    return max(3, round(RADIUS_FRACTION[size] * img_size))


def margin(img_size: int) -> int:
    """Pixels by which centres must differ along an axis before a relation or quadrant is asked about."""
    return max(3, round(MARGIN_FRACTION * img_size))


def _fits(placed: Sequence[ShapeObject], x: int, y: int, r: int, overlap: str) -> bool:
    for o in placed:
        d2 = (o.x - x) ** 2 + (o.y - y) ** 2
        # "partial": discs may overlap, but no centre lies under another shape, so every shape stays visible
        need = o.r + r + GAP if overlap == "none" else max(o.r, r) + 2
        if d2 < need * need:
            return False
    return True


def _place(
    stream: _Stream, img_size: int, specs: Sequence[tuple[str, str, str]], overlap: str
) -> tuple[ShapeObject, ...]:
    for _ in range(_MAX_RESTARTS):
        placed: list[ShapeObject] = []
        for color, shape, size in specs:
            r = radius(size, img_size)
            for _ in range(_MAX_TRIES):
                x, y = stream.between(r + 1, img_size - 2 - r), stream.between(r + 1, img_size - 2 - r)
                if _fits(placed, x, y, r, overlap):
                    placed.append(ShapeObject(color, shape, size, x, y, r))
                    break
            else:
                break  # this shape found no room: start the scene's layout again
        if len(placed) == len(specs):
            return tuple(placed)
    raise RuntimeError(f"cannot place {len(specs)} shapes on a {img_size} px canvas")


def _background(stream: _Stream, mode: str) -> dict:
    # the same draws under every mode, so a scene's shapes do not depend on --background
    k, gray, contrast, period = stream.below(6), stream.between(200, 240), stream.between(10, 20), stream.between(3, 8)
    kind = {"mixed": BACKGROUND_KINDS[k % 3], "plain": "plain", "textured": BACKGROUND_KINDS[1 + k % 2]}[mode]
    if kind == "plain":
        return {"kind": kind, "gray": gray}
    return {"kind": kind, "gray": gray, "contrast": contrast, "period": period}


def make_scene(config: ShapesVQAConfig, split: str, index: int) -> Scene:
    """Scene ``index`` of ``split``: a pure function of (config, split, index)."""
    _check_split(split)
    stream = _Stream(config.seed, _SCENE_STREAM, SPLITS.index(split), index)
    background = _background(stream, config.background)
    n = stream.between(MIN_OBJECTS, MAX_OBJECTS)
    combos = ALL_COMBINATIONS if split == "test_unseen" else SEEN_COMBINATIONS
    pairs = [combos[stream.below(len(combos))] for _ in range(n)]
    if split == "test_unseen" and not any(p in HELD_OUT_COMBINATIONS for p in pairs):
        pairs[stream.below(n)] = HELD_OUT_COMBINATIONS[stream.below(len(HELD_OUT_COMBINATIONS))]
    specs = [(color, shape, SIZES[stream.below(len(SIZES))]) for color, shape in pairs]
    objects = _place(stream, config.img_size, specs, config.overlap)
    return Scene(split, index, config.img_size, background, objects)


def shape_mask(obj: ShapeObject, img_size: int) -> np.ndarray:
    """Boolean ``(img_size, img_size)`` mask of the pixels ``obj`` covers, all inside its disc."""
    yy, xx = np.mgrid[0:img_size, 0:img_size]
    dx, dy, r = xx - obj.x, yy - obj.y, obj.r
    if obj.shape == "circle":
        inside = dx * dx + dy * dy <= r * r - r  # radius ~ r - 1/2: round, without single-pixel bumps
    elif obj.shape == "square":
        half = 7 * r // 10
        inside = (abs(dx) <= half) & (abs(dy) <= half)
    elif obj.shape == "triangle":
        # equilateral, apex up, centroid on the centre; in doubled coordinates the corners are integers
        w = round(3**0.5 * r)
        inside = (w * (2 * dy + 2 * r) >= 3 * r * abs(2 * dx)) & (2 * dy <= r)
    elif obj.shape == "cross":
        arm, half = r - 1, max(1, 3 * r // 10)
        inside = ((abs(dx) <= arm) & (abs(dy) <= half)) | ((abs(dx) <= half) & (abs(dy) <= arm))
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; known: {', '.join(SHAPES)}")
    return inside & (dx * dx + dy * dy <= r * r)


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image: the background pattern, then the shapes in order."""
    n, bg = scene.img_size, scene.background
    yy, xx = np.mgrid[0:n, 0:n]
    if bg["kind"] == "checker":
        dark = (xx // bg["period"] + yy // bg["period"]) % 2 == 1
    elif bg["kind"] == "stripes":
        dark = (xx + yy) // bg["period"] % 2 == 1
    else:
        dark = np.zeros((n, n), dtype=bool)
    gray = np.where(dark, bg["gray"] - bg.get("contrast", 0), bg["gray"]).astype(np.uint8)
    pixels = np.repeat(gray[:, :, None], 3, axis=2)
    for obj in scene.objects:
        pixels[shape_mask(obj, n)] = COLORS[obj.color]
    return Image.fromarray(pixels)


# --- question types ------------------------------------------------------------------------------
# Each type: candidates(scene, combos) yields the parameters of every question the scene answers
# unambiguously; answer(scene, params) is the single source of truth; evidence(scene, params) lists
# the objects the answer depends on. A parameter that names an object is a (colour, shape) tuple.

Params = tuple


def _matching(scene: Scene, key: str, value: str) -> tuple[int, ...]:
    return tuple(i for i, o in enumerate(scene.objects) if getattr(o, key) == value)


def _unique_objects(scene: Scene) -> dict[tuple[str, str], int]:
    """(colour, shape) -> index, for the combinations that occur exactly once in the scene."""
    seen: dict[tuple[str, str], list[int]] = {}
    for i, o in enumerate(scene.objects):
        seen.setdefault((o.color, o.shape), []).append(i)
    return {pair: found[0] for pair, found in seen.items() if len(found) == 1}


def _the(scene: Scene, pair: tuple[str, str]) -> int:
    found = [i for i, o in enumerate(scene.objects) if (o.color, o.shape) == pair]
    if len(found) != 1:
        raise ValueError(f"scene {scene.image} has {len(found)} {pair[0]} {PLURALS[pair[1]]}, expected one")
    return found[0]


def _the_one(scene: Scene, key: str, value: str) -> int:
    found = _matching(scene, key, value)
    if len(found) != 1:
        raise ValueError(f"scene {scene.image} has {len(found)} objects with {key} {value}, expected one")
    return found[0]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


_COUNTABLE = (("color", tuple(COLORS)), ("shape", SHAPES), ("size", SIZES))


def _count_candidates(scene: Scene, combos) -> Iterator[Params]:
    for key, values in _COUNTABLE:
        for value in values:
            yield (key, value)


def _count_text(p: Params) -> str:
    key, value = p
    return f"How many {PLURALS[value]} are there?" if key == "shape" else f"How many {value} shapes are there?"


def _compare_candidates(scene: Scene, combos) -> Iterator[Params]:
    for key, values in _COUNTABLE[:2]:
        counts = {v: len(_matching(scene, key, v)) for v in values}
        for a in values:
            for b in values:
                if a != b and counts[a] != counts[b]:  # equal counts: "more" would hinge on a tie
                    yield (key, a, b)


def _compare_text(p: Params) -> str:
    key, a, b = p
    if key == "shape":
        return f"Are there more {PLURALS[a]} than {PLURALS[b]}?"
    return f"Are there more {a} shapes than {b} shapes?"


def _relation_holds(relation: str, a: ShapeObject, b: ShapeObject) -> bool:
    return {"left of": a.x < b.x, "right of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[relation]


def _spatial_candidates(scene: Scene, combos) -> Iterator[Params]:
    unique, m = _unique_objects(scene), margin(scene.img_size)
    for pa, i in unique.items():
        for pb, j in unique.items():
            if i == j:
                continue
            a, b = scene.objects[i], scene.objects[j]
            for relation in RELATIONS:
                apart = abs(a.x - b.x) if relation in ("left of", "right of") else abs(a.y - b.y)
                if apart >= m:
                    yield (relation, pa, pb)


def _quadrant_object(scene: Scene, quadrant: str) -> int | None:
    """The object whose centre lies at least the margin inside ``quadrant`` when no other centre lies in
    it or within the margin of it; else None (coordinates doubled to stay in integers)."""
    vertical, horizontal = quadrant.split("-")
    n, m = scene.img_size, 2 * margin(scene.img_size)

    def depth(o: ShapeObject) -> int:  # how far inside the quadrant; negative outside
        dy = n - 2 * o.y if vertical == "top" else 2 * o.y - n
        dx = n - 2 * o.x if horizontal == "left" else 2 * o.x - n
        return min(dx, dy)

    depths = [depth(o) for o in scene.objects]
    inside = [i for i, d in enumerate(depths) if d >= m]
    near = [i for i, d in enumerate(depths) if d > -m]
    return inside[0] if len(inside) == 1 and len(near) == 1 else None


def _position_object(scene: Scene, p: Params) -> int:
    found = _quadrant_object(scene, p[0])
    if found is None:
        raise ValueError(f"scene {scene.image} has no single clear shape in the {p[0]} quarter")
    return found


@dataclass(frozen=True)
class QuestionType:
    name: str
    answers: tuple[str, ...]
    example: str
    candidates: Callable[[Scene, Sequence[tuple[str, str]]], Iterator[Params]]
    answer: Callable[[Scene, Params], str]
    text: Callable[[Params], str]
    evidence: Callable[[Scene, Params], tuple[int, ...]]
    forms: tuple[str, ...] = field(default=("",))  # answers are balanced within each form (params[0])

    def form(self, params: Params) -> str:
        return params[0] if self.forms != ("",) else ""


def _attribute_query(name: str, template: str, known: str, asked: str) -> QuestionType:
    """"What <asked> is the <value>?" about the one object whose ``known`` attribute is the value."""
    values = {"color": tuple(COLORS), "shape": SHAPES}
    return QuestionType(
        name, values[asked], template.format({"color": "red", "shape": "circle"}[known]),
        lambda s, combos: ((v,) for v in values[known] if len(_matching(s, known, v)) == 1),
        answer=lambda s, p: getattr(s.objects[_the_one(s, known, p[0])], asked),
        text=lambda p: template.format(p[0]),
        evidence=lambda s, p: (_the_one(s, known, p[0]),),
    )


QUESTION_TYPES: tuple[QuestionType, ...] = (
    QuestionType(
        "count", ("0", "1", "2", "3"), "How many red shapes are there?",
        _count_candidates,
        answer=lambda s, p: str(len(_matching(s, *p))),
        text=_count_text,
        evidence=lambda s, p: _matching(s, *p),
        forms=("color", "shape", "size"),
    ),
    QuestionType(
        "count_all", ("2", "3", "4", "5", "6"), "How many shapes are there?",
        lambda s, combos: iter([()]),
        answer=lambda s, p: str(len(s.objects)),
        text=lambda p: "How many shapes are there?",
        evidence=lambda s, p: tuple(range(len(s.objects))),
    ),
    QuestionType(
        "compare", ("yes", "no"), "Are there more circles than squares?",
        _compare_candidates,
        answer=lambda s, p: _yes(len(_matching(s, p[0], p[1])) > len(_matching(s, p[0], p[2]))),
        text=_compare_text,
        evidence=lambda s, p: tuple(sorted(_matching(s, p[0], p[1]) + _matching(s, p[0], p[2]))),
        forms=("color", "shape"),
    ),
    QuestionType(
        "exist", ("yes", "no"), "Is there a blue triangle?",
        lambda s, combos: ((pair,) for pair in combos),
        answer=lambda s, p: _yes(any((o.color, o.shape) == p[0] for o in s.objects)),
        text=lambda p: f"Is there a {p[0][0]} {p[0][1]}?",
        evidence=lambda s, p: tuple(i for i, o in enumerate(s.objects) if (o.color, o.shape) == p[0]),
    ),
    QuestionType(
        "spatial", ("yes", "no"), "Is the blue triangle left of the green square?",
        _spatial_candidates,
        answer=lambda s, p: _yes(_relation_holds(p[0], s.objects[_the(s, p[1])], s.objects[_the(s, p[2])])),
        text=lambda p: f"Is the {p[1][0]} {p[1][1]} {p[0]} the {p[2][0]} {p[2][1]}?",
        evidence=lambda s, p: (_the(s, p[1]), _the(s, p[2])),
        forms=RELATIONS,
    ),
    QuestionType(
        "position", tuple(COLORS), "What color is the shape in the bottom-right quarter of the image?",
        lambda s, combos: ((q,) for q in QUADRANTS if _quadrant_object(s, q) is not None),
        answer=lambda s, p: s.objects[_position_object(s, p)].color,
        text=lambda p: f"What color is the shape in the {p[0]} quarter of the image?",
        evidence=lambda s, p: (_position_object(s, p),),
    ),  # one form: few scenes have a clear single shape in a quarter, and colours do not depend on where
    _attribute_query("query_color", "What color is the {}?", known="shape", asked="color"),
    _attribute_query("query_shape", "What shape is the {} object?", known="color", asked="shape"),
    QuestionType(
        "query_size", SIZES, "What size is the green triangle?",
        lambda s, combos: ((pair,) for pair in _unique_objects(s)),
        answer=lambda s, p: s.objects[_the(s, p[0])].size,
        text=lambda p: f"What size is the {p[0][0]} {p[0][1]}?",
        evidence=lambda s, p: (_the(s, p[0]),),
    ),
)  # fmt: skip
QUESTION_TYPE_NAMES = tuple(t.name for t in QUESTION_TYPES)


def min_questions_per_split() -> int:
    """Fewest questions per split that leave every (type, form, answer) at least one question."""
    return len(QUESTION_TYPES) * max(len(t.forms) * len(t.answers) for t in QUESTION_TYPES)


def region(scene: Scene, evidence: Sequence[int]) -> str:
    """Where a question's evidence lies: "top" / "bottom" (every evidence centre in that half), "both", or
    "none" (no object: a count of 0, an absent shape; the whole image has to be searched)."""
    if not evidence:
        return "none"
    halves = {"top" if 2 * scene.objects[i].y < scene.img_size else "bottom" for i in evidence}
    return halves.pop() if len(halves) == 1 else "both"


# --- questions of a split ------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    id: str
    scene: int  # index of the scene in its split
    type: str
    question: str
    answer: str
    evidence: tuple[int, ...]
    region: str
    unseen: bool  # names or depends on a held-out colour-shape combination


def generate_split(config: ShapesVQAConfig, split: str) -> tuple[list[Scene], list[Question]]:
    """The scenes of ``split`` and its questions, ``config.quota`` per (type, form, answer), drawn at random
    from every unambiguous question the scenes allow. Raises ValueError when the scenes give too few."""
    scenes = [make_scene(config, split, i) for i in range(config.split_images(split))]
    combos = ALL_COMBINATIONS if split == "test_unseen" else SEEN_COMBINATIONS
    pools: dict[tuple[str, str, str], list[tuple[int, Params]]] = {}
    for scene in scenes:
        for qtype in QUESTION_TYPES:
            for params in qtype.candidates(scene, combos):
                key = (qtype.name, qtype.form(params), qtype.answer(scene, params))
                pools.setdefault(key, []).append((scene.index, params))
    stream = _Stream(config.seed, _SELECT_STREAM, SPLITS.index(split))
    chosen: list[tuple[int, int, Params]] = []
    for order, qtype in enumerate(QUESTION_TYPES):
        quota = config.quota(split, qtype)
        for form in qtype.forms:
            for answer in qtype.answers:
                pool = pools.get((qtype.name, form, answer), [])
                if len(pool) < quota:
                    raise ValueError(
                        f"{split}: its {len(scenes)} scenes give {len(pool)} {qtype.name} questions "
                        f"({form or 'any form'}) with the answer {answer!r}, but {quota} are needed; "
                        "raise --images / --test-images or lower --questions-per-image"
                    )
                chosen.extend((pool[k][0], order, pool[k][1]) for k in stream.sample(len(pool), quota))
    questions = []
    for number, (index, order, params) in enumerate(sorted(chosen)):
        qtype, scene = QUESTION_TYPES[order], scenes[index]
        evidence = tuple(qtype.evidence(scene, params))
        named = [p for p in params if isinstance(p, tuple)]
        unseen = any(p in HELD_OUT_COMBINATIONS for p in named) or any(
            (scene.objects[i].color, scene.objects[i].shape) in HELD_OUT_COMBINATIONS for i in evidence
        )
        questions.append(
            Question(f"shapes_vqa_{split}_{number:06d}", index, qtype.name, qtype.text(params),
                     qtype.answer(scene, params), evidence, region(scene, evidence), unseen)  # fmt: skip
        )
    return scenes, questions


# --- export --------------------------------------------------------------------------------------


def _llava_record(question: Question, image: str, instruction: str, image_token: str) -> dict:
    text = f"{image_token}\n{question.question}" + (f"\n{instruction}" if instruction else "")
    return {"id": question.id, "image": image,
            "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": question.answer}]}  # fmt: skip


def fingerprint(out: str | os.PathLike, images_per_split: int = FINGERPRINT_IMAGES) -> str:
    """SHA-256 of the export's JSON files and of the pixels (not the PNG bytes, which depend on the zlib
    build) of the first ``images_per_split`` images of each split."""
    out = Path(out)
    digest = hashlib.sha256()
    for path in sorted(out.glob("*.json")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for split in SPLITS:
        for path in sorted((out / "images" / split).glob("*.png"))[:images_per_split]:
            with Image.open(path) as img:
                digest.update(f"{split}/{path.name}".encode() + b"\0" + img.convert("RGB").tobytes())
    return digest.hexdigest()


def answer_counts(config: ShapesVQAConfig, split: str) -> dict[str, dict[str, int]]:
    """Questions per answer of each type in ``split``: fixed by the config (the generator meets every quota)."""
    return {t.name: {a: config.quota(split, t) * len(t.forms) for a in t.answers} for t in QUESTION_TYPES}


def card_table(config: ShapesVQAConfig, splits: Sequence[str] = SPLITS) -> str:
    """Markdown table: per question type its answers, questions per split and chance (the accuracy of
    always giving the most common answer, the same in every split since answers are balanced)."""
    head = "| type | example | answers | " + " | ".join(splits) + " | chance (each split) |"
    rows = [head, "|" + " --- |" * (4 + len(splits))]
    counts = {split: answer_counts(config, split) for split in splits}
    for t in QUESTION_TYPES:
        per_split = " | ".join(f"{sum(counts[s][t.name].values()):,}" for s in splits)
        chance = 100 / len(t.answers)
        rows.append(f"| `{t.name}` | {t.example} | {', '.join(t.answers)} | {per_split} | {chance:.1f} % |")
    totals = " | ".join(f"{sum(sum(c.values()) for c in counts[s].values()):,}" for s in splits)
    rows.append(f"| all | | | {totals} | |")
    return "\n".join(rows)


def _card(config: ShapesVQAConfig, images: dict[str, int], digest: str, splits: Sequence[str]) -> str:
    held_out = ", ".join(f"{c} {s}" for c, s in HELD_OUT_COMBINATIONS)
    flags = (f"--seed {config.seed} --images {config.images} --test-images {config.split_images('test')} "
             f"--questions-per-image {config.questions_per_image} --img-size {config.img_size} "
             f"--overlap {config.overlap} --background {config.background}")  # fmt: skip
    return (
        f"# shapes-VQA (generator version {VERSION})\n\n"
        f"Regenerate: `defocus-vlm data shapes-vqa --output-dir DIR {flags}`\n\n"
        f"Images written: {', '.join(f'{s} {images[s]:,}' for s in splits)} ({config.img_size} px PNG). "
        f"Held out of train and test (test_unseen has one or more in every image): {held_out}.\n\n"
        f"{card_table(config, splits)}\n\n"
        f"Fingerprint (`defocus_vlm.data.shapes_vqa.fingerprint`): `{digest}`\n"
    )


def write_shapes_vqa(
    out: str | os.PathLike,
    config: ShapesVQAConfig,
    instruction: str,
    splits: Sequence[str] = SPLITS,
    image_token: str = IMAGE_TOKEN,
) -> dict:
    """Write ``splits`` of shapes-VQA under ``out`` (layout in the module docstring). ``instruction`` is
    appended on its own line to every question ('' for none). Returns a summary: questions and images
    per split, and the fingerprint."""
    for split in splits:
        _check_split(split)
    out = Path(out)
    meta: dict = {
        "generator": "defocus-vlm data shapes-vqa",
        "version": VERSION,
        "config": {**asdict(config), "test_images": config.split_images("test")},
        "held_out_combinations": [list(p) for p in HELD_OUT_COMBINATIONS],
        "answers": {t.name: list(t.answers) for t in QUESTION_TYPES},
        "splits": {},
    }
    summary: dict = {"out": str(out), "questions": {}, "images": {}}
    for split in splits:
        scenes, questions = generate_split(config, split)
        used = sorted({q.scene for q in questions})
        image_dir = out / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        for index in used:
            render(scenes[index]).save(out / "images" / scenes[index].image, format="PNG")
        records = [_llava_record(q, scenes[q.scene].image, instruction, image_token) for q in questions]
        (out / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
        meta["splits"][split] = {
            "scenes": [scenes[i].to_json() for i in used],
            "questions": [
                {"id": q.id, "image": scenes[q.scene].image, "type": q.type, "question": q.question,
                 "answer": q.answer, "region": q.region, "objects": list(q.evidence), "unseen": q.unseen}
                for q in questions
            ],
        }  # fmt: skip
        summary["questions"][split], summary["images"][split] = len(questions), len(used)
    (out / "scenes.json").write_text(json.dumps(meta, separators=(",", ":")) + "\n", encoding="utf-8")
    answers = dict.fromkeys(a for t in QUESTION_TYPES for a in t.answers)
    (out / "answers.txt").write_text("\n".join(answers) + "\n", encoding="utf-8")
    summary["fingerprint"] = fingerprint(out)
    (out / "README.md").write_text(_card(config, summary["images"], summary["fingerprint"], splits), encoding="utf-8")
    return summary
