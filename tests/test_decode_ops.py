"""kernels/decode_ops.cpp: a decoder layer's element-wise steps as C++ operators, against their definitions.

The definitions are the torch code in minaf3/decoder.py (RMSNorm's, apply_rope with KVCache.update, SiLU
times up), run here on the same inputs: RoPE and the cache writes agree to the bit; RMSNorm and SiLU (sums
in another order, another exp) to float32 rounding, and in bf16, where each torch op rounds its result, to
one bf16 rounding. Then the decoder through them against the decoder with
them switched off (tokens equal, logits close), which paths run where (autograd and a build without them
take the torch code), and what the operators refuse. The build-failure fallback runs in a fresh interpreter.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import run_python
from hypothesis import given, settings
from hypothesis import strategies as st
from minaf3.kernels import decode_ops
from minaf3.kernels.registry import override

from minaf3 import AudioFlamingo3ForConditionalGeneration, ConfigError
from minaf3.decoder import KVCache, RMSNorm, apply_rope, cpu_fused, rope_cos_sin, rope_inv_freq

DTYPES = st.sampled_from([torch.float32, torch.bfloat16])
GREEDY = dict(do_sample=False, repetition_penalty=1.0, eos_token_id=[])
OP_SETTINGS = settings(max_examples=40, deadline=None)


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert decode_ops.load_library(), "the kernels must build on the test machine"


def close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal dtypes and shapes; values within float32 rounding, or one bf16 rounding of the larger."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    eps = 2**-7 if got.dtype == torch.bfloat16 else 1e-6
    scale = expected.double().abs() + got.double().abs()
    assert ((got.double() - expected.double()).abs() <= eps * scale + 1e-30).all()


@OP_SETTINGS
@given(
    rows=st.integers(0, 5),
    hidden=st.integers(1, 200),  # every remainder mod 8
    x_dtype=DTYPES,
    w_dtype=DTYPES,
    scale=st.sampled_from([1e-3, 1.0, 300.0]),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_matches_the_module_s_torch_code(rows, hidden, x_dtype, w_dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, rows, hidden, generator=g) * scale).to(x_dtype)
    norm = RMSNorm(hidden, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=g))
    norm.to(w_dtype)
    with torch.no_grad(), override(decode_ops=False):
        expected = norm(x)
    close(decode_ops.rms_norm(x, norm.weight, 1e-6), expected)


def torch_rope_cache(qkv, cos, sin, k_cache, v_cache, slots, num_heads):
    """DecoderAttention's torch code: split, view, rotate q and k, write k and v into the caches."""
    B, T, _ = qkv.shape
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    sizes = [num_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    q, k, v = (part.view(B, T, -1, head_dim).transpose(1, 2) for part in qkv.split(sizes, dim=-1))
    cache = KVCache(B, kv_heads, k_cache.shape[2], head_dim, qkv.dtype, qkv.device)
    cache.k_cache.copy_(k_cache)
    cache.v_cache.copy_(v_cache)
    cache.update(slots, apply_rope(k, cos, sin), v)
    return apply_rope(q, cos, sin), cache.k_cache, cache.v_cache


@OP_SETTINGS
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(1, 5),
    kv_heads=st.integers(1, 3),
    groups=st.integers(1, 4),
    half_dim=st.integers(1, 20),
    dtype=DTYPES,
    seed=st.integers(0, 2**16),
)
def test_rope_cache_matches_split_rotate_and_cache_update(
    batch, tokens, kv_heads, groups, half_dim, dtype, seed
):
    """Random slots (not in order), positions per row (left padding), every other slot left as it was; the
    operator rounds as the torch ops do, product by product, so the results are theirs to the bit."""
    g = torch.Generator().manual_seed(seed)
    heads, head_dim, slots = kv_heads * groups, 2 * half_dim, tokens + 6
    qkv = torch.randn(batch, tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    positions = torch.randint(0, 5000, (batch, tokens), generator=g)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(head_dim, 1e6), dtype)  # (B, 1, T, D)
    k_cache, v_cache = (torch.randn(batch, kv_heads, slots, head_dim, generator=g).to(dtype) for _ in "kv")
    where = torch.randperm(slots, generator=g)[:tokens]
    expected = torch_rope_cache(qkv, cos, sin, k_cache, v_cache, where, heads)
    q = decode_ops.rope_cache(qkv, cos, sin, k_cache, v_cache, where, heads)  # writes k_cache, v_cache
    for got, want in zip((q, k_cache, v_cache), expected, strict=True):
        assert torch.equal(got, want)


@OP_SETTINGS
@given(
    rows=st.integers(0, 4),
    inner=st.integers(1, 100),
    dtype=DTYPES,
    scale=st.sampled_from([1.0, 10.0, 200.0]),  # 200: exp(-x) overflows in float32 for the torch code
    seed=st.integers(0, 2**16),
)
def test_silu_mul_matches_silu_of_gate_times_up(rows, inner, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(3, rows, 2 * inner, generator=g) * scale).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    close(decode_ops.silu_mul(gate_up), F.silu(gate) * up)


