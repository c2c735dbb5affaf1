"""The model against transformers' AudioFlamingo3 on checkpoints it writes: logits, loss, gradients."""

import json

import pytest
import torch
from conftest import SR, speech_like, write_reference_checkpoint

from minaf3 import AudioFlamingo3ForConditionalGeneration, CheckpointError, ConfigError, InputError
from minaf3.attention import use_backend

# One short clip, three windows whose last holds 100 samples, and a window plus 200 samples (a tail whose
# 2 mel frames give no audio token at all).
CLIPS = {"short": 40_000, "three_windows": 2 * 480_000 + 100, "tail_200": 480_000 + 200, "mid": 250_000}


def conversation(question: str, num_samples: int, seed: int) -> list[dict]:
    audio = speech_like(num_samples, SR, seed)
    return [
        {"role": "user", "content": [{"type": "text", "text": question}, {"type": "audio", "audio": audio}]}
    ]


def reference_inputs(processor, clips: list[str]) -> dict:
    questions = ["What is in this audio?", "Transcribe the input speech.", "Describe the sound in detail."]
    convs = [conversation(questions[i % 3], CLIPS[c], seed=i) for i, c in enumerate(clips)]
    return dict(
        processor.apply_chat_template(
            convs, tokenize=True, add_generation_prompt=True, return_dict=True, output_labels=True
        )
    )


def assert_parity(ours, ref, inputs):
    with torch.no_grad():
        out, expected = ours(**inputs, return_logits=True), ref(**inputs)
    valid = inputs["attention_mask"].bool()
    assert (out.logits - expected.logits)[valid].abs().max() < 1e-4
    assert (out.logits - expected.logits).abs().max() < 1e-4  # padding rows too: they feed the loss
    assert abs(out.loss.item() - expected.loss.item()) < 1e-5


@pytest.mark.parametrize("clips", [["short"], ["short", "three_windows"], ["tail_200", "mid", "short"]])
def test_logits_and_loss_match_reference(tiny_checkpoint, reference_model, reference_processor, clips):
    ours = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    assert_parity(ours, reference_model, reference_inputs(reference_processor, clips))


@pytest.mark.parametrize(
    "seed,sizes",
    [(1, {}), (2, {"audio_layers": 1, "text_layers": 3, "audio_hidden": 48, "text_hidden": 96})],
)
def test_parity_other_seeds_shapes_and_shards(tmp_path, reference_processor, seed, sizes):
    from transformers import AudioFlamingo3ForConditionalGeneration as Reference

    path = write_reference_checkpoint(tmp_path, seed=seed, max_shard_size="200KB", **sizes)
    assert (path / "model.safetensors.index.json").is_file()
    ref = Reference.from_pretrained(path, dtype=torch.float32).eval()
    ours = AudioFlamingo3ForConditionalGeneration.from_pretrained(path)
    assert_parity(ours, ref, reference_inputs(reference_processor, ["mid", "short"]))


def test_attention_backends_agree(tiny_checkpoint, reference_processor):
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    inputs = reference_inputs(reference_processor, ["short", "mid"])
    with torch.no_grad():
        with use_backend("eager"):
            eager = model(**inputs, return_logits=True).logits
        with use_backend("sdpa"):
            sdpa = model(**inputs, return_logits=True).logits
    assert (eager - sdpa).abs().max() < 1e-4


def test_encoding_only_real_frames_equals_padded_encoding(tiny_checkpoint, reference_processor):
    """Cropping each window's padding must not change a single audio embedding."""
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    inputs = reference_inputs(reference_processor, ["three_windows", "tail_200", "short"])
    feats, mask = inputs["input_features"], inputs["input_features_mask"]
    with torch.no_grad():
        cropped = model.get_audio_features(feats, mask)
        model.crop_audio_padding = False
        padded = model.get_audio_features(feats, mask)
    assert cropped.shape == padded.shape
    assert (cropped - padded).abs().max() < 1e-5


def test_gradients_reach_every_parameter(tiny_checkpoint, reference_processor):
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint).train()
    inputs = reference_inputs(reference_processor, ["short"])
    loss = model(**inputs).loss
    loss.backward()
    without = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without == []


