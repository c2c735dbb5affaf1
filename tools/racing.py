"""Racing contenders in turns, and the machine's rates the limits are computed from (tools/bench*.py).

    race(candidates, repeats)          best wall time of each callable, raced in turns
    decode_race(runs, n, repeats)      seconds per decode step, with the prefill cancelled out
    step_race(runs, repeats)           seconds per decode step, timed between streamed tokens
    rate_probes() / rates(times)       a 2048^3 float32 product and a sum over 1 GiB -> FLOP/s, bytes/s
    cpu_flags() / describe_cpu(...)    the CPU the run met: its name and /proc/cpuinfo flags, for the log

The machine is shared and its speed drifts by 1.5x within minutes: contenders timed one after the other
would meet different machines, so each turn runs every contender once, and a time is the best turn. The
order within a turn is drawn anew each turn (seeded, so a run can be repeated): what ran just before a call
(a sum over 1 GiB, another contender's weights in cache) changes its time, and a fixed order would give that
to the same contender every turn.
"""

import math
import os
import random
import time
from pathlib import Path

import torch
from minaf3.weights.buffers import streamed_empty

from minaf3.linear import ONEDNN

GIB = 2**30


def race(candidates: dict, repeats: int) -> dict:
    """Best wall time (s) of each zero-argument callable: one warm-up call each, then `repeats` turns."""
    for fn in candidates.values():
        fn()
    times = dict.fromkeys(candidates, math.inf)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        order = list(candidates)
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            candidates[name]()
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


class Clock:
    """A streamer (put, end) that notes when each piece arrives: the prompt, then each step's tokens."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def per_step(self) -> float:
        """Seconds per decode step: from the first new token (the prefill's) to the last."""
        if len(self.times) < 3:
            raise ValueError(
                f"a step time needs at least two new tokens; the streamer saw {len(self.times) - 1}"
            )
        return (self.times[-1] - self.times[1]) / (len(self.times) - 2)


def step_race(runs: dict, repeats: int) -> dict:
    """Seconds per decode step of each `runs[name](streamer)` (a generate call that streams to it), best of
    `repeats` turns after a warm-up: timed between the first and the last new token, so the prefill, which
    for a long prompt varies by more than all the steps take, is not in it (decode_race subtracts it)."""
    best = dict.fromkeys(runs, math.inf)
    shuffle = random.Random(0).shuffle
    for turn in range(repeats + 1):
        order = list(runs)
        shuffle(order)
        for name in order:
            clock = Clock()
            runs[name](clock)
            if turn:
                best[name] = min(best[name], clock.per_step())
    return best


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


# /proc/cpuinfo flags that decide which kernels run and how fast
VECTOR_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "amx_bf16", "amx_int8")  # fmt: skip


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, list[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; ("unknown", []) where there is none."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return "unknown", []
    field = {line.partition(":")[0].strip(): line.partition(":")[2].strip() for line in reversed(lines)}
    return field.get("model name", "unknown"), field.get("flags", "").split()


def describe_cpu(name: str, flags: list[str]) -> str:
    """Two lines for a benchmark's log: the CPU with its vector flags, then every flag."""
    vector = " ".join(flag for flag in VECTOR_FLAGS if flag in flags) or "none"
    return f"CPU: {name}, {os.cpu_count()} cores; vector flags: {vector}\nall flags: {' '.join(flags)}"
