"""int4 weight-only quantization (minaf3/quantize.py): quantize_weight_int4, Int4Linear, an int4 model.

quantize_model / from_pretrained(quantize="int4") on the tiny checkpoint transformers wrote, on the reference
processor's inputs: logits within MAX_LOGIT_ERROR of fp32, every decoder linear and lm_head an Int4Linear that
is the checkpoint's separate layers quantized and stacked, its state_dict under the checkpoint's names, bf16
checkpoints quantized as stored. The entry points: minaf3.load, the CLI's chat, transcribe and estimate, the
compiled decode step with and without the C++ library. The kernels' own tests: test_int4_linear.py.
"""

import pytest
import torch
from conftest import rel_l2, write_reference_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from minaf3.kernels import int4_linear as kernel
from minaf3.kernels.int4_linear import (
    ZERO_POINT,
    int4_dequantize_reference,
    int4_linear_reference,
    unpack_int4,
    unpack_scales,
)
from minaf3.kernels.registry import override
from test_model import reference_inputs

import minaf3
from minaf3 import AudioFlamingo3ForConditionalGeneration, CheckpointError, ConfigError
from minaf3 import quantize as quantize_module
from minaf3.cli import main
from minaf3.estimate import estimate_memory
from minaf3.linear import fused_groups
from minaf3.quantize import (
    Int4Linear,
    quantizable_linears,
    quantize_model,
    quantize_weight_int4,
    quantized_bytes,
)

# Relative L2 of int4 logits against fp32 on these inputs. int4 rounds each weight to one of 16 levels of
# its group (8.6% relative L2 on Gaussian rows, tools/bench_int4.py --weight-error); through this random
# model's two layers that gives ~20%, as int8's 0.7% gives 1.7% (test_quantize.py, bound 2%).
MAX_LOGIT_ERROR = 0.25
MAX_LAYER_ERROR = 0.1  # one Int4Linear's output against nn.Linear's on Gaussian weights
GREEDY = dict(do_sample=False, repetition_penalty=1.0, eos_token_id=[])


