"""The C++ log-mel kernel (log_mel.cpp): Whisper's front end for CPU windows, every step of a frame fused.

    load_extension()                 builds and loads log_mel.cpp; False, with a logged note, when it
                                     cannot be built here (registry.py calls it)
    resolve_backend(backend)         "auto" | "cpp" | "torch", from the argument or $MINAF3_LOG_MEL_BACKEND
    log_mel_into(source, valid, hann, filters, out)
                                     runs it: (W, 128, 3000) clamped features into out, returns each
                                     window's maximum (W,)

minaf3/features.py calls it for CPU tensors where it runs (registry.runs("log_mel")) unless the backend is
"torch", and passes in what defines the
features (the Hann window and the mel filters, from minaf3/mel.py), so that this module depends on nothing in
minaf3 but its errors. The frame geometry is compiled into log_mel.cpp: 400-sample frames every 160 samples,
3000 frames per 480,000-sample window, 128 filters over 201 bins; it checks the shapes it is given against
it. The torch path of features.py, which the tests hold it to, runs on other devices and where no C++
compiler is found.

Why a kernel: the torch path spends most of its time in MKL's rfft (400 points is too short for MKL to
vectorise within a transform), in forming |X|^2 from interleaved pairs, in the banded mel product, in log10
and in the clamp, each a separate pass over memory. The kernel computes kLanes frames per vector register
through one Stockham FFT, so nothing is shuffled between lanes, multiplies only the nonzero weights of each
mel triangle, takes log2 from the exponent bits and clamps each window right after its last block, while it
is in cache. Its speed against the torch path and transformers: README, from tools/bench_frontend.py.

Accuracy: against float64 features, the kernel's float32 rounding error is of the same size as MKL's, so
its features differ from transformers' by about that much, within the tests' 1e-4 parity tolerance; the one
known case past it (a loud pure tone over noise far below it) is described in the README.
backend="torch" makes the same calls as transformers.

Building (cpp_build.py): compiled with ninja into torch's extension cache on first use, reloaded afterwards,
rebuilt when the source changes. The source uses GCC vector extensions, no intrinsics, so it compiles for any
CPU; the flags pick the widest vectors torch reports (AVX-512: 16 frames per register, AVX2: 8, else 4),
each under its own extension name so that machines sharing a cache do not load each other's build.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

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


def log_mel_into(
    source: torch.Tensor, valid: list[int], hann: torch.Tensor, filters: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Whisper's log-mel of W windows laid end to end in source, clamped, written into out.

    source: (>= 480000 (W - 1) + valid[W - 1],) contiguous float32 CPU samples, window w from 480000 w;
    samples of a window past valid[w] are never read. hann: (400,) float32, the STFT window. filters:
    (128, 201) float32, contiguous, one mel filter per row. out: (W, 128, 3000) float32, contiguous.
    Returns each window's maximum scaled log-mel, (W,) float32: a NaN or Inf there means the window's
    samples were not finite or overflowed the power, and its features are left unclamped. Needs the
    library (registry.runs("log_mel")).
    """
    return torch.ops.minaf3_log_mel.log_mel(source, valid, hann, filters, out)
