"""Linear layers: where each product runs fastest, and fusing layers that read the same input.

    linear(layer, x)                 layer(x), on the fastest path for the device, size and mode (below)
    fuse_linears([a, b, ...])        one layer (nn.Linear or Int8Linear) whose output is theirs, concatenated
    split_linear(fused, sizes, ...)  its inverse

Paths for `linear` on the CPU, each measured by tools/bench.py on its 2-core machine:
  - in a torch.compile'd one-row decode step, a plain layer of fewer than STREAM_KERNEL_MIN_WEIGHTS
    weights becomes a multiply-and-sum that inductor generates as one loop, with no library call per
    layer (BLAS's matrix-vector product reached about half the memory's speed); larger plain layers and
    int8 layers call the C++ kernel of kernels/int8_gemv.cpp, which streams rows faster than inductor's
    loop (official widths, 2 layers + lm_head, ms per token: float32 90 against 118, int8 24.8 against
    36.8), or, where that kernel cannot be built, the loop;
  - otherwise a bf16 or float32 layer with at most 8 rows and no gradient streams its weights through the
    C++ kernel of kernels/int8_gemv.cpp (bf16: 1.5x the bandwidth of torch's matrix-vector product;
    float32: 1.1-1.6x oneDNN's, 1.7-5x MKL's; figures in kernels/gemv.py);
  - a float32 or bf16 layer with more rows (prefill, the audio encoder, the projector) and no gradient
    runs the C++ matrix product of kernels/gemm.cpp on a CPU whose best vector unit is AVX2: 1.1-1.3x
    oneDNN's and 1.2-1.6x MKL's float32 rate at 155-1500 rows, no slower on small layers, and ~8x torch's
    emulated bf16 (figures in kernels/gemm.py);
  - elsewhere (AVX-512 CPUs) a large float32 layer with more rows runs on oneDNN when no gradient is
    needed: 1.6x / 1.15x MKL's (torch's default) rate at 155 / 251 rows;
  - anything else (small layers, LoRA wrappers, training) is the layer's own forward.
The decoder, encoder, projector and lm_head all call it, so one place decides.

Weights made for decoding (fused projections, int8) are allocated by `streamed_empty`, in 2 MiB pages
where Linux allows: a decode step streams every weight once, and with 4 KiB pages the page-table walks
slow the stream (below). Not the dtype conversions of loading: faulting in 2 MiB pages (which the kernel
may first have to compact) doubled the float32 load of tools/bench_load.py (3.1 -> 6.4 s).
"""

import ctypes
import functools
import sys
from pathlib import Path

import torch
from torch import nn

from .kernels import gemm, gemv

# CPU flags (Linux /proc/cpuinfo) of instructions that multiply bf16 natively: AVX-512 BF16 (Zen 4,
# Cooper Lake and later), AMX (Sapphire Rapids), Arm's BF16 extension. Without them oneDNN and MKL emulate
# bf16 products through fp32 conversions, several times slower than fp32 itself.
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


# Linux's transparent huge pages: 2 MiB, requested per range with madvise(MADV_HUGEPAGE) (<sys/mman.h>),
# which is what a system set to THP "madvise" (the common default) needs before it uses them for a range.
HUGE_PAGE = 2 * 2**20
MADV_HUGEPAGE = 14


