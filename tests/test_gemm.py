"""kernels/gemm.cpp: the float32 matrix product for many rows, against its definition (float64), on float32,
bf16 and int8 (scaled per row) weights.

Shapes cover the kernel's edges: rows that fill no 6-row tile or leave a partial one, widths beyond one
256-column panel and with a tail that is not a multiple of 8, outputs that fill no 16-row panel and more
than one group of 8 panels, and more rows than one block of x's copy. Then the dispatch of
minaf3/linear.py, and a model whose prefill runs through the kernel against the same model without it.
"""

import pytest
import torch
from conftest import speech_like
from hypothesis import given, settings
from hypothesis import strategies as st
from minaf3.kernels import gemm
from minaf3.kernels.registry import override

from minaf3 import AudioFlamingo3ForConditionalGeneration
from minaf3.linear import Linear


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert gemm.load_library(), "the kernel must build on the test machine"


def close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Within float32 rounding of sums of products: relative to the largest output."""
    return bool((got - expected).abs().max() <= 1e-5 * (1 + expected.abs().max()))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),
    in_features=st.integers(1, 600),
    out_features=st.integers(1, 300),
    bias=st.booleans(),
    x_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    w_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int8]),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_the_float64_product(rows, in_features, out_features, bias, x_dtype, w_dtype, seed):
    """The operators on float32 or bf16 operands, or int8 weights with a scale per row: the float32
    product of their values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=g).to(x_dtype)
    b = torch.randn(out_features, generator=g) if bias else None
    if w_dtype == torch.int8:
        w = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=g)
        scales = torch.rand(out_features, generator=g) * 0.02 + 1e-3
        got = torch.ops.minaf3_gemm.int8_gemm(x, w, scales, b)
        expected = gemm.gemm_reference(x, w.double() * scales.double()[:, None], b)
    else:
        w = torch.randn(out_features, in_features, generator=g).to(w_dtype)
        got = torch.ops.minaf3_gemm.f32_gemm(x, w, b)
        expected = gemm.gemm_reference(x, w, b)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    assert close(got, expected)


def test_bf16_layers_give_bf16_outputs_rounded_from_float32():
    g = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(*shape, generator=g).bfloat16() for shape in [(3, 7, 40), (24, 40), (24,)])
    got = gemm.gemm_linear(x, w, b)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.ops.minaf3_gemm.f32_gemm(x, w, b.float()).bfloat16())


@pytest.mark.parametrize("rows, width, block", [(1100, 4096, 1020), (4200, 16, 4092)])
def test_blocks_of_rows_give_the_rows_computed_alone(rows, width, block):
    """x's copy is made a block of rows at a time: 16 MiB (1020 rows at K = 4096), at most 4092 rows. The
    rows after the first block are computed in a second pass over the weights, with the same order of
    summation as when they are the only rows."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, width, generator=g), torch.randn(40, width, generator=g)
    got = gemm.gemm_linear(x, w)
    assert close(got, gemm.gemm_reference(x, w))
    assert torch.equal(got[block:], gemm.gemm_linear(x[block:], w))


def test_leading_dimensions_and_strided_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 3, generator=g).transpose(1, 2)  # (2, 3, 40), not contiguous
    w = torch.randn(50, 80, generator=g)[:, ::2]  # (50, 40), every other column
    b = torch.randn(100, generator=g)[::2]
    got = gemm.gemm_linear(x, w, b)
    assert got.shape == (2, 3, 50) and close(got, gemm.gemm_reference(x, w, b))


def test_empty_products():
    w, b = torch.randn(5, 0), torch.randn(5)
    assert torch.equal(gemm.gemm_linear(torch.randn(3, 0), w, b), b.expand(3, 5))
    assert torch.equal(gemm.gemm_linear(torch.randn(3, 0), w), torch.zeros(3, 5))
    assert gemm.gemm_linear(torch.randn(0, 4), torch.randn(5, 4)).shape == (0, 5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, w, b: (x.double(), w, b), "x and w must be float32 or bfloat16"),
        (lambda x, w, b: (x, w.half(), b), "x and w must be float32 or bfloat16"),
        (lambda x, w, b: (x[:, :15], w, b), "x has 15 columns but w has 16"),
        (lambda x, w, b: (x, w, b[:3]), "bias must be float32 with 4 entries"),
        (lambda x, w, b: (x, w[None], b), r"x \(\.\.\., K\) and w \(N, K\) expected"),
    ],
)
def test_operator_refuses_what_it_cannot_multiply(change, message):
    """The operator's own checks name it and the problem before reading any data."""
    with pytest.raises(RuntimeError, match=f"f32_gemm: {message}"):
        torch.ops.minaf3_gemm.f32_gemm(*change(torch.randn(9, 16), torch.randn(4, 16), torch.randn(4)))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, w, s, b: (x, w.float(), s, b), "x must be float32 or bfloat16 and w int8"),
        (lambda x, w, s, b: (x.half(), w, s, b), "x must be float32 or bfloat16 and w int8"),
        (lambda x, w, s, b: (x, w, s[:3], b), "4 weight rows need as many float32 scales"),
        (lambda x, w, s, b: (x, w, s.double(), b), "4 weight rows need as many float32 scales"),
        (lambda x, w, s, b: (x[:, :15], w, s, b), "x has 15 columns but w has 16"),
        (lambda x, w, s, b: (x, w, s, b[:3]), "bias must be float32 with 4 entries"),
    ],
)
def test_int8_operator_refuses_what_it_cannot_multiply(change, message):
    w = torch.randint(-127, 128, (4, 16), dtype=torch.int8)
    with pytest.raises(RuntimeError, match=f"int8_gemm: {message}"):
        torch.ops.minaf3_gemm.int8_gemm(*change(torch.randn(9, 16), w, torch.rand(4), torch.randn(4)))


