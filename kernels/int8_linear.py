"""int8 weight-only linear layers: y = x @ (w_int8 * scales[:, None]).T + bias, one scale per output row.

    int8_linear_reference(x, w, scales, bias)  the definition in plain torch: dequantize, then F.linear
    int8_linear(x, w, scales, bias, backend)   the fast path, chosen per call (below)

Backends: the `backend=` argument, else the environment variable MINAF3_INT8_BACKEND, else "auto".
  "cpp"    the C++ kernels (CPU): int8_gemv.cpp's streaming loop (AVX-512 code where the CPU has it, else
           AVX2), or from GEMM_MIN_ROWS rows on CPUs whose best vector unit is AVX2, gemm.cpp's blocked
           product with the int8 rows widened and scaled as they are packed, on CPUs with AVX-512 VNNI
           vnni_prefill.cpp's product of int8 activations (rounded per group of 32 columns, as the int4
           layers' are) and the int8 weights (in_features a multiple of 128), else on CPUs with AVX-512
           BF16 tiles of rows dequantized to bf16 and multiplied by torch's bf16 product (bf16_tiles.py);
           ConfigError when they cannot be built or run here.
  "torch"  torch ops only: up to SMALL_BATCH rows aten._weight_int8pack_mm with bf16 activations, more rows
           (and non-CPU devices) dequantize tiles of weight rows and multiply with F.linear.
  "auto"   "cpp" for CPU tensors when the kernel builds on an AVX2 CPU, otherwise "torch".

Why these paths: decoding multiplies one row (or a few) by every weight once, so its time is the weights'
bytes over the memory bandwidth, and the streaming loop reads int8 weights at about the speed of a plain
read of memory (the README's int8 rows, from tools/bench.py, measure it against that limit); torch has no
int8 matrix-vector product of its own that comes close (_weight_int8pack_mm needs bf16 activations, and
dequantizing first reads the weights four times over). A prompt multiplies many rows, which makes the
product compute-bound: there the loop re-reads all of x for every chunk of weight rows, and on AVX2 CPUs
gemm.cpp's blocked product is faster from GEMM_MIN_ROWS rows (tools/bench_int8.py measures both).
_weight_int8pack_mm's bf16 path crashes or returns NaN/inf unless in_features % 16 == 0 (torch 2.13, CPU);
the torch backend dequantizes for those shapes instead.

Building: gemv.py (the library int8_gemv.cpp, shared with bf16 decode) and gemm.py. The operators register
as torch.ops.minaf3_int8.int8_linear and torch.ops.minaf3_gemm.int8_gemm with shape functions, so
torch.compile traces through them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minaf3.errors import ConfigError

from . import bf16_tiles, cpp_build, vnni_prefill
from .registry import available, runs

BACKEND_ENV = "MINAF3_INT8_BACKEND"
# Rows up to which the torch backend uses _weight_int8pack_mm; its time grows with every row (6-8 ms at
# 1 row, 18-26 ms at 8, 18944 x 3584) while dequantized tiles + GEMM amortise over many rows.
SMALL_BATCH = 8
# The torch backend dequantizes this many weight bytes (in the activation dtype) at a time: 8 MiB stays in
# L3 between the conversion and the product and bounds the transient memory of a 2 GiB lm_head.
DEQUANT_TILE_BYTES = 8 * 2**20
# _weight_int8pack_mm's bf16 kernel is wrong or crashes for other widths (see the module docstring).
PACK_MM_K_MULTIPLE = 16
# Rows from which the "cpp" backend multiplies with gemm.cpp's blocked product (on CPUs it is written for)
# rather than int8_gemv.cpp's streaming loop: where the two crossed on the four decoder shapes
# (tools/bench_int8.py --rows).
GEMM_MIN_ROWS = 40


def int8_linear_reference(
    x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., K) @ (w_int8 (N, K) * scales (N,)[:, None]).T + bias (N,) in float32 -> (..., N) in x.dtype."""
    weight = w_int8.float() * scales.float()[:, None]  # (N, K)
    out = F.linear(x.float(), weight, None if bias is None else bias.float())
    return out.to(x.dtype)


def resolve_backend(backend: str | None = None) -> str:
    """The backend a call will use: the argument, else $MINAF3_INT8_BACKEND, else "auto"."""
    return cpp_build.resolve_backend(backend, BACKEND_ENV)


def int8_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """x (..., K) @ (w_int8 (N, K) * scales (N,)[:, None]).T + bias (N,) -> (..., N) in x.dtype.

    x, scales and bias may be any float dtype; the products accumulate in float32.
    """
    check_int8_linear_inputs(x, w_int8, scales, bias)
    return run_int8_linear(x, w_int8, scales, bias, backend)


