"""Scoring answers against references, and the 95% confidence interval of a score over items.

Every metric first removes AF3's transcription framing from both texts ('The spoken content of the audio is
"hello".' -> 'hello', processor.strip_transcription_prefix), then:

    exact      1 if the normalised texts are equal, else 0
    contains   1 if the normalised reference stands in the normalised prediction as whole words, else 0
    choice     1 if the prediction picks the reference's option of a multiple-choice question, else 0
               (`choice_letter`: "(B)", "B.", "B)", "The answer is (B)", or the option's text)
    wer        word error rate: word-level edit distance (substitutions + deletions + insertions) over the
               number of reference words, on normalised words with articles kept (they were said)

`normalize`: Unicode NFKC, lower case, apostrophes dropped ("don't" = "dont"), every other punctuation mark
or symbol a space ("rock-and-roll" = "rock and roll", and "3.5" does not become "35"), the articles a, an and
the dropped (except for wer), runs of whitespace one space.

Over items, exact, contains and choice give the fraction scored 1 with a 95% Wilson interval, which unlike
the normal approximation stays inside [0, 1] and keeps its coverage near 0% and 100% and for few items. wer
gives the corpus WER, the sum of edits over the sum of reference words (an utterance weighs by its words, as
in ASR benchmarks), with a 95% percentile bootstrap interval that resamples whole items: the corpus WER is a
ratio of two sums that vary together item by item (long references have more words and more errors), the
words of one utterance are not independent, and per-item WERs are skewed with no upper bound, so a normal
interval over per-item WERs would assume what does not hold and describe their unweighted mean, another
quantity. The bootstrap is seeded, so a report is the same on every run.
"""

import re
import unicodedata
from collections.abc import Sequence
from math import sqrt
from statistics import NormalDist

import numpy as np

from minaf3.errors import ConfigError
from minaf3.processor import strip_transcription_prefix

METRICS = ("exact", "contains", "choice", "wer")
PROPORTIONS = ("exact", "contains", "choice")  # one 0 or 1 per item
LEVEL = 0.95
Z = NormalDist().inv_cdf(0.5 + LEVEL / 2)  # 1.96
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
ARTICLES = frozenset({"a", "an", "the"})
APOSTROPHES = "'’ʼ"


def check_metric(metric: str) -> None:
    """Raise ConfigError unless `metric` is one of METRICS."""
    if metric not in METRICS:
        raise ConfigError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")


