"""Attention: one signature, four backends.

    attention(q, k, v, key_mask=None, query_pos=None, backend=None) -> out
        q:         (B, Hq, T, D)   queries
        k, v:      (B, Hkv, S, D)  keys and values (S = T without a cache, or the static cache length)
        key_mask:  (B, S) bool     True where a key slot holds a real token (False: padding)
        query_pos: (T,) long       the cache slot of each query; None means bidirectional (the encoder)
        out:       (B, Hq, T, D)

With `query_pos`, query i sees key slot j iff j <= query_pos[i] and key_mask[b, j]. A query that sees no key
at all (a left-padding row) outputs zeros, as torch's sdpa does since 2.5 and so the reference does: a plain
softmax would give NaN there, and that NaN would reach real rows through the value matrix at the next layer
(0 * NaN = NaN). Padding rows then carry only their residual, which keeps the loss equal to the reference's.

Grouped-query attention: Hq = G * Hkv and query head h reads key/value head h // G.

Backends: "eager" (plain matmul/softmax: the definition), "sdpa" (torch's
scaled_dot_product_attention, a fused kernel on every device), "cpp" (kernels/cpu_attention.cpp: one query
token per row, on the CPU) and "triton" (kernels/, CUDA: encoder, prefill and decode kernels). The default
(`default_backend`) is triton on CUDA; on the CPU cpp for one-token decode (eager where the kernel cannot be
built here) and sdpa for blocks of queries. Force one with the `backend` argument or, for a block of code,
`with use_backend("eager"): ...`; a backend forced where it cannot run (cpp for a prefill, triton without
triton) is a ConfigError that says so, never a silent substitute. `backend_counts()` tells which ran.
"""

import collections
import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .kernels import cpu_attention
from .kernels.registry import available

BACKENDS = ("triton", "cpp", "sdpa", "eager")
_forced = threading.local()
# How many calls each backend has run in this process: one place to see what ran (tests, debugging).
_counts: collections.Counter = collections.Counter()


