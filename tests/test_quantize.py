"""int8 weight-only quantization (minaf3/quantize.py): quantize_weight, Int8Linear, a quantized model.

quantize_model on the tiny checkpoint transformers wrote, on the reference processor's inputs: logits within
2% relative L2 of fp32, every decoder linear and lm_head replaced, the fp32 weights released one layer at a
time, int8 bytes a quarter of fp32's, generation consistent. The kernel's own tests: test_int8_linear.py.
"""

import weakref

import pytest
import torch
from conftest import rel_l2
from hypothesis import given, settings
from hypothesis import strategies as st
from minaf3.kernels import int8_linear as kernel
from minaf3.kernels.int8_linear import int8_linear_reference
from test_model import reference_inputs

from minaf3 import AudioFlamingo3ForConditionalGeneration, CheckpointError, ConfigError
from minaf3 import quantize as quantize_module
from minaf3.linear import fused_groups
from minaf3.lora import LoRALinear, LoRAUpdate
from minaf3.quantize import Int8Linear, quantizable_linears, quantize_model, quantize_weight

MAX_LOGIT_ERROR = 0.02  # relative L2 of int8 logits against fp32 on these inputs
BACKENDS = ["cpp", "torch"]


# ---- quantize_weight and Int8Linear -----------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    out_features=st.integers(1, 40),
    in_features=st.integers(1, 80),
    spread=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_quantize_weight_rounds_each_row_to_its_own_scale(out_features, in_features, spread, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * spread
    w[0] = 0.0  # an all-zero row
    before = w.clone()
    q, scales = quantize_weight(w)
    assert torch.equal(w, before)  # the input is not modified
    assert q.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (out_features,)
    assert q.abs().max() <= 127
    assert torch.equal(q[0], torch.zeros_like(q[0])) and scales[0] == 1.0
    nonzero = w.abs().amax(1) > 0
    assert (q[nonzero].abs().amax(1) == 127).all()  # each row spans the full range
    # round to nearest: every element within half a step of its row's grid (plus float32 rounding)
    step = scales[:, None]
    assert ((q.float() * step - w).abs() <= step * (0.5 + 1e-5)).all()


def test_quantize_weight_refuses_nan_and_inf():
    w = torch.randn(6, 8)
    w[4, 2] = float("nan")
    with pytest.raises(CheckpointError, match=r"lm_head: weight holds NaN or Inf \(rows \[4\]"):
        quantize_weight(w, "lm_head")
    w[4, 2] = float("inf")
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        quantize_weight(w, "lm_head")


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_module_replaces_nn_linear(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=bias)
    layer = Int8Linear.from_linear(linear)
    assert layer.weight.shape == (40, 96) and layer.weight.dtype == torch.int8
    assert layer.scales.shape == (40,) and (layer.bias is linear.bias)
    assert set(layer.state_dict()) == ({"weight", "scales", "bias"} if bias else {"weight", "scales"})
    x = torch.randn(3, 7, 96)
    with torch.no_grad():
        assert rel_l2(layer(x), linear(x)) < 0.01  # int8 rounding: ~0.5% of each row's spread
        expected = int8_linear_reference(x, layer.weight, layer.scales, layer.bias)
        assert torch.allclose(layer(x), expected, atol=1e-5)


# ---- the quantized model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp32_model(tiny_checkpoint):
    return AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def int8_model(tiny_checkpoint):
    return quantize_model(AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint))


@pytest.fixture(scope="module")
def audio_inputs(reference_processor):
    inputs = reference_inputs(reference_processor, ["short", "mid"])
    inputs.pop("labels")
    return inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_within_two_percent_of_fp32(fp32_model, int8_model, audio_inputs, monkeypatch, backend):
    monkeypatch.setenv(kernel.BACKEND_ENV, backend)
    with torch.no_grad():
        expected = fp32_model(**audio_inputs).logits
        logits = int8_model(**audio_inputs).logits
    valid = audio_inputs["attention_mask"].bool()
    assert rel_l2(logits[valid], expected[valid]) < MAX_LOGIT_ERROR


def test_every_decoder_linear_and_lm_head_is_replaced(tiny_checkpoint, fp32_model, int8_model):
    """Each int8 layer is exactly the checkpoint's separate layers quantized and stacked (one scale per
    output row; q/k/v and gate/up are fused layers); biases are the checkpoint's."""
    layers = fp32_model.config.decoder.num_layers
    assert len(quantizable_linears(fp32_model)) == 4 * layers + 1  # qkv, o, gate_up, down; lm_head
    groups = fused_groups(fp32_model)
    replaced = {name for name, m in int8_model.named_modules() if isinstance(m, Int8Linear)}
    assert replaced == set(quantizable_linears(fp32_model))
    checkpoint = fp32_model.state_dict()  # the checkpoint's names
    for name in replaced:
        layer, parts = int8_model.get_submodule(name), list(groups.get(name, [name]))
        weights, scales = zip(*(quantize_weight(checkpoint[f"{p}.weight"]) for p in parts), strict=True)
        assert torch.equal(layer.weight, torch.cat(weights)) and torch.equal(layer.scales, torch.cat(scales))
        biases = [checkpoint.get(f"{p}.bias") for p in parts]
        assert (layer.bias is None) == (biases[0] is None)
        assert layer.bias is None or torch.equal(layer.bias, torch.cat(biases))
    # the audio side stays in full precision
    audio_side = [*int8_model.audio_tower.modules(), *int8_model.multi_modal_projector.modules()]
    assert not any(isinstance(m, Int8Linear) for m in audio_side)
    assert all(p.dtype == torch.float32 for m in audio_side for p in m.parameters())


