"""load_audio (minaf3/audio.py): parity with transformers' soundfile loader, every input kind, every error.

The audio files are written here with soundfile (WAV, FLAC, OGG, MP3) and read by both minaf3 and
transformers' `load_audio(path, backend="soundfile")`.
"""

import functools
import http.server
import re
import socket
import threading

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import speech_like

from minaf3 import audio
from minaf3.audio import load_audio
from minaf3.errors import AudioError, AudioFileError, ConfigError

RATES = [8000, 16000, 22050, 44100, 48000]
SECONDS = 0.5


def make_signal(kind: str, sampling_rate: int, channels: int) -> np.ndarray:
    """(samples,) or (samples, channels) float32 test audio: speech-like, silence, or clipped speech."""
    n = int(SECONDS * sampling_rate)
    tracks = [speech_like(n, sampling_rate, seed=c) * (1.0 - 0.4 * c) for c in range(channels)]
    signal = np.stack(tracks, axis=1)
    if kind == "silence":
        signal = np.zeros_like(signal)
    elif kind == "clipping":
        signal = np.clip(signal * 12.0, -1.0, 1.0)
    return signal[:, 0] if channels == 1 else signal


def write(tmp_path, name: str, signal: np.ndarray, sampling_rate: int, **kwargs):
    path = tmp_path / name
    sf.write(path, signal, sampling_rate, **kwargs)
    return path


def reference_load(path) -> np.ndarray:
    from transformers.audio_utils import load_audio as transformers_load_audio

    return transformers_load_audio(str(path), sampling_rate=16000, backend="soundfile")


def assert_matches_reference(path):
    ours, reference = load_audio(path), reference_load(path)
    assert ours.dtype == np.float32 and ours.ndim == 1
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("channels", [1, 2])
def test_speech_matches_reference(tmp_path, fmt, rate, channels):
    assert_matches_reference(write(tmp_path, f"a.{fmt}", make_signal("speech", rate, channels), rate))


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
@pytest.mark.parametrize("kind", ["silence", "clipping"])
@pytest.mark.parametrize("rate", [8000, 44100])
def test_silence_and_clipping_match_reference(tmp_path, fmt, kind, rate):
    assert_matches_reference(write(tmp_path, f"a.{fmt}", make_signal(kind, rate, 2), rate))


@pytest.mark.parametrize("rate", [16000, 48000])
@pytest.mark.parametrize("channels", [1, 2])
def test_ogg_matches_reference(tmp_path, rate, channels):
    assert_matches_reference(write(tmp_path, "a.ogg", make_signal("speech", rate, channels), rate))


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg"])  # not MP3: each block restarts its decoder
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_reading_in_blocks_equals_one_read(tmp_path, monkeypatch, fmt, channels):
    """Files are decoded in blocks (a header's frame count is not trusted for one allocation): block
    boundaries, even ones that split nothing evenly, change no sample."""
    path = write(tmp_path, f"a.{fmt}", make_signal("speech", 22050, channels), 22050)
    whole = load_audio(path)
    monkeypatch.setattr(audio, "READ_BLOCK_SAMPLES", 1001)
    np.testing.assert_array_equal(load_audio(path), whole)


