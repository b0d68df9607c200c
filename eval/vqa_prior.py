"""The answer-prior baseline of a VQA benchmark: no model and no image, the most common training answer
per question type or per question text (``defocus-vlm eval vqa --answer-prior type|question``).

``type`` (a sample tag, as shapes-VQA's) gives chance on a benchmark whose answers are balanced per type.
``question`` is the best any blind model can learn from the training split's question texts alone (for
a text never seen in training it falls back to the type's answer); a trained blind model beating it
would mean the images leak nothing and the test split shares the training split's text biases."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from PIL import Image

from defocus_vlm.data.vqa import VQASample, build_prompt

PRIORS = ("type", "question")


def _most_common(counter: Counter) -> str:
    top = max(counter.values())
    return min(answer for answer, n in counter.items() if n == top)  # a tie goes to the first in sorted order


def _type(sample: VQASample) -> str:
    tags = dict(sample.tags)
    if "type" not in tags:
        raise ValueError(f"question {sample.question_id!r} has no type tag; --answer-prior type needs a benchmark "
                         "whose questions carry one (shapes-vqa)")
    return tags["type"]


def prior_answers(train: Sequence[VQASample], samples: Sequence[VQASample], by: str) -> dict[str, str]:
    """Prompt -> answer for every prompt of ``samples``: the most common first answer of ``train`` with the
    same type (``by="type"``) or the same prompt (``by="question"``, else the type's)."""
    if by not in PRIORS:
        raise ValueError(f"the answer prior is by one of {', '.join(PRIORS)}, got {by!r}")
    per_type: dict[str, Counter] = {}
    per_prompt: dict[str, Counter] = {}
    for s in train:
        per_type.setdefault(_type(s), Counter())[s.answers[0]] += 1
        per_prompt.setdefault(build_prompt(s), Counter())[s.answers[0]] += 1
    table = {}
    for s in samples:
        prompt = build_prompt(s)
        if by == "question" and prompt in per_prompt:
            table[prompt] = _most_common(per_prompt[prompt])
        elif _type(s) in per_type:
            table[prompt] = _most_common(per_type[_type(s)])
        else:
            raise ValueError(f"question type {_type(s)!r} of {s.question_id!r} never occurs in the training split")
    return table


class PriorAnswerer:
    """An answerer for :func:`eval.vqa.run_vqa_eval` that looks the prompt up and ignores the image."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table

    def __call__(self, batch: Sequence[tuple[Image.Image, str]]) -> list[str]:
        return [self.table[prompt] for _, prompt in batch]
