"""Reading the processor's files from a checkpoint folder, and the BatchFeature the processor returns."""

import json
import logging
import shutil

import pytest
import torch
from conftest import speech_like

from minaf3.errors import CheckpointError, ConfigError
from minaf3.processor import AudioFlamingo3Processor
from minaf3.processor_files import BatchFeature, read_processor_files

CONVERSATION = [
    {
        "role": "user",
        "content": [{"type": "audio", "audio": speech_like(20_000)}, {"type": "text", "text": "Hi"}],
    }
]
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja")


@pytest.fixture
def folder(tiny_checkpoint, tmp_path):
    """A writable copy of the tiny checkpoint's processor files, for breaking one at a time."""
    for name in PROCESSOR_FILES:
        shutil.copy(tiny_checkpoint / name, tmp_path / name)
    return tmp_path


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        section, _, field = key.rpartition("__")
        target = data[section] if section else data
        if value is None:
            target.pop(field, None)
        else:
            target[field] = value
    path.write_text(json.dumps(data))


def test_reads_the_reference_settings(tiny_checkpoint, reference_processor):
    processor = AudioFlamingo3Processor.from_pretrained(tiny_checkpoint)
    tokenizer = reference_processor.tokenizer
    assert processor.audio_token == reference_processor.audio_token == "<sound>"
    assert processor.audio_token_id == reference_processor.audio_token_id
    assert (processor.pad_token_id, processor.eos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
    )
    assert processor.default_transcription_prompt == reference_processor.default_transcription_prompt
    assert processor.max_audio_len == reference_processor.max_audio_len == 600


def test_older_layout_with_preprocessor_config(folder, tiny_checkpoint):
    """transformers 4 saves keep the feature extractor in preprocessor_config.json: same outputs."""
    config = json.loads((folder / "processor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(config.pop("feature_extractor")))
    (folder / "processor_config.json").write_text(json.dumps(config))
    old = AudioFlamingo3Processor.from_pretrained(folder).apply_chat_template(CONVERSATION)
    new = AudioFlamingo3Processor.from_pretrained(tiny_checkpoint).apply_chat_template(CONVERSATION)
    assert all(torch.equal(old[k], new[k]) for k in new)
    (folder / "processor_config.json").unlink()  # the processor keys then take their defaults
    assert read_processor_files(folder).keys() == {"tokenizer", "pad_token", "eos_token"}


def test_processor_config_values_are_used(folder):
    edit_json(
        folder / "processor_config.json", default_transcription_prompt="Write it down.", max_audio_len=60
    )
    processor = AudioFlamingo3Processor.from_pretrained(folder)
    assert "Write it down." in processor.apply_transcription_request(speech_like(100), tokenize=False)[0]
    out = processor("<sound>", speech_like(16000 * 75))  # cut to 60 s: two windows
    assert out["input_features"].shape[0] == 2


@pytest.mark.parametrize("missing", ["tokenizer.json", "tokenizer_config.json"])
def test_missing_tokenizer_files(folder, missing):
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=rf"{missing}: missing.*huggingface-cli download"):
        AudioFlamingo3Processor.from_pretrained(folder)


def test_missing_feature_settings(folder):
    edit_json(folder / "processor_config.json", feature_extractor=None)
    with pytest.raises(CheckpointError, match=r"preprocessor_config.json: missing.*feature_extractor"):
        AudioFlamingo3Processor.from_pretrained(folder)


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        AudioFlamingo3Processor.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("tokenizer.json", "{not json", r"tokenizer.json: cannot be loaded by tokenizers"),
        ("tokenizer_config.json", "{not json", r"tokenizer_config.json: cannot be read as JSON"),
        ("processor_config.json", "[1, 2]", r"processor_config.json: expected a JSON object"),
    ],
)
def test_corrupt_files(folder, name, text, match):
    (folder / name).write_text(text)
    with pytest.raises(CheckpointError, match=match):
        AudioFlamingo3Processor.from_pretrained(folder)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"feature_extractor__feature_size": 80}, r"feature_size=80 is not supported"),
        ({"feature_extractor__feature_size": None}, r"feature_size=80 is not supported"),  # Whisper's default
        ({"feature_extractor__sampling_rate": 22050}, r"sampling_rate=22050"),
        ({"feature_extractor__n_fft": 512}, r"n_fft=512"),
        ({"feature_extractor__hop_length": 320}, r"hop_length=320"),
        ({"feature_extractor__chunk_length": 10}, r"chunk_length=10"),
        ({"feature_extractor__dither": 1e-5}, r"dither=1e-05"),
        ({"max_audio_len": 1200}, r"max_audio_len must be whole seconds from 30 to 600, got 1200"),
        ({"max_audio_len": "600"}, r"max_audio_len must be whole seconds"),
        ({"audio_token": "<audio>"}, r"audio_token '<audio>' is not in the tokenizer's vocabulary"),
    ],
)
def test_bad_processor_config(folder, change, match):
    edit_json(folder / "processor_config.json", **change)
    with pytest.raises(ConfigError, match=match):
        AudioFlamingo3Processor.from_pretrained(folder)


def test_other_chat_template_warns(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="minaf3.processor_files"):
        AudioFlamingo3Processor.from_pretrained(folder)
    assert not caplog.records
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    with caplog.at_level(logging.WARNING, logger="minaf3.processor_files"):
        AudioFlamingo3Processor.from_pretrained(folder)
    assert "chat template differs from AF3's" in caplog.text


def test_special_tokens_follow_the_tokenizer_config(folder):
    """Which tokens decode drops when tokenizer.json flags none as special: transformers' choice."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    for token in tokenizer["added_tokens"]:
        token["special"] = False
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    from transformers import AutoTokenizer

    processor = AudioFlamingo3Processor.from_pretrained(folder)
    reference = AutoTokenizer.from_pretrained(folder)
    ids = reference("<|im_start|>user\nHi<sound><|im_end|><|endoftext|>")["input_ids"]
    assert processor.tokenizer.encode("<|im_start|>user\nHi<sound><|im_end|><|endoftext|>").ids == ids
    assert processor.decode(ids) == reference.decode(ids, skip_special_tokens=True)


# --- BatchFeature ---------------------------------------------------------------------------------------


@pytest.fixture
def batch():
    return BatchFeature(
        input_ids=torch.ones(2, 3, dtype=torch.int64),
        input_features=torch.zeros(1, 128, 3000),
        input_features_mask=torch.ones(1, 3000, dtype=torch.int32),
    )


def test_batch_feature_access_and_unpacking(batch):
    assert batch.input_ids is batch["input_ids"]
    assert (lambda **kw: sorted(kw))(**batch) == ["input_features", "input_features_mask", "input_ids"]
    with pytest.raises(AttributeError, match="no 'labels'"):
        _ = batch.labels


def test_batch_feature_to(batch):
    assert batch.to(torch.float16) is batch
    assert batch.input_features.dtype == torch.float16
    assert (batch.input_ids.dtype, batch.input_features_mask.dtype) == (torch.int64, torch.int32)
    batch.to("cpu", dtype=torch.bfloat16)
    assert batch.input_features.dtype == torch.bfloat16 and batch.input_ids.device.type == "cpu"
    batch.to(device=torch.device("meta"))
    assert all(t.device.type == "meta" for t in batch.values())
    assert batch.input_ids.dtype == torch.int64
