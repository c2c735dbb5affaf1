"""Any audio source to a mono float32 waveform at the model's sampling rate.

Files (WAV, FLAC, OGG, MP3 and whatever else libsndfile reads) are decoded with soundfile, downmixed by
averaging the channels and resampled with soxr at high quality, then padded or trimmed to
ceil(frames * sampling_rate / file_rate) samples. These are exactly the steps of transformers'
`load_audio(path, backend="soundfile")` (and of `librosa.load`), so the waveform matches it sample for sample.

Arrays are taken to be at `sampling_rate` already: they are only downmixed and converted to float32.
Bad input fails here with an AudioError or AudioFileError naming the source, never later as a shape error.
"""

import io
import math
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr
import torch

from minaf3.errors import AudioError, AudioFileError, ConfigError

URL_TIMEOUT_SECONDS = 30.0  # a download that stalls this long is reported instead of hanging the caller
RESAMPLE_QUALITY = "soxr_hq"  # soxr's default and librosa's: the reference resamples with it
# A 2-D array is (channels, samples) or (samples, channels); the smaller side is the channels. Past this
# many "channels" it is more likely a batch of clips than one recording (22.2 surround has 24 channels).
MAX_CHANNELS = 32
# Integer PCM -> [-1, 1): divide by the magnitude of the most negative code, after centring unsigned 8-bit
# (the WAV convention for 8-bit audio is unsigned with 128 as silence).
INT_SCALES = {np.int8: 2.0**7, np.int16: 2.0**15, np.int32: 2.0**31}
UINT8_OFFSET = 128
# libsndfile logs "data : <header length> (should be <length in file>)" when a WAV's data chunk is cut.
WAV_DATA_CUT = re.compile(r"^data : (?P<header>\d+) \(should be (?P<file>\d+)\)", re.MULTILINE)
WAV_UNKNOWN_LENGTHS = {0, 0xFFFFFFFF}  # streaming writers leave the length unset: not a truncation
# Samples (frames x channels) decoded per read: 256 MB of float32, so 10 min of 48 kHz stereo (57.6 M) is one
# read, exactly the reference's; and a bound on what a corrupt header can make us allocate up front.
READ_BLOCK_SAMPLES = 2**26

AudioSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | np.ndarray | torch.Tensor


def load_audio(source: AudioSource, sampling_rate: int = 16000) -> np.ndarray:
    """Load `source` as a mono float32 waveform of shape (num_samples,) at `sampling_rate` Hz.

    source: a file path (str or Path), an http(s) URL, the bytes of an audio file, a binary file object, or
    a numpy array / torch tensor of samples (1-D, or 2-D with channels first or last; int16 is scaled by
    1/32768). Arrays are not resampled: they must already be at `sampling_rate`.
    Raises ConfigError for a bad sampling_rate, AudioFileError when the source cannot be read (missing file,
    failed download) and AudioError when what was read is not usable audio (undecodable, truncated, empty,
    NaN or Inf samples, wrong shape or type).
    """
    if (
        isinstance(sampling_rate, bool)
        or not isinstance(sampling_rate, int | np.integer)
        or sampling_rate <= 0
    ):
        raise ConfigError(f"sampling_rate must be a positive integer (Hz), got {sampling_rate!r}")
    sampling_rate = int(sampling_rate)

    if isinstance(source, np.ndarray | torch.Tensor):
        name = f"{type(source).__name__} of shape {tuple(source.shape)}"
        waveform = _array_to_mono(source, name)
    elif isinstance(source, str) and source.startswith(("http://", "https://")):
        name = source
        waveform = _decode(_download(source), name, sampling_rate)
    elif isinstance(source, str | os.PathLike):
        name = os.fspath(source)
        waveform = _decode(_read_file(Path(name)), name, sampling_rate)
    elif isinstance(source, bytes | bytearray | memoryview):
        name = f"<{len(source)} bytes>"
        waveform = _decode(bytes(source), name, sampling_rate)
    elif hasattr(source, "read"):
        name = str(getattr(source, "name", "<file object>"))
        data = source.read()
        if not isinstance(data, bytes | bytearray):
            raise AudioError(
                f"{name}: file object returned {type(data).__name__}, open it in binary mode ('rb')"
            )
        waveform = _decode(bytes(data), name, sampling_rate)
    else:
        raise AudioError(
            f"unsupported audio source type {type(source).__name__}: expected a path, URL, bytes, "
            "binary file object, numpy array or torch tensor"
        )
    _check_samples(waveform, name)
    return waveform


