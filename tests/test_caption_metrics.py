"""utils/caption_metrics.py against pycocoevalcap's own tokenizer and scorers.

Every expected score is computed here by pycocoevalcap (Bleu(4), Rouge(), Cider(), Meteor(),
PTBTokenizer) on the same captions; only a few tiny cases are checked by hand. The Java tests
(official PTB tokenizer, METEOR) are skipped when no `java` is on PATH.
"""

import math
import os
import random
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge, my_lcs

from utils import caption_metrics as cm

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="needs `java` on PATH for the CoreNLP PTBTokenizer / METEOR jars")

# (predictions, references): raw captions, one list of references per prediction.
CASES = {
    "several_references": (
        ["A man riding a horse on a beach.", "Two dogs playing in the snow", "a plate of food with a fork"],
        [
            [
                "A man rides a horse along the beach.",
                "a person on a horse near the ocean",
                "Man riding horseback on the sand.",
                "A horse and rider at the beach.",
                "Someone riding a brown horse by the sea.",
            ],
            [
                "Two dogs play in the snow.",
                "two puppies running through snow",
                "A pair of dogs playing outside in winter.",
                "Dogs chasing each other in the snow",
                "Two black dogs in a snowy field.",
            ],
            [
                "A plate of food with a fork on it.",
                "a white plate holding a meal and a fork",
                "Food on a plate next to a fork.",
                "A dinner plate with vegetables.",
                "A fork resting on a plate of food.",
            ],
        ],
    ),
    "punctuation_and_case": (
        ['A DOG, a cat... and a "bird"!', "Don't touch the man's hat (it's new).", "The U.S. flag -- 10-year-old boy's 3.5 cm toy."],
        [
            ["A dog, a cat and a bird.", "THE DOG AND THE CAT; A BIRD?"],
            ["don't touch the hat", "Do not touch the man's new hat!", "It's a new hat."],
            ["A U.S. flag and a 10-year-old boy with a toy.", "The flag of the U.S.; a boy's toy (3.5 cm)."],
        ],
    ),
    "empty_hypothesis": (
        ["", "a cat on a mat", ""],
        [["a dog runs", "the dog is running fast"], ["a cat sits on a mat", "cat on mat"], ["", "x y"]],
    ),
    "punctuation_only_hypothesis": (
        ["...", "?!", "-- ; :", "a dog on the grass."],
        [["a dog"], ["two birds on a wire", "birds sitting"], ["a red car."], ["A dog on the grass.", "dog lying on grass"]],
    ),
    "single_image": (["a dog runs in the park"], [["a dog is running in a park", "the dog runs", "a brown dog in the park"]]),
    "uneven_reference_counts": (
        ["a bus on the street", "a woman holding an umbrella", "pizza", "two people"],
        [
            ["a red bus driving down the street"],
            ["a woman with an umbrella", "lady holding umbrella in the rain"],
            ["a pizza on a table", "a large pizza", "pizza with cheese", "a slice of pizza", "a pizza pie"],
            ["two people walking", "a couple of people", "two persons on a road"],
        ],
    ),
    "unicode": (
        ["Un café à Paris — très « chic »", "東京の夜景", "an emoji 😀 party", "naïve Ελληνικά"],
        [["un café à paris", "a café in Paris"], ["東京 の 夜景", "夜の東京"], ["an emoji party", "a party"], ["naïve ελληνικά λέξεις"]],
    ),
    "one_word_captions": (["dog", "a", "cat cat"], [["dog"], ["a b", "a"], ["cat", "a cat"]]),
}


def random_corpus(n_images=200, seed=0):
    """Captions from a small vocabulary with case and punctuation; hypotheses of 0-12 words,
    1-5 references per image."""
    rng = random.Random(seed)
    vocab = "a an the man woman dog cat on of with in red blue large small table street bus pizza two sitting holding".split()

    def caption(min_words, max_words):
        words = [rng.choice(vocab) for _ in range(rng.randint(min_words, max_words))]
        if words and rng.random() < 0.3:
            words[0] = words[0].capitalize()
        if len(words) > 3 and rng.random() < 0.2:
            words[1] += ","
        return " ".join(words) + rng.choice(["", ".", ".", " .", "!"])

    predictions = [caption(0, 12) for _ in range(n_images)]
    references = [[caption(1, 14) for _ in range(rng.randint(1, 5))] for _ in range(n_images)]
    return predictions, references


