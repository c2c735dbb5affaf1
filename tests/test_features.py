"""Log-mel features (minaf3/features.py, minaf3/mel.py) against WhisperFeatureExtractor on the reference's
own windows.

The reference windows come from transformers' AudioFlamingo3Processor._process_audio (its 30 s chunking,
then WhisperFeatureExtractor(feature_size=128) on the chunks), run on the tiny checkpoint's processor.
Both CPU backends are held to the reference: the C++ kernel (kernels/log_mel.cpp) and the torch path, and
so is mel.py's plain reference_log_mel. The kernel's own tests (against the torch path, its builds, its
guards): test_log_mel.py.
"""

import logging
import threading

import numpy as np
import pytest
import torch
from conftest import speech_like
from hypothesis import given, settings
from hypothesis import strategies as st

from minaf3.errors import AudioError, ConfigError
from minaf3.features import SampleError, computed_frames, log_mel_spectrogram, log_mel_windows
from minaf3.mel import mel_filter_bank, reference_log_mel
from minaf3.windows import FRAMES_PER_WINDOW, MAX_AUDIO_SAMPLES, N_MELS, WINDOW_SAMPLES, window_bounds

TOLERANCE = 1e-4  # max abs difference allowed against the reference
BACKENDS = ["cpp", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each CPU backend in turn: the C++ kernel and the torch path."""
    return request.param


def reference_features(processor, audios: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_features, input_features_mask) the reference processor computes for these audios."""
    audio_inputs, _ = processor._process_audio(
        audios, sampling_rate=16000, return_attention_mask=True, return_tensors="pt"
    )
    return audio_inputs["input_features"], audio_inputs["input_features_mask"]


def assert_matches_reference(processor, audio: np.ndarray, backend: str):
    features, mask = log_mel_spectrogram(audio, backend=backend)
    expected, expected_mask = reference_features(processor, [audio])
    n_windows = expected.shape[0]
    assert features.shape == (n_windows, N_MELS, FRAMES_PER_WINDOW) and features.dtype == torch.float32
    assert mask.shape == (n_windows, FRAMES_PER_WINDOW) and mask.dtype == torch.int32
    assert (features - expected).abs().max().item() <= TOLERANCE
    assert torch.equal(mask, expected_mask.to(torch.int32))


@pytest.mark.parametrize(
    "num_samples",
    [
        1,
        100,
        319,  # tails shorter than 320 samples: 1 or 2 mel frames, no audio token
        16000 * 5,  # one short window
        479_799,  # the last sample whose frame does not reach the right reflection
        479_801,
        WINDOW_SAMPLES,
        WINDOW_SAMPLES + 1,
        WINDOW_SAMPLES + 160,
        WINDOW_SAMPLES + 319,
        2 * WINDOW_SAMPLES + 123_457,  # several windows
    ],
)
def test_speech_matches_reference(reference_processor, num_samples, backend):
    assert_matches_reference(reference_processor, speech_like(num_samples, seed=num_samples), backend)


@pytest.mark.parametrize("num_samples", [16000 * 3, WINDOW_SAMPLES])
def test_silence_matches_reference(reference_processor, num_samples, backend):
    """All-zero windows: every log-mel value is the floor; a full one has no padding frame to supply it."""
    assert_matches_reference(reference_processor, np.zeros(num_samples, np.float32), backend)


def test_clipping_matches_reference(reference_processor, backend):
    clipped = np.clip(speech_like(16000 * 4) * 20.0, -1.0, 1.0)
    assert_matches_reference(reference_processor, clipped, backend)


def test_a_tone_burst_after_silence_matches_reference(reference_processor, backend):
    audio = np.zeros(WINDOW_SAMPLES + 50_000, np.float32)
    audio[-30_000:] = 0.5 * np.sin(np.arange(30_000) * 2 * np.pi * 440 / 16000)
    assert_matches_reference(reference_processor, audio, backend)


@pytest.mark.parametrize("level", [1e-3, 0.3])
def test_noise_and_a_chirp_match_reference(reference_processor, backend, level):
    """White noise, and a 50 Hz -> 7.9 kHz sweep, quiet and loud: every bin of the spectrum in use."""
    rng = np.random.default_rng(7)
    t = np.arange(16000 * 6) / 16000
    chirp = np.sin(2 * np.pi * (50 * t + (7850 / 12) * t**2))  # instantaneous 50 + 7850 t / 6 Hz
    audio = np.concatenate([level * rng.standard_normal(16000 * 3), level * chirp]).astype(np.float32)
    assert_matches_reference(reference_processor, audio, backend)


def test_audio_past_600_seconds_is_cut_like_the_reference(reference_processor, caplog, backend):
    audio = speech_like(MAX_AUDIO_SAMPLES + 16000, seed=3)
    with caplog.at_level(logging.WARNING, logger="minaf3"):
        assert_matches_reference(reference_processor, audio, backend)
    assert any("600" in record.getMessage() for record in caplog.records)


def test_batch_of_windows_matches_reference(reference_processor, backend):
    """log_mel_windows, the processor's path, on the windows of two audios at once."""
    audios = [speech_like(WINDOW_SAMPLES + 4000, seed=1), speech_like(70_000, seed=2)]
    windows = torch.zeros(3, WINDOW_SAMPLES)
    windows[0] = torch.from_numpy(audios[0][:WINDOW_SAMPLES])
    windows[1, :4000] = torch.from_numpy(audios[0][WINDOW_SAMPLES:])
    windows[2, :70_000] = torch.from_numpy(audios[1])
    features, mask = log_mel_windows(windows, torch.tensor([WINDOW_SAMPLES, 4000, 70_000]), backend=backend)
    expected, expected_mask = reference_features(reference_processor, audios)
    assert (features - expected).abs().max().item() <= TOLERANCE
    assert torch.equal(mask, expected_mask.to(torch.int32))


def test_plain_reference_equals_the_fast_paths_and_transformers(reference_processor, backend):
    """mel.py's dozen lines, on the processor's windows of three audios (a full window, a short tail, one
    reaching the right reflection, one of 319 samples): the same features as each fast path and as
    WhisperFeatureExtractor, the same mask, the same layout."""
    audios = [speech_like(n, seed=n) for n in (WINDOW_SAMPLES + 4000, 479_801, 319)]
    bounds = [(audio, start, end) for audio in audios for start, end in window_bounds(len(audio))]
    windows = torch.full((len(bounds), WINDOW_SAMPLES), float("nan"))  # past valid: never read
    for w, (audio, start, end) in enumerate(bounds):
        windows[w, : end - start] = torch.from_numpy(audio[start:end])
    valid = [end - start for _, start, end in bounds]

    features, mask = reference_log_mel(windows, valid)
    fast, fast_mask = log_mel_windows(windows, valid, backend=backend)
    expected, expected_mask = reference_features(reference_processor, audios)
    assert features.shape == fast.shape == expected.shape and features.dtype == torch.float32
    assert (features - fast).abs().max().item() <= TOLERANCE
    assert (features - expected).abs().max().item() <= TOLERANCE
    assert torch.equal(mask, fast_mask) and torch.equal(mask, expected_mask.to(torch.int32))
    one, one_mask = reference_log_mel(windows[1], valid[1])  # one window: a batch of one
    assert torch.equal(one, features[1:2]) and torch.equal(one_mask, mask[1:2])


@pytest.mark.parametrize("garbage", [1.0, np.nan, np.inf, 1e30])
@pytest.mark.parametrize("valid", [0, 1, 50_000, WINDOW_SAMPLES - 1])
def test_samples_past_valid_are_ignored(garbage, valid, backend):
    """Whatever lies past valid (the processor's slab is torch.empty: any bits, NaN included) is unread."""
    clean = torch.zeros(2, WINDOW_SAMPLES)
    clean[0, :valid] = torch.from_numpy(speech_like(valid))
    clean[1] = torch.from_numpy(speech_like(WINDOW_SAMPLES, seed=1))  # a full window right after the garbage
    dirty = clean.clone()
    dirty[0, valid:] = garbage
    lengths = [valid, WINDOW_SAMPLES]
    got = log_mel_windows(dirty, lengths, backend=backend)
    for got_tensor, want in zip(got, log_mel_windows(clean, lengths, backend=backend), strict=True):
        assert torch.equal(got_tensor, want)


@pytest.mark.parametrize(
    ("bad", "problem"), [(np.nan, r"is nan \(NaN or Inf"), (1e30, r"is 1e\+30: .*overflow")]
)
def test_log_mel_windows_names_the_window_and_sample(bad, problem, backend):
    windows = torch.zeros(3, WINDOW_SAMPLES)
    windows[2, 1234] = bad
    with pytest.raises(SampleError, match=rf"^window 2, sample 1234 {problem}") as caught:
        log_mel_windows(windows, [10, 10, 2000], backend=backend)
    assert (caught.value.window, caught.value.sample) == (2, 1234)


@pytest.mark.parametrize("peak", [1e15, 1e17])
def test_large_finite_samples_match_reference(reference_processor, peak, backend):
    """Far outside [-1, 1] but within float32's power range: the same features as the reference."""
    audio = speech_like(20_000)
    audio[700] = peak
    assert_matches_reference(reference_processor, audio, backend)


def test_numpy_float64_and_torch_inputs_agree():
    audio = speech_like(20_000)
    features, mask = log_mel_spectrogram(audio)
    for other in (audio.astype(np.float64), torch.from_numpy(audio)):
        other_features, other_mask = log_mel_spectrogram(other)
        assert (other_features - features).abs().max().item() <= 1e-6
        assert torch.equal(other_mask, mask)


def test_mel_filter_bank_equals_transformers():
    from transformers.audio_utils import mel_filter_bank as reference_filter_bank

    expected = reference_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=128,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    )
    np.testing.assert_array_equal(mel_filter_bank(), expected)


