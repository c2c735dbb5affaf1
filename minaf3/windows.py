"""30 s windows, the 600 s limit, mel frame counts and audio token counts: the frame math of AF3's front end.

Audio Flamingo 3 cuts a 16 kHz waveform into 30 s windows, turns each window into 3000 log-mel frames
(zero-padded past its real samples), runs the Whisper encoder on each window and keeps, per window, only the
pooled frames that saw real samples. One `<sound>` placeholder in the prompt expands into that many tokens.

    samples  --ceil(/160)-->  mel frames L  --conv2 stride 2-->  L1 = (L-1)//2+1  --pool 2-->  K = (L1-2)//2+1

A full window: 480,000 samples -> 3000 frames -> 1500 -> 750 tokens. Audio longer than 20 windows (600 s)
is cut to its first 600 s, with a logged warning, as the reference processor does; `kept_samples` is that
policy, and every caller that limits audio (the processor, chat's conversations, `window_bounds`) asks it.

The frame formulas (mel_frames, conv_frames, pooled_frames, audio_token_lengths) are written once and take
either one count (a Python or numpy integer, checked) or an integer tensor of counts, computed elementwise
with the same operators: the processor counts tokens with the first, the model and the encoder mask and crop
with the second, and a test holds the two to each other.
"""

import logging

import torch

from minaf3.errors import AudioError, ConfigError, InputError

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
TOKEN_SECONDS = WINDOW_SECONDS / TOKENS_PER_WINDOW  # 0.04: the audio one token stands for


def _check_count(num_samples: int, what: str = "num_samples") -> int:
    """Reject negative or non-integer sample counts early; numpy and torch integer scalars are accepted."""
    if isinstance(num_samples, bool) or not hasattr(num_samples, "__index__"):
        raise AudioError(f"{what} must be an integer, got {type(num_samples).__name__} {num_samples!r}")
    num_samples = int(num_samples)
    if num_samples < 0:
        raise AudioError(f"{what} must be >= 0, got {num_samples}")
    return num_samples


def _check_counts(counts: int | torch.Tensor, what: str) -> int | torch.Tensor:
    """An integer tensor of counts (one or more dimensions) as it is, else one count checked as above.

    A tensor's dtype is checked but not its values: reading them would wait for the device, and the model
    calls these on every forward with counts it computed itself.
    """
    if isinstance(counts, torch.Tensor) and counts.ndim > 0:
        if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
            raise AudioError(f"{what} must be an integer tensor, got {counts.dtype}")
        return counts
    return _check_count(counts, what)


def check_sampling_rate(sampling_rate: int) -> None:
    """The encoder's windows and frames are defined at 16 kHz: any other rate is a caller's mistake."""
    if sampling_rate != SAMPLING_RATE:
        raise ConfigError(
            f"sampling_rate must be {SAMPLING_RATE} Hz for AF3 features, got {sampling_rate!r}; "
            f"resample first, for example with load_audio(source, sampling_rate={SAMPLING_RATE})"
        )


# Message templates of kept_samples. `what` is "Audio", or "<name>: audio" for a named item; `seconds` the
# audio's length, `limit` the limit and `kept` what is kept, in seconds. The warning is the reference's.
CUT_WARNING = "{what} duration ({seconds:.1f}s) exceeds {limit}s; truncating to first {kept}s."
REFUSAL = "{what} is {seconds:.1f} s long; AF3 reads at most {limit} s per prompt"


