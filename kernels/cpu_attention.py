"""One-token decode attention on the CPU, in C++ (cpu_attention.cpp): building it and calling it.

    load_library()      builds (first use) and loads it; False, with one logged warning, when it cannot be
                        built here
    decode_attention(q, k, v, key_mask, query_slot)
                        q (B, Hq, 1, D), k/v (B, Hkv, S, D), key_mask (Bm, S), query_slot (1,)
                        -> (B, Hq, 1, D)

minaf3/attention.py calls it as the "cpp" backend, the default for one query token on the CPU; its
definition is attention.py's eager_attention, which the tests compare it with. Why a kernel: the eager
path is two batched matrix products and a softmax per layer over every slot of the static cache, with
BLAS's fixed cost per call (and its threads woken for a few thousand multiply-adds); the kernel is one call
that reads only the slots up to the query's own, so a decode step's attention costs what the filled part of
the cache holds, whatever length the cache was allocated for.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minaf3.errors import ConfigError

from .cpp_build import build_once, build_openmp_library

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
EXTENSION_NAME = "minaf3_cpu_attention"
# the operator, once the library is loaded (resolving torch.ops.<namespace>.<name> at each call costs more
# than the Python around the call)
OPS: dict[str, object] = {}


def _build() -> bool:
    """Build (first time) and load the library; True when torch.ops.minaf3_attn.decode_attention is ready."""
    if not build_openmp_library(EXTENSION_NAME, SOURCE, "CPU decode attention kernel"):
        return False

    # The operator's output shape without running it, so torch.compile can trace through the call.
    @torch.library.register_fake("minaf3_attn::decode_attention")
    def _(q, k, v, key_mask, query_slot):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    OPS["decode_attention"] = torch.ops.minaf3_attn.decode_attention.default
    return True


load_library = build_once(_build)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    query_slot: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over the visible cache slots, in float32, for one query token per row.

    q (B, Hq, 1, D); k, v (B, Hkv, S, D), Hq a multiple of Hkv (query head h reads key head h // (Hq/Hkv));
    all float32 or all bfloat16. The query sees slot j iff j <= query_slot and key_mask[b, j]: key_mask
    (B or 1, S) bool or None (every slot holds a token); query_slot (1,) int64 tensor, the query's own slot,
    or None (every slot). Slots after query_slot are never read. A query that sees no slot outputs zeros.
    Returns (B, Hq, 1, D) in q's dtype. Needs the library (registry.available().cpu_attention).
    Raises ConfigError naming the mismatch (the operator's own checks, made before it reads any data, so
    they cost nothing in Python).
    """
    try:
        return OPS["decode_attention"](q, k, v, key_mask, query_slot)
    except RuntimeError as error:
        message = str(error).splitlines()[0]
        if not message.startswith("decode_attention:"):
            raise
        raise ConfigError(message) from None
