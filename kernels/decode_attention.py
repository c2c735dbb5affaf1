"""Decode attention: one new token per row over the static GQA KV cache, split along the sequence.

At decode time there is one query per (row, head), so a kernel that gives each head one program puts
B * Hkv programs on a GPU with ~100 SMs and leaves most of them idle while each walks the whole cache.
Flash-decoding splits the cache into NUM_SPLITS contiguous chunks instead:

1. `_decode_partial_kernel`, grid (B * Hkv, NUM_SPLITS): one program attends the G query heads that share
   a key/value head (so every cache byte is read once, not G times) over one chunk, and writes the chunk's
   softmax state: running max m, sum l and unnormalised output acc, in fp32.
2. `_decode_reduce_kernel`, grid (B * Hq,): merges the states exactly. With M = max_s m_s,
   out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s. A chunk with no visible key has m = -1e30 and
   l = 0, so it weighs nothing.

The chunk length is computed inside the kernel from the filled length query_pos + 1, not from the cache
size S: early in generation the work still spreads over all splits, and no host synchronisation is needed
to learn the length (the step can be captured in a CUDA graph).

Visibility is that of `attention()` (minaf3/attention.py's module docstring): slot j is visible iff
j <= query_pos and key_mask[b, j], and with own_slot=True (the default; attention() passes False, torch's
sdpa convention) the query's own slot always is. Without query_pos the
query sees every slot key_mask allows. A query that sees no slot outputs zeros, as sdpa's does.
"""

from __future__ import annotations

import torch

from minaf3.errors import ConfigError

from .triton_common import (
    LOG2E,
    check_attention_inputs,
    check_launchable,
    jit,
    masked_attention,
    online_softmax_start,
    online_softmax_step,
    tile,
    tl,
    triton,
)

MAX_SPLITS = 64  # the reduce kernel holds all splits of one head at once: (64, D) fp32 is small
MIN_GROUP_BLOCK = 16  # tl.dot needs at least 16 rows: the G query heads of a group are padded up to it


def decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    query_pos: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    own_slot: bool = True,
) -> torch.Tensor:
    """Plain-torch single-token attention in fp32: q (B, Hq, 1, D), k/v (B, Hkv, S, D) -> (B, Hq, 1, D).

    query_pos (1,) the cache slot of the new token (None: no causal limit); key_mask (B, S) bool;
    own_slot: the token always sees its own slot. A query with no visible key outputs zeros.
    """
    B, S = q.shape[0], k.shape[2]
    slots = torch.arange(S, device=q.device)
    visible = torch.ones(B, S, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
    if query_pos is not None:
        qp = query_pos.to(slots.dtype)  # (1,)
        if own_slot:
            visible = visible | (slots == qp)[None, :]
        visible = visible & (slots <= qp)[None, :]  # (B, S)
    return masked_attention(q, k, v, visible[:, None, None, :])


@jit
def _decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, qpos_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    sqb, sqh, sqd, skb, skh, sks, skd, svb, svh, svs, svd, smb, sms,
    Hkv, S, qk_scale,
    GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, NUM_SPLITS: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, OWN_SLOT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # grid: (B * Hkv, NUM_SPLITS); one program = the G query heads of one key/value head over one chunk
    pid_bk = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bk // Hkv).to(tl.int64)
    kvh = pid_bk % Hkv
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_group = offs_g < GROUPS
    heads = kvh * GROUPS + offs_g  # query heads of this group, (BLOCK_G,)

    q_rows = q_ptr + b * sqb + heads[:, None] * sqh + offs_d[None, :] * sqd
    q = tl.load(q_rows, mask=in_group[:, None], other=0.0)  # (BLOCK_G, HEAD_DIM)
    if CAUSAL:
        qp = tl.load(qpos_ptr).to(tl.int32)
        ctx = tl.minimum(qp + 1, S)
    else:
        ctx = S
    # Chunks are whole key blocks; the last splits may get none when the context is short.
    chunk = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, ctx)
    k_base = k_ptr + b * skb + kvh * skh + offs_d[None, :] * skd
    v_base = v_ptr + b * svb + kvh * svh + offs_d[None, :] * svd

    m_i, l_i, acc = online_softmax_start(BLOCK_G, HEAD_DIM)
    for start in range(lo, hi, BLOCK_N):
        keys = start + offs_n
        visible = keys < hi
        k = tl.load(k_base + keys[:, None] * sks, mask=visible[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
        v = tl.load(v_base + keys[:, None] * svs, mask=visible[:, None], other=0.0)
        if HAS_MASK:
            filled = tl.load(mask_ptr + b * smb + keys * sms, mask=visible, other=0) != 0
            if CAUSAL and OWN_SLOT:
                filled |= keys == qp  # the new token always sees itself
            visible &= filled
        m_i, l_i, acc = online_softmax_step(q, k, v, visible[None, :], m_i, l_i, acc, qk_scale, DOT_PRECISION)

    # partial state layout: m, l (B * Hq, NUM_SPLITS); acc (B * Hq, NUM_SPLITS, HEAD_DIM)
    state = (b * (Hkv * GROUPS) + heads) * NUM_SPLITS + split  # (BLOCK_G,)
    tl.store(part_m_ptr + state, m_i, mask=in_group)
    tl.store(part_l_ptr + state, l_i, mask=in_group)
    tl.store(part_acc_ptr + state[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=in_group[:, None])


@jit
def _decode_reduce_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, o_ptr, Hq, sob, soh, sod,
    NUM_SPLITS: tl.constexpr, SPLITS_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    # grid: (B * Hq,); one program merges the NUM_SPLITS partial states of one (row, query head)
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    real = offs_s < NUM_SPLITS
    m_s = tl.load(part_m_ptr + row * NUM_SPLITS + offs_s, mask=real, other=-1.0e30)  # (SPLITS_BLOCK,)
    l_s = tl.load(part_l_ptr + row * NUM_SPLITS + offs_s, mask=real, other=0.0)
    acc_rows = part_acc_ptr + (row * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :]
    acc = tl.load(acc_rows, mask=real[:, None], other=0.0)  # (SPLITS_BLOCK, HEAD_DIM)
    w = tl.exp2(m_s - tl.max(m_s, axis=0))  # each split's weight relative to the largest max
    total = tl.sum(w * l_s, axis=0)  # 0 only when no split saw a key: then acc == 0 and the output is 0
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(total == 0.0, 1.0, total)  # (HEAD_DIM,)
    b = row // Hq
    h = row % Hq
    tl.store(o_ptr + b * sob + h * soh + offs_d * sod, out.to(o_ptr.dtype.element_ty))


def _default_splits(programs: int, S: int, block_n: int, device: torch.device) -> int:
    """Splits that give the GPU about two programs per SM, without a split shorter than one key block."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(S, block_n), MAX_SPLITS))


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    query_pos: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    own_slot: bool = True,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Single-token attention by the split-K Triton kernels: q (B, Hq, 1, D), k/v (B, Hkv, S, D) -> q's shape.

    query_pos (1,) integer cache slot of the new token (< S); None: no causal limit. key_mask (B, S) bool.
    own_slot: the token always sees its own slot; False follows sdpa (no key -> zeros), as attention() does.
    num_splits (1..64) defaults to filling the GPU; block_n overrides the key tile size. Scale D**-0.5.
    """
    B, Hq, Hkv, T, S, D = check_attention_inputs("decode_attention", q, k, v, key_mask, query_pos)
    if T != 1:
        raise ConfigError(f"decode_attention: one query token per row expected; got T={T}")
    if num_splits is not None and not 1 <= num_splits <= MAX_SPLITS:
        raise ConfigError(f"decode_attention: num_splits must be in 1..{MAX_SPLITS}; got {num_splits}")
    extras = [t for t in (key_mask, query_pos) if t is not None]
    check_launchable("decode_attention", q, k, v, *extras)

    groups = Hq // Hkv
    bn = tile("decode_attention", block_n, 32 if q.dtype == torch.float32 else 64)  # fp32: half the keys
    splits = num_splits or _default_splits(B * Hkv, S, bn, q.device)
    part_acc = torch.empty(B * Hq, splits, D, dtype=torch.float32, device=q.device)
    part_m = torch.empty(B * Hq, splits, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    mask = key_mask.view(torch.uint8) if key_mask is not None else q  # q: an unused placeholder pointer
    mask_strides = mask.stride() if key_mask is not None else (0, 0)
    qpos = query_pos if query_pos is not None else q
    _decode_partial_kernel[(B * Hkv, splits)](
        q, k, v, mask, qpos, part_acc, part_m, part_l,
        q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(), *mask_strides,
        Hkv, S, D**-0.5 * LOG2E,
        GROUPS=groups, BLOCK_G=max(MIN_GROUP_BLOCK, triton.next_power_of_2(groups)), NUM_SPLITS=splits,
        CAUSAL=query_pos is not None, HAS_MASK=key_mask is not None, OWN_SLOT=own_slot, HEAD_DIM=D,
        BLOCK_N=bn,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2,
    )  # fmt: skip
    out = torch.empty_like(q)
    _decode_reduce_kernel[(B * Hq,)](
        part_acc, part_m, part_l, out, Hq, out.stride(0), out.stride(1), out.stride(3),
        NUM_SPLITS=splits, SPLITS_BLOCK=triton.next_power_of_2(splits), HEAD_DIM=D,
        num_warps=4,
    )  # fmt: skip
    return out


__all__ = ["decode_attention", "decode_attention_reference"]
