"""The speed paths give the answers of the plain paths.

Fused projections (decoder.py, linear.fuse_rows) against the checkpoint's separate layers, and their
interplay with LoRA adapters; the compiled decode step against eager decoding (generate.py); the copy-free
grouped-query eager attention that CPU decoding uses against torch's sdpa (attention.py); the loading
options that order adapter, fusion and int8 quantization (model.py). Wall-clock times are tools/bench.py's
business, not these tests'.
"""

import shutil

import pytest
import torch
from conftest import write_reference_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from minaf3.kernels.gemv import gemv_linear
from minaf3.kernels.registry import runs
from test_lora import ADAPTERS, write_adapter
from test_model import reference_inputs

from minaf3 import AudioFlamingo3ForConditionalGeneration, CheckpointError, ConfigError, GenerationError
from minaf3.attention import attention
from minaf3.linear import ONEDNN_MIN_WEIGHTS, Linear
from minaf3.lora import LoRALinear, load_adapter, lora_updates, unmerge
from minaf3.model import length_groups
from minaf3.quantize import Int8Linear, quantize_model

GREEDY = dict(do_sample=False, repetition_penalty=1.0, eos_token_id=[])


def load(path, **options) -> AudioFlamingo3ForConditionalGeneration:
    return AudioFlamingo3ForConditionalGeneration.from_pretrained(path, **options)


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():  # the inputs hold labels: the logits are asked for beside the loss
        return model(**inputs, return_logits=True).logits


@pytest.fixture(scope="module")
def inputs(reference_processor):
    return reference_inputs(reference_processor, ["short", "mid"])


@pytest.fixture(scope="module")
def think_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with a think/ adapter whose LoRA targets q_proj and o_proj (not gate/up)."""
    folder = shutil.copytree(tiny_checkpoint, tmp_path_factory.mktemp("think") / "af3")
    write_adapter(folder / "think", tiny_checkpoint, ADAPTERS["bias_bin"], seed=5)
    return folder


# ---- fused projections ------------------------------------------------------------------------------------
def test_fused_projections_save_and_load_under_the_checkpoint_names(tiny_checkpoint, inputs):
    """q/k/v and gate/up are one layer each from the moment the model is loaded; its state_dict speaks the
    checkpoint's names, as views of the fused rows, and loads back into a fresh model exactly."""
    model = load(tiny_checkpoint)
    attn = model.language_model.layers[0].self_attn
    assert set(attn._modules) == {"qkv_proj", "o_proj"}
    state = model.state_dict()
    names = list(state)
    assert "language_model.layers.0.self_attn.q_proj.bias" in names
    assert "language_model.layers.1.mlp.up_proj.weight" in names
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in names)
    q = state["language_model.layers.0.self_attn.q_proj.weight"]
    assert q.data_ptr() == attn.qkv_proj.weight.data_ptr()  # a view, not a copy
    with torch.device("meta"):
        fresh = AudioFlamingo3ForConditionalGeneration(model.config)
    fresh.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    fresh.language_model.reset_buffers(torch.device("cpu"))
    assert torch.equal(logits(fresh.eval(), inputs), logits(model, inputs))


def test_generate_leaves_the_parameters_as_they_are(tiny_checkpoint, inputs):
    """An optimizer made before generating keeps updating the model: generate replaces no parameter."""
    model = load(tiny_checkpoint)
    before = {name: p for name, p in model.named_parameters()}
    model.generate(**inputs, max_new_tokens=2, **GREEDY)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    qkv = model.language_model.layers[0].self_attn.qkv_proj
    assert not qkv.weight.is_inference() and qkv.weight.requires_grad  # still trainable after generate


@pytest.mark.parametrize("merge", [True, False])
def test_adapter_on_fused_layers_updates_the_parts_it_targets(think_checkpoint, inputs, merge):
    """The adapter targets q_proj and o_proj: q's rows of qkv_proj take its update, k's and v's do not."""
    expected_model = load(think_checkpoint)
    load_adapter(expected_model, think_checkpoint / "think", merge=True)
    expected = logits(expected_model, inputs)
    model = load(think_checkpoint)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_adapter(think_checkpoint / "think", merge=merge)
    assert (logits(model, inputs) - expected).abs().max() < 1e-5
    attn = model.language_model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, LoRALinear) and not isinstance(
        model.language_model.layers[0].mlp.gate_up_proj, LoRALinear
    )
    assert {u.target.rpartition(".")[2] for u in attn.qkv_proj.updates} == {"q_proj"}
    state = model.state_dict()
    k_proj = "language_model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(state[k_proj], base[k_proj])  # untouched rows
    assert len(lora_updates(model)) == ADAPTERS["bias_bin"]["expect"][0]
    unmerge(model)  # the adapter comes out cleanly
    assert (logits(model, inputs) - logits(load(think_checkpoint), inputs)).abs().max() < 1e-5