@pytest.mark.parametrize("capability, wanted", [("AVX2", True), ("AVX512", False), ("DEFAULT", False)])
def test_the_kernel_is_wanted_where_avx2_is_the_best_vector_unit(monkeypatch, capability, wanted):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert gemm.wanted.__wrapped__() is wanted


def test_linear_sends_float32_and_bf16_rows_without_gradients_to_the_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(gemm, "gemm_linear", lambda *a: calls.append(1) or gemm.gemm_reference(*a))
    layer = Linear(64, 48)
    x = torch.randn(2, 20, 64)
    plain = torch.nn.functional.linear
    with torch.no_grad(), override(gemm=True):  # as on an AVX2 CPU, whatever this one is
        assert close(layer(x), plain(x, layer.weight, layer.bias)) and len(calls) == 1
        layer(x[0, :1])  # one row: the matrix-vector kernel
        assert len(calls) == 1
        layer.bfloat16()(x.bfloat16())  # bf16 layer and rows: the kernel too
        assert len(calls) == 2
        layer.float()
        with override(gemm=False):  # an AVX-512 CPU: oneDNN or torch
            assert close(layer(x), plain(x, layer.weight, layer.bias))
    with override(gemm=True):
        layer(x).sum().backward()  # gradients: torch's product
    assert len(calls) == 2 and layer.weight.grad is not None


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.05)])
def test_generation_through_the_kernel_gives_the_tokens_and_logits_without_it(
    tiny_checkpoint, reference_processor, monkeypatch, dtype, tolerance
):
    """Audio and prompt (the encoder, the projector and the prefill multiply many rows) with and without
    the kernel: the same tokens, logits within float32 rounding (bf16: within the rounding of activations
    to bf16, which torch's products do in another order)."""
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=dtype)
    content = [
        {"type": "text", "text": "What is in this audio?"},
        {"type": "audio", "audio": speech_like(40_000)},
    ]
    inputs = dict(reference_processor.apply_chat_template(
        [[{"role": "user", "content": content}]], tokenize=True, add_generation_prompt=True, return_dict=True
    ))  # fmt: skip
    args = dict(max_new_tokens=6, do_sample=False, repetition_penalty=1.0, eos_token_id=[],
                return_dict_in_generate=True, output_logits=True, **inputs)  # fmt: skip
    rows = []
    kernel_linear = gemm.gemm_linear
    monkeypatch.setattr(
        gemm, "gemm_linear", lambda x, *a: rows.append(x.shape[:-1].numel()) or kernel_linear(x, *a)
    )
    with override(gemm=True):  # as on an AVX2 CPU, whatever this one is
        with_kernel = model.generate(args.pop("input_ids"), **args)
    assert rows and max(rows) > inputs["input_ids"].shape[1]  # the encoder's frames went through it too
    with override(gemm=False):
        without = model.generate(inputs["input_ids"], **args)
    assert torch.equal(with_kernel.sequences, without.sequences)
    difference = max((a - b).abs().max() for a, b in zip(with_kernel.logits, without.logits, strict=True))
    assert difference < tolerance


def test_compiled_decoding_of_more_rows_than_a_vector_product_runs_the_kernel(tiny_checkpoint):
    """A compiled decode step of 9 rows (past the matrix-vector kernel's 8) traces the kernel as a graph
    node, with no graph break, and gives the eager tokens. The real `wanted` (the CPU query, which tracing
    cannot follow) decides here."""
    from torch._dynamo.utils import counters

    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    ids = torch.randint(0, 400, (9, 7), generator=torch.Generator().manual_seed(5))
    args = dict(max_new_tokens=4, do_sample=False, repetition_penalty=1.0, eos_token_id=[])
    eager = model.generate(ids, **args)
    counters.clear()
    compiled = model.generate(ids, compile=True, **args)
    assert torch.equal(compiled, eager)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] >= 1
