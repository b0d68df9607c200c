"""VQA metrics: hand-worked cases for every official quirk, and thousands of seeded generated cases
compared with an independent re-derivation of the official rules (tests/official_rules.py)."""

from __future__ import annotations

import random
from itertools import combinations

import official_rules as ref
import pytest
from defocus_vlm.eval.vqa_metrics import (
    evalai_normalize,
    exact_match,
    gqa_match,
    mmbench_choice,
    normalize_answer,
    pope_label,
    pope_metrics,
    scienceqa_choice,
    textvqa_accuracy,
    vqa_accuracy,
)

# --- hand-worked cases ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two dogs.", "2 dogs"),  # number words, trailing period, case
        ("The cat's toy", "cat's toy"),  # article dropped, apostrophe kept
        ("none", "0"),
        ("dont", "don't"),
        ("couldnt've", "couldn't've"),
        ("couldntve", "couldntve"),  # not an official key
        ("im", "im"),  # the official key is "Im", which lower-cased words never match
        ("Ive", "ive"),
        ("lets", "lets"),
        ("somebody'd", "somebodyd"),  # the official table maps it this way round
        ("yall'd've", "y'all'd've"),
        ("ow's'at", "'ow's'at"),
        ("well", "well"),
        ("1,000", "1000"),  # a digit-comma-digit group: every mark is deleted
        ("1,000 a/b", "1000 ab"),
        ("black/white", "black white"),  # a mark touching no space becomes a space
        ("yes, it is", "yes it is"),  # a mark touching a space is deleted
        ('2"a;";,', "2"),  # decided on the original text: '"' and ';' touch no space -> spaces
        ("a; b;c", "bc"),  # ';' touches a space somewhere, so every ';' is deleted
        ("3.5", "3.5"),  # a period before a digit stays
        ("x.5.", "x.5"),
        ("a" + "." * 40, "a" + "." * 8),  # only the first 32 periods are removed
        ("  red \n and\tblue ", "red and blue"),
        ("Hello!?", "hello"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_leave_one_out():
    # k of 10 annotators agree with the prediction: (k*min((k-1)/3,1) + (10-k)*min(k/3,1)) / 10.
    for k, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["cat"] * k + ["dog"] * (10 - k)
        assert vqa_accuracy("cat", answers) == pytest.approx(expected), k
    assert vqa_accuracy("Two.", ["2", "two", "2"] + ["3"] * 7) == pytest.approx(0.9)  # annotators disagree
    assert vqa_accuracy("yes", ["yes", "yes", "no"]) == pytest.approx(4 / 9)
    assert vqa_accuracy("yes", ["yes"]) == 0.0  # one annotator: nobody else to agree with
    with pytest.raises(ValueError, match="at least one ground-truth answer"):
        vqa_accuracy("yes", [])


def test_vqa_accuracy_unanimous_answers_compare_raw():
    # vqaEval normalises only when the ten answers differ; otherwise it compares the cleaned strings.
    assert vqa_accuracy("apple!!", ["apple"] * 10) == 0.0
    assert vqa_accuracy("pizza", ["PIZZA"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy(" apple\n", ["apple\t"] * 10) == 1.0  # \n, \t and the ends are still cleaned
    assert vqa_accuracy("apple!!", ["apple"] * 9 + ["Apple"]) == 1.0  # not unanimous: normalised
    assert vqa_accuracy("pizza", ["PIZZA"] * 9 + ["pizza"]) == 1.0


def test_textvqa_always_normalises():
    assert evalai_normalize("The Cat's, toy?") == "cat 's toy"
    assert evalai_normalize("1,000") == "1000"
    assert textvqa_accuracy("stop", ["STOP"] * 10) == 1.0  # unlike vqa_accuracy
    assert vqa_accuracy("stop", ["STOP"] * 10) == 0.0
    assert textvqa_accuracy("Coca-Cola!", ["coca cola"] * 3 + ["pepsi"] * 7) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="at least one ground-truth answer"):
        textvqa_accuracy("yes", [])


def test_gqa_match():
    assert gqa_match("Red.", "red")
    assert gqa_match("Yes", "yes")
    assert not gqa_match("The red one", "red")  # no article or number rules
    assert not gqa_match("red!", "red")
    assert not gqa_match("two", "2")


def test_exact_match():
    assert exact_match("The Circle.", "circle")
    assert exact_match("Yes", "yes")
    assert not exact_match("red circle", "circle")


def test_pope_label_and_metrics():
    assert pope_label("Yes, there is a dog.") == "yes"
    assert pope_label("No.") == "no"
    assert pope_label("There is not a dog in the image.") == "no"
    assert pope_label("Yes. No other animals are present.") == "yes"  # only the first sentence counts
    assert pope_label("There is a cat. No dog.") == "yes"
    assert pope_label("No, there is none") == "no"  # the comma is deleted before splitting
    assert pope_label("Nope") == "yes"  # "no" must be a whole piece
    assert pope_label("NO") == "yes" and pope_label("Not really") == "yes"  # case-sensitive, as official
    assert pope_label("no!") == "yes" and pope_label("No\nthere is") == "yes"  # split on single spaces only

    predictions = ["Yes", "yes", "No", "No", "Yes", "no"]
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    # TP=2 (0,1) FN=1 (2) TN=2 (3,5) FP=1 (4)
    m = pope_metrics(predictions, labels)
    assert m["accuracy"] == pytest.approx(100 * 4 / 6)
    assert m["precision"] == pytest.approx(100 * 2 / 3)
    assert m["recall"] == pytest.approx(100 * 2 / 3)
    assert m["f1"] == pytest.approx(100 * 2 / 3)
    assert m["predicted_yes_ratio"] == pytest.approx(50.0)
    assert m["label_yes_ratio"] == pytest.approx(50.0)
    assert "yes_ratio" not in m
    m = pope_metrics(["no", "no", "yes"], ["yes", "no", "yes"])
    assert (m["predicted_yes_ratio"], m["label_yes_ratio"]) == pytest.approx((100 / 3, 200 / 3))
    # no positive predictions: precision and F1 are 0, not a division error
    m = pope_metrics(["no", "no"], ["yes", "no"])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"], m["predicted_yes_ratio"]) == (0.0, 0.0, 0.0, 50.0, 0.0)
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_metrics(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="1 predictions for 2 labels"):
        pope_metrics(["yes"], ["yes", "no"])


CHOICES = ["dog", "cat", "red", "dark red"]


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", "B"),
        ("B. cat", "B"),
        ("The answer is C.", "C"),
        ("The answer is C", None),  # the official pattern wants one more character after the letter
        ("The answer is A. The answer is B.", None),  # two matches
        ("E", None),  # not one of the four options
        ("(B)", None),
        ("B.", None),
        ("b", None),
        (" B", None),
        ("AB", None),
        ("", None),
        ("cat", None),  # option text is not read
    ],
)
def test_scienceqa_choice(answer, expected):
    assert scienceqa_choice(answer, CHOICES) == expected


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B. cat", "B"),
        ("I think the answer is option C here", "C"),
        ("The correct answer is **d**", "D"),  # case-insensitive "answer is" rule
        ("the answer is apple", "A"),  # ... which needs no word boundary
        ("B and C", None),  # two letters, no text match either
        ("C E F G H I", None),  # the only option letter is not among the last four words
        ("cat", "B"),  # option text
        ("a dark red", None),  # the texts of two options ("red", "dark red") occur
        ("the fur is dark red and the collar is red, honestly that is all", None),  # too long for text matching
        ("Z", None),
        ("Cannot determine the answer", None),  # refusal
        ("E", None),
    ],
)
def test_mmbench_choice(answer, expected):
    assert mmbench_choice(answer, CHOICES) == expected


