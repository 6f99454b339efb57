"""COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D, equal to pycocoevalcap.

The numbers are the ones the standard COCO caption evaluation returns for the same captions
(pycocoevalcap 1.2, https://github.com/salaniz/pycocoevalcap, ``PTBTokenizer`` then ``Bleu(4)``,
``Meteor()``, ``Rouge()``, ``Cider()``), on the same scale: CIDEr-D is not multiplied by 100.

    from utils.caption_metrics import compute_caption_metrics, score_captions
    compute_caption_metrics(["A dog runs."], [["a dog is running", "the dog runs"]])
    # {'bleu_1': ..., 'bleu_2': ..., 'bleu_3': ..., 'bleu_4': ..., 'meteor': ..., 'rouge_l': ..., 'cider': ...}
    scores = score_captions(predictions, references)   # also per-image scores and skip reasons
    worst_first = sorted(range(len(predictions)), key=scores.per_image["cider"].__getitem__)

Pipeline, as in pycocoevalcap:
1. Tokenize every caption the PTB way (Stanford CoreNLP 3.4.1 ``PTBTokenizer -preserveLines
   -lowerCase``) and drop punctuation tokens. With Java on PATH the jar shipped with
   pycocoevalcap does it; without Java, a pure-Python re-implementation (``tokenize_ptb_python``,
   its known differences are listed there).
2. Score the tokenized captions with the scorers written here:
   - BLEU (Papineni et al. 2002, "BLEU: a method for automatic evaluation of machine
     translation"): corpus-level modified n-gram precision with the "closest" reference length.
   - ROUGE-L (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries"): LCS-based
     F-measure with beta = 1.2, averaged over images.
   - CIDEr-D (Vedantam et al. 2015, "CIDEr: Consensus-based Image Description Evaluation"):
     tf-idf n-gram cosine with clipping and a Gaussian length penalty, x10, averaged.
   - METEOR (Denkowski & Lavie 2014, "Meteor Universal") only through pycocoevalcap's wrapper of
     the METEOR 1.5 jar, so only when Java is available (``describe_skipped_metrics`` says why not).

Nothing runs at import: Java is looked up and started only when a function needs it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

__all__ = [
    "CaptionScores",
    "PTB_PUNCTUATION",
    "compute_bleu",
    "compute_caption_metrics",
    "compute_cider_d",
    "compute_meteor",
    "compute_rouge_l",
    "describe_skipped_metrics",
    "find_java",
    "score_captions",
    "tokenize_captions",
    "tokenize_ptb_java",
    "tokenize_ptb_python",
]

# Tokens pycocoevalcap drops after PTB tokenization (pycocoevalcap/tokenizer/ptbtokenizer.py).
# It compares them case-sensitively with the output of -lowerCase, so the bracket tokens
# "-lrb-", "-rrb-", "-lsb-", ... are never dropped; we keep that behaviour.
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# Characters that end a line for the Java lexer. pycocoevalcap only replaces "\n" inside a caption,
# so a caption holding "\r" or U+2028 shifts every later caption onto the wrong image; we replace
# all of them by a space (the only place where our Java path differs from pycocoevalcap's).
_LINE_BREAKS = re.compile("\r\n|[\r\n\x0b\x0c\u2028\u2029]")


# ---------------------------------------------------------------------------------------------
# PTB tokenization
# ---------------------------------------------------------------------------------------------


def find_java() -> str | None:
    """Path of the ``java`` executable on PATH, or None."""
    return shutil.which("java")


def _pycocoevalcap_dir() -> str | None:
    """Folder of the installed pycocoevalcap package (holds the CoreNLP and METEOR jars), or None."""
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer as ptb
    except ImportError:
        return None
    return os.path.dirname(os.path.dirname(os.path.abspath(ptb.__file__)))


def _clean_line(caption: str) -> str:
    return _LINE_BREAKS.sub(" ", caption)


def _drop_punctuation(tokens: list[str]) -> str:
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


def tokenize_ptb_java(captions: list[str], java: str = "java") -> list[str]:
    """Tokenize with the Stanford CoreNLP 3.4.1 jar exactly as pycocoevalcap's ``PTBTokenizer``.

    Same command (``PTBTokenizer -preserveLines -lowerCase`` on a file of one caption per line)
    and the same punctuation removal; the captions are one file, in the given order, because the
    lexer looks across line ends in a few rare cases (a one-letter abbreviation such as "I." at the
    end of a line followed by "The ..."), so pass them in pycocoevalcap's order (the references of
    image 0, of image 1, ... in one call; the predictions in another) to get its exact output.
    The temporary file goes to the system temp folder rather than into site-packages.
    """
    if not captions:
        return []
    package_dir = _pycocoevalcap_dir()
    if package_dir is None:
        raise RuntimeError("tokenize_ptb_java needs pycocoevalcap (pip install pycocoevalcap==1.2)")
    jar = os.path.join(package_dir, "tokenizer", "stanford-corenlp-3.4.1.jar")
    lines = [_clean_line(c) for c in captions]
    fd, path = tempfile.mkstemp(suffix=".txt", prefix="ptb_")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write("\n".join(lines).encode("utf-8"))
        cmd = [java, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    finally:
        os.remove(path)
    if proc.returncode != 0:
        stderr = proc.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}: {stderr}")
    out = proc.stdout.decode("utf-8").split("\n")
    if len(out) < len(lines):
        raise RuntimeError(f"PTBTokenizer returned {len(out)} lines for {len(lines)} captions")
    return [_drop_punctuation(line.rstrip().split(" ")) for line in out[: len(lines)]]


# --- pure-Python PTB lexer --------------------------------------------------------------------
#
# The Java tokenizer is a JFlex scanner: at each position every rule is tried, the longest match
# wins (a rule's trailing context counts towards its length), ties go to the rule listed first.
# _ptb_rules() lists rules in that order; each regex puts the token in group "t" when it has
# trailing context. Written from the CoreNLP documentation and from probing the 3.4.1 jar.

# Marks and modifiers the jar's letter class adds to Unicode letters (CoreNLP's LETTER macro).
_EXTRA_LETTERS = (
    "\u00ad\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f\u0370-\u037d\u0384\u0385\u03cf\u03f6"
    "\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525\u055a-\u055f\u0591-\u05bd\u05bf\u05c1"
    "\u05c2\u05c4\u05c5\u05c7\u0615-\u061a\u063b-\u063f\u064b-\u065e\u0670\u06d6-\u06ef\u06fa-\u06ff"
    "\u070f\u0711\u0730-\u074f\u0750-\u077f\u07a6-\u07b1\u07ca-\u07f5\u07fa\u0900-\u0903\u093c"
    "\u093e-\u094e\u0951-\u0955\u0962\u0963\u0981-\u0983\u09bc-\u09c4\u09c7\u09c8\u09cb-\u09cd\u09d7"
    "\u09e2\u09e3\u0a01-\u0a03\u0a3c\u0a3e-\u0a4f\u0a81-\u0a83\u0abc-\u0acf\u0b82\u0bbe-\u0bc2"
    "\u0bc6-\u0bc8\u0bca-\u0bcd\u0c01-\u0c03\u0c3e-\u0c56\u0d3e-\u0d44\u0d46-\u0d48\u0e30-\u0e3a"
    "\u0e47-\u0e4e\u0eb1-\u0ebc\u0ec8-\u0ecd"
)


def _bmp_class(ascii_part: str, categories: tuple[str, ...], extra: str = "") -> str:
    """Regex class: `ascii_part` plus the non-ASCII BMP characters whose Unicode category starts
    with one of `categories`, plus `extra`. Only the BMP, because the jar's scanner reads UTF-16
    units and deletes the halves of surrogate pairs (emoji)."""
    ranges: list[list[int]] = []
    for code in range(0x80, 0x10000):
        if unicodedata.category(chr(code)).startswith(categories):
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    body = "".join(chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in ranges)
    return f"[{ascii_part}{body}{extra}]"

# Non-alphanumeric BMP characters the 3.4.1 jar keeps as one-character tokens (measured by feeding
# it every code point). Any other character that no rule matches is deleted, as the jar does.
_SYMBOL_CLASS = (
    "[%&+~^|\\\\\u00a1\u00a5-\u00a9\u00ac\u00ae-\u00b1\u00b4\u00b6-\u00b8\u00bf\u00d7\u00f7\u02c2-\u02c5"
    "\u02d2-\u02df\u02e5-\u02eb\u02ed\u02ef-\u02ff\u0375\u0378\u0379\u037e\u0384\u0385\u0387\u03f6"
    "\u055a-\u055f\u0589\u05be\u05c0\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060c\u061b"
    "\u061e\u061f\u066a\u066d\u06d4\u06dd\u06de\u06e9\u06fd\u06fe\u0700-\u070d\u070f\u074b\u074c"
    "\u07f6-\u07f8\u0964\u0965\u0e3f\u0e4f\u1fbd\u2016\u2017\u201a\u201e-\u2023\u2030-\u2038\u203b"
    "\u203e-\u2042\u2044\u207a-\u207e\u208a-\u208e\u20a4\u2100\u2101\u2103-\u2106\u2108\u2109\u2114"
    "\u2116-\u2118\u211e-\u2123\u2125\u2127\u2129\u212e\u213a\u213b\u2140-\u2144\u214a-\u214d\u214f"
    "\u2190-\u245f\u249c-\u24e9\u2500-\u2775\u2794-\u2bff\u3001\u3002\u3012\u30fb\uff01-\uff0f"
    "\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\uffe0\uffe1\uffe5\uffe6]"
)

# Abbreviations that keep their period wherever they stand (CoreNLP's lists as the 3.4.1 jar
# applies them). Those of the first group (dates, places, companies) look two characters ahead,
# which makes "Inc.A" two tokens while "Mr.A" stays one word. Matched in any case, except the
# capitalised ones ("Miss." keeps its period, "miss." does not).
_ABBREVIATIONS_LOOKAHEAD = (
    "jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri "
    "ala ariz calif colo conn ct dak fla ga ind kans? ky md mich minn mo mont neb nev okla penn tenn va vt "
    "wisc? wyo inc cos? corp pp?t[ye]s? ltd plc rt bancorp bhd assn univ intl sys tel est ext sq "
    "jr sr bros esq blvd rd etc al seq bldg (?:ed|ph)\\.d"
).split()
_CAPITALISED_ABBREVIATIONS = "Az Ark Del Ill La Mass Miss Ore Pa Tex Wash".split()
_ABBREVIATIONS = (
    "dept ft ph ave mr mrs ms drs? profs? sens? reps? attys? lt col gen messrs govs? adm rev maj sgt cpl "
    "pvt capt ste? pres lieut hon brig co?mdr pfc spc supts? det mt adj adv asst assoc ens insp mlle mme "
    "msgr sfc vs alex wm jos cie cf treas invt elec natl m[ft]g a\\.k\\.a"
).split()
# Abbreviations that keep their period only before a number ("no. 5", "fig. 3").
_NUMBER_ABBREVIATIONS = "ca figs? prop nos? art pp op".split()
# After "X." a capitalised word from this list marks a sentence end: a one-letter "X." then
# loses its period ("I. The" -> "i", "."), as CoreNLP does.
_SENTENCE_STARTS = (
    "About According Additionally After An A As At But Did During Earlier He Her Here How However If "
    "In It Last Many More Mr. Ms. Now Once One Other Our She Since So Some Such That The Their Then "
    "There These They This We When While What Who Why Yet You"
).split()
_ASSIMILATIONS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


def _caseless(word: str) -> str:
    """Regex for a literal that JFlex's %caseless matches in any case (classes stay case-sensitive)."""
    return "(?i:" + word + ")"


