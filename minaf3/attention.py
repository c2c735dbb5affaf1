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

Backends: "triton" (kernels/, CUDA), "cpp" (CPU: kernels/cpu_attention.cpp for one query token, sdpa
for more), "sdpa" (torch.nn.functional.scaled_dot_product_attention) and "eager" (plain matmul/softmax, the
readable definition). The default is triton on CUDA, cpp for one-token decode on the CPU (eager where the
kernel cannot be built) and sdpa otherwise (see `default_backend`); force one with the `backend` argument
or, for a whole block of code, `with use_backend("eager"): ...`.
"""

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .errors import ConfigError

BACKENDS = ("triton", "cpp", "sdpa", "eager")
_forced = threading.local()


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
    queries, and with one query it was 1.6x slower than the two matrix products of `eager_attention` at AF3's
    sizes (28 query / 4 kv heads of 128, 1k-4k cache slots; tools/bench.py's machine), whose library calls
    the kernel replaces by one (see kernels/cpu_attention.py); eager where the kernel cannot be built.
    """
    forced = getattr(_forced, "name", None)
    if forced is not None:
        return forced
    if device.type == "cuda":
        from .kernels.triton_common import is_available

        if is_available():
            return "triton"
    if device.type == "cpu" and num_queries == 1:
        return "cpp" if cpu_kernel_ready() else "eager"
    return "sdpa"


def cpu_kernel_ready() -> bool:
    """Whether the C++ decode kernel runs here: built on first use in eager code; a torch.compile'd step
    reads only whether it is loaded (generate loads it before compiling)."""
    from .kernels import cpu_attention

    return cpu_attention.ready() if torch.compiler.is_compiling() else cpu_attention.load_library()


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


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    query_pos: torch.Tensor | None = None,
    backend: str | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with D**-0.5 scaling; see the module docstring for shapes and masks.

    mask: `attention_mask(key_mask, query_pos, S)` when the caller has built it already (the decoder builds
    it once per forward pass for all its layers); the triton backend ignores it.
    """
    backend = backend or default_backend(q.device, q.shape[2])
    if backend in ("sdpa", "eager", "cpp") and mask is None:
        mask = attention_mask(key_mask, query_pos, k.shape[-2])
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    if backend == "eager":
        return eager_attention(q, k, v, mask)
    if backend == "cpp":
        return cpp_attention(q, k, v, mask)
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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """The CPU's kernels: one query token per row in C++; blocks of queries (prefill, the encoder) in torch's
    sdpa, which already is a fused CPU kernel. mask (B or 1, 1, T, S) bool or None."""
    if q.device.type != "cpu":
        raise ConfigError(f"attention backend 'cpp' runs on the CPU; got tensors on {q.device}")
    if q.shape[2] != 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    if not cpu_kernel_ready():
        raise ConfigError("attention backend 'cpp' cannot run: its kernel could not be built (see the log)")
    from .kernels.cpu_attention import decode_attention

    visible = None if mask is None else mask.reshape(mask.shape[0], mask.shape[-1])  # (B|1,1,1,S) -> (B|1,S)
    return decode_attention(q, k, v, visible)


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