def run_int8_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """int8_linear without its input checks, for Int8Linear, whose tensors fit by construction.

    Decode calls this ~200 times per token: the checks and no-op dtype casts skipped here cost about as
    much as a small layer's whole product (~6 and ~4 us of ~10 us, measured at width 112).
    """
    chosen = resolve_backend(backend)
    if x.device.type == "cpu" and chosen != "torch":
        many = x.shape[:-1].numel() >= GEMM_MIN_ROWS
        if many and runs("gemm"):
            op = torch.ops.minaf3_gemm.int8_gemm  # many rows (prefill): the blocked product
        elif many and available().vnni_prefill and w_int8.shape[1] % vnni_prefill.ALIGN == 0:
            xk = x if x.dtype in (torch.float32, torch.bfloat16) else x.float()  # int8 activations
            return vnni_prefill.int8_gemm_linear(xk, w_int8, scales, bias).to(x.dtype)
        elif many and available().bf16_prefill:  # or bf16 tiles times torch's bf16 product
            return bf16_tiles.tiled_linear(x, bf16_tiles.int8_tiles(w_int8, scales), w_int8.shape[0], bias)
        elif runs("gemv"):
            op = torch.ops.minaf3_int8.int8_linear  # a few rows (decode): the streaming loop
        else:
            op = None
        if op is not None:
            f32 = torch.float32
            out = op(
                x if x.dtype == f32 else x.float(),
                w_int8,
                scales if scales.dtype == f32 else scales.float(),
                bias if bias is None or bias.dtype == f32 else bias.float(),
            )
            return out if x.dtype == f32 else out.to(x.dtype)
    if chosen == "cpp":
        why = (
            f"tensors are on {x.device}"
            if x.device.type != "cpu"
            else "the kernel could not be built (see the log)"
        )
        raise ConfigError(f"int8 backend 'cpp' cannot run: {why}; use backend='torch' or 'auto'")
    out = _torch_int8_linear(x.reshape(-1, x.shape[-1]), w_int8, scales, bias)  # (..., K) -> (M, K)
    return out.reshape(*x.shape[:-1], w_int8.shape[0])  # (M, N) -> (..., N)


def check_int8_linear_inputs(
    x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Raise ConfigError naming the mismatch; shapes and dtypes only, so no host synchronisation."""
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise ConfigError(f"int8_linear: weight must be 2-D int8; got {w_int8.dtype} {tuple(w_int8.shape)}")
    N, K = w_int8.shape
    if x.dim() == 0 or x.shape[-1] != K or not x.dtype.is_floating_point:
        raise ConfigError(f"int8_linear: input must be float (..., {K}); got {x.dtype} {tuple(x.shape)}")
    if tuple(scales.shape) != (N,) or not scales.dtype.is_floating_point:
        raise ConfigError(
            f"int8_linear: scales must be float ({N},); got {scales.dtype} {tuple(scales.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (N,):
        raise ConfigError(f"int8_linear: bias must be ({N},); got {tuple(bias.shape)}")
    devices = {t.device for t in (x, w_int8, scales) + (() if bias is None else (bias,))}
    if len(devices) != 1:
        raise ConfigError(f"int8_linear: tensors are on different devices {sorted(map(str, devices))}")


def _torch_int8_linear(
    x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The torch backend: x (M, K) -> (M, N) in x.dtype (see the module docstring)."""
    M, K = x.shape
    if x.device.type == "cpu" and M <= SMALL_BATCH and K % PACK_MM_K_MULTIPLE == 0:
        # bf16 activations: this op's fp32 path is 14x slower (63 ms vs 4.4 ms measured, batch 1).
        out = torch.ops.aten._weight_int8pack_mm(
            x.to(torch.bfloat16).contiguous(), w_int8, scales.to(torch.bfloat16)
        )
        out = out.float() if bias is None else out.float() + bias.float()
        return out.to(x.dtype)
    out = torch.empty(M, w_int8.shape[0], dtype=x.dtype, device=x.device)
    rows = max(1, DEQUANT_TILE_BYTES // (K * x.dtype.itemsize))
    for n0 in range(0, w_int8.shape[0], rows):
        tile = slice(n0, n0 + rows)
        # Scaled in float32, then rounded once to the activation dtype.
        weight = (w_int8[tile].float() * scales[tile, None].float()).to(x.dtype)  # (rows, K)
        out[:, tile] = F.linear(x, weight, None if bias is None else bias[tile].to(x.dtype))
    return out