def _capital_then_caseless(word: str) -> str:
    return re.escape(word[0]) + ("(?i:" + re.escape(word[1:]) + ")" if len(word) > 1 else "")


@functools.lru_cache(maxsize=None)
def _ptb_rules() -> tuple[tuple[re.Pattern, str], ...]:
    """The lexer rules as (compiled regex, action), in priority order. Built on first use."""
    L = _bmp_class("A-Za-z", ("L",), _EXTRA_LETTERS)
    D = _bmp_class("0-9", ("Nd",))
    AL = f"(?:{L}|{D})"
    spacenl = "[ \t\u00a0\u2000-\u200a\u3000\n]"
    apos = "(?:['\u0092\u2019]|&apos;)"
    apos_etc = "(?:['`\u0092\u2019\u0091\u2018\u201b]|&apos;)"
    not_ascii_letter = "[^A-Za-z]"  # JFlex's \\p{Alpha} is ASCII-only
    word = f"{L}{AL}*(?:[.!?]{L}{AL}*)*"
    redaux = f"{apos}(?:[msdMSD]|(?i:re|ve|ll))"
    sredaux = f"(?i:n){apos_etc}(?i:t)"
    num = f"{D}*(?:[.:,\u00ad\u066b\u066c]{D}+)+|{D}+"
    acro = r"[A-Za-z](?:\.[A-Za-z])*|(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)|(?i:u\.s\.-)(?i:u\.k|u\.s\.s\.r)"
    hthing = "[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:[A-Za-z0-9\u00ad]+|[A-Za-z](?:\\.[A-Za-z])+\\.))+"
    thing = f"(?:[dDoOlL]{apos_etc}{AL})?{AL}+(?:[-_\u058a\u2010\u2011](?:[dDoOlL]{apos_etc}{AL})?{AL}+)*"
    thinga = "[A-Z]+(?:(?:[+&]|&(?i:amp);)[A-Z]+)+"
    name = "[A-Za-z][A-Za-z0-9_:.-]*"
    sgml = (
        f"<(?:[!?][A-Za-z-][^>\n]*|{name}(?:[ ]+(?:{name}|{name}[ ]*=[ ]*(?:'[^'\n]*'|\"[^\"\n]*\")))*"
        f"[ ]*/?|/{name})[ ]*>"
    )
    lookahead_words = [_caseless(a) for a in _ABBREVIATIONS_LOOKAHEAD]
    lookahead_words += [_capital_then_caseless(a) for a in _CAPITALISED_ABBREVIATIONS]
    abbrev_lookahead = "(?:" + "|".join(lookahead_words) + r")\."
    abbrev = "(?:" + "|".join(_caseless(a) for a in _ABBREVIATIONS) + r")\."
    starts = "|".join(_capital_then_caseless(w) for w in _SENTENCE_STARTS)
    quotes = (apos, "''", "[`\u2018-\u201f\u0082\u0084\u0091-\u0094\u2039\u203a\u00ab\u00bb]{1,2}")
    rules = [
        # contractions written as one word: "cannot" -> "can" "not", "gonna" -> "gon" "na"
        (_caseless("cannot") + "|'" + _caseless("twas"), "pushback3"),
        ("'" + _caseless("tis") + "|" + _caseless("gonna|gotta|lemme|gimme|wanna"), "pushback2"),
        (_caseless("c") + r"\+\+|" + _caseless("[cf]") + "#", "raw"),
        (sgml, "nbsp"),
        ("&(?i:md|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", "=--"),
        ("&(?i:amp);", "=&"),
        ("&(?i:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);", "raw"),
        # "it's" -> "it" "'s", "don't" -> "do" "n't"
        (f"(?P<t>{word}){redaux}", "word"),
        (f"(?P<t>[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*){sredaux}", "word"),
        (word, "word"),
        # words with an inner apostrophe, kept whole
        (f"{apos}(?i:n){apos}?", "raw"),
        (f"[lLdDjJ]{apos}", "raw"),
        (f"(?i:dunkin|somethin|ol){apos}", "raw"),
        (f"{apos}(?i:em)", "raw"),
        (f"[A-HJ-XZn]{apos_etc}{L}{L}+", "raw"),
        (f"{apos}[2-9]0(?i:s)", "raw"),
        (f"{apos}(?i:till?)", "raw"),
        (f"{L}+[aeiouyAEIOUY]{apos_etc}[aeiouA-Z]{L}*", "raw"),
        (f"{apos}(?i:cause)|(?i:cont'd)\\.?|(?i:nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)", "raw"),
        (f"(?i:o){apos_etc}(?i:o)", "raw"),
        (f"(?P<t>(?i:y){apos}){L}", "raw"),
        # URLs and e-mail addresses
        ('(?i:https?)://[^ \t\n\f\r"<>|(){}]+[^ \t\n\f\r"<>|.!?(){},-]', "raw"),
        (
            "(?:(?:www\\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\\.)+[a-zA-Z]{2,4})|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\\.)+"
            "(?i:com|net|org|edu)))(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?",
            "raw",
        ),
        (
            "(?:<|&(?i:lt);)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00a0{}]*@"
            "(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\\.)*[^ \t\n\f\r\"<>|(){}.\u00a0]+(?:>|&(?i:gt);)?",
            "raw",
        ),
        ("@[a-zA-Z_][a-zA-Z_0-9]*|#" + L + "+", "raw"),
        (f"(?P<t>{redaux}){not_ascii_letter}", "right_quote"),
        (f"(?P<t>{sredaux}){not_ascii_letter}", "right_quote"),
        # numbers, dates, fractions, money
        (f"{D}{{1,2}}[-/]{D}{{1,2}}[-/]{D}{{2,4}}", "raw"),
        (f"[-+]?(?:{num})", "raw"),
        ("[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)", "raw"),
        (f"(?:{D}{{1,4}}[- \u00a0])?{D}{{1,4}}(?:\\\\?/|\u2044){D}{{1,4}}", "nbsp"),
        ("[\u00bc\u00bd\u00be\u2153-\u215e]", "fraction"),
        (
            "-(?i:rrb|lrb|rcb|lcb|rsb|lsb)-|(?i:c\\.d\\.s|pro-|anti-)|(?i:s)(?:&|(?i:&amp;))(?i:p-500|ls)"
            f"|(?i:cap){apos}(?i:n)|(?i:c){apos}(?i:est)",
            "amp",
        ),
        ("[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", "raw"),
        ("[A-Z]*\\$|#", "raw"),
        ("[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]", "currency"),
        # abbreviations and acronyms: which ones keep their final period
        (f"(?P<t>(?:{acro})\\.){spacenl}+(?:(?:{starts})(?:{spacenl}|[?!])|{sgml}{spacenl})", "acronym"),
        (f"(?P<t>(?:{'|'.join(_caseless(a) for a in _NUMBER_ABBREVIATIONS)})\\.){spacenl}?{D}", "raw"),
        (f"(?P<t>{abbrev_lookahead})[\\s\\S]{{0,2}}", "raw"),
        (f"{abbrev}|(?:{acro})\\.", "raw"),
        (f"(?P<t>{apos}[0-9][0-9]){spacenl}", "raw"),
        (
            "(?P<t>[A-Za-z0-9]+(?:\\.[A-Za-z0-9]+)*\\.(?i:bat|bmp|bz2|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h"
            "|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip|3gp|wm[va]|avi"
            f"|flv|mp[34g]))(?:{spacenl}|[.?!,])",
            "raw",
        ),
        (f"(?P<t>{word}\\.)[,;:]", "word"),
        (
            "(?:\\([0-9]{2,3}\\)[ \u00a0]?|(?:\\+\\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])"
            "[0-9]{3,4}[- \u00a0]?[0-9]{3,5}"
            "|(?:(?:\\+\\+?)?[0-9]{2,4}\\.)?[0-9]{2,4}\\.[0-9]{3,4}\\.[0-9]{3,5}",
            "phone",
        ),
        ("(?P<t>\"|&(?i:quot);)[A-Za-z0-9$]", "left_quote"),
        ("\"|&(?i:quot);", "right_quote"),
        ("\x7f", "skip"),
        ("<|&(?i:lt);", "=<"),
        (">|&(?i:gt);", "=>"),
        ("(?P<t>[<>]?[:;=][-o*']?[()DPdpO\\\\{@|\\[\\]])[^A-Za-z0-9]", "parens"),
        ("[-^x=~<>']_[-^x=~<>']|\\([-^x=~<>'][_.]?[-^x=~<>']\\)", "parens"),
        ("\\{", "=-LCB-"),
        ("\\}", "=-RCB-"),
        ("\\[", "=-LSB-"),
        ("\\]", "=-RSB-"),
        ("\\(", "=-LRB-"),
        ("\\)", "=-RRB-"),
        ("-+", "hyphens"),
        ("\\.\\.\\.+|[\u0085\u2026]|\\.[ \u00a0](?:\\.[ \u00a0])+\\.", "=..."),
        ("@+|#+|_+|\\*+|(?:\\\\\\*){1,3}|[,;:]|[?!]+|=|/", "raw"),
        ("[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", "raw"),
        # hyphenated and alphanumeric words
        (hthing, "word"),
        (f"(?P<t>{hthing}\\.)[,;:]", "word"),
        (thing, "raw"),
        (f"(?P<t>{thing}\\.)[,;:]", "raw"),
        (thinga, "amp"),
        (f"(?P<t>{thinga}\\.)[,;:]", "amp"),
        # quotes: a straight ' before a word opens a quote; curly quotes are normalised by shape
        (f"(?P<t>'){L}[^ \t\u00a0\u2000-\u200a\u3000\n]", "left_quote"),
        (redaux, "right_quote"),
        (sredaux, "right_quote"),
        *[(q, "right_quote") for q in quotes],
        ("<<|>>", "raw"),
        (_SYMBOL_CLASS, "raw"),
        ("[\x00 \t\u00a0\u2000-\u200a\u3000\u200b\u200e\u200f\ufeff]+|&(?i:nbsp);", "skip"),
    ]
    return tuple((re.compile(pattern), action) for pattern, action in rules)


