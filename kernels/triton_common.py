"""What the Triton kernels share: triton imported if installed, `jit`, input checks, and for the attention
kernels the plain-torch definition their references apply, their default tiles, the query-block load, and
the steps of the online softmax (start, key-block update, division).

"Lazily" means guarded: without triton installed every module still imports and every reference runs;
only launching a kernel needs triton. Triton decides once, when it is first imported, whether kernels are
compiled for the GPU or run by its numpy interpreter (TRITON_INTERPRET=1): that switch must be set before
anything imports triton, which is why tests/conftest.py sets it on machines without CUDA. This module is
imported only by the Triton kernels and by attention dispatch on CUDA, so the CPU path never pays for
importing triton.
"""

from __future__ import annotations

import torch

from minaf3.errors import ConfigError

try:
    import triton
    import triton.language as tl
except ImportError:  # the references still work; is_available() says False
    triton = None
    tl = None

# Read once, like triton itself: kernels decorated below this point follow the state at import time.
# The kernels compute exp(x) as exp2(x * LOG2E), folded into the score scale (one multiply fewer per score).
LOG2E = 1.4426950408889634  # log2(e)
INTERPRET = bool(triton is not None and triton.knobs.runtime.interpret)


def jit(fn):
    """`triton.jit` when triton is installed; otherwise the plain function, which is never launched."""
    return triton.jit(fn) if triton is not None else fn


def is_available(device: torch.device | str | None = None) -> bool:
    """Whether the kernels can run on `device` (default: CUDA when present, else CPU).

    CUDA needs triton and a GPU; any device works under the interpreter (numpy, slow: for tests).
    """
    if triton is None:
        return False
    if INTERPRET:
        return True
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def check_launchable(name: str, *tensors: torch.Tensor) -> None:
    """Raise ConfigError unless `name` can launch on these tensors (one device, kernels available there)."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ConfigError(f"{name}: tensors are on different devices {sorted(map(str, devices))}")
    device = devices.pop()
    if not is_available(device):
        why = (
            "triton is not installed"
            if triton is None
            else "Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported"
        )
        raise ConfigError(f"{name}: cannot run on {device}: {why}")


def tile(name: str, value: int | None, default: int) -> int:
    """A tile-size override, checked (a power of two >= 16, the least tl.dot accepts), or the default."""
    if value is None:
        return default
    if value < 16 or value & (value - 1):
        raise ConfigError(f"{name}: tile size {value} must be a power of two >= 16")
    return value


def check_attention_inputs(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    query_pos: torch.Tensor | None,
) -> tuple[int, int, int, int, int, int]:
    """Validate `attention()`'s signature (minaf3/attention.py) without reading tensor values (no host sync).

    q (B, Hq, T, D), k and v (B, Hkv, S, D), key_mask (B, S) bool, query_pos (T,) integer.
    Returns (B, Hq, Hkv, T, S, D).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ConfigError(f"{name}: q, k, v must be 4-D (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    B, Hq, T, D = q.shape
    Bk, Hkv, S, Dk = k.shape
    if k.shape != v.shape or Bk != B or Dk != D:
        shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        raise ConfigError(f"{name}: k and v must both be (B={B}, Hkv, S, D={D}); got {shapes}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ConfigError(f"{name}: {Hq} query heads are not a multiple of {Hkv} key/value heads")
    if D < 16 or D & (D - 1):
        raise ConfigError(f"{name}: head dim {D} must be a power of two >= 16")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ConfigError(
            f"{name}: q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if INTERPRET and q.dtype == torch.bfloat16:
        # triton 3.9's interpreter multiplies bf16 bit patterns as integers in tl.dot: refuse, not garbage
        raise ConfigError(f"{name}: the Triton interpreter computes bf16 tl.dot wrongly; use float32/float16")
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, S)):
        raise ConfigError(
            f"{name}: key_mask must be bool (B={B}, S={S}); got {key_mask.dtype} {tuple(key_mask.shape)}"
        )
    if query_pos is not None and (query_pos.dtype.is_floating_point or tuple(query_pos.shape) != (T,)):
        raise ConfigError(
            f"{name}: query_pos must be integer (T={T},); got {query_pos.dtype} {tuple(query_pos.shape)}"
        )
    return B, Hq, Hkv, T, S, D


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over the visible keys, in fp32: what every attention kernel must match.

    q (B, Hq, T, D), k/v (B, Hkv, S, D) -> (B, Hq, T, D) in q's dtype; visible bool, broadcastable to
    (B, Hq, T, S). A query with no visible key outputs zeros (as the kernels' l == 0 case).
    """
    D, G = q.shape[-1], q.shape[1] // k.shape[1]
    # (B, Hkv, S, D) -> (B, Hq, S, D): each key/value head serves G consecutive query heads
    k = k.repeat_interleave(G, dim=1).float()
    v = v.repeat_interleave(G, dim=1).float()
    scores = q.float() @ k.transpose(-1, -2) * D**-0.5  # (B, Hq, T, S)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = scores.softmax(dim=-1).nan_to_num(0.0)  # rows with no visible key: 0/0 -> 0
    return (probs @ v).to(q.dtype)


def default_blocks(head_dim: int, dtype: torch.dtype, wide_stages: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a flash-attention kernel: tiles that fit shared memory for
    this head dim and dtype. wide_stages: the kernel's pipeline depth for 16-bit head dims above 64."""
    if dtype == torch.float32:  # 4-byte tiles: halve the key block so K and V stages still fit
        return 64, 32, 4, 2
    return (128, 64, 8, 3) if head_dim <= 64 else (64, 64, 4, wide_stages)


@jit
def load_query_block(
    q_ptr, sqb, sqh, sqt, sqd, Hq, T,
    GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Prologue of a program of grid (cdiv(T, BLOCK_M), B * Hq), BLOCK_M queries of one (row, query head).

    Returns (b, h, kvh, offs_m, offs_d, q): row b (int64: b * stride spans the whole cache), query head h,
    its key/value head kvh, query indices offs_m (BLOCK_M,), dims offs_d (HEAD_DIM,), and the queries q
    (BLOCK_M, HEAD_DIM), zero past T.
    """
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd
    q = tl.load(q_rows, mask=offs_m[:, None] < T, other=0.0)  # (BLOCK_M, HEAD_DIM)
    return b, h, h // GROUPS, offs_m, offs_d, q


@jit
def online_softmax_start(ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The empty softmax state (m_i, l_i, acc) of ROWS queries: running max, row sum, unnormalised output.

    A row that never sees a key keeps m = -1e30 and l = 0, which is what decode's reduce weighs at nothing.
    """
    # A finite start for the running max keeps exp2(m_old - m_new) at 0 or 1, never exp2(-inf + inf) = NaN,
    # when a whole key block of a row is masked out (left padding does that to a prefill's first blocks).
    m_i = tl.full((ROWS,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, HEAD_DIM), dtype=tl.float32)
    return m_i, l_i, acc


@jit
def online_softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """Fold one key block into the softmax state and return the new (m_i, l_i, acc).

    q (ROWS, HEAD_DIM); k, v (BLOCK_N, HEAD_DIM); visible: bool, (ROWS, BLOCK_N) or (1, BLOCK_N), False
    hides a key from a query. qk_scale is D**-0.5 * log2(e): the exponentials are taken base 2.
    """
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (ROWS, BLOCK_N), log2 units
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@jit
def online_softmax_finish(acc, l_i):
    """The attention output (ROWS, HEAD_DIM) in fp32 from the final state."""
    return acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l == 0: no visible key, acc == 0, output 0