# ---- quantize_weight_int4 and Int4Linear ----------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    out_features=st.integers(1, 40),
    in_features=st.integers(1, 300),
    spread=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_quantize_weight_int4_rounds_each_group_to_its_own_scale(out_features, in_features, spread, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * spread
    w[0, :32] = 0.0  # an all-zero group
    before = w.clone()
    packed, tiled = quantize_weight_int4(w)
    assert torch.equal(w, before)  # the input is not modified
    scales = unpack_scales(tiled)  # row order
    Kp = kernel.padded_width(in_features)
    assert packed.shape == (out_features, Kp // 2) and packed.dtype == torch.uint8
    assert scales.shape == (out_features, Kp // 32) and scales.dtype == torch.bfloat16
    q = unpack_int4(packed).view(out_features, Kp // 32, 32).long()
    assert (q.flatten(1)[:, in_features:] == ZERO_POINT).all()  # padding: zero weights
    assert scales[0, 0] == 0 and (q[0, 0] == ZERO_POINT).all()
    groups = torch.nn.functional.pad(w, (0, Kp - in_features)).view(out_features, Kp // 32, 32)
    extreme = groups.abs().argmax(-1, keepdim=True)
    nonzero = groups.abs().amax(-1) > 0
    assert (q.gather(-1, extreme).squeeze(-1)[nonzero] == 0).all()  # the extreme is -8 steps
    # round to nearest: within half a step of the grid, except where +7 clips: there up to 8 (1 + 2^-8) - 7
    # steps, since the bf16 scale may fall short of |extreme| / 8 by its rounding
    step = scales.float().abs()[:, :, None]
    error = (int4_dequantize_reference(packed, tiled).view_as(groups) - groups).abs()
    slack = 1.001 * torch.where(q == 15, 1 + 8 / 256, 0.5)
    assert (error <= step * slack + 1e-30).all()


def test_quantize_weight_int4_refuses_nan_and_inf():
    w = torch.randn(6, 40)
    w[4, 2] = float("nan")
    with pytest.raises(CheckpointError, match=r"lm_head: weight holds NaN or Inf \(rows \[4\]"):
        quantize_weight_int4(w, "lm_head")
    w[4, 2] = float("inf")
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        quantize_weight_int4(w, "lm_head")


def test_chunks_give_the_weight_quantized_whole(monkeypatch):
    """Converted a few rows at a time (QUANT_CHUNK_BYTES of float32), the result is the whole weight's."""
    w = torch.randn(37, 300).bfloat16()
    whole = quantize_weight_int4(w)
    monkeypatch.setattr(quantize_module, "QUANT_CHUNK_BYTES", 3 * 4 * 384)  # one tile (16 rows) at a time
    chunked = quantize_weight_int4(w)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked, strict=True))


@pytest.mark.parametrize("bias", [True, False])
def test_int4_linear_module_replaces_nn_linear(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(200, 40, bias=bias)
    layer = Int4Linear.from_linear(linear)
    assert layer.bias is linear.bias and layer.in_features == 200 and layer.out_features == 40
    assert set(layer.state_dict()) == ({"weight", "scales", "bias"} if bias else {"weight", "scales"})
    x = torch.randn(3, 7, 200)
    with torch.no_grad():
        assert rel_l2(layer(x), linear(x)) < MAX_LAYER_ERROR
        expected = int4_linear_reference(x, layer.weight, layer.scales, layer.bias)
        assert rel_l2(layer(x), expected) < 1e-2  # the kernel's rounding (bf16 activations at most)
    layer.float()
    assert layer.scales.dtype == torch.bfloat16 and layer.weight.dtype == torch.uint8  # the format stays


# ---- the quantized model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp32_model(tiny_checkpoint):
    return AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def int4_model(tiny_checkpoint):
    return AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint, quantize="int4")


@pytest.fixture(scope="module")
def audio_inputs(reference_processor):
    inputs = reference_inputs(reference_processor, ["short", "mid"])
    inputs.pop("labels")
    return inputs


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_logits_within_the_stated_error_of_fp32(fp32_model, int4_model, audio_inputs, monkeypatch, backend):
    monkeypatch.setenv(kernel.BACKEND_ENV, backend)
    with torch.no_grad():
        expected = fp32_model(**audio_inputs).logits
        logits = int4_model(**audio_inputs).logits
    valid = audio_inputs["attention_mask"].bool()
    assert rel_l2(logits[valid], expected[valid]) < MAX_LOGIT_ERROR


def test_every_decoder_linear_and_lm_head_is_the_checkpoint_s_layers_quantized(fp32_model, int4_model):
    groups = fused_groups(fp32_model)
    replaced = {name for name, m in int4_model.named_modules() if isinstance(m, Int4Linear)}
    assert replaced == set(quantizable_linears(fp32_model))
    checkpoint = fp32_model.state_dict()  # the checkpoint's names
    for name in replaced:
        layer, parts = int4_model.get_submodule(name), list(groups.get(name, [name]))
        weights, scales = zip(*(quantize_weight_int4(checkpoint[f"{p}.weight"]) for p in parts), strict=True)
        assert torch.equal(layer.weight, torch.cat(weights)) and torch.equal(layer.scales, torch.cat(scales))
        biases = [checkpoint.get(f"{p}.bias") for p in parts]
        assert layer.bias is None or torch.equal(layer.bias, torch.cat(biases))
    audio_side = [*int4_model.audio_tower.modules(), *int4_model.multi_modal_projector.modules()]
    assert not any(isinstance(m, Int4Linear) for m in audio_side)


def test_int4_state_dict_round_trips_under_the_checkpoint_names(int4_model):
    state = int4_model.state_dict()
    for leaf in ("weight", "scales"):
        assert state[f"language_model.layers.0.self_attn.k_proj.{leaf}"].shape[0] == 2 * 16  # 2 KV heads
        assert f"language_model.layers.1.mlp.up_proj.{leaf}" in state
    assert not any("qkv_proj" in name or "gate_up_proj" in name for name in state)
    with torch.device("meta"):
        empty = AudioFlamingo3ForConditionalGeneration(int4_model.config)
    quantize_model(empty, "int4")
    empty.load_state_dict(state, strict=True, assign=True)
    for name, tensor in int4_model.state_dict().items():
        assert torch.equal(empty.state_dict()[name], tensor), name


def test_quantized_weights_take_their_stated_bytes(int4_model):
    """Half a byte per weight of the padded width and a bf16 scale per 32 columns (quantized_bytes, which
    `minaf3 estimate` counts): width 64 pads to 128, 128 does not."""
    layers = [(n, m) for n, m in int4_model.named_modules() if isinstance(m, Int4Linear)]
    for name, m in layers:
        Kp = 128 * -(-m.in_features // 128)
        assert m.weight.nbytes + m.scales.nbytes == m.out_features * (Kp // 2 + Kp // 16), name
        assert m.weight.nbytes + m.scales.nbytes == quantized_bytes(m.out_features, m.in_features, "int4")


def test_greedy_generation_matches_uncached_forward(int4_model, audio_inputs):
    """Decode (the streaming loop) and the prompt's product agree with a plain forward, step by step."""
    steps = 4
    # one product for prompt and steps: no near-ties
    with torch.no_grad(), override(vnni_prefill=False, bf16_prefill=False):
        out = int4_model.generate(**audio_inputs, max_new_tokens=steps, min_new_tokens=steps, **GREEDY)
        T = audio_inputs["input_ids"].shape[1]
        mask = torch.cat([audio_inputs["attention_mask"], torch.ones(2, steps, dtype=torch.long)], 1)
        logits = int4_model(
            input_ids=out[:, :-1],
            attention_mask=mask[:, :-1],
            input_features=audio_inputs["input_features"],
            input_features_mask=audio_inputs["input_features_mask"],
            position_ids=((mask.cumsum(-1) - 1).clamp(min=0))[:, :-1],
        ).logits
    assert torch.equal(out[:, T:], logits[:, T - 1 :].argmax(-1))


def test_quantize_model_refuses_a_model_quantized_otherwise(tiny_checkpoint, int4_model):
    assert quantize_model(int4_model, "int4") is int4_model  # already int4: nothing to do
    with pytest.raises(ConfigError, match=r"already quantized \(Int4Linear\); quantize='int8' needs"):
        quantize_model(int4_model, "int8")
    with pytest.raises(ConfigError, match="before quantizing"):
        int4_model.load_adapter(tiny_checkpoint / "think")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int4_load_from_bf16_quantizes_the_stored_tensors(bf16_checkpoint, monkeypatch, dtype):
    """from_pretrained(quantize="int4") reads a bf16 checkpoint's decoder as stored and quantizes each weight
    from those bf16 views, a chunk at a time: no float32 decoder is ever made, even loading in float32. The
    result is the model quantized after loading in that dtype, tensor for tensor."""
    seen = []
    quantize = quantize_module.quantize_weight_int4

    def spy(weight, name):
        seen.append((weight.dtype, weight.is_contiguous()))
        return quantize(weight, name)

    monkeypatch.setattr(quantize_module, "quantize_weight_int4", spy)
    loaded = AudioFlamingo3ForConditionalGeneration.from_pretrained(
        bf16_checkpoint, dtype=dtype, quantize="int4"
    )
    assert seen and set(seen) == {(torch.bfloat16, True)}
    monkeypatch.setattr(quantize_module, "quantize_weight_int4", quantize)
    expected = quantize_model(
        AudioFlamingo3ForConditionalGeneration.from_pretrained(bf16_checkpoint, dtype=dtype), "int4"
    )
    got, want = loaded.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert {p.dtype for p in loaded.parameters()} == {getattr(torch, dtype)}


# ---- entry points ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def int4_pipeline(demo_checkpoint):
    return minaf3.load(demo_checkpoint, quantize="int4")


def test_load_chat_and_cli_chat_and_transcribe(int4_pipeline, demo_checkpoint, capsys):
    from minaf3.demo import CLIP_NAME

    clip = demo_checkpoint / CLIP_NAME
    assert isinstance(int4_pipeline.model.lm_head, Int4Linear)
    answer = int4_pipeline.chat("What is it?", audio=clip, do_sample=False, max_new_tokens=6)
    assert isinstance(answer, str) and answer
    argv = ["--model", str(demo_checkpoint), "--quantize", "int4", "--greedy", "--max-new-tokens", "6"]
    assert main(["chat", *argv, "--audio", str(clip), "What is it?"]) == 0
    assert capsys.readouterr().out == answer + "\n"
    assert main(["transcribe", *argv, str(clip)]) == 0
    assert capsys.readouterr().out == int4_pipeline.transcribe(clip, max_new_tokens=6).text + "\n"


def test_estimate_counts_int4_bytes(demo_checkpoint, capsys):
    fp32 = estimate_memory(demo_checkpoint, seconds=30)
    int4 = estimate_memory(demo_checkpoint, seconds=30, quantize="int4")
    model = minaf3.load(demo_checkpoint, quantize="int4").model
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    stored = sum(m.weight.nbytes + m.scales.nbytes for m in layers)
    assert fp32.weights - int4.weights == sum(4 * m.in_features * m.out_features for m in layers) - stored
    assert main(["estimate", "--model", str(demo_checkpoint), "--quantize", "int4"]) == 0
    assert "float32 + int4 decoder" in capsys.readouterr().out


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    return write_reference_checkpoint(
        tmp_path_factory.mktemp("one_layer"), seed=3, audio_layers=1, text_layers=1
    )


@pytest.mark.parametrize("library", [True, False])
def test_compiled_int4_decoding_gives_the_eager_tokens(one_layer, library):
    """The compiled step calls the C++ loop as a graph node, or without the library the unpack-multiply-sum
    that inductor fuses (int4_product_sum); either way the tokens and logits are eager's."""
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(one_layer, quantize="int4")
    ids = torch.randint(0, 400, (1, 9), generator=torch.Generator().manual_seed(1))
    args = dict(max_new_tokens=8, return_dict_in_generate=True, output_logits=True, **GREEDY)
    from torch.profiler import profile

    with override(int4=library):
        torch._dynamo.reset()  # the registry's answer is read when the step is traced
        eager = model.generate(ids, compile=False, **args)
        model.generate(ids, compile=True, **args)  # traces and compiles
        with profile() as trace:
            compiled = model.generate(ids, compile=True, **args)
    calls = sum(event.count for event in trace.key_averages() if event.key == "minaf3_int4::int4_linear")
    assert calls == (8 * 5 if library else 0)  # the 9-row prompt (the loop too), then 7 steps; 5 layers each
    assert torch.equal(compiled.sequences, eager.sequences)
    scale = max(logits.abs().max() for logits in eager.logits)
    assert max((a - b).abs().max() for a, b in zip(compiled.logits, eager.logits, strict=True)) < 1e-4 * scale


def test_every_cli_quantize_option_offers_every_mode():
    """cli.py spells the modes out (importing minaf3.quantize would bring torch into `minaf3 --help`)."""
    import argparse

    from minaf3.cli import build_parser
    from minaf3.quantize import QUANTIZE_MODES

    def options(parser, command=None):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from options(sub, name)
            elif "--quantize" in action.option_strings:
                yield command, action

    found = dict(options(build_parser()))
    assert len(found) >= 4  # chat, transcribe, estimate, batch, ...
    # finetune trains through the weights: int8 has a backward pass (quantize.Int8Product), int4 none
    assert list(found.pop("finetune").choices) == ["int8"]
    assert all(list(action.choices) == list(QUANTIZE_MODES) for action in found.values())


def test_fused_parts_that_are_not_whole_tiles_are_refused_before_any_weight_is_quantized(
    tmp_path, monkeypatch
):
    """int4 stores rows in tiles of 16; a fused layer's parts are joined and split as rows, so a part that is
    not a whole number of tiles (here k_proj: 2 heads of 12) is refused by name, by either entry point."""
    folder = write_reference_checkpoint(tmp_path / "narrow", text_hidden=48)
    calls = []
    monkeypatch.setattr(minaf3.model, "quantize_state_dict", lambda *a: calls.append(a))
    with pytest.raises(ConfigError, match=r"qkv_proj: int4 stores rows in tiles of 16.*k_proj has 24"):
        AudioFlamingo3ForConditionalGeneration.from_pretrained(folder, quantize="int4")
    assert calls == []
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(folder)
    with pytest.raises(ConfigError, match=r"k_proj has 24"):
        quantize_model(model, "int4")
    quantize_model(model, "int8")  # one scale per row: any part joins
