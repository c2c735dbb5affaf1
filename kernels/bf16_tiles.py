"""Prefill of quantized layers on CPUs with AVX-512 BF16: weight tiles dequantized to bf16 (bf16_tiles.cpp),
multiplied by torch's bf16 matrix product.

    load_library()                          builds (first use) and loads bf16_tiles.cpp; False, with one
                                            logged warning, when it cannot be built (registry: "bf16_prefill")
    int8_tiled_linear(x, w, scales, bias)   x (..., K) @ (scales[:, None] * w).T + bias, in x's dtype
    int4_tiled_linear(x, w, scales, bias)   the same for an int4 weight (kernels/int4_linear.py's layout)

Why: a prompt's product is compute-bound, and on these CPUs torch's bf16 product (oneDNN's kernels, built
on the bf16 dot-product instruction) runs at about twice its float32 rate; the streaming loops of the
quantized layers convert every weight for every few activation rows, and gemm.cpp's float32 product is
written for AVX2. Dequantizing a tile costs a few percent of its product, and the tile stays in L2 while
it is multiplied; all tiles are one parallel region (bf16_tiles.cpp says why). Numerics: the activations
and the dequantized weights are rounded to bf16 (a relative 2^-8 at most, below int8's or int4's own
rounding), their products are summed in float32 and the outputs rounded to bf16, as in a bf16 model's
prefill. tools/bench_int4.py races this path against the loops and a bf16 layer at the 7B shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cpp_build import build_once, build_openmp_library

SOURCE = Path(__file__).with_name("bf16_tiles.cpp")
EXTENSION_NAME = "minaf3_bf16_tiles"
# Bytes of bf16 per tile, as rows of the weight within TILE_ROWS: at 155 rows, 512 rows of width 3584 and 112
# rows of width 18944 (down_proj) ran fastest, each within a few percent of a bf16 product over the whole
# weight; 32 rows lost 15-20%, and a fixed 256 rows lost 15% at width 18944.
TILE_BYTES = 4 * 2**20
TILE_ROWS = (64, 512)


def tile_rows(in_features: int) -> int:
    """Weight rows per tile: TILE_BYTES of bf16, a multiple of 16 within TILE_ROWS."""
    return min(TILE_ROWS[1], max(TILE_ROWS[0], TILE_BYTES // (2 * in_features) // 16 * 16))


def _build() -> bool:
    """Build (first time) and load bf16_tiles.cpp; True when torch.ops.minaf3_tiles' operators are ready."""
    if not build_openmp_library(EXTENSION_NAME, SOURCE, "bf16 prefill tiles"):
        return False

    @torch.library.register_fake("minaf3_tiles::int8_dequantize")
    def _(w, scales, row0, rows):
        return w.new_empty(rows, w.shape[1], dtype=torch.bfloat16)

    @torch.library.register_fake("minaf3_tiles::int4_dequantize")
    def _(w, scales, row0, rows):
        return w.new_empty(rows, 2 * w.shape[1], dtype=torch.bfloat16)

    for name in ("int8_tiled_linear", "int4_tiled_linear"):

        @torch.library.register_fake(f"minaf3_tiles::{name}")
        def _(x, w, scales, bias, tile_rows):
            return x.new_empty(*x.shape[:-1], w.shape[0], dtype=torch.float32)

    return True


load_library = build_once(_build)


def int8_tiled_linear(
    x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., K) @ (scales[:, None] * w).T + bias -> (..., N) in x.dtype; w (N, K) int8, scales (N,).
    Needs the library, on a CPU with AVX-512 BF16 (registry.available().bf16_prefill)."""
    b = None if bias is None else bias.float()
    y = torch.ops.minaf3_tiles.int8_tiled_linear(x, w, scales.float().contiguous(), b, tile_rows(w.shape[1]))
    return y.to(x.dtype)


def int4_tiled_linear(
    x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., Kp) @ W.T + bias -> (..., N) in x.dtype for an int4 weight w (N, Kp / 2), scales (N, Kp / G).
    Needs the library, on a CPU with AVX-512 BF16 (registry.available().bf16_prefill)."""
    b = None if bias is None else bias.float()
    tiles = tile_rows(2 * w.shape[1])
    return torch.ops.minaf3_tiles.int4_tiled_linear(x, w, scales, b, tiles).to(x.dtype)
