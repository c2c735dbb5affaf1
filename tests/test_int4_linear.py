"""The int4 matrix product (kernels/int4_linear.py) against its float64 reference, on every path.

Paths: the streaming loop in each of its instruction sets this CPU has (AVX-512 VNNI, AVX-512, AVX2), the
prefill products (gemm.cpp's on AVX2, forced here where it is not the default; vnni_prefill.cpp's
on AVX-512 VNNI CPUs; bf16 tiles on AVX-512 BF16 CPUs), torch's ops, a torch.compile'd call, and the
unpack-multiply-sum of a compiled step without the library; over hypothesis-chosen shapes, odd widths and
widths that are not a multiple of the group or of the 128-column alignment among them. The tolerances come
from float32 rounding or from the bf16 or int8 rounding of the activations a path multiplies, never from a
typed number.
"""

import pytest
import torch
from conftest import FLOAT32_EPS
from conftest import int4_error_bound as error_bound
from conftest import random_int4_layer as random_layer
from hypothesis import given, settings
from hypothesis import strategies as st
from minaf3.kernels import int4_linear as kernel
from minaf3.kernels.int4_linear import (
    ALIGN,
    GROUP_SIZES,
    int4_dequantize_reference,
    int4_linear,
    int4_linear_reference,
    int4_product_sum,
    pack_int4,
    pack_scales,
    padded_width,
    unpack_int4,
    unpack_scales,
)
from minaf3.kernels.registry import available, override, runs

from minaf3 import ConfigError

BF16_UNIT = torch.finfo(torch.bfloat16).eps / 2  # the relative rounding error of a float rounded to bf16
ISAS = ["avx512_vnni", "avx512", "avx2"]  # best first
HAS = {
    "avx512_vnni": torch.cpu._is_avx512_supported() and torch.cpu._is_vnni_supported(),
    "avx512": torch.cpu._is_avx512_supported(),
    "avx2": torch.cpu._is_avx2_supported(),
}
# The loop's instruction sets this CPU has, each forced; "auto" (a call without `isa`) runs the first.
LOOP_PATHS = [isa for isa in ISAS if HAS[isa]]
PREFILL_PATHS = ["gemm", "int4-gemm", "bf16-tiles"]
PREFILL_FLAGS = {"gemm": "gemm", "vnni_prefill": "int4-gemm", "bf16_prefill": "bf16-tiles"}  # kernel: path
PATHS = [f"loop-{isa}" for isa in LOOP_PATHS] + PREFILL_PATHS + ["torch", "product-sum"]
KERNEL_SETTINGS = settings(max_examples=30, deadline=None)


def int8_group(path: str, group: int) -> int | None:
    """The group its activations are rounded to int8 by on `path` (every code of the loop, and the AVX-512
    VNNI product; "prefill" is the default for many rows here), else None."""
    kernels = available()
    int8 = (
        path.startswith("loop-")
        or path == "int4-gemm"
        or (path == "prefill" and kernels.vnni_prefill and not kernels.gemm)
    )
    return group if int8 else None


def run_path(path: str, x, w, scales, bias):
    """x @ W.T + bias on one of PATHS (a prefill path given fewer rows than it takes still runs it)."""
    if path.startswith("loop-"):
        assert runs("int4")
        Kp = 2 * w.shape[1]
        xp = torch.nn.functional.pad(x, (0, Kp - x.shape[-1]))
        return torch.ops.minaf3_int4.int4_linear(xp, w, scales, bias, path.removeprefix("loop-"))
    if path == "product-sum":
        return int4_product_sum(x.unsqueeze(-2), w, scales, bias).squeeze(-2)
    if path in PREFILL_PATHS:
        if path == "bf16-tiles" and not torch.cpu._is_avx512_bf16_supported():
            pytest.skip("this CPU has no AVX-512 BF16")  # where it has, the path must build and run
        if path == "int4-gemm" and not HAS["avx512_vnni"]:
            pytest.skip("this CPU has no AVX-512 VNNI")  # where it has, the path must build and run
        flags = {name: path == alias for name, alias in PREFILL_FLAGS.items()}
        with override(**flags), pytest.MonkeyPatch.context() as patch:
            patch.setattr(kernel, "PREFILL_MIN_ROWS", 1)
            return int4_linear(x, w, scales, bias, backend="cpp")
    return int4_linear(x, w, scales, bias, backend=path)


def path_tolerance(path: str, in_features: int) -> float:
    """Relative to sum |x W|: float32 sums in another order; bf16-rounded activations, weights and outputs
    (bf16 tiles). (The int8 activations of the loop and the VNNI product: int8_group.)"""
    if path == "bf16-tiles":
        return 3 * BF16_UNIT + in_features * FLOAT32_EPS
    return 2 * in_features * FLOAT32_EPS


