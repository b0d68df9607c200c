"""VQA metrics against hand-worked cases."""

from __future__ import annotations

import pytest
from defocus_vlm.eval.vqa_metrics import (
    exact_match,
    extract_choice,
    normalize_answer,
    pope_label,
    pope_metrics,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two dogs.", "2 dogs"),  # number words, trailing period, case
        ("The cat's toy", "cat's toy"),  # article dropped, apostrophe kept
        ("an apple", "apple"),
        ("none", "0"),
        ("dont", "don't"),  # contractions restored
        ("couldntve", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("well", "well"),  # a word, not "we'll"
        ("1,000", "1000"),  # thousands separator deleted
        ("black/white", "black white"),  # a glued mark becomes a space
        ("yes, it is", "yes it is"),  # a mark next to a space is deleted
        ("3.5", "3.5"),  # decimal point kept
        ("  red \n and\tblue ", "red and blue"),  # spacing
        ("(left)", "left"),
        ("Hello!?", "hello"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_leave_one_out():
    # k of 10 annotators agree with the prediction. Annotators who gave it see k-1 other matches,
    # the rest see k: mean of min(m/3, 1) = (k*min((k-1)/3,1) + (10-k)*min(k/3,1)) / 10.
    for k, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["cat"] * k + ["dog"] * (10 - k)
        assert vqa_accuracy("cat", answers) == pytest.approx(expected), k
    # normalisation applies to both sides: "Two." matches "2" and "two"
    assert vqa_accuracy("Two.", ["2", "two", "2"] + ["3"] * 7) == pytest.approx(0.9)
    # fewer than ten answers: still leave-one-out over what is there (3 answers, 2 match: (1/3*2 + 2/3)/3)
    assert vqa_accuracy("yes", ["yes", "yes", "no"]) == pytest.approx(4 / 9)
    with pytest.raises(ValueError, match="at least one ground-truth answer"):
        vqa_accuracy("yes", [])


def test_exact_match():
    assert exact_match("The Circle.", "circle")
    assert exact_match("Yes", "yes")
    assert not exact_match("red circle", "circle")


def test_pope_label_and_metrics():
    assert pope_label("Yes, there is a dog.") == "yes"
    assert pope_label("No.") == "no"
    assert pope_label("There is not a dog in the image.") == "no"
    assert pope_label("Yes. No other animals are present.") == "yes"  # only the first sentence counts
    assert pope_label("Nope") == "yes"  # "no" must be a whole word

    predictions = ["Yes", "yes", "No", "No", "Yes", "no"]
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    # TP=2 (0,1) FN=1 (2) TN=2 (3,5) FP=1 (4)
    m = pope_metrics(predictions, labels)
    assert m["accuracy"] == pytest.approx(100 * 4 / 6)
    assert m["precision"] == pytest.approx(100 * 2 / 3)
    assert m["recall"] == pytest.approx(100 * 2 / 3)
    assert m["f1"] == pytest.approx(100 * 2 / 3)
    assert m["yes_ratio"] == pytest.approx(50.0)
    # no positive predictions: precision and F1 are 0, not a division error
    m = pope_metrics(["no", "no"], ["yes", "no"])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"], m["yes_ratio"]) == (0.0, 0.0, 0.0, 50.0, 0.0)
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_metrics(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="1 predictions for 2 labels"):
        pope_metrics(["yes"], ["yes", "no"])


CHOICES = ["dog", "cat", "red", "dark red"]


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B. cat", "B"),
        ("(B) cat", "B"),
        ("B: cat", "B"),
        ("The answer is B.", "B"),
        ("The answer is (C)", "C"),
        ("Answer: D", "D"),
        ("I choose option A", "A"),
        ("cat", "B"),  # option text
        ("A cat.", "B"),  # "A" is an article here; the option text decides
        ("it is dark red", "D"),  # the longer option that contains the shorter one
        ("I think C is right", "C"),  # a lone capital option letter
        ("E", None),  # not an option
        ("a dog and a cat", None),  # two options named: ambiguous
        ("", None),
        ("no idea", None),
    ],
)
def test_extract_choice(answer, expected):
    assert extract_choice(answer, CHOICES) == expected


def test_extract_choice_rejects_bad_choice_count():
    with pytest.raises(ValueError, match="1 to 26 choices"):
        extract_choice("A", [])
