"""VQA metrics as pure functions on strings, each reproducing one benchmark's official scorer.

Which scorer each function reproduces, and every quirk kept, is written up in ``docs/metrics.md``;
the test suite checks each against an independent re-derivation of the official rules.

- :func:`vqa_accuracy` (VQAv2): ``vqaEval.py`` of GT-Vision-Lab/VQA, with its answer normalisation
  :func:`normalize_answer`.
- :func:`textvqa_accuracy` (TextVQA): the TextVQA accuracy evaluator of MMF (``m4c_evaluator.py`` as
  LLaVA and lmms-eval ship it), with its answer processor :func:`evalai_normalize`.
- :func:`gqa_match` (GQA): the official GQA ``eval.py`` on predictions written as LLaVA's
  ``convert_gqa_for_eval.py`` writes them.
- :func:`pope_label` / :func:`pope_metrics` (POPE): the POPE repository's ``evaluate.py``.
- :func:`scienceqa_choice` (ScienceQA): LLaVA's ``eval_science_qa.py``.
- :func:`mmbench_choice` (MMBench): VLMEvalKit's exact-matching answer extraction (``can_infer``).
- :func:`exact_match` (easy-VQA, the project's own benchmark): equality after :func:`normalize_answer`.

A score that cannot be compared with published numbers is worth nothing, so the official scorers'
quirks are reproduced on purpose; each one is marked ``Official quirk`` below.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from defocus_vlm.data.vqa import choice_letters

# --- VQA answer normalisation (GT-Vision-Lab/VQA vqaEval.py) ------------------------------------

_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # the apostrophe is kept for contractions, the period below
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# Official quirk: vqaEval's period pattern starts with "(?!<=\d)", a mistyped look-behind that is in
# fact a look-ahead for the text "<=<digit>" and so never fails in front of a period: a period is
# removed unless a digit follows it, whatever precedes it.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# Official quirk: vqaEval passes re.UNICODE (== 32) where re.sub expects ``count``, so only the first
# 32 such periods are removed.
_MAX_PERIODS_REMOVED = 32
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})

# vqaEval's contraction table, one line per replacement: "replacement: spellings that get it".
# Official quirks kept as written: the keys are looked up in lower-cased text, so the capitalised ones
# (Im, Ive, Id've, I'dve) never match; "somebody'd" is turned into "somebodyd"; "let's" and "she's"
# map to themselves; "lets", "shes", "im", "ive", "couldntve", ... are not keys.
_CONTRACTION_TABLE = """
ain't: aint
aren't: arent
can't: cant
could've: couldve
couldn't: couldnt
couldn't've: couldn'tve couldnt've
didn't: didnt
doesn't: doesnt
don't: dont
hadn't: hadnt
hadn't've: hadnt've hadn'tve
hasn't: hasnt
haven't: havent
he'd: hed
he'd've: hed've he'dve
he's: hes
how'd: howd
how'll: howll
how's: hows
I'd've: Id've I'dve
I'm: Im
I've: Ive
isn't: isnt
it'd: itd
it'd've: itd've it'dve
it'll: itll
let's: let's
ma'am: maam
mightn't: mightnt
mightn't've: mightnt've mightn'tve
might've: mightve
mustn't: mustnt
must've: mustve
needn't: neednt
not've: notve
o'clock: oclock
oughtn't: oughtnt
'ow's'at: ow's'at 'ows'at 'ow'sat
shan't: shant
she'd've: shed've she'dve
she's: she's
should've: shouldve
shouldn't: shouldnt
shouldn't've: shouldnt've shouldn'tve
somebodyd: somebody'd
somebody'd've: somebodyd've somebody'dve
somebody'll: somebodyll
somebody's: somebodys
someone'd: someoned
someone'd've: someoned've someone'dve
someone'll: someonell
someone's: someones
something'd: somethingd
something'd've: somethingd've something'dve
something'll: somethingll
that's: thats
there'd: thered
there'd've: thered've there'dve
there're: therere
there's: theres
they'd: theyd
they'd've: theyd've they'dve
they'll: theyll
they're: theyre
they've: theyve
'twas: twas
wasn't: wasnt
we'd've: wed've we'dve
we've: weve
weren't: werent
what'll: whatll
what're: whatre
what's: whats
what've: whatve
when's: whens
where'd: whered
where's: wheres
where've: whereve
who'd: whod
who'd've: whod've who'dve
who'll: wholl
who's: whos
who've: whove
why'll: whyll
why're: whyre
why's: whys
won't: wont
would've: wouldve
wouldn't: wouldnt
wouldn't've: wouldnt've wouldn'tve
y'all: yall
y'all'll: yall'll y'allll
y'all'd've: yall'd've y'alld've y'all'dve
you'd: youd
you'd've: youd've you'dve
you'll: youll
you're: youre
you've: youve
"""
_CONTRACTIONS = {
    spelling: replacement
    for line in _CONTRACTION_TABLE.strip().splitlines()
    for replacement, spellings in [line.split(": ")]
    for spelling in spellings.split()
}


def _clean(text: str) -> str:
    # vqaEval's first step on every answer, normalised or not
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    # Each mark is deleted when it touches a space anywhere in the *original* text (or when the text
    # holds a digit-comma-digit group), else it becomes a space; the decision for every mark is taken
    # on the unprocessed text, as vqaEval tests its input, not its partly processed output.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    table = {
        ord(mark): "" if delete_all or f"{mark} " in text or f" {mark}" in text else " "
        for mark in _PUNCTUATION
        if mark in text
    }
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", text.translate(table), count=_MAX_PERIODS_REMOVED)


def _process_digits_articles_contractions(text: str) -> str:
    kept = (_NUMBER_WORDS.get(word, word) for word in text.lower().split())
    return " ".join(_CONTRACTIONS.get(word, word) for word in kept if word not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """vqaEval's answer normalisation: ``"Two dogs."`` -> ``"2 dogs"``, ``"The cat's toy"`` ->
    ``"cat's toy"``, ``"dont"`` -> ``"don't"``, ``"1,000"`` -> ``"1000"``, ``"black/white"`` ->
    ``"black white"``. Lower-cases (after the punctuation step, as the official code does)."""
    return _process_digits_articles_contractions(_process_punctuation(_clean(text)))


def _leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    # Mean over annotators i of min(#other annotators whose answer equals the prediction / 3, 1).
    # vqaEval removes annotator i by comparing answer dicts, which in VQAv2 carry distinct answer_ids,
    # so exactly one answer is left out even when several annotators gave the same text.
    is_match = [answer == prediction for answer in answers]
    total = sum(is_match)
    return sum(min((total - own) / 3.0, 1.0) for own in is_match) / len(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction in [0, 1], exactly as GT-Vision-Lab/VQA ``vqaEval.py``.

    Official quirk: when the ground-truth answers (after turning ``\\n``/``\\t`` into spaces and
    stripping) are all the same string, the prediction is compared with it raw, case-sensitively and
    without normalisation (``"pizza"`` scores 0 against ten ``"PIZZA"``); only when annotators
    disagree are both sides put through :func:`normalize_answer`."""
    if len(answers) == 0:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer, got none")
    prediction = _clean(prediction)
    cleaned = [_clean(a) for a in answers]
    if len(set(cleaned)) > 1:
        prediction = normalize_answer(prediction)
        cleaned = [normalize_answer(a) for a in cleaned]
    return _leave_one_out_accuracy(prediction, cleaned)


