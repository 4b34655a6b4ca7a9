"""VQA accuracy: the official answer normalisation, the soft score and a per-type report.

Normalisation follows ``processPunctuation`` + ``processDigitArticle`` of the official VQA
evaluation (``vqaEval.py``, GT-Vision-Lab/VQA), applied in this order:

1. newlines and tabs become spaces, the ends are stripped;
2. punctuation: each character of :data:`PUNCT` is deleted when it touches a space
   (``"red, blue"``) or when the text holds a digit-comma-digit (``"1,000"`` -> ``"1000"``), and
   becomes a space otherwise (``"red,blue"`` -> ``"red blue"``); a period *not followed by a
   digit* is deleted (``"Two."`` -> ``"Two"``, ``"3.5"`` stays). The official pattern
   ``(?!<=\\d)(\\.)(?!\\d)`` was meant to spare periods between digits, but its first group is a
   lookahead, so only the digit *after* the period counts; we keep that behaviour. Characters
   outside :data:`PUNCT` (apostrophes, ``:``, ``%``, ``#``, ...) stay, as they do officially;
3. lower case, split on whitespace; each word through :data:`NUMBER_WORDS` (``"none"``,
   ``"zero"`` -> ``"0"``, ``"one"`` -> ``"1"`` ... ``"ten"`` -> ``"10"``); articles ``a``, ``an``,
   ``the`` dropped; contractions written without an apostrophe restored (``"dont"`` ->
   ``"don't"``); words joined by single spaces.

Two official quirks are not copied: the official script normalises only when the reference
answers disagree (here both sides are always normalised, so ``"Two."`` matches ``"2"``), and its
period substitution stops after 32 periods (``re.UNICODE`` passed as ``count``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

# official manualMap: number words -> digits ("none" means a count of zero)
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# official punct list; the period is handled by _PERIOD, the apostrophe is kept on purpose
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # verbatim: deletes a period not followed by a digit
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# official contractions table, verbatim (its capitalised keys never match lower-cased words,
# and "somebody'd" -> "somebodyd" is reversed; kept so scores equal the official ones)
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
SOFT_SCORE_ANNOTATORS = 3  # VQA-v2: an answer given by 3 or more annotators scores 1


def _punctuation(text: str) -> str:
    """Official ``processPunctuation`` (see the module docstring)."""
    has_number_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in PUNCT:
        delete = p + " " in text or " " + p in text or has_number_comma  # tested on the input text
        out = out.replace(p, "" if delete else " ")
    return _PERIOD.sub("", out)


def _digits_articles(text: str) -> str:
    """Official ``processDigitArticle``: lower case, number words, articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """An answer in the official VQA normal form: ``"Two."`` -> ``"2"``, ``"the Red"`` -> ``"red"``.

    Args:
        answer: a predicted or reference answer, as written.

    Returns:
        The normalised answer (possibly empty, e.g. for ``"the"``).
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """Score of one predicted answer against the reference answers, in [0, 1].

    With ``a`` = normalised answers and ``p`` = the normalised prediction:

    - one reference: ``1.0 if p == a[0] else 0.0``;
    - several (VQA-v2, 10 annotators): ``min(#{i : a_i == p} / 3, 1)``, so an answer given by 3
      or more annotators scores 1 and one given by 2 scores 2/3.

    The official script averages this over the 10 leave-one-out subsets of 9 references, which
    gives 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / 4+ matches instead of 1/3 / 2/3 / 1 / 1; the
    formula above is the paper's. With a few *alternative* accepted answers (not annotator
    votes) the soft score is at most #matches / 3; read ``exact_match`` of :func:`vqa_report`.

    Args:
        prediction: the predicted answer.
        answers: the reference answers (at least one).

    Raises:
        ValueError: ``answers`` is empty.
    """
    if not answers:
        raise ValueError("vqa_score needs at least one reference answer")
    p = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    if len(refs) == 1:
        return float(p == refs[0])
    return min(sum(a == p for a in refs) / SOFT_SCORE_ANNOTATORS, 1.0)


def vqa_report(predictions: Sequence[str], answers: Sequence[Sequence[str]],
               types: Sequence[str | None] | None = None) -> dict:
    """Accuracy, exact match and per-type accuracy of predictions over N questions.

    - ``accuracy`` = (1/N) sum_i vqa_score(pred_i, answers_i)
    - ``exact_match`` = (1/N) sum_i [normalised pred_i equals some normalised answer of i]
    - ``per_type[t]`` = ``{"accuracy": mean vqa_score over questions of type t, "n": their count}``,
      present only when ``types`` is given; questions whose type is None count in ``accuracy``
      but in no type.

    Args:
        predictions: one answer per question.
        answers: the reference answers of each question.
        types: question type per question (e.g. ``"yes/no"``), or None.

    Returns:
        ``{"accuracy", "exact_match", "n"}`` plus ``"per_type"`` when ``types`` is given;
        accuracies are 0.0 when N = 0.

    Raises:
        ValueError: the lists differ in length, or a question has no reference answer.
    """
    n = len(predictions)
    if len(answers) != n or (types is not None and len(types) != n):
        lengths = f"{n} predictions, {len(answers)} answer lists" + (
            f", {len(types)} types" if types is not None else "")
        raise ValueError(f"vqa_report needs one entry per question; got {lengths}")
    scores, exact = [], []
    for pred, refs in zip(predictions, answers):
        scores.append(vqa_score(pred, refs))
        exact.append(normalize_answer(pred) in {normalize_answer(a) for a in refs})
    report: dict = {"accuracy": sum(scores) / n if n else 0.0,
                    "exact_match": sum(exact) / n if n else 0.0, "n": n}
    if types is not None:
        by_type: dict[str, list[float]] = defaultdict(list)
        for t, s in zip(types, scores):
            if t is not None:
                by_type[t].append(s)
        report["per_type"] = {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(by_type.items())}
    return report
