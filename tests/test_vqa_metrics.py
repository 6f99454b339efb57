"""utils/vqa.py against the official VQA evaluation (GT-Vision-Lab/VQA vqaEval.py, master).

`_Reference` below is a line-by-line transcription of vqaEval.py's processPunctuation,
processDigitArticle and the body of evaluate() for one question, on answer dicts with an
answer_id as in the VQAv2 annotation files. It shares only the word tables with utils/vqa.py;
those are pinned here (size, digest, entries) after being checked against the official file.
"""

import hashlib
import json
import random
import re

import pytest
import torch

from utils.vqa import (
    ARTICLES,
    CONTRACTIONS,
    MANUAL_MAP,
    PUNCTUATION,
    answer_soft_scores,
    answer_type_key,
    build_answer_vocab,
    build_soft_targets,
    normalize_answer,
    parse_answers,
    soft_score_targets,
    vqa_accuracy,
    vqa_score_summary,
)


class _Reference:
    """vqaEval.py, transcribed: same steps, same order, same quirks."""

    periodStrip = re.compile(r"(?!<=\d)(\.)(?!\d)")
    commaStrip = re.compile(r"(\d)(\,)(\d)")

    def __init__(self):
        self.manualMap = dict(MANUAL_MAP)  # setdefault below grows it, as in the original
        self.articles = list(ARTICLES)
        self.contractions = CONTRACTIONS
        self.punct = list(PUNCTUATION)

    def processPunctuation(self, inText):
        outText = inText
        for p in self.punct:
            if (p + " " in inText or " " + p in inText) or (
                re.search(self.commaStrip, inText) is not None
            ):
                outText = outText.replace(p, "")
            else:
                outText = outText.replace(p, " ")
        # The original passes re.UNICODE positionally, where Pattern.sub takes count.
        outText = self.periodStrip.sub("", outText, count=re.UNICODE)
        return outText

    def processDigitArticle(self, inText):
        outText = []
        tempText = inText.lower().split()
        for word in tempText:
            word = self.manualMap.setdefault(word, word)
            if word not in self.articles:
                outText.append(word)
        for wordId, word in enumerate(outText):
            if word in self.contractions:
                outText[wordId] = self.contractions[word]
        return " ".join(outText)

    def question_accuracy(self, resAns, answers):
        """One iteration of evaluate()'s loop over question ids; returns avgGTAcc."""
        gtAnswersDicts = [
            {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
            for i, a in enumerate(answers)
        ]
        for ansDic in gtAnswersDicts:
            ansDic["answer"] = ansDic["answer"].replace("\n", " ")
            ansDic["answer"] = ansDic["answer"].replace("\t", " ")
            ansDic["answer"] = ansDic["answer"].strip()
        resAns = resAns.replace("\n", " ")
        resAns = resAns.replace("\t", " ")
        resAns = resAns.strip()
        gtAcc = []
        gtAnswers = [ans["answer"] for ans in gtAnswersDicts]
        if len(set(gtAnswers)) > 1:
            for ansDic in gtAnswersDicts:
                ansDic["answer"] = self.processPunctuation(ansDic["answer"])
                ansDic["answer"] = self.processDigitArticle(ansDic["answer"])
            resAns = self.processPunctuation(resAns)
            resAns = self.processDigitArticle(resAns)
        for gtAnsDatum in gtAnswersDicts:
            otherGTAns = [item for item in gtAnswersDicts if item != gtAnsDatum]
            matchingAns = [item for item in otherGTAns if item["answer"] == resAns]
            acc = min(1, float(len(matchingAns)) / 3)
            gtAcc.append(acc)
        return float(sum(gtAcc)) / len(gtAcc)

    def accuracy(self, predictions, answers_list, answer_types, n=2):
        """setAccuracy's overall and perAnswerType: x100, rounded to n decimals."""
        accQA, accAnsType = [], {}
        for resAns, answers, ansType in zip(predictions, answers_list, answer_types):
            avgGTAcc = self.question_accuracy(resAns, answers)
            accQA.append(avgGTAcc)
            accAnsType.setdefault(ansType, []).append(avgGTAcc)
        return {
            "overall": round(100 * float(sum(accQA)) / len(accQA), n),
            "perAnswerType": {
                t: round(100 * float(sum(v)) / len(v), n) for t, v in accAnsType.items()
            },
        }


REF = _Reference()

# Strings that exercise every rule: number words, articles, contractions (including the
# capitalised keys that never fire), each punctuation mark with and without spaces, digit
# commas, periods before and after digits, case, and whitespace.
TRICKY = [
    "yes", "Yes", "yes.", "YES!", " yes\n", "no", "No.", "2", "two", "Two", "Two.", "2.",
    "none", "0", "zero", "10", "ten", "a dog", "the dog", "dog", "dogs", "an apple", "apple",
    "t-shirt", "t shirt", "tshirt", "t - shirt", "1,000", "1000", "1, 000", "3.5", "3.50",
    ".5", "3.", "it's", "its", "dont", "don't", "ive", "Ive", "I've", "couldnt've", "twas",
    "somebody'd", "red, blue", "red,blue", "red blue", "red/blue", "(a)", "what's up?",
    "left\tside", "left side", "a.m.", "am", "1,000-pound", "1000 pound", "yes;no", "yes; no",
    "the", "", ".", "The Cat", "cat", "$5.00", "5", "@home", "home", "x" + "." * 40 + "y",
]


def _random_question(rng: random.Random, n_answers: int) -> list[str]:
    """Mostly a few frequent answers with repeats, sometimes unanimous, as in VQAv2."""
    if rng.random() < 0.2:
        return [rng.choice(TRICKY)] * n_answers
    pool = rng.sample(TRICKY, rng.randint(1, 4))
    return [rng.choice(pool) for _ in range(n_answers)]


# --- normalization -------------------------------------------------------------------------

# (input, official output); every pair checked by hand against vqaEval.py's two functions.
NORMALIZATION_CASES = [
    ("two", "2"),
    ("Two.", "2"),  # period not followed by a digit removed, lowercased, number word mapped
    ("ten", "10"),
    ("none", "0"),  # "none" is in the official number map
    ("yes.", "yes"),
    ("YES!", "yes"),
    ("it's", "it's"),  # apostrophe is not in the punctuation list
    ("t-shirt", "t shirt"),  # no space next to '-': replaced by a space
    ("t - shirt", "t shirt"),  # a space next to '-': removed, split() eats the spaces
    ("t-shirt\t-x", "tshirt x"),  # tab -> space first makes " -", so every '-' is removed
    ("1,000", "1000"),  # digit,digit: every mark in the text is removed
    ("1,000-pound", "1000pound"),  # ... including the '-'
    ("red,blue", "red blue"),
    ("red, blue", "red blue"),
    ("3.5", "3.5"),  # period followed by a digit kept
    (".5", ".5"),
    ("3.", "3"),
    ("a.m.", "am"),
    ("a dog", "dog"),
    ("The Cat", "cat"),
    ("an apple", "apple"),
    ("the", ""),
    ("(a)", ""),  # parentheses become spaces, then the article goes
    ("what's up?", "what's up"),
    ("dont", "don't"),
    ("couldnt've", "couldn't've"),
    ("twas", "'twas"),
    ("somebody'd", "somebodyd"),  # the official table maps this one backwards
    ("ive", "ive"),  # only "Ive" is a key, and the text is lowercased first
    ("Ive", "ive"),
    ("  The\tten dogs!\n", "10 dogs"),
    ("x" + "." * 40 + "y", "x" + "." * 8 + "y"),  # only the first 32 periods go (count=32)
]


@pytest.mark.parametrize("raw, expected", NORMALIZATION_CASES)
def test_normalize_answer_hand_checked(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("raw, expected", NORMALIZATION_CASES)
def test_reference_agrees_with_hand_checked_cases(raw, expected):
    cleaned = raw.replace("\n", " ").replace("\t", " ").strip()
    assert REF.processDigitArticle(REF.processPunctuation(cleaned)) == expected


def test_normalize_answer_matches_reference_on_random_strings():
    rng = random.Random(0)
    marks = list(PUNCTUATION) + [".", "'", ":", " ", "  ", "\n", "\t"]
    words = ["a", "The", "two", "Ten", "none", "dont", "Ive", "1", "000", "3", "5", "yes"]
    for _ in range(3000):
        text = "".join(rng.choice(marks + words) for _ in range(rng.randint(0, 8)))
        cleaned = text.replace("\n", " ").replace("\t", " ").strip()
        assert normalize_answer(text) == REF.processDigitArticle(REF.processPunctuation(cleaned))


def test_tables_are_the_official_ones():
    # Digest of the contractions table as checked entry by entry against vqaEval.py.
    digest = hashlib.sha256(json.dumps(sorted(CONTRACTIONS.items())).encode()).hexdigest()
    assert len(CONTRACTIONS) == 120
    assert digest == "3e5960526f62912d3b70896069c43c13d7c21be38d50ca28efbb9095b499454f"
    assert MANUAL_MAP == {
        "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
        "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
    }
    assert tuple(ARTICLES) == ("a", "an", "the")
    assert "".join(PUNCTUATION) == ';/[]"{}()=+\\_-><@`,?!'


# --- accuracy ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "matches, expected",
    [
        (0, 0.0),
        (1, 9 * (1 / 3) / 10),  # 9 subsets hold the match, 1 does not: 0.3
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
        (3, (3 * (2 / 3) + 7 * 1) / 10),  # 0.9
        (4, 1.0),  # every subset holds >= 3 matches
        (10, 1.0),
    ],
)
def test_leave_one_out_accuracy_of_ten_answers(matches, expected):
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    rng = random.Random(matches)
    rng.shuffle(answers)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)
    assert vqa_accuracy("cat", answers) == pytest.approx(min(1.0, 0.3 * matches), abs=1e-12)


