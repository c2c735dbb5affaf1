"""int4 weight-only linear layers: y = x @ W.T + bias, W[n, k] = scales[n, k // G] * (q[n, k] - 8).

The layout, read by every kernel, by the quantizer (minaf3/quantize.py) and by the torch path:
    q        4-bit values 0..15; symmetric: the zero point is 8 for every group, so W = scales * (q - 8)
    word     32 bits of a row: 8 columns 8w .. 8w + 7, two per byte, column 8w + 2j in the low nibble of
             byte j and 8w + 2j + 1 in its high nibble
    tile     TILE_ROWS = 16 consecutive rows (the last tile: what is left), stored column by column: word w
             of the tile's 16 rows, then word w + 1, ... (a transpose of the tile's words), so that one
             64-byte load is one word of 16 rows, one row in each 32-bit vector lane
    weight   (N, Kp / 2) uint8: the tiles one after the other (rows 16t .. 16t + 15 in the bytes where a
             row-major layout would hold them)
    scales   (N, Kp / G) bfloat16, one per group of G = GROUP_SIZE consecutive columns of a row, tiled the
             same way (scale g of the tile's rows, then g + 1, ...)
    Kp       in_features rounded up to a multiple of ALIGN: the padding columns hold q = 8 (a zero weight),
             and the activations are padded with zeros to match

    pack_int4(q) / unpack_int4(weight)        (N, Kp) values 0..15 <-> (N, Kp / 2) tiled bytes
    pack_scales(s) / unpack_scales(scales)    (N, Kp / G) in row order <-> tiled
    int4_dequantize_reference(weight, scales)  W (N, Kp) in float64
    int4_linear_reference(x, weight, scales, bias)   the definition: float64 products, in x's dtype
    int4_linear(x, weight, scales, bias, backend)    the fast path, chosen per call (below), inputs checked
    run_int4_linear(...)                       the same without the checks (Int4Linear's forward)
    int4_product_sum(x, weight, scales, bias)  one row as unpack, multiply and sum, for a compiled step

Why tiles: one-row decode reads every weight once, so its loop must turn nibbles into products at the
memory's rate, and on fast memory the count of its vector instructions is what it runs at. With a row in
each vector lane, a 64-byte load is 16 rows times 8 columns, each byte position multiplied by one
broadcast activation, and a group's sums finish (convert, scale, multiply-add) once for 16 rows in one
vector, with the 16 rows' scales one contiguous load. In a row-major layout the lanes hold columns of one
row: every 128 columns of a row need their own finish, with the row's scales spread out to the lanes, and
a sum across the lanes at the row's end. A slice of whole tiles (rows 16a .. 16b) is itself a tiled
weight, so the torch path and the fused layers' parts (minaf3/linear.py) split and join tiles as rows.

Backends: the `backend=` argument, else $MINAF3_INT4_BACKEND, else "auto".
  "cpp"    the C++ kernels (CPU): below PREFILL_MIN_ROWS rows int4_gemv.cpp's streaming loop (its AVX-512
           VNNI code where the CPU has those instructions, else its AVX-512 or AVX2 code; each rounds the
           activations to int8); from PREFILL_MIN_ROWS rows, on CPUs whose best vector unit is AVX2,
           gemm.cpp's blocked product with the int4 rows widened to float32 and scaled as they are packed,
           on CPUs with AVX-512 VNNI vnni_prefill.cpp's product of int8 activations (the loop's rounding)
           and 4-bit weights, on other CPUs with AVX-512 BF16 tiles of weight rows dequantized to bf16 and
           multiplied by torch's bf16 product (bf16_tiles.py); elsewhere the loop at every row count.
           ConfigError when the kernels cannot be built or run here.
  "torch"  torch ops only: tiles of weight rows dequantized in x's dtype, multiplied with F.linear.
  "auto"   "cpp" for CPU tensors where the library builds, otherwise "torch".

Why GROUP_SIZE = 32 and no zero points: tools/bench_int4.py --weight-error measures, on Gaussian and
heavier-tailed (Student t) rows, symmetric and asymmetric (min/max, a bf16 zero point per group) rounding at
groups of 32, 64 and 128. At equal bytes per weight, halving the group lowers the error more than adding zero
points does (symmetric at 32 beats asymmetric at 64, both 4.5 bits per weight), and the loop's cost per
group is small (one multiply-add per group and activation row); groups of 32 cost 6% more bytes than 64.
Why the symmetric scale maps each group's largest-magnitude weight to q = 0 (that is, -8) rather than to
+-7: all 16 levels are used, which lowers the error by about a tenth.
Why ALIGN = 128: the AVX-512 VNNI and BF16 loops read 64 bytes (128 columns) of a row per step, so every
row is a whole number of steps; AF3's widths (3584, 18944) are multiples of it, so only other models pad.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minaf3.errors import ConfigError

from . import bf16_tiles, cpp_build, vnni_prefill
from .registry import available, runs

GROUP_SIZE = 32  # columns per scale (see the module docstring)
TILE_ROWS = 16  # rows per tile: one int32 vector lane each in a 512-bit register
GROUP_SIZES = (32, 64, 128)  # what the kernels accept
ALIGN = 128  # rows are padded to a multiple of this many columns
ZERO_POINT = 8  # W = scales * (q - ZERO_POINT)
BACKEND_ENV = "MINAF3_INT4_BACKEND"
# Rows from which the "cpp" backend leaves the streaming loop for a matrix product (where there is one for
# this CPU): where the two crossed on the decoder's shapes (tools/bench_int4.py --rows).
PREFILL_MIN_ROWS = 40
# The torch backend dequantizes this many weight bytes (in the activation dtype) at a time (as int8's).
DEQUANT_TILE_BYTES = 8 * 2**20
# The activation dtypes the C++ kernels take as they are (int4_gemv.cpp also for its bias and output)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def padded_width(in_features: int) -> int:
    """Kp: in_features rounded up to a multiple of ALIGN."""
    return -(-in_features // ALIGN) * ALIGN


def tile_rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C) in row order -> (N, C) in tiles: each TILE_ROWS rows (the last tile: N % TILE_ROWS, if any)
    stored as their transpose, element by element (a 32-bit word of a packed weight, a scale)."""
    N, C = t.shape
    full = N - N % TILE_ROWS
    head = t[:full].reshape(-1, TILE_ROWS, C).transpose(1, 2).reshape(full, C)
    return torch.cat((head, t[full:].T.reshape(N - full, C)))