# ---- encoder batching ------------------------------------------------------------------------------------
@given(
    lengths=st.lists(st.integers(1, 3000), min_size=1, max_size=30), slack=st.sampled_from([0.0, 0.25, 1.0])
)
def test_length_groups_bound_the_padding(lengths, slack):
    groups = length_groups(lengths, slack)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        longest = max(lengths[i] for i in group)
        assert all(longest <= (1 + slack) * lengths[i] for i in group)
    full = [i for i, n in enumerate(lengths) if n == 3000]
    assert not full or any(set(full) <= set(g) for g in groups)  # the full windows run as one batch


# ---- loading options --------------------------------------------------------------------------------------
def test_from_pretrained_think_applies_the_merged_adapter(think_checkpoint, tiny_checkpoint, inputs):
    expected_model = load(think_checkpoint)
    load_adapter(expected_model, think_checkpoint / "think")
    model = load(think_checkpoint, think=True)
    assert torch.equal(logits(model, inputs), logits(expected_model, inputs))
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    with pytest.raises(CheckpointError, match="no think/ adapter"):
        load(tiny_checkpoint, think=True)


def test_from_pretrained_quantize_comes_after_the_adapter(think_checkpoint, inputs):
    expected_model = load(think_checkpoint)
    load_adapter(expected_model, think_checkpoint / "think")
    quantize_model(expected_model)
    model = load(think_checkpoint, think=True, quantize="int8")
    assert isinstance(model.lm_head, Int8Linear) and model.dtype == torch.float32
    assert torch.equal(logits(model, inputs), logits(expected_model, inputs))
    with pytest.raises(ConfigError, match="before quantizing"):
        model.load_adapter(think_checkpoint / "think")
    with pytest.raises(ConfigError, match=r"quantize='int3': expected None or one of \['int8', 'int4'\]"):
        load(think_checkpoint, quantize="int3")


