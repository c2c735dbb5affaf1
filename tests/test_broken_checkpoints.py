"""Broken checkpoints and config.json values: every damage fails typed, names the file and the
problem, and stops before any tensor is read; whatever a config field holds, it is refused by name or the
model builds with it.

File-by-file damage to the shards themselves is in test_weights.py; the rest of the reliability tests in
test_reliability.py.
"""

import copy
import json
import math
import os
import re
import shutil

import minaf3.weights.loader as loader
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import minaf3
from minaf3 import AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration, AutoProcessor
from minaf3.decoder import Qwen2Decoder
from minaf3.encoder import WhisperEncoder
from minaf3.errors import CheckpointError, ConfigError

# ---- broken checkpoints, end to end ------------------------------------------------------------------------
# One tensor in the sharded checkpoint, under its hub name, to damage.
TENSOR = "language_model.model.layers.0.mlp.up_proj.weight"


def shard_of(folder, name: str = TENSOR):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][name]


def edit_json(folder, name: str, change) -> None:
    data = json.loads((folder / name).read_text())
    change(data)
    (folder / name).write_text(json.dumps(data))


def rewrite_tensor(folder, change) -> None:
    """Re-save TENSOR's shard with `change(tensors)` applied, as a new file renamed over the old one."""
    shard = shard_of(folder)
    tensors = {name: t.clone() for name, t in load_file(shard).items()}  # clones: the file is replaced
    change(tensors)
    save_file(tensors, folder / "new.safetensors")
    os.replace(folder / "new.safetensors", shard)


def cut_shard(folder) -> None:
    data = shard_of(folder).read_bytes()
    shard_of(folder).write_bytes(data[:-100])


def garble_header(folder) -> None:
    data = shard_of(folder).read_bytes()
    shard_of(folder).write_bytes(data[:8] + b"#" * 32 + data[40:])


def drop_index_entry(folder) -> None:
    edit_json(folder, "model.safetensors.index.json", lambda index: index["weight_map"].pop(TENSOR))


SHARD = r"model-000\d\d-of-000\d\d\.safetensors"
UP_PROJ = r"language_model.layers.0.mlp.up_proj.weight \(stored as " + re.escape(TENSOR) + r"\)"
# damage -> (change to the folder, error class, message). The model's from_pretrained and minaf3.load raise it
# (the processor does not read weights or config.json, and loads).
MODEL_SIDE = {
    "truncated shard": (cut_shard, CheckpointError, SHARD + ": truncated: the header describes"),
    "corrupt shard header": (garble_header, CheckpointError, SHARD + ": corrupt safetensors header"),
    "missing shard": (lambda f: shard_of(f).unlink(), CheckpointError, SHARD + ": missing; model"),
    "missing index entry": (
        drop_index_entry,
        CheckpointError,
        f"holds {TENSOR}, which model.safetensors.index",
    ),
    "wrong dtype": (
        lambda f: rewrite_tensor(f, lambda t: t.update({TENSOR: t[TENSOR].to(torch.int32)})),
        CheckpointError,
        UP_PROJ + ": " + SHARD + " holds I32; expected F16, BF16, F32, F64",
    ),
    "wrong shape": (
        lambda f: rewrite_tensor(f, lambda t: t.update({TENSOR: t[TENSOR][:-1].contiguous()})),
        CheckpointError,
        UP_PROJ + r": the model expects \(128, 64\), " + SHARD + r" holds \(127, 64\)",
    ),
    "config missing a field": (
        lambda f: edit_json(f, "config.json", lambda c: c["text_config"].pop("num_key_value_heads")),
        ConfigError,
        "config.json: text_config is missing required field 'num_key_value_heads'",
    ),
    "config field of the wrong type": (
        lambda f: edit_json(f, "config.json", lambda c: c["text_config"].update(num_attention_heads="4")),
        ConfigError,
        r"config.json: text_config.num_attention_heads='4' must be an integer >= 1",
    ),
}
# The same for the processor's files: AutoProcessor's from_pretrained and minaf3.load raise, the model loads.
PROCESSOR_SIDE = {
    "missing tokenizer.json": (
        lambda f: (f / "tokenizer.json").unlink(),
        CheckpointError,
        "tokenizer.json: missing|missing tokenizer.json",
    ),
    "missing tokenizer_config.json": (
        lambda f: (f / "tokenizer_config.json").unlink(),
        CheckpointError,
        "tokenizer_config.json: missing|missing tokenizer_config.json",
    ),
    "corrupt tokenizer.json": (
        lambda f: (f / "tokenizer.json").write_text('{"model": 5'),
        CheckpointError,
        "tokenizer.json: cannot be loaded by tokenizers",
    ),
    "pad token missing from the vocabulary": (
        lambda f: edit_json(f, "tokenizer_config.json", lambda c: c.update(pad_token="<|pad|>")),
        ConfigError,
        r"tokenizer_config.json: pad_token '<\|pad\|>' is not in tokenizer.json's vocabulary",
    ),
}
ENTRY_POINTS = {
    "model": AudioFlamingo3ForConditionalGeneration.from_pretrained,
    "processor": AutoProcessor.from_pretrained,
    "load": minaf3.load,
}