def untile_rows(t: torch.Tensor) -> torch.Tensor:
    """The inverse of tile_rows: (N, C) in tiles -> (N, C) in row order."""
    N, C = t.shape
    full = N - N % TILE_ROWS
    head = t[:full].reshape(-1, C, TILE_ROWS).transpose(1, 2).reshape(full, C)
    return torch.cat((head, t[full:].reshape(C, N - full).T))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, Kp) integers 0..15 -> the weight (N, Kp / 2) uint8: two columns a byte, in tiles of words."""
    q = q.to(torch.uint8)
    rows = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()  # column 2j in the low nibble of byte j
    return tile_rows(rows.view(torch.int32)).view(torch.uint8)


def unpack_int4(weight: torch.Tensor) -> torch.Tensor:
    """weight (N, Kp / 2) uint8 -> q (N, Kp) uint8 values 0..15, rows and columns in order."""
    rows = untile_rows(weight.contiguous().view(torch.int32)).contiguous().view(torch.uint8)
    return torch.stack((rows & 15, rows >> 4), dim=-1).flatten(-2)


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """scales (N, Kp / G) in row order -> the layout's tiles (same shape and dtype)."""
    return tile_rows(scales)


def unpack_scales(scales: torch.Tensor) -> torch.Tensor:
    """The layout's scales (N, Kp / G) -> row order: scales[n, g] of row n's group g."""
    return untile_rows(scales)


