"""Racing contenders in turns, and the machine's rates the limits are computed from (tools/bench*.py).

    race(candidates, repeats)          best wall time of each callable, raced in turns
    decode_race(runs, n, repeats)      seconds per decode step, with the prefill cancelled out
    rate_probes() / rates(times)       a 2048^3 float32 product and a sum over 1 GiB -> FLOP/s, bytes/s
    cpu_summary()                      the CPU's name and the vector flags minaf3's kernels and dtypes follow

The machine is shared and its speed drifts by 1.5x within minutes: contenders timed one after the other
would meet different machines, so each turn runs every contender once, and a time is the best turn.
"""

import math
import platform
import time
from pathlib import Path

import torch

from minaf3.linear import ONEDNN
from minaf3.weights.buffers import streamed_empty

GIB = 2**30
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_summary() -> str:
    """'<CPU model name>; flags: avx2 fma ...': the /proc/cpuinfo flags among VECTOR_FLAGS."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    present = [flag for flag in VECTOR_FLAGS if flag in flags]
    return f"{name}; flags: {' '.join(present) or 'none of ' + ' '.join(VECTOR_FLAGS)}"


def race(candidates: dict, repeats: int) -> dict:
    """Best wall time (s) of each zero-argument callable: one warm-up call each, then `repeats` turns."""
    for fn in candidates.values():
        fn()
    times = dict.fromkeys(candidates, math.inf)
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - start)
    return times


def decode_race(runs: dict, n: int, repeats: int, extra: dict | None = None) -> dict:
    """Seconds per decode step of each `runs[name](k)` (generates k tokens): (t(n) - t(1)) / (n - 1), so
    the prefill cancels out; `extra` callables are raced alongside and their plain best times returned."""
    candidates = dict(extra or {})
    for name, run in runs.items():
        candidates[name, n] = lambda run=run: run(n)
        candidates[name, 1] = lambda run=run: run(1)
    times = race(candidates, repeats)
    return {name: (times[name, n] - times[name, 1]) / (n - 1) for name in runs} | {
        k: times[k] for k in extra or {}
    }


def rate_probes() -> dict:
    """A 2048^3 float32 product by torch's default (MKL) and by oneDNN (what minaf3 uses for large layers;
    the faster sets the limit), and a sum over 1 GiB."""
    # The read probe's pages are 2 MiB like the weights minaf3 makes at load time (streamed_empty): the limit
    # is what this machine's memory gives at its best, not what 4 KiB pages let through.
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    x = streamed_empty((GIB // 4,), torch.float32).normal_()
    onednn = {"onednn": lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")}
    return {"matmul": lambda: a @ b, "read": lambda: x.sum()} | (onednn if ONEDNN else {})


def rates(times: dict) -> tuple[float, float]:
    """(fp32 FLOP/s, read bytes/s) from the raced `rate_probes`."""
    return 2 * 2048**3 / min(times["matmul"], times.get("onednn", math.inf)), GIB / times["read"]
