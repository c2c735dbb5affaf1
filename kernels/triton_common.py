"""What the Triton kernels share: triton imported if installed, `jit`, and input checks.

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
    """Validate the attention signature of CONTRACTS.md without reading tensor values (no host sync).

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
