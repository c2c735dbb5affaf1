"""The prefill product of int4 layers on CPUs with AVX-512 VNNI (int4_gemm.cpp): building it, and its call.

    wanted()                          whether this CPU has AVX-512 VNNI, the instructions the kernel is for
    load_library()                    builds (first use) and loads int4_gemm.cpp; False, with one logged
                                      warning, when it cannot be built here (registry.py: "int4_prefill")
    int4_gemm_linear(x, w, scales, bias)   x (..., Kp) @ W.T + bias in x's dtype, for many rows of x

Why: a prompt's product is compute-bound. The activations rounded to int8 per group (the rounding of the
int4 decode loop, int4_gemv.cpp's quantize_int8) multiply the weights' 4-bit values exactly in int32, 64
products per instruction against the 32 of the bf16 dot product that a bf16 layer's prefill runs on, so an
int4 layer's prompt costs no more than a bf16 one's although its weights are unpacked for every call.
tools/bench_int4.py races it against the bf16 tiles (bf16_tiles.py), the streaming loop and a bf16 layer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cpp_build import build_once, build_openmp_library

SOURCE = Path(__file__).with_name("int4_gemm.cpp")
EXTENSION_NAME = "minaf3_int4_gemm"


def wanted() -> bool:
    """Whether this CPU has AVX-512 with VNNI, the instructions the kernel is written for."""
    return torch.cpu._is_avx512_supported() and torch.cpu._is_vnni_supported()


def _build() -> bool:
    """Build (first time) and load int4_gemm.cpp; True when torch.ops.minaf3_int4_gemm.int4_gemm is ready."""
    if not build_openmp_library(EXTENSION_NAME, SOURCE, "int4 prefill kernel"):
        return False

    @torch.library.register_fake("minaf3_int4_gemm::int4_gemm")
    def _(xq, xs, w, scales, bias, dtype):
        return xq.new_empty(*xq.shape[:-1], w.shape[0], dtype=dtype)

    return True


load_library = build_once(_build)


def int4_gemm_linear(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., Kp) float32 or bfloat16 @ W.T + bias (N,) -> (..., N) in x's dtype, for the int4 weight
    (kernels/int4_linear.py's layout). Needs both libraries (registry: "int4" and "int4_prefill")."""
    G = 2 * weight.shape[1] // scales.shape[1]
    xq, xs = torch.ops.minaf3_int4.quantize_int8(x, G)
    bias32 = None if bias is None else bias.float()
    return torch.ops.minaf3_int4_gemm.int4_gemm(xq, xs, weight, scales, bias32, x.dtype)
