"""The C++ log-mel kernel (log_mel.cpp): Whisper's front end for CPU windows, every step of a frame fused.

    load_extension()                 builds and loads log_mel.cpp; False, with a logged note, when it
                                     cannot be built here
    use_kernel(device, backend)      whether a call runs the kernel: backend "auto" | "cpp" | "torch",
                                     from the argument or $MINAF3_LOG_MEL_BACKEND
    log_mel_into(source, valid, out) runs it: (W, 128, 3000) clamped features into out, returns each
                                     window's maximum (W,)

minaf3/features.py calls it for CPU tensors unless the backend is "torch"; its torch path stays the
reference and the path for other devices and for machines without a C++ compiler.

Why a kernel: measured on the 2-core AMD EPYC (Zen 4) CI machine, 10 minutes of audio (20 windows), torch
2.13, best of many interleaved calls (the machine is shared). The torch path, one thread, spends 22 ms in
MKL's rfft (400 points: too short for MKL to vectorise within a transform), 6 ms forming |X|^2 from
interleaved pairs, 8 ms in the banded mel product, 10 ms in log10 and 8 ms in the clamp, the padding and
the edge frames: 58 ms (37 ms on two threads). The kernel computes kLanes frames per vector register
through one Stockham FFT, so nothing is shuffled between lanes, multiplies only the nonzero weights of each
mel triangle (394 of 25,728 per frame), takes log2 from the exponent bits and clamps each window right
after its last block, while it is in cache: 21-22 ms on one thread, 11.6 ms on two (AVX-512; the AVX2
build, 8 lanes: 26 ms on one). Its time, by perf on one thread: FFT ~35%, log ~20%, power from the FFT
~15%, loading and transposing samples ~15%, mel ~10%, clamp ~4%. tools/bench_frontend.py (two threads,
quiet machine): log_mel_spectrogram 16 ms, transformers' WhisperFeatureExtractor 279 ms (17.5x).
Under load from other processes (two busy loops on the two cores) two threads took 16 ms best, 42 ms
upper quartile, against the torch path's 52 and 255 ms.

Accuracy: against float64 features, the kernel's error is the same as MKL's: float32 rounding of bins far
weaker than their frame's strongest, ~1e-5 to 7e-5 max abs on speech, noise, chirps, clipping; so it
differs from transformers' features (MKL's rounding) by about that much, within the 1e-4 parity tolerance.
The exception is a loud pure tone over noise 60-70 dB below it (0.9 sin(3 kHz) + 3e-4 noise): there MKL is
1.4e-4 from the float64 features and the kernel 1.2e-4, 1.4e-4 to 2e-4 apart. No float32 FFT other than
MKL's own can be held to 1e-4 of MKL there; backend="torch" matches transformers to ~1e-7 (same calls).

Building (cpp_build.py): compiled with ninja into torch's extension cache on first use, reloaded afterwards,
rebuilt when the source changes. The source uses GCC vector extensions, no intrinsics, so it compiles for any
CPU; the flags pick the widest vectors torch reports (AVX-512: 16 frames per register, AVX2: 8, else 4:
60 ms on one thread, the torch path's time), each under its own extension name so that machines sharing
a cache do not load each other's build.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch

from minaf3.errors import ConfigError
from minaf3.features import mel_filter_bank
from minaf3.windows import N_FFT

from . import cpp_build
from .cpp_build import BUILD_ERRORS, build_once, compile_library, failure_reason

logger = logging.getLogger(__name__)

BACKEND_ENV = "MINAF3_LOG_MEL_BACKEND"
SOURCE = Path(__file__).with_name("log_mel.cpp")
# -ffp-contract=fast: fused multiply-adds (ISO C++ mode forbids contracting a * b + c otherwise).
# -fopenmp: at::parallel_for is a plain serial call in code compiled without it (ATen/ParallelOpenMP.h);
# the library then links libgomp.so.1, which resolves to the copy torch has already loaded.
COMMON_FLAGS = ["-O3", "-ffp-contract=fast", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
# Vector flags per torch CPU capability; the names keep the builds apart in a shared extension cache.
ISA_FLAGS = {
    "AVX512": ("minaf3_log_mel_avx512", ["-mavx512f", "-mavx512dq", "-mavx2", "-mfma"]),
    "AVX2": ("minaf3_log_mel_avx2", ["-mavx2", "-mfma"]),
}
BASELINE = ("minaf3_log_mel", [])  # the compiler's default target (SSE2 on x86-64)


def _build() -> bool:
    """Build (first time) and load the C++ kernel; True when torch.ops.minaf3_log_mel.log_mel is ready.

    Returns False, logging one warning that says why and what runs instead, when the build fails (no C++
    compiler, no ninja, missing torch headers). Decided once per process.
    """
    name, isa_flags = ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), BASELINE)
    try:
        compile_library(name, SOURCE, COMMON_FLAGS + isa_flags, LINK_FLAGS, "log-mel kernel")
    except BUILD_ERRORS as e:
        logger.warning(
            "log-mel kernel: building %s failed (%s); using the torch front end instead (~3x slower). "
            "Install a C++ compiler and ninja to enable it.",
            SOURCE.name,
            failure_reason(e),
        )
        return False
    return True


load_extension = build_once(_build)


def resolve_backend(backend: str | None = None) -> str:
    """The backend a call will use: the argument, else $MINAF3_LOG_MEL_BACKEND, else "auto"."""
    return cpp_build.resolve_backend(backend, BACKEND_ENV)


def use_kernel(device: torch.device, backend: str | None = None) -> bool:
    """Whether a front-end call on `device` runs the kernel: "auto" and "cpp" do on CPU when it builds.

    Raises ConfigError for an unknown backend, or for "cpp" where the kernel cannot run.
    """
    chosen = resolve_backend(backend)
    if chosen == "torch":
        return False
    if device.type == "cpu" and load_extension():
        return True
    if chosen == "cpp":
        why = (
            f"the tensors are on {device}" if device.type != "cpu" else "it could not be built (see the log)"
        )
        raise ConfigError(f"log-mel backend 'cpp' cannot run: {why}; use backend='torch' or 'auto'")
    return False


@functools.cache
def _tables() -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's constants: the periodic Hann window (400,) and the mel filters (128, 201) float32."""
    filters = np.ascontiguousarray(mel_filter_bank().astype(np.float32).T)  # (201, 128) -> (128, 201)
    return torch.hann_window(N_FFT, periodic=True), torch.from_numpy(filters)


def log_mel_into(source: torch.Tensor, valid: list[int], out: torch.Tensor) -> torch.Tensor:
    """Whisper's log-mel of W windows laid end to end in source, clamped, written into out.

    source: (>= 480000 (W - 1) + valid[W - 1],) contiguous float32 CPU samples, window w from 480000 w;
    samples of a window past valid[w] are never read. out: (W, 128, 3000) float32, contiguous. Returns
    each window's maximum scaled log-mel, (W,) float32: a NaN or Inf there means the window's samples
    were not finite or overflowed the power, and its features are left unclamped. Call use_kernel() first.
    """
    return torch.ops.minaf3_log_mel.log_mel(source, valid, *_tables(), out)