# --- generated cases against the re-derivation ---------------------------------------------------

SEED = 20240611
ISSUE_ONLY_FORMS = ["im", "ive", "lets", "shes", "couldntve", "hed", "Im", "Ive", "I'dve", "somebody'd"]


def _apostrophe_drops(form: str) -> list[str]:
    at = [i for i, ch in enumerate(form) if ch == "'"]
    return [
        "".join(ch for i, ch in enumerate(form) if i not in dropped)
        for k in range(1, len(at) + 1)
        for dropped in combinations(at, k)
    ]


def _contraction_atoms() -> list[str]:
    forms = set(ref.OFFICIAL_CONTRACTIONS) | set(ref.OFFICIAL_CONTRACTIONS.values()) | set(ISSUE_ONLY_FORMS)
    forms |= {variant for value in ref.OFFICIAL_CONTRACTIONS.values() for variant in _apostrophe_drops(value)}
    ordered = sorted(forms)  # sorted before sampling: set order changes with the hash seed
    return sorted(forms | {f.upper() for f in ordered[::7]} | {f.capitalize() for f in ordered[::5]})


CONTRACTION_ATOMS = _contraction_atoms()
WORD_ATOMS = (
    "apple pizza PIZZA Apple red cat dog yes Yes no NO man left stop coca cola 2 10 3.5 .5 0.5 1,000 10,5 "
    "5, ,5 1,a none zero one two Two three four five six seven eight nine ten TEN eleven a an the A The THE "
    "café İstanbul ٣ ٣,٤ x"
).split()
MARK_ATOMS = list(ref.VQA_MARKS) + [".", "..", "'", "!!", "?!", '"', " - ", "/ "]
SPACE_ATOMS = ["", " ", " ", " ", "  ", "\n", "\t", "\u00a0", "\u3000"]