@pytest.mark.parametrize("path", PATHS)
@KERNEL_SETTINGS
@given(
    rows=st.integers(1, 9),
    out_features=st.integers(1, 70),
    in_features=st.integers(1, 300),  # odd widths, across 32-column groups and 128-column alignment
    group=st.sampled_from(GROUP_SIZES),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int4_linear_matches_the_float64_reference(path, rows, out_features, in_features, group, bias, seed):
    w, scales, b = random_layer(out_features, in_features, bias, seed, group)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed + 1))
    out = run_path(path, x, w, scales, b)
    expected = int4_linear_reference(x, w, scales, b)
    assert out.shape == (rows, out_features) and out.dtype == x.dtype
    tolerance = path_tolerance(path, padded_width(in_features))
    bound = error_bound(x, w, scales, b, tolerance, int8_group(path, group))
    assert ((out - expected).abs() <= bound).all()


@pytest.mark.parametrize("path", [f"loop-{isa}" for isa in LOOP_PATHS] + PREFILL_PATHS)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9, kernel.PREFILL_MIN_ROWS + 3])
def test_batch_rows_each_equal_that_row_alone(path, rows):
    """Row blocking (1-4 activation rows per pass over a tile, panels of the prefill products) must not mix
    rows; width 3584 as in AF3, 203 weight rows: whole tiles of 16, then a short one."""
    w, scales, b = random_layer(203, 3584, True, seed=rows)
    x = torch.randn(rows, 3584)
    out = run_path(path, x, w, scales, b)
    alone = torch.cat([run_path(path, x[i : i + 1], w, scales, b) for i in range(rows)])
    bound = error_bound(x, w, scales, b, path_tolerance(path, 3584), int8_group(path, 32))
    assert ((out - int4_linear_reference(x, w, scales, b)).abs() <= bound).all()
    assert ((out - alone).abs() <= 2 * bound).all()


@pytest.mark.parametrize("isa", LOOP_PATHS)
@pytest.mark.parametrize("shape", [(1, 3001, 1024), (3, 517, 4096)])
def test_thread_count_does_not_change_any_bit(isa, shape):
    """Threads claim chunks of rows as they go; each row's sum is the same code whichever thread runs it."""
    rows, out_features, in_features = shape  # several chunks of rows, the last tile short
    w, scales, b = random_layer(out_features, in_features, True, seed=8)
    x = torch.randn(rows, in_features)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.ops.minaf3_int4.int4_linear(x, w, scales, b, isa)
        torch.set_num_threads(max(2, threads))
        shared = torch.ops.minaf3_int4.int4_linear(x, w, scales, b, isa)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, shared)


@pytest.mark.parametrize("isa", LOOP_PATHS)
def test_a_non_finite_activation_poisons_its_outputs(isa):
    """A NaN or an infinity in x gives NaN or infinite outputs on every loop, never a finite number (the
    VNNI loop's int8 rounding would otherwise have no value to give it)."""
    assert runs("int4")
    w, scales, _ = random_layer(6, 256, False, seed=12)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(2, 256)
        x[1, 77] = bad
        out = torch.ops.minaf3_int4.int4_linear(x, w, scales, None, isa)
        assert torch.isfinite(out[0]).all() and not torch.isfinite(out[1]).any(), (isa, bad)


@pytest.mark.parametrize("isa", LOOP_PATHS)
def test_bf16_activations_go_in_and_out_as_the_float32_call_rounded(isa):
    """A bf16 model's activations and bias enter the loop as they are and its output comes out in bf16: the
    float32 call on the same (bf16-valued) numbers, rounded once to bf16, whatever the loop."""
    assert runs("int4")
    w, scales, b = random_layer(37, 384, True, seed=13)
    x, b16 = torch.randn(3, 384).bfloat16(), b.bfloat16()
    op = torch.ops.minaf3_int4.int4_linear
    out = op(x, w, scales, b16, isa)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 37)
    assert torch.equal(out, op(x.float(), w, scales, b16.float(), isa).bfloat16())
    assert torch.equal(op(x.float(), w, scales, b16, isa), op(x.float(), w, scales, b16.float(), isa))


@pytest.mark.parametrize("isa", LOOP_PATHS)
def test_groups_of_denormal_activations_stay_within_the_bound(isa):
    """Groups whose largest magnitude is so small that 127 / it overflows float32 (where the VNNI loop's
    int8 rounding takes the group as zeros), alone or beside zeros: finite outputs within the bound."""
    assert runs("int4")
    w, scales, _ = random_layer(9, 384, False, seed=14)
    x = torch.randn(2, 384)
    x[0, 32:64] = 1e-40  # one group of denormals
    x[1, 128:256] = 0.0
    x[1, 130] = -3e-39
    out = torch.ops.minaf3_int4.int4_linear(x, w, scales, None, isa)
    assert torch.isfinite(out).all()
    bound = error_bound(x, w, scales, None, path_tolerance(f"loop-{isa}", 384), int8_group(f"loop-{isa}", 32))
    assert ((out - int4_linear_reference(x, w, scales, None)).abs() <= bound).all()