ALL_CASES = {**CASES, "random_200": random_corpus()}


def pycoco_scores(hyp_tokens, ref_tokens):
    """pycocoevalcap's Bleu(4), Rouge(), Cider() on tokenized captions: (corpus metrics, per image)."""
    gts = {i: list(refs) for i, refs in enumerate(ref_tokens)}
    res = {i: [hyp] for i, hyp in enumerate(hyp_tokens)}
    bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_per_image = Rouge().compute_score(gts, res)
    cider, cider_per_image = Cider().compute_score(gts, res)
    metrics = {f"bleu_{n + 1}": bleu[n] for n in range(4)}
    per_image = {f"bleu_{n + 1}": bleu_per_image[n] for n in range(4)}
    metrics.update(rouge_l=float(rouge), cider=float(cider))
    per_image.update(rouge_l=list(rouge_per_image), cider=list(cider_per_image))
    return metrics, per_image


def assert_scores_equal(ours, theirs):
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def group_like(flat, references):
    grouped, start = [], 0
    for refs in references:
        grouped.append(flat[start : start + len(refs)])
        start += len(refs)
    return grouped


# --- scorers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(ALL_CASES))
def test_scores_match_pycocoevalcap_python_tokenizer(case):
    predictions, references = ALL_CASES[case]
    scores = cm.score_captions(predictions, references, use_java=False)
    hyp_tokens = cm.tokenize_ptb_python(predictions)
    ref_tokens = group_like(cm.tokenize_ptb_python([r for refs in references for r in refs]), references)
    metrics, per_image = pycoco_scores(hyp_tokens, ref_tokens)
    assert list(scores.metrics) == ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"]
    assert_scores_equal(scores.metrics, metrics)
    assert set(scores.per_image) == set(per_image)
    for key in per_image:
        assert scores.per_image[key] == pytest.approx(per_image[key], rel=1e-9, abs=1e-12), key
    assert scores.tokenizer == "python"
    assert scores.skipped == {"meteor": "disabled (use_java=False)"}


def test_hand_checked_tiny_cases():
    same = cm.compute_caption_metrics(["a dog runs on the grass"], [["a dog runs on the grass"]], use_java=False)
    assert same["bleu_4"] == pytest.approx(1.0, abs=1e-8)
    assert same["rouge_l"] == 1.0
    # One image: every n-gram's document frequency equals the number of images, so all tf-idf
    # weights are log(1) - log(1) = 0 and pycocoevalcap's CIDEr-D is 0.
    assert same["cider"] == 0.0
    # ROUGE-L: LCS("a dog", "a big dog") = 2, P = 1, R = 2/3, F = 2.44 * 2/3 / (2/3 + 1.44).
    rouge, _ = cm.compute_rouge_l(["a dog"], [["a big dog"]])
    assert rouge == pytest.approx(2.44 * (2 / 3) / (2 / 3 + 1.44))
    # BLEU-1 with 3 of 4 words matched and the closest reference 5 words long: 3/4 * exp(1 - 5/4).
    bleu, _ = cm.compute_bleu(["a b c d"], [["a b c x y", "q"]])
    assert bleu[0] == pytest.approx(0.75 * math.exp(1 - 5 / 4), rel=1e-8)


def test_lcs_matches_pycocoevalcap():
    rng = random.Random(1)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 15))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 15))]
        assert cm._lcs_length(a, b) == my_lcs(a, b)


def test_scoring_1000_images_is_fast():
    predictions, references = random_corpus(n_images=1000, seed=3)
    references = [(refs * 5)[:5] for refs in references]
    start = time.perf_counter()
    cm.score_captions(predictions, references, use_java=False)
    # Measured 1.5 s (5000 x 5: 5 s, mostly CIDEr-D and the Python tokenizer) on 2 cores shared
    # with other jobs; the bound only catches an accidental quadratic.
    assert time.perf_counter() - start < 15


