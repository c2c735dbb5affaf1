"""Fused residual add + RMSNorm, and rotary position embedding (rotate-half), for the Qwen2 decoder.

At batch 1 a decoder layer is a handful of GEMVs and a dozen small element-wise ops; each small op is a
kernel launch and a round trip of the hidden state through memory. Two fusions remove most of them:

- `add_rms_norm`: h = x + residual and y = RMSNorm(h) in one pass, writing both (h is the next residual
  stream). `rms_norm` is the same kernel without the add.
- `apply_rotary`: rotates q and k of one token in one program, instead of the cat/neg/mul/add chain.

Both reproduce transformers' rounding: RMSNorm in fp32, cast to the input dtype, then times the weight
(Qwen2RMSNorm); rotary as q * cos + rotate_half(q) * sin with each product rounded to the input dtype
(apply_rotary_pos_emb). In fp32 the casts are no-ops; in bf16 they keep the kernels within one rounding of
the reference.
"""

from __future__ import annotations

import torch

from minaf3.errors import ConfigError

from .triton_common import check_launchable, jit, tl, triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm: x (..., H), weight (H,) -> (..., H) in x's dtype; statistics in fp32."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual, then RMSNorm(h): returns (normed (..., H), h (..., H))."""
    h = x + residual
    return rms_norm_reference(h, weight, eps), h


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb: q (B, Hq, T, D), k (B, Hk, T, D), cos/sin (B, T, D) or (T, D)."""
    # (B, T, D) -> (B, 1, T, D) or (T, D) -> (1, 1, T, D): one angle per position, shared by all heads
    cos, sin = (c.unsqueeze(-3) if c.dim() == 3 else c[None, None] for c in (cos, sin))
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


@jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, sx, sr, sy, sh, H, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    # grid: (rows,); one program = one token's hidden vector, held whole in registers
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    inside = offs < H
    x = tl.load(x_ptr + row * sx + offs, mask=inside, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * sr + offs, mask=inside, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like torch's x + residual
        tl.store(h_ptr + row * sh + offs, x, mask=inside)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
    normed = (xf * rstd).to(x.dtype)  # Qwen2RMSNorm casts back before the weight
    w = tl.load(w_ptr + offs, mask=inside, other=0.0)
    tl.store(y_ptr + row * sy + offs, (normed.to(tl.float32) * w.to(tl.float32)).to(x.dtype), mask=inside)


def _rms_norm_launch(
    name: str, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    H = x.shape[-1]
    if weight.shape != (H,) or weight.dtype != x.dtype:
        got = f"{tuple(weight.shape)} {weight.dtype}"
        raise ConfigError(f"{name}: weight must be ({H},) {x.dtype}; got {got}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        got = f"{tuple(residual.shape)} {residual.dtype}"
        raise ConfigError(f"{name}: residual must match x {tuple(x.shape)} {x.dtype}; got {got}")
    tensors = (x, weight) if residual is None else (x, weight, residual)
    check_launchable(name, *tensors)
    # (..., H) -> (N, H) with unit stride along H, so a row is one contiguous load
    x2 = x.reshape(-1, H).contiguous()
    r2 = residual.reshape(-1, H).contiguous() if residual is not None else x2
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if residual is not None else y
    block = triton.next_power_of_2(H)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight.contiguous(), y, h, x2.stride(0), r2.stride(0), y.stride(0), h.stride(0), H, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_H=block, num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return y.view(x.shape), (h.view(x.shape) if residual is not None else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm by the Triton kernel: x (..., H), weight (H,) same dtype -> (..., H)."""
    return _rms_norm_launch("rms_norm", x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual and RMSNorm(h) in one kernel: returns (normed (..., H), h (..., H))."""
    y, h = _rms_norm_launch("add_rms_norm", x, residual, weight, eps)
    return y, h


@jit
def _rotate_heads(x_ptr, o_ptr, sxh, sxd, soh, sod, n_heads, c1, c2, s1, s2, half, BLOCK_H: tl.constexpr,
                  BLOCK_D: tl.constexpr):  # fmt: skip
    # x_ptr/o_ptr point at one token's heads: tile (BLOCK_H heads, BLOCK_D of each half)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    inside = (offs_h[:, None] < n_heads) & (offs_d[None, :] < half)
    x_lo = x_ptr + offs_h[:, None] * sxh + offs_d[None, :] * sxd
    o_lo = o_ptr + offs_h[:, None] * soh + offs_d[None, :] * sod
    x1 = tl.load(x_lo, mask=inside, other=0.0)
    x2 = tl.load(x_lo + half * sxd, mask=inside, other=0.0)
    dt = x1.dtype
    # rotate_half(x) = (-x2, x1): out = (x1 cos1 - x2 sin1, x2 cos2 + x1 sin2), each product rounded to dtype
    out1 = (x1 * c1[None, :]).to(dt).to(tl.float32) - (x2 * s1[None, :]).to(dt).to(tl.float32)
    out2 = (x2 * c2[None, :]).to(dt).to(tl.float32) + (x1 * s2[None, :]).to(dt).to(tl.float32)
    tl.store(o_lo, out1.to(dt), mask=inside)
    tl.store(o_lo + half * sod, out2.to(dt), mask=inside)


@jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, T, Hq, Hk, half,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, sqob, sqoh, sqot, sqod, skob, skoh, skot, skod,
    scb, sct, scd, ssb, sst, ssd,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # grid: (B * T,); one program = every q and k head of one token, which share its cos/sin
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = pid % T
    offs_d = tl.arange(0, BLOCK_D)
    inside = offs_d < half
    cos_row = cos_ptr + b * scb + t * sct
    sin_row = sin_ptr + b * ssb + t * sst
    c1 = tl.load(cos_row + offs_d * scd, mask=inside, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + (offs_d + half) * scd, mask=inside, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + offs_d * ssd, mask=inside, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + (offs_d + half) * ssd, mask=inside, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + b * sqb + t * sqt, qo_ptr + b * sqob + t * sqot, sqh, sqd, sqoh, sqod, Hq,
                  c1, c2, s1, s2, half, BLOCK_HQ, BLOCK_D)  # fmt: skip
    _rotate_heads(k_ptr + b * skb + t * skt, ko_ptr + b * skob + t * skot, skh, skd, skoh, skod, Hk,
                  c1, c2, s1, s2, half, BLOCK_HK, BLOCK_D)  # fmt: skip


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding by the Triton kernel: q (B, Hq, T, D), k (B, Hk, T, D), cos/sin (B, T, D) or (T, D).

    Any strides (a (B, T, H, D) buffer seen through .transpose(1, 2) works); outputs keep q's and k's
    memory layout.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        got = f"{tuple(q.shape)}, {tuple(k.shape)}"
        raise ConfigError(f"apply_rotary: q (B, Hq, T, D) and k (B, Hk, T, D) expected; got {got}")
    B, Hq, T, D = q.shape
    Hk = k.shape[1]
    if D % 2:
        raise ConfigError(f"apply_rotary: head dim {D} must be even")
    if q.dtype != k.dtype:
        raise ConfigError(f"apply_rotary: q and k must share a dtype; got {q.dtype}, {k.dtype}")
    for name, c in (("cos", cos), ("sin", sin)):
        if c.shape not in ((B, T, D), (T, D)):
            got = tuple(c.shape)
            raise ConfigError(f"apply_rotary: {name} must be (B={B}, T={T}, D={D}) or (T, D); got {got}")
    check_launchable("apply_rotary", q, k, cos, sin)
    # (T, D) -> (B, T, D) as a stride-0 view: no copy, every row reads the same angles
    cos, sin = (c.expand(B, T, D) for c in (cos, sin))
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    half = D // 2
    _rotary_kernel[(B * T,)](
        q, k, cos, sin, q_out, k_out, T, Hq, Hk, half,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), *cos.stride(), *sin.stride(),
        BLOCK_HQ=triton.next_power_of_2(Hq), BLOCK_HK=triton.next_power_of_2(Hk),
        BLOCK_D=triton.next_power_of_2(half), num_warps=4,
    )  # fmt: skip
    return q_out, k_out


__all__ = [
    "add_rms_norm",
    "add_rms_norm_reference",
    "apply_rotary",
    "apply_rotary_reference",
    "rms_norm",
    "rms_norm_reference",
]