def _random_text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.15:  # punctuation soup: mark adjacency decided on the original text
        return "".join(rng.choice("ab2 .,;\"/-!?'") for _ in range(rng.randint(1, 12)))
    if kind < 0.25:  # many periods, some before digits: the 32-period limit
        return "".join(rng.choice([".", ".", ".", ".", ".5", "x.", ". ", "3"]) for _ in range(rng.randint(25, 60)))
    parts = []
    for _ in range(rng.randint(1, 4)):
        pool = rng.choice([WORD_ATOMS, WORD_ATOMS, CONTRACTION_ATOMS, MARK_ATOMS])
        parts.append(rng.choice(pool))
        parts.append(rng.choice(SPACE_ATOMS))
    return "".join(parts[:-1] if rng.random() < 0.7 else parts)


def _perturb(text: str, rng: random.Random) -> str:
    change = rng.randrange(9)
    if change == 0:
        return text.upper()
    if change == 1:
        return text.capitalize()
    if change == 2:
        return text + rng.choice(["!!", ".", "?", "..", ",", " ."])
    if change == 3:
        return rng.choice(["the ", "a ", "The "]) + text
    if change == 4:
        return rng.choice([" ", "\n", "\t", "\n "]) + text + rng.choice([" ", "\n", "\t", ""])
    if change == 5:
        return text.replace("'", "", 1)
    if change == 6:
        return text.replace(" ", rng.choice(["/", "-", ", ", " - "]), 1)
    return text


def _vqa_cases(rng: random.Random, n: int) -> list[tuple[str, list[str]]]:
    cases = []
    for _ in range(n):
        base = [_random_text(rng) for _ in range(rng.randint(1, 3))]
        variants = base + [_perturb(rng.choice(base), rng) for _ in range(rng.randint(0, 3))]
        size = 10 if rng.random() < 0.9 else rng.randint(1, 12)
        if rng.random() < 0.3:
            answers = [rng.choice(variants)] * size  # unanimous: the raw comparison
        else:
            answers = [rng.choice(variants) for _ in range(size)]
        prediction = _perturb(rng.choice(answers), rng) if rng.random() < 0.75 else _random_text(rng)
        cases.append((prediction, answers))
    return cases


def _first_mismatches(found: list) -> str:
    return f"{len(found)} mismatches, e.g. {found[:5]!r}"


def test_normalize_answer_matches_rederivation():
    rng = random.Random(SEED)
    texts = [_random_text(rng) for _ in range(6000)] + CONTRACTION_ATOMS + WORD_ATOMS + MARK_ATOMS
    texts += ['2"a;";,', "apple!!", "a" + "." * 40, "1" + ".a" * 40]
    mismatches = [(t, normalize_answer(t), ref.vqa_normalize(t)) for t in texts]
    mismatches = [m for m in mismatches if m[1] != m[2]]
    assert not mismatches, _first_mismatches(mismatches)

    # The generated texts exercise every quirk, so the comparison above could fail:
    def decided_on_processed_text(text: str) -> str:  # the rule as main had it, for the coverage count
        for mark in ref.VQA_MARKS:
            text = text.replace(mark, "" if f"{mark} " in text or f" {mark}" in text else " ")
        return text

    cleaned = [ref.clean(t) for t in texts if "," not in t]
    assert sum(ref.strippable_periods(ref.marks_step(ref.clean(t))) > ref.PERIOD_LIMIT for t in texts) >= 50
    assert sum(decided_on_processed_text(t) != ref.marks_step(t) for t in cleaned) >= 50
    lowered = [w for t in texts for w in ref.words_of(t.lower())]
    assert sum(w in ref.OFFICIAL_CONTRACTIONS for w in lowered) >= 500
    assert sum(w in ("im", "ive", "lets", "shes", "couldntve") for w in lowered) >= 50
    assert sum("\n" in t or "\t" in t for t in texts) >= 500


