"""Window, frame and token-count math (minaf3/windows.py): properties, and agreement with the reference.

The reference is transformers' AudioFlamingo3Processor built from the tiny checkpoint: at edge lengths we
count the `<sound>` tokens it actually writes into input_ids; for hypothesis-drawn lengths we run its own
`_process_audio` (chunking, padding, mask and `_get_audio_token_length`) with the STFT stubbed out, so that
long audio stays cheap while every count still comes from the reference's code.
"""

import logging
from unittest.mock import patch

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minaf3.errors import AudioError, ConfigError, InputError
from minaf3.windows import (
    FRAMES_PER_WINDOW,
    MAX_AUDIO_SAMPLES,
    MAX_AUDIO_SECONDS,
    MAX_WINDOWS,
    SAMPLING_RATE,
    TOKENS_PER_WINDOW,
    WINDOW_SAMPLES,
    WINDOW_SECONDS,
    audio_token_count,
    audio_token_lengths,
    conv_frames,
    frames_needed,
    kept_samples,
    mel_frames,
    num_windows,
    pooled_frames,
    window_bounds,
    window_token_counts,
)

EDGE_LENGTHS = [
    0,
    1,
    159,
    160,
    161,
    479_999,
    480_000,
    480_001,
    MAX_AUDIO_SAMPLES - 1,
    MAX_AUDIO_SAMPLES,
    MAX_AUDIO_SAMPLES + 1,
]
# Lengths up to a little past the 600 s cap: most examples land in the first few windows.
lengths = st.one_of(
    st.integers(0, 3 * WINDOW_SAMPLES),
    st.integers(0, MAX_AUDIO_SAMPLES + 2 * WINDOW_SAMPLES),
)


def summed_length_formula(num_samples: int) -> int:
    """The reference's way: conv and pool formulas applied once to the mel length summed over windows."""
    total_mel = sum(mel_frames(end - start) for start, end in window_bounds(num_samples))
    return pooled_frames(conv_frames(total_mel))


def reference_sound_tokens(processor, num_samples: int) -> int:
    """How many `<sound>` tokens the reference processor writes for audio of this length."""
    audio = np.zeros(num_samples, dtype=np.float32)
    inputs = processor(text=["<sound>Transcribe the input speech."], audio=[audio])
    return int((inputs["input_ids"] == processor.audio_token_id).sum())


def reference_token_length(processor, num_samples: int) -> int:
    """The count from the reference's `_process_audio` (chunking, mask sums, token formula), STFT stubbed."""
    extractor = processor.feature_extractor

    def no_stft(waveform, device="cpu"):
        return np.zeros((waveform.shape[0], extractor.feature_size, extractor.nb_max_frames), np.float32)

    with patch.object(extractor, "_torch_extract_fbank_features", no_stft):
        audio_inputs, _ = processor._process_audio(
            [np.zeros(num_samples, dtype=np.float32)],
            sampling_rate=16000,
            return_attention_mask=True,
            return_tensors="pt",
        )
    return int(audio_inputs["num_audio_tokens"][0])


@pytest.mark.parametrize("num_samples", EDGE_LENGTHS)
def test_edge_lengths_match_reference_input_ids(reference_processor, num_samples):
    assert audio_token_count(num_samples) == reference_sound_tokens(reference_processor, num_samples)


@settings(max_examples=25, deadline=None)
@given(num_samples=lengths)
def test_token_count_matches_reference_process_audio(reference_processor, num_samples):
    assert audio_token_count(num_samples) == reference_token_length(reference_processor, num_samples)


@given(num_samples=lengths)
def test_per_window_sum_equals_summed_length_formula(num_samples):
    assert sum(window_token_counts(num_samples)) == summed_length_formula(num_samples)


@given(full=st.integers(1, MAX_WINDOWS), extra=st.integers(0, WINDOW_SAMPLES - 1))
def test_every_full_window_gives_750_tokens(full, extra):
    counts = window_token_counts(full * WINDOW_SAMPLES + extra)
    assert counts[:full] == [TOKENS_PER_WINDOW] * full
    assert mel_frames(WINDOW_SAMPLES) == FRAMES_PER_WINDOW
    assert TOKENS_PER_WINDOW == 750


@given(a=lengths, b=lengths)
def test_token_count_is_monotone_in_length(a, b):
    short, long = sorted((a, b))
    assert audio_token_count(short) <= audio_token_count(long)


@given(num_samples=lengths)
def test_windows_tile_the_kept_audio(num_samples):
    bounds = window_bounds(num_samples)
    assert len(bounds) == num_windows(num_samples)
    assert 1 <= len(bounds) <= MAX_WINDOWS
    assert bounds[0][0] == 0
    assert all(prev[1] == nxt[0] for prev, nxt in zip(bounds, bounds[1:], strict=False))
    assert all(0 <= end - start <= WINDOW_SAMPLES for start, end in bounds)
    assert bounds[-1][1] == min(num_samples, MAX_AUDIO_SAMPLES)


@given(num_samples=st.integers(MAX_AUDIO_SAMPLES, 4 * MAX_AUDIO_SAMPLES))
def test_twenty_window_cap(num_samples):
    assert num_windows(num_samples) == MAX_WINDOWS
    assert audio_token_count(num_samples) == MAX_WINDOWS * TOKENS_PER_WINDOW