def test_pack_and_unpack_are_inverse_and_follow_the_layout():
    """18 rows: a tile of 16 and a short one of 2, each stored word by word (4 bytes: 8 columns of a row)."""
    q = torch.randint(0, 16, (18, 256), generator=torch.Generator().manual_seed(0))
    packed = pack_int4(q)
    assert packed.shape == (18, 128) and packed.dtype == torch.uint8
    flat, row_bytes = packed.flatten(), 128
    for n, w, j in [(0, 0, 0), (5, 3, 2), (15, 31, 3), (16, 0, 1), (17, 30, 3)]:
        t0, rows = (0, 16) if n < 16 else (16, 2)
        byte = flat[t0 * row_bytes + (w * rows + n - t0) * 4 + j]  # byte j of word w of row n
        assert byte == q[n, 8 * w + 2 * j] | q[n, 8 * w + 2 * j + 1] << 4, (n, w, j)
    assert torch.equal(unpack_int4(packed), q.to(torch.uint8))
    scales = torch.randn(18, 8).bfloat16()
    tiled = pack_scales(scales).flatten()
    assert tiled[3 * 16 + 5] == scales[5, 3] and tiled[16 * 8 + 7 * 2 + 1] == scales[17, 7]
    assert torch.equal(unpack_scales(pack_scales(scales)), scales)
    W = int4_dequantize_reference(packed, pack_scales(scales))
    assert W[17, 250] == scales[17, 7].double() * (int(q[17, 250]) - 8)
    assert torch.equal(unpack_int4(packed[:16]), q[:16].to(torch.uint8))  # whole tiles slice as rows


@pytest.mark.parametrize("shape", [(1, 3584, 4608), (3, 384, 37), (5, 128, 16), (2, 256, 3)])
def test_every_loop_code_gives_the_same_bits(shape):
    """The codes sum the same int8 x int4 products exactly in int32 and finish each group alike: the
    instruction set must not change a bit (where this CPU has more than one)."""
    rows, in_features, out_features = shape
    w, scales, b = random_layer(out_features, in_features, True, seed=21)
    x = torch.randn(rows, in_features)
    outs = [torch.ops.minaf3_int4.int4_linear(x, w, scales, b, isa) for isa in LOOP_PATHS]
    assert all(torch.equal(out, outs[0]) for out in outs[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, kernel.PREFILL_MIN_ROWS])  # the loop, a prefill path
def test_leading_dims_and_dtype_are_kept(dtype, rows):
    w, scales, b = random_layer(24, 200, True, seed=3)
    x = torch.randn(2, rows, 200).to(dtype)
    out = int4_linear(x, w, scales, b.to(dtype))
    assert out.shape == (2, rows, 24) and out.dtype == dtype
    expected = int4_linear_reference(x, w, scales, b).float()
    tolerance = 4 * BF16_UNIT + 256 * FLOAT32_EPS + (2 * BF16_UNIT if dtype == torch.bfloat16 else 0)
    loop = "loop-auto" if rows < kernel.PREFILL_MIN_ROWS else "prefill"
    bound = error_bound(x, w, scales, b, tolerance, int8_group(loop, 32))
    assert ((out.float() - expected).abs() <= bound).all()


@pytest.mark.parametrize("rows", [1, 3, kernel.PREFILL_MIN_ROWS])  # the loop, a prefill path
def test_traced_by_torch_compile_without_graph_breaks(rows):
    w, scales, b = random_layer(16, 100, True, seed=4)
    x = torch.randn(2, rows, 100)  # leading dims and a padded width: the shape functions must keep them
    eager = int4_linear(x, w, scales, b)
    compiled = torch.compile(lambda t: int4_linear(t, w, scales, b), backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x), eager)


def test_compiled_product_sum_is_one_row_of_the_reference():
    """What a compiled one-row step runs without the library, compiled by inductor."""
    w, scales, b = random_layer(40, 300, True, seed=11)
    x = torch.randn(1, 1, 300)
    compiled = torch.compile(int4_product_sum, fullgraph=True)
    expected = int4_linear_reference(x, w, scales, b)
    assert (
        (compiled(x, w, scales, b) - expected).abs() <= error_bound(x, w, scales, b, 512 * FLOAT32_EPS)
    ).all()


