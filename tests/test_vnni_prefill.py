"""vnni_prefill.cpp, the int4 and int8 prefill products on CPUs with AVX-512 VNNI, and their activations
(int4_gemv.cpp's quantize_int8).

The int4 product multiplies the same int8 activations as the int4 streaming loop's VNNI code, and both sum
each group exactly in int32: the two differ only in the order of their float32 sums, so the loop is the
reference here (the float64 reference, on every path: tests/test_int4_linear.py). The int8 product is held
to the float64 product of the int8 weights within what rounding the activations to int8 can change. The
tolerances come from float32 rounding and from that rounding, never from a typed number.
"""

import pytest
import torch
from conftest import FLOAT32_EPS, int8_activation_bound
from conftest import int4_error_bound as error_bound
from conftest import random_int4_layer as random_layer
from hypothesis import given, settings
from hypothesis import strategies as st
from minaf3.kernels import vnni_prefill
from minaf3.kernels.int4_linear import GROUP_SIZES, int4_linear_reference
from minaf3.kernels.registry import runs

pytestmark = pytest.mark.skipif(not vnni_prefill.wanted(), reason="this CPU has no AVX-512 VNNI")


@pytest.fixture(scope="module", autouse=True)
def library():
    assert runs("int4") and runs("vnni_prefill")  # where the CPU has VNNI, both must build and run


def gemm(x, w, scales, bias=None):
    return vnni_prefill.int4_gemm_linear(x, w, scales, bias)


def loop(x, w, scales, bias=None):
    return torch.ops.minaf3_int4.int4_linear(x, w, scales, bias, "avx512_vnni")


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 20),  # whole and partial blocks of 6 rows
    out_features=st.integers(1, 100),  # whole and partial panels of 32 columns
    blocks=st.integers(1, 5),  # K = 128 * blocks
    group=st.sampled_from(GROUP_SIZES),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_equals_the_vnni_loop_up_to_float32_order(rows, out_features, blocks, group, bias, seed):
    K = 128 * blocks
    w, scales, b = random_layer(out_features, K, bias, seed, group)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(seed + 1)) * 3
    out, expected = gemm(x, w, scales, b), loop(x, w, scales, b)
    assert out.shape == (rows, out_features) and out.dtype == torch.float32
    assert ((out - expected).abs() <= error_bound(x, w, scales, b, 2 * K * FLOAT32_EPS)).all()


