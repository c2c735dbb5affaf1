"""The processor's files in a checkpoint folder (tokenizer, settings, chat template), and BatchFeature.

`read_processor_files` reads them; `write_processor_files` writes them as transformers' save_pretrained does.

Files read (hub layout, what transformers' `save_pretrained` writes):

    tokenizer.json             the tokenizers model (required)
    tokenizer_config.json      pad/eos tokens and the special-token list (required)
    processor_config.json      audio_token, default_transcription_prompt, max_audio_len and, in
                               transformers 5 saves, the feature extractor under "feature_extractor"
    preprocessor_config.json   the feature extractor in older saves (one of the two must hold it)
    chat_template.jinja/.json  only checked: minaf3 renders AF3's template in Python (chat_template.py)

The feature extractor is not configurable in minaf3: its settings are checked against what
features.py computes and anything else is a ConfigError, so a checkpoint never runs with wrong features.
"""

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer

from minaf3 import windows
from minaf3.chat_template import REFERENCE_TEMPLATE, is_reference_template
from minaf3.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

# The WhisperFeatureExtractor settings minaf3 implements. A key missing from the file takes transformers'
# WhisperFeatureExtractor default, which is why feature_size must be present: its default is 80, not 128.
EXPECTED_FEATURES = {
    "feature_size": windows.N_MELS,
    "sampling_rate": windows.SAMPLING_RATE,
    "n_fft": windows.N_FFT,
    "hop_length": windows.HOP_LENGTH,
    "chunk_length": windows.WINDOW_SECONDS,
    "n_samples": windows.WINDOW_SAMPLES,
    "nb_max_frames": windows.FRAMES_PER_WINDOW,
    "dither": 0.0,  # random noise added to the waveform: minaf3 features are deterministic
    "padding_value": 0.0,
}
WHISPER_DEFAULTS = {**EXPECTED_FEATURES, "feature_size": 80}
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)
DOWNLOAD_HINT = (
    "download the whole checkpoint, e.g. huggingface-cli download nvidia/audio-flamingo-3-hf --local-dir DIR"
)


class BatchFeature(dict):
    """The processor's output: a dict of tensors with attribute access, `**` unpacking and `.to(...)`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchFeature has no {name!r} (keys: {', '.join(self)})") from None

    def to(self, device_or_dtype: Any = None, *, device: Any = None, dtype: torch.dtype | None = None):
        """Move every tensor to `device`; cast only floating tensors to `dtype` (ids and masks keep theirs).

        Works in place and returns self, as transformers' BatchFeature does.
        """
        if isinstance(device_or_dtype, torch.dtype):
            dtype = device_or_dtype
        elif device_or_dtype is not None:
            device = device_or_dtype
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
        return self


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path.name}: cannot be read as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """Special tokens are saved as strings or as AddedToken dicts {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _load_tokenizer(folder: Path) -> tuple[Tokenizer, dict]:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the processor needs the tokenizer ({DOWNLOAD_HINT})")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{path.name}: cannot be loaded by tokenizers ({exc})") from exc
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing; it names the pad and eos tokens ({DOWNLOAD_HINT})")
    config = _read_json(config_path)
    # add_special_tokens below would give a token missing from the vocabulary a new id past the model's
    # embedding table: padding or stopping on it would fail later, far from the cause.
    for key in ("pad_token", "eos_token"):
        text = _token_text(config.get(key))
        if isinstance(text, str) and tokenizer.token_to_id(text) is None:
            raise ConfigError(
                f"{config_path.name}: {key} {text!r} is not in tokenizer.json's vocabulary "
                "(are the tokenizer files from different checkpoints?)"
            )
    # transformers re-registers the named special tokens (eos, pad, ...) as special, which decides what
    # skip_special_tokens drops even when tokenizer.json does not flag them; the extra ones keep their flags.
    named = [_token_text(config.get(key)) for key in NAMED_SPECIAL_TOKENS]
    specials = [AddedToken(t, special=True, normalized=False) for t in named if isinstance(t, str)]
    tokenizer.add_special_tokens(specials)
    return tokenizer, config


