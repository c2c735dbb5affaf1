"""The int4 library of int4_gemv.cpp: building it and loading its operators.

    load_library()   builds (first use) and loads it; False, with one logged warning, when it cannot be built
                     here (registry.py calls it: registry.runs("int4"))

Its operator, torch.ops.minaf3_int4.int4_linear(x, w, scales, bias, isa="auto"), the streaming loop for a
few rows, is called by kernels/int4_linear.py (which describes the layout); its shape function is registered
here, so torch.compile traces through the calls.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cpp_build import build_once, build_openmp_library

SOURCE = Path(__file__).with_name("int4_gemv.cpp")
EXTENSION_NAME = "minaf3_int4_gemv"


def _build() -> bool:
    """Build (first time) and load int4_gemv.cpp; True when torch.ops.minaf3_int4's operators are ready;
    False, with one logged warning, when they cannot be built here. Decided once per process."""
    if not build_openmp_library(EXTENSION_NAME, SOURCE, "int4 matrix-vector kernel"):
        return False

    @torch.library.register_fake("minaf3_int4::int4_linear")
    def _(x, w, scales, bias, isa="auto"):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    @torch.library.register_fake("minaf3_int4::quantize_int8")
    def _(x, G):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(*x.shape[:-1], x.shape[-1] // G)

    return True


load_library = build_once(_build)