# --- TextVQA (MMF's TextVQA accuracy evaluator) -------------------------------------------------


def evalai_normalize(text: str) -> str:
    """The EvalAI answer processor of MMF's TextVQA evaluator: lower-case, delete ``,`` and ``?``,
    split ``'s`` off its word (``"cat's"`` -> ``"cat 's"``), then :func:`normalize_answer`."""
    # With the commas gone first, the evaluator's digit-comma-digit rule can never fire; that is the
    # official behaviour and what normalize_answer then does on comma-free text.
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_answer(text)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA accuracy of one prediction in [0, 1], as MMF's ``TextVQAAccuracyEvaluator`` (the
    ``m4c_evaluator.py`` that LLaVA and lmms-eval use): the VQA leave-one-annotator-out accuracy, but
    both sides always go through :func:`evalai_normalize`, also when all answers agree."""
    if len(answers) == 0:
        raise ValueError("textvqa_accuracy needs at least one ground-truth answer, got none")
    return _leave_one_out_accuracy(evalai_normalize(prediction), [evalai_normalize(a) for a in answers])


# --- GQA and easy-VQA ----------------------------------------------------------------------------


def gqa_match(prediction: str, answer: str) -> bool:
    """GQA correctness: the official GQA ``eval.py`` compares the predictions file's string with the
    question's ``answer`` for plain equality; LLaVA writes that file with trailing periods removed and
    lower-cased (``convert_gqa_for_eval.py``). No other normalisation: ``"a red one"`` is not ``"red"``."""
    return prediction.rstrip(".").lower() == answer


def exact_match(prediction: str, answer: str) -> bool:
    """Equality after :func:`normalize_answer` on both sides (easy-VQA, which has no official scorer)."""
    return normalize_answer(prediction) == normalize_answer(answer)


# --- POPE (RUCAIBox/POPE evaluate.py) ------------------------------------------------------------

_POPE_NEGATIONS = frozenset({"No", "no", "not"})  # Official quirk: case-sensitive, so "NO", "Not" read as yes


def pope_label(text: str) -> str:
    """``"no"`` or ``"yes"`` as POPE's ``evaluate.py`` (and LLaVA's ``eval_pope.py``) parse a free-form
    answer: keep the text before the first period, delete commas, split on single spaces; "no" when a
    piece is exactly "No", "no" or "not", else "yes". So ``"There is a cat. No dog."`` is yes,
    ``"No!"`` and ``"NO"`` are yes, and anything unparseable counts as yes."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if _POPE_NEGATIONS.intersection(words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE scores in percent with "yes" as the positive class. ``predictions`` are free-form answers
    (parsed by :func:`pope_label`), ``labels`` are "yes"/"no".

    ``predicted_yes_ratio`` is the share of answers parsed as yes (POPE's and LLaVA's "yes ratio");
    ``label_yes_ratio`` is the share of ground-truth yes (what lmms-eval reports as ``pope_yes_ratio``).
    Where the official script would divide by zero (no yes predicted), precision and F1 are 0."""
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
        "predicted_yes_ratio": 100.0 * (tp + fp) / n if n else 0.0,
        "label_yes_ratio": 100.0 * (tp + fn) / n if n else 0.0,
    }


# --- multiple choice -----------------------------------------------------------------------------




# Official quirk: LLaVA's ScienceQA script only knows the options A-E (its --options default).
_SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
_SCIENCEQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")  # "." is any character, as in the script


def scienceqa_choice(answer: str, choices: Sequence[str]) -> str | None:
    """The option letter of a ScienceQA answer as LLaVA's ``eval_science_qa.py`` reads it, or None
    (the script's "FAILED", scored wrong): the answer is exactly a letter A-E; or starts with a letter
    and ``". "``; or holds exactly one ``"The answer is X"`` followed by any character. The letter
    must belong to one of the question's options. Case- and whitespace-sensitive: ``"b"``, ``"(B)"``,
    ``"B)"``, ``" B"`` and ``"B."`` all fail."""
    if answer in _SCIENCEQA_OPTIONS:
        letter = answer
    elif len(answer) >= 3 and answer[0] in _SCIENCEQA_OPTIONS and answer[1:3] == ". ":
        letter = answer[0]
    else:
        found = _SCIENCEQA_ANSWER_IS.findall(answer)
        letter = found[0] if len(found) == 1 else None
    return letter if letter in _SCIENCEQA_OPTIONS[: len(choices)] else None


_MMBENCH_SEPARATORS = str.maketrans(dict.fromkeys(".()[],:;!*#{}", " "))
_MMBENCH_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_MMBENCH_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def _mmbench_letter(answer: str, options: dict[str, str]) -> str | None:
    # VLMEvalKit's can_infer_option: a refusal is "Z" (never right); else the one option letter that
    # stands as a word among the last four words; else "answer is X"; else nothing.
    if "Failed to obtain answer via API" in answer:
        return None
    if any(refusal in answer for refusal in _MMBENCH_REFUSALS):
        return "Z"
    words = answer.translate(_MMBENCH_SEPARATORS).split()
    named = [letter for letter in options if letter in words]
    # Official quirk: its VERBOSE switch (off unless the environment sets it) would also reject a
    # lone "A" in answers of more than three words; it is taken as unset.
    if len(named) == 1 and words.index(named[0]) > len(words) - 5:
        return named[0]
    if not named and "Z" in words:
        return "Z"
    # Official quirk: case-insensitive and without a word boundary, so "the answer is apple" reads A.
    found = _MMBENCH_ANSWER_IS.search(answer)
    if found and found.group(1).upper() in options:
        return found.group(1).upper()
    return None


def _mmbench_text(answer: str, options: dict[str, str]) -> str | None:
    # VLMEvalKit's can_infer_text: the one option whose lower-cased text occurs in the lower-cased
    # answer, for answers at most twice as long as all option texts together.
    lowered = answer.lower()
    if len(lowered) > 2 * sum(len(text) for text in options.values()):
        return None
    found = [letter for letter, text in options.items() if text.lower() in lowered]
    return found[0] if len(found) == 1 else None


def mmbench_choice(answer: str, choices: Sequence[str]) -> str | None:
    """The option letter of an MMBench answer as VLMEvalKit extracts it without a GPT judge (its
    ``exact_matching`` policy: ``can_infer``), or None where it finds none or a refusal ("Z", never
    right). Single-pass: no circular evaluation."""
    options = dict(zip(choice_letters(len(choices)), choices))
    letter = _mmbench_letter(answer, options) or _mmbench_text(answer, options)
    return letter if letter in options else None