def test_tensors_on_other_devices(monkeypatch):
    with pytest.raises(AudioError, match=r"^Tensor of shape \(8,\): is a meta tensor"):
        load_audio(torch.empty(8, device="meta"))
    clip = torch.from_numpy(speech_like(1000, 16000))
    if torch.cuda.is_available():  # moved to the CPU, samples unchanged
        np.testing.assert_array_equal(load_audio(clip.cuda()), clip.numpy())

    def unreachable(self, *args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(torch.Tensor, "cpu", unreachable)
    with pytest.raises(AudioError, match=r"^Tensor of shape \(1000,\): cannot copy .* \(device lost\)"):
        load_audio(clip)


def test_resampling_target_is_honoured(tmp_path):
    path = write(tmp_path, "a.wav", make_signal("speech", 16000, 1), 16000)
    assert load_audio(path, sampling_rate=8000).shape == (int(SECONDS * 8000),)


def test_path_str_bytes_and_file_object_agree(tmp_path):
    path = write(tmp_path, "a.flac", make_signal("speech", 44100, 2), 44100)
    expected = load_audio(path)
    np.testing.assert_array_equal(load_audio(str(path)), expected)
    np.testing.assert_array_equal(load_audio(path.read_bytes()), expected)
    np.testing.assert_array_equal(load_audio(bytearray(path.read_bytes())), expected)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(load_audio(f), expected)


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server over tmp_path: (base URL, folder)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()
    server.server_close()


def test_url_is_downloaded(http_root):
    base, folder = http_root
    path = write(folder, "clip.wav", make_signal("speech", 22050, 2), 22050)
    np.testing.assert_array_equal(load_audio(f"{base}/clip.wav"), load_audio(path))


def test_missing_url_names_the_url(http_root):
    base, _ = http_root
    with pytest.raises(AudioFileError, match=re.escape(f"{base}/missing.wav") + ".*404"):
        load_audio(f"{base}/missing.wav")


def test_unreachable_url_names_the_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/a.wav"
    with pytest.raises(AudioFileError, match=re.escape(url)):
        load_audio(url)


def test_float_arrays_pass_through_as_float32():
    signal = speech_like(1000, 16000)
    np.testing.assert_array_equal(load_audio(signal), signal)
    np.testing.assert_array_equal(load_audio(signal.astype(np.float64)), signal)
    np.testing.assert_array_equal(load_audio(torch.from_numpy(signal)), signal)
    assert load_audio(torch.from_numpy(signal).to(torch.bfloat16)).dtype == np.float32


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (np.int16, [-1.0, -0.5, 0.0, 32767 / 32768]),
        (np.int8, [-1.0, -0.5, 0.0, 127 / 128]),
        (np.int32, [-1.0, -0.5, 0.0, (2**31 - 1) / 2**31]),
    ],
)
def test_integer_pcm_is_scaled_to_unit_range(dtype, expected):
    info = np.iinfo(dtype)
    pcm = np.array([info.min, info.min // 2, 0, info.max], dtype=dtype)
    np.testing.assert_allclose(load_audio(pcm), expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(load_audio(torch.from_numpy(pcm)), expected, rtol=0, atol=1e-7)


def test_unsigned_8bit_is_centred():
    np.testing.assert_allclose(load_audio(np.array([0, 128, 255], np.uint8)), [-1.0, 0.0, 127 / 128])


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_two_dimensional_arrays_are_averaged_over_channels(layout):
    left, right = speech_like(800, 16000, seed=1), speech_like(800, 16000, seed=2)
    stacked = np.stack([left, right]) if layout == "channels_first" else np.stack([left, right], axis=1)
    np.testing.assert_allclose(load_audio(stacked), (left + right) / 2, atol=1e-7)
    np.testing.assert_allclose(load_audio(torch.from_numpy(stacked)), (left + right) / 2, atol=1e-7)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere.wav"
    with pytest.raises(AudioFileError, match=re.escape(str(path))):
        load_audio(path)


def test_directory_is_not_audio(tmp_path):
    with pytest.raises(AudioFileError, match="directory"):
        load_audio(tmp_path)


@pytest.mark.parametrize(
    ("fmt", "keep"), [("wav", 20), ("wav", 0.5), ("flac", 0.5), ("mp3", 0.5), ("ogg", 0.5)]
)
def test_truncated_files_are_refused(tmp_path, fmt, keep):
    whole = write(tmp_path, f"whole.{fmt}", make_signal("speech", 16000, 1), 16000).read_bytes()
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(whole[: keep if isinstance(keep, int) else int(len(whole) * keep)])
    with pytest.raises(AudioError, match=re.escape(str(path))):
        load_audio(path)


def test_wav_with_unset_length_still_loads(tmp_path):
    """Streaming writers leave the data length at 0xFFFFFFFF: that is not a truncation."""
    path = write(tmp_path, "a.wav", make_signal("speech", 16000, 1), 16000)
    data = bytearray(path.read_bytes())
    data_chunk = data.index(b"data")
    data[data_chunk + 4 : data_chunk + 8] = (0xFFFFFFFF).to_bytes(4, "little")
    streamed = tmp_path / "streamed.wav"
    streamed.write_bytes(bytes(data))
    np.testing.assert_array_equal(load_audio(streamed), load_audio(path))


def test_random_bytes_are_refused(tmp_path):
    noise = np.random.default_rng(0).bytes(4096)
    path = tmp_path / "noise.wav"
    path.write_bytes(noise)
    with pytest.raises(AudioError, match=re.escape(str(path)) + ".*cannot decode"):
        load_audio(path)
    with pytest.raises(AudioError, match="4096 bytes"):
        load_audio(noise)


def test_empty_sources_are_refused(tmp_path):
    empty_file = tmp_path / "empty.wav"
    empty_file.write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        load_audio(empty_file)
    no_frames = write(tmp_path, "none.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match=re.escape(str(no_frames)) + ".*no audio samples"):
        load_audio(no_frames)
    with pytest.raises(AudioError, match="no audio samples"):
        load_audio(np.zeros((2, 0), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_refused(tmp_path, bad):
    signal = speech_like(1000, 16000)
    signal[10] = bad
    with pytest.raises(AudioError, match="sample 10"):
        load_audio(signal)
    path = write(tmp_path, "float.wav", signal, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=re.escape(str(path))):
        load_audio(path)


def test_three_dimensional_arrays_are_refused():
    with pytest.raises(AudioError, match="3-D"):
        load_audio(np.zeros((2, 2, 100), np.float32))


def test_batches_are_not_mistaken_for_channels():
    with pytest.raises(AudioError, match="batch"):
        load_audio(np.zeros((64, 16000), np.float32))


@pytest.mark.parametrize("source", [3, 1.5, None, [0.0, 0.1], {"array": []}])
def test_unsupported_source_types_are_refused(source):
    with pytest.raises(AudioError, match=type(source).__name__):
        load_audio(source)


@pytest.mark.parametrize("array", [np.array([True, False]), np.zeros(4, np.int64), np.zeros(4, np.complex64)])
def test_unsupported_sample_dtypes_are_refused(array):
    with pytest.raises(AudioError, match=str(array.dtype)):
        load_audio(array)


def test_text_mode_file_objects_are_refused(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("not audio")
    with open(path) as f, pytest.raises(AudioError, match="binary mode"):
        load_audio(f)


@pytest.mark.parametrize("rate", [0, -16000, 16000.0, "16k", True, None])
def test_bad_sampling_rates_are_refused(rate):
    with pytest.raises(ConfigError, match="sampling_rate"):
        load_audio(np.zeros(10, np.float32), sampling_rate=rate)
