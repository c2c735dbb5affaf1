"""`minaf3 finetune` (minaf3/finetune.py): the saved adapter against peft on transformers, resuming, frozen
base weights, a falling loss, and every bad input refused before training."""

import json

import peft
import pytest
import torch
from conftest import SR, speech_like
from safetensors.torch import load_file

from minaf3 import AudioFlamingo3ForConditionalGeneration, AutoProcessor, ConfigError, InputError
from minaf3.cli import main
from minaf3.finetune import FinetuneConfig, add_lora, finetune
from minaf3.lora import LoRALinear
from minaf3.tasks import examples, write_dataset

QUICK = dict(lora_rank=4, lora_alpha=8.0, batch_size=4, lr=1e-2, warmup_steps=1, log_every=1, save_every=2)


@pytest.fixture(scope="module")
def order_data(tmp_path_factory):
    """8 clips of the held-out order task and 4 others, NVIDIA's JSON."""
    folder = tmp_path_factory.mktemp("finetune_data")
    train = write_dataset(folder, examples("order", 1000, 8), "train.json")
    held = write_dataset(folder / "held", examples(("order", "pitch"), 0, 4), "held.json")
    return train, held


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_checkpoint, order_data):
    """(adapter folder, result) of 6 steps on some decoder layers and lm_head, the projector trained too."""
    out = tmp_path_factory.mktemp("adapter") / "ad"
    config = FinetuneConfig(
        steps=6, projector=True, targets=("q_proj", "v_proj", "down_proj", "lm_head"), **QUICK
    )
    result = finetune(tiny_checkpoint, order_data[0], out, config, order_data[1], "float32", progress=False)
    return out, result


def inputs_for(checkpoint):
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": speech_like(30_000, SR, 3)},
                {"type": "text", "text": "Hi?"},
            ],
        }
    ]
    return AutoProcessor.from_pretrained(checkpoint).apply_chat_template([conversation])


@pytest.mark.parametrize("merged", [True, False])
def test_adapter_loads_in_peft_with_the_same_logits(trained, tiny_checkpoint, merged):
    from transformers import AudioFlamingo3ForConditionalGeneration as Reference

    folder, _ = trained
    inputs = inputs_for(tiny_checkpoint)
    reference = Reference.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        base = reference(**inputs).logits
        expected = peft.PeftModel.from_pretrained(reference, folder).eval()(**inputs).logits
    assert (expected - base).abs().max() > 1e-3  # training moved the adapter: the comparison is not vacuous
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, adapter=folder, merge_adapter=merged
    )
    with torch.no_grad():
        logits = model(**inputs).logits
    assert (logits - expected).abs().max() < 1e-4


def test_adapter_files_are_peft_s(trained):
    folder, result = trained
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "LORA"
        and config["r"] == 4
        and config["modules_to_save"] == ["multi_modal_projector"]
    )
    names = load_file(folder / "adapter_model.safetensors")
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.multi_modal_projector.linear_1.weight" in names
    assert "base_model.model.lm_head.lora_B.weight" in names
    assert not any("k_proj" in name for name in names)
    assert not any("audio_tower" in name for name in names)  # the decoder's layers only
    log = [json.loads(line) for line in (folder / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 7))
    assert log[-1]["eval"]["overall"]["items"] == 4 and result["eval"] == log[-1]["eval"]


def test_resumed_run_ends_with_the_same_adapter(tmp_path, tiny_checkpoint, order_data):
    config = FinetuneConfig(steps=5, **QUICK)
    whole = finetune(
        tiny_checkpoint, order_data[0], tmp_path / "whole", config, dtype="float32", progress=False
    )
    finetune(
        tiny_checkpoint, order_data[0], tmp_path / "cut", config, dtype="float32", progress=False, until=3
    )
    rest = finetune(tiny_checkpoint, order_data[0], tmp_path / "cut", config, dtype="float32", progress=False)
    assert len(rest["losses"]) == 3 and rest["losses"] == whole["losses"][2:]  # resumed from step 2's save
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_falls(tmp_path, tiny_checkpoint, order_data):
    """12 steps over the same 8 clips (6 epochs) at least halve the loss of the first epoch."""
    config = FinetuneConfig(epochs=6, **(QUICK | {"lr": 3e-2}))
    result = finetune(
        tiny_checkpoint, order_data[0], tmp_path / "ad", config, dtype="float32", progress=False
    )
    losses = result["losses"]
    assert len(losses) == 12 and sum(losses[-2:]) < 0.5 * sum(losses[:2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_base_weights_stay_as_loaded(tiny_checkpoint, dtype):
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = add_lora(model, FinetuneConfig(lora_rank=2, targets=("q_proj", "down_proj")))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in trained)
    frozen = [p for p in model.parameters() if not any(p is q for q in trained)]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.dtype == dtype for p in frozen)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * model.config.decoder.num_layers
    inputs = inputs_for(tiny_checkpoint)
    labels = inputs["input_ids"].clone()
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    assert all(p.grad is None for p in frozen) and all(p.grad is not None for p in trained)
    after = model.state_dict()  # the base model's names and values, without the factors
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_bad_settings_are_refused():
    for bad in (dict(lora_rank=0), dict(targets=("fc1",)), dict(lr=0.0), dict(metric="bleu"), dict(steps=-1)):
        with pytest.raises(ConfigError):
            FinetuneConfig(**bad)


