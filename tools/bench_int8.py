"""Per-layer timing of int8 weight-only products against fp32, at AF3's official widths, on this CPU.

    python tools/bench_int8.py                    # batch 1 and 8, every layer shape, every backend
    python tools/bench_int8.py --rows 1 8 64 --layers up down --repeat 50

For each decoder layer shape (and the lm_head) and each row count it prints the milliseconds of
    fp32      F.linear on float32 weights (what an unquantized model runs)
    cpp       what a quantized model runs on CPU: from GEMM_MIN_ROWS rows the prefill product this CPU
              takes (kernels/gemm.cpp's on AVX2 CPUs, vnni_prefill.cpp's on AVX-512 VNNI ones, bf16
              tiles on other AVX-512 BF16 ones), else the streaming loop of kernels/int8_gemv.cpp,
              AVX-512 where the CPU has it
    avx2      the loop forced to its AVX2 code (shown on AVX-512 CPUs only)
    loop      the loop, where cpp took a prefill product
    torch     the torch backend: aten._weight_int8pack_mm with bf16 activations (<= 8 rows), else
              float32 dequantization of weight tiles + F.linear
    naive     dequantize the whole weight, then F.linear (--naive; slow, for comparison)
with the weight bytes each one reads per call over its time (effective GB/s), that rate as a fraction
of the read bandwidth measured here in the same run (summing a 1 GiB tensor), and the speed-up over
fp32. Batch-1 decode reads every weight once per token, so bandwidth is its limit: the int8 limit is
a quarter of fp32's time. Accuracy columns: relative L2 of the int8 output against fp32 on the original
weights (quantization error) and against int8_linear_reference (the kernel's own error).

--weight-error adds, per layer, the relative L2 error of the dequantized weights under per-row absmax
(minaf3.quantize), the per-row MSE-optimal clipping scale (searched on a grid of fractions of the absmax)
and per-group absmax over 128 columns, on the first WEIGHT_ERROR_ROWS rows.

The machine is shared: each time is the minimum over --repeat calls, after one warm-up call.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from minaf3.kernels.int8_linear import GEMM_MIN_ROWS, int8_linear, int8_linear_reference
from minaf3.kernels.registry import available

from minaf3.quantize import quantize_weight

# (name, out_features, in_features) of the official Qwen2.5-7B decoder (AF3_SPEC.md) and its lm_head.
LAYERS = {
    "q_o": ("q_proj / o_proj", 3584, 3584),
    "k_v": ("k_proj / v_proj", 512, 3584),  # 4 KV heads x head dim 128
    "up": ("gate_proj / up_proj", 18944, 3584),
    "down": ("down_proj", 3584, 18944),
    "lm_head": ("lm_head", 151672, 3584),
}
BANDWIDTH_BYTES = 2**30  # large enough to defeat the 32 MiB L3
WEIGHT_ERROR_ROWS = 4096  # rows sampled by --weight-error: its grid search makes 21 passes over them
CLIP_FRACTIONS = torch.arange(0.90, 1.0001, 0.005)  # the grid; below 0.9 a Gaussian row's error only grows
GROUP = 128  # columns per group of the per-group comparison


def best_ms(fn, repeat: int) -> float:
    """Minimum wall time of fn() in milliseconds, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def read_bandwidth(repeat: int) -> float:
    """Bytes per second this machine streams from memory: the faster of two reads of BANDWIDTH_BYTES.

    A sum and a matrix-vector product over the same float32 data (tools/bench.py uses the sum): whichever
    streams faster on this machine and thread count sets the limit.
    """
    data = torch.randn(BANDWIDTH_BYTES // 4)
    matrix, vector = data.view(-1, 4096), torch.randn(4096)
    seconds = min(best_ms(data.sum, repeat), best_ms(lambda: torch.mv(matrix, vector), repeat)) / 1e3
    return BANDWIDTH_BYTES / seconds


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def dequantized_error(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per-row squared error of round-to-nearest int8 with these per-row scales: (N, K), (N,) -> (N,)."""
    step = scales[:, None]
    return ((weight / step).round().clamp(-127, 127) * step - weight).pow(2).sum(1)


def weight_errors(weight: torch.Tensor) -> dict:
    """Relative L2 error of the dequantized weight (N, K) under three int8 schemes."""
    weight = weight[:WEIGHT_ERROR_ROWS]
    total = weight.pow(2).sum()
    amax = weight.abs().amax(1)
    absmax = dequantized_error(weight, amax / 127).sum()
    best = torch.stack([dequantized_error(weight, amax * f / 127) for f in CLIP_FRACTIONS]).amin(0).sum()
    groups = weight.reshape(weight.shape[0], -1, GROUP)  # (N, K) -> (N, K / GROUP, GROUP)
    step = groups.abs().amax(-1, keepdim=True) / 127
    grouped = ((groups / step).round() * step - groups).pow(2).sum()
    return {
        "per-row absmax": (absmax / total).sqrt().item(),
        "per-row MSE-optimal clip": (best / total).sqrt().item(),
        f"per-group-{GROUP} absmax": (grouped / total).sqrt().item(),
    }


def candidates(x, weight, w_int8, scales, naive: bool) -> dict:
    """label -> (function of no arguments, weight bytes it reads) for one input x (rows, in_features)."""
    fp32_bytes, int8_bytes = weight.nbytes, w_int8.nbytes + scales.nbytes
    out = {"fp32": (lambda: F.linear(x, weight), fp32_bytes)}
    if available().gemv:
        out["cpp"] = (lambda: int8_linear(x, w_int8, scales, backend="cpp"), int8_bytes)
        kernels = available()
        if x.shape[0] >= GEMM_MIN_ROWS and (kernels.gemm or kernels.vnni_prefill or kernels.bf16_prefill):
            op = torch.ops.minaf3_int8.int8_linear
            out["loop"] = (lambda: op(x, w_int8, scales, None), int8_bytes)
        if torch.backends.cpu.get_cpu_capability() == "AVX512":
            op = torch.ops.minaf3_int8.int8_linear
            out["avx2"] = (lambda: op(x, w_int8, scales, None, False), int8_bytes)
    out["torch"] = (lambda: int8_linear(x, w_int8, scales, backend="torch"), int8_bytes)
    if naive:
        out["naive"] = (lambda: int8_linear_reference(x, w_int8, scales), int8_bytes)
    return out


def bench_layer(
    key: str, rows_list: list[int], repeat: int, bandwidth: float, naive: bool, weight_error: bool
) -> None:
    name, out_features, in_features = LAYERS[key]
    torch.manual_seed(0)
    # Row-wise Gaussian weights as in a trained linear layer, at Qwen2's init scale.
    weight = torch.randn(out_features, in_features) * 0.02
    w_int8, scales = quantize_weight(weight)
    megabytes = f"fp32 {weight.nbytes / 1e6:.0f} MB, int8 {(w_int8.nbytes + scales.nbytes) / 1e6:.0f} MB"
    print(f"\n{name}: {in_features} -> {out_features}  ({megabytes})")
    if weight_error:
        errors = ", ".join(f"{label} {error:.3%}" for label, error in weight_errors(weight).items())
        print(f"weight error: {errors}")
    print(
        f"{'rows':>4} {'kernel':>6} {'ms':>9} {'GB/s':>7} {'of bw':>6} {'vs fp32':>8} "
        f"{'limit ms':>9} {'err vs fp32':>12} {'err vs ref':>11}"
    )
    for rows in rows_list:
        x = torch.randn(rows, in_features)
        expected = F.linear(x, weight)
        reference = int8_linear_reference(x, w_int8, scales)
        fp32_ms = None
        for label, (fn, nbytes) in candidates(x, weight, w_int8, scales, naive).items():
            ms = best_ms(fn, repeat)
            fp32_ms = fp32_ms or ms
            rate = nbytes / (ms / 1e3)
            limit_ms = nbytes / bandwidth * 1e3
            out = fn()
            errors = (
                "" if label == "fp32" else f"{rel_l2(out, expected):12.2e} {rel_l2(out, reference):11.2e}"
            )
            print(
                f"{rows:>4} {label:>6} {ms:9.2f} {rate / 1e9:7.1f} {rate / bandwidth:6.0%} "
                f"{fp32_ms / ms:7.2f}x {limit_ms:9.2f} {errors}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="activation rows (batch)")
    parser.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per measurement (minimum kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--naive", action="store_true", help="also time dequantize-then-F.linear")
    parser.add_argument(
        "--weight-error", action="store_true", help="also compare per-row absmax, MSE-optimal and per-group"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ready = available().gemv
    bandwidth = read_bandwidth(args.repeat)
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {cpu}")
    print(f"C++ int8 kernel: {'built' if ready else 'NOT available (torch backend only)'}")
    print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s (best of sum and mv over 1 GiB of float32)")
    print("limit ms = weight bytes / measured bandwidth; 'of bw' = achieved GB/s / measured bandwidth")
    for key in args.layers:
        bench_layer(key, args.rows, args.repeat, bandwidth, args.naive, args.weight_error)


if __name__ == "__main__":
    main()
