"""VQA answers: the official normalization and accuracy, soft-score targets, the answer vocabulary.

Everything here matches the official VQA evaluation, ``vqaEval.py`` of GT-Vision-Lab/VQA
(``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, master), quirks included:

* ``normalize_answer``: ``'\\n'``/``'\\t'`` -> ``' '`` and ``strip()``, then ``processPunctuation``
  and ``processDigitArticle``.
* ``vqa_accuracy``: one question's accuracy, the mean over the leave-one-annotator-out subsets
  of ``min(1, #matches / 3)``; ``vqa_score_summary`` averages it over questions, overall and per
  answer type.

Training targets follow the BUTD / ViLT recipe (hengyuan-hu/bottom-up-attention-vqa
``tools/compute_softscore.py``, dandelin/ViLT ``vilt/utils/write_vqa.py``): a vocabulary of
frequent answers, and per question a soft score per answer from how many annotators gave it.
Both use ``normalize_answer`` always, so a label and the answer the metric compares it with are
spelt the same.
"""

import ast
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import torch

# --- Tables of vqaEval.py, transcribed as they are (including entries that can never fire:
# processDigitArticle lowercases first, so the capitalised keys "Im", "Ive", "Id've", "I'dve"
# never match and "ive" stays "ive").
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
# "none" -> "0" is in the official map too.
MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
# The order matters: each mark's remove-or-space decision looks at the original text, but the
# replacements accumulate. Apostrophe, colon and period are not in the list.
PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)
# Official pattern, verbatim. "(?!<=\d)" is a negative *lookahead* for the text "<=digit" (a typo
# for a lookbehind), so it is always true in front of a '.': the regex removes every '.' that is
# not followed by a digit ("3.5" and ".5" keep theirs, "3." and "yes." lose it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# vqaEval.py calls periodStrip.sub("", text, re.UNICODE): the third positional argument of
# Pattern.sub is count, so at most re.UNICODE == 32 periods are removed. Kept.
_PERIOD_STRIP_COUNT = int(re.UNICODE)

# BUTD / ViLT get_score: soft score by number of annotators who gave the answer.
_SOFT_SCORES = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}


def _clean_whitespace(text: str) -> str:
    """First step of vqaEval.evaluate for answers and predictions."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation.

    A mark is deleted when it touches a space somewhere in the text (``"p "`` or ``" p"``) or when
    the text holds a digit-comma-digit group ("1,000"); otherwise it becomes a space ("t-shirt"
    -> "t shirt"). Then periods not followed by a digit are removed.
    """
    delete_all = _COMMA_STRIP.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lowercase, number words to digits, no articles, contractions."""
    words = [MANUAL_MAP.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
    """The official answer normalization of vqaEval.py.

    ``'\\n'``/``'\\t'`` -> ``' '``, ``strip()``, processPunctuation, processDigitArticle. Examples:
    ``"Two."`` -> ``"2"``, ``"a dog"`` -> ``"dog"``, ``"dont"`` -> ``"don't"``, ``"t-shirt"`` ->
    ``"t shirt"``, ``"1,000"`` -> ``"1000"``, ``"3.5"`` -> ``"3.5"``.
    """
    return _process_digit_article(_process_punctuation(_clean_whitespace(answer)))


def _as_answer_list(answers: str | Sequence[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def vqa_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against the annotators' answers, in [0, 1].

    As vqaEval.py: prediction and answers get the whitespace step; then, **only if the answers
    hold more than one distinct string**, all of them and the prediction are normalized with
    ``normalize_answer``. With unanimous answers nothing is normalized and the comparison is exact
    and case-sensitive: ten "Two" score "Two" 1.0 but "2", "two" and "Two." 0.0. (Older
    revisions of vqaEval.py, copied e.g. into LAVIS, always normalize the prediction and only run
    processPunctuation on non-unanimous answers; this follows master.)

    The accuracy is the mean over the leave-one-out subsets (leave out annotator i, for each i) of
    ``min(1, #answers equal to the prediction in the subset / 3)``. With 10 answers of which k
    match: k = 0, 1, 2, 3, >=4 give 0, 0.3, 0.6, 0.9, 1.0 (k = 3: (7 * 1 + 3 * 2/3) / 10).
    vqaEval.py leaves out by dict inequality, which is one answer per subset because every VQA
    answer has its own answer_id; here it is by position.

    Other numbers of answers: the same leave-one-out over however many there are (so with fewer
    than 4 answers the score cannot reach 1.0). A single answer (a string or a one-item list) has
    no leave-one-out subset; it scores 1.0 if the normalized prediction equals the normalized
    answer, else 0.0. No answers raises ``ValueError``.
    """
    gt_answers = [_clean_whitespace(answer) for answer in _as_answer_list(answers)]
    if not gt_answers:
        raise ValueError(f"vqa_accuracy needs at least one answer, got {answers!r} for "
                         f"prediction {prediction!r}.")
    prediction = _clean_whitespace(prediction)
    if len(gt_answers) == 1:
        return float(normalize_answer(prediction) == normalize_answer(gt_answers[0]))
    if len(set(gt_answers)) > 1:
        gt_answers = [_process_digit_article(_process_punctuation(a)) for a in gt_answers]
        prediction = _process_digit_article(_process_punctuation(prediction))
    matches = [answer == prediction for answer in gt_answers]
    total = sum(matches)
    # Same summation order as the official code, so the float is the same to the last bit.
    per_subset = [min(1, (total - left_out) / 3) for left_out in matches]
    return float(sum(per_subset)) / len(per_subset)


