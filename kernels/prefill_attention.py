"""Causal prefill attention over a static cache: left padding, GQA, queries placed at cache slots.

Query i of a row sits at cache slot query_pos[i] and sees slot j iff j <= query_pos[i] and key_mask[b, j],
and always its own slot j == query_pos[i]. That last rule is what keeps left-padded rows finite: a padding
query masks every key of its prefix, and without its own slot its softmax would be 0/0. The other rules are
the semantics of `attention()` (minaf3/attention.py's module docstring); the decoder writes the new keys
into the cache first, so the slots of this call's own tokens are already filled.

`own_slot=False` drops that last rule for callers that follow torch's sdpa instead: a query that sees no
key then outputs zeros (so does the kernel, for any row with no visible key).

The kernel is flash attention (encoder_attention.py explains the online softmax; its steps live in
triton_common.py) with two changes:
- causal skipping: a block of queries stops its key loop after the largest slot among its queries, so a
  prompt of T tokens does about half the T x T work, and a chunk appended at the end of a long cache
  reads only the filled part;
- GQA: Qwen2 has 28 query heads over 4 key/value heads; query head h reads key/value head h // G.
"""

from __future__ import annotations

import torch

from minaf3.errors import ConfigError

from .triton_common import (
    LOG2E,
    check_attention_inputs,
    check_launchable,
    default_blocks,
    jit,
    load_query_block,
    masked_attention,
    online_softmax_finish,
    online_softmax_start,
    online_softmax_step,
    tile,
    tl,
    triton,
)


def prefill_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    query_pos: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    own_slot: bool = True,
) -> torch.Tensor:
    """Plain-torch causal attention in fp32: q (B, Hq, T, D), k/v (B, Hkv, S, D) -> (B, Hq, T, D).

    query_pos (T,) cache slots of the queries; key_mask (B, S) bool, None for all slots filled; own_slot:
    a query always sees its own slot. A query with no visible key outputs zeros.
    """
    B, S = q.shape[0], k.shape[2]
    slots = torch.arange(S, device=q.device)
    qp = query_pos.to(slots.dtype)[:, None]  # (T, 1)
    filled = key_mask if key_mask is not None else torch.ones(B, S, dtype=torch.bool, device=q.device)
    # (B, 1, T, S): causal by slot, masked keys hidden, own slot visible if asked
    seen = filled[:, None, None, :] | (slots == qp) if own_slot else filled[:, None, None, :]
    visible = (slots[None, None, None, :] <= qp) & seen
    return masked_attention(q, k, v, visible)


@jit
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, mask_ptr, qpos_ptr,
    sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sot, sod, smb, sms,
    Hq, T, S, qk_scale,
    GROUPS: tl.constexpr, HAS_MASK: tl.constexpr, OWN_SLOT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # grid: (cdiv(T, BLOCK_M), B * Hq); one program = BLOCK_M queries of one (row, query head)
    b, h, kvh, offs_m, offs_d, q = load_query_block(
        q_ptr, sqb, sqh, sqt, sqd, Hq, T, GROUPS, BLOCK_M, HEAD_DIM
    )
    offs_n = tl.arange(0, BLOCK_N)
    in_range = offs_m < T
    # Rows past T pretend to sit at slot 0: they see one key, stay finite, and are never stored.
    qp = tl.load(qpos_ptr + offs_m, mask=in_range, other=0).to(tl.int32)  # (BLOCK_M,)
    hi = tl.minimum(tl.max(qp, axis=0) + 1, S)  # causal skipping: no query of the block looks further
    k_base = k_ptr + b * skb + kvh * skh + offs_d[None, :] * skd
    v_base = v_ptr + b * svb + kvh * svh + offs_d[None, :] * svd

    m_i, l_i, acc = online_softmax_start(BLOCK_M, HEAD_DIM)
    for start in range(0, hi, BLOCK_N):
        keys = start + offs_n
        in_cache = keys < hi
        k = tl.load(k_base + keys[:, None] * sks, mask=in_cache[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
        v = tl.load(v_base + keys[:, None] * svs, mask=in_cache[:, None], other=0.0)
        visible = (keys[None, :] <= qp[:, None]) & in_cache[None, :]  # (BLOCK_M, BLOCK_N)
        if HAS_MASK:
            filled = tl.load(mask_ptr + b * smb + keys * sms, mask=in_cache, other=0) != 0
            if OWN_SLOT:
                visible &= filled[None, :] | (keys[None, :] == qp[:, None])
            else:
                visible &= filled[None, :]
        m_i, l_i, acc = online_softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale, DOT_PRECISION)

    out = online_softmax_finish(acc, l_i)
    o_rows = o_ptr + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod
    tl.store(o_rows, out.to(o_ptr.dtype.element_ty), mask=in_range[:, None])


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    query_pos: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    own_slot: bool = True,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Causal attention by the Triton kernel: q (B, Hq, T, D), k/v (B, Hkv, S, D) -> (B, Hq, T, D).

    query_pos (T,) integer cache slots of the queries (each < S); key_mask (B, S) bool marks filled,
    non-padding slots (None: all); own_slot: a query always sees its own slot, else (as attention() asks) a
    query with no visible key outputs zeros (torch's sdpa). Scale D**-0.5. block_m/block_n override the
    tile sizes.
    """
    if query_pos is None:
        raise ConfigError("prefill_attention: query_pos is required (bidirectional: encoder_attention)")
    B, Hq, Hkv, T, S, D = check_attention_inputs("prefill_attention", q, k, v, key_mask, query_pos)
    extras = [key_mask] if key_mask is not None else []
    check_launchable("prefill_attention", q, k, v, query_pos, *extras)

    bm, bn, num_warps, num_stages = default_blocks(D, q.dtype, wide_stages=3)
    bm, bn = tile("prefill_attention", block_m, bm), tile("prefill_attention", block_n, bn)
    out = torch.empty_like(q)
    mask = key_mask.view(torch.uint8) if key_mask is not None else q  # q: an unused placeholder pointer
    mask_strides = mask.stride() if key_mask is not None else (0, 0)
    grid = (triton.cdiv(T, bm), B * Hq)
    _prefill_attention_kernel[grid](
        q, k, v, out, mask, query_pos,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides,
        Hq, T, S, D**-0.5 * LOG2E,
        GROUPS=Hq // Hkv, HAS_MASK=key_mask is not None, OWN_SLOT=own_slot, HEAD_DIM=D,
        BLOCK_M=bm, BLOCK_N=bn,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


__all__ = ["prefill_attention", "prefill_attention_reference"]
