"""Which kernels run here: the one place that builds, loads and reports them, resolved once per process.

    available()          -> Kernels: what this process runs; the first call builds the C++ kernels (side by
                            side, ~40 s on a machine's first use, with a notice) or loads them from the cache
    runs(name)           whether one kernel runs, building only it (for a caller that needs just that one)
    report()             one line per kernel: whether it runs, and if not, why
    override(**flags)    a context in which the named kernels run or not (tests and A/B measurements)

The layers ask `available()` where they choose a path (minaf3/linear.py, attention.py, quantize.py,
decoder.py): nothing is threaded through calls, and nothing is checked twice.
A torch.compile'd step reads the answer as a constant; generate resolves it before compiling, since tracing
cannot follow a build.

A kernel that cannot be built is never fatal: its torch path runs instead, and its warning (logged once by
cpp_build.py) says why.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from minaf3.errors import ConfigError

from . import bf16_tiles, cpp_build, cpu_attention, decode_ops, gemm, gemv, int4_gemv, log_mel, vnni_prefill


@dataclass(frozen=True)
class Kernels:
    """What runs in this process. Each field is True when the kernel is built, loaded and meant for here."""

    cpu_attention: bool  # cpu_attention.cpp: one query token over the filled slots of the static KV cache
    decode_ops: bool  # decode_ops.cpp: a decoder layer's element-wise steps (RMSNorm, RoPE + cache, SiLU)
    gemv: bool  # int8_gemv.cpp: streaming matrix-vector products over int8, bf16 or float32 weights
    gemm: bool  # gemm.cpp: blocked matrix products for many rows, on CPUs whose best vector unit is AVX2
    int4: bool  # int4_gemv.cpp: streaming products over int4 weights, for a few rows
    vnni_prefill: bool  # vnni_prefill.cpp: int4 and int8 products for many rows, on CPUs with AVX-512 VNNI
    bf16_prefill: bool  # bf16_tiles.cpp: int8 and int4 prefill as bf16 tiles, on CPUs with AVX-512 BF16
    log_mel: bool  # log_mel.cpp: the fused log-mel front end
    triton: bool  # triton importable, and a CUDA device to run it on

    def names(self) -> list[str]:
        return [field.name for field in dataclasses.fields(self)]


def _triton_runs() -> bool:
    # Importing triton costs a second: only where there is a GPU for it. (Tests run the Triton kernels on
    # the CPU under TRITON_INTERPRET=1 by asking for them: attention.use_backend("triton").)
    if not torch.cuda.is_available():
        return False
    from . import triton_common

    return triton_common.is_available()


def _bf16_prefill_runs() -> bool:
    # The tiles are made by AVX-512 BF16 code and multiplied by torch's bf16 product, in hardware there only.
    return torch.cpu._is_avx512_bf16_supported() and bf16_tiles.load_library()


def _vnni_prefill_runs() -> bool:
    # int8 activations (int4_gemv.cpp's quantize_int8) times int4 or int8 weights by the VNNI byte dot
    # product: on CPUs that have it only.
    return vnni_prefill.wanted() and int4_gemv.load_library() and vnni_prefill.load_library()


def _gemm_runs() -> bool:
    # gemm.cpp's 8-lane AVX2 code is measured against oneDNN only on AVX2 CPUs; on AVX-512 ones oneDNN runs.
    return gemm.wanted() and gemm.load_library()


# name -> the call that builds or loads it (each thread-safe, and decided once per process)
LOADERS = {
    "cpu_attention": cpu_attention.load_library,
    "decode_ops": decode_ops.load_library,
    "gemv": gemv.load_library,
    "gemm": _gemm_runs,
    "int4": int4_gemv.load_library,
    "vnni_prefill": _vnni_prefill_runs,
    "bf16_prefill": _bf16_prefill_runs,
    "log_mel": log_mel.load_extension,
    "triton": _triton_runs,
}
_runs: dict[str, bool] = {}  # what each kernel's loader answered, or what `override` says
_kernels: Kernels | None = None  # _runs as one object, once every kernel is resolved


def runs(name: str) -> bool:
    """Whether the kernel `name` runs here, building or loading only it (a caller that needs just one)."""
    if name not in _runs:
        _runs[name] = LOADERS[name]()
    return _runs[name]


def available() -> Kernels:
    """What runs in this process (see Kernels); resolved on the first call, cheap afterwards.

    Kernels not yet resolved are built or loaded side by side: a first build is one compiler process each.
    """
    global _kernels
    if _kernels is None:
        missing = [name for name in LOADERS if name not in _runs]
        answers = cpp_build.load_together(*(LOADERS[name] for name in missing))
        for name, answer in zip(missing, answers, strict=True):
            _runs.setdefault(name, answer)
        _kernels = Kernels(**{name: _runs[name] for name in LOADERS})
    return _kernels


def report() -> str:
    """One line per kernel: 'name: runs' or 'name: off (why)'."""
    kernels = available()
    why = {
        "gemm": "see the build warning" if gemm.wanted() else "meant for CPUs whose best vector unit is AVX2",
        "triton": "needs triton and a CUDA device",
        "vnni_prefill": "needs AVX-512 VNNI" if not vnni_prefill.wanted() else "see the build warning",
        "bf16_prefill": "needs AVX-512 BF16"
        if not torch.cpu._is_avx512_bf16_supported()
        else "see the build warning",
    }
    lines = []
    for name in kernels.names():
        reason = why.get(name, "see the build warning")
        lines.append(f"{name}: {'runs' if getattr(kernels, name) else f'off ({reason})'}")
    return "\n".join(lines)


@contextlib.contextmanager
def override(**flags: bool) -> Iterator[Kernels]:
    """Run the block as if the named kernels did (True) or did not (False) run here, e.g. gemm=True on a CPU
    it is not meant for, to compare paths. Process-wide, for tests and measurements: not for concurrent use.
    Raises ConfigError for an unknown kernel, or for True where the kernel cannot be built."""
    global _kernels
    before = available()
    unknown = sorted(set(flags) - set(LOADERS))
    if unknown:
        raise ConfigError(f"unknown kernels {unknown}; known: {list(LOADERS)}")
    builders = {**LOADERS, "gemm": gemm.load_library}  # gemm on any AVX2-capable CPU, when asked for
    cannot = [name for name, on in flags.items() if on and not builders[name]()]
    if cannot:
        raise ConfigError(f"kernels {cannot} cannot run here:\n{report()}")
    saved = dict(_runs)
    _runs.update(flags)
    _kernels = dataclasses.replace(before, **flags)
    try:
        yield _kernels
    finally:
        _runs.clear()
        _runs.update(saved)
        _kernels = before
