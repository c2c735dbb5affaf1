"""The C++ log-mel kernel (kernels/log_mel.cpp) against the torch path of minaf3/features.py.

The torch path is held to WhisperFeatureExtractor in test_features.py; here the kernel is compared with it
on hypothesis-chosen windows (any lengths, any loudness, NaN past the real samples), its backend switch and
its own guards are tested, and its builds for narrower vectors the way CI meets a build (a fresh extension
folder), and with the compiler missing.
"""

import pytest
import torch
from conftest import run_python, speech_like
from hypothesis import given, settings
from hypothesis import strategies as st
from minaf3.kernels import log_mel as kernel
from minaf3.kernels.registry import override, runs
from test_features import TOLERANCE

from minaf3.errors import ConfigError
from minaf3.features import PADDING_LOG_MEL, computed_frames, log_mel_spectrogram, log_mel_windows
from minaf3.mel import mel_filters
from minaf3.windows import FRAMES_PER_WINDOW, HOP_LENGTH, N_FFT, N_MELS, WINDOW_SAMPLES

# Valid sample counts where frames change kind: reflected at the start (< 200 real samples reach frame 2),
# direct, reflected at the end (the last 200 samples), zero-padded, or pure padding.
EDGE_LENGTHS = [0, 1, 2, 159, 160, 161, 199, 200, 201, 359, 360, 361, 2719, 2720, 2721, 479_799, 479_800]
EDGE_LENGTHS += [479_801, 479_839, 479_840, 479_841, WINDOW_SAMPLES - 1, WINDOW_SAMPLES]


@settings(max_examples=40, deadline=None)
@given(
    valid=st.lists(
        st.one_of(st.sampled_from(EDGE_LENGTHS), st.integers(0, WINDOW_SAMPLES)), min_size=1, max_size=3
    ),
    loudness=st.floats(1e-4, 30.0),
    seed=st.integers(0, 2**16),
)
def test_cpp_kernel_matches_torch_path(valid, loudness, seed):
    """Any window lengths, any loudness, NaN past the real samples: the two backends agree."""
    windows = torch.full((len(valid), WINDOW_SAMPLES), float("nan"))
    for w, v in enumerate(valid):
        windows[w, :v] = torch.from_numpy(speech_like(v, seed=seed + w)) * loudness
    features, mask = log_mel_windows(windows, valid, backend="cpp")
    expected, expected_mask = log_mel_windows(windows, valid, backend="torch")
    assert (features - expected).abs().max().item() <= TOLERANCE
    assert torch.equal(mask, expected_mask)


def test_cpp_kernel_fills_padding_frames_with_the_window_floor():
    """Frames past the computed ones are not computed, only set: to the floor, max(top - 2, -1.5)."""
    valid = [HOP_LENGTH * 100, 0]
    windows = torch.zeros(2, WINDOW_SAMPLES)
    windows[0, : valid[0]] = torch.from_numpy(speech_like(valid[0]))
    features, _ = log_mel_windows(windows, valid, backend="cpp")
    count = computed_frames(valid[0])
    floor = max(features[0].max().item() - 2.0, PADDING_LOG_MEL)
    assert torch.equal(features[0, :, count:], torch.full_like(features[0, :, count:], floor))
    assert torch.equal(features[1], torch.full_like(features[1], PADDING_LOG_MEL))


def test_backend_switch_by_argument_and_environment(monkeypatch):
    calls = []
    run_kernel = kernel.log_mel_into
    monkeypatch.setattr(kernel, "log_mel_into", lambda *a: calls.append(1) or run_kernel(*a))
    audio = speech_like(5000)
    log_mel_spectrogram(audio)
    assert calls == [1]  # auto: the C++ kernel builds on this machine
    log_mel_spectrogram(audio, backend="torch")
    assert calls == [1]
    monkeypatch.setenv(kernel.BACKEND_ENV, "torch")
    log_mel_windows(torch.zeros(1, WINDOW_SAMPLES), [10])
    assert calls == [1]
    log_mel_windows(torch.zeros(1, WINDOW_SAMPLES), [10], backend="cpp")  # the argument wins
    assert calls == [1, 1]
    monkeypatch.setenv(kernel.BACKEND_ENV, "fast")
    with pytest.raises(ConfigError, match="MINAF3_LOG_MEL_BACKEND='fast'"):
        log_mel_spectrogram(audio)
    with pytest.raises(ConfigError, match="backend='gpu'"):
        log_mel_spectrogram(audio, backend="gpu")