@settings(max_examples=50, deadline=None)
@given(valid=st.integers(0, WINDOW_SAMPLES))
def test_frames_past_the_computed_ones_read_only_padding(valid):
    """Frame t reads padded samples [160 t, 160 t + 400); from computed_frames on, none is a real one."""
    count = computed_frames(valid)
    assert count <= FRAMES_PER_WINDOW
    padded_real = np.zeros(WINDOW_SAMPLES + 400, bool)  # which padded positions hold a real sample
    real = np.arange(valid)
    padded_real[real + 200] = True
    padded_real[200 - real[(real >= 1) & (real <= 200)]] = True  # left reflection
    tail = real[(real >= WINDOW_SAMPLES - 201) & (real <= WINDOW_SAMPLES - 2)]
    padded_real[200 + 2 * (WINDOW_SAMPLES - 1) - tail] = True  # right reflection
    if count < FRAMES_PER_WINDOW:
        assert not padded_real[160 * count :].any()
    if valid:
        assert padded_real[160 * (count - 1) : 160 * (count - 1) + 400].any()


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        (np.zeros((2, 1000), np.float32), "1-D"),
        (np.zeros((2, 2, 1000), np.float32), "1-D"),
        (np.zeros(0, np.float32), "no samples"),
        (np.zeros(1000, np.int16), "int16"),
        ([0.0, 0.1, 0.2], "list"),
        ("speech.wav", "str"),
    ],
)
def test_log_mel_spectrogram_refuses_bad_audio(audio, message):
    with pytest.raises(AudioError, match=message):
        log_mel_spectrogram(audio)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_log_mel_spectrogram_refuses_non_finite_samples(bad, backend):
    audio = speech_like(WINDOW_SAMPLES + 5000)
    audio[WINDOW_SAMPLES + 10] = bad
    with pytest.raises(AudioError, match=f"sample {WINDOW_SAMPLES + 10}"):
        log_mel_spectrogram(audio, backend=backend)