# --- input checks, skipped metrics, no work at import --------------------------------------------


@pytest.mark.parametrize(
    "predictions, references, error",
    [
        (["a"], [["a"], ["b"]], ValueError),
        ([], [], ValueError),
        (["a"], [[]], ValueError),
        (["a"], ["a dog"], TypeError),
        ("a dog", [["a dog"]], TypeError),
        ([None], [["a"]], TypeError),
    ],
)
def test_bad_inputs_raise(predictions, references, error):
    with pytest.raises(error):
        cm.score_captions(predictions, references, use_java=False)


def test_without_java_meteor_is_skipped_with_reason(monkeypatch):
    monkeypatch.setattr(cm, "find_java", lambda: None)
    assert cm.describe_skipped_metrics() == {"meteor": "java not found on PATH"}
    scores = cm.score_captions(["a dog"], [["a dog runs"]])
    assert "meteor" not in scores.metrics
    assert scores.skipped == {"meteor": "java not found on PATH"}
    assert scores.tokenizer == "python"
    with pytest.raises(RuntimeError, match="java not found"):
        cm.score_captions(["a dog"], [["a dog runs"]], use_java=True)
    assert cm.describe_skipped_metrics(use_java=False) == {"meteor": "disabled (use_java=False)"}


def test_failing_java_tokenizer_falls_back_to_python(monkeypatch):
    def broken(captions, java="java"):
        raise RuntimeError("PTBTokenizer failed (1)")

    monkeypatch.setattr(cm, "find_java", lambda: "/usr/bin/java")
    monkeypatch.setattr(cm, "tokenize_ptb_java", broken)
    scores = cm.score_captions(["A dog."], [["a dog runs"]])
    assert scores.tokenizer == "python" and "meteor" not in scores.metrics
    assert scores.skipped == {"meteor": "java PTB tokenizer failed: PTBTokenizer failed (1)"}
    assert scores.metrics == cm.score_captions(["A dog."], [["a dog runs"]], use_java=False).metrics
    with pytest.raises(RuntimeError, match="PTBTokenizer failed"):
        cm.score_captions(["A dog."], [["a dog runs"]], use_java=True)


def test_import_starts_nothing(tmp_path):
    marker = tmp_path / "java_ran"
    fake_java = tmp_path / "java"
    fake_java.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake_java.chmod(0o755)
    code = textwrap.dedent(
        """
        import utils.caption_metrics as cm
        assert cm._ptb_rules.cache_info().currsize == 0
        assert cm._abbreviation_regex.cache_info().currsize == 0
        """
    )
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True)
    assert not marker.exists()


# --- the pure-Python PTB tokenizer -------------------------------------------------------------

# Checked against the CoreNLP 3.4.1 jar (test_python_tokenizer_matches_java re-checks them).
HAND_CHECKED_TOKENS = {
    "A man's hat, isn't it?": "a man 's hat is n't it",
    "Don't (really) go -- now...": "do n't -lrb- really -rrb- go now",
    'He said "yes" to the U.S. team.': "he said yes to the u.s. team",
    "I cannot, I'm gonna CAN'T won't": "i can not i 'm gon na ca n't wo n't",
    "A 10-year-old black-and-white cat; 3.5 kg, 1,000 at 12:30.": "a 10-year-old black-and-white cat 3.5 kg 1,000 at 12:30",
    "Mr. Smith etc. e.g. the dog.": "mr. smith etc. e.g. the dog",
    "!!! ?? ...": "!!! ??",
    "[left] {right} <unk>": "-lsb- left -rsb- -lcb- right -rcb- <unk>",
    "“Curly” ‘quotes’ — dash": "curly quotes dash",
    "": "",
}