def test_vqa_accuracy_matches_rederivation():
    rng = random.Random(SEED + 1)
    cases = _vqa_cases(rng, 6000)
    cases += [("apple!!", ["apple"] * 10), ("pizza", ["PIZZA"] * 10), ('2"a;";,', ["2"] * 9 + ["2a"])]
    mismatches = [(p, a, vqa_accuracy(p, a), ref.vqa_accuracy(p, a)) for p, a in cases]
    mismatches = [m for m in mismatches if m[2] != m[3]]
    assert not mismatches, _first_mismatches(mismatches)

    # The cases include many where normalising a unanimous question would score differently.
    raw_matters = [
        (p, a) for p, a in cases
        if len({ref.clean(x) for x in a}) == 1 and ref.vqa_normalize(p) == ref.vqa_normalize(a[0]) != ref.clean(p)
    ]  # fmt: skip
    assert len(raw_matters) >= 200
    assert sum(0 < ref.vqa_accuracy(p, a) < 1 for p, a in cases) >= 500  # partial credit is exercised
    assert sum(ref.vqa_accuracy(p, a) == 1 for p, a in cases) >= 500


def test_textvqa_accuracy_matches_rederivation():
    rng = random.Random(SEED + 2)
    cases = _vqa_cases(rng, 4000)
    mismatches = [(p, a) for p, a in cases if textvqa_accuracy(p, a) != ref.textvqa_accuracy(p, a)]
    assert not mismatches, _first_mismatches(mismatches)
    assert sum(textvqa_accuracy(p, a) != vqa_accuracy(p, a) for p, a in cases) >= 200  # the two scorers differ


def test_gqa_match_matches_rederivation():
    rng = random.Random(SEED + 3)
    golds = ["red", "yes", "no", "left", "2", "traffic light", "man"]
    cases = [
        (rng.choice([g, g.upper(), g + ".", g + "..", f"the {g}", g + "!", g + ". ", _random_text(rng)]), g)
        for g in (rng.choice(golds) for _ in range(3000))
    ]
    mismatches = [(p, g) for p, g in cases if gqa_match(p, g) != ref.gqa_match(p, g)]
    assert not mismatches, _first_mismatches(mismatches)
    assert 500 <= sum(ref.gqa_match(p, g) for p, g in cases) <= 2500


def _free_form_answer(rng: random.Random, atoms: list[str]) -> str:
    glue = ["", " ", " ", ", ", ". ", ".", "\n", "  "]
    return "".join(rng.choice(atoms) + rng.choice(glue) for _ in range(rng.randint(1, 6)))


def test_pope_matches_rederivation():
    rng = random.Random(SEED + 4)
    atoms = "Yes yes No no NO not Not there is a cat dog none nope no! not,".split()
    answers = [_free_form_answer(rng, atoms) for _ in range(4000)]
    mismatches = [a for a in answers if pope_label(a) != ref.pope_label(a)]
    assert not mismatches, _first_mismatches(mismatches)
    assert 1000 <= sum(ref.pope_label(a) == "no" for a in answers) <= 3000
    for start in range(0, len(answers), 400):
        chunk = answers[start : start + 400]
        labels = [rng.choice(["yes", "no"]) for _ in chunk]
        expected = ref.pope_scores(chunk, labels)
        assert pope_metrics(chunk, labels) == pytest.approx({k: 100 * v for k, v in expected.items()}, rel=1e-12)


def test_scienceqa_choice_matches_rederivation():
    rng = random.Random(SEED + 5)
    atoms = ["A", "B", "C", "E", "F", "b", "(B)", "B.", "B. ", ". ", "The answer is ", "The answer is",
             "the answer is ", "C.", "D\n", "cat", " ", "\n", "x", "AB", ""]  # fmt: skip
    answers = ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 5))) for _ in range(5000)]
    answers += ["The answer is AThe answer is B.", "A", "E", ""]
    cases = [(a, rng.randint(2, 5)) for a in answers]
    mismatches = [(a, n) for a, n in cases if scienceqa_choice(a, ["x"] * n) != ref.scienceqa_choice(a, n)]
    assert not mismatches, _first_mismatches(mismatches)
    assert sum(ref.scienceqa_choice(a, n) is not None for a, n in cases) >= 400


def test_mmbench_choice_matches_rederivation():
    rng = random.Random(SEED + 6)
    atoms = ["A", "B", "C", "D", "E", "Z", "a", "(B)", "B.", "C:", "**C**", "answer is", "The correct answer is",
             "Answer  IS", "cat", "dog", "red", "dark red", "option", "I think", "Cannot determine the answer",
             "Failed to obtain answer via API", "#", "{D}", "apple"]  # fmt: skip
    option_pool = ["cat", "dog", "red", "dark red", "Apple pie", "a", "blue", "Cat"]
    cases = []
    for _ in range(5000):
        choices = rng.sample(option_pool, rng.randint(2, 4))
        cases.append((_free_form_answer(rng, atoms), choices))
    mismatches = [(a, c) for a, c in cases if mmbench_choice(a, c) != ref.mmbench_choice(a, c)]
    assert not mismatches, _first_mismatches(mismatches)
    assert sum(ref.mmbench_choice(a, c) is not None for a, c in cases) >= 1000
