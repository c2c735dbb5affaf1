"""Model configuration: frozen dataclasses filled explicitly from a checkpoint's `config.json`.

Every shape-determining field must be present; a missing one is a ConfigError that names it. Both spellings
that transformers has written are read: 4.x (`rope_theta`, Whisper's `d_model`/`encoder_layers`) and 5.x
(`rope_parameters.rope_theta`, `hidden_size`/`num_hidden_layers`). Unknown keys are ignored. Settings minaf3
does not implement (another activation, scaled RoPE, sliding windows) are refused rather than run wrongly.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError
from .windows import FRAMES_PER_WINDOW, N_MELS

_MISSING = object()


def _get(section: dict, where: str, *names: str, default: Any = _MISSING) -> Any:
    """The first of `names` present in `section` (spellings of one field), else `default`, else an error."""
    for name in names:
        if name in section and section[name] is not None:
            return section[name]
    if default is _MISSING:
        raise ConfigError(f"config.json: {where} is missing required field {names[0]!r}")
    return default


def _label(where: str, name: str) -> str:
    return name if where == "the top level" else f"{where}.{name}"


def _count(section: dict, where: str, *names: str, default: Any = _MISSING, minimum: int = 1) -> int:
    """An integer field (a size, a count or an id) of at least `minimum`.

    Checked here because a string, a list or a zero would otherwise surface later as a bare ValueError,
    a ZeroDivisionError or a tensor of negative size while the model is built. JSON writers sometimes
    store 64 as 64.0, which is accepted.
    """
    value = _get(section, where, *names, default=default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config.json: {_label(where, names[0])}={value!r} must be an integer >= {minimum}")
    return value


def _positive(value: Any, where: str, name: str) -> float:
    """A positive finite number (RoPE theta, norm epsilon) as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ConfigError(f"config.json: {_label(where, name)}={value!r} must be a positive number")
    return float(value)


def _expect(value: Any, supported: Any, field: str) -> None:
    if value != supported:
        raise ConfigError(
            f"config.json: {field}={value!r} is not supported (minaf3 implements {supported!r})"
        )


@dataclass(frozen=True)
class EncoderConfig:
    """The Whisper-style audio encoder (`audio_config`)."""

    # The official checkpoint's values in the comments (Whisper large-v3's encoder).
    num_mel_bins: int  # 128: log-mel channels in, conv1's input channels
    hidden_size: int  # 1280
    num_layers: int  # 32 pre-LN transformer layers
    num_heads: int  # 20, so head_dim 64
    intermediate_size: int  # 5120: fc1's outputs
    max_source_positions: int  # 1500: learned positions, one per frame after conv2 (30 s / 20 ms)
    layer_norm_eps: float = 1e-5  # nn.LayerNorm's default, which the reference uses

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        where = "audio_config"
        _expect(
            _get(d, where, "activation_function", default="gelu"), "gelu", "audio_config.activation_function"
        )
        _expect(bool(_get(d, where, "scale_embedding", default=False)), False, "audio_config.scale_embedding")
        cfg = cls(
            num_mel_bins=_count(d, where, "num_mel_bins"),
            hidden_size=_count(d, where, "hidden_size", "d_model"),
            num_layers=_count(d, where, "num_hidden_layers", "encoder_layers"),
            num_heads=_count(d, where, "num_attention_heads", "encoder_attention_heads"),
            intermediate_size=_count(d, where, "intermediate_size", "encoder_ffn_dim"),
            max_source_positions=_count(d, where, "max_source_positions"),
        )
        if cfg.hidden_size % cfg.num_heads:
            raise ConfigError(
                f"config.json: audio_config.hidden_size {cfg.hidden_size} is not divisible by "
                f"num_attention_heads {cfg.num_heads}"
            )
        # The front end is fixed (features.py): 128 mel bins, and a 30 s window is 1500 frames after conv2,
        # each needing a learned position. A smaller table would only fail on the first long audio.
        _expect(cfg.num_mel_bins, N_MELS, "audio_config.num_mel_bins")
        if cfg.max_source_positions < FRAMES_PER_WINDOW // 2:
            raise ConfigError(
                f"config.json: audio_config.max_source_positions={cfg.max_source_positions} is below the "
                f"{FRAMES_PER_WINDOW // 2} encoder frames of a 30 s window"
            )
        return cfg


