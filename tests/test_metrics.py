"""minaf3/metrics.py: normalising, exact and contains, multiple choice in NVIDIA's benchmark formats, WER
against an independent edit distance, and the intervals (Wilson against published values, the bootstrap)."""

from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minaf3.errors import ConfigError
from minaf3.metrics import (
    bootstrap_interval,
    choice_letter,
    choice_match,
    contains,
    edit_distance,
    exact_match,
    normalize,
    parse_options,
    score_item,
    summarize,
    wilson_interval,
    word_errors,
)


# ---- normalising, exact, contains --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Cat-Flap, isn't it?", "cat flap isnt it"),
        ("  A  dog\tbarks.\n", "dog barks"),
        ("3.5 seconds", "3 5 seconds"),  # a decimal point separates, it does not join 3 and 5 into 35
        ("Ｆｕｌｌ-width ＡＢＣ", "full width abc"),  # NFKC
        ("an answer", "answer"),
        ("Don’t stop", "dont stop"),  # a typographic apostrophe, dropped as the plain one
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_normalize_keeps_articles_when_asked():
    assert normalize("The cat, a hat.", drop_articles=False) == "the cat a hat"


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("A dog.", "dog", 1.0),
        ("THE DOG", "dog", 1.0),
        ("dogs", "dog", 0.0),
        ("a dog barks", "dog", 0.0),
        ('The spoken content of the audio is "SOS".', "sos", 1.0),  # AF3's transcription framing
        ("3 beeps", "3 Beeps!", 1.0),
        ("3 beeps", "4 beeps", 0.0),
    ],
)
def test_exact_match(prediction, answer, expected):
    assert exact_match(prediction, answer) == expected


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("The dog barks loudly.", "a dog", 1.0),
        ("I hear a dog barking", "dog barking", 1.0),
        ("hotdog", "dog", 0.0),  # whole words only
        ("dog", "the dog barks", 0.0),
        ("barking dog", "dog barking", 0.0),  # in order
    ],
)
def test_contains(prediction, answer, expected):
    assert contains(prediction, answer) == expected


# ---- multiple choice ---------------------------------------------------------------------------------------
# The options inline, as NVIDIA's AF-Reasoning-Eval AQA_MCQ.json writes them, with an instruction after.
INLINE = (
    "In what location are the people?\n(A) swimming pool. (B) restaurant. (C) church. (D) conference. "
    "Output the answer with <SUMMARY>, <CAPTION>, <REASONING>, and <CONCLUSION> tags."
)
# One option a line, as MMAU-style questions list them.
LINES = (
    "What best describes the mood of the music?\nChoose the correct option from the following options:\n"
    "(A) Sad to happy\n(B) Calm\n(C) Angry\n(D) Happy to sad"
)
DOTTED = "Which instrument plays the melody?\nA. Piano\nB. Acoustic guitar\nC. Violin"
PARENS = "What animal is it?\nA) Dog\nB) Cat\nC) Cow"


def test_parse_options_in_each_format():
    assert parse_options(INLINE) == {
        "A": "swimming pool",
        "B": "restaurant",
        "C": "church",
        "D": "conference",
    }
    assert parse_options(LINES) == {"A": "Sad to happy", "B": "Calm", "C": "Angry", "D": "Happy to sad"}
    assert parse_options(DOTTED) == {"A": "Piano", "B": "Acoustic guitar", "C": "Violin"}
    assert parse_options(PARENS) == {"A": "Dog", "B": "Cat", "C": "Cow"}
    assert parse_options("How many beeps are there?") == {}
    assert parse_options("Is it (A) loud?") == {}  # one marker is not a list of options


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("(B) restaurant", 1.0),
        ("B", 1.0),
        ("(B)", 1.0),
        ("B.", 1.0),
        ("B)", 1.0),
        ("The answer is (B).", 1.0),
        ("Answer: B", 1.0),
        ("The correct option is B, a restaurant.", 1.0),
        ("restaurant", 1.0),  # the option's text alone
        ("The people are in a restaurant.", 1.0),
        ("<CONCLUSION>(B) restaurant</CONCLUSION>", 1.0),
        ("(C) church", 0.0),
        ("C", 0.0),
        ("The answer is (C), not (B).", 0.0),  # the stated answer counts
        ("conference", 0.0),
        ("Either (A) or (B).", 0.0),  # two options: none picked
        ("I cannot tell.", 0.0),
    ],
)
def test_choice_inline_options(prediction, expected):
    assert choice_match(prediction, "(B) restaurant", INLINE) == expected