def test_unreadable_audio_is_refused_before_loading(tmp_path, order_data):
    data = json.loads(order_data[0].read_text())
    data[3]["sound"] = str(order_data[0].parent / "missing.wav")
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="unreadable audio.*missing.wav"):
        finetune(tmp_path / "no-model-needed", tmp_path / "bad.json", tmp_path / "out", progress=False)


def test_resume_with_other_settings_is_refused(tmp_path, tiny_checkpoint, order_data):
    config = FinetuneConfig(steps=2, **QUICK)
    finetune(tiny_checkpoint, order_data[0], tmp_path / "ad", config, dtype="float32", progress=False)
    other = FinetuneConfig(steps=2, **(QUICK | {"lora_rank": 8}))
    with pytest.raises(ConfigError, match="lora_rank=4"):
        finetune(tiny_checkpoint, order_data[0], tmp_path / "ad", other, dtype="float32", progress=False)


def test_command_line(capsys, tmp_path, tiny_checkpoint, order_data):
    argv = [
        "finetune",
        "--model",
        str(tiny_checkpoint),
        "--data",
        str(order_data[0]),
        "--out",
        str(tmp_path / "a"),
    ]
    assert main([*argv, "--steps", "2", "--lora-rank", "2", "--dtype", "float32", "--no-progress"]) == 0
    assert "minaf3 finetune: 2 steps" in capsys.readouterr().out
    assert main([*argv, "--targets", "fc1"]) == 2  # argparse's usage error
    assert main([*argv[:-2], "--out", str(order_data[0]), "--steps", "1"]) == 2
    assert "expected an adapter folder" in capsys.readouterr().err


def test_int8_product_passes_the_gradient_of_the_widened_weight():
    from minaf3.quantize import Int8Product, quantize_weight

    torch.manual_seed(0)
    weight, scales = quantize_weight(torch.randn(40, 24), "w")
    x = torch.randn(3, 5, 24, requires_grad=True)
    direction = torch.randn(3, 5, 40)
    (Int8Product.apply(x, weight, scales) * direction).sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    (torch.nn.functional.linear(reference, weight.float() * scales[:, None]) * direction).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, atol=1e-4, rtol=1e-4)


def test_finetune_over_int8_weights(tmp_path, tiny_checkpoint, order_data):
    """--quantize int8: the decoder stays int8 and frozen, gradients reach the first layer's factors through
    the int8 products above it, and the loss falls as in float32."""
    from minaf3.quantize import LoRAInt8Linear

    config = FinetuneConfig(epochs=6, **(QUICK | {"lr": 3e-2}))
    out = tmp_path / "ad"
    result = finetune(
        tiny_checkpoint, order_data[0], out, config, dtype="float32", quantize="int8", progress=False
    )
    losses = result["losses"]
    assert len(losses) == 12 and sum(losses[-2:]) < 0.5 * sum(losses[:2])
    tensors = load_file(out / "adapter_model.safetensors")
    first = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight"
    assert tensors[first].abs().max() > 0  # trained: the gradient went through every int8 layer after it
    adapted = AudioFlamingo3ForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, adapter=out
    )
    base = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    with torch.no_grad():  # the adapter trained over int8 applies to the float32 model
        moved = adapted(**inputs_for(tiny_checkpoint)).logits - base(**inputs_for(tiny_checkpoint)).logits
    assert moved.abs().max() > 1e-3
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint, quantize="int8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, config)
    assert any(isinstance(m, LoRAInt8Linear) for m in model.modules())
    model(**inputs_for(tiny_checkpoint), labels=inputs_for(tiny_checkpoint)["input_ids"]).loss.backward()
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # int8 buffers as quantized, untouched
    with pytest.raises(ConfigError, match="int4 has no backward pass"):
        finetune(tiny_checkpoint, order_data[0], tmp_path / "x", config, quantize="int4", progress=False)
