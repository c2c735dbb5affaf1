"""int4 against int8, bf16 and fp32 at AF3's 7B shapes: per-layer time, bandwidth, and int4's error.

    python tools/bench_int4.py                                  # 1 and 155 rows, every shape
    python tools/bench_int4.py --rows 1 8 32 64 155 --layers qkv down --repeats 15
    python tools/bench_int4.py --weight-error --logits --rows    # the error reports only

For each shape (q+k+v, o_proj, gate+up, down_proj, lm_head of Qwen2-7B) and each row count it races, in
turns (tools/racing.py: the machine is shared and its speed drifts), what each kind of model runs for that
layer, through the layer classes themselves:
    fp32, bf16    minaf3.linear.Linear on float32 / bf16 weights (bf16: bf16 activations too)
    int8          Int8Linear                       int4   Int4Linear (its default path here)
and the int4 paths one by one: below PREFILL_MIN_ROWS rows the streaming loop's code for each instruction
set this CPU has (int4 avx512_vnni / avx512 / avx2; each rounds the activations to int8), from it the
loop, gemm.cpp's product ("int4 gemm", forced on any AVX2 CPU), vnni_prefill.cpp's
("int4 vnni", AVX-512 VNNI CPUs) and bf16 tiles ("int4 tiles", AVX-512 BF16 CPUs). Alongside in every
race, a sum over 1 GiB (racing.rate_probes' "read"): each time's weight bytes over it give "GB/s" and "of
bw", the fraction of the read bandwidth measured in the same turns. Layers small enough to sit in the L3
cache are read from copies in turn, so every call streams its weights from memory, as in a model's decode
step; for those, "int4 cached" calls one copy CACHED_CALLS times in a row (after the first call its weights
are in L3; its ms are per call): near the loop's arithmetic rate, the most it could stream at whatever rate
the memory runs.

--weight-error: relative L2 error of the dequantized weights of a Gaussian matrix and a Student-t one (5
degrees of freedom: heavier tails, as trained weights have), for per-row int8 and for int4 at groups of 32,
64 and 128, symmetric (the scale maps the largest-magnitude weight to -8) and asymmetric (min/max, a bf16
zero point per group), with the bytes per weight each takes; and minaf3's own quantize_weight_int4.
--logits: relative L2 of int4 and int8 logits against fp32: the tests' tiny model (2+2 layers, width 64) on a
random prompt, and tools/bench.py's official-width model (2 decoder layers, ~6 GB written to --dir) on the
16-token prompt tools/bench.py reports int8's error on.
"""

import argparse
import contextlib
import copy
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from minaf3.kernels import gemm
from minaf3.kernels.int4_linear import PREFILL_MIN_ROWS, int4_dequantize_reference, padded_width
from minaf3.kernels.registry import available, override
from racing import cpu_flags, describe_cpu, race, rate_probes

from minaf3.linear import Linear
from minaf3.quantize import Int4Linear, Int8Linear, quantize_weight_int4, quantized_bytes

# (name, out_features, in_features) of the official Qwen2.5-7B decoder, fused as minaf3 runs it, and lm_head.
LAYERS = {
    "qkv": ("q+k+v", 4608, 3584),
    "o": ("o_proj", 3584, 3584),
    "gate_up": ("gate+up", 37888, 3584),
    "down": ("down_proj", 3584, 18944),
    "lm_head": ("lm_head", 151672, 3584),
}
STREAMED_BYTES = 128 * 2**20  # copies of a small layer add up to this: four times a 32 MiB L3
CACHED_BYTES = 16 * 2**20  # a layer up to this size stays in a 32 MiB L3 between calls to it
CACHED_CALLS = 8
WEIGHT_ERROR_ROWS = 2048


def layer_of(cls, weight: torch.Tensor) -> torch.nn.Module:
    """A bias-free layer of class `cls` (Linear, Int8Linear, Int4Linear) holding `weight`."""
    if cls is Linear:
        layer = Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        return layer
    return cls.from_linear(layer_of(Linear, weight))


