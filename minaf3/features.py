"""Log-mel features of 30 s windows, fast: Whisper's front end batched over windows, in torch or C++.

What the features are is defined in mel.py (its constants, the mel filters, and `reference_log_mel`, the
plain dozen lines: read it first). This module computes the same numbers, arranged for speed:
- nothing is padded or copied: all but a few frames per window lie inside its real samples and are one
  overlapping strided view of the waveform; the others (the first two, the last few) read reflected or
  zero samples and are gathered, for all windows at once, into one small extra batch;
- frames go through in cache-sized blocks: windowing, rfft, power, mel and log of a block stay in cache
  instead of streaming ~100 MB intermediates through memory, and each block's mel rows are written
  straight into the output; on CPU, the blocks are shared out to one Python thread per torch thread;
- the mel filters are triangles a few bins wide, so the mel product runs per band of 16 filters over only
  the bins they touch (an eighth of the dense multiply-adds);
- frames that see only padding are not computed: their power is exactly 0, so their log-mel is a constant.

On CPU the default is the C++ kernel of kernels/log_mel.cpp, which runs all of it per frame in one pass,
several times faster (README, tools/bench_frontend.py); this module hands it the Hann window and the mel
filters. The torch path below is the one it is tested against, the path for CUDA, and the fallback where
the kernel cannot be built. `backend=` chooses: "auto" (default), "cpp" or "torch"; when it is not given,
the environment variable MINAF3_LOG_MEL_BACKEND does.
"""

import functools
import threading

import torch

from minaf3.errors import AudioError, ConfigError
from minaf3.kernels import log_mel as kernel
from minaf3.kernels.registry import runs
from minaf3.mel import (
    DYNAMIC_RANGE,
    LOG_FLOOR,
    PAD,
    check_windows,
    float_samples,
    frame_mask,
    mel_filters,
)
from minaf3.windows import (
    FRAMES_PER_WINDOW,
    HOP_LENGTH,
    N_FFT,
    N_MELS,
    SAMPLING_RATE,
    WINDOW_SAMPLES,
    check_sampling_rate,
    window_bounds,
)