@functools.cache
def _madvise():
    """libc's madvise on Linux, else None."""
    if sys.platform != "linux":
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def streamed_empty(shape: tuple[int, ...], dtype: torch.dtype, device=None) -> torch.Tensor:
    """torch.empty for a weight that decoding will stream, its pages 2 MiB where the OS allows.

    Measured in one process on tools/bench.py's machine (Linux, THP "madvise"): the int8 kernel read a
    151672 x 3584 lm_head at 42 GB/s from 4 KiB pages and 55 GB/s from 2 MiB ones (torch's sum over 1 GiB:
    55 and 64). Only a hint: where the kernel refuses it or the memory was touched already, the pages stay
    4 KiB. Must be called before the tensor is written (pages are chosen when first touched).
    """
    tensor = torch.empty(shape, dtype=dtype, device=device)
    madvise = _madvise()
    if tensor.device.type == "cpu" and madvise is not None and tensor.nbytes >= 2 * HUGE_PAGE:
        # the whole 2 MiB pages inside the allocation
        start = -(-tensor.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        end = (tensor.data_ptr() + tensor.nbytes) // HUGE_PAGE * HUGE_PAGE
        madvise(start, end - start, MADV_HUGEPAGE)
    return tensor


def fuse_linears(layers: list[nn.Module]) -> nn.Module:
    """One layer computing the concatenation of `layers`' outputs on their shared input (see `fusable`)."""
    if type(layers[0]) is not nn.Linear:
        return type(layers[0]).stack(layers)  # Int8Linear
    parts = [layer.weight.detach() for layer in layers]
    out_features = sum(part.shape[0] for part in parts)
    weight = torch.cat(
        parts, out=streamed_empty((out_features, parts[0].shape[1]), parts[0].dtype, parts[0].device)
    )  # (sum out_i, in)
    has_bias = [layer.bias is not None for layer in layers]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=any(has_bias), device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=layers[0].weight.requires_grad)
    if any(has_bias):  # a layer without a bias (none here in Qwen2) contributes zeros
        biases = [
            layer.bias.detach() if layer.bias is not None else weight.new_zeros(layer.out_features)
            for layer in layers
        ]
        fused.bias = nn.Parameter(torch.cat(biases), requires_grad=fused.weight.requires_grad)
    return fused


def split_linear(fused: nn.Module, sizes: list[int], biases: list[bool]) -> list[nn.Module]:
    """Undo fuse_linears: the row blocks of `fused` (sizes[i] rows each) as separate layers."""
    if type(fused) is not nn.Linear:
        return fused.split(sizes, biases)  # Int8Linear
    layers = []
    for weight, bias, has_bias in zip(
        fused.weight.detach().split(sizes),
        fused.bias.detach().split(sizes) if fused.bias is not None else [None] * len(sizes),
        biases,
        strict=True,
    ):
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
        layer.weight = nn.Parameter(weight.clone(), requires_grad=fused.weight.requires_grad)
        if has_bias:
            layer.bias = nn.Parameter(bias.clone(), requires_grad=fused.weight.requires_grad)
        layers.append(layer)
    return layers


# Rows up to which a bf16 or float32 layer streams its weights through the C++ kernel of
# kernels/int8_gemv.cpp. bf16 37888 x 3584 at 1 / 4 / 8 / 16 rows took 7.0 / 6.9 / 11.7 / 21.5 ms there
# against torch's 13-17 / 14.8 / 17.5 / 22.3 ms (oneDNN's bf16 matrix-vector product reads ~20 GB/s; the
# kernel ~31, a plain read ~33); float32 wins at every count up to 16 (kernels/gemv.py).
STREAM_MAX_ROWS = 8
STREAM_DTYPES = (torch.bfloat16, torch.float32)


def gemv_kernel_ready() -> bool:
    """Whether the C++ kernel runs here (built on first use; False, with one logged warning, otherwise)."""
    return gemv.load_library()


# Weights from which a compiled one-row step calls the C++ kernel rather than inductor's loop. Four float32
# layers in a compiled graph, one row, us: 512 x 512 loop 132 / kernel 154, 1024 x 1024 309 / 309,
# 2048 x 1024 959 / 785, 4096 x 1024 1960 / 1744; below this the kernel's call costs more than it saves.
STREAM_KERNEL_MIN_WEIGHTS = 1 << 20

# float32, and bf16 (widened as the kernel packs it): 170-180 GFLOP/s against ~22 for torch's emulated bf16
GEMM_DTYPES = (torch.float32, torch.bfloat16)