def test_placeholder_count_mismatch_names_counts(tiny_checkpoint, reference_processor):
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    inputs = reference_inputs(reference_processor, ["short", "mid"])
    ids = inputs["input_ids"].clone()
    audio_id = model.config.audio_token_id
    first = (ids[1] == audio_id).nonzero()[0, 0]
    ids[1, first] = 5  # one placeholder fewer in sample 1
    with pytest.raises(InputError, match=r"placeholders per sample \[\d+, \d+\]"):
        model(**{**inputs, "input_ids": ids})
    with pytest.raises(InputError, match="no input_features"):
        model(input_ids=inputs["input_ids"])


def test_from_pretrained_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="huggingface-cli download nvidia/audio-flamingo-3-hf"):
        AudioFlamingo3ForConditionalGeneration.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="device_map"):
        AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint, device_map="tpu:7")
    with pytest.raises(ConfigError, match="dtype"):
        AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype="int3")


def test_bfloat16_load_keeps_every_tensor_in_that_dtype(tiny_checkpoint):
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[1, 5, 6, 7]])
    assert model(input_ids=ids).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])  # transformers 5.x and 4.x spellings
@pytest.mark.parametrize("saved", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("native_bf16", [True, False])
def test_default_cpu_dtype_follows_the_cpu(tmp_path, monkeypatch, key, saved, native_bf16):
    """A bf16 checkpoint stays bf16 on a CPU with bf16 instructions; everything else computes in fp32."""
    from minaf3 import dtypes

    (tmp_path / "config.json").write_text(json.dumps({key: saved}))
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: native_bf16)
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if saved == "bfloat16" and native_bf16 else torch.float32
    assert dtypes.resolve_dtype(None, cpu, tmp_path) == expected
    assert dtypes.resolve_dtype("auto", cpu, tmp_path) == getattr(torch, saved)
    assert dtypes.resolve_dtype("float32", cpu, tmp_path) == torch.float32


def test_cpu_bf16_capability_is_read_from_the_flags(tmp_path):
    from minaf3.dtypes import cpu_has_native_bf16

    for flags, expected in [("fpu avx2 avx512f avx512_bf16", True), ("fpu avx2 fma", False)]:
        cpuinfo = tmp_path / f"cpuinfo_{expected}"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert cpu_has_native_bf16(cpuinfo) is expected
    assert cpu_has_native_bf16(tmp_path / "missing") is False


def test_triton_backend_matches_sdpa(tmp_path, reference_processor):
    """The Triton kernels (under TRITON_INTERPRET=1 on the CPU) give the same model output as sdpa."""
    # Head dims of 16 in both towers: the kernels take power-of-two head dims from 16 up.
    path = write_reference_checkpoint(tmp_path, seed=3, audio_hidden=64)
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(path)
    inputs = reference_inputs(reference_processor, ["short", "short"])
    with torch.no_grad():
        with use_backend("triton"):
            triton_logits = model(**inputs, return_logits=True).logits
        with use_backend("sdpa"):
            sdpa_logits = model(**inputs, return_logits=True).logits
    assert (triton_logits - sdpa_logits).abs().max() < 1e-4


@pytest.mark.parametrize("native_bf16", [False, True])
def test_bf16_convolutions_run_in_float32_on_cpus_without_bf16_instructions(monkeypatch, native_bf16):
    """Without bf16 instructions torch's bf16 convolution is a slow loop: the encoder's conv1d computes
    in float32 and rounds to bf16; with them, the layer runs as it is."""
    from minaf3 import encoder

    monkeypatch.setattr(encoder, "cpu_has_native_bf16", lambda: native_bf16)
    layer = encoder.Conv1d(8, 16, kernel_size=3, stride=2, padding=1).bfloat16()
    x = torch.randn(2, 8, 30, generator=torch.Generator().manual_seed(0)).bfloat16()
    in_float32 = torch.nn.functional.conv1d(x.float(), layer.weight.float(), layer.bias.float(), 2, 1)
    expected = torch.nn.Conv1d.forward(layer, x) if native_bf16 else in_float32.bfloat16()
    seen, conv = [], torch.nn.functional.conv1d
    monkeypatch.setattr(torch.nn.functional, "conv1d", lambda x, *a: seen.append(x.dtype) or conv(x, *a))
    got = layer(x)
    assert seen == [torch.bfloat16 if native_bf16 else torch.float32]  # the dtype the product ran in
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


# ---- training: initialisation, the loss over labelled positions, saving ---------------------------------