def test_unanimous_answers_are_compared_raw():
    # Ten identical answers: vqaEval.py normalizes neither them nor the prediction.
    answers = ["Two"] * 10
    assert vqa_accuracy("2", answers) == 0.0
    assert vqa_accuracy("two", answers) == 0.0
    assert vqa_accuracy("Two.", answers) == 0.0
    assert vqa_accuracy("Two", answers) == 1.0
    assert vqa_accuracy(" Two\n", answers) == 1.0  # the whitespace step still applies
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    # Identical after the whitespace step counts as unanimous too.
    assert vqa_accuracy("2", ["Two"] * 9 + [" Two\t"]) == 0.0
    # One differing answer and all of them are normalized: "Two" == "2" == "two".
    assert vqa_accuracy("2", ["Two"] * 9 + ["2"]) == 1.0
    assert vqa_accuracy("two.", ["Two"] * 9 + ["2"]) == 1.0
    for prediction in ["2", "two", "Two", "Two."]:
        assert vqa_accuracy(prediction, answers) == REF.question_accuracy(prediction, answers)


def test_normalized_matching_of_mixed_answers():
    answers = ["a dog", "Dog", "dog.", "the dog", "cat", "cat", "cat", "puppy", "dogs", "Dog!"]
    assert vqa_accuracy("DOG", answers) == 1.0  # 5 answers normalize to "dog"
    assert vqa_accuracy("cat", answers) == pytest.approx(0.9)
    assert vqa_accuracy("puppy.", answers) == pytest.approx(0.3)
    assert vqa_accuracy("dogs", answers) == pytest.approx(0.3)
    assert vqa_accuracy("horse", answers) == 0.0


