"""Bidirectional flash attention for the Whisper encoder, with a key-padding mask.

Every query sees every valid key of its row: softmax(q k^T * D**-0.5 + mask) v. The kernel never
materialises the (T, S) score matrix: one program owns BLOCK_M queries of one head and streams the keys
in blocks of BLOCK_N, keeping the running row max `m`, row sum `l` and unnormalised output `acc` in fp32
(online softmax). Exponentials are taken base 2 with log2(e) folded into the scale, which is what the
hardware computes natively.

The padding can be given two ways. A (B, S) bool `key_mask` is read block by block. Per-row valid lengths
`valid_len` (B,) say more: keys past the length are never loaded, so a window holding 5 s of audio costs
a sixth of a full one in the key loop. (The encoder knows lengths; the mask form serves the generic
`attention()` signature.) A row with no valid key outputs zeros, as torch's scaled_dot_product_attention
does (since 2.5): its softmax is 0/0, and a NaN there would reach real rows of the next layer as 0 * NaN.

Heads: Hq query heads over Hkv = Hq / G key/value heads (Whisper has G = 1; grouping costs nothing here).
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

MASK_NONE, MASK_BOOL, MASK_LENGTHS = 0, 1, 2


def encoder_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    valid_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch bidirectional attention in fp32: q (B, Hq, T, D), k/v (B, Hkv, S, D) -> (B, Hq, T, D).

    key_mask (B, S) bool and/or valid_len (B,): key j of row b is visible iff key_mask[b, j] and
    j < valid_len[b]. A query with no visible key outputs zeros.
    """
    B, S = q.shape[0], k.shape[2]
    visible = torch.ones(B, S, dtype=torch.bool, device=q.device)
    if key_mask is not None:
        visible &= key_mask
    if valid_len is not None:
        visible &= torch.arange(S, device=q.device)[None, :] < valid_len[:, None]
    return masked_attention(q, k, v, visible[:, None, None, :])


@jit
def _encoder_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, mask_ptr, len_ptr,
    sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sot, sod, smb, sms,
    Hq, T, S, qk_scale,
    GROUPS: tl.constexpr, MASK_MODE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # grid: (cdiv(T, BLOCK_M), B * Hq); one program = BLOCK_M queries of one (row, head)
    b, h, kvh, offs_m, offs_d, q = load_query_block(
        q_ptr, sqb, sqh, sqt, sqd, Hq, T, GROUPS, BLOCK_M, HEAD_DIM
    )
    offs_n = tl.arange(0, BLOCK_N)
    k_base = k_ptr + b * skb + kvh * skh + offs_d[None, :] * skd
    v_base = v_ptr + b * svb + kvh * svh + offs_d[None, :] * svd

    if MASK_MODE == 2:  # lengths: keys past the row's length are never loaded
        hi = tl.minimum(tl.load(len_ptr + b).to(tl.int32), S)
    else:
        hi = S

    m_i, l_i, acc = online_softmax_start(BLOCK_M, HEAD_DIM)
    for start in range(0, hi, BLOCK_N):
        keys = start + offs_n
        valid = keys < hi
        if MASK_MODE == 1:
            valid &= tl.load(mask_ptr + b * smb + keys * sms, mask=valid, other=0) != 0
        k = tl.load(k_base + keys[:, None] * sks, mask=valid[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
        v = tl.load(v_base + keys[:, None] * svs, mask=valid[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_step(q, k, v, valid[None, :], m_i, l_i, acc, qk_scale, DOT_PRECISION)

    out = online_softmax_finish(acc, l_i)
    o_rows = o_ptr + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod
    tl.store(o_rows, out.to(o_ptr.dtype.element_ty), mask=offs_m[:, None] < T)


def encoder_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    valid_len: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Bidirectional attention by the Triton kernel: q (B, Hq, T, D), k/v (B, Hkv, S, D) -> (B, Hq, T, D).

    Give the padding as key_mask (B, S) bool or valid_len (B,) integer (preferred: padded keys are
    skipped, not just masked), not both. Scale D**-0.5. block_m/block_n override the tile sizes (tests use
    small tiles to cross block edges on small inputs).
    """
    B, Hq, Hkv, T, S, D = check_attention_inputs("encoder_attention", q, k, v, key_mask, None)
    if key_mask is not None and valid_len is not None:
        raise ConfigError("encoder_attention: give key_mask or valid_len, not both")
    if valid_len is not None and (valid_len.dtype.is_floating_point or tuple(valid_len.shape) != (B,)):
        got = f"{valid_len.dtype} {tuple(valid_len.shape)}"
        raise ConfigError(f"encoder_attention: valid_len must be integer (B={B},); got {got}")
    extras = [t for t in (key_mask, valid_len) if t is not None]
    check_launchable("encoder_attention", q, k, v, *extras)

    bm, bn, num_warps, num_stages = default_blocks(D, q.dtype, wide_stages=2)
    bm, bn = tile("encoder_attention", block_m, bm), tile("encoder_attention", block_n, bn)
    out = torch.empty_like(q)
    if key_mask is not None:
        mode, mask, lengths = MASK_BOOL, key_mask.view(torch.uint8), q  # q: an unused placeholder pointer
    elif valid_len is not None:
        mode, mask, lengths = MASK_LENGTHS, q, valid_len
    else:
        mode, mask, lengths = MASK_NONE, q, q
    mask_strides = mask.stride() if mode == MASK_BOOL else (0, 0)
    grid = (triton.cdiv(T, bm), B * Hq)
    _encoder_attention_kernel[grid](
        q, k, v, out, mask, lengths,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides,
        Hq, T, S, D**-0.5 * LOG2E,
        GROUPS=Hq // Hkv, MASK_MODE=mode, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


__all__ = ["encoder_attention", "encoder_attention_reference"]