@pytest.mark.parametrize(
    "prediction, answer, question, expected",
    [
        ("Sad to happy", "(A) Sad to happy", LINES, 1.0),
        ("(A)", "(A) Sad to happy", LINES, 1.0),
        ("The mood goes from sad to happy.", "(A) Sad to happy", LINES, 1.0),
        ("happy to sad", "(A) Sad to happy", LINES, 0.0),  # the words of another option
        ("D", "(A) Sad to happy", LINES, 0.0),
        ("B. Acoustic guitar", "B", DOTTED, 1.0),  # a reference that is a letter
        ("acoustic guitar", "B", DOTTED, 1.0),
        ("guitar", "B", DOTTED, 0.0),  # not an option's text
        ("B)", "Cat", PARENS, 1.0),  # a reference that is the option's text alone
        ("cat", "Cat", PARENS, 1.0),
        ("A dog", "Cat", PARENS, 0.0),
        # No options in the question: the reference's own "(B) text" gives its letter and text.
        ("restaurant", "(B) restaurant", "Where are they?", 1.0),
        ("B", "(B) restaurant", "Where are they?", 1.0),
        ("church", "(B) restaurant", "Where are they?", 0.0),
        # No options at all: the texts are compared as exact does.
        ("Yes.", "yes", "Is it raining?", 1.0),
        ("No", "yes", None, 0.0),
    ],
)
def test_choice_other_formats(prediction, answer, question, expected):
    assert choice_match(prediction, answer, question) == expected


def test_a_hedge_picks_nothing():
    options = parse_options(INLINE)
    assert choice_letter("Either (A) or (B).", options) is None
    assert choice_match("Either (A) or (B).", "(A) swimming pool", INLINE) == 0.0
    assert choice_letter("swimming pool or restaurant", options) is None


def test_an_option_inside_another_does_not_count():
    options = parse_options("What covers the ground?\n(A) snow\n(B) frozen snow\n(C) mud")
    assert choice_letter("It is frozen snow.", options) == "B"
    assert choice_letter("Snow.", options) == "A"


# ---- word error rate ---------------------------------------------------------------------------------------
def reference_distance(hypothesis: tuple, reference: tuple) -> int:
    """Levenshtein distance by the recursive definition, memoised: a different route to the same number."""

    @cache
    def d(i: int, j: int) -> int:  # reference[:i] -> hypothesis[:j]
        if i == 0 or j == 0:
            return i + j
        return min(
            d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (reference[i - 1] != hypothesis[j - 1])
        )

    return d(len(reference), len(hypothesis))


WORDS = st.lists(st.sampled_from(["cat", "dog", "sat", "on", "mat", "red"]), max_size=12)


@settings(max_examples=300, deadline=None)
@given(hypothesis=WORDS, reference=WORDS)
def test_wer_equals_a_reference_edit_distance(hypothesis, reference):
    expected = reference_distance(tuple(hypothesis), tuple(reference))
    assert edit_distance(hypothesis, reference) == expected
    assert word_errors(" ".join(hypothesis), " ".join(reference)) == (expected, len(reference))
    item = score_item("wer", " ".join(hypothesis), " ".join(reference))
    assert item == {"score": expected / max(len(reference), 1), "edits": expected, "words": len(reference)}


def test_wer_by_hand():
    assert edit_distance("the cat sat".split(), "the cat sat on the mat".split()) == 3  # 3 deletions
    assert edit_distance("a cat sat on mat".split(), "the cat sat on the mat".split()) == 2
    assert word_errors("The cat sat.", "the cat, sat") == (0, 3)
    assert word_errors("the cat", "a cat") == (1, 2)  # articles are words in a transcript
    assert word_errors('The spoken content of the audio is "SOS".', "SOS") == (0, 1)


def test_corpus_wer_weighs_items_by_their_words():
    items = [score_item("wer", "a b c d", "a b c d"), score_item("wer", "x", "y")]  # 0 of 4, 1 of 1
    row = summarize("wer", [*items, None])
    assert row["score"] == pytest.approx(1 / 5) and (row["edits"], row["words"]) == (1, 5)
    assert (row["items"], row["errors"]) == (3, 1)


# ---- intervals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    # Newcombe (1998), Statistics in Medicine 17:857-872, Table I, method 3 (Wilson score, no correction)
    "successes, n, low, high",
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_interval_matches_published_values(successes, n, low, high):
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_stays_in_range():
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[0] < 1.0  # never a zero-width interval at the edge


def test_bootstrap_interval():
    edits, words = [0, 1, 3, 0, 2, 5, 1, 0], [4, 5, 6, 3, 8, 9, 2, 5]
    low, high = bootstrap_interval(edits, words)
    assert bootstrap_interval(edits, words) == (low, high)  # seeded
    assert low < sum(edits) / sum(words) < high
    assert bootstrap_interval(edits, words, seed=1) != (low, high)
    assert bootstrap_interval([1, 2, 3], [2, 4, 6]) == (0.5, 0.5)  # every item at 50%: nothing to vary
    wide = bootstrap_interval(edits[:3], words[:3])
    assert wide[1] - wide[0] > high - low  # fewer items, a wider interval


def test_summarize_proportions_leave_errors_out():
    row = summarize("exact", [{"score": 1.0}, {"score": 0.0}, None, {"score": 1.0}])
    assert row["items"] == 4 and row["errors"] == 1 and row["correct"] == 2
    assert row["score"] == pytest.approx(2 / 3) and (row["low"], row["high"]) == wilson_interval(2, 3)
    empty = summarize("choice", [None, None])
    assert empty["score"] is None and empty["errors"] == 2


def test_unknown_metric_is_refused():
    with pytest.raises(ConfigError, match="metric 'bleu': expected one of exact, contains, choice, wer"):
        score_item("bleu", "a", "b")
    with pytest.raises(ConfigError, match="metric 'Exact'"):
        summarize("Exact", [])