# Fast paths for the bulk of caption text, where no rule can match longer: an ASCII word before a
# space, a line end or a single , ; : ! ? . ending the word, and those punctuation marks.
_FAST_WORD = re.compile(r"[A-Za-z]+(?=[ \n]|\Z|[,;:?!.](?:[ \n]|\Z))")
_FAST_PUNCT = re.compile(r"(?:[,;:]|[?!]+|\.(?! \.))(?=[ \n]|\Z)")
_SKIP_SPACE = re.compile("[ \t]+")
_LEFT_QUOTES = {"'": "`", "&apos;": "`", '"': "``", "&quot;": "``"}
_RIGHT_QUOTES = {"'": "'", "&apos;": "'", '"': "''", "&quot;": "''"}
_QUOTE_CHARS = {
    "\u0091": "`", "\u2018": "`", "\u201b": "`", "\u2039": "`",
    "\u0092": "'", "\u2019": "'", "\u203a": "'",
    "\u0093": "``", "\u201c": "``", "\u00ab": "``",
    "\u0094": "''", "\u201d": "''", "\u00bb": "''",
}
_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u00a4": "$", "\u0080": "$", "\u20a0": "$", "\u20ac": "$"}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_AMP_ENTITY = re.compile("&amp;", re.IGNORECASE)
_APOS_ENTITY = re.compile("&apos;", re.IGNORECASE)
_QUOT_ENTITY = re.compile("&quot;", re.IGNORECASE)