def test_init_weights_is_the_architectures_and_depends_on_the_seed_only(tiny_checkpoint):
    from transformers.models.whisper.modeling_whisper import sinusoids

    from minaf3.config import AudioFlamingo3Config

    config = AudioFlamingo3Config.from_file(tiny_checkpoint)
    a, b, c = (AudioFlamingo3ForConditionalGeneration(config).init_weights(seed) for seed in (0, 0, 1))
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    torch.testing.assert_close(a.audio_tower.embed_positions.weight, sinusoids(1500, 32), atol=1e-6, rtol=0)
    for name, tensor in a.state_dict().items():
        if "embed_positions" in name:
            continue
        if "norm" in name:
            assert (tensor == (1.0 if name.endswith("weight") else 0.0)).all(), name
        elif name.endswith("bias"):
            assert (tensor == 0).all(), name
        else:  # linear, convolution and embedding weights: normal, std 0.02
            assert abs(tensor.std().item() - 0.02) < 0.1 * 0.02 + 2 / tensor.numel() ** 0.5, name
            assert abs(tensor.mean().item()) < 0.02 * 4 / tensor.numel() ** 0.5, name


def test_from_pretrained_never_initialises(tiny_checkpoint, monkeypatch):
    """Loading builds on the meta device and assigns the checkpoint's tensors: no init runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained initialised weights")

    monkeypatch.setattr(AudioFlamingo3ForConditionalGeneration, "init_weights", refuse)
    monkeypatch.setattr(torch.nn.init, "normal_", refuse)
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.parametrize("chunk_elements", [1 << 26, 1000])  # one chunk, and chunks of 2 rows of 400 logits
def test_loss_over_labelled_positions_equals_the_definition(
    tiny_checkpoint, reference_processor, chunk_elements
):
    """lm_loss (labelled positions only, in chunks) against causal_lm_loss on every position's logits: the
    same loss and the same gradients, within float32 rounding."""
    from minaf3.loss import causal_lm_loss, lm_loss

    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint).train()
    inputs = reference_inputs(reference_processor, ["short", "mid"])
    labels = inputs["labels"].clone()
    labels[:, : labels.shape[1] // 2] = -100  # only some positions learn, as with answer-only labels
    hidden = model.language_model(
        model.embed_inputs(inputs["input_ids"], inputs["input_features"], inputs["input_features_mask"]),
        torch.arange(labels.shape[1]).expand_as(labels),
        inputs["attention_mask"].bool(),
    )
    expected = causal_lm_loss(model.lm_head(hidden), labels)
    (expected_grad,) = torch.autograd.grad(expected, model.lm_head.weight, retain_graph=True)
    loss = lm_loss(hidden, model.lm_head, labels, chunk_elements=chunk_elements)
    (grad,) = torch.autograd.grad(loss, model.lm_head.weight)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, expected_grad, atol=1e-7, rtol=1e-5)
    out = model(**{**inputs, "labels": labels})
    assert out.logits is None and torch.allclose(out.loss, expected, atol=1e-6, rtol=1e-6)
    assert (
        model(**{**inputs, "labels": labels}, return_logits=True).logits.shape[-1]
        == model.config.decoder.vocab_size
    )
    nothing = torch.full_like(labels, -100)
    assert torch.isnan(lm_loss(hidden, model.lm_head, nothing)) and torch.isnan(
        causal_lm_loss(model.lm_head(hidden), nothing)
    )


def test_save_pretrained_writes_the_hub_layout_back(tiny_checkpoint, tmp_path):
    """Loading a transformers-written checkpoint and saving it gives the same tensors under the same names."""
    from safetensors.torch import load_file

    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    model.save_pretrained(tmp_path)
    ours, theirs = load_file(tmp_path / "model.safetensors"), load_file(tiny_checkpoint / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    saved = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((tiny_checkpoint / "config.json").read_text())
    for section in ("audio_config", "text_config"):
        for key, value in saved[section].items():
            assert original[section].get(key, value) == value, (section, key)
    again = AudioFlamingo3ForConditionalGeneration.from_pretrained(tmp_path)
    assert again.generation_config == model.generation_config
    quantized = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint, quantize="int8")
    with pytest.raises(ConfigError, match="save it before quantizing"):
        quantized.save_pretrained(tmp_path / "int8")