# Frame t reads samples [160 t - 200, 160 t + 200): frames 0 and 1 start before the window's first sample
# and read reflected ones, so the first frame inside the window is ceil(200 / 160) = 2. The fast paths read
# frames from it on straight from the waveform and build the earlier ones (and the last few) one by one.
FIRST_DIRECT_FRAME = -(-PAD // HOP_LENGTH)
BAND_FILTERS = 16  # mel filters per band of the banded mel product
# Frames per block on CPU: half a window. A thread's 2.4 MB of frames and 2.4 MB of spectrum stay in
# cache from one op to the next (tools/bench_frontend.py measures it).
CPU_BLOCK_FRAMES = 1500
CUDA_BLOCK_FRAMES = FRAMES_PER_WINDOW  # a GPU wants few, large launches: one block per window


@functools.cache  # per device
def _mel_bands(device: torch.device) -> list[tuple[int, int, int, int, torch.Tensor]]:
    """The filter bank cut into bands of 16 filters: (first mel, end mel, first bin, end bin, weights).

    weights: (band mels, band bins) float32, the only nonzero block of those filters.
    """
    filters = mel_filters()  # (128, 201)
    bands = []
    for m0 in range(0, N_MELS, BAND_FILTERS):
        m1 = min(m0 + BAND_FILTERS, N_MELS)
        used = torch.nonzero(filters[m0:m1].any(dim=0)).flatten()
        b0, b1 = int(used[0]), int(used[-1]) + 1
        bands.append((m0, m1, b0, b1, filters[m0:m1, b0:b1].contiguous().to(device)))
    return bands


def _scaled_log(x: torch.Tensor) -> torch.Tensor:
    """(log10(x) + 4) / 4 in place: Whisper's log and scaling. Its 1e-10 floor and its clamp at the window
    maximum - 8 are applied together at the end, as one clamp of the scaled values (zero power gives -inf).
    """
    return x.log10_().add_(4.0).div_(4.0)


# -1.5: (log10(1e-10) + 4) / 4, the floor of every value and the whole log-mel of a frame of padding
PADDING_LOG_MEL = float(_scaled_log(torch.tensor([LOG_FLOOR])))


def computed_frames(valid_samples: int) -> int:
    """Frames of a window that see a real sample: ceil((valid + 200) / 160), at most 3000; 0 if valid is 0.

    Frame t reads samples [160 t - 200, 160 t + 200) (reflected at the window's ends), so later frames read
    only zero padding. More than the mask's ceil(valid / 160), which counts frames centred on real samples.
    """
    if valid_samples == 0:
        return 0
    return min(FRAMES_PER_WINDOW, -(-(valid_samples + PAD) // HOP_LENGTH))


def _direct_end(valid_samples: int, count: int) -> int:
    """End of a window's direct frames: frames from FIRST_DIRECT_FRAME on whose 400 samples lie inside its
    real samples.

    Frame t reads samples [160 t - 200, 160 t + 200): direct while 160 t + 200 <= valid. The others (two
    at the start, a few at the end) read reflected or zero-padded samples and are built one by one.
    """
    return min(count, max(FIRST_DIRECT_FRAME, (valid_samples - PAD) // HOP_LENGTH + 1))


def _blocks(valid: list[int], counts: list[int], block_frames: int) -> list[tuple[int, int, int]]:
    """(window, first frame, end frame): each window's direct frames in blocks of near-equal size."""
    blocks = []
    for w, (v, count) in enumerate(zip(valid, counts, strict=True)):
        start, end = FIRST_DIRECT_FRAME, _direct_end(v, count)
        if end <= start:
            continue
        pieces = -(-(end - start) // block_frames)
        bounds = [start + (end - start) * i // pieces for i in range(pieces + 1)]
        blocks += [(w, t0, t1) for t0, t1 in zip(bounds, bounds[1:], strict=False)]
    return blocks


def _edge_frames(source: torch.Tensor, valid: torch.Tensor, window: torch.Tensor, frame: torch.Tensor):
    """The 400 samples of frames (window[i], frame[i]) as the reference pads them: (E, 400).

    Padded position p = 160 t + k holds sample j = p - 200 of the window, reflected into [0, 480000)
    without repeating the edge sample, and zero if j is past the window's real samples.
    """
    j = frame[:, None] * HOP_LENGTH + torch.arange(N_FFT, device=source.device) - PAD  # (E, 400)
    j = j.abs()  # left reflection: x[-j]
    j = torch.where(j >= WINDOW_SAMPLES, 2 * (WINDOW_SAMPLES - 1) - j, j)  # right reflection
    index = (window[:, None] * WINDOW_SAMPLES + j).clamp_(max=source.shape[0] - 1)
    return torch.where(j < valid[window][:, None], source[index], 0.0)


def _log_mel_into(windowed: torch.Tensor, out: torch.Tensor) -> None:
    """(n, 400) windowed frames -> scaled log-mel written into out, a (128, n) view of the output."""
    spectrum = torch.view_as_real(torch.fft.rfft(windowed)).flatten(1)  # (n, 201) complex -> (n, 402) real
    # |X|^2: square the interleaved (re, im) pairs in one contiguous pass, then add each pair.
    squares = spectrum.mul_(spectrum)
    power = torch.add(squares[:, 0::2], squares[:, 1::2])  # (n, 402) -> (n, 201)
    for m0, m1, b0, b1, weights in _mel_bands(out.device):
        # (band mels, band bins) @ (band bins, n) -> the band's rows of the output, in place
        torch.mm(weights, power[:, b0:b1].T, out=out[m0:m1])
    _scaled_log(out)


def _run_on_threads(tasks: list, run) -> None:
    """Call run(task) for every task, on torch.get_num_threads() Python threads with one torch thread each.

    Why not torch's own intra-op threads: a block is ~20 small ops, and each op ends in a thread barrier.
    On a busy machine a barrier waits milliseconds for a descheduled thread, every time. Threads that take
    whole blocks from a shared iterator meet only at the end; torch releases the GIL inside ops, so they run
    in parallel, and a loaded machine slows them far less. torch.set_num_threads(1) acts on the calling
    thread, except for the default that a thread first using torch meanwhile would pick up, and is
    restored on exit.
    """
    saved = torch.get_num_threads()
    shared, errors = iter(tasks), []

    def worker() -> None:
        torch.set_num_threads(1)
        try:
            for task in shared:  # list iterators hand out each task once, even across threads
                run(task)
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)
        finally:
            torch.set_num_threads(saved)

    helpers = [threading.Thread(target=worker, daemon=True) for _ in range(min(saved, len(tasks)) - 1)]
    for helper in helpers:
        helper.start()
    worker()
    for helper in helpers:
        helper.join()
    if errors:
        raise errors[0]


def _scaled_log_mel(source: torch.Tensor, valid: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Flat float32 source -> (W, 128, 3000) scaled log-mel, unclamped; frames past counts[w] unset."""
    device, n_windows, valid_list = source.device, len(counts), valid.tolist()
    hann = torch.hann_window(N_FFT, periodic=True, device=device)
    out = torch.empty(n_windows, N_MELS, FRAMES_PER_WINDOW, device=device)

    # Direct frames straight from the source, no padded copy: frame t of window w starts at sample
    # 480000 w + 160 t - 200, so row i of this overlapping view is global frame i + FIRST_DIRECT_FRAME.
    first = FIRST_DIRECT_FRAME * HOP_LENGTH - PAD  # sample 120, where frame 2 starts
    rows = max(0, (source.shape[0] - first - N_FFT) // HOP_LENGTH + 1)
    direct = source.as_strided((rows, N_FFT), (HOP_LENGTH, 1), source.storage_offset() + first)

    def run(block: tuple[int, int, int]) -> None:
        w, t0, t1 = block
        row = w * FRAMES_PER_WINDOW - FIRST_DIRECT_FRAME
        _log_mel_into(direct[row + t0 : row + t1] * hann, out[w, :, t0:t1])

    if device.type == "cuda":  # few, large blocks on one stream
        for block in _blocks(valid_list, counts, CUDA_BLOCK_FRAMES):
            run(block)
    else:
        _run_on_threads(_blocks(valid_list, counts, CPU_BLOCK_FRAMES), run)

    # Edge frames of every window in one batch: those before the first direct one and those past the last.
    edges = [
        (w, t)
        for w, (v, count) in enumerate(zip(valid_list, counts, strict=True))
        for t in [*range(min(FIRST_DIRECT_FRAME, count)), *range(_direct_end(v, count), count)]
    ]
    if edges:
        window, frame = torch.tensor(edges, device=device).T
        edge_log_mel = torch.empty(N_MELS, len(edges), device=device)
        _log_mel_into(_edge_frames(source, valid, window, frame) * hann, edge_log_mel)
        out[window, :, frame] = edge_log_mel.T  # (128, E) -> (E, 128)
    return out


def _clamp_to_window_max(features: torch.Tensor, counts: list[int]) -> int | None:
    """Fill each window's padding frames, then apply Whisper's floor and clamp, in place.

    Reference: y = max(log, -1.5), then max(y, window max of y - 2) (in scaled units). With the floored
    maximum m, that is one clamp at max(m - 2, -1.5). A NaN or Inf anywhere in a window reaches m, so
    checking it is a free test for bad samples: returns the first window whose maximum is not finite
    (left unclamped), else None.
    """
    for w, count in enumerate(counts):
        features[w, :, count:] = PADDING_LOG_MEL
    top = features.amax(dim=(1, 2)).clamp_(min=PADDING_LOG_MEL)  # (W,); clamp keeps NaN
    bad = torch.nonzero(~torch.isfinite(top))
    if bad.numel():
        return int(bad[0])
    floor = (top - DYNAMIC_RANGE / 4).clamp_(min=PADDING_LOG_MEL)
    features.clamp_(min=floor[:, None, None])
    return None


class SampleError(AudioError):
    """A window whose log-mel is not finite, and the sample to blame: `window`, `sample` (its offset in
    the window) and `problem` (what is wrong with it, e.g. "is nan (...)"), so that callers which cut the
    windows from clips can name the clip and the sample's offset in it instead."""

    def __init__(self, window: int, sample: int, problem: str):
        super().__init__(f"window {window}, sample {sample} {problem}")
        self.window, self.sample, self.problem = window, sample, problem


def _blame_sample(source: torch.Tensor, window: int, valid: int) -> SampleError:
    """The error for a window whose log-mel is not finite: its first NaN or Inf sample, or, when all its
    samples are finite, its largest one, whose power overflowed float32 (samples near 1e17 and up)."""
    samples = source[window * WINDOW_SAMPLES : window * WINDOW_SAMPLES + valid].cpu()
    finite = torch.isfinite(samples)
    if not finite.all():
        first = int(torch.argmin(finite.to(torch.uint8)))
        return SampleError(window, first, f"is {float(samples[first])} (NaN or Inf samples are not audio)")
    peak = int(samples.abs().argmax())
    return SampleError(
        window,
        peak,
        f"is {float(samples[peak]):.3g}: samples this large overflow the float32 power spectrum (the "
        "reference's features are NaN); audio samples should lie in [-1, 1]",
    )


@functools.cache
def _kernel_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """What the C++ kernel multiplies by: the periodic Hann window (400,) and the mel filters (128, 201)."""
    return torch.hann_window(N_FFT, periodic=True), mel_filters()


def runs_kernel(device: torch.device, backend: str | None = None) -> bool:
    """Whether a front-end call on `device` runs the C++ kernel: "auto" and "cpp" do on the CPU where it
    builds. Raises ConfigError for an unknown backend, or for "cpp" where the kernel cannot run."""
    chosen = kernel.resolve_backend(backend)
    if chosen == "torch":
        return False
    if device.type == "cpu" and runs("log_mel"):
        return True
    if chosen == "cpp":
        why = (
            f"the tensors are on {device}" if device.type != "cpu" else "it could not be built (see the log)"
        )
        raise ConfigError(f"log-mel backend 'cpp' cannot run: {why}; use backend='torch' or 'auto'")
    return False


def _features(
    source: torch.Tensor, valid: torch.Tensor, backend: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat source + (W,) valid samples per window -> (features, mask); see log_mel_windows."""
    use_kernel = runs_kernel(source.device, backend)
    valid_list = valid.tolist()
    source = source.to(torch.float32).contiguous()
    if use_kernel:
        features = torch.empty(len(valid_list), N_MELS, FRAMES_PER_WINDOW)
        top = kernel.log_mel_into(source, valid_list, *_kernel_tables(), features)  # (W,) window maxima
        bad_windows = torch.nonzero(~torch.isfinite(top))
        bad = int(bad_windows[0]) if bad_windows.numel() else None
    else:
        counts = [computed_frames(v) for v in valid_list]
        features = _scaled_log_mel(source, valid, counts)
        bad = _clamp_to_window_max(features, counts)
    if bad is not None:
        raise _blame_sample(source, bad, valid_list[bad])
    return features, frame_mask(valid)


def log_mel_windows(
    windows, valid, device=None, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features of many 30 s windows at once: the processor's path.

    windows: (W, 480000) float samples at 16 kHz, zero-padded; samples past valid[w] are ignored.
    valid: (W,) integers in [0, 480000], the real samples of each window.
    device: where to compute; default: the device of `windows`. backend: "auto", "cpp" or "torch" (see
    the module docstring); default $MINAF3_LOG_MEL_BACKEND, else "auto".
    Returns features (W, 128, 3000) float32 and mask (W, 3000) int32 on that device. A window whose
    features are not finite (a NaN or Inf sample, or finite samples so large their power overflows)
    raises SampleError, an AudioError naming the window and the sample.
    """
    windows, valid = check_windows(windows, valid)
    device = torch.device(device) if device is not None else windows.device
    return _features(windows.to(device).reshape(-1), valid.to(device), backend)


def log_mel_spectrogram(
    audio, sampling_rate: int = SAMPLING_RATE, device=None, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features of one 16 kHz mono waveform, cut into 30 s windows as AF3's processor cuts it.

    audio: (num_samples,) float numpy array or torch tensor, as load_audio returns. Audio past 600 s is
    dropped with a logged warning. device: where to compute; default: the audio's (CPU for numpy).
    backend: "auto", "cpp" or "torch" (see the module docstring).
    Returns features (n_windows, 128, 3000) float32 and mask (n_windows, 3000) int32, 1 for frames that
    hold real samples.
    """
    check_sampling_rate(sampling_rate)
    audio = float_samples(audio, "audio")
    if audio.ndim != 1:
        raise AudioError(
            f"audio must be 1-D (num_samples,), got shape {tuple(audio.shape)}; load_audio downmixes"
        )
    if audio.shape[0] == 0:
        raise AudioError("audio contains no samples")
    device = torch.device(device) if device is not None else audio.device
    # window_bounds logs the reference's warning when it drops audio past 600 s
    valid = torch.tensor([end - start for start, end in window_bounds(audio.shape[0])], device=device)
    source = audio[: len(valid) * WINDOW_SAMPLES].to(device)
    try:
        return _features(source, valid, backend)
    except SampleError as exc:
        sample = exc.window * WINDOW_SAMPLES + exc.sample  # windows are consecutive 30 s of the audio
        raise AudioError(f"audio sample {sample} {exc.problem}") from None