@pytest.fixture
def tensor_reads(monkeypatch) -> list:
    """The files the loader opens to read tensor data (headers are parsed without it); any forward fails."""
    opened = []
    real_open = loader.safe_open
    monkeypatch.setattr(
        loader, "safe_open", lambda file, *a, **k: opened.append(file) or real_open(file, *a, **k)
    )

    def no_compute(*args, **kwargs):
        raise AssertionError("a forward ran while loading a checkpoint")

    for module in (AudioFlamingo3ForConditionalGeneration, WhisperEncoder, Qwen2Decoder):
        monkeypatch.setattr(module, "forward", no_compute)
    return opened


@pytest.mark.parametrize("damage", [*MODEL_SIDE, *PROCESSOR_SIDE])
def test_broken_checkpoint_fails_clearly_before_any_tensor_is_read(
    tmp_path, tiny_checkpoint_sharded, tensor_reads, damage
):
    folder = shutil.copytree(tiny_checkpoint_sharded, tmp_path / "ckpt")
    side = "model" if damage in MODEL_SIDE else "processor"
    change, error, pattern = {**MODEL_SIDE, **PROCESSOR_SIDE}[damage]
    change(folder)
    for entry, load in ENTRY_POINTS.items():
        tensor_reads.clear()
        if entry not in (side, "load"):
            load(folder)  # the damage does not concern this entry point: it loads
            continue
        with pytest.raises(error, match=pattern):
            load(folder)
        assert tensor_reads == [], f"{entry}: tensor data was read before the error"


# config.json from another checkpoint than the processor's files: only minaf3.load holds both, and refuses.
MISMATCHES = {
    "audio token id": (
        lambda c: c.update(audio_token_id=4),
        r"config.json has audio_token_id=4 but the processor's audio token '<sound>' is id 3 in "
        r"tokenizer.json",
    ),
    "vocabulary larger than the embeddings": (
        lambda c: c["text_config"].update(vocab_size=399),
        r"tokenizer.json holds token ids up to 399 but config.json has text_config.vocab_size=399",
    ),
}


@pytest.mark.parametrize("mismatch", MISMATCHES)
def test_load_refuses_a_processor_the_model_would_misread(tmp_path, tiny_checkpoint, tensor_reads, mismatch):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    change, pattern = MISMATCHES[mismatch]
    assert AutoProcessor.from_pretrained(folder).audio_token_id == 3  # the values the patterns name
    assert max(AutoProcessor.from_pretrained(folder).tokenizer.get_vocab(True).values()) == 399
    edit_json(folder, "config.json", change)
    with pytest.raises(ConfigError, match=re.escape(str(folder)) + ": " + pattern):
        minaf3.load(folder)
    assert tensor_reads == []


# ---- config.json values ------------------------------------------------------------------------------------
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 4000),
    st.floats(-10, 5000) | st.sampled_from([math.nan, math.inf, 64.0]),  # sizes stay buildable
    st.text(max_size=4),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["rope_type", "rope_theta"]), st.integers(-1, 3) | st.text(max_size=3)),
)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), value=JSON_VALUES)
def test_any_config_value_loads_or_names_the_field(tiny_checkpoint, data, value):
    """Whatever a field holds, the config is refused naming it, or the model builds with it (no bare
    ValueError, ZeroDivisionError or negative tensor size later on)."""
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    section = data.draw(st.sampled_from(["audio_config", "text_config", None]))
    fields = config[section] if section else config
    key = data.draw(st.sampled_from(sorted(k for k in fields if not isinstance(fields[k], dict) or section)))
    changed = copy.deepcopy(config)
    (changed[section] if section else changed)[key] = value
    try:
        parsed = AudioFlamingo3Config.from_dict(changed)
    except ConfigError as e:
        named = key.split("_")[0] if key.startswith("rope") else key
        assert str(e).startswith("config.json:") and named in str(e), (key, value, str(e))
        return
    with torch.device("meta"):
        AudioFlamingo3ForConditionalGeneration(parsed)


def test_config_refuses_a_front_end_the_features_cannot_feed(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    for key, value, message in [
        ("num_mel_bins", 80, "num_mel_bins=80 is not supported"),
        ("max_source_positions", 1000, "max_source_positions=1000 is below the 1500 encoder frames"),
    ]:
        with pytest.raises(ConfigError, match=message):
            AudioFlamingo3Config.from_dict({**config, "audio_config": {**config["audio_config"], key: value}})
    with pytest.raises(ConfigError, match=r"audio_token_id=9999 is outside the vocabulary"):
        AudioFlamingo3Config.from_dict({**config, "audio_token_id": 9999})


def test_bad_generation_config_fails_before_any_tensor_is_read(tmp_path, tiny_checkpoint, tensor_reads):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    edit_json(folder, "generation_config.json", lambda c: c.update(top_k=-3))
    with pytest.raises(ConfigError, match="generation_config.json: top_k=-3"):
        AudioFlamingo3ForConditionalGeneration.from_pretrained(folder)
    assert tensor_reads == []