def int4_dequantize_reference(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W (N, Kp) float64 from weight (N, Kp / 2) uint8 and scales (N, Kp / G) (any float dtype), tiled."""
    q = unpack_int4(weight).double()  # (N, Kp)
    N, Kp = q.shape
    groups = scales.shape[1]
    W = (q - ZERO_POINT).view(N, groups, Kp // groups) * unpack_scales(scales).double()[:, :, None]
    return W.view(N, Kp)


def int4_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., K) @ W.T + bias in float64, K <= Kp (x is padded with zeros) -> (..., N) in x.dtype."""
    W = int4_dequantize_reference(weight, scales)
    x64 = F.pad(x.double(), (0, W.shape[1] - x.shape[-1]))
    return F.linear(x64, W, None if bias is None else bias.double()).to(x.dtype)


def resolve_backend(backend: str | None = None) -> str:
    """The backend a call will use: the argument, else $MINAF3_INT4_BACKEND, else "auto"."""
    return cpp_build.resolve_backend(backend, BACKEND_ENV)


def int4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """x (..., K) @ W.T + bias (N,) -> (..., N) in x.dtype, for K <= Kp (see the layout above).

    x and bias may be any float dtype; the products accumulate in float32.
    """
    check_int4_linear_inputs(x, weight, scales, bias)
    return run_int4_linear(x, weight, scales, bias, backend)


def run_int4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """int4_linear without its input checks, for Int4Linear, whose tensors fit by construction."""
    chosen = resolve_backend(backend)
    Kp = 2 * weight.shape[1]
    if x.shape[-1] != Kp:
        x = F.pad(x, (0, Kp - x.shape[-1]))  # the padding columns' weights are zero
    if x.device.type == "cpu" and chosen != "torch" and runs("int4"):
        kernels = available()
        rows = x.shape[:-1].numel()
        f32 = torch.float32
        bias32 = bias if bias is None or bias.dtype == f32 else bias.float()
        if rows >= PREFILL_MIN_ROWS and kernels.gemm:
            out = torch.ops.minaf3_gemm.int4_gemm(
                x if x.dtype in KERNEL_DTYPES else x.float(), weight, scales, bias32
            )
        elif rows >= PREFILL_MIN_ROWS and kernels.vnni_prefill:
            xk = x if x.dtype in KERNEL_DTYPES else x.float()
            out = vnni_prefill.int4_gemm_linear(xk, weight, scales, bias)
        elif rows >= PREFILL_MIN_ROWS and kernels.bf16_prefill:
            return bf16_tiles.tiled_linear(x, bf16_tiles.int4_tiles(weight, scales), weight.shape[0], bias)
        elif x.dtype in KERNEL_DTYPES and (bias is None or bias.dtype in KERNEL_DTYPES):
            return torch.ops.minaf3_int4.int4_linear(x, weight, scales, bias)  # (..., N) in x.dtype
        else:
            out = torch.ops.minaf3_int4.int4_linear(x.float(), weight, scales, bias32)
        return out if x.dtype == f32 else out.to(x.dtype)
    if chosen == "cpp":
        why = (
            f"tensors are on {x.device}"
            if x.device.type != "cpu"
            else "the kernel could not be built (see the log)"
        )
        raise ConfigError(f"int4 backend 'cpp' cannot run: {why}; use backend='torch' or 'auto'")
    out = _torch_int4_linear(x.reshape(-1, Kp), weight, scales, bias)  # (..., Kp) -> (M, Kp)
    return out.reshape(*x.shape[:-1], weight.shape[0])  # (M, N) -> (..., N)


def check_int4_linear_inputs(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Raise ConfigError naming the mismatch; shapes and dtypes only, so no host synchronisation."""
    if weight.dtype != torch.uint8 or weight.dim() != 2 or (2 * weight.shape[1]) % ALIGN:
        raise ConfigError(
            f"int4_linear: weight must be (N, Kp / 2) uint8 with Kp a multiple of {ALIGN}; "
            f"got {weight.dtype} {tuple(weight.shape)}"
        )
    N, Kp = weight.shape[0], 2 * weight.shape[1]
    if x.dim() == 0 or not 0 < x.shape[-1] <= Kp or not x.dtype.is_floating_point:
        raise ConfigError(
            f"int4_linear: input must be float (..., K <= {Kp}); got {x.dtype} {tuple(x.shape)}"
        )
    groups = scales.shape[-1] if scales.dim() == 2 else 0
    if (
        scales.dtype != torch.bfloat16
        or scales.shape[0] != N
        or not groups
        or Kp // groups not in GROUP_SIZES
        or Kp % groups
    ):
        raise ConfigError(
            f"int4_linear: scales must be ({N}, {Kp} / G) bfloat16 with G in {list(GROUP_SIZES)}; "
            f"got {scales.dtype} {tuple(scales.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (N,):
        raise ConfigError(f"int4_linear: bias must be ({N},); got {tuple(bias.shape)}")
    devices = {t.device for t in (x, weight, scales) + (() if bias is None else (bias,))}
    if len(devices) != 1:
        raise ConfigError(f"int4_linear: tensors are on different devices {sorted(map(str, devices))}")


def int4_product_sum(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., 1, K) @ W.T + bias as unpack, scale, multiply and sum in float32 -> (..., 1, N) in x.dtype.

    For a compiled one-row step without the C++ library: inductor fuses it into one loop over the packed
    weight, with nothing materialised.
    """
    N, Kp = weight.shape[0], 2 * weight.shape[1]
    groups = scales.shape[1]
    q = unpack_int4(weight).view(N, groups, Kp // groups).float() - ZERO_POINT
    W = (q * unpack_scales(scales).float()[:, :, None]).view(N, Kp)
    x32 = F.pad(x.float(), (0, Kp - x.shape[-1]))
    y = (x32.unsqueeze(-2) * W).sum(-1)  # (..., 1, Kp) * (N, Kp) -> (..., N)
    return (y if bias is None else y + bias).to(x.dtype)


def _torch_int4_linear(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The torch backend: x (M, Kp) -> (M, N) in x.dtype, weight tiles dequantized in float32, rounded once
    to x's dtype and multiplied with F.linear."""
    M, Kp = x.shape
    N, groups = weight.shape[0], scales.shape[1]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    rows = max(1, DEQUANT_TILE_BYTES // (Kp * x.dtype.itemsize) // TILE_ROWS) * TILE_ROWS  # whole tiles
    for n0 in range(0, N, rows):
        tile = slice(n0, n0 + rows)
        q = unpack_int4(weight[tile]).view(-1, groups, Kp // groups).float() - ZERO_POINT
        W = (q * unpack_scales(scales[tile])[:, :, None].float()).view(-1, Kp).to(x.dtype)  # (rows, Kp)
        out[:, tile] = F.linear(x, W, None if bias is None else bias[tile].to(x.dtype))
    return out
