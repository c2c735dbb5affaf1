"""The streaming matrix-vector library of int8_gemv.cpp: building it, and its bf16 entry point.

    load_library()               builds (first use) and loads it; False, with one logged warning, when it
                                 cannot be built here
    bf16_linear(x, w, bias)      x (..., K) @ w (N, K).T + bias for bf16 weights, accumulated in float32

The library holds two operators over one streaming loop: minaf3_int8::int8_linear (int8 weights with a
scale per row; int8_linear.py) and minaf3_int8::bf16_linear. minaf3/linear.py sends bf16 layers with a few
rows (decode) through the latter: torch's bf16 matrix-vector products read ~20 GB/s on the 2-core CI
machine, this loop ~31 (a plain read ~33); official widths, 2 layers + lm_head, batch 1: 110 -> 53 ms/token.
This module imports nothing of torch.compile, so a bf16 model's first forward does not pay for it;
int8_linear.py wraps load_library for tracing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cpp_build import build_once, build_openmp_library

SOURCE = Path(__file__).with_name("int8_gemv.cpp")
EXTENSION_NAME = "minaf3_int8_gemv"


def _build() -> bool:
    """Build (first time) and load the library; True when its operators (torch.ops.minaf3_int8.int8_linear
    and .bf16_linear) are ready; False, with one logged warning, when they cannot be built here.
    Decided once per process."""
    if not build_openmp_library(EXTENSION_NAME, SOURCE, "int8/bf16 decode kernel"):
        return False

    # The operators' output shapes without running them, so torch.compile can trace through the calls.
    @torch.library.register_fake("minaf3_int8::int8_linear")
    def _(x, w, scales, bias, allow_avx512=True):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    @torch.library.register_fake("minaf3_int8::bf16_linear")
    def _(x, w, bias, allow_avx512=True):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    return True


load_library = build_once(_build)


def bf16_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ w (N, K).T + bias for a bf16 weight on the CPU, accumulated in float32 -> (..., N) in
    x.dtype. Needs load_library(); callers check it (minaf3/linear.py)."""
    y = torch.ops.minaf3_int8.bf16_linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)