# Varied captions: punctuation, case, contractions, hyphens, numbers, quotes, empty strings,
# abbreviations, brackets, symbols, URLs, Unicode. Read as one file, like the jar does.
VARIED_CAPTIONS = [
    "A man riding a horse.",
    "Two dogs' toys aren't here, they're \"cute\"!",
    "I don't know; can't, won't, cannot, gonna, wanna, gotta, lemme, gimme, 'tis, 'twas.",
    "The U.S. flag is flying in the U.S.",
    "Mr. Smith and Dr. Jones at 3:30 p.m. on Jan. 5th etc.",
    "A black-and-white photo of a 10-year-old boy (smiling) [left] {right}.",
    "He said ... then -- left - right; ok: fine? yes!",
    "Price is $5.50, £3 or 50% off & more &amp; done.",
    "A colour photo of the theatre centre.",
    "1/2 ½ 3/4 cup of sugar * star / slash",
    "It's John's dog, the dogs' bowl; we'll, you've, I'm, he'd.",
    "\"Hello,\" she said. 'Hi,' he said.",
    "email me at a@b.com or visit www.example.com http://x.org/a?b=c",
    "Über café naïve résumé — 日本 東京 😀 emoji",
    "a   lot    of     spaces\tand tab",
    "",
    "   ",
    "...",
    "?!",
    "a <unk> dog <pad> </s> <start> <end> <br/>",
    "O'Neil o'clock rock'n'roll y'all ma'am 'em 'cause '90s the 90's",
    "DON'T Don't doesn't isn't ain't can't CAN'T won't",
    "it’s don’t they‘re “quoted” ‘single’ «guillemets»",
    "the 1990s, 2nd place, 3-D glasses, 4x4 truck, 5mm, 24/7, 2/3/2004",
    "-5 +5 5-6 11-20 3.14 .5 1,000.5",
    "e-mail x-ray t-shirt co-op re-enter non-stop self-portrait well-known",
    "the dog is running. The dog.Is running a.b.c hello.world",
    ":) :-( ^_^ #tag @user c++ C# AT&T",
    "a photo of the letter a.",
    "I saw the letter I.",
    "The end of it",
    "see fig. 3 and no. 5 but not fig.",
    "A dog is ill. Mass. is a state, miss. is not, Miss. is.",
    "a stop sign that reads STOP.",
    "a clock showing 10 30, a phone 555-1234",
    "Yahoo! news, E! channel, OK!",
    "a sign that says \"don't walk\"",
    "'quoted' 'a b' ''double'' `back`",
    "a man (in a red shirt) is standing next to a bus.",
    "A MAN AND A WOMAN STANDING IN FRONT OF A STORE.",
    "people at the beach; some are swimming, others are sunbathing!",
    "a close-up of a pizza with pepperoni, olives & cheese",
    "An old-fashioned, 1950's style diner.",
    "the boys’ bikes leaned against the wall",
    "° × ÷ © ® ™ • § ¶ ± µ · → ★ ☺",
]


@pytest.mark.parametrize("caption, expected", sorted(HAND_CHECKED_TOKENS.items()))
def test_python_tokenizer_hand_checked(caption, expected):
    assert cm.tokenize_ptb_python([caption]) == [expected]


def test_line_breaks_inside_a_caption_become_spaces():
    captions = ["a dog\nruns", "a cat\r\nsits\u2028down", "last"]
    assert cm.tokenize_ptb_python(captions) == ["a dog runs", "a cat sits down", "last"]


@needs_java
def test_java_tokenizer_equals_pycocoevalcap_ptbtokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = [c for c in VARIED_CAPTIONS if "\n" not in c]
    theirs = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    assert cm.tokenize_ptb_java(captions) == [theirs[i][0] for i in range(len(captions))]
    assert cm.tokenize_ptb_java(["a dog\nruns", "a cat\r\nsits\u2028down", "last"]) == ["a dog runs", "a cat sits down", "last"]


@needs_java
def test_python_tokenizer_matches_java():
    captions = VARIED_CAPTIONS + list(HAND_CHECKED_TOKENS)
    for case in ALL_CASES.values():
        captions += case[0] + [r for refs in case[1] for r in refs]
    python, java = cm.tokenize_ptb_python(captions), cm.tokenize_ptb_java(captions)
    differing = [(c, p, j) for c, p, j in zip(captions, python, java) if p != j]
    assert differing == []


