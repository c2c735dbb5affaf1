"""Whisper's log-mel spectrogram, defined: its constants, the Slaney mel filters and the plain reference.

Per window of 480,000 samples at 16 kHz (zero-padded past its real samples):

    reflect-pad 200 | 3000 frames of 400 samples, hop 160 | periodic Hann | |rfft|^2 (201 bins)
    | 128 Slaney mel filters | log10(max(mel, 1e-10)) | max(x, window max - 8) | (x + 4) / 4

`reference_log_mel` is that pipeline in a dozen lines, as openai/whisper's audio.py writes it, and equals
transformers' WhisperFeatureExtractor(feature_size=128). It holds the whole spectrogram in memory at once;
features.py computes the same numbers fast (a torch path, and the C++ kernel of kernels/log_mel.cpp on the
CPU), and the tests hold every path to this one.
"""

import functools

import numpy as np
import torch

from minaf3.errors import AudioError
from minaf3.windows import (
    FRAMES_PER_WINDOW,
    HOP_LENGTH,
    N_FFT,
    N_MELS,
    SAMPLING_RATE,
    WINDOW_SAMPLES,
    mel_frames,
)

PAD = N_FFT // 2  # 200: torch.stft(center=True) reflect-pads half a frame on each side
N_BINS = N_FFT // 2 + 1  # 201 rfft bins, 0 to 8000 Hz in 40 Hz steps
LOG_FLOOR = 1e-10  # mel power floor before log10: -10, the value of a frame of pure padding
DYNAMIC_RANGE = 8.0  # log10 units kept below each window's maximum (80 dB)


def mel_filter_bank(
    n_bins: int = N_BINS, n_mels: int = N_MELS, sampling_rate: int = SAMPLING_RATE
) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters, (n_bins, n_mels) float64, 0 Hz to Nyquist.

    The Slaney scale is linear below 1 kHz (3 mels per 200 Hz) and logarithmic above (27 mels per factor
    6.4). Each triangle rises from the previous centre to its own and falls to the next; dividing by half
    its width in Hz gives every filter the same area. Same arithmetic, in the same order, as librosa and
    transformers' `mel_filter_bank(..., norm="slaney", mel_scale="slaney")`, so the result is bit-equal.
    """
    min_log_hz, min_log_mel = 1000.0, 15.0  # where the scale turns logarithmic: 1 kHz is mel 15
    mels_per_log = 27.0 / np.log(6.4)

    def hz_to_mel(hz: float) -> float:
        return 3.0 * hz / 200.0 if hz < min_log_hz else min_log_mel + np.log(hz / min_log_hz) * mels_per_log

    mels = np.linspace(hz_to_mel(0.0), hz_to_mel(sampling_rate / 2), n_mels + 2)
    # mel -> Hz for the n_mels + 2 triangle corners: the inverse of hz_to_mel
    corners = 200.0 * mels / 3.0
    log_region = mels >= min_log_mel
    corners[log_region] = min_log_hz * np.exp(np.log(6.4) / 27.0 * (mels[log_region] - min_log_mel))
    bin_hz = np.linspace(0, sampling_rate // 2, n_bins)

    slopes = corners[None, :] - bin_hz[:, None]  # (n_bins, n_mels + 2): each corner's distance from each bin
    widths = np.diff(corners)
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    filters = np.maximum(np.zeros(1), np.minimum(rising, falling))  # (n_bins, n_mels)
    return filters * (2.0 / (corners[2:] - corners[:-2]))[None, :]


@functools.cache
def mel_filters() -> torch.Tensor:
    """mel_filter_bank as every path multiplies by it: (128, 201) float32 on the CPU, one filter per row."""
    return torch.from_numpy(np.ascontiguousarray(mel_filter_bank().astype(np.float32).T))


def float_samples(data, what: str) -> torch.Tensor:
    """A numpy array or tensor of float samples as a tensor (no copy); AudioError naming `what` otherwise."""
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if not isinstance(data, torch.Tensor):
        raise AudioError(f"{what} must be a numpy array or torch tensor, got {type(data).__name__}")
    if not data.is_floating_point():
        raise AudioError(
            f"{what} must hold float samples in [-1, 1], got {data.dtype}; load_audio converts PCM"
        )
    return data


def check_windows(windows, valid) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows and their real sample counts as tensors: windows (W, 480000) float, valid (W,) int64 in
    [0, 480000]; AudioError saying what is wrong otherwise."""
    windows = float_samples(windows, "windows")
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] != WINDOW_SAMPLES:
        raise AudioError(f"windows must have shape (n >= 1, {WINDOW_SAMPLES}), got {tuple(windows.shape)}")
    valid = torch.as_tensor(valid)
    if valid.shape != windows.shape[:1] or valid.is_floating_point() or valid.dtype == torch.bool:
        raise AudioError(
            f"valid must hold one integer per window ({len(windows)}), got {valid.dtype} {tuple(valid.shape)}"
        )
    if valid.min() < 0 or valid.max() > WINDOW_SAMPLES:
        raise AudioError(f"valid sample counts must lie in [0, {WINDOW_SAMPLES}], got {valid.tolist()}")
    return windows, valid.long()


def frame_mask(valid: torch.Tensor) -> torch.Tensor:
    """(W,) valid samples -> (W, 3000) int32 mask: frames t < mel_frames(valid), centred on a real sample."""
    frame = torch.arange(FRAMES_PER_WINDOW, device=valid.device)
    return (frame < mel_frames(valid)[:, None]).to(torch.int32)


def reference_log_mel(windows, valid=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Whisper's log-mel of 30 s windows, written plainly: the definition every fast path is held to.

    windows: one window (480000,) or W windows (W, 480000) of float samples at 16 kHz. valid: the real
    samples of each (an integer, or (W,) integers; default: all of them); later samples are read as zeros,
    the processor's padding. Returns features (W, 128, 3000) float32 and mask (W, 3000) int32, the layout
    of features.log_mel_windows and of the model's input_features and input_features_mask.
    """
    windows = float_samples(windows, "windows").float()
    if windows.ndim == 1:  # one window: a batch of one
        windows, valid = windows[None], None if valid is None else [valid]
    windows, valid = check_windows(windows, [WINDOW_SAMPLES] * len(windows) if valid is None else valid)
    device = windows.device
    audio = torch.where(torch.arange(WINDOW_SAMPLES, device=device) < valid[:, None], windows, 0.0)
    window = torch.hann_window(N_FFT, device=device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)  # (W, 201, 3001)
    magnitudes = stft[..., :-1].abs() ** 2  # (W, 201, 3000): the STFT's last frame is dropped
    mel_spec = mel_filters().to(device) @ magnitudes  # (128, 201) @ (W, 201, 3000) -> (W, 128, 3000)
    log_spec = torch.clamp(mel_spec, min=LOG_FLOOR).log10()
    top = log_spec.amax(dim=(1, 2), keepdim=True)  # (W, 1, 1): each window's own maximum
    log_spec = torch.maximum(log_spec, top - DYNAMIC_RANGE)
    log_spec = (log_spec + 4.0) / 4.0
    return log_spec, frame_mask(valid)