def test_the_memory_check_counts_the_widening_an_adapter_needs(think_checkpoint, monkeypatch):
    """With think=True the whole model is converted before it is quantized, so the check counts it whole:
    memory that holds the int8 model but not the converted one refuses think, not the plain int8 load."""
    from minaf3 import estimate

    int8_bytes = estimate.weight_bytes(think_checkpoint, torch.bfloat16, "int8")[1]
    whole = estimate.weight_bytes(think_checkpoint, torch.bfloat16, None)[1]
    monkeypatch.setattr(estimate, "available_memory", lambda device: ((int8_bytes + whole) // 2, "RAM"))
    assert load(think_checkpoint, dtype="bfloat16", quantize="int8").dtype == torch.bfloat16
    with pytest.raises(ConfigError, match=r"in bfloat16 but RAM is"):
        load(think_checkpoint, dtype="bfloat16", quantize="int8", think=True)


# ---- compiled decoding ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    """A one-layer checkpoint: compiling its decode step takes seconds, not minutes."""
    path = tmp_path_factory.mktemp("one_layer")
    return write_reference_checkpoint(path, seed=3, audio_layers=1, text_layers=1)


def test_compiled_decoding_gives_the_eager_tokens_and_logits(one_layer):
    model = load(one_layer)
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: the positions differ from the cache slots in row 0
    for length in (12, 9):  # a second prompt length in the same cache bucket reuses graph and cache
        args = dict(input_ids=ids[:, -length:], attention_mask=mask[:, -length:], max_new_tokens=10)
        eager = model.generate(
            **args, **GREEDY, compile=False, return_dict_in_generate=True, output_logits=True
        )
        compiled = model.generate(
            **args, **GREEDY, compile=True, return_dict_in_generate=True, output_logits=True
        )
        assert torch.equal(compiled.sequences, eager.sequences)
        for a, b in zip(compiled.logits, eager.logits, strict=True):
            assert (a - b).abs().max() < 1e-5
    assert model.language_model.cache_shape[2] == 256  # bucketed, and kept for the next compiled call


def test_compiled_steps_after_the_first_call_the_graph_directly(one_layer, monkeypatch):
    """Step 0 runs through torch.compile (its guards checked), steps 1.. call that graph (DirectStep); a
    weight replaced between calls is read by the next call, as eager reads it."""
    from minaf3 import decoding

    model = load(one_layer)
    ids = torch.randint(0, 400, (1, 9), generator=torch.Generator().manual_seed(4))
    args = dict(max_new_tokens=6, return_dict_in_generate=True, output_logits=True, **GREEDY)
    direct_calls, call = [], decoding.DirectStep.__call__

    def counted(self, *inputs):
        direct_calls.append(1)
        return call(self, *inputs)

    monkeypatch.setattr(decoding.DirectStep, "__call__", counted)
    for flip in (False, True):
        if flip:  # a new tensor object in place of the lm_head's weight: the next loop must read it
            model.lm_head.weight = torch.nn.Parameter(-model.lm_head.weight.detach(), requires_grad=False)
        direct_calls.clear()
        eager, compiled = (model.generate(ids, compile=mode, **args) for mode in (False, True))
        assert torch.equal(compiled.sequences, eager.sequences), flip
        assert max((a - b).abs().max() for a, b in zip(compiled.logits, eager.logits, strict=True)) < 1e-5
        assert len(direct_calls) == 4  # 6 tokens: the prefill's, step 0's (compiled call), steps 1-4 direct
    assert decoding._last_graph.call is None  # nothing keeps the cache alive between calls


def test_compiled_int8_decoding_gives_the_eager_tokens(one_layer):
    """The compiled step calls the int8 kernel as a graph node (Int8Linear.forward), like eager."""
    model = load(one_layer, quantize="int8")
    ids = torch.randint(0, 400, (1, 9), generator=torch.Generator().manual_seed(1))
    args = dict(max_new_tokens=10, return_dict_in_generate=True, output_logits=True, **GREEDY)
    eager, compiled = (model.generate(ids, compile=mode, **args) for mode in (False, True))
    assert torch.equal(compiled.sequences, eager.sequences)
    assert max((a - b).abs().max() for a, b in zip(compiled.logits, eager.logits, strict=True)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decoding_streams_large_plain_layers_through_the_kernel(one_layer, monkeypatch, dtype):
    """A compiled one-row step calls the C++ kernel for plain layers of STREAM_KERNEL_MIN_WEIGHTS weights
    or more, and inductor's loop below: the kernel shows in a profile only with the threshold lowered to 0
    (this model's layers are all below the default), and either way the tokens are eager's."""
    from torch.profiler import profile

    from minaf3 import linear as linear_module

    model = load(one_layer, dtype=dtype)
    kernel = {torch.float32: "minaf3_int8::f32_linear", torch.bfloat16: "minaf3_int8::bf16_linear"}[dtype]
    ids = torch.randint(0, 400, (1, 9), generator=torch.Generator().manual_seed(2))
    args = dict(max_new_tokens=6, return_dict_in_generate=True, output_logits=True, **GREEDY)
    eager = model.generate(ids, compile=False, **args)
    assert runs("gemv")
    for threshold, expect_kernel in ((linear_module.STREAM_KERNEL_MIN_WEIGHTS, False), (0, True)):
        monkeypatch.setattr(linear_module, "STREAM_KERNEL_MIN_WEIGHTS", threshold)
        torch._dynamo.reset()  # the threshold is read when the step is traced
        model.generate(ids, compile=True, **args)  # traces and compiles
        with profile() as trace:
            compiled = model.generate(ids, compile=True, **args)
        assert torch.equal(compiled.sequences, eager.sequences)
        tolerance = 1e-4 if dtype == torch.float32 else 0.05  # bf16: norms and RoPE round where they run
        assert (
            max((a - b).abs().max() for a, b in zip(compiled.logits, eager.logits, strict=True)) < tolerance
        )
        calls = sum(event.count for event in trace.key_averages() if event.key == kernel)
        # prefill's lm_head over the last position runs it eagerly; then 5 compiled steps of 5 plain layers
        # (qkv, o, gate_up, down, lm_head) each
        assert calls == 1 + 5 * 5 * expect_kernel, (threshold, calls)


def test_compile_argument_is_checked(one_layer):
    model = load(one_layer)
    with pytest.raises(GenerationError, match="compile='fast'"):
        model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=1, compile="fast")


# ---- linear layers ----------------------------------------------------------------------------------------
def test_linear_fast_paths_equal_the_layer():
    """A layer large enough for oneDNN, without and with gradients (where torch's product runs)."""
    layer = Linear(1024, ONEDNN_MIN_WEIGHTS // 1024)
    x = torch.randn(3, 5, 1024)

    def plain(rows):
        return torch.nn.functional.linear(rows, layer.weight, layer.bias)

    with torch.no_grad():
        assert (layer(x) - plain(x)).abs().max() < 1e-4
        assert (layer(x[0, :1]) - plain(x[0, :1])).abs().max() < 1e-4  # one row: a vector product
    x.requires_grad_()
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


OPERATORS = {torch.bfloat16: "bf16_linear", torch.float32: "f32_linear"}


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    # below and above one 64-column step, odd widths; from 2048 the AVX-512 code runs where the CPU has it
    in_features=st.one_of(st.integers(1, 200), st.integers(2040, 2120)),
    out_features=st.integers(1, 70),
    bias=st.booleans(),
    avx512=st.booleans(),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_streaming_kernel_equals_the_float64_product(
    rows, in_features, out_features, bias, avx512, dtype, seed
):
    """The streaming kernel over bf16 or float32 weights: the float32 product of the stored values."""
    assert runs("gemv")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g).to(dtype)
    b = torch.randn(out_features, generator=g) if bias else None
    got = getattr(torch.ops.minaf3_int8, OPERATORS[dtype])(x, w, b, avx512)
    expected = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert (got.double() - expected).abs().max() <= 1e-5 * (1 + expected.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_streaming_kernel_refuses_what_it_cannot_multiply(dtype):
    """The operators' own checks name the operator and the problem before reading any data."""
    assert runs("gemv")
    name = OPERATORS[dtype]
    op = getattr(torch.ops.minaf3_int8, name)
    x, w = torch.randn(2, 16), torch.randn(4, 16).to(dtype)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(RuntimeError, match=f"{name}: w must be {str(dtype).removeprefix('torch.')}"):
        op(x, w.to(other), None)
    with pytest.raises(RuntimeError, match=f"{name}: x has 15 columns but w has 16"):
        op(x[:, :15], w, None)
    with pytest.raises(RuntimeError, match=f"{name}: x must be float32"):
        op(x.double(), w, None)
    with pytest.raises(RuntimeError, match=f"{name}: bias must be float32 with 4 entries"):
        op(x, w, torch.zeros(3))


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.05), (torch.float32, 1e-4)])
def test_eager_decode_streams_through_the_kernel_with_torch_s_answers(
    one_layer, monkeypatch, dtype, tolerance
):
    """A bf16 or float32 model's eager decode (one row per layer) runs the kernel; its tokens and logits
    match torch's own products."""
    from minaf3.kernels import gemv as kernel

    from minaf3 import linear as linear_module

    model = load(one_layer, dtype=dtype)
    ids = torch.randint(0, 400, (1, 9), generator=torch.Generator().manual_seed(2))
    args = dict(max_new_tokens=8, return_dict_in_generate=True, output_logits=True, **GREEDY)
    calls = []
    monkeypatch.setattr(kernel, "gemv_linear", lambda *a: calls.append(1) or gemv_linear(*a))
    streamed = model.generate(ids, **args)
    assert calls  # the decode steps' layers (one row each) went through the kernel
    monkeypatch.setattr(linear_module, "STREAM_MAX_ROWS", 0)
    plain = model.generate(ids, **args)
    assert torch.equal(streamed.sequences, plain.sequences)
    # the kernel accumulates in float32 in its own order; bf16 outputs are then rounded to bf16
    assert max((a - b).abs().max() for a, b in zip(streamed.logits, plain.logits, strict=True)) < tolerance


# ---- attention --------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    groups=st.integers(1, 4),
    queries=st.integers(1, 5),
    extra_keys=st.integers(0, 6),
    head_dim=st.sampled_from([4, 16, 32]),
    seed=st.integers(0, 2**16),
)
def test_grouped_eager_attention_matches_sdpa(batch, kv_heads, groups, queries, extra_keys, head_dim, seed):
    """Causal by slot with random padding, including rows that see no key at all (zeros on both paths)."""
    g = torch.Generator().manual_seed(seed)
    S = queries + extra_keys
    q = torch.randn(batch, kv_heads * groups, queries, head_dim, generator=g)
    k, v = (torch.randn(batch, kv_heads, S, head_dim, generator=g) for _ in range(2))
    key_mask = torch.rand(batch, S, generator=g) > 0.3
    query_pos = torch.arange(extra_keys, S)
    for pos in (None, query_pos):
        eager = attention(q, k, v, key_mask=key_mask, query_pos=pos, backend="eager")
        sdpa = attention(q, k, v, key_mask=key_mask, query_pos=pos, backend="sdpa")
        assert (eager - sdpa).abs().max() < 1e-5