@given(mel=st.integers(0, FRAMES_PER_WINDOW))
def test_short_tails_add_no_tokens_and_formulas_never_go_negative(mel):
    tokens = pooled_frames(conv_frames(mel))
    assert tokens >= 0
    assert (tokens == 0) == (mel <= 2)


def test_tensor_forms_equal_the_integer_forms_at_every_window_length():
    """Each formula on a tensor of every length a window can have equals the formula on each length alone."""
    mel = range(FRAMES_PER_WINDOW + 1)
    conv = range(conv_frames(FRAMES_PER_WINDOW) + 1)
    valid = range(WINDOW_SAMPLES + 1)
    for dtype in (torch.int32, torch.int64):
        assert conv_frames(torch.tensor(mel, dtype=dtype)).tolist() == [conv_frames(m) for m in mel]
        assert pooled_frames(torch.tensor(conv, dtype=dtype)).tolist() == [pooled_frames(c) for c in conv]
        assert audio_token_lengths(torch.tensor(mel, dtype=dtype)).tolist() == [
            pooled_frames(conv_frames(m)) for m in mel
        ]
        assert mel_frames(torch.tensor(valid, dtype=dtype)).tolist() == [mel_frames(v) for v in valid]


@given(
    mel_lengths=st.lists(st.integers(0, FRAMES_PER_WINDOW), min_size=1, max_size=40),
    num_frames=st.integers(2, FRAMES_PER_WINDOW),
    dtype=st.sampled_from([torch.int32, torch.int64]),
)
def test_tensor_forms_agree_with_the_integer_forms_on_batches(mel_lengths, num_frames, dtype):
    """What the model does with a batch of windows: token counts per window, and the frames it crops to."""
    batch = torch.tensor(mel_lengths, dtype=dtype)
    assert audio_token_lengths(batch).tolist() == [audio_token_lengths(m) for m in mel_lengths]
    assert conv_frames(batch).tolist() == [conv_frames(m) for m in mel_lengths]
    assert frames_needed(batch, num_frames) == min(
        num_frames, max(2 * conv_frames(m) + 2 for m in mel_lengths)
    )
    two_rows = batch.repeat(2, 1)  # any shape, elementwise
    assert audio_token_lengths(two_rows).tolist() == [audio_token_lengths(batch).tolist()] * 2


@given(valid=st.lists(st.integers(0, WINDOW_SAMPLES), min_size=1, max_size=40))
def test_mel_frames_of_a_batch_are_the_mask_lengths_of_each_window(valid):
    assert mel_frames(torch.tensor(valid)).tolist() == [mel_frames(v) for v in valid]


@pytest.mark.parametrize("bad", [torch.tensor([1.5]), torch.tensor([True])])
def test_tensors_of_non_integers_are_refused(bad):
    with pytest.raises(AudioError, match="integer tensor"):
        conv_frames(bad)


def test_kept_samples_cuts_to_whole_windows_or_refuses_naming_the_item(caplog):
    assert kept_samples(MAX_AUDIO_SAMPLES, "clip 3", refuse=True) == MAX_AUDIO_SAMPLES
    with pytest.raises(InputError, match=f"^clip 3: audio is {MAX_AUDIO_SECONDS}.0 s long"):
        kept_samples(MAX_AUDIO_SAMPLES + 1, "clip 3", refuse=True)
    # A limit between whole windows keeps the whole windows below it, as the reference does.
    limit = WINDOW_SECONDS + WINDOW_SECONDS // 2
    with caplog.at_level(logging.WARNING, logger="minaf3.windows"):
        assert kept_samples(limit * SAMPLING_RATE, "clip 3", max_seconds=limit) == WINDOW_SAMPLES
    warning = f"clip 3: audio duration ({limit}.0s) exceeds {limit}s; truncating to first {WINDOW_SECONDS}s."
    assert warning in caplog.text


def test_warning_is_logged_only_past_600_seconds(caplog):
    with caplog.at_level(logging.WARNING, logger="minaf3.windows"):
        audio_token_count(MAX_AUDIO_SAMPLES)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="minaf3.windows"):
        audio_token_count(MAX_AUDIO_SAMPLES + 1)
    assert len(caplog.records) == 1
    assert "600" in caplog.records[0].getMessage()


@pytest.mark.parametrize("bad", [-1, 1.5, "10", None, True])
def test_bad_sample_counts_are_refused(bad):
    with pytest.raises(AudioError, match="num_samples"):
        audio_token_count(bad)


def test_numpy_integers_are_accepted():
    assert audio_token_count(np.int64(WINDOW_SAMPLES)) == TOKENS_PER_WINDOW


def test_valid_samples_past_one_window_are_refused():
    with pytest.raises(AudioError, match="valid_samples"):
        mel_frames(WINDOW_SAMPLES + 1)


@pytest.mark.parametrize("rate", [8000, 44100, 0])
def test_other_sampling_rates_are_refused(rate):
    with pytest.raises(ConfigError, match=str(rate)):
        audio_token_count(16000, sampling_rate=rate)
