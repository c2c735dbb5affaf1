"""The prefill products of int4 and int8 layers on CPUs with AVX-512 VNNI (vnni_prefill.cpp).

    wanted()                               whether this CPU has AVX-512 VNNI, the instructions it is for
    load_library()                         builds (first use) and loads vnni_prefill.cpp; False, with one
                                           logged warning, when it cannot be built here
    int4_gemm_linear(x, w, scales, bias)   x (..., Kp) @ W.T + bias in x's dtype (int4_linear.py's layout)
    int8_gemm_linear(x, w, scales, bias)   x (..., K) @ (scales[:, None] * w).T + bias, K % 128 == 0
    ACTIVATION_GROUP                       the int8 layers' activations are rounded per this many columns

Both need int4_gemv.cpp's quantize_int8 too: registry.py's "vnni_prefill" is the two libraries.

Why: a prompt's product is compute-bound. The activations rounded to int8 per group (the rounding of the
int4 decode loop) multiply the weights' bytes exactly in int32, 64 products per instruction against the 32 of
the bf16 dot product that a bf16 layer's prefill runs on, so a quantized layer's prompt costs less than a
bf16 one's although its weights are unpacked for every call. tools/bench_int4.py and tools/bench_int8.py
race it against the bf16 tiles (bf16_tiles.py), the streaming loops and a bf16 layer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cpp_build import build_once, build_openmp_library

SOURCE = Path(__file__).with_name("vnni_prefill.cpp")
# int8 layers' activations: the int4 layers' group (int4_linear.GROUP_SIZE; why that size: see there).
ACTIVATION_GROUP = 32
ALIGN = 128  # the activations' width must be a multiple of this (quantize_int8's, as the int4 layers')
EXTENSION_NAME = "minaf3_vnni"


def wanted() -> bool:
    """Whether this CPU has AVX-512 with VNNI, the instructions the kernel is written for."""
    return torch.cpu._is_avx512_supported() and torch.cpu._is_vnni_supported()


def _build() -> bool:
    """Build (first time) and load vnni_prefill.cpp; True when torch.ops.minaf3_vnni's operators are ready."""
    if not build_openmp_library(EXTENSION_NAME, SOURCE, "int4 and int8 prefill kernel"):
        return False

    @torch.library.register_fake("minaf3_vnni::int4_gemm")
    def _(xq, xs, w, scales, bias, dtype):
        return xq.new_empty(*xq.shape[:-1], w.shape[0], dtype=dtype)

    @torch.library.register_fake("minaf3_vnni::int8_gemm")
    def _(xq, xs, w, scales, bias, dtype):
        return xq.new_empty(*xq.shape[:-1], w.shape[0], dtype=dtype)

    return True


load_library = build_once(_build)


def int4_gemm_linear(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., Kp) float32 or bfloat16 @ W.T + bias (N,) -> (..., N) in x's dtype, for the int4 weight
    (kernels/int4_linear.py's layout). Needs registry.available().vnni_prefill."""
    G = 2 * weight.shape[1] // scales.shape[1]
    xq, xs = torch.ops.minaf3_int4.quantize_int8(x, G)
    bias32 = None if bias is None else bias.float()
    return torch.ops.minaf3_vnni.int4_gemm(xq, xs, weight, scales, bias32, x.dtype)


def int8_gemm_linear(
    x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., K) float32 or bfloat16 @ (scales (N,)[:, None] * w_int8 (N, K)).T + bias (N,) -> (..., N) in
    x's dtype, for K a multiple of 128. Needs registry.available().vnni_prefill."""
    xq, xs = torch.ops.minaf3_int4.quantize_int8(x, ACTIVATION_GROUP)
    bias32 = None if bias is None else bias.float()
    return torch.ops.minaf3_vnni.int8_gemm(xq, xs, w_int8, scales.float(), bias32, x.dtype)