# ---- normalising -------------------------------------------------------------------------------------------
def normalize(text: str, drop_articles: bool = True) -> str:
    """`text` as the metrics compare it (see the module docstring): 'The Cat-Flap, isn't it?' -> 'cat flap
    isnt it'."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join("" if c in APOSTROPHES else " " if unicodedata.category(c)[0] in "PS" else c for c in text)
    words = text.split()
    return " ".join(w for w in words if not (drop_articles and w in ARTICLES))


def _prepared(text: str, drop_articles: bool = True) -> str:
    return normalize(strip_transcription_prefix(text), drop_articles)


def exact_match(prediction: str, answer: str) -> float:
    return float(_prepared(prediction) == _prepared(answer))


def contains(prediction: str, answer: str) -> float:
    """1.0 if the answer's words stand together, in order, among the prediction's ('a dog' in 'The dog
    barks'), else 0.0; word boundaries count ('dog' is not in 'hotdog')."""
    return float(f" {_prepared(answer)} " in f" {_prepared(prediction)} ")


# ---- multiple choice ---------------------------------------------------------------------------------------
# An option's marker: "(B)" anywhere, or at the start of a line "B." / "B)" / "B:" followed by a space.
PAREN_MARKER = re.compile(r"\(([A-Z])\)")
LINE_MARKER = re.compile(r"^[ \t]*([A-Z])[.):][ \t]+", re.MULTILINE)
# "The answer is (B)", "Answer: B", "the correct option is B." (the last such phrase counts)
STATED = re.compile(r"(?i:answer|option|choice)(?:\s+is)?\s*:?\s*\(?([A-Z])\)?(?![A-Za-z])")
BARE = re.compile(r"^\(?([A-Z])\)?[.):]?$")  # the whole text is a letter: "B", "(B)", "B.", "B)"
LEADING = re.compile(r"^(?:\(([A-Z])\)|([A-Z])[.):](?=\s|$))\s*(.*)$", re.DOTALL)  # "(B) text", "B. text"


def parse_options(question: str) -> dict[str, str]:
    """The options a question lists, letter -> text: "(A) swimming pool. (B) restaurant." or one per line
    ("(A) Sad to happy", "A. Sad", "A) Sad"). Letters run A, B, C, ...; an option's text ends at the end of
    its line or at a sentence's end (". "), so a trailing instruction is not part of the last option."""
    for pattern in (PAREN_MARKER, LINE_MARKER):
        markers, expected = [], "A"
        for match in pattern.finditer(question):
            if match.group(1) == expected:
                markers.append(match)
                expected = chr(ord(expected) + 1)
        if len(markers) >= 2:
            break
    else:
        return {}
    options = {}
    for marker, following in zip(markers, [*markers[1:], None], strict=True):
        text = question[marker.end() : following.start() if following else len(question)]
        text = text.split("\n", 1)[0].split(". ", 1)[0].strip().rstrip(".,;").strip()
        options[marker.group(1)] = text
    return options


def choice_letter(text: str, options: dict[str, str]) -> str | None:
    """The option `text` picks, or None when it picks none (or several) that can be told apart.

    In order: a stated answer ("The answer is (B)", the last one), the letter alone ("B", "(B)", "B."), a
    leading marker ("(B) restaurant", "B. restaurant"), a single distinct "(X)" marker anywhere, then the
    options' texts: one equal to the text once normalised, else the one whose words the text contains (an
    option inside another that also matches, "snow" in "frozen snow", does not count).
    """
    text = text.strip()
    stated = STATED.findall(text)
    if stated:
        return stated[-1]
    for pattern in (BARE, LEADING):
        match = pattern.match(text)
        if match:
            return next(group for group in match.groups() if group)
    marked = set(PAREN_MARKER.findall(text))
    if len(marked) == 1:
        return marked.pop()
    said = normalize(text)
    texts = {letter: normalize(option) for letter, option in options.items() if normalize(option)}
    equal = [letter for letter, option in texts.items() if option == said]
    if len(equal) == 1:
        return equal[0]
    found = {letter: option for letter, option in texts.items() if f" {option} " in f" {said} "}
    inside_another = {
        a for a, t in found.items() for b, u in found.items() if a != b and f" {t} " in f" {u} "
    }
    chosen = [letter for letter in found if letter not in inside_another]
    return chosen[0] if len(chosen) == 1 else None


def choice_match(prediction: str, answer: str, question: str | None) -> float:
    """1.0 if the prediction picks the reference's option. The options come from the question, and from the
    reference itself when it reads "(B) restaurant" (its letter and text). A reference that names no option
    is compared with the prediction as `exact_match` does."""
    options = parse_options(question or "")
    leading = LEADING.match(answer.strip())
    if leading and leading.group(3).strip():
        letter = leading.group(1) or leading.group(2)
        options.setdefault(letter, leading.group(3).strip().rstrip("."))
    reference = choice_letter(answer, options)
    if reference is None:
        return exact_match(prediction, answer)
    return float(choice_letter(prediction, options) == reference)


# ---- word error rate ---------------------------------------------------------------------------------------
def edit_distance(hypothesis: Sequence[str], reference: Sequence[str]) -> int:
    """The fewest substitutions, deletions and insertions that turn `reference` into `hypothesis` (word
    lists): Levenshtein's dynamic programme, one row of the (len(reference)+1, len(hypothesis)+1) table at a
    time. O(len(reference) * len(hypothesis)) steps."""
    previous = list(range(len(hypothesis) + 1))  # reference[:0] -> hypothesis[:j]: j insertions
    for i, said in enumerate(reference, start=1):
        current = [i]  # reference[:i] -> nothing: i deletions
        for j, heard in enumerate(hypothesis, start=1):
            current.append(
                min(
                    previous[j] + 1,  # delete reference word i
                    current[j - 1] + 1,  # insert hypothesis word j
                    previous[j - 1] + (said != heard),  # substitute (free when the words agree)
                )
            )
        previous = current
    return previous[-1]


def word_errors(prediction: str, answer: str) -> tuple[int, int]:
    """(edits, reference words) between normalised texts, articles kept."""
    heard, said = _prepared(prediction, False).split(), _prepared(answer, False).split()
    return edit_distance(heard, said), len(said)


# ---- per item and over items -------------------------------------------------------------------------------
def score_item(metric: str, prediction: str, answer: str, question: str | None = None) -> dict:
    """{"score": ...} for one answered item: 1.0 or 0.0, or for wer the item's own WER (edits / reference
    words, at least 1) with "edits" and "words", which the corpus WER sums."""
    check_metric(metric)
    if metric == "wer":
        edits, words = word_errors(prediction, answer)
        return {"score": edits / max(words, 1), "edits": edits, "words": words}
    if metric == "choice":
        return {"score": choice_match(prediction, answer, question)}
    return {"score": (exact_match if metric == "exact" else contains)(prediction, answer)}


def wilson_interval(successes: int, n: int, z: float = Z) -> tuple[float, float]:
    """The Wilson score interval of a proportion successes / n (n >= 1) at the normal quantile z."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0 and n successes the bound is exactly 0 or 1; the subtraction would leave a rounding residue.
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)


def bootstrap_interval(
    edits: Sequence[int],
    words: Sequence[int],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """The 95% percentile bootstrap interval of sum(edits) / sum(words), items drawn with replacement."""
    edits, words = np.asarray(edits, dtype=np.float64), np.asarray(words, dtype=np.float64)
    rng = np.random.default_rng(seed)
    ratios = np.empty(resamples)
    for r in range(resamples):
        drawn = rng.integers(0, len(edits), len(edits))
        ratios[r] = edits[drawn].sum() / max(words[drawn].sum(), 1.0)
    low, high = np.quantile(ratios, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(low), float(high)


def summarize(metric: str, results: list[dict | None]) -> dict:
    """One report row from per-item results (score_item's dicts; None for an item that failed).

    Returns items, errors (failed items, outside the score), score (None when nothing was scored) with its
    95% interval low and high; "correct" for exact/contains/choice, "edits" and "words" for wer.
    """
    check_metric(metric)
    scored = [r for r in results if r is not None]
    row: dict = {"items": len(results), "errors": len(results) - len(scored)}
    if metric == "wer":
        edits, words = [r["edits"] for r in scored], [r["words"] for r in scored]
        row |= {"edits": sum(edits), "words": sum(words)}
        if scored:
            low, high = bootstrap_interval(edits, words)
            row |= {"score": sum(edits) / max(sum(words), 1), "low": low, "high": high}
    else:
        correct = int(sum(r["score"] for r in scored))
        row["correct"] = correct
        if scored:
            low, high = wilson_interval(correct, len(scored))
            row |= {"score": correct / len(scored), "low": low, "high": high}
    return row if scored else row | {"score": None, "low": None, "high": None}