def answer_type_key(answer_type: str) -> str:
    """Metric-name-safe spelling of an answer type: "yes/no" -> "yes_no", "Number" -> "number".

    Lowercased, every run of characters other than [a-z0-9] becomes one "_", no "_" at the ends.
    """
    return re.sub(r"[^a-z0-9]+", "_", answer_type.lower()).strip("_")


def vqa_score_summary(
    predictions: Sequence[str],
    answers_list: Sequence[str | Sequence[str]],
    answer_types: Sequence[str] | None = None,
) -> dict[str, float]:
    """Mean ``vqa_accuracy`` over questions, overall and per answer type, as fractions in [0, 1].

    Returns ``{"vqa_accuracy": ...}`` plus, when ``answer_types`` is given, one
    ``"vqa_accuracy_<answer_type_key(type)>"`` per type in sorted order; VQAv2's types give
    ``vqa_accuracy_yes_no``, ``vqa_accuracy_number`` and ``vqa_accuracy_other``. vqaEval.py's
    ``accuracy["overall"]`` and ``["perAnswerType"]`` are these x100, rounded to 2 decimals.
    """
    if len(predictions) != len(answers_list):
        raise ValueError(f"Got {len(predictions)} predictions but {len(answers_list)} answer "
                         "lists; pass one list of answers per prediction.")
    if not predictions:
        raise ValueError("vqa_score_summary got no predictions; the accuracy of an empty set "
                         "is undefined. Check that the evaluation split is not empty.")
    if answer_types is not None and len(answer_types) != len(predictions):
        raise ValueError(f"Got {len(answer_types)} answer types for {len(predictions)} "
                         "predictions; pass one answer type per question or None.")

    scores = [vqa_accuracy(p, a) for p, a in zip(predictions, answers_list)]
    summary = {"vqa_accuracy": sum(scores) / len(scores)}
    if answer_types is None:
        return summary

    by_type: dict[str, list[float]] = {}
    spelling: dict[str, str] = {}
    for answer_type, score in zip(answer_types, scores):
        if not isinstance(answer_type, str):
            raise ValueError(f"Answer types must be strings, got {answer_type!r}.")
        key = answer_type_key(answer_type)
        if spelling.setdefault(key, answer_type) != answer_type:
            raise ValueError(f"Answer types {spelling[key]!r} and {answer_type!r} both map to "
                             f"the metric key 'vqa_accuracy_{key}'; rename one of them.")
        by_type.setdefault(key, []).append(score)
    for key in sorted(by_type):
        summary[f"vqa_accuracy_{key}"] = sum(by_type[key]) / len(by_type[key])
    return summary


def answer_soft_scores(answers: str | Sequence[str]) -> dict[str, float]:
    """Soft target per normalized answer: 0.3, 0.6, 0.9, 1.0 for 1, 2, 3, >=4 annotators.

    The BUTD / ViLT ``get_score`` table (answers not given score 0 and are left out). With ten
    answers it is exactly the official ``vqa_accuracy`` of predicting that answer (k of 10
    matching gives 0.3 k capped at 1.0, see ``vqa_accuracy``), except for the unanimous-answer
    quirk: here answers are always normalized. With another number of answers the table is kept
    as it is, an approximation. A single answer (a string or a one-item list) gives
    ``{normalize_answer(answer): 1.0}``; no answers give ``{}``. Keys are in first-seen order.
    """
    answer_list = _as_answer_list(answers)
    if len(answer_list) == 1:
        return {normalize_answer(answer_list[0]): 1.0}
    counts = Counter(normalize_answer(answer) for answer in answer_list)
    return {answer: _SOFT_SCORES.get(count, 1.0) for answer, count in counts.items()}