@pytest.mark.parametrize("rate", [8000, 44100])
def test_log_mel_spectrogram_refuses_other_sampling_rates(rate):
    with pytest.raises(ConfigError, match=str(rate)):
        log_mel_spectrogram(speech_like(1000), sampling_rate=rate)


@pytest.mark.parametrize(
    ("windows", "valid", "message"),
    [
        (torch.zeros(2, 1000), [1000, 1000], "shape"),
        (torch.zeros(0, WINDOW_SAMPLES), [], "shape"),
        (torch.zeros(WINDOW_SAMPLES), [10], "shape"),
        (torch.zeros(2, WINDOW_SAMPLES), [10], "one integer per window"),
        (torch.zeros(1, WINDOW_SAMPLES), [1.5], "one integer per window"),
        (torch.zeros(1, WINDOW_SAMPLES), [WINDOW_SAMPLES + 1], "lie in"),
        (torch.zeros(1, WINDOW_SAMPLES), [-1], "lie in"),
        (torch.zeros(1, WINDOW_SAMPLES, dtype=torch.int16), [10], "int16"),
    ],
)
def test_log_mel_windows_refuses_bad_input(windows, valid, message):
    with pytest.raises(AudioError, match=message):
        log_mel_windows(windows, valid)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    audio = speech_like(WINDOW_SAMPLES + 30_000)
    cpu_features, cpu_mask = log_mel_spectrogram(audio)
    cuda_features, cuda_mask = log_mel_spectrogram(audio, device="cuda")
    assert cuda_features.device.type == "cuda"
    assert (cuda_features.cpu() - cpu_features).abs().max().item() <= TOLERANCE
    assert torch.equal(cuda_mask.cpu(), cpu_mask)


def test_thread_settings_are_restored_and_results_do_not_depend_on_them(backend):
    audio = speech_like(WINDOW_SAMPLES + 77_000)
    threads = torch.get_num_threads()
    features, _ = log_mel_spectrogram(audio, backend=backend)
    assert torch.get_num_threads() == threads
    seen_by_new_thread = []
    worker = threading.Thread(target=lambda: seen_by_new_thread.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    assert seen_by_new_thread == [threads]
    torch.set_num_threads(1)
    try:
        single, _ = log_mel_spectrogram(audio, backend=backend)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, features)