def _read_file(path: Path) -> bytes:
    """The file's bytes, with missing files and directories reported as such rather than as decode errors."""
    if not path.exists():
        raise AudioFileError(f"{path}: no such audio file")
    if path.is_dir():
        raise AudioFileError(f"{path}: is a directory, not an audio file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AudioFileError(f"{path}: cannot read audio file ({exc.strerror or exc})") from exc


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_SECONDS) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise AudioFileError(f"{url}: download failed with HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AudioFileError(f"{url}: download failed ({reason})") from exc


def _decode(data: bytes, name: str, sampling_rate: int) -> np.ndarray:
    """Decode an audio file's bytes, downmix by averaging and resample with soxr: the reference's steps."""
    if not data:
        raise AudioError(f"{name}: is empty (0 bytes), not an audio file")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            file_rate, announced, header_log = f.samplerate, f.frames, f.extra_info
            waveform = _read_mono(f)
    except (sf.LibsndfileError, RuntimeError) as exc:
        reason = getattr(exc, "error_string", exc)  # libsndfile's own words, without the BytesIO repr
        raise AudioError(
            f"{name}: cannot decode audio ({reason}); is it a complete WAV, FLAC, OGG or MP3?"
        ) from exc
    # A stream cut short mid-file, or a corrupt header, still opens but yields fewer frames than announced.
    if 0 < waveform.shape[0] < announced:
        raise AudioError(
            f"{name}: decoded {waveform.shape[0]} of the {announced} frames its header announces; "
            "the file is truncated or corrupt"
        )
    # A WAV cut mid-data opens with its length silently shortened; libsndfile's header log still says so.
    cut = WAV_DATA_CUT.search(header_log)
    if cut and int(cut["header"]) not in WAV_UNKNOWN_LENGTHS and int(cut["header"]) > int(cut["file"]):
        raise AudioError(
            f"{name}: its header announces {cut['header']} bytes of audio but the file holds {cut['file']}; "
            "the file is truncated"
        )
    if waveform.shape[0] == 0:
        raise AudioError(f"{name}: contains no audio samples")
    if file_rate != sampling_rate:
        # soxr's output length can differ from the exact ratio by a sample; the reference pads/trims to ceil.
        num_samples = math.ceil(waveform.shape[0] * sampling_rate / file_rate)
        waveform = soxr.resample(waveform, file_rate, sampling_rate, quality=RESAMPLE_QUALITY)
        waveform = np.pad(waveform, (0, max(0, num_samples - len(waveform))))[:num_samples]
    return np.ascontiguousarray(waveform, dtype=np.float32)


def _read_mono(f: sf.SoundFile) -> np.ndarray:
    """The file's frames, channels averaged: (frames,) float32.

    Read in blocks, never as one array of the frame count the header announces: a corrupt MP3 or FLAC
    header can announce 10^12 frames, which would be allocated up front before a single one is decoded.
    Each block is downmixed as it arrives, so at most one block of all channels is held at a time. The
    mean over channels is per frame, so for WAV, FLAC and OGG blocks give the same samples as one read.
    MP3 differs slightly for a few ms after each block boundary (soundfile re-seeks after every read, and
    an MP3 seek restarts the decoder), which is why a block holds more than 10 minutes of audio.
    """
    block_frames = max(1, READ_BLOCK_SAMPLES // f.channels)
    blocks = []
    while True:
        block = f.read(block_frames, dtype="float32", always_2d=True)  # (frames, channels)
        if len(block) == 0:
            break
        # (frames, channels) -> (frames,)
        blocks.append(block.mean(axis=1) if f.channels > 1 else block[:, 0])
    if len(blocks) == 1:
        return blocks[0]
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


def _array_to_mono(array: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """1-D or 2-D samples (any real dtype) -> (samples,) float32, channels averaged."""
    if isinstance(array, torch.Tensor):
        if array.device.type == "meta":
            raise AudioError(f"{name}: is a meta tensor, which has a shape but no samples")
        try:
            array = array.detach().cpu()
        except (RuntimeError, NotImplementedError) as exc:
            raise AudioError(
                f"{name}: cannot copy samples from device {array.device} to the CPU ({exc})"
            ) from exc
        # numpy has no bfloat16; every other float widens exactly to float32 below.
        array = (array.float() if array.is_floating_point() else array).numpy()
    if array.ndim not in (1, 2):
        raise AudioError(
            f"{name}: audio arrays must be 1-D (samples,) or 2-D (channels, samples) / (samples, channels), "
            f"got {array.ndim}-D; pass one clip at a time"
        )
    if array.size == 0:
        raise AudioError(f"{name}: contains no audio samples")
    waveform = _to_float32(array, name)
    if waveform.ndim == 2:
        channels_axis = 0 if waveform.shape[0] <= waveform.shape[1] else 1
        if waveform.shape[channels_axis] > MAX_CHANNELS:
            raise AudioError(
                f"{name}: a 2-D audio array needs one side of at most {MAX_CHANNELS} channels; "
                "this looks like a batch of clips, pass them one at a time"
            )
        waveform = waveform.mean(axis=channels_axis)  # average the channels -> (samples,)
    return np.ascontiguousarray(waveform, dtype=np.float32)


def _to_float32(array: np.ndarray, name: str) -> np.ndarray:
    """Floats are cast; integer PCM is scaled to [-1, 1); anything else (bool, complex, int64) is refused."""
    if array.dtype == np.uint8:
        return (array.astype(np.float32) - UINT8_OFFSET) / UINT8_OFFSET
    for int_type, scale in INT_SCALES.items():
        if array.dtype == int_type:
            return (array.astype(np.float64) / scale).astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    raise AudioError(
        f"{name}: unsupported sample dtype {array.dtype}; use float samples in [-1, 1] or int8/16/32 PCM"
    )


def _check_samples(waveform: np.ndarray, name: str) -> None:
    if waveform.size == 0:
        raise AudioError(f"{name}: contains no audio samples")
    finite = np.isfinite(waveform)
    if not finite.all():
        first = int(np.argmin(finite))
        raise AudioError(f"{name}: sample {first} is {waveform[first]} (NaN or Inf samples are not audio)")