def test_many_rows_take_the_path_meant_for_this_cpu():
    """From PREFILL_MIN_ROWS rows: gemm.cpp's operator where it is wanted (AVX2 CPUs), else vnni_prefill.cpp's
    where the CPU has AVX-512 VNNI, else bf16 tiles where it has AVX-512 BF16, else the loop; below it, the
    loop."""
    from torch.profiler import profile

    many = kernel.PREFILL_MIN_ROWS
    w, scales, b = random_layer(70, 300, True, seed=9)
    x = torch.randn(many, 300)
    cases = [
        ({"gemm": True}, many, "minaf3_gemm::int4_gemm"),
        ({"gemm": True}, many - 1, "minaf3_int4::int4_linear"),
        ({"gemm": False, "vnni_prefill": False, "bf16_prefill": False}, many, "minaf3_int4::int4_linear"),
    ]
    if HAS["avx512_vnni"]:  # the path must build and run there
        ops = {"minaf3_int4::quantize_int8", "minaf3_vnni::int4_gemm"}
        cases.append(({"gemm": False, "vnni_prefill": True}, many, ops))
        cases.append(({"gemm": False, "vnni_prefill": True}, many - 1, "minaf3_int4::int4_linear"))
    if torch.cpu._is_avx512_bf16_supported():
        tiles = {"gemm": False, "vnni_prefill": False, "bf16_prefill": True}
        cases.append((tiles, many, "minaf3_tiles::int4_dequantize"))
    for flags, rows, op in cases:
        with override(**flags), profile() as trace:
            int4_linear(x[:rows], w, scales, b)
        calls = {event.key for event in trace.key_averages() if event.key.startswith("minaf3")}
        assert calls == (op if isinstance(op, set) else {op}), (flags, rows, calls)


def test_backend_switch_by_argument_and_environment(monkeypatch):
    calls = []
    torch_path = kernel._torch_int4_linear
    monkeypatch.setattr(kernel, "_torch_int4_linear", lambda *a: calls.append(1) or torch_path(*a))
    w, scales, _ = random_layer(8, 128, False, seed=5)
    x = torch.randn(1, 128)
    int4_linear(x, w, scales)
    assert calls == []  # auto: the C++ kernel builds on this machine
    int4_linear(x, w, scales, backend="torch")
    assert calls == [1]
    monkeypatch.setenv(kernel.BACKEND_ENV, "torch")
    int4_linear(x, w, scales)
    assert calls == [1, 1]
    monkeypatch.setenv(kernel.BACKEND_ENV, "fast")
    with pytest.raises(ConfigError, match="MINAF3_INT4_BACKEND='fast'"):
        int4_linear(x, w, scales)


def test_input_errors_name_the_mismatch():
    w, scales, b = random_layer(8, 256, True, seed=6)
    x = torch.randn(2, 256)
    with pytest.raises(ConfigError, match=r"input must be float \(\.\.\., K <= 256\)"):
        int4_linear(torch.randn(2, 257), w, scales)
    with pytest.raises(
        ConfigError, match=f"weight must be \\(N, Kp / 2\\) uint8 with Kp a multiple of {ALIGN}"
    ):
        int4_linear(x, w[:, :100], scales)
    with pytest.raises(ConfigError, match=r"scales must be \(8, 256 / G\) bfloat16"):
        int4_linear(x, w, scales.float())
    with pytest.raises(ConfigError, match=r"scales must be .* G in \[32, 64, 128\]"):
        int4_linear(x, w, scales[:, :1])  # one group of 256 columns: not a size the kernels take
    int4_linear(x, w, scales[:, :2].contiguous())  # 2 groups of 128 columns: accepted
    with pytest.raises(ConfigError, match=r"bias must be \(8,\)"):
        int4_linear(x, w, scales, b[:3])


def test_the_loop_refuses_what_it_cannot_multiply():
    """The operator's own checks name it and the problem before reading any data."""
    assert runs("int4")
    op = torch.ops.minaf3_int4.int4_linear
    w, scales, _ = random_layer(4, 256, False, seed=7)
    x = torch.randn(2, 256)
    with pytest.raises(RuntimeError, match="int4_linear: x has 255 columns but w packs 256"):
        op(x[:, :255], w, scales, None)
    with pytest.raises(RuntimeError, match="the group size must be 32, 64 or 128"):
        op(x, w, scales[:, :1].contiguous(), None)
    with pytest.raises(RuntimeError, match="isa must be auto, avx2, avx512 or avx512_vnni"):
        op(x, w, scales, None, "sse")
    with pytest.raises(RuntimeError, match="int4_linear: x must be float32 or bfloat16"):
        op(x.half(), w, scales, None)
    with pytest.raises(RuntimeError, match="bias must be float32 or bfloat16 with 4 entries"):
        op(x, w, scales, torch.zeros(4, dtype=torch.float64))


def test_cpp_backend_refuses_tensors_it_cannot_run():
    w, scales, _ = random_layer(4, 128, False, seed=7)
    with override(int4=False), pytest.raises(ConfigError, match="int4 backend 'cpp' cannot run"):
        int4_linear(torch.randn(1, 128), w, scales, backend="cpp")
