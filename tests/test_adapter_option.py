"""A LoRA adapter in PEFT's format, loaded by minaf3.load(adapter=...) and by --adapter on chat, transcribe,
batch and eval: merged (the default) or not, and refused clearly when it does not fit the model."""

import json
import shutil

import pytest
import torch
from conftest import write_demo_adapter

import minaf3
import minaf3.model
from minaf3 import AudioFlamingo3ForConditionalGeneration, ConfigError
from minaf3.cli import main
from minaf3.demo import CLIP_NAME
from minaf3.lora import lora_updates

GREEDY = ["--greedy", "--max-new-tokens", "8"]
QUESTION = "What is in this audio?"


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def adapted(demo_checkpoint, demo_adapter):
    """The demo checkpoint with the adapter merged, as minaf3.load gives it."""
    return minaf3.load(demo_checkpoint, adapter=demo_adapter)


def logits(model, processor, clip) -> torch.Tensor:
    """(1, T, vocab) for QUESTION about `clip`."""
    content = [{"type": "audio", "audio": str(clip)}, {"type": "text", "text": QUESTION}]
    inputs = processor.apply_chat_template([{"role": "user", "content": content}])
    with torch.no_grad():
        return model(**inputs).logits


def test_load_applies_the_adapter_merged_or_not(adapted, demo_pipeline, demo_checkpoint, demo_adapter):
    clip = demo_checkpoint / CLIP_NAME
    updates = lora_updates(adapted.model)
    assert len(updates) == 4 and all(".self_attn." in name for name in updates)  # q and v of two layers
    assert all(layer.merged for layer in adapted.model.modules() if hasattr(layer, "merged"))
    # The same as loading the base model and applying the adapter by hand (model.load_adapter).
    by_hand = AudioFlamingo3ForConditionalGeneration.from_pretrained(demo_checkpoint)
    by_hand.load_adapter(demo_adapter)
    expected = logits(by_hand, adapted.processor, clip)
    assert torch.equal(logits(adapted.model, adapted.processor, clip), expected)
    unmerged = minaf3.load(demo_checkpoint, adapter=demo_adapter, merge_adapter=False)
    assert not any(layer.merged for layer in unmerged.model.modules() if hasattr(layer, "merged"))
    torch.testing.assert_close(
        logits(unmerged.model, unmerged.processor, clip), expected, rtol=1e-4, atol=1e-4
    )
    base = logits(demo_pipeline.model, demo_pipeline.processor, clip)
    assert (base - expected).abs().max() > 0.1  # the adapter changes the model


def test_chat_and_transcribe_take_adapter(capsys, adapted, demo_pipeline, demo_checkpoint, demo_adapter):
    clip = demo_checkpoint / CLIP_NAME
    chat = ["chat", "--model", demo_checkpoint, "--audio", clip, QUESTION, *GREEDY]
    _, plain, _ = run(capsys, *chat)
    status, out, err = run(capsys, *chat, "--adapter", demo_adapter)
    assert status == 0, err
    assert out.strip() == adapted.chat(QUESTION, audio=clip, do_sample=False, max_new_tokens=8).strip()
    assert out != plain
    status, unmerged, _ = run(capsys, *chat, "--adapter", demo_adapter, "--adapter-unmerged")
    assert status == 0 and unmerged == out
    transcribe = ["transcribe", "--model", demo_checkpoint, clip, "--max-new-tokens", "8", "--no-progress"]
    status, out, err = run(capsys, *transcribe, "--adapter", demo_adapter)
    assert status == 0, err
    assert out.strip() == adapted.transcribe(clip, max_new_tokens=8).text
    assert out != run(capsys, *transcribe)[1]


def test_batch_and_eval_take_adapter(capsys, demo_checkpoint, demo_adapter, tmp_path):
    clip = demo_checkpoint / CLIP_NAME
    line = {"id": "a", "audio": str(clip), "prompt": QUESTION, "answer": "a clip"}
    (tmp_path / "in.jsonl").write_text(json.dumps(line) + "\n")
    texts = {}
    for name, extra in [("plain", []), ("merged", ["--adapter", demo_adapter])]:
        out = tmp_path / f"{name}.jsonl"
        argv = ["batch", "--model", demo_checkpoint, "--manifest", tmp_path / "in.jsonl", "--out", out]
        assert run(capsys, *argv, *GREEDY, "--no-progress", *extra)[0] == 0
        texts[name] = json.loads(out.read_text())["text"]
    assert texts["merged"] != texts["plain"]
    report = tmp_path / "report.json"
    argv = ["eval", "--model", demo_checkpoint, "--data", tmp_path / "in.jsonl", "--out", report]
    argv += ["--max-new-tokens", "8", "--no-progress", "--adapter", demo_adapter]
    status, _, err = run(capsys, *argv, "--adapter-unmerged")
    assert status == 0, err
    saved = json.loads(report.read_text())
    assert saved["items"][0]["prediction"] == texts["merged"]  # eval is greedy by default
    assert saved["adapter"] == str(demo_adapter) and saved["settings"]["merge_adapter"] is False
    status, _, err = run(capsys, *argv[:-2])  # the same --out without the adapter: refused, not mixed
    assert status == 2 and "adapter" in err and "then, None now" in err