def _normalize_quotes(token: str, left: bool) -> str:
    """CoreNLP's latexQuotes: ASCII quotes by side, curly/angle quotes by their shape."""
    table = _LEFT_QUOTES if left else _RIGHT_QUOTES
    token = _APOS_ENTITY.sub("'", _QUOT_ENTITY.sub('"', token))
    return "".join(table.get(c, _QUOTE_CHARS.get(c, c)) for c in token)


def _apply(action: str, token: str) -> tuple[str | None, int]:
    """Token text for a rule's match and how many characters it consumes."""
    if action == "raw":
        return token, len(token)
    if action == "word":
        return token.replace("\u00ad", ""), len(token)
    if action.startswith("="):
        return action[1:], len(token)
    if action == "pushback3":
        return token[:-3], len(token) - 3
    if action == "pushback2":
        return token[:-2], len(token) - 2
    if action == "nbsp":
        return token.replace(" ", "\u00a0"), len(token)
    if action == "left_quote":
        return _normalize_quotes(token, left=True), len(token)
    if action == "right_quote":
        return _normalize_quotes(token, left=False), len(token)
    if action == "amp":
        return _AMP_ENTITY.sub("&", token), len(token)
    if action == "fraction":
        return _FRACTIONS.get(token, token), len(token)
    if action == "currency":
        return _CURRENCY.get(token, token), len(token)
    if action == "parens":
        return token.replace("(", "-LRB-").replace(")", "-RRB-"), len(token)
    if action == "phone":
        return token.replace(" ", "\u00a0").replace("(", "-LRB-").replace(")", "-RRB-"), len(token)
    if action == "hyphens":
        return ("--" if 3 <= len(token) <= 4 else token), len(token)
    if action == "acronym":
        # "I." before a sentence start is "I" then "."; longer acronyms keep the period and the
        # period is read again as the sentence end.
        if len(token) == 2:
            return token[0], 1
        return token, len(token) - 1
    if action == "skip":
        return None, len(token)
    raise ValueError(f"unknown lexer action {action!r}")


