"""The element-wise steps of a decoder layer as C++ operators (decode_ops.cpp): building them, calling them.

    load_library()                    builds (first use) and loads it; False, with one logged warning, when
                                      it cannot be built here
    rms_norm(x, weight, eps)          x (..., H), weight (H,) -> (..., H)
    rope_cache(qkv, cos, sin, k_cache, v_cache, slots, num_heads)
                                      qkv (B, T, (Hq + 2 Hkv) D) -> q (B, Hq, T, D); rotated k and v written
                                      to the caches (B, Hkv, S, D) at slots (T,)
    silu_mul(gate_up)                 gate_up (..., 2 I) -> silu(gate) * up (..., I)

minaf3/decoder.py's modules call them on the CPU outside autograd and torch.compile (`decoder.cpu_fused`);
their definitions are the torch code beside those calls, which the tests compare them with. Why operators
of our own: a decode step at batch 1 runs each of these on one token, where torch's dispatch of the
several ops each takes (RMSNorm 7, RoPE with the cache writes about 15, SiLU and the product 3) costs more
than their arithmetic (see decode_ops.cpp).
"""

from __future__ import annotations

from pathlib import Path

import torch

from minaf3.errors import ConfigError

from .cpp_build import build_once, build_openmp_library

SOURCE = Path(__file__).with_name("decode_ops.cpp")
EXTENSION_NAME = "minaf3_decode_ops"
# name -> operator, filled once the library is loaded (resolving torch.ops.<namespace>.<name> at each call
# would cost a good part of what the operator saves)
OPS: dict[str, object] = {}
NAMES = ("rms_norm", "rope_cache", "silu_mul")


def _build() -> bool:
    """Build (first time) and load the library; True when torch.ops.minaf3_decode's operators are ready."""
    if not build_openmp_library(EXTENSION_NAME, SOURCE, "CPU decode element-wise kernels"):
        return False

    # Output shapes without running the operators, so that torch.compile could trace through them.
    @torch.library.register_fake("minaf3_decode::rms_norm")
    def _(x, weight, eps):
        narrow = x.dtype == weight.dtype == torch.bfloat16
        return x.new_empty(x.shape, dtype=torch.bfloat16 if narrow else torch.float32)

    @torch.library.register_fake("minaf3_decode::rope_cache")
    def _(qkv, cos, sin, k_cache, v_cache, slots, num_heads):
        return qkv.new_empty(qkv.shape[0], num_heads, qkv.shape[1], k_cache.shape[-1])

    @torch.library.register_fake("minaf3_decode::silu_mul")
    def _(gate_up):
        return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)

    OPS.update((name, getattr(torch.ops.minaf3_decode, name).default) for name in NAMES)
    return True


load_library = build_once(_build)


def _typed(error: RuntimeError) -> Exception:
    """An operator's own argument check (made before it reads any data) as ConfigError; others as is."""
    message = str(error).splitlines()[0]
    return ConfigError(message) if message.startswith(tuple(f"{name}:" for name in NAMES)) else error


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dimension, statistics in float32, the normalised
    x rounded to x's dtype before the weight (Qwen2RMSNorm). x (..., H), weight (H,), float32 or bf16 ->
    (..., H), bf16 when both are, else float32."""
    try:
        return OPS["rms_norm"](x, weight, eps)
    except RuntimeError as error:
        raise _typed(error) from None


def rope_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """Split a fused q/k/v projection, rotate q and k (rotate-half RoPE), write k and v into the caches.

    qkv (B, T, (Hq + 2 Hkv) * D): each token's q heads, then k heads, then v heads; cos, sin (B, 1, T, D) or
    (B, T, D); k_cache, v_cache (B, Hkv, S, D) contiguous, written in place at slots (T,) int64. All float32
    or all bf16. Returns the rotated q (B, Hq, T, D).
    """
    try:
        return OPS["rope_cache"](qkv, cos, sin, k_cache, v_cache, slots, num_heads)
    except RuntimeError as error:
        raise _typed(error) from None


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up (..., 2 I) = [gate | up] -> (..., I), float32 or bf16."""
    try:
        return OPS["silu_mul"](gate_up)
    except RuntimeError as error:
        raise _typed(error) from None
