"""bf16 tiles of quantized weights (kernels/bf16_tiles.py): the prefill of int8 and int4 layers on CPUs with
AVX-512 BF16. Each tile is the weight's values rounded once to bf16, exactly as torch rounds them; the tiled
product, on one thread or several, is the float64 reference within bf16 rounding of activations, weights and
outputs."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from minaf3.kernels import bf16_tiles
from minaf3.kernels.int4_linear import int4_dequantize_reference, pack_int4, padded_width
from minaf3.kernels.registry import available

pytestmark = pytest.mark.skipif(
    not torch.cpu._is_avx512_bf16_supported(), reason="bf16 tiles run on CPUs with AVX-512 BF16 only"
)
BF16_UNIT = torch.finfo(torch.bfloat16).eps / 2


def int8_weight(N: int, K: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g), torch.rand(N, generator=g) * 0.01


def int4_weight(N: int, K: int, seed: int, group: int):
    g = torch.Generator().manual_seed(seed)
    Kp = padded_width(K)
    scales = ((torch.rand(N, Kp // group, generator=g) - 0.5) * 0.02).bfloat16()
    return pack_int4(torch.randint(0, 16, (N, Kp), generator=g)), scales


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 300), K=st.integers(1, 300), row0=st.integers(0, 299), seed=st.integers(0, 2**16))
def test_int8_tiles_are_the_weight_rounded_to_bf16(N, K, row0, seed):
    assert available().bf16_prefill
    w, scales = int8_weight(N, K, seed)
    row0 = row0 % N
    rows = N - row0
    tile = torch.ops.minaf3_tiles.int8_dequantize(w, scales, row0, rows)
    expected = (w[row0:].float() * scales[row0:, None]).bfloat16()  # float32 product, one rounding
    assert tile.dtype == torch.bfloat16 and torch.equal(tile, expected)


@settings(max_examples=25, deadline=None)
@given(
    N=st.integers(1, 300),
    K=st.integers(1, 300),
    group=st.sampled_from([32, 64, 128]),
    seed=st.integers(0, 2**16),
)
def test_int4_tiles_are_the_weight_rounded_to_bf16(N, K, group, seed):
    w, scales = int4_weight(N, K, seed, group)
    tile = torch.ops.minaf3_tiles.int4_dequantize(w, scales, N // 2, N - N // 2)
    expected = int4_dequantize_reference(w, scales)[N // 2 :].float().bfloat16()  # exact in float32
    assert torch.equal(tile, expected)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("N, K", [(1, 128), (600, 384), (257, 3584)])  # one tile, several, a partial last
@pytest.mark.parametrize("threads", [1, 2])
def test_tiled_linear_is_the_reference_within_bf16_rounding(mode, N, K, threads):
    torch.manual_seed(0)
    if mode == "int8":
        w, scales = int8_weight(N, K, seed=1)
        W, product = w.double() * scales.double()[:, None], bf16_tiles.int8_tiled_linear
    else:
        w, scales = int4_weight(N, K, seed=1, group=32)
        W, product = int4_dequantize_reference(w, scales), bf16_tiles.int4_tiled_linear
    x, bias = torch.randn(3, 7, K), torch.randn(N)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = product(x, w, scales, bias)
    finally:
        torch.set_num_threads(before)
    expected = x.double() @ W.T + bias.double()
    bound = 3 * BF16_UNIT * (x.double().abs() @ W.abs().T) + 1e-6  # activations, weights, outputs rounded
    assert out.shape == (3, 7, N) and out.dtype == torch.float32
    assert ((out.double() - expected).abs() <= bound).all()
    assert product(x.bfloat16(), w, scales, bias).dtype == torch.bfloat16


def test_the_operators_name_what_they_refuse():
    w, scales = int8_weight(4, 64, seed=2)
    with pytest.raises(RuntimeError, match="int8_dequantize: rows 3 \\+ 2 of 4"):
        torch.ops.minaf3_tiles.int8_dequantize(w, scales, 3, 2)
    with pytest.raises(RuntimeError, match="int8_dequantize: scales must be 4 contiguous float32 values"):
        torch.ops.minaf3_tiles.int8_dequantize(w, scales.double(), 0, 4)
    p, s = int4_weight(4, 128, seed=2, group=32)
    with pytest.raises(RuntimeError, match="int4_dequantize: scales must be contiguous"):
        torch.ops.minaf3_tiles.int4_dequantize(p, s.float(), 0, 4)


def test_tiled_linear_under_inference_mode():
    """The product's threads take the caller's inference mode (pipelines generate under it)."""
    w, scales = int8_weight(600, 128, seed=3)
    with torch.inference_mode():
        out = bf16_tiles.int8_tiled_linear(torch.randn(5, 128), w, scales, torch.randn(600))
    assert out.shape == (5, 600)