def backend_counts() -> dict[str, int]:
    """{backend: calls run so far in this process}."""
    return dict(_counts)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force an attention backend for the calls made inside the block (None restores the default choice)."""
    if name is not None and name not in BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    previous = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = previous


def default_backend(device: torch.device, num_queries: int | None = None) -> str:
    """The backend `attention` uses on `device` for `num_queries` query tokens (None: unknown).

    Single-token decode on the CPU runs the cpp kernel: torch's CPU sdpa kernel is built for blocks of
    queries and is slower than even the eager products for one query, and the kernel replaces their library
    calls by one (see kernels/cpu_attention.py); eager where the kernel cannot be built.
    """
    forced = getattr(_forced, "name", None)
    if forced is not None:
        return forced
    kernels = available()
    if device.type == "cuda" and kernels.triton:
        return "triton"
    if device.type == "cpu" and num_queries == 1:
        return "cpp" if kernels.cpu_attention else "eager"
    return "sdpa"


def attention_mask(
    key_mask: torch.Tensor | None, query_pos: torch.Tensor | None, num_keys: int
) -> torch.Tensor | None:
    """The boolean mask (B or 1, 1, T, S) that sdpa and eager apply; True means "may attend"."""
    if query_pos is None:
        return None if key_mask is None else key_mask[:, None, None, :]
    slots = torch.arange(num_keys, device=query_pos.device)
    allowed = slots[None, :] <= query_pos[:, None]  # (T, S) causal by slot
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :]  # (B, T, S)
    return allowed.unsqueeze(-3)  # (B or 1, 1, T, S)


def plain_causal(key_mask: torch.Tensor | None, query_pos: torch.Tensor) -> bool:
    """Whether query i sits in slot i and every slot up to the last query holds a token (a prompt written
    from slot 0, without padding): then attention is plain causal attention over the first T slots. One host
    synchronisation; for blocks of queries (a prefill), not for every decode step."""
    T = query_pos.shape[0]
    if not torch.equal(query_pos, torch.arange(T, device=query_pos.device)):
        return False
    return key_mask is None or bool(key_mask[:, :T].all())


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    query_pos: torch.Tensor | None = None,
    backend: str | None = None,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention with D**-0.5 scaling; see the module docstring for shapes and masks.

    mask: `attention_mask(key_mask, query_pos, S)` when the caller has built it already (the decoder builds
    it once per forward pass for all its layers); the triton and cpp backends ignore it (they read key_mask
    and query_pos, and only the slots up to the query's own).
    causal: the caller's word that `plain_causal(key_mask, query_pos)` holds; sdpa then runs its causal
    kernel over the first T slots with no mask: a (T, S) mask for a long prompt is T * S bytes, which sdpa
    widens to a float copy in every layer, and the causal kernel skips the blocks the mask would hide.
    """
    backend = backend or default_backend(q.device, q.shape[2])
    if not torch.compiler.is_compiling():  # a compiled step's graph keeps no Python side effects
        _counts[backend] += 1
    if backend == "cpp":  # first: it runs for every layer of every decoded token on the CPU
        return cpp_attention(q, k, v, key_mask, query_pos)
    gqa = q.shape[1] != k.shape[1]
    if backend == "sdpa" and causal:
        T = q.shape[2]
        return F.scaled_dot_product_attention(q, k[:, :, :T], v[:, :, :T], is_causal=True, enable_gqa=gqa)
    if backend in ("sdpa", "eager") and mask is None:
        mask = attention_mask(key_mask, query_pos, k.shape[-2])
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if backend == "eager":
        return eager_attention(q, k, v, mask)
    if backend == "triton":
        return triton_attention(q, k, v, key_mask, query_pos)
    raise ConfigError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """The definition: softmax(q k^T / sqrt(D) + mask) v, softmax in float32, zeros for rows with no key.

    mask (B or 1, 1, T, S) bool or None. The G = Hq / Hkv query heads that share a key head are stacked as
    G * T rows of one matrix product, so the cache is read in place rather than repeated G times.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    # (B, Hq, T, D) -> (B, Hkv, G * T, D): query head h = kv head h // G, the same order as Hq's
    scores = q.reshape(B, Hkv, G * T, D) @ k.transpose(-1, -2)  # (B, Hkv, G * T, S)
    scores = scores.float().view(B, Hkv, G, T, S) * D**-0.5
    if mask is None:
        probs = scores.softmax(dim=-1)
    else:
        mask = mask[:, :, None]  # (B or 1, 1, T, S) -> (B or 1, 1, 1, T, S), broadcast over kv heads and G
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)  # NaN rows (no key) -> 0
    y = probs.to(v.dtype).view(B, Hkv, G * T, S) @ v  # (B, Hkv, G * T, D)
    return y.view(B, Hq, T, D)


def cpp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    query_pos: torch.Tensor | None,
) -> torch.Tensor:
    """The C++ kernel: one query token per row, on the CPU, over key slots 0..query_pos[0] (all S without
    query_pos) that key_mask (B, S) shows."""
    if not q.is_cpu:
        raise ConfigError(f"attention backend 'cpp' runs on the CPU; got tensors on {q.device}")
    if q.shape[2] != 1:
        raise ConfigError(
            f"attention backend 'cpp' computes one query token per row (decoding); got {q.shape[2]}: "
            "use 'sdpa' or 'eager' for blocks of queries"
        )
    if not available().cpu_attention:
        raise ConfigError("attention backend 'cpp' cannot run: its kernel could not be built (see the log)")
    return cpu_attention.decode_attention(q, k, v, key_mask, query_pos)


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    query_pos: torch.Tensor | None,
) -> torch.Tensor:
    """Route to the kernel built for the case: bidirectional encoder, causal prefill, or one-token decode."""
    from .kernels.decode_attention import decode_attention
    from .kernels.encoder_attention import encoder_attention
    from .kernels.prefill_attention import prefill_attention

    if query_pos is None:
        return encoder_attention(q, k, v, key_mask=key_mask)
    # own_slot=False: a row with no visible key gives zeros, exactly like the sdpa and eager paths.
    if q.shape[2] == 1:
        return decode_attention(q, k, v, query_pos=query_pos, key_mask=key_mask, own_slot=False)
    return prefill_attention(q, k, v, query_pos=query_pos, key_mask=key_mask, own_slot=False)