def test_other_numbers_of_answers():
    # Two answers: leave "yes" out -> {"no"}: 0; leave "no" out -> {"yes"}: 1/3.
    assert vqa_accuracy("yes", ["yes", "no"]) == pytest.approx(1 / 6)
    # Three answers: 1/3, 1/3 and 2/3.
    assert vqa_accuracy("yes", ["yes", "yes", "no"]) == pytest.approx(4 / 9)
    # Five answers, four matching: every subset holds >= 3.
    assert vqa_accuracy("yes", ["yes"] * 4 + ["no"]) == 1.0
    # A single answer: an exact match of the normalized strings.
    assert vqa_accuracy("2", "Two") == 1.0
    assert vqa_accuracy("2", ["Two"]) == 1.0
    assert vqa_accuracy("no", "yes") == 0.0
    with pytest.raises(ValueError, match="at least one answer"):
        vqa_accuracy("yes", [])


def test_vqa_accuracy_matches_reference_on_random_corpus():
    rng = random.Random(1234)
    seen_counts, quirk_cases = set(), 0
    for _ in range(4000):
        answers = _random_question(rng, 10 if rng.random() < 0.8 else rng.randint(2, 12))
        prediction = rng.choice(TRICKY if rng.random() < 0.5 else answers)
        expected = REF.question_accuracy(prediction, answers)
        assert vqa_accuracy(prediction, answers) == expected, (prediction, answers)
        seen_counts.add(round(expected, 6))
        raw = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
        if len(set(raw)) == 1 and prediction.strip() != raw[0]:
            quirk_cases += normalize_answer(prediction) == normalize_answer(raw[0])
    # The corpus must reach every accuracy level and the unanimous quirk, or it proves little.
    assert {0.0, 0.3, 0.6, 0.9, 1.0} <= seen_counts
    assert quirk_cases > 10