@dataclass(frozen=True)
class DecoderConfig:
    """The Qwen2 language model (`text_config`)."""

    # The official checkpoint's values in the comments (Qwen2.5-7B).
    vocab_size: int  # 151672 rows of embed_tokens and of the untied lm_head
    hidden_size: int  # 3584
    intermediate_size: int  # 18944: gate_proj's and up_proj's outputs
    num_layers: int  # 28
    num_heads: int  # 28 query heads
    num_kv_heads: int  # 4: each key/value head serves 7 query heads (GQA)
    head_dim: int  # 128 = hidden_size / num_heads unless config.json says otherwise
    rope_theta: float  # 1e6
    rms_norm_eps: float  # 1e-6
    max_position_embeddings: int  # the context generate checks prompt + new tokens against
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        where = "text_config"
        _expect(_get(d, where, "hidden_act", default="silu"), "silu", "text_config.hidden_act")
        _expect(
            bool(_get(d, where, "use_sliding_window", default=False)), False, "text_config.use_sliding_window"
        )
        _expect(
            bool(_get(d, where, "tie_word_embeddings", default=False)),
            False,
            "text_config.tie_word_embeddings",
        )
        rope = _get(d, where, "rope_parameters", "rope_scaling", default={}) or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"config.json: text_config rope_parameters must be an object, got {rope!r}")
        _expect(rope.get("rope_type", rope.get("type", "default")), "default", "text_config rope_type")
        theta = d.get("rope_theta", rope.get("rope_theta"))
        if theta is None:
            raise ConfigError(
                "config.json: text_config is missing 'rope_theta' (or rope_parameters.rope_theta)"
            )
        hidden, heads = _count(d, where, "hidden_size"), _count(d, where, "num_attention_heads")
        if d.get("head_dim") is None and hidden < heads:  # the default head_dim, hidden // heads, would be 0
            raise ConfigError(
                f"config.json: text_config.hidden_size={hidden} is smaller than num_attention_heads={heads}"
            )
        cfg = cls(
            vocab_size=_count(d, where, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_count(d, where, "intermediate_size"),
            num_layers=_count(d, where, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=_count(d, where, "num_key_value_heads"),
            head_dim=_count(d, where, "head_dim", default=hidden // heads),
            rope_theta=_positive(theta, where, "rope_theta"),
            rms_norm_eps=_positive(_get(d, where, "rms_norm_eps"), where, "rms_norm_eps"),
            max_position_embeddings=_count(d, where, "max_position_embeddings"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
        )
        if cfg.num_heads % cfg.num_kv_heads:
            raise ConfigError(
                f"config.json: text_config.num_attention_heads {cfg.num_heads} is not a multiple of "
                f"num_key_value_heads {cfg.num_kv_heads}"
            )
        return cfg


@dataclass(frozen=True)
class AudioFlamingo3Config:
    """The whole model: encoder, projector and decoder, and the id of the `<sound>` placeholder token."""

    encoder: EncoderConfig
    decoder: DecoderConfig
    audio_token_id: int
    projector_bias: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "AudioFlamingo3Config":
        for section in ("audio_config", "text_config"):
            if not isinstance(d.get(section), dict):
                raise ConfigError(f"config.json: missing required section {section!r}")
        _expect(d.get("projector_hidden_act", "gelu"), "gelu", "projector_hidden_act")
        encoder = EncoderConfig.from_dict(d["audio_config"])
        decoder = DecoderConfig.from_dict(d["text_config"])
        audio_token_id = _count(d, "the top level", "audio_token_id", minimum=0)
        # An id past the embedding table would match no input token: the audio would silently go unused.
        if audio_token_id >= decoder.vocab_size:
            raise ConfigError(
                f"config.json: audio_token_id={audio_token_id} is outside the vocabulary "
                f"(text_config.vocab_size={decoder.vocab_size})"
            )
        return cls(
            encoder=encoder,
            decoder=decoder,
            audio_token_id=audio_token_id,
            projector_bias=bool(d.get("projector_bias", True)),
        )

    def to_dict(self) -> dict:
        """config.json as transformers 5 writes it for AudioFlamingo3Config: these values in its spellings,
        with its defaults for what minaf3 does not model (dropouts 0, initializer_range 0.02, no sliding
        window). from_dict(to_dict()) gives this config back."""
        enc, dec = self.encoder, self.decoder
        audio = {
            "activation_dropout": 0.0,
            "activation_function": "gelu",
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "hidden_size": enc.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": enc.intermediate_size,
            "layerdrop": 0.0,
            "max_source_positions": enc.max_source_positions,
            "model_type": "audioflamingo3_encoder",
            "num_attention_heads": enc.num_heads,
            "num_hidden_layers": enc.num_layers,
            "num_mel_bins": enc.num_mel_bins,
            "scale_embedding": False,
        }
        text = {
            "attention_dropout": 0.0,
            "bos_token_id": dec.bos_token_id,
            "eos_token_id": dec.eos_token_id,
            "hidden_act": "silu",
            "hidden_size": dec.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": dec.intermediate_size,
            "layer_types": ["full_attention"] * dec.num_layers,
            "max_position_embeddings": dec.max_position_embeddings,
            "max_window_layers": 28,
            "model_type": "qwen2",
            "num_attention_heads": dec.num_heads,
            "num_hidden_layers": dec.num_layers,
            "num_key_value_heads": dec.num_kv_heads,
            "pad_token_id": None,
            "rms_norm_eps": dec.rms_norm_eps,
            "rope_parameters": {"rope_theta": dec.rope_theta, "rope_type": "default"},
            "sliding_window": None,
            "tie_word_embeddings": False,
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": dec.vocab_size,
        }
        if dec.head_dim != dec.hidden_size // dec.num_heads:  # written only when it is not the default
            text["head_dim"] = dec.head_dim
        return {
            "architectures": ["AudioFlamingo3ForConditionalGeneration"],
            "audio_config": audio,
            "audio_token_id": self.audio_token_id,
            "dtype": "float32",
            "model_type": "audioflamingo3",
            "projector_bias": self.projector_bias,
            "projector_hidden_act": "gelu",
            "text_config": text,
        }

    @classmethod
    def from_file(cls, path: str | Path) -> "AudioFlamingo3Config":
        """Read `config.json` from a checkpoint folder or a file path."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: config.json not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)
