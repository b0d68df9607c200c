"""Independent re-derivation of the official scorers' rules, for tests only.

Written from the rules (docs/metrics.md), not from ``eval/vqa_metrics.py``, and structured
differently on purpose: character-by-character scanning instead of regular expressions and
``str.translate``, the contraction table as a flat list of ``spelling=replacement`` pairs, and
leave-one-out by explicit double loop. Everything here is slow and plain; it only has to be right.
"""

from __future__ import annotations

VQA_MARKS = ';/[]"{}()=+\\_-><@`,?!'
PERIOD_LIMIT = 32  # vqaEval hands re.UNICODE (32) to re.sub as its count
NUMBER_WORDS = "none zero one two three four five six seven eight nine ten".split()
NUMBERS = dict(zip(NUMBER_WORDS, "0 0 1 2 3 4 5 6 7 8 9 10".split()))
ARTICLES = ("a", "an", "the")

# vqaEval.py's contraction dict, transcribed key by key in the file's order.
OFFICIAL_CONTRACTIONS = dict(
    pair.split("=")
    for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've
oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's
somethingd=something'd somethingd've=something'd've something'dve=something'd've
somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've
therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll
theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've
werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd
wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
""".split()
)


def _char(text: str, i: int) -> str:
    return text[i] if 0 <= i < len(text) else ""


def trim(text: str) -> str:
    """str.strip(): drop whitespace characters at both ends."""
    start, end = 0, len(text)
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return text[start:end]


def words_of(text: str, separators: str = "") -> list[str]:
    """Maximal runs of characters that are neither whitespace nor in ``separators`` (with none:
    str.split())."""
    words, current = [], ""
    for ch in text:
        if ch.isspace() or ch in separators:
            if current:
                words.append(current)
            current = ""
        else:
            current += ch
    return words + [current] if current else words


def clean(text: str) -> str:
    """\\n and \\t become spaces, then both ends are trimmed."""
    return trim("".join(" " if ch in "\n\t" else ch for ch in text))


def marks_step(text: str) -> str:
    """A mark is deleted when that mark has a space on either side somewhere in the input, or when a
    comma sits between two digits anywhere in it; otherwise it is replaced by a space."""
    thousands = any(
        ch == "," and _char(text, i - 1).isdecimal() and _char(text, i + 1).isdecimal() for i, ch in enumerate(text)
    )
    touching_space = {
        ch for i, ch in enumerate(text) if ch in VQA_MARKS and " " in (_char(text, i - 1), _char(text, i + 1))
    }
    out = ""
    for ch in text:
        if ch not in VQA_MARKS:
            out += ch
        elif not thousands and ch not in touching_space:
            out += " "
    return out


def strippable_periods(text: str) -> int:
    return sum(ch == "." and not _char(text, i + 1).isdecimal() for i, ch in enumerate(text))


def periods_step(text: str) -> str:
    """Periods not followed by a digit are deleted, the first 32 of them only."""
    out, removed = "", 0
    for i, ch in enumerate(text):
        if ch == "." and not _char(text, i + 1).isdecimal() and removed < PERIOD_LIMIT:
            removed += 1
        else:
            out += ch
    return out


def punctuation_step(text: str) -> str:
    return periods_step(marks_step(text))


def word_step(text: str) -> str:
    """Lower-case; number words to digits; articles dropped; then the contraction table, whose keys
    are compared as written (so capitalised keys cannot match)."""
    kept = []
    for word in words_of(text.lower()):
        word = NUMBERS.get(word, word)
        if word not in ARTICLES:
            kept.append(word)
    return " ".join(OFFICIAL_CONTRACTIONS[w] if w in OFFICIAL_CONTRACTIONS else w for w in kept)


def vqa_normalize(text: str) -> str:
    return word_step(punctuation_step(clean(text)))


def leave_one_out(prediction: str, answers: list[str]) -> float:
    per_annotator = []
    for i in range(len(answers)):
        others = sum(1 for j in range(len(answers)) if j != i and answers[j] == prediction)
        per_annotator.append(1 if others >= 3 else others / 3)
    return sum(per_annotator) / len(per_annotator)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """vqaEval: raw (cleaned) comparison when every cleaned answer equals the first one, else both
    sides normalised."""
    prediction, answers = clean(prediction), [clean(a) for a in answers]
    if any(a != answers[0] for a in answers):
        prediction, answers = vqa_normalize(prediction), [vqa_normalize(a) for a in answers]
    return leave_one_out(prediction, answers)


def evalai_normalize(text: str) -> str:
    """MMF's EvalAI processor: lower-case, commas and question marks deleted, "'s" gets a space in
    front, trimmed, then the VQA normalisation."""
    kept = "".join(ch for ch in text.lower() if ch not in ",?")
    spaced, i = "", 0
    while i < len(kept):
        if kept[i] == "'" and _char(kept, i + 1) == "s":
            spaced += " 's"
            i += 2
        else:
            spaced += kept[i]
            i += 1
    return vqa_normalize(trim(spaced))


def textvqa_accuracy(prediction: str, answers: list[str]) -> float:
    return leave_one_out(evalai_normalize(prediction), [evalai_normalize(a) for a in answers])


def gqa_match(prediction: str, answer: str) -> bool:
    end = len(prediction)
    while end > 0 and prediction[end - 1] == ".":
        end -= 1
    return prediction[:end].lower() == answer


def pope_label(answer: str) -> str:
    """Text up to the first period, commas dropped, pieces between single spaces; "no" if a piece
    is exactly No / no / not."""
    pieces = [""]
    for ch in answer:
        if ch == ".":
            break
        if ch == " ":
            pieces.append("")
        elif ch != ",":
            pieces[-1] += ch
    return "no" if any(piece in ("No", "no", "not") for piece in pieces) else "yes"


def pope_scores(answers: list[str], labels: list[str]) -> dict[str, float]:
    """POPE's evaluate.py arithmetic, as fractions (0.0 where it would divide by zero)."""
    said = [pope_label(a) for a in answers]
    tp = sum(s == "yes" and g == "yes" for s, g in zip(said, labels))
    fp = sum(s == "yes" and g == "no" for s, g in zip(said, labels))
    tn = sum(s == "no" and g == "no" for s, g in zip(said, labels))
    fn = sum(s == "no" and g == "yes" for s, g in zip(said, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / (tp + tn + fp + fn),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "predicted_yes_ratio": said.count("yes") / len(said),
        "label_yes_ratio": labels.count("yes") / len(labels),
    }


def scienceqa_choice(answer: str, num_choices: int) -> str | None:
    """LLaVA's eval_science_qa.py: the whole answer is one of A-E; or letter, period, space, ...;
    or exactly one "The answer is <A-Z><any char but newline>" (matches do not overlap)."""
    options = ["A", "B", "C", "D", "E"]
    if answer in options:
        letter = answer
    elif len(answer) >= 3 and answer[0] in options and answer[1] == "." and answer[2] == " ":
        letter = answer[0]
    else:
        found, i, lead = [], 0, "The answer is "
        while i + len(lead) + 2 <= len(answer):
            tail = answer[i + len(lead) : i + len(lead) + 2]
            if answer[i : i + len(lead)] == lead and "A" <= tail[0] <= "Z" and tail[1] != "\n":
                found.append(tail[0])
                i += len(lead) + 2
            else:
                i += 1
        letter = found[0] if len(found) == 1 else None
    return letter if letter in options[:num_choices] else None


MMBENCH_REFUSALS = [
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
]


def _matches_ignoring_case(text: str, i: int, word: str) -> bool:
    return all(_char(text, i + k).lower() == ch for k, ch in enumerate(word))


def _answer_is_letter(answer: str) -> str | None:
    """First "answer<ws>is<ws>[*...]<a-d>", case-insensitive (VLMEvalKit's verbose-answer rule)."""
    for i in range(len(answer)):
        if not _matches_ignoring_case(answer, i, "answer"):
            continue
        j = i + 6
        if not _char(answer, j).isspace():
            continue
        while _char(answer, j).isspace():
            j += 1
        if not _matches_ignoring_case(answer, j, "is") or not _char(answer, j + 2).isspace():
            continue
        j += 2
        while _char(answer, j).isspace():
            j += 1
        while _char(answer, j) == "*":
            j += 1
        if _char(answer, j) and _char(answer, j).upper() in "ABCD":
            return _char(answer, j).upper()
    return None


def mmbench_choice(answer: str, choices: list[str]) -> str | None:
    """VLMEvalKit can_infer (exact matching, VERBOSE unset); "Z" and failures both give None."""
    letters = [chr(ord("A") + k) for k in range(len(choices))]

    def by_letter() -> str | None:
        if "Failed to obtain answer via API" in answer:
            return None
        for refusal in MMBENCH_REFUSALS:
            if refusal in answer:
                return "Z"
        words = words_of(answer, ".()[],:;!*#{}")
        present = [letter for letter in letters if letter in words]
        if len(present) == 1:
            if words.index(present[0]) >= len(words) - 4:
                return present[0]
        elif not present and "Z" in words:
            return "Z"
        found = _answer_is_letter(answer)
        return found if found in letters else None

    def by_text() -> str | None:
        lowered = answer.lower()
        if len(lowered) > 2 * sum(len(c) for c in choices):
            return None
        hits = [letter for letter, text in zip(letters, choices) if lowered.find(text.lower()) >= 0]
        return hits[0] if len(hits) == 1 else None

    picked = by_letter()
    if picked is None:
        picked = by_text()
    return picked if picked in letters else None
