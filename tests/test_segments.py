"""Cutting long audio at quiet points, and transcript formats (minaf3/segments.py)."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minaf3.segments import (
    SEARCH_SECONDS,
    Segment,
    Transcription,
    join_texts,
    quietest_sample,
    segment_bounds,
    srt_time,
)
from minaf3.windows import MAX_AUDIO_SAMPLES, SAMPLING_RATE

SR = SAMPLING_RATE


def noise(num_samples: int, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(num_samples)).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(
    total=st.integers(min_value=1, max_value=20 * SR),
    max_seconds=st.integers(min_value=1, max_value=6),
    search=st.sampled_from([0.0, 0.1, 0.5, 2.0]),
    seed=st.integers(0, 3),
)
def test_segments_tile_the_audio_and_fit(total, max_seconds, search, seed):
    """Contiguous, in order, covering every sample, none longer than the limit, and the fewest possible."""
    max_samples = max_seconds * SR
    bounds = segment_bounds(noise(total, seed), max_samples=max_samples, search_seconds=search)
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    assert all(0 < end - start <= max_samples for start, end in bounds)
    assert len(bounds) == -(-total // max_samples)
    n = len(bounds)
    for k, (start, cut) in enumerate(bounds[:-1], start=1):
        # Each cut lies in the search window that ends at its mark (the 10-minute mark, here max_seconds),
        # or earlier when the previous cut was early, and leaves the rest enough segments to fit.
        latest = min(start + max_samples, k * max_samples)
        assert latest - search * SR <= cut <= latest
        assert cut >= total - (n - k) * max_samples


def test_cuts_land_in_planted_pauses():
    """25 minutes of noise with a 1 s silence at 585 s and another at 1165 s: the cuts fall inside them."""
    audio = noise(25 * 60 * SR)
    pauses = [(585 * SR, 586 * SR), (1165 * SR, 1166 * SR)]
    for start, end in pauses:
        audio[start:end] = 0.0
    bounds = segment_bounds(audio)
    assert len(bounds) == 3
    for (start, end), (_, cut) in zip(pauses, bounds[:2], strict=True):
        assert start <= cut <= end
    # The second search window is measured from the first cut (585 s + 600 s), not from 1200 s.
    assert bounds[1][1] - bounds[1][0] <= MAX_AUDIO_SAMPLES


def test_pause_outside_the_search_window_is_not_used():
    """A silence 60 s before the mark is beyond the 30 s search: the cut stays in the window."""
    audio = noise(11 * 60 * SR)
    audio[540 * SR : 541 * SR] = 0.0
    (_, cut), _ = segment_bounds(audio)
    assert MAX_AUDIO_SAMPLES - SEARCH_SECONDS * SR <= cut <= MAX_AUDIO_SAMPLES


def test_exact_hour_cuts_on_every_ten_minute_mark():
    """An hour is exactly six full segments: no slack, so the cuts fall on the marks whatever the audio."""
    audio = noise(3600 * SR)
    audio[595 * SR : 596 * SR] = 0.0  # a pause the cut may not use: segment 6 would exceed 600 s
    bounds = segment_bounds(audio)
    assert bounds == [(k * MAX_AUDIO_SAMPLES, (k + 1) * MAX_AUDIO_SAMPLES) for k in range(6)]


def test_short_audio_is_one_segment():
    assert segment_bounds(noise(5 * SR)) == [(0, 5 * SR)]
    assert segment_bounds(noise(MAX_AUDIO_SAMPLES)) == [(0, MAX_AUDIO_SAMPLES)]


def test_quietest_sample_prefers_sustained_quiet_over_one_zero():
    """A single zero sample inside loud audio is not a pause; a 300 ms quiet stretch is."""
    audio = noise(10 * SR)
    audio[2 * SR] = 0.0
    audio[7 * SR : 7 * SR + 4800] *= 0.01
    cut = quietest_sample(audio, 0, 10 * SR)
    assert 7 * SR <= cut <= 7 * SR + 4800


def test_quietest_sample_in_a_tiny_range_returns_its_end():
    assert quietest_sample(noise(SR), 100, 200) == 200


def test_srt_time():
    assert srt_time(0) == "00:00:00,000"
    assert srt_time(3599.9996) == "01:00:00,000"
    assert srt_time(61.5) == "00:01:01,500"
    assert srt_time(600.0004) == "00:10:00,000"


def test_transcription_formats():
    t = Transcription(
        text=join_texts([" hello ", "", "world"]),
        segments=[Segment(0.0, 600.0, "hello"), Segment(600.0, 725.25, ""), Segment(725.25, 800.0, "world")],
    )
    assert t.text == "hello world" and str(t) == "hello world" and t.duration == 800.0
    assert json.loads(t.to_json()) == {
        "text": "hello world",
        "segments": [
            {"start": 0.0, "end": 600.0, "text": "hello"},
            {"start": 600.0, "end": 725.25, "text": ""},
            {"start": 725.25, "end": 800.0, "text": "world"},
        ],
    }
    assert t.to_srt() == (
        "1\n00:00:00,000 --> 00:10:00,000\nhello\n\n"
        "2\n00:10:00,000 --> 00:12:05,250\n\n\n"
        "3\n00:12:05,250 --> 00:13:20,000\nworld\n"
    )


@pytest.mark.parametrize("texts, joined", [([], ""), (["  "], ""), (["a", " b "], "a b")])
def test_join_texts(texts, joined):
    assert join_texts(texts) == joined