# --- summary -------------------------------------------------------------------------------

def test_vqa_score_summary_keys_and_values():
    predictions = ["yes", "2", "red", "no"]
    answers_list = [["yes"] * 10, ["2"] * 3 + ["3"] * 7, ["blue"] * 10, ["yes"] * 9 + ["no"]]
    types = ["yes/no", "number", "other", "yes/no"]
    summary = vqa_score_summary(predictions, answers_list, types)
    assert list(summary) == [
        "vqa_accuracy", "vqa_accuracy_number", "vqa_accuracy_other", "vqa_accuracy_yes_no",
    ]
    assert summary["vqa_accuracy"] == pytest.approx((1.0 + 0.9 + 0.0 + 0.3) / 4)
    assert summary["vqa_accuracy_yes_no"] == pytest.approx((1.0 + 0.3) / 2)
    assert summary["vqa_accuracy_number"] == pytest.approx(0.9)
    assert summary["vqa_accuracy_other"] == 0.0
    assert vqa_score_summary(predictions, answers_list) == {
        "vqa_accuracy": summary["vqa_accuracy"]
    }


def test_vqa_score_summary_matches_reference_rounding():
    rng = random.Random(7)
    types = ["yes/no", "number", "other"]
    answers_list = [_random_question(rng, 10) for _ in range(500)]
    predictions = [rng.choice(TRICKY + a) for a in answers_list]
    answer_types = [rng.choice(types) for _ in answers_list]
    ours = vqa_score_summary(predictions, answers_list, answer_types)
    official = REF.accuracy(predictions, answers_list, answer_types)
    assert round(100 * ours["vqa_accuracy"], 2) == official["overall"]
    for answer_type in types:
        key = f"vqa_accuracy_{answer_type_key(answer_type)}"
        assert round(100 * ours[key], 2) == official["perAnswerType"][answer_type]