def gemm_kernel_ready() -> bool:
    """Whether the matrix product of kernels/gemm.cpp runs here: a CPU whose best vector unit is
    AVX2 (built on first use in eager code; False, with one logged warning, when it cannot be built). A
    torch.compile'd step reads only what the last eager check found (generate checks before compiling)."""
    return gemm.runs_here()


# Weights from which oneDNN beats MKL: its fixed cost per call (~18 us against 5) loses on small layers.
ONEDNN_MIN_WEIGHTS = 1 << 20
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when this CPU multiplies bf16 natively (see NATIVE_BF16_FLAGS); False when unknown."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return not NATIVE_BF16_FLAGS.isdisjoint(flags.partition(":")[2].split())


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for any layer (nn.Linear, LoRA, int8), on the fastest path (see the module docstring)."""
    if x.device.type != "cpu":
        return layer(x)
    rows = x.shape[:-1].numel()
    if rows == 1 and torch.compiler.is_compiling():
        return streamed_linear(layer, x)
    # Eager decoding runs this before every product (112 a token at the bench's full depth), where checks
    # in Python cost as much as a small layer's product: cheapest first, each attribute read once.
    if type(layer) is not nn.Linear or torch.is_grad_enabled():
        return layer(x)
    weight, bias = layer.weight, layer.bias
    if rows <= STREAM_MAX_ROWS and weight.dtype in STREAM_DTYPES and gemv_kernel_ready():
        return gemv.gemv_linear(x, weight, bias)
    if x.dtype == weight.dtype and x.dtype in GEMM_DTYPES and gemm_kernel_ready():
        return gemm.gemm_linear(x, weight, bias)
    if ONEDNN and weight.numel() >= ONEDNN_MIN_WEIGHTS and x.dtype == weight.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return layer(x)


def streamed_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One row x (..., in) through a plain or int8 layer in a compiled step: the C++ kernel for int8 and
    large layers (where it is built), else a sum of products for inductor to stream."""
    from .kernels.int8_linear import load_extension
    from .quantize import Int8Linear

    if type(layer) is nn.Linear:
        weight, scales = layer.weight, None
        if (
            weight.numel() >= STREAM_KERNEL_MIN_WEIGHTS
            and weight.dtype in STREAM_DTYPES
            and weight.device.type == "cpu"
            and load_extension()  # a graph constant when tracing
        ):
            return gemv.gemv_linear(x, weight, layer.bias)
    elif type(layer) is Int8Linear:
        if layer.weight.device.type == "cpu" and load_extension():  # a graph constant when tracing
            return layer(x)
        weight, scales = layer.weight, layer.scales  # (out, in) int8, (out,): one scale per row
    else:
        return layer(x)
    # (..., 1, in) * (out, in) -> sum over in -> (..., out); fused by inductor, never materialised
    y = (x.unsqueeze(-2).float() * weight.float()).sum(-1)
    if scales is not None:
        y = y * scales
    return (y if layer.bias is None else y + layer.bias).to(x.dtype)


def swap_children(parent: nn.Module, old: list[str], new: dict[str, nn.Module]) -> None:
    """Replace the children named `old` by `new`, placed where the first of `old` was, so that printing the
    model and its state_dict keep the architecture's order (q, k, v before o_proj)."""
    children = {}
    for name, child in parent._modules.items():
        if name == old[0]:
            children.update(new)
        if name not in old:
            children[name] = child
    parent._modules.clear()
    parent._modules.update(children)


def fusable(*layers: nn.Module) -> bool:
    """Whether `layers` can be fused: all exact nn.Linear, or all Int8Linear (stacked as int8 rows). A LoRA
    wrapper is not: it must keep its own weight so that the adapter can be merged and unmerged."""
    kinds = {type(layer) for layer in layers}
    if kinds == {nn.Linear}:
        return True
    # Int8Linear without importing minaf3.quantize, whose kernel module imports torch._dynamo (a second of
    # every cold start): a model holds int8 layers only if that module was loaded.
    quantize = sys.modules.get(f"{__package__}.quantize")
    return quantize is not None and kinds == {quantize.Int8Linear}