def _feature_settings(folder: Path, processor_config: dict) -> tuple[str, dict]:
    if isinstance(processor_config.get("feature_extractor"), dict):
        return "processor_config.json", processor_config["feature_extractor"]
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing, and processor_config.json has no 'feature_extractor'; one of them must "
            f"hold the audio feature settings ({DOWNLOAD_HINT})"
        )
    return path.name, _read_json(path)


def _check_features(source: str, settings: dict) -> None:
    for key, expected in EXPECTED_FEATURES.items():
        value = settings.get(key, WHISPER_DEFAULTS[key])
        if value != expected:
            raise ConfigError(
                f"{source}: feature extractor {key}={value!r} is not supported; minaf3 computes AF3's "
                f"features ({', '.join(f'{k}={v}' for k, v in EXPECTED_FEATURES.items())})"
            )


def _check_chat_template(folder: Path) -> None:
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif (folder / "chat_template.json").is_file():
        template = _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, str) and not is_reference_template(template):
        logger.warning(
            "%s: the checkpoint's chat template differs from AF3's; minaf3 renders AF3's template "
            "(see minaf3/chat_template.py), so prompts may not match what this checkpoint expects",
            folder,
        )


def read_processor_files(path: str | os.PathLike) -> dict[str, Any]:
    """The keyword arguments of AudioFlamingo3Processor read from a checkpoint folder (see module doc)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder ({DOWNLOAD_HINT})")
    tokenizer, tokenizer_config = _load_tokenizer(folder)
    processor_path = folder / "processor_config.json"
    processor_config = _read_json(processor_path) if processor_path.is_file() else {}
    _check_features(*_feature_settings(folder, processor_config))
    _check_chat_template(folder)
    # Keys absent from processor_config.json keep the processor's defaults (the reference's too).
    keys = ("audio_token", "default_transcription_prompt", "max_audio_len")
    kwargs = {key: processor_config[key] for key in keys if key in processor_config}
    return {
        "tokenizer": tokenizer,
        "pad_token": _token_text(tokenizer_config.get("pad_token")),
        "eos_token": _token_text(tokenizer_config.get("eos_token")),
        **kwargs,
    }


def write_processor_files(
    path: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    pad_token: str | None,
    eos_token: str | None,
    audio_token: str,
    default_transcription_prompt: str,
    max_audio_len: int,
) -> None:
    """Write tokenizer.json, tokenizer_config.json, processor_config.json and chat_template.jinja into the
    folder `path` with the fields and spellings transformers 5 writes for AF3 (its AutoProcessor reads them
    back and re-saves them unchanged). Every special token but the pad token is listed as an extra one."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    added = sorted(tokenizer.get_added_tokens_decoder().items())
    extra = [token.content for _, token in added if token.special and token.content != pad_token]
    _write_json(
        folder / "tokenizer_config.json",
        {
            "backend": "tokenizers",
            "bos_token": None,
            "eos_token": eos_token,
            "extra_special_tokens": extra,
            "pad_token": pad_token,
            "processor_class": "AudioFlamingo3Processor",
            "tokenizer_class": "TokenizersBackend",
            "unk_token": None,
        },
    )
    _write_json(
        folder / "processor_config.json",
        {
            "audio_token": audio_token,
            "default_transcription_prompt": default_transcription_prompt,
            "feature_extractor": {
                **EXPECTED_FEATURES,
                "feature_extractor_type": "WhisperFeatureExtractor",
                "padding_side": "right",
                "return_attention_mask": True,
            },
            "max_audio_len": max_audio_len,
            "processor_class": "AudioFlamingo3Processor",
        },
    )
    (folder / "chat_template.jinja").write_text(REFERENCE_TEMPLATE, encoding="utf-8")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
