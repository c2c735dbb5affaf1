"""The streaming matrix-vector library of int8_gemv.cpp: building it, and its bf16 / float32 entry point.

    load_library()               builds (first use) and loads it; False, with one logged warning, when it
                                 cannot be built here
    gemv_linear(x, w, bias)      x (..., K) @ w (N, K).T + bias for bf16 or float32 weights, accumulated in
                                 float32

The library holds three operators over one streaming loop: minaf3_int8::int8_linear (int8 weights with a
scale per row; int8_linear.py), minaf3_int8::bf16_linear and minaf3_int8::f32_linear. minaf3/linear.py
sends bf16 and float32 layers with a few rows (eager decode) through the latter two. Why: a decode step
reads every weight once, and torch's matrix-vector products (MKL's, oneDNN's, and emulated bf16 ones) read
the weights well below the memory's speed, where this loop reaches about a plain read's (the README's decode
rows, from tools/bench.py, give each against that limit).
This module imports nothing of torch.compile, so a bf16 model's first forward does not pay for it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cpp_build import build_once, build_openmp_library

SOURCE = Path(__file__).with_name("int8_gemv.cpp")
EXTENSION_NAME = "minaf3_int8_gemv"
# weight dtype -> its operator, filled once the library is loaded (looked up per call: resolving
# torch.ops.<namespace>.<name> each time costs a good part of a small layer's product)
PRODUCTS: dict[torch.dtype, object] = {}


def _build() -> bool:
    """Build (first time) and load the library; True when its operators (torch.ops.minaf3_int8.int8_linear,
    .bf16_linear and .f32_linear) are ready; False, with one logged warning, when they cannot be built
    here. Decided once per process."""
    if not build_openmp_library(EXTENSION_NAME, SOURCE, "decode matrix-vector kernel"):
        return False

    # The operators' output shapes without running them, so torch.compile can trace through the calls.
    @torch.library.register_fake("minaf3_int8::int8_linear")
    def _(x, w, scales, bias, allow_avx512=True):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    @torch.library.register_fake("minaf3_int8::bf16_linear")
    def _(x, w, bias, allow_avx512=True):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    @torch.library.register_fake("minaf3_int8::f32_linear")
    def _(x, w, bias, allow_avx512=True):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    PRODUCTS.update({
        torch.bfloat16: torch.ops.minaf3_int8.bf16_linear.default,
        torch.float32: torch.ops.minaf3_int8.f32_linear.default,
    })  # fmt: skip
    return True


load_library = build_once(_build)


def gemv_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ w (N, K).T + bias for a bf16 or float32 weight on the CPU, accumulated in float32 ->
    (..., N) in x.dtype. Needs the library: registry.available().gemv."""
    op = PRODUCTS[w.dtype]
    if x.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32):
        return op(x, w, bias)  # float32 activations (and bias): nothing to convert, each call of a decode
    y = op(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)