def test_quantize_int8_rounds_each_group_to_its_largest_magnitude_over_127():
    x = torch.randn(5, 256) * torch.logspace(-3, 3, 256)
    x[2, 64:96] = 0.0  # a zero group: zeros, scale 0
    for G in GROUP_SIZES:
        xq, xs = torch.ops.minaf3_int4.quantize_int8(x, G)
        groups = x.view(5, 256 // G, G)
        big = groups.abs().amax(-1)
        assert torch.equal(xs, big / 127)
        inverse = torch.where(big > 0, 127 / big, 0.0)
        expected = (groups * inverse[..., None]).round().clamp(-127, 127).to(torch.int8)  # ties to even
        assert xq.dtype == torch.int8 and torch.equal(xq, expected.view(5, 256))
        bf16_q, bf16_s = torch.ops.minaf3_int4.quantize_int8(x.bfloat16(), G)
        widened = torch.ops.minaf3_int4.quantize_int8(x.bfloat16().float(), G)
        assert torch.equal(bf16_q, widened[0]) and torch.equal(bf16_s, widened[1])


def test_rows_of_several_chunks_each_equal_that_row_alone():
    """Rows are multiplied in chunks of whose int8 activations fit the L3 cache (216 rows at K = 18944)."""
    w, scales, b = random_layer(40, 18944, True, seed=3)
    x = torch.randn(230, 18944)
    out = gemm(x, w, scales, b)
    for i in (0, 5, 215, 216, 229):
        assert torch.equal(out[i], gemm(x[i : i + 1], w, scales, b)[0]), i
    assert ((out - int4_linear_reference(x, w, scales, b)).abs() <= loop_bound(x, w, scales, b)).all()


def loop_bound(x, w, scales, b):
    group = 2 * w.shape[1] // scales.shape[1]
    return error_bound(x, w, scales, b, 2 * x.shape[-1] * FLOAT32_EPS, int8_group=group)


def test_thread_count_does_not_change_any_bit():
    """Threads take panels of 32 output columns; each is the same code whichever thread runs it."""
    w, scales, b = random_layer(517, 1024, True, seed=8)
    x = torch.randn(45, 1024)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = gemm(x, w, scales, b)
        torch.set_num_threads(max(2, threads))
        shared = gemm(x, w, scales, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, shared)


def test_bf16_activations_go_in_and_out_as_the_float32_call_rounded():
    w, scales, b = random_layer(70, 384, True, seed=13)
    x = torch.randn(9, 384).bfloat16()
    out = gemm(x, w, scales, b.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == (9, 70)
    assert torch.equal(out, gemm(x.float(), w, scales, b.bfloat16().float()).bfloat16())


def test_a_non_finite_activation_poisons_its_outputs():
    w, scales, _ = random_layer(6, 256, False, seed=12)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(8, 256)
        x[3, 77] = bad
        out = gemm(x, w, scales)
        assert not torch.isfinite(out[3]).any(), bad
        assert torch.isfinite(out[torch.arange(8) != 3]).all(), bad


def test_groups_of_denormal_activations_stay_within_the_bound():
    w, scales, _ = random_layer(9, 384, False, seed=14)
    x = torch.randn(7, 384)
    x[0, 32:64] = 1e-40  # 127 / its largest magnitude overflows: the group rounds to zeros
    x[1, 128:256] = 0.0
    x[1, 130] = -3e-39
    out = gemm(x, w, scales)
    assert torch.isfinite(out).all()
    assert ((out - int4_linear_reference(x, w, scales, None)).abs() <= loop_bound(x, w, scales, None)).all()


def test_the_operators_refuse_what_they_cannot_multiply():
    w, scales, b = random_layer(8, 256, True, seed=6)
    xq, xs = torch.ops.minaf3_int4.quantize_int8(torch.randn(2, 256), 32)
    op = torch.ops.minaf3_vnni.int4_gemm
    with pytest.raises(RuntimeError, match="xq must be int8"):
        op(xq.float(), xs, w, scales, b, torch.float32)
    with pytest.raises(RuntimeError, match="xq has 128 columns, w packs 256"):
        op(xq[:, :128], xs, w, scales, b, torch.float32)
    with pytest.raises(RuntimeError, match="xs must be float32"):
        op(xq, xs.double(), w, scales, b, torch.float32)
    with pytest.raises(RuntimeError, match="with the groups of xs"):
        op(xq, xs[:, :3], w, scales, b, torch.float32)
    with pytest.raises(RuntimeError, match="the group size must be 32, 64 or 128"):
        op(xq, xs[:, :1], w, scales[:, :1], b, torch.float32)
    with pytest.raises(RuntimeError, match="bias must be float32 with 8 entries"):
        op(xq, xs, w, scales, b[:3], torch.float32)
    with pytest.raises(RuntimeError, match="dtype must be float32 or bfloat16"):
        op(xq, xs, w, scales, b, torch.float16)
    with pytest.raises(RuntimeError, match="K = 200 must be a multiple of 128"):
        torch.ops.minaf3_int4.quantize_int8(torch.randn(2, 200), 32)
    with pytest.raises(RuntimeError, match="must be a float32 or bfloat16 CPU tensor"):
        torch.ops.minaf3_int4.quantize_int8(torch.randn(2, 256).half(), 32)


def int8_layer(out_features: int, in_features: int, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=g)
    scales = torch.rand(out_features, generator=g) * 0.01 + 1e-4
    return w, scales, torch.randn(out_features, generator=g) if bias else None


def int8_bound(x, w, scales, b):
    """float32 rounding of the sums, plus what the activations' int8 rounding can change."""
    W = w.double() * scales.double()[:, None]
    size = x.double().abs() @ W.abs().T + (0 if b is None else b.double().abs())
    group = vnni_prefill.ACTIVATION_GROUP
    return (2 * x.shape[-1] * FLOAT32_EPS * size + int8_activation_bound(x, W, group) + 1e-6).float()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 20),
    out_features=st.integers(1, 100),
    blocks=st.integers(1, 5),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int8_product_within_the_activations_rounding(rows, out_features, blocks, bias, seed):
    K = 128 * blocks
    w, scales, b = int8_layer(out_features, K, bias, seed)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(seed + 1)) * 3
    out = vnni_prefill.int8_gemm_linear(x, w, scales, b)
    W = w.double() * scales.double()[:, None]
    expected = (x.double() @ W.T + (0 if b is None else b.double())).float()
    assert out.shape == (rows, out_features) and out.dtype == torch.float32
    assert ((out - expected).abs() <= int8_bound(x, w, scales, b)).all()


def test_int8_bf16_and_threads():
    """bf16 activations: the float32 call rounded; threads: the same bits."""
    w, scales, b = int8_layer(517, 1024, True, seed=21)
    x = torch.randn(45, 1024).bfloat16()
    out = vnni_prefill.int8_gemm_linear(x, w, scales, b)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, vnni_prefill.int8_gemm_linear(x.float(), w, scales, b).bfloat16())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = vnni_prefill.int8_gemm_linear(x.float(), w, scales, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, vnni_prefill.int8_gemm_linear(x.float(), w, scales, b))


def test_the_int8_operator_refuses_what_it_cannot_multiply():
    w, scales, b = int8_layer(8, 256, True, seed=6)
    xq, xs = torch.ops.minaf3_int4.quantize_int8(torch.randn(2, 256), 32)
    op = torch.ops.minaf3_vnni.int8_gemm
    with pytest.raises(RuntimeError, match=r"w must be \(N, K\) int8"):
        op(xq, xs, w.view(torch.uint8), scales, b, torch.float32)
    with pytest.raises(RuntimeError, match="xq has 256 columns, w 128"):
        op(xq, xs, w[:, :128], scales, b, torch.float32)
    with pytest.raises(RuntimeError, match="scales must be float32 with 8 entries"):
        op(xq, xs, w, scales.bfloat16(), b, torch.float32)
    with pytest.raises(RuntimeError, match="the group size must be 32, 64 or 128"):
        op(xq, xs[:, :1], w, scales, b, torch.float32)