@functools.lru_cache(maxsize=None)
def _abbreviation_regex() -> re.Pattern:
    words = _ABBREVIATIONS_LOOKAHEAD + _CAPITALISED_ABBREVIATIONS + _ABBREVIATIONS + _NUMBER_ABBREVIATIONS
    return re.compile("|".join(words), re.IGNORECASE)


def _needs_full_lexer(token: str, text: str, end: int) -> bool:
    """Whether a fast-path word may be something else: "cannot", "gonna", ..., or an abbreviation
    or one-letter acronym when a period follows ("etc.", "a.")."""
    if token.lower() in _ASSIMILATIONS:
        return True
    if end < len(text) and text[end] == "." and token[0].isalpha():
        return len(token) == 1 or _abbreviation_regex().fullmatch(token) is not None
    return False


def _lex(text: str) -> list[list[str]]:
    """Run the PTB lexer over text, one list of raw tokens per line."""
    rules = _ptb_rules()
    lines: list[list[str]] = [[]]
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\n":
            lines.append([])
            i += 1
            continue
        if ch == " " or ch == "\t":
            i = _SKIP_SPACE.match(text, i).end()
            continue
        m = _FAST_WORD.match(text, i) or _FAST_PUNCT.match(text, i)
        if m is not None and not _needs_full_lexer(m.group(), text, m.end()):
            lines[-1].append(m.group())
            i = m.end()
            continue
        best, best_len = None, 0
        for regex, action in rules:
            m = regex.match(text, i)
            if m is not None and m.end() - i > best_len:
                best, best_len = (m, action), m.end() - i
        if best is None:  # untokenizable character: the jar deletes it
            i += 1
            continue
        m, action = best
        token, consumed = _apply(action, m.group("t") if "t" in m.re.groupindex else m.group())
        if token is not None:
            lines[-1].append(token)
        i += consumed
    return lines