def test_int8_state_dict_speaks_the_checkpoint_names(tiny_checkpoint, int8_model):
    """The fused int8 layers save as the checkpoint's layers (q_proj.weight, q_proj.scales, ...) and load
    back from that form exactly."""
    state = int8_model.state_dict()
    assert "language_model.layers.0.self_attn.k_proj.scales" in state
    assert not any("qkv_proj" in name or "gate_up_proj" in name for name in state)
    with torch.device("meta"):
        empty = AudioFlamingo3ForConditionalGeneration(int8_model.config)
    quantize_model(empty)
    empty.load_state_dict(state, strict=True, assign=True)
    attn, loaded = int8_model.language_model.layers[0].self_attn, empty.language_model.layers[0].self_attn
    assert torch.equal(loaded.qkv_proj.weight, attn.qkv_proj.weight)
    assert torch.equal(loaded.qkv_proj.scales, attn.qkv_proj.scales)
    assert torch.equal(loaded.qkv_proj.bias, attn.qkv_proj.bias)


def test_quantized_weights_take_a_quarter_of_fp32(fp32_model, int8_model):
    fp32_bytes = sum(fp32_model.get_submodule(n).weight.nbytes for n in quantizable_linears(fp32_model))
    int8_layers = [m for m in int8_model.modules() if isinstance(m, Int8Linear)]
    assert 4 * sum(m.weight.nbytes for m in int8_layers) == fp32_bytes
    rows = sum(m.out_features for m in int8_layers)
    assert sum(m.scales.nbytes for m in int8_layers) == 4 * rows  # one float32 per output row, nothing else


def test_fp32_weights_are_released_one_layer_at_a_time(tiny_checkpoint, monkeypatch):
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    names = quantizable_linears(model)
    refs = [weakref.ref(model.get_submodule(n).weight) for n in names]
    alive_at_each_layer = []
    quantize = quantize_module.quantize_weight

    def spy(weight, name):
        alive_at_each_layer.append(sum(r() is not None for r in refs))
        return quantize(weight, name)

    monkeypatch.setattr(quantize_module, "quantize_weight", spy)
    quantize_model(model)
    # When layer i is converted, layers 0..i-1 are already freed (nothing else refers to them, so their
    # memory returns at once): there is never a second full-precision copy of the decoder.
    assert alive_at_each_layer == [len(names) - i for i in range(len(names))]
    assert all(r() is None for r in refs)


def test_greedy_generation_matches_uncached_forward(int8_model, audio_inputs):
    """Decode (1 row per step: the GEMV kernel) and prefill (many rows) agree with a plain forward."""
    steps = 4
    with torch.no_grad():
        out = int8_model.generate(**audio_inputs, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)
        T = audio_inputs["input_ids"].shape[1]
        assert out.shape == (2, T + steps)
        mask = torch.cat([audio_inputs["attention_mask"], torch.ones(2, steps, dtype=torch.long)], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row's own positions
        logits = int8_model(
            input_ids=out[:, :-1],
            attention_mask=mask[:, :-1],
            input_features=audio_inputs["input_features"],
            input_features_mask=audio_inputs["input_features_mask"],
            position_ids=positions[:, :-1],
        ).logits
    assert torch.equal(out[:, T:], logits[:, T - 1 :].argmax(-1))


def test_bfloat16_model_quantizes_and_runs(tiny_checkpoint, fp32_model, audio_inputs):
    model = quantize_model(
        AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype="bfloat16")
    )
    assert (
        model.lm_head.bias is None
        and model.language_model.layers[0].self_attn.qkv_proj.bias.dtype == torch.bfloat16
    )
    with torch.no_grad():
        logits = model(**audio_inputs).logits
        expected = fp32_model(**audio_inputs).logits
    valid = audio_inputs["attention_mask"].bool()
    assert logits.dtype == torch.bfloat16
    assert rel_l2(logits[valid], expected[valid]) < 2 * MAX_LOGIT_ERROR  # bf16 activations add their own


def test_quantize_model_errors_and_idempotence(tiny_checkpoint, int8_model):
    with pytest.raises(ConfigError, match=r"quantize='int3': expected None or one of \['int8', 'int4'\]"):
        quantize_model(int8_model, "int3")
    assert quantize_model(int8_model) is int8_model  # already quantized: nothing to do, no error
    with pytest.raises(ConfigError, match="Sequential: no linear layers under language_model"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    attn = model.language_model.layers[1].self_attn
    update = LoRAUpdate(
        "q_proj", slice(0, 64), torch.randn(2, 64), torch.randn(64, 2), 0.5, attn.qkv_proj.weight
    )
    attn.qkv_proj = LoRALinear(attn.qkv_proj, [update])
    with pytest.raises(ConfigError, match=r"language_model\.layers\.1\.self_attn\.qkv_proj .*unmerged LoRA"):
        quantize_model(model)
    attn.qkv_proj.merge()
    quantize_model(model)
    assert isinstance(attn.qkv_proj, Int8Linear)  # the merged layer, quantized


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_load_from_bf16_equals_widening_first(bf16_checkpoint, dtype):
    """from_pretrained(quantize="int8") in float32 reads the bf16 tensors as stored and widens what stays
    floating point after quantizing: the same model, tensor for tensor, as loading in float32 first."""
    loaded = AudioFlamingo3ForConditionalGeneration.from_pretrained(
        bf16_checkpoint, dtype=dtype, quantize="int8"
    )
    expected = quantize_model(
        AudioFlamingo3ForConditionalGeneration.from_pretrained(bf16_checkpoint, dtype=dtype)
    )
    got, want = loaded.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert loaded.dtype == getattr(torch, dtype)
    assert {p.dtype for p in loaded.parameters()} == {getattr(torch, dtype)}
    assert {b.dtype for b in loaded.buffers() if b.is_floating_point()} >= {torch.float32}  # int8 scales
