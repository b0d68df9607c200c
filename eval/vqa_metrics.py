"""VQA metrics as pure functions on strings.

- :func:`normalize_answer`: the answer normalisation of the official VQA evaluation (punctuation,
  number words to digits, articles, contractions, spacing), lower-cased.
- :func:`vqa_accuracy`: VQAv2 / TextVQA accuracy, ``min(#matching annotators / 3, 1)`` averaged over
  the ten leave-one-annotator-out subsets of the ground-truth answers.
- :func:`exact_match`: GQA and easy-VQA, equality after normalisation.
- :func:`pope_label` / :func:`pope_metrics`: POPE yes/no parsing, accuracy, precision, recall, F1, yes-ratio.
- :func:`extract_choice`: the option letter of a free-form multiple-choice answer (ScienceQA, MMBench).

Both the prediction and the ground truth go through the same normalisation (as the TextVQA
evaluator does); on answers that are already normalised, as VQAv2's are, this changes nothing.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

# --- answer normalisation ------------------------------------------------------------------------

# Punctuation the official evaluation removes (or turns into a space); the apostrophe is kept for
# contractions and the period is handled separately so that decimals survive.
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})

# Contractions written without (some of) their apostrophes are restored. Forms whose apostrophe-free
# spelling is itself an English word (well, were, shed, ill, its, hell, wed, id) are left out.
_CONTRACTED_FORMS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't",
    "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's",
    "i'd've", "i'm", "i've", "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't",
    "mightn't've", "might've", "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't",
    "shan't", "she'd've", "she's", "should've", "shouldn't", "shouldn't've", "somebody'd",
    "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll", "someone's",
    "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've", "there're",
    "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't", "we'd've",
    "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd", "where's",
    "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't",
    "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "you'd", "you'd've", "you'll",
    "you're", "you've",
)  # fmt: skip


def _contraction_map() -> dict[str, str]:
    """Every spelling with at least one apostrophe dropped -> the full contraction."""
    table = {}
    for form in _CONTRACTED_FORMS:
        positions = [i for i, ch in enumerate(form) if ch == "'"]
        for k in range(1, len(positions) + 1):
            for dropped in itertools.combinations(positions, k):
                table["".join(ch for i, ch in enumerate(form) if i not in dropped)] = form
    return table


_CONTRACTIONS = _contraction_map()


def _process_punctuation(text: str) -> str:
    # A mark next to a space (or any text with a thousands separator) is deleted; one glued between
    # two words ("black/white") becomes a space, as in the official evaluation.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        if mark not in text:
            continue
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", text)


def _process_digits_and_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """The official VQA answer normalisation, lower-cased: ``"Two dogs."`` -> ``"2 dogs"``,
    ``"The cat's toy"`` -> ``"cat's toy"``, ``"dont"`` -> ``"don't"``, ``"1,000"`` -> ``"1000"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_and_articles(_process_punctuation(text))


# --- open-ended accuracy -------------------------------------------------------------------------


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 / TextVQA accuracy of one prediction in [0, 1].

    For each annotator i, the accuracy against the other annotators is ``min(matches / 3, 1)``;
    the result is the mean over i (so with ten answers, 3 matches give 0.9 and 4 give 1.0)."""
    if len(answers) == 0:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer, got none")
    pred = normalize_answer(prediction)
    is_match = [normalize_answer(a) == pred for a in answers]
    total = sum(is_match)
    return sum(min((total - own) / 3.0, 1.0) for own in is_match) / len(answers)


def exact_match(prediction: str, answer: str) -> bool:
    """Equality after :func:`normalize_answer` (GQA, easy-VQA)."""
    return normalize_answer(prediction) == normalize_answer(answer)


# --- POPE ----------------------------------------------------------------------------------------

_NEGATIONS = frozenset({"no", "not"})


def pope_label(text: str) -> str:
    """``"no"`` when the first sentence of the answer contains "no" or "not" as a word, else ``"yes"``
    (the parsing used by LLaVA's POPE evaluation)."""
    first_sentence = text.strip().split(".")[0]
    words = re.findall(r"[a-z']+", first_sentence.lower())
    return "no" if _NEGATIONS.intersection(words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE scores in percent with "yes" as the positive class. ``predictions`` are free-form answers
    (parsed by :func:`pope_label`), ``labels`` are "yes"/"no"."""
    if len(predictions) != len(labels):
        raise ValueError(f"got {len(predictions)} predictions for {len(labels)} labels")
    bad = sorted({label for label in labels if label not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE labels must be 'yes' or 'no', found {bad}")
    tp = fp = tn = fn = 0
    for prediction, label in zip(predictions, labels):
        said_yes = pope_label(prediction) == "yes"
        if label == "yes":
            tp, fn = tp + said_yes, fn + (not said_yes)
        else:
            fp, tn = fp + said_yes, tn + (not said_yes)
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * (tp + tn) / n if n else 0.0,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / n if n else 0.0,
    }


# --- multiple choice -----------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def choice_letters(num_choices: int) -> str:
    if not 1 <= num_choices <= len(LETTERS):
        raise ValueError(f"expected 1 to {len(LETTERS)} choices, got {num_choices}")
    return LETTERS[:num_choices]


def extract_choice(answer: str, choices: Sequence[str]) -> str | None:
    """The letter ("A", "B", ...) of the option that a free-form answer picks, or None.

    Tried in order: the bare letter ("B", "(B)", "B.", "B) cat", "B: cat"); a phrase "answer is B" /
    "answer: (B)" / "option B"; the text of exactly one option (the longest when one option's text
    contains another's, e.g. "dark red" over "red"); a single stand-alone capital option letter
    ("I think B"). Only letters of existing options count.
    """
    letters = choice_letters(len(choices))
    text = answer.strip()
    valid = f"[{letters}]"
    patterns = (
        rf"^\(?({valid})\)?[.:)]?$",  # the whole answer is the letter
        rf"^\(?({valid})[.:)]\s",  # a letter with its delimiter, then the option text
        rf"(?i:answer|option|choice)\s*(?:(?i:is)\s*)?:?\s*\(?({valid})\b",
    )
    for pattern in patterns:
        found = re.search(pattern, text)
        if found:
            return found.group(1)

    normalized = f" {normalize_answer(text)} "
    contained = [
        (f" {option} ", letter)
        for letter, option in zip(letters, (normalize_answer(c) for c in choices))
        if option and f" {option} " in normalized
    ]
    if contained:
        longest, letter = max(contained, key=lambda item: len(item[0]))
        covers_others = all(other in longest for other, other_letter in contained if other_letter != letter)
        return letter if covers_others else None

    standalone = set(re.findall(rf"\b({valid})\b", text))
    return standalone.pop() if len(standalone) == 1 else None
