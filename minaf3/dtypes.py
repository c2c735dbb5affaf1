"""The dtype a model computes in: one decision, made here.

    DTYPES                               the names minaf3 accepts: float32, bfloat16, float16
    cpu_has_native_bf16()                whether this CPU multiplies bf16 in hardware (/proc/cpuinfo)
    stored_dtype(folder)                 the checkpoint's dtype (config.json's dtype / torch_dtype)
    resolve_dtype(dtype, device, folder) what from_pretrained loads in, before the memory check
                                         (estimate.weights_dtype, which may fall back to the stored dtype)

The rule: a dtype asked for is used. By default ("automatic", None) the checkpoint's dtype on CUDA, and on a
CPU the checkpoint's bf16 only where the CPU has bf16 instructions (AVX-512 BF16, AMX, Arm's BF16): elsewhere
torch emulates bf16 and fp16 products through float32 conversions, several times slower than float32 itself,
so the model computes in float32. "auto" means the checkpoint's dtype everywhere.
"""

import functools
import json
from pathlib import Path

import torch

from .errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# /proc/cpuinfo flags of instructions that multiply bf16 natively: AVX-512 BF16 (Zen 4, Cooper Lake and
# later), AMX (Sapphire Rapids), Arm's BF16 extension.
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


@functools.cache
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when this CPU multiplies bf16 natively (see NATIVE_BF16_FLAGS); False when unknown."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return not NATIVE_BF16_FLAGS.isdisjoint(flags.partition(":")[2].split())


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype config.json says the weights were saved in (transformers 5's `dtype`, 4's `torch_dtype`);
    float32 when it says nothing minaf3 knows."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return DTYPES.get(config.get("dtype") or config.get("torch_dtype"), torch.float32)


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device, folder: Path) -> torch.dtype:
    """The dtype to load `folder` in on `device`: `dtype` as asked, or the default rule (module docstring).

    Raises ConfigError for a dtype minaf3 does not run.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype={dtype}: expected one of {sorted(DTYPES)}")
        return dtype
    if dtype not in (None, "auto") and dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: expected 'auto' or one of {sorted(DTYPES)}")
    if dtype in DTYPES:
        return DTYPES[dtype]
    saved = stored_dtype(folder)
    if device.type == "cuda" or dtype == "auto":
        return saved
    return saved if saved == torch.bfloat16 and cpu_has_native_bf16() else torch.float32