def build_answer_vocab(
    answers_per_question: Iterable[str | Sequence[str]],
    min_count: int = 1,
    max_answers: int | None = None,
) -> list[str]:
    """The label set: normalized answers that are the majority answer of >= min_count questions.

    Counting follows BUTD (``filter_answers``) and ViLT (``make_arrow``): each question counts
    once, for its ``multiple_choice_answer`` (VQAv2's most frequent of the ten answers), and
    both keep answers counted at least 9 times (3,129 labels on VQAv2 train+val). Here the
    majority is taken over the normalized answers, ties to the alphabetically first. An answer
    that is never a question's majority answer does not become a label, however many annotators
    gave it; ``soft_score_targets`` then drops it from every target.

    Sorted by descending count, then alphabetically, then cut to ``max_answers``.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}.")
    if max_answers is not None and max_answers < 1:
        raise ValueError(f"max_answers must be >= 1 or None, got {max_answers}.")
    majority_counts: Counter[str] = Counter()
    for answers in answers_per_question:
        counts = Counter(normalize_answer(answer) for answer in _as_answer_list(answers))
        if counts:
            majority_counts[min(counts, key=lambda answer: (-counts[answer], answer))] += 1
    vocab = sorted(
        (answer for answer, count in majority_counts.items() if count >= min_count),
        key=lambda answer: (-majority_counts[answer], answer),
    )
    return vocab if max_answers is None else vocab[:max_answers]


def soft_score_targets(
    answers: str | Sequence[str], label2id: Mapping[str, int]
) -> tuple[list[int], list[float]]:
    """Sparse training target of one question: label ids (ascending) and their soft scores.

    Answers outside ``label2id`` are dropped, as in BUTD / ViLT; a question with none of its
    answers in the vocabulary gets empty lists (an all-zero target).
    """
    scored = sorted(
        (label2id[answer], score)
        for answer, score in answer_soft_scores(answers).items()
        if answer in label2id
    )
    return [label for label, _ in scored], [score for _, score in scored]


def build_soft_targets(
    indices: Sequence[Sequence[int]], scores: Sequence[Sequence[float]], num_labels: int
) -> torch.Tensor:
    """Dense ``labels`` for ViltForQuestionAnswering: (B, num_labels) float32, zeros elsewhere.

    ``indices[b]`` and ``scores[b]`` are one question's ``soft_score_targets``.
    """
    if len(indices) != len(scores):
        raise ValueError(f"Got {len(indices)} index lists but {len(scores)} score lists.")
    targets = torch.zeros(len(indices), num_labels, dtype=torch.float32)
    for row, (labels, values) in enumerate(zip(indices, scores)):
        if len(labels) != len(values):
            raise ValueError(f"Example {row}: {len(labels)} label ids but {len(values)} scores.")
        if any(not 0 <= label < num_labels for label in labels):
            raise ValueError(f"Example {row}: label ids {list(labels)} outside "
                             f"[0, {num_labels}); the label2id does not match num_labels.")
        targets[row, list(labels)] = torch.tensor(list(values), dtype=torch.float32)
    return targets


def parse_answers(value) -> list[str]:
    """The annotators' answers of one question, as a list of strings.

    Accepts a list (or tuple) of strings; a list of VQAv2 answer dicts ``{"answer": ...}`` (other
    keys such as ``answer_confidence`` and ``answer_id`` are ignored, as by vqaEval.py); a single
    string, one answer; a string holding a JSON list of either kind, as a csv cell would, or a
    Python list literal (``str(list)``, what pandas writes). Anything else raises ``ValueError``;
    the caller adds the file and row.
    """
    if isinstance(value, str):
        text = value.strip()
        if not (text.startswith("[") and text.endswith("]")):
            return [value]
        try:
            decoded = json.loads(text)
        except json.JSONDecodeError:
            try:
                decoded = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ValueError(f"Answers {value!r} look like a list but are neither JSON nor "
                                 "a Python list literal; store them as a JSON list of "
                                 "strings.") from None
        if not isinstance(decoded, list):
            raise ValueError(f"Answers {value!r} decode to {type(decoded).__name__}, expected a "
                             "list of strings or of {'answer': ...} dicts.")
        return parse_answers(decoded)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"Answers must be a string, a list of strings or a list of "
                         f"{{'answer': ...}} dicts, got {type(value).__name__} {value!r}. A "
                         "numeric column read from csv should be read as strings (dtype=str).")
    parsed = []
    for position, item in enumerate(value):
        if isinstance(item, Mapping):
            item = item.get("answer")
        if not isinstance(item, str):
            raise ValueError(f"Answer {position} of {value!r} is {type(item).__name__} "
                             f"{item!r}, expected a string or an {{'answer': str}} dict.")
        parsed.append(item)
    return parsed