def test_nan_and_infinity_reach_the_outputs_as_in_torch():
    x = torch.randn(2, 24)
    x[0, 3] = float("nan")
    assert decode_ops.rms_norm(x, torch.ones(24), 1e-6)[0].isnan().all()
    assert not decode_ops.rms_norm(x, torch.ones(24), 1e-6)[1].isnan().any()
    gate_up = torch.randn(1, 32)
    gate_up[0, 2], gate_up[0, 5], gate_up[0, 20] = float("nan"), float("inf"), float("-inf")
    gate_up[0, 7], gate_up[0, 9] = float("-inf"), -100.0  # silu(-inf) = -inf * 0 = NaN in torch
    gate, up = gate_up.chunk(2, dim=-1)
    got, expected = decode_ops.silu_mul(gate_up), F.silu(gate) * up
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.isinf(), expected.isinf())


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: decode_ops.rms_norm(torch.ones(2, 8), torch.ones(7), 1e-6),
            r"rms_norm: x \(\.\.\., H\) and",
        ),
        (lambda: decode_ops.rms_norm(torch.ones(2, 8).half(), torch.ones(8), 1e-6), "float32 or bfloat16"),
        (lambda: decode_ops.silu_mul(torch.ones(2, 7)), r"silu_mul: gate_up must be \(\.\.\., 2 I\)"),
        (lambda: decode_ops.silu_mul(torch.ones(2, 8).double()), "float32 or bfloat16 expected"),
        (lambda: rope(qkv=torch.ones(1, 1, 40)), r"rope_cache: qkv must be \(1, T, 64\)"),
        (lambda: rope(slots=torch.tensor([9])), "slot 9 is outside the 9 cache slots"),
        (lambda: rope(slots=torch.tensor([1, 2])), "slots must be 1 int64 cache slots"),
        (lambda: rope(cache=torch.ones(1, 2, 9, 8).bfloat16()), "must share one dtype"),
        (lambda: rope(cache=torch.ones(1, 2, 9, 8)[:, :, ::2]), "must be contiguous"),
    ],
)
def test_operators_refuse_what_they_cannot_compute(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def rope(qkv=None, cache=None, slots=None):
    """rope_cache on a valid problem (4 query and 2 key heads of 8) with one argument replaced."""
    qkv = torch.ones(1, 1, 64) if qkv is None else qkv
    k_cache = torch.zeros(1, 2, 9, 8) if cache is None else cache
    cos = sin = torch.ones(1, 1, 1, 8)
    slots = torch.tensor([3]) if slots is None else slots
    return decode_ops.rope_cache(qkv, cos, sin, k_cache, torch.zeros(1, 2, 9, 8), slots, 4)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.05)])
def test_decoding_through_the_operators_gives_the_torch_code_s_tokens(tiny_checkpoint, dtype, tolerance):
    """Left-padded batch: prefill (blocks of tokens) and decode steps (one token) through the operators."""
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=dtype)
    ids = torch.randint(0, 400, (2, 11), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    args = dict(attention_mask=mask, max_new_tokens=12, return_dict_in_generate=True, output_logits=True)
    fused = model.generate(ids, **args, **GREEDY)
    with override(decode_ops=False):
        plain = model.generate(ids, **args, **GREEDY)
    assert torch.equal(fused.sequences, plain.sequences)
    assert max((a - b).abs().max() for a, b in zip(fused.logits, plain.logits, strict=True)) < tolerance


def test_the_operators_run_only_for_cpu_inference():
    x = torch.ones(1, 1, 8)
    with torch.no_grad():
        assert cpu_fused(x)
        assert not cpu_fused(x.half())  # a dtype the operators do not compute in
        with override(decode_ops=False):
            assert not cpu_fused(x)
    assert not cpu_fused(x)  # autograd records the torch ops, whose backward it knows


def test_training_through_the_decoder_takes_the_torch_code(tiny_checkpoint):
    """With autograd on, gradients reach the norm weights (an operator's output would have no grad_fn)."""
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    ids = torch.randint(0, 400, (1, 6), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    layer = model.language_model.layers[0]
    assert layer.input_layernorm.weight.grad is not None and layer.mlp.gate_up_proj.weight.grad is not None


CHECK_FALLBACK = """
import logging, torch
logging.basicConfig()
from minaf3.kernels.registry import available
from minaf3.decoder import RMSNorm
with torch.no_grad():
    out = RMSNorm(8, 1e-6)(torch.ones(1, 8))
print(available().decode_ops, round(float(out.sum()), 3))
"""


def test_missing_compiler_falls_back_to_the_torch_code_with_a_note(tmp_path):
    done = run_python(CHECK_FALLBACK, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-c++"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "8.0"]
    assert "CPU decode element-wise kernels: building decode_ops.cpp failed" in done.stderr