def junk_captions(n, seed):
    """Captions glued from tricky pieces, with random case and spacing."""
    rng = random.Random(seed)
    pieces = (
        "a man dog The U.S. Mr. etc. e.g. p.m. don't can't won't it's they're I'm cannot gonna 'tis 'twas O'Neil "
        "o'clock rock'n'roll y'all '90s 90's dogs' black-and-white 10-year-old 3.5 1,000 12:30 -5 50% $5 £3 € ½ "
        "2/3/2004 555-1234 5mm 2x4 ( ) [ ] { } < > \" ' ` `` '' “ ” ‘ ’ « » - -- --- — ... … . , ; : ? ! ?! & &amp; "
        "* / \\ | @ # _ = + ~ ^ café 日本 😀 ° × © www.example.com http://x.org/a a@b.com @user #tag <unk> </s> "
        "c++ C# :) :( ^_^ Jan. Inc. Co. vs. fig. no. Wash. wash. I. A. x. hello.world dog.Is a.b.c AT&T 5a.jpg 1.png"
    ).split()
    lines = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 12)):
            piece = rng.choice(pieces)
            piece = piece.upper() if rng.random() < 0.15 else piece.capitalize() if rng.random() < 0.15 else piece
            parts.append(piece + rng.choice([" ", " ", " ", "", "  ", "\t"]))
        lines.append("".join(parts).strip())
    return lines


@needs_java
def test_python_tokenizer_agrees_with_java_on_junk():
    # Measured: 2 of 60,000 such lines differ (20 seeds x 3000), so 1% leaves room.
    captions = junk_captions(1000, seed=7)
    python, java = cm.tokenize_ptb_python(captions), cm.tokenize_ptb_java(captions)
    same = sum(p == j for p, j in zip(python, java))
    assert same >= 0.99 * len(captions), [(c, p, j) for c, p, j in zip(captions, python, java) if p != j][:5]


# Letters from Unicode versions newer than the jar's tables (U+A7B4, U+AB70, U+1C90): Python
# keeps them in the word, the jar deletes them. The documented known difference.
KNOWN_DIFFERENCES = {"a Ꞵeta sign": "a eta sign", "ꭰ letters on a wall": "letters on a wall", "Ა sign": "sign"}


@needs_java
def test_known_tokenizer_differences_move_scores_little():
    assert cm.tokenize_ptb_java(list(KNOWN_DIFFERENCES)) == list(KNOWN_DIFFERENCES.values())
    assert cm.tokenize_ptb_python(list(KNOWN_DIFFERENCES)) != list(KNOWN_DIFFERENCES.values())

    rng = random.Random(5)
    predictions, references = random_corpus(n_images=200, seed=5)
    odd = list(KNOWN_DIFFERENCES)
    predictions = [p + " " + rng.choice(odd) if rng.random() < 0.1 else p for p in predictions]
    references = [[r + " " + rng.choice(odd) if rng.random() < 0.1 else r for r in refs] for refs in references]
    flat = [r for refs in references for r in refs]
    by_python = pycoco_scores(cm.tokenize_ptb_python(predictions), group_like(cm.tokenize_ptb_python(flat), references))[0]
    by_java = pycoco_scores(cm.tokenize_ptb_java(predictions), group_like(cm.tokenize_ptb_java(flat), references))[0]
    # Measured with 94 of 785 captions touched: |dCIDEr| = 0.0055, |dBLEU-1| = 0.0010,
    # |dBLEU-2| = 0.0021, |dROUGE-L| = 0.0001.
    assert abs(by_python["cider"] - by_java["cider"]) < 0.01
    assert abs(by_python["bleu_1"] - by_java["bleu_1"]) < 0.003
    assert abs(by_python["bleu_2"] - by_java["bleu_2"]) < 0.003
    assert abs(by_python["rouge_l"] - by_java["rouge_l"]) < 0.001