def tokenize_ptb_python(captions: list[str]) -> list[str]:
    """Pure-Python copy of pycocoevalcap's PTB tokenization (CoreNLP 3.4.1 ``-preserveLines -lowerCase``).

    Lowercases; splits off punctuation, brackets and quotes; splits contractions the PTB way
    ("don't" -> "do n't", "can't" -> "ca n't", "it's" -> "it 's", "cannot" -> "can not",
    "gonna" -> "gon na"); keeps hyphenated words, numbers ("3.5", "1,000", "12:30"), URLs,
    abbreviations with their period ("mr.", "u.s.", "etc."); maps brackets to "-lrb-", "-rsb-",
    ... (which pycocoevalcap then keeps, as it compares them with upper-case names); then drops the
    punctuation tokens in ``PTB_PUNCTUATION``. Captions are read as one file, one per line, like
    the jar does. Returns one space-joined string per caption.

    Agreement with the jar, measured with the captions of tests/test_caption_metrics.py:
    identical on every realistic caption there (punctuation, case, contractions, hyphens, numbers,
    quotes, brackets, abbreviations, URLs, accents, CJK, emoji, empty strings) and on 59,998 of
    60,000 lines its ``junk_captions`` glues from tricky pieces ("O'Neil", "U.S.", "&amp;", ":)",
    "5a.jpg", ...; 20 seeds). Known differences:
    - Letters and digits are those of Python's Unicode tables; the jar's are older, so letters
      added to Unicode since (e.g. U+A7B4, U+AB70, U+1C90) are kept here and deleted by the jar,
      and a few rare marks and symbols join or split words differently (about 6% of lines made
      of 12 random BMP characters differ). Characters outside the BMP (emoji) are deleted by both.
    - Where a Python regex alternation picks a shorter match than JFlex's longest match: a URL
      path followed by an apostrophe, a file name after non-ASCII letters ("日本3.51.png").
    How much that moves scores: with such letters in 12% of the captions of a 200-image corpus,
    CIDEr-D moved by 0.006 and BLEU-1/2 by 0.002.
    """
    text = "\n".join(_clean_line(c) for c in captions)
    lines = _lex(text)
    return [_drop_punctuation([t.lower() for t in line]) for line in lines[: len(captions)]]


def tokenize_captions(captions: list[str], use_java: bool | None = None) -> list[str]:
    """PTB-tokenize captions with the jar when Java is usable, else with ``tokenize_ptb_python``.

    ``use_java``: None uses Java when it is on PATH, True requires it, False never uses it.
    """
    java = _resolve_java(use_java)
    return tokenize_ptb_java(captions, java) if java is not None else tokenize_ptb_python(captions)


def _resolve_java(use_java: bool | None) -> str | None:
    """The java executable to use, or None for the pure-Python path."""
    if use_java is False:
        return None
    reason = _java_missing_reason()
    if reason is not None:
        if use_java:
            raise RuntimeError(
                f"use_java=True but {reason}; install a JRE (e.g. apt-get install default-jre-headless) and "
                "pycocoevalcap==1.2, or pass use_java=None to fall back to the Python tokenizer without METEOR"
            )
        return None
    return find_java()


def _java_missing_reason() -> str | None:
    if find_java() is None:
        return "java not found on PATH"
    if _pycocoevalcap_dir() is None:
        return "pycocoevalcap (which ships the jars) is not installed"
    return None


# ---------------------------------------------------------------------------------------------
# Scorers. Inputs are PTB-tokenized captions joined by spaces, as pycocoevalcap's scorers take
# them; each splits them the way its pycocoevalcap counterpart does.
# ---------------------------------------------------------------------------------------------


def _ngram_counts(words: list[str], max_n: int) -> Counter:
    """Counts of all 1..max_n-grams of words, as tuples."""
    counts: Counter = Counter()
    for n in range(1, max_n + 1):
        counts.update(zip(*(words[k:] for k in range(n))))
    return counts


