"""Prefill of quantized layers on CPUs with AVX-512 BF16: weight tiles dequantized to bf16 (bf16_tiles.cpp),
multiplied by torch's bf16 matrix product.

    load_library()                       builds (first use) and loads bf16_tiles.cpp; False, with one logged
                                         warning, when it cannot be built here (registry.py: "bf16_prefill")
    tiled_linear(x, dequantize, N, bias) x (..., K) @ W.T + bias, W's rows dequantized TILE_ROWS at a time
    int8_tiles(w, scales) / int4_tiles(w, scales)   the `dequantize` of an int8 / int4 weight

Why: a prompt's product is compute-bound, and on these CPUs torch's bf16 product (oneDNN's kernels, built
on the bf16 dot-product instruction) runs at about twice its float32 rate; the streaming loops of the
quantized layers convert every weight for every few activation rows, and gemm.cpp's float32 product is
written for AVX2. Dequantizing a tile costs a few percent of its product, and the tile stays in L2 while
it is multiplied. Numerics: the activations and the dequantized weights are rounded to bf16 (a relative
2^-8 at most, well below int8's or int4's own rounding), their products are summed in float32, and the
outputs rounded to bf16, as a bf16 model's prefill does. tools/bench_int4.py races this path against the
loops and against a bf16 layer at the 7B shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .cpp_build import build_once, build_openmp_library

SOURCE = Path(__file__).with_name("bf16_tiles.cpp")
EXTENSION_NAME = "minaf3_bf16_tiles"
# Weight rows per tile: oneDNN's bf16 product of a prompt by a few hundred weight rows runs at least as fast
# per FLOP as by thousands, and the tile (3584 x 256 x 2 B = 1.8 MB at AF3's width) stays in L2.
TILE_ROWS = 256


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

    return True


load_library = build_once(_build)


def int8_tiles(w: torch.Tensor, scales: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """(row0, rows) -> rows of scales[:, None] * w as bf16 (rows, K), for w (N, K) int8, scales (N,)."""
    scales = scales.float().contiguous()
    return lambda row0, rows: torch.ops.minaf3_tiles.int8_dequantize(w, scales, row0, rows)


def int4_tiles(w: torch.Tensor, scales: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """(row0, rows) -> rows of an int4 weight (kernels/int4_linear.py's layout) as bf16 (rows, Kp)."""
    return lambda row0, rows: torch.ops.minaf3_tiles.int4_dequantize(w, scales, row0, rows)


def tiled_linear(
    x: torch.Tensor,
    dequantize: Callable[[int, int], torch.Tensor],
    N: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., K) @ W.T + bias (N,) -> (..., N) in x.dtype, W (N, K) given TILE_ROWS rows at a time by
    `dequantize(row0, rows)` as bf16, multiplied with x rounded to bf16. Needs the library, on a CPU with
    AVX-512 BF16 (registry.available().bf16_prefill)."""
    xb = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    out = torch.empty(xb.shape[0], N, dtype=x.dtype, device=x.device)
    for n0 in range(0, N, TILE_ROWS):
        rows = min(TILE_ROWS, N - n0)
        out[:, n0 : n0 + rows] = F.linear(xb, dequantize(n0, rows))
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], N)