# ---- adapters that cannot be used -------------------------------------------------------------------------
def test_a_missing_adapter_is_refused_before_any_weight_is_read(
    capsys, monkeypatch, demo_checkpoint, tmp_path
):
    def no_weights(*args, **kwargs):
        raise AssertionError("the checkpoint's weights were read")

    monkeypatch.setattr(minaf3.model, "read_weights", no_weights)
    chat = ["chat", "--model", demo_checkpoint, "--audio", demo_checkpoint / CLIP_NAME, QUESTION, *GREEDY]
    status, _, err = run(capsys, *chat, "--adapter", tmp_path / "nowhere")
    assert status == 2 and "nowhere: adapter folder not found" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    status, _, err = run(capsys, *chat, "--adapter", tmp_path / "empty")
    assert status == 2 and "empty: no adapter_config.json" in err
    (tmp_path / "empty" / "adapter_config.json").write_text(
        '{"r": 4, "lora_alpha": 8, "target_modules": "x"}'
    )
    status, _, err = run(capsys, *chat, "--adapter", tmp_path / "empty")
    assert status == 2 and "no adapter weights (adapter_model.safetensors or adapter_model.bin)" in err


def test_an_adapter_that_does_not_fit_is_refused_with_what_does_not(
    capsys, demo_checkpoint, demo_adapter, tmp_path
):
    chat = ["chat", "--model", demo_checkpoint, "--audio", demo_checkpoint / CLIP_NAME, QUESTION, *GREEDY]
    wide = shutil.copytree(demo_adapter, tmp_path / "wide")
    config = json.loads((wide / "adapter_config.json").read_text())
    # "q_proj" alone also names the encoder's layers, whose LoRA pairs the file does not hold.
    (wide / "adapter_config.json").write_text(json.dumps(config | {"target_modules": ["q_proj", "v_proj"]}))
    status, _, err = run(capsys, *chat, "--adapter", wide)
    assert (
        status == 2
        and "does not fit the model" in err
        and "targeted modules without their LoRA pair (4)" in err
    )
    assert "audio_tower.layers.0.self_attn.q_proj" in err
    ranked = write_demo_adapter(tmp_path / "ranked", demo_checkpoint, r=4)
    config = json.loads((ranked / "adapter_config.json").read_text())
    (ranked / "adapter_config.json").write_text(json.dumps(config | {"r": 8}))  # tensors of rank 4
    status, _, err = run(capsys, *chat, "--adapter", ranked)
    assert status == 2 and "tensors with the wrong shape or dtype" in err and "expected (8, 128)" in err


def test_option_combinations_that_cannot_work(capsys, demo_checkpoint, demo_adapter):
    chat = ["chat", "--model", demo_checkpoint, "--audio", demo_checkpoint / CLIP_NAME, QUESTION, *GREEDY]
    status, _, err = run(capsys, *chat, "--adapter-unmerged")
    assert status == 2 and "--adapter-unmerged needs --adapter DIR" in err
    status, _, err = run(capsys, *chat, "--adapter", demo_adapter, "--adapter-unmerged", "--quantize", "int8")
    assert status == 2 and "an unmerged adapter needs the float weights" in err
    with pytest.raises(ConfigError, match="think=True applies think/; give it or adapter="):
        AudioFlamingo3ForConditionalGeneration.from_pretrained(
            demo_checkpoint, think=True, adapter=demo_adapter
        )


def test_think_with_an_adapter_uses_that_adapter(demo_checkpoint, demo_adapter, caplog):
    pipe = minaf3.load(demo_checkpoint, think=True, adapter=demo_adapter)
    assert pipe.think and len(lora_updates(pipe.model)) == 4
    assert "no think/ adapter folder" not in caplog.text


def test_int8_quantizes_the_merged_weights(demo_checkpoint, demo_adapter, adapted, demo_pipeline):
    pipe = minaf3.load(demo_checkpoint, adapter=demo_adapter, quantize="int8")
    clip = demo_checkpoint / CLIP_NAME
    got = logits(pipe.model, pipe.processor, clip)
    distance = {
        name: ((got - want).norm() / want.norm()).item()
        for name, want in [
            ("adapted", logits(adapted.model, adapted.processor, clip)),
            ("base", logits(demo_pipeline.model, demo_pipeline.processor, clip)),
        ]
    }
    assert distance["adapted"] < 0.1 < distance["base"], distance