def in_turn(calls: list, setup=contextlib.nullcontext):
    """A call of the next of `calls` each time (copies of a layer: none is still in cache), under `setup`."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(calls)
        with torch.no_grad(), setup():
            return calls[state["i"]]()

    return call


def candidates(weight: torch.Tensor, x: torch.Tensor) -> dict:
    """label -> (call, weight bytes a product reads, products per call) for x (rows, in_features)."""
    N, K = weight.shape
    streamed = x.shape[0] < PREFILL_MIN_ROWS
    out = {}
    for label, cls, dtype, nbytes in [
        ("fp32", Linear, torch.float32, 4 * N * K),
        ("bf16", Linear, torch.bfloat16, 2 * N * K),
        ("int8", Int8Linear, torch.float32, quantized_bytes(N, K, "int8")),
        ("int4", Int4Linear, torch.float32, quantized_bytes(N, K, "int4")),
    ]:
        first = layer_of(cls, weight.to(dtype) if cls is Linear else weight)
        copies = math.ceil(STREAMED_BYTES / nbytes) if streamed else 1
        layers = [first] + [copy.deepcopy(first) for _ in range(copies - 1)]
        xs = x.to(dtype) if label == "bf16" else x
        out[label] = (in_turn([lambda m=m, xs=xs: m(xs) for m in layers]), nbytes, 1)
        if label == "int4":
            int4 = [lambda m=m: m(x) for m in layers]
            int4_first, int4_copies = first, copies
            if streamed and nbytes <= CACHED_BYTES:
                again = [lambda m=first: [m(x) for _ in range(CACHED_CALLS)]]
                out["int4 cached"] = (in_turn(again), nbytes, CACHED_CALLS)
    nbytes = out["int4"][1]
    if streamed and available().int4:
        Kp = padded_width(K)
        xp = torch.nn.functional.pad(x, (0, Kp - K))
        op = torch.ops.minaf3_int4.int4_linear
        cpu = torch.cpu
        for isa in ("avx512_vnni", "avx512", "avx2"):
            present = {
                "avx512_vnni": cpu._is_avx512_supported() and cpu._is_vnni_supported(),
                "avx512": cpu._is_avx512_supported(),
            }
            if present.get(isa, cpu._is_avx2_supported()):
                # copies of its own: another path's copies may still be in cache, read a call before
                own = [copy.deepcopy(int4_first) for _ in range(int4_copies)]
                calls = [lambda m=m, isa=isa: op(xp, m.weight, m.scales, None, isa) for m in own]
                out[f"int4 {isa}"] = (in_turn(calls), nbytes, 1)
    elif not streamed:
        off = {"gemm": False, "vnni_prefill": False, "bf16_prefill": False}
        out["int4 loop"] = (in_turn(int4, lambda: override(**off)), nbytes, 1)
        if available().vnni_prefill:
            out["int4 vnni"] = (in_turn(int4, lambda: override(**off | {"vnni_prefill": True})), nbytes, 1)
        if available().bf16_prefill:
            out["int4 tiles"] = (in_turn(int4, lambda: override(**off | {"bf16_prefill": True})), nbytes, 1)
        if gemm.load_library():  # on any AVX2 CPU, when asked for
            out["int4 gemm"] = (in_turn(int4, lambda: override(gemm=True)), nbytes, 1)
    return out


def bench_layer(key: str, rows_list: list[int], repeats: int) -> None:
    name, N, K = LAYERS[key]
    torch.manual_seed(0)
    weight = torch.randn(N, K) * 0.02  # row-wise Gaussian at Qwen2's init scale
    sizes = ", ".join(f"{m} {quantized_bytes(N, K, m) / 1e6:.0f} MB" for m in ("int8", "int4"))
    print(f"\n{name}: {K} -> {N}  (fp32 {4 * N * K / 1e6:.0f} MB, bf16 {2 * N * K / 1e6:.0f} MB, {sizes})")
    columns = ("ms", 9), ("GB/s", 7), ("of bw", 6), ("vs int8", 8), ("vs fp32", 8), ("GFLOP/s", 8)
    print(f"{'rows':>4} {'path':>16} " + " ".join(f"{name:>{width}}" for name, width in columns))
    for rows in rows_list:
        x = torch.randn(rows, K)
        contenders = candidates(weight, x)
        times = race(
            {label: call for label, (call, _, _) in contenders.items()} | {"read": rate_probes()["read"]},
            repeats,
        )
        bandwidth = 2**30 / times["read"]
        for label, (_, nbytes, products) in contenders.items():
            seconds = times[label] / products
            rate = nbytes / seconds
            flops = 2 * rows * N * K / seconds
            print(
                f"{rows:>4} {label:>16} {seconds * 1e3:9.2f} {rate / 1e9:7.1f} {rate / bandwidth:6.0%} "
                f"{times['int8'] / seconds:7.2f}x {times['fp32'] / seconds:7.2f}x {flops / 1e9:8.0f}"
            )
        print(f"{rows:>4} {'read probe':>16} {times['read'] * 1e3:9.2f} {bandwidth / 1e9:7.1f}")
        del contenders


# ---- --weight-error ---------------------------------------------------------------------------------------
def int4_error(w: torch.Tensor, group: int, symmetric: bool) -> float:
    """Relative L2 of w (N, K) rounded to 16 levels per group, bf16 scales (and zero points)."""
    g = w.view(w.shape[0], -1, group)
    if symmetric:
        step = (g.gather(-1, g.abs().argmax(-1, keepdim=True)) / -8).bfloat16().float()
        q = (g / step).round().clamp(-8, 7)
        approx = q * step
    else:
        low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        step = ((high - low) / 15).bfloat16().float()
        zero = (-low / step).bfloat16().float()
        approx = ((g / step + zero).round().clamp(0, 15) - zero) * step
    return ((approx - g).norm() / g.norm()).item()


def weight_error_report(K: int) -> None:
    torch.manual_seed(0)
    print(f"\nweight error: relative L2 of the dequantized weights, {WEIGHT_ERROR_ROWS} rows x {K}")
    print(f"{'scheme':>34} {'bytes/weight':>12} {'Gaussian':>9} {'Student t5':>10}")
    matrices = {
        "Gaussian": torch.randn(WEIGHT_ERROR_ROWS, K),
        "Student t5": torch.distributions.StudentT(5.0).sample((WEIGHT_ERROR_ROWS, K)),
    }
    int8 = {n: w.abs().amax(1, keepdim=True) / 127 for n, w in matrices.items()}
    errors = {
        n: (((w / int8[n]).round() * int8[n] - w).norm() / w.norm()).item() for n, w in matrices.items()
    }

    def row(label: str, per_weight: float, e: list[float]) -> None:
        print(f"{label:>34} {per_weight:12.4f} {e[0]:9.2%} {e[1]:10.2%}")

    row("int8 per-row absmax", 1 + 4 / K, list(errors.values()))
    for group in (32, 64, 128):
        for symmetric in (True, False):
            label = f"int4 {'symmetric' if symmetric else 'asymmetric'}, group {group}"
            per_weight = 0.5 + (2 if symmetric else 4) / group
            row(label, per_weight, [int4_error(w, group, symmetric) for w in matrices.values()])
    ours = []
    for w in matrices.values():
        approx = int4_dequantize_reference(*quantize_weight_int4(w))[:, :K]
        ours.append(((approx - w.double()).norm() / w.double().norm()).item())
    row("minaf3 quantize_weight_int4", quantized_bytes(1, K, "int4") / K, ours)


# ---- --logits ---------------------------------------------------------------------------------------------
def logits_report(folder: Path) -> None:
    from bench import OFFICIAL, write_checkpoint

    from minaf3 import AudioFlamingo3ForConditionalGeneration as Model

    tiny = (
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=400,
        ),
        0.08,
    )  # fmt: skip  (the tests' reference checkpoint: tests/conftest.py)
    for label, sizes, prompt in (
        ("tiny (tests' shapes)", tiny, 48),
        ("official widths, 2 layers", OFFICIAL, 16),
    ):
        path = write_checkpoint(folder / label.split()[0], sizes)
        ids = torch.randint(
            0, sizes[1]["vocab_size"] - 3, (1, prompt), generator=torch.Generator().manual_seed(1)
        )
        with torch.inference_mode():
            expected = Model.from_pretrained(path)(input_ids=ids).logits[0, -1]
            found = []
            for mode in ("int8", "int4"):
                got = Model.from_pretrained(path, quantize=mode)(input_ids=ids).logits[0, -1]
                found.append(f"{mode} {((got - expected).norm() / expected.norm()).item():.2%}")
        print(f"logits vs fp32, last position of a {prompt}-token prompt, {label}: {', '.join(found)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 155], help="activation rows (none: skip)")
    parser.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    parser.add_argument("--repeats", type=int, default=9, help="turns per race (the best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--weight-error", action="store_true", help="the rounding schemes' weight error")
    parser.add_argument("--logits", action="store_true", help="int4 and int8 logits against fp32")
    parser.add_argument("--dir", type=Path, default=None, help="where --logits writes its checkpoints")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n{describe_cpu(*cpu_flags())}")
    print(f"kernels: {', '.join(k for k in available().names() if getattr(available(), k))}")
    print(f"load average at the start: {os.getloadavg()[0]:.1f}")
    if args.weight_error:
        weight_error_report(3584)
    if args.logits:
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            logits_report(Path(folder))
    for key in args.layers if args.rows else []:
        bench_layer(key, args.rows, args.repeats)
    print(f"\n{time.time() - start:.0f} s in all; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