def test_cpp_backend_refuses_when_the_kernel_cannot_run():
    with override(log_mel=False):
        with pytest.raises(ConfigError, match="log-mel backend 'cpp' cannot run: it could not be built"):
            log_mel_spectrogram(speech_like(5000), backend="cpp")
        features, _ = log_mel_spectrogram(speech_like(5000))  # auto: the torch path
    assert features.shape == (1, N_MELS, FRAMES_PER_WINDOW)


def test_kernel_refuses_windows_past_the_end_of_the_source():
    """The operator's own guard: a valid count reaching past the source would read outside it."""
    assert runs("log_mel")
    out = torch.empty(2, N_MELS, FRAMES_PER_WINDOW)
    with pytest.raises(RuntimeError, match="window 1 has 1000 valid samples, outside the source"):
        kernel.log_mel_into(
            torch.zeros(WINDOW_SAMPLES + 999),
            [WINDOW_SAMPLES, 1000],
            torch.hann_window(N_FFT),
            mel_filters(),
            out,
        )


CHECK_KERNEL = """
import logging, numpy as np
logging.basicConfig()
from minaf3.features import log_mel_spectrogram
from minaf3.kernels.registry import runs
audio = np.sin(np.arange(20_000) * 0.05).astype(np.float32)
err = (log_mel_spectrogram(audio)[0] - log_mel_spectrogram(audio, backend="torch")[0]).abs().max().item()
print("loaded", runs("log_mel"), "error", err)
"""


def test_missing_compiler_falls_back_with_a_note(tmp_path):
    done = run_python(CHECK_KERNEL, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-c++"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1:] == ["False", "error", "0.0"]  # both calls ran the torch path
    assert "log-mel kernel: building log_mel.cpp failed" in done.stderr
    assert "using the torch front end instead" in done.stderr


CHECK_BUILD = """
import os, torch
# The build for another CPU capability than this machine's: narrower vectors, the same results.
torch.backends.cpu.get_cpu_capability = lambda: os.environ["FORCED_CAPABILITY"]
from minaf3.features import log_mel_windows
from minaf3.kernels.log_mel import load_extension
valid = [1, 319, 20_000, 479_801, 480_000]
windows = torch.zeros(len(valid), 480_000)
for w, v in enumerate(valid):
    windows[w, :v] = torch.sin(torch.arange(v) * 0.05 * (w + 1)) * 0.5
cpp, torch_path = (log_mel_windows(windows, valid, backend=b)[0] for b in ("cpp", "torch"))
print(load_extension(), (cpp - torch_path).abs().max().item())
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("capability", "library"), [("AVX2", "minaf3_log_mel_avx2"), ("DEFAULT", "minaf3_log_mel")]
)
def test_narrower_vector_builds_match_the_torch_path(tmp_path, capability, library):
    """8 lanes (AVX2) and 4 (the compiler's default target): other CPUs' builds, run on this one, each
    built the way CI meets the kernel: an empty extension cache, ninja only beside the interpreter."""
    if capability == "AVX2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU cannot run AVX2 code")
    done = run_python(CHECK_BUILD, TORCH_EXTENSIONS_DIR=str(tmp_path), FORCED_CAPABILITY=capability)
    assert done.returncode == 0, done.stderr
    loaded, error = done.stdout.split()
    assert loaded == "True" and float(error) <= TOLERANCE, done.stdout + done.stderr
    assert list(tmp_path.rglob(f"{library}_*.so")), f"{library} was not built"
    assert "log-mel kernel: compiling log_mel.cpp (once per source, flags and environment" in done.stderr