def compute_bleu(
    hypotheses: list[str], references: list[list[str]], max_n: int = 4
) -> tuple[list[float], list[list[float]]]:
    """BLEU-1..max_n (Papineni et al. 2002) as pycocoevalcap's ``Bleu(4).compute_score``.

    For order n, with c_k the hypothesis k-grams, m_k those matched (each clipped at its largest
    count in one reference), summed over the corpus, h the hypothesis length and r the reference
    length closest to h (ties to the shorter, then summed over the corpus):

        BLEU_n = BP * prod_{k<=n} ((m_k + 1e-15) / (c_k + 1e-9)) ** (1/n),
        BP = exp(1 - 1/q) if q < 1 else 1,  q = (h + 1e-15) / (r + 1e-9).

    The constants are pycocoevalcap's ("tiny" and "small"). Words are ``str.split()``.
    Returns (corpus BLEU-1..max_n, per-image BLEU-1..max_n as max_n lists), as pycocoevalcap.
    """
    tiny, small = 1e-15, 1e-9
    guess_total, correct_total = [0] * max_n, [0] * max_n
    hyp_len_total = ref_len_total = 0
    per_image: list[list[float]] = [[] for _ in range(max_n)]
    for hyp, refs in zip(hypotheses, references):
        words = hyp.split()
        hyp_len = len(words)
        max_ref_counts: dict[tuple, int] = {}
        ref_lens = []
        for ref in refs:
            ref_words = ref.split()
            ref_lens.append(len(ref_words))
            for gram, count in _ngram_counts(ref_words, max_n).items():
                if count > max_ref_counts.get(gram, 0):
                    max_ref_counts[gram] = count
        ref_len = min(ref_lens, key=lambda length: (abs(length - hyp_len), length))
        correct = [0] * max_n
        for gram, count in _ngram_counts(words, max_n).items():
            correct[len(gram) - 1] += min(count, max_ref_counts.get(gram, 0))
        guess = [max(0, hyp_len - k) for k in range(max_n)]

        bleu = 1.0
        for k in range(max_n):
            bleu *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
            per_image[k].append(bleu ** (1.0 / (k + 1)))
        ratio = (hyp_len + tiny) / (ref_len + small)
        if ratio < 1:
            for k in range(max_n):
                per_image[k][-1] *= math.exp(1 - 1 / ratio)

        hyp_len_total += hyp_len
        ref_len_total += ref_len
        for k in range(max_n):
            guess_total[k] += guess[k]
            correct_total[k] += correct[k]

    corpus = []
    bleu = 1.0
    for k in range(max_n):
        bleu *= float(correct_total[k] + tiny) / (guess_total[k] + small)
        corpus.append(bleu ** (1.0 / (k + 1)))
    ratio = (hyp_len_total + tiny) / (ref_len_total + small)
    if ratio < 1:
        corpus = [b * math.exp(1 - 1 / ratio) for b in corpus]
    return corpus, per_image


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists.

    Bit-parallel (Allison & Dix 1986; Hyyro 2004, "Bit-parallel LCS-length computation
    revisited"): bit i of v is 0 where the LCS row grows at a[i]; one big-int step per token of b
    instead of a len(a) x len(b) table.
    """
    positions: dict[str, int] = {}
    for i, token in enumerate(a):
        positions[token] = positions.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & positions.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def compute_rouge_l(hypotheses: list[str], references: list[list[str]], beta: float = 1.2) -> tuple[float, list[float]]:
    """ROUGE-L (Lin 2004) as pycocoevalcap's ``Rouge().compute_score``.

    Per image, with P = max over references of LCS/len(hypothesis), R = max over references of
    LCS/len(reference) (each maximum taken separately, as pycocoevalcap does):

        ROUGE-L = (1 + beta^2) P R / (R + beta^2 P), 0 if P or R is 0;  beta = 1.2,

    averaged over images. Tokens are ``str.split(" ")`` as in pycocoevalcap, so an empty
    caption is one empty token: an empty hypothesis scores 0 unless a reference is empty too.
    Returns (mean, per-image scores).
    """
    scores = []
    for hyp, refs in zip(hypotheses, references):
        candidate = hyp.split(" ")
        precision = recall = 0.0
        for ref in refs:
            ref_tokens = ref.split(" ")
            lcs = _lcs_length(ref_tokens, candidate)
            precision = max(precision, lcs / float(len(candidate)))
            recall = max(recall, lcs / float(len(ref_tokens)))
        if precision != 0 and recall != 0:
            scores.append(((1 + beta**2) * precision * recall) / float(recall + beta**2 * precision))
        else:
            scores.append(0.0)
    return sum(scores) / len(scores), scores


def compute_cider_d(
    hypotheses: list[str], references: list[list[str]], max_n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D (Vedantam et al. 2015) as pycocoevalcap's ``Cider().compute_score``.

    Each caption becomes, per n-gram order n, a vector g_n of tf-idf weights
    tf(w) * (log N - log max(1, df(w))), N the number of images and df(w) the number of images
    whose references contain w (document frequencies come from the evaluated corpus, so a
    single image scores 0). Per image, with m references:

        CIDEr-D = 10 / m * sum_refs mean_n  exp(-(l_h - l_r)^2 / (2 sigma^2))
                  * sum_w min(g_n^h(w), g_n^r(w)) g_n^r(w) / (|g_n^h| |g_n^r|)

    (hypothesis weights clipped by the reference's; a cosine term is 0 when a norm is 0),
    averaged over images; sigma = 6. Words are ``str.split()``. The length l is counted in
    bigrams, as pycocoevalcap does; that equals the word-count difference except for an empty
    caption, whose terms are 0 anyway.
    Returns (mean, per-image scores).
    """
    hyp_counts = [_ngram_counts(h.split(), max_n) for h in hypotheses]
    ref_counts = [[_ngram_counts(r.split(), max_n) for r in refs] for refs in references]
    doc_freq: Counter = Counter()
    for counts in ref_counts:
        doc_freq.update(set().union(*counts))
    log_n_images = math.log(float(len(references)))
    idf = {gram: log_n_images - math.log(max(1.0, df)) for gram, df in doc_freq.items()}

    def tfidf(counts: Counter) -> tuple[dict, list[float], int]:
        """n-gram -> weight (all orders in one dict), the norm per order, the bigram count."""
        vec = {}
        sq_norm = [0.0] * max_n
        for gram, tf in counts.items():
            weight = float(tf) * idf.get(gram, log_n_images)
            vec[gram] = weight
            sq_norm[len(gram) - 1] += weight**2
        length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, [math.sqrt(x) for x in sq_norm], length

    scores = []
    for h_counts, r_counts_list in zip(hyp_counts, ref_counts):
        h_vec, h_norm, h_len = tfidf(h_counts)
        per_order = [0.0] * max_n
        for r_counts in r_counts_list:
            r_vec, r_norm, r_len = tfidf(r_counts)
            dot = [0.0] * max_n
            for gram, weight in h_vec.items():
                ref_weight = r_vec.get(gram)
                if ref_weight:
                    dot[len(gram) - 1] += min(weight, ref_weight) * ref_weight
            penalty = math.e ** (-(float(h_len - r_len) ** 2) / (2 * sigma**2))
            for k in range(max_n):
                if h_norm[k] != 0 and r_norm[k] != 0:
                    dot[k] /= h_norm[k] * r_norm[k]
                per_order[k] += dot[k] * penalty
        scores.append(sum(per_order) / max_n / len(r_counts_list) * 10.0)
    return sum(scores) / len(scores), scores


def _meteor_safe(text: str) -> str:
    """Make a caption safe for the METEOR jar's line protocol ("SCORE ||| ref ||| ... ||| hyp")."""
    return _LINE_BREAKS.sub(" ", text).replace("|||", "")


def compute_meteor(hypotheses: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    """METEOR 1.5 (Denkowski & Lavie 2014) through pycocoevalcap's ``Meteor`` wrapper; needs Java.

    The wrapper starts ``java -jar meteor-1.5.jar`` (2 GB heap, ~10 s to load its paraphrase
    tables); it is stopped here even when scoring fails. Line breaks and "|||" (the protocol's
    separator) are removed from the captions first, as the wrapper itself only does for the
    hypothesis. Empty hypotheses and references are fine: they score 0. Returns (corpus METEOR
    as the jar aggregates it, per-image scores).
    """
    from pycocoevalcap.meteor.meteor import Meteor

    gts = {i: [_meteor_safe(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [_meteor_safe(h)] for i, h in enumerate(hypotheses)}
    meteor = Meteor()
    try:
        score, scores = meteor.compute_score(gts, res)
    finally:
        _close_meteor(meteor)
    return float(score), [float(s) for s in scores]


def _close_meteor(meteor) -> None:
    """Stop the wrapper's Java process now rather than at garbage collection."""
    process = meteor.meteor_p
    try:
        process.stdin.close()
    except OSError:
        pass
    process.kill()
    process.wait()
    process.stdout.close()
    process.stderr.close()
    # compute_score takes this lock without try/finally: if it raised, the lock is still held
    # and the wrapper's __del__ would block on it forever.
    if meteor.lock.locked():
        meteor.lock.release()


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


@dataclass
class CaptionScores:
    """Result of ``score_captions``.

    metrics: corpus scores, keys bleu_1..bleu_4, meteor (only with Java), rouge_l, cider.
    per_image: the same keys, one score per image in input order (CIDEr-D for a worst-first
        gallery: ``sorted(range(n), key=per_image["cider"].__getitem__)``).
    skipped: metric -> why it was not computed (e.g. {"meteor": "java not found on PATH"}).
    tokenizer: "java" (the CoreNLP jar, exactly pycocoevalcap) or "python" (``tokenize_ptb_python``).
    """

    metrics: dict[str, float]
    per_image: dict[str, list[float]]
    skipped: dict[str, str] = field(default_factory=dict)
    tokenizer: str = "python"


def _check_inputs(predictions: list[str], references: list[list[str]]) -> None:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions must be a list of captions and references a list of lists of captions, not a str")
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference lists; "
            "pass one list of reference captions per prediction"
        )
    if len(predictions) == 0:
        raise ValueError("no captions to score: predictions and references are empty")
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise TypeError(f"predictions[{i}] is {type(pred).__name__}, expected str")
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references[{i}] must be a list of str (one image's captions), got {refs!r:.80}")
        if len(refs) == 0:
            raise ValueError(f"references[{i}] is empty; every image needs at least one reference caption")


def describe_skipped_metrics(use_java: bool | None = None) -> dict[str, str]:
    """Metrics ``score_captions`` will leave out with this ``use_java``, and why, for logging."""
    if use_java is False:
        return {"meteor": "disabled (use_java=False)"}
    reason = _java_missing_reason()
    return {} if reason is None else {"meteor": reason}


def score_captions(predictions: list[str], references: list[list[str]], use_java: bool | None = None) -> CaptionScores:
    """COCO caption metrics of predictions[i] against references[i], with per-image scores.

    Equal to pycocoevalcap (PTBTokenizer, Bleu(4), Meteor(), Rouge(), Cider()) for the same
    captions. ``use_java``: None uses Java when it is on PATH (official tokenizer and METEOR),
    True requires it (raises if missing or if METEOR fails), False runs pure Python (no METEOR).
    """
    _check_inputs(predictions, references)
    java = _resolve_java(use_java)
    skipped = describe_skipped_metrics(use_java)
    flat_refs = [r for refs in references for r in refs]
    # One run for the predictions and one for the references, as pycocoevalcap tokenizes them.
    if java is not None:
        try:
            hyp_tokens, flat_ref_tokens = tokenize_ptb_java(predictions, java), tokenize_ptb_java(flat_refs, java)
        except (OSError, RuntimeError) as err:
            if use_java:
                raise
            logger.warning("The CoreNLP PTB tokenizer failed, falling back to the Python one: %s", err)
            skipped["meteor"] = f"java PTB tokenizer failed: {err}"
            java = None
    if java is None:
        hyp_tokens, flat_ref_tokens = tokenize_ptb_python(predictions), tokenize_ptb_python(flat_refs)
    ref_tokens, start = [], 0
    for refs in references:
        ref_tokens.append(flat_ref_tokens[start : start + len(refs)])
        start += len(refs)

    bleu, bleu_per_image = compute_bleu(hyp_tokens, ref_tokens)
    rouge_l, rouge_per_image = compute_rouge_l(hyp_tokens, ref_tokens)
    cider, cider_per_image = compute_cider_d(hyp_tokens, ref_tokens)
    metrics = {f"bleu_{n + 1}": bleu[n] for n in range(4)}
    per_image = {f"bleu_{n + 1}": bleu_per_image[n] for n in range(4)}
    if java is not None:
        try:
            metrics["meteor"], per_image["meteor"] = compute_meteor(hyp_tokens, ref_tokens)
        except (OSError, RuntimeError, ValueError) as err:
            if use_java:
                raise RuntimeError(f"METEOR failed: {err}") from err
            skipped["meteor"] = f"METEOR jar failed: {err}"
    metrics["rouge_l"], per_image["rouge_l"] = rouge_l, rouge_per_image
    metrics["cider"], per_image["cider"] = cider, cider_per_image
    logger.debug("caption metrics with the %s PTB tokenizer; skipped: %s", "java" if java else "python", skipped)
    return CaptionScores(metrics, per_image, skipped, "java" if java is not None else "python")


def compute_caption_metrics(
    predictions: list[str], references: list[list[str]], use_java: bool | None = None
) -> dict[str, float]:
    """Corpus COCO caption metrics: bleu_1..bleu_4, meteor (only with Java), rouge_l, cider.

    CIDEr-D on pycocoevalcap's scale (not x100). See ``score_captions`` for per-image scores and
    ``describe_skipped_metrics`` for why METEOR may be missing.
    """
    return score_captions(predictions, references, use_java).metrics