def kept_samples(
    num_samples: int,
    name: str | None = None,
    *,
    refuse: bool = False,
    max_seconds: int = MAX_AUDIO_SECONDS,
    warning: str = CUT_WARNING,
    refusal: str = REFUSAL,
) -> int:
    """How many leading samples of `num_samples` AF3 reads: the one place the 600 s limit is decided.

    The limit is max_seconds (600 by default, the processor's max_audio_len) rounded down to whole 30 s
    windows, as the reference keeps whole windows only: 9,600,000 samples for 600 s. Audio up to it is kept
    whole. Longer audio is cut to it and `warning` is logged (by default the reference processor's words),
    or, with refuse=True, InputError(`refusal`) is raised instead. name: the item ("sample 0, audio 1"),
    put in front of either message. warning, refusal: str.format templates (see CUT_WARNING), so that a
    caller such as chat can tell its users what else they can do.
    """
    num_samples = _check_count(num_samples)
    limit = (max_seconds // WINDOW_SECONDS) * WINDOW_SAMPLES
    if num_samples <= limit:
        return num_samples
    words = {
        "what": f"{name}: audio" if name else "Audio",
        "seconds": num_samples / SAMPLING_RATE,
        "limit": max_seconds,
        "kept": limit // SAMPLING_RATE,
    }
    if refuse:
        raise InputError(refusal.format(**words))
    logger.warning(warning.format(**words))
    return limit


def num_windows(num_samples: int) -> int:
    """Number of 30 s windows for `num_samples` samples: ceil(n / 480000), at least 1, at most 20.

    Empty audio still gets one (all-padding) window, as in the reference.
    """
    num_samples = _check_count(num_samples)
    return min(max(1, -(-num_samples // WINDOW_SAMPLES)), MAX_WINDOWS)


def window_bounds(num_samples: int) -> list[tuple[int, int]]:
    """Sample ranges [start, end) of each window; the last may be short, and nothing past 600 s is kept
    (kept_samples logs the reference's warning when that drops audio)."""
    kept = kept_samples(num_samples)
    return [
        (start, min(start + WINDOW_SAMPLES, kept))
        for start in range(0, num_windows(kept) * WINDOW_SAMPLES, WINDOW_SAMPLES)
    ]


# ---- frame formulas: one count -> int, an integer tensor of counts -> a tensor of the same shape ----------


def mel_frames(valid_samples: int | torch.Tensor) -> int | torch.Tensor:
    """Mel frames that hold real samples in one window: ceil(valid / 160), from 0 to 3000.

    This is the number of ones in the window's `input_features_mask`. A count past one window is refused;
    a tensor's values are not checked.
    """
    valid_samples = _check_counts(valid_samples, "valid_samples")
    if isinstance(valid_samples, int) and valid_samples > WINDOW_SAMPLES:
        raise AudioError(f"valid_samples must be <= {WINDOW_SAMPLES} (one window), got {valid_samples}")
    return -(-valid_samples // HOP_LENGTH)


def conv_frames(mel: int | torch.Tensor) -> int | torch.Tensor:
    """Frames after the encoder's conv2 (kernel 3, stride 2, padding 1): (L - 1) // 2 + 1; 0 stays 0.

    These are the frames the encoder's attention lets through as keys.
    """
    mel = _check_counts(mel, "mel")
    return (mel - 1) // 2 + 1


def pooled_frames(conv: int | torch.Tensor) -> int | torch.Tensor:
    """Frames after AvgPool1d(2, 2): (L1 - 2) // 2 + 1, so 0 or 1 conv frames give 0 tokens."""
    conv = _check_counts(conv, "conv")
    return (conv - 2) // 2 + 1


def audio_token_lengths(mel_lengths: int | torch.Tensor) -> int | torch.Tensor:
    """Audio tokens of a window with L real mel frames: pooled_frames(conv_frames(L)), 750 for 3000.

    mel_lengths: one count, or (W,) int64 (the sums of input_features_mask's rows) -> (W,) int64.
    """
    return pooled_frames(conv_frames(mel_lengths))


def frames_needed(mel_lengths: torch.Tensor, num_frames: int) -> int:
    """How many leading mel frames a batch of windows needs so its audio tokens are exactly unchanged.

    mel_lengths: (W,) real mel frames per window; num_frames: the frames each window has (3000).
    A window with L real frames has L1 = conv_frames(L) frames after conv2; those read conv1 outputs up to
    2 * L1 - 1, which read mel frames up to 2 * L1. Cropping at 2 * L1 + 2 (even, so conv2's length is
    exactly half) leaves every real frame's receptive field intact; the later frames are padding that the
    attention masks out as keys anyway.
    """
    return min(num_frames, 2 * conv_frames(int(mel_lengths.max())) + 2)


def window_token_counts(num_samples: int) -> list[int]:
    """Audio tokens each window contributes: K(L1(L)) per window, 750 for a full one."""
    return [audio_token_lengths(mel_frames(end - start)) for start, end in window_bounds(num_samples)]


def audio_token_count(num_samples: int, sampling_rate: int = SAMPLING_RATE) -> int:
    """How many tokens one `<sound>` expands into for `num_samples` samples of 16 kHz audio.

    Equals the reference processor's count, which applies the conv/pool formulas to the summed mel length of
    all windows; the per-window sum used here is the same number because full windows hold 3000 frames, a
    multiple of 4. Logs a warning when the audio is longer than 600 s (it is cut, as in the reference).
    """
    check_sampling_rate(sampling_rate)
    return sum(window_token_counts(num_samples))
