"""config.json reading: both transformers spellings, loud failures on missing or unsupported fields."""

import copy
import json

import pytest

from minaf3 import AudioFlamingo3Config, CheckpointError, ConfigError


@pytest.fixture
def config_dict(tiny_checkpoint) -> dict:
    return json.loads((tiny_checkpoint / "config.json").read_text())


def test_reads_the_checkpoint_written_by_transformers(tiny_checkpoint, reference_model):
    cfg = AudioFlamingo3Config.from_file(tiny_checkpoint)
    ref = reference_model.config
    assert cfg.audio_token_id == ref.audio_token_id
    assert cfg.encoder.hidden_size == ref.audio_config.hidden_size
    assert cfg.encoder.num_layers == ref.audio_config.num_hidden_layers
    assert cfg.decoder.num_kv_heads == ref.text_config.num_key_value_heads
    assert cfg.decoder.rope_theta == ref.text_config.rope_parameters["rope_theta"]
    assert cfg.decoder.head_dim == ref.text_config.hidden_size // ref.text_config.num_attention_heads


def test_transformers_4_spellings(config_dict):
    d = copy.deepcopy(config_dict)
    text, audio = d["text_config"], d["audio_config"]
    text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]
    audio["d_model"] = audio.pop("hidden_size")
    audio["encoder_layers"] = audio.pop("num_hidden_layers")
    audio["encoder_attention_heads"] = audio.pop("num_attention_heads")
    audio["encoder_ffn_dim"] = audio.pop("intermediate_size")
    d["some_future_key"] = {"ignored": True}
    assert AudioFlamingo3Config.from_dict(d) == AudioFlamingo3Config.from_dict(config_dict)


@pytest.mark.parametrize(
    "section,key",
    [
        ("text_config", "vocab_size"),
        ("text_config", "num_key_value_heads"),
        ("audio_config", "num_mel_bins"),
        (None, "audio_token_id"),
        (None, "text_config"),
    ],
)
def test_missing_field_is_named(config_dict, section, key):
    d = copy.deepcopy(config_dict)
    del (d[section] if section else d)[key]
    with pytest.raises(ConfigError, match=key):
        AudioFlamingo3Config.from_dict(d)


def test_missing_rope_theta(config_dict):
    d = copy.deepcopy(config_dict)
    del d["text_config"]["rope_parameters"]
    with pytest.raises(ConfigError, match="rope_theta"):
        AudioFlamingo3Config.from_dict(d)


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("text_config", "hidden_act", "relu"),
        ("audio_config", "activation_function", "relu"),
        ("text_config", "use_sliding_window", True),
        ("text_config", "rope_parameters", {"rope_type": "yarn"}),
    ],
)
def test_unsupported_settings_are_refused(config_dict, section, key, value):
    d = copy.deepcopy(config_dict)
    d[section][key] = value
    with pytest.raises(ConfigError, match="not supported"):
        AudioFlamingo3Config.from_dict(d)


def test_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        AudioFlamingo3Config.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        AudioFlamingo3Config.from_file(tmp_path)