# --- the full pipeline with Java: official tokenizer and METEOR ------------------------------------


@needs_java
def test_full_pipeline_matches_pycocoevalcap(monkeypatch):
    """Everything against pycocoevalcap's PTBTokenizer + Bleu/Rouge/Cider on all cases at once.

    METEOR: our code runs pycocoevalcap's own Meteor(); we check that it is given exactly the
    PTBTokenizer output pycocoevalcap would give it, and that its scores come back unchanged
    (a second METEOR jar would cost another ~10 s of loading for the same computation).
    """
    import pycocoevalcap.meteor.meteor as meteor_module
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    predictions, references = [], []
    for preds, refs in ALL_CASES.values():
        predictions += preds
        references += refs

    calls = []

    class RecordingMeteor(meteor_module.Meteor):
        def compute_score(self, gts, res):
            result = super().compute_score(gts, res)
            calls.append((self, gts, res, result))
            return result

    monkeypatch.setattr(meteor_module, "Meteor", RecordingMeteor)
    scores = cm.score_captions(predictions, references, use_java=True)

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    hyp_tokens = [res[i][0] for i in range(len(predictions))]
    ref_tokens = [gts[i] for i in range(len(references))]
    metrics, per_image = pycoco_scores(hyp_tokens, ref_tokens)

    ((meteor, meteor_gts, meteor_res, (meteor_score, meteor_per_image)),) = calls
    assert meteor_gts == gts and meteor_res == res
    metrics["meteor"], per_image["meteor"] = meteor_score, meteor_per_image
    assert list(scores.metrics) == ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"]
    assert_scores_equal(scores.metrics, metrics)
    for key in per_image:
        assert scores.per_image[key] == pytest.approx(per_image[key], rel=1e-9, abs=1e-12), key
    assert scores.tokenizer == "java" and scores.skipped == {}
    assert meteor.meteor_p.poll() is not None  # the METEOR subprocess is stopped once scores are in


def test_meteor_input_made_safe_and_process_closed(monkeypatch):
    # A stand-in for the wrapper (no Java): records what it is asked to score.
    import pycocoevalcap.meteor.meteor as meteor_module

    seen = {}

    class FakeMeteor:
        def __init__(self):
            code = "import sys; sys.stdin.read()"
            pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.meteor_p = subprocess.Popen([sys.executable, "-c", code], **pipes)
            self.lock = threading.Lock()
            seen["meteor"] = self

        def compute_score(self, gts, res):
            seen["gts"], seen["res"] = gts, res
            return 0.25, [0.25] * len(res)

    monkeypatch.setattr(meteor_module, "Meteor", FakeMeteor)
    assert cm.compute_meteor(["a ||| dog\nruns"], [["a dog|||", "b\rc"]]) == (0.25, [0.25])
    assert seen["gts"] == {0: ["a dog", "b c"]} and seen["res"] == {0: ["a  dog runs"]}
    assert seen["meteor"].meteor_p.poll() is not None


@needs_java
def test_meteor_process_stopped_when_scoring_fails(monkeypatch):
    import pycocoevalcap.meteor.meteor as meteor_module

    started = []

    class FailingMeteor(meteor_module.Meteor):
        def __init__(self):
            super().__init__()
            started.append(self)

        def compute_score(self, gts, res):
            self.lock.acquire()  # as the wrapper does, then dies before releasing it
            raise ValueError("could not convert string to float: ''")

    monkeypatch.setattr(meteor_module, "Meteor", FailingMeteor)
    with pytest.raises(ValueError):
        cm.compute_meteor(["a dog"], [["a dog"]])
    (meteor,) = started
    assert meteor.meteor_p.poll() is not None
    assert not meteor.lock.locked()  # so the wrapper's __del__ cannot hang on it

    scores = cm.score_captions(["a dog"], [["a dog runs"]])
    assert "meteor" not in scores.metrics and scores.skipped["meteor"].startswith("METEOR jar failed")
    with pytest.raises(RuntimeError, match="METEOR failed"):
        cm.score_captions(["a dog"], [["a dog runs"]], use_java=True)
