"""30 s windows, mel frame counts and audio token counts: the integer math of the AF3 front end.

Audio Flamingo 3 cuts a 16 kHz waveform into 30 s windows, turns each window into 3000 log-mel frames
(zero-padded past its real samples), runs the Whisper encoder on each window and keeps, per window, only the
pooled frames that saw real samples. One `<sound>` placeholder in the prompt expands into that many tokens.

    samples  --ceil(/160)-->  mel frames L  --conv2 stride 2-->  L1 = (L-1)//2+1  --pool 2-->  K = (L1-2)//2+1

A full window: 480,000 samples -> 3000 frames -> 1500 -> 750 tokens. Audio longer than 20 windows (600 s)
is cut to its first 600 s, with a logged warning, as the reference processor does. Every function here is
pure integer math on sample counts, so the processor, the feature extractor and the tests agree by
construction.
"""

import logging

from minaf3.errors import AudioError, ConfigError

logger = logging.getLogger(__name__)

SAMPLING_RATE = 16000  # Hz: the rate the Whisper encoder was trained on
WINDOW_SECONDS = 30  # one encoder input
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLING_RATE  # 480,000 samples per window
HOP_LENGTH = 160  # samples between STFT frames: 10 ms at 16 kHz
N_FFT = 400  # STFT frame length: 25 ms at 16 kHz, 201 frequency bins
N_MELS = 128  # mel filters (AF3's Whisper uses 128, not Whisper's original 80)
FRAMES_PER_WINDOW = WINDOW_SAMPLES // HOP_LENGTH  # 3000 mel frames per window (the STFT's 3001st is dropped)
MAX_AUDIO_SECONDS = 600  # the processor's max_audio_len
MAX_WINDOWS = MAX_AUDIO_SECONDS // WINDOW_SECONDS  # 20 windows
MAX_AUDIO_SAMPLES = MAX_WINDOWS * WINDOW_SAMPLES  # 9,600,000 samples
TOKENS_PER_WINDOW = FRAMES_PER_WINDOW // 4  # 750: conv2 halves the frames, the average pool halves them again


def _check_count(num_samples: int, what: str = "num_samples") -> int:
    """Reject negative or non-integer sample counts early; numpy and torch integer scalars are accepted."""
    if isinstance(num_samples, bool) or not hasattr(num_samples, "__index__"):
        raise AudioError(f"{what} must be an integer, got {type(num_samples).__name__} {num_samples!r}")
    num_samples = int(num_samples)
    if num_samples < 0:
        raise AudioError(f"{what} must be >= 0, got {num_samples}")
    return num_samples


def check_sampling_rate(sampling_rate: int) -> None:
    """The encoder's windows and frames are defined at 16 kHz: any other rate is a caller's mistake."""
    if sampling_rate != SAMPLING_RATE:
        raise ConfigError(
            f"sampling_rate must be {SAMPLING_RATE} Hz for AF3 features, got {sampling_rate!r}; "
            f"resample first, for example with load_audio(source, sampling_rate={SAMPLING_RATE})"
        )


def warn_if_truncated(num_samples: int, sampling_rate: int = SAMPLING_RATE) -> None:
    """Log the reference processor's warning when audio past 600 s is about to be dropped."""
    if num_samples > MAX_AUDIO_SAMPLES:
        logger.warning(
            "Audio duration (%.1fs) exceeds %ds; truncating to first %ds.",
            num_samples / sampling_rate,
            MAX_AUDIO_SECONDS,
            MAX_AUDIO_SECONDS,
        )


def num_windows(num_samples: int) -> int:
    """Number of 30 s windows for `num_samples` samples: ceil(n / 480000), at least 1, at most 20.

    Empty audio still gets one (all-padding) window, as in the reference.
    """
    num_samples = _check_count(num_samples)
    return min(max(1, -(-num_samples // WINDOW_SAMPLES)), MAX_WINDOWS)


def window_bounds(num_samples: int) -> list[tuple[int, int]]:
    """Sample ranges [start, end) of each window; the last may be short, and nothing past 600 s is kept."""
    num_samples = _check_count(num_samples)
    kept = min(num_samples, MAX_AUDIO_SAMPLES)
    return [
        (start, min(start + WINDOW_SAMPLES, kept))
        for start in range(0, num_windows(num_samples) * WINDOW_SAMPLES, WINDOW_SAMPLES)
    ]


def mel_frames(valid_samples: int) -> int:
    """Mel frames that hold real samples in one window: ceil(valid / 160), from 0 to 3000.

    This is the number of ones in the window's `input_features_mask`.
    """
    valid_samples = _check_count(valid_samples, "valid_samples")
    if valid_samples > WINDOW_SAMPLES:
        raise AudioError(f"valid_samples must be <= {WINDOW_SAMPLES} (one window), got {valid_samples}")
    return -(-valid_samples // HOP_LENGTH)


def conv_frames(mel: int) -> int:
    """Frames after the encoder's conv2 (kernel 3, stride 2, padding 1): (L - 1) // 2 + 1; 0 stays 0."""
    mel = _check_count(mel, "mel")
    return (mel - 1) // 2 + 1


def pooled_frames(conv: int) -> int:
    """Frames after AvgPool1d(2, 2): (L1 - 2) // 2 + 1, so 0 or 1 conv frames give 0 tokens."""
    conv = _check_count(conv, "conv")
    return (conv - 2) // 2 + 1


def window_token_counts(num_samples: int) -> list[int]:
    """Audio tokens each window contributes: K(L1(L)) per window, 750 for a full one."""
    return [pooled_frames(conv_frames(mel_frames(end - start))) for start, end in window_bounds(num_samples)]


def audio_token_count(num_samples: int, sampling_rate: int = SAMPLING_RATE) -> int:
    """How many tokens one `<sound>` expands into for `num_samples` samples of 16 kHz audio.

    Equals the reference processor's count, which applies the conv/pool formulas to the summed mel length of
    all windows; the per-window sum used here is the same number because full windows hold 3000 frames, a
    multiple of 4. Logs a warning when the audio is longer than 600 s (it is cut, as in the reference).
    """
    check_sampling_rate(sampling_rate)
    num_samples = _check_count(num_samples)
    warn_if_truncated(num_samples, sampling_rate)
    return sum(window_token_counts(num_samples))
