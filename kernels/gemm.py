"""The matrix product of gemm.cpp for many activation rows (float32 arithmetic on float32 or bf16 operands,
or on int8 weights with a scale per row): building it, and its entry points.

    gemm_reference(x, w, bias)   the definition: F.linear in float64 on the operands' values, as float32
    wanted()                     whether this CPU is one the kernel is for (its best vector unit is AVX2)
    load_library()               builds (first use) and loads gemm.cpp; False, with one logged warning, when
                                 it cannot be built here (registry.py calls it where wanted())
    gemm_linear(x, w, bias)      x (..., K) @ w (N, K).T + bias through the library, in x's dtype

The int8 operator, torch.ops.minaf3_gemm.int8_gemm(x, w_int8, scales, bias), is called by
kernels/int8_linear.py for an int8 layer's prefill; the int4 one, torch.ops.minaf3_gemm.int4_gemm(x, w,
scales, bias), by kernels/int4_linear.py.

minaf3/linear.py sends float32 and bf16 layers with more rows than a decode step (prefill, the audio
encoder, the projector) here on CPUs whose best vector unit is AVX2 (`wanted`). Why a kernel of our own: on
such CPUs it reaches a higher rate than both of torch's libraries (MKL, its default, and oneDNN) at the
shapes of a short prompt and the encoder, where their blocking is tuned for larger products; and bf16
operands, widened to float32 as they are packed, run at the float32 rate, where torch's bf16 products on a
CPU without bf16 instructions are emulated several times slower (the README's time-to-first-token rows, from
tools/bench.py, measure both). Where AVX-512 is present the kernel is not used: its 8-lane code has half the
peak of oneDNN's AVX-512 code on a core with two 512-bit FMA units.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from .cpp_build import build_once, build_openmp_library

SOURCE = Path(__file__).with_name("gemm.cpp")
EXTENSION_NAME = "minaf3_gemm"


def gemm_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ w (N, K).T + bias in float64 on the operands' values, returned as float32 (..., N): what
    the kernel computes, up to float32 rounding in its own order of summation."""
    return F.linear(x.double(), w.double(), None if bias is None else bias.double()).float()


@functools.cache
def wanted() -> bool:
    """Whether this CPU's best vector unit is AVX2, the one the kernel is written for and measured on."""
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


def _build() -> bool:
    """Build (first time) and load gemm.cpp; True when torch.ops.minaf3_gemm.f32_gemm is ready; False,
    with one logged warning, on a CPU without AVX2 or when the build fails. Decided once per process."""
    if not build_openmp_library(EXTENSION_NAME, SOURCE, "prefill matrix-product kernel"):
        return False

    @torch.library.register_fake("minaf3_gemm::f32_gemm")  # output shape, for torch.compile's tracing
    def _(x, w, bias):
        return x.new_empty(*x.shape[:-1], w.shape[0], dtype=torch.float32)

    @torch.library.register_fake("minaf3_gemm::int8_gemm")
    def _(x, w, scales, bias):
        return x.new_empty(*x.shape[:-1], w.shape[0], dtype=torch.float32)

    @torch.library.register_fake("minaf3_gemm::int4_gemm")
    def _(x, w, scales, bias):
        return x.new_empty(*x.shape[:-1], w.shape[0], dtype=torch.float32)

    return True


load_library = build_once(_build)


def gemm_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ w (N, K).T + bias on the CPU, x and w float32 or bf16, in float32 arithmetic ->
    (..., N) in x's dtype. Needs the library: registry.available().gemm."""
    y = torch.ops.minaf3_gemm.f32_gemm(x, w, None if bias is None else bias.float())
    return y.to(x.dtype)