def test_vqa_score_summary_rejects_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        vqa_score_summary(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no predictions"):
        vqa_score_summary([], [])
    with pytest.raises(ValueError, match="answer types"):
        vqa_score_summary(["a"], [["a"]], ["other", "number"])
    with pytest.raises(ValueError, match="both map to"):
        vqa_score_summary(["a", "b"], [["a"], ["b"]], ["yes/no", "yes_no"])


def test_answer_type_key():
    assert answer_type_key("yes/no") == "yes_no"
    assert answer_type_key("number") == "number"
    assert answer_type_key(" Other ") == "other"


# --- soft scores, vocabulary, targets ------------------------------------------------------

@pytest.mark.parametrize("count, score", [(1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (9, 1.0)])
def test_answer_soft_scores_table(count, score):
    scores = answer_soft_scores(["cat"] * count + ["dog"] * (10 - count))
    assert scores["cat"] == score  # exactly, not 3 * 0.3
    assert "horse" not in scores


def test_answer_soft_scores_normalize_and_single_answer():
    assert answer_soft_scores(["Two", "2", "two.", "a dog"]) == {"2": 0.9, "dog": 0.3}
    assert answer_soft_scores("Yes.") == {"yes": 1.0}
    assert answer_soft_scores(["Yes."]) == {"yes": 1.0}
    assert answer_soft_scores([]) == {}


def test_soft_scores_equal_official_accuracy_for_ten_answers():
    rng = random.Random(3)
    words = ["cat", "dog", "red", "blue", "2", "yes", "no"]
    for _ in range(300):
        answers = [rng.choice(words[: rng.randint(2, 7)]) for _ in range(10)]
        if len(set(answers)) == 1:
            continue
        for answer, score in answer_soft_scores(answers).items():
            assert score == pytest.approx(vqa_accuracy(answer, answers), abs=1e-12)


def test_build_answer_vocab_counts_majority_answer_once_per_question():
    questions = [
        ["yes"] * 6 + ["no"] * 4,  # yes
        ["Yes."] * 10,  # yes
        ["no"] * 7 + ["yes"] * 3,  # no
        ["Two"] * 5 + ["2"] * 5,  # 2 (both normalize to "2")
        ["red"] * 5 + ["blue"] * 5,  # tie: blue, alphabetically first
        "cat",  # one answer, as a string
        ["dog", "Dog", "cat"],  # dog
    ]
    assert build_answer_vocab(questions) == ["yes", "2", "blue", "cat", "dog", "no"]
    assert build_answer_vocab(questions, min_count=2) == ["yes"]
    assert build_answer_vocab(questions, max_answers=3) == ["yes", "2", "blue"]
    assert build_answer_vocab(iter(questions), min_count=3) == []
    assert build_answer_vocab([[], ["x"]]) == ["x"]  # a question without answers counts nothing
    with pytest.raises(ValueError, match="min_count"):
        build_answer_vocab(questions, min_count=0)
    with pytest.raises(ValueError, match="max_answers"):
        build_answer_vocab(questions, max_answers=0)


def test_soft_score_targets_and_dense_labels():
    label2id = {"yes": 0, "no": 1, "2": 2, "dog": 3}
    answers = ["no"] * 2 + ["yes"] * 5 + ["a dog"] + ["maybe"] * 2
    indices, scores = soft_score_targets(answers, label2id)
    assert indices == [0, 1, 3]  # "maybe" is not a label
    assert scores == [1.0, 0.6, 0.3]
    assert soft_score_targets(["maybe"] * 10, label2id) == ([], [])
    assert soft_score_targets("Two", label2id) == ([2], [1.0])

    labels = build_soft_targets([indices, [], [2]], [scores, [], [1.0]], num_labels=4)
    expected = torch.tensor([[1.0, 0.6, 0.0, 0.3], [0.0] * 4, [0.0, 0.0, 1.0, 0.0]])
    assert labels.dtype == torch.float32 and labels.shape == (3, 4)
    torch.testing.assert_close(labels, expected)
    with pytest.raises(ValueError, match="outside"):
        build_soft_targets([[4]], [[1.0]], num_labels=4)
    with pytest.raises(ValueError, match="scores"):
        build_soft_targets([[0, 1]], [[1.0]], num_labels=4)


# --- parsing -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "value, expected",
    [
        (["yes", "no"], ["yes", "no"]),
        (("yes", "no"), ["yes", "no"]),
        ([], []),
        (
            [
                {"answer": "yes", "answer_confidence": "yes", "answer_id": 1},
                {"answer": "no", "answer_confidence": "maybe", "answer_id": 2},
            ],
            ["yes", "no"],
        ),
        ("yes", ["yes"]),
        ("[blank", ["[blank"]),
        ('["yes", "no"]', ["yes", "no"]),
        (' [{"answer": "2", "answer_confidence": "yes"}] ', ["2"]),
        ("['yes', \"it's\"]", ["yes", "it's"]),  # what pandas writes for a list cell
    ],
)
def test_parse_answers_accepted_shapes(value, expected):
    assert parse_answers(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        (2, "got int"),
        (None, "got NoneType"),
        ({"answer": "yes"}, "got dict"),
        (["yes", 2], "Answer 1"),
        ([{"answer_confidence": "yes"}], "Answer 0"),
        ("[1, 2]", "Answer 0"),
        ("[yes, no]", "neither JSON nor"),
    ],
)
def test_parse_answers_rejects(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_answers(value)
