"""Audio Flamingo 3: Whisper encoder -> MLP projector -> Qwen2 decoder -> logits.

    input_features (W, 128, 3000)  one log-mel window per row, all samples' windows concatenated
      audio_tower            -> (W, 750, 1280)  pooled encoder frames (only the first K per window are audio)
      multi_modal_projector  -> (N, 3584)       the N = sum(K) real frames, in order
    input_ids (B, T)         -> embed_tokens -> (B, T, 3584); the N `<sound>` rows are replaced, in order
      language_model         -> (B, T, 3584)
      lm_head                -> logits (B, T, vocab)

Parameter names follow this tree, so `language_model.layers.3.self_attn.q_proj.weight` is a path into the
model; the checkpoint's own names are mapped once, in weights/.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import AudioFlamingo3Config
from .decoder import Qwen2Decoder
from .encoder import WhisperEncoder
from .errors import CheckpointError, ConfigError, InputError
from .linear import cpu_has_native_bf16, linear
from .weights.adapter import LoraSettings
from .windows import audio_token_lengths, frames_needed

# Encoder windows batched together may be padded by up to this fraction of their own length: batching saves
# per-call overhead (GPU launches), padding costs attention and matrix products in proportion.
GROUP_SLACK = 0.25
THINK_FOLDER = "think"  # the AF-Think LoRA adapter's subfolder in the hub checkpoint
DOWNLOAD_HINT = (
    "Download the official checkpoint with `huggingface-cli download nvidia/audio-flamingo-3-hf "
    "--local-dir audio-flamingo-3-hf` and pass that folder."
)


@dataclass
class CausalLMOutput:
    """logits (B, T, vocab) in the model's dtype; loss: mean next-token cross-entropy (labels given)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class Projector(nn.Module):
    """linear_1 -> GELU -> linear_2: encoder width to decoder width."""

    def __init__(self, audio_hidden: int, text_hidden: int, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(audio_hidden, text_hidden, bias=bias)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.linear_2, F.gelu(linear(self.linear_1, x)))


def length_groups(mel_lengths: list[int], slack: float = GROUP_SLACK) -> list[list[int]]:
    """Windows to encode together: indices grouped so that no window is padded by more than `slack` of its
    own length (the group runs at its longest member's length). Full windows form one group; each sample's
    short tail joins the tails of similar length, so a batch of short clips is still one batch."""
    order = sorted(range(len(mel_lengths)), key=lambda i: -mel_lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and mel_lengths[groups[-1][0]] <= (1 + slack) * mel_lengths[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class AudioFlamingo3ForConditionalGeneration(nn.Module):
    def __init__(self, config: AudioFlamingo3Config):
        super().__init__()
        self.config = config
        enc, dec = config.encoder, config.decoder
        self.audio_tower = WhisperEncoder(enc)
        self.multi_modal_projector = Projector(enc.hidden_size, dec.hidden_size, config.projector_bias)
        self.language_model = Qwen2Decoder(dec)
        self.lm_head = nn.Linear(dec.hidden_size, dec.vocab_size, bias=False)
        self.generation_config = None  # set by from_pretrained from generation_config.json
        # Encode only the frames that hold audio (plus the convolutions' margin) rather than 30 s per window.
        self.crop_audio_padding = True

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (an int8-quantized lm_head keeps int8 weights: not this)."""
        return self.language_model.embed_tokens.weight.dtype

    # ---- audio ------------------------------------------------------------------------------------------
    def get_audio_features(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor
    ) -> torch.Tensor:
        """input_features (W, 128, F), input_features_mask (W, F) -> audio embeddings (N, D_text).

        N is the sum over windows of their audio tokens; rows are in window order, then time order.
        """
        mel_lengths = input_features_mask.sum(-1).long()
        tokens = audio_token_lengths(mel_lengths)
        num_frames = input_features.shape[-1]
        out = [None] * len(mel_lengths)
        features = input_features.to(self.dtype)
        if self.crop_audio_padding:
            groups = length_groups(mel_lengths.tolist())
        else:
            groups = [list(range(len(mel_lengths)))]
        for group in groups:
            group = torch.tensor(group, device=mel_lengths.device)
            crop = frames_needed(mel_lengths[group], num_frames) if self.crop_audio_padding else num_frames
            hidden = self.audio_tower(features[group, :, :crop], mel_lengths[group])  # (w, crop / 4, H)
            for i, h in zip(group.tolist(), hidden, strict=True):
                out[i] = h[: tokens[i]]
        return self.multi_modal_projector(torch.cat(out))  # (N, D_text)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings (B, T, D) with the `<sound>` rows replaced by audio embeddings, in order."""
        embeds = self.language_model.embed_tokens(input_ids)
        is_audio = input_ids == self.config.audio_token_id  # (B, T)
        if input_features is None:
            if is_audio.any():
                raise InputError(
                    f"input_ids hold {int(is_audio.sum())} audio placeholder token(s) "
                    "but no input_features were given"
                )
            return embeds
        if input_features_mask is None:
            raise InputError("input_features were given without input_features_mask")
        audio = self.get_audio_features(input_features, input_features_mask)
        if audio.shape[0] != int(is_audio.sum()):
            per_sample = is_audio.sum(-1).tolist()
            per_window = audio_token_lengths(input_features_mask.sum(-1).long()).tolist()
            raise InputError(
                f"audio placeholders and audio frames do not match: placeholders per sample {per_sample} "
                f"({sum(per_sample)} in all), audio frames per window {per_window} ({audio.shape[0]} in all)"
            )
        return embeds.masked_scatter(is_audio[..., None], audio.to(embeds.dtype))

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **unused,
    ) -> CausalLMOutput:
        """Logits for every position (or the last `logits_to_keep`), and the loss when labels are given.

        As in the reference, positions default to 0..T-1 for every row; pass `position_ids` for left-padded
        batches to give each row the positions it would have alone (generate does).
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise InputError("forward needs input_ids or inputs_embeds")
            inputs_embeds = self.embed_inputs(input_ids, input_features, input_features_mask)
        B, T, _ = inputs_embeds.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=inputs_embeds.device).expand(B, T)
        key_mask = None if attention_mask is None else attention_mask.bool()
        hidden = self.language_model(inputs_embeds, position_ids, key_mask)
        logits = linear(self.lm_head, hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return CausalLMOutput(logits=logits, loss=loss)

    def generate(self, *args, **kwargs) -> torch.Tensor:
        """Prompt + new tokens (B, T + n); see `minaf3.generate.generate` for the arguments."""
        from .generate import generate

        return generate(self, *args, **kwargs)

    # ---- speed and adapters -----------------------------------------------------------------------------
    def fuse_projections(self) -> int:
        """Fuse each decoder layer's q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (see decoder.py).

        generate calls this before decoding, so the fused layers hold the final weights: an adapter merged
        after loading (lora.load_adapter) is already in them. Layers wrapped by LoRA or quantized stay as
        they are. Idempotent; returns the number of groups fused by this call.
        """
        return self.language_model.fuse_projections()

    def load_adapter(self, path: str | Path, merge: bool = True) -> LoraSettings:
        """Apply the LoRA adapter in folder `path` (AF-Think: `<checkpoint>/think`); see minaf3.lora.

        The adapter names its targets by the checkpoint's module names, so fused projections are split back
        first; generate fuses again whatever plain layers remain. Returns the adapter's LoraSettings.
        """
        from .lora import load_adapter
        from .quantize import Int8Linear

        if any(isinstance(m, Int8Linear) for m in self.language_model.modules()):
            raise ConfigError(
                "load the adapter before quantizing: an int8 weight cannot take the LoRA update"
            )
        self.language_model.unfuse_projections()
        return load_adapter(self, path, merge=merge)

    # ---- loading ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | str | None = None,
        device_map: str | torch.device | None = None,
        quantize: str | None = None,
        think: bool = False,
    ) -> "AudioFlamingo3ForConditionalGeneration":
        """Load a checkpoint folder in any of the three layouts (see weights/layouts.py).

        device_map: None or "cpu", "cuda", "auto" (CUDA when available) or a torch.device.
        dtype: default (None) the checkpoint's dtype on CUDA; on CPU the checkpoint's bf16 where the CPU has
        bf16 instructions (AVX-512 BF16, AMX), else float32 (emulated bf16 products are several times
        slower than fp32), or the checkpoint's bf16 when float32 weights would not fit (with a warning;
        weights that cannot fit in a dtype asked for are a ConfigError: estimate.weights_dtype); "auto" the
        checkpoint's dtype everywhere. The model is built on the meta device and the tensors are assigned as
        they are read, so no second copy of the weights is ever made.
        think: also apply the AF-Think LoRA adapter of `<path>/think`, merged into the weights.
        quantize: None or "int8": int8 weight-only decoder and lm_head (minaf3.quantize), done last so that
        the int8 weights hold the merged adapter; without an adapter, quantized from the tensors as stored.
        """
        from .estimate import weights_dtype
        from .generate import GenerationConfig
        from .weights.loader import read_checkpoint

        if quantize is not None:
            # Imported only when asked for: the int8 kernels' module pulls in torch's compiler (~1.4 s).
            from .quantize import QUANTIZE_MODES, quantize_model, widen_unquantized_

            if quantize not in QUANTIZE_MODES:
                raise ConfigError(f"quantize={quantize!r}: expected None or one of {list(QUANTIZE_MODES)}")
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint folder not found. {DOWNLOAD_HINT}")
        if think and not (path / THINK_FOLDER).is_dir():
            raise CheckpointError(f"{path}: think=True but the folder has no {THINK_FOLDER}/ adapter")
        config = AudioFlamingo3Config.from_file(path)
        device = resolve_device(device_map)
        automatic = dtype is None
        # With an adapter the whole model is widened before it is quantized (see read_as_stored below).
        peak_quantize = None if think else quantize
        dtype = weights_dtype(path, resolve_dtype(dtype, device, path), device, peak_quantize, automatic)
        with torch.device("meta"):
            model = cls(config)
        # Every small file is read and checked before the first tensor, so a bad one fails fast.
        generation_config = GenerationConfig.from_pretrained(path, config)
        expected = {name: t.shape for name, t in model.state_dict().items()}
        # int8 in float32 (the default on CPUs without bf16 instructions): read the tensors as stored (on the
        # CPU, views of the file), quantize, then widen what stays floating point. Widening first would hold
        # the whole model in float32 at once, 33 GB for the 7B decoder; widening is exact, so the numbers
        # are the same. With an adapter the weights are widened first: the merge is done in float32.
        read_as_stored = quantize is not None and dtype == torch.float32 and not think
        tensors = read_checkpoint(path, expected, dtype=None if read_as_stored else dtype, device=device)
        model.load_state_dict(tensors, strict=True, assign=True)
        del tensors  # the model holds the only references now: quantizing can free each weight it replaces
        model.language_model.reset_buffers(device)
        model.generation_config = generation_config
        if think:
            model.load_adapter(path / THINK_FOLDER, merge=True)
        if quantize is not None:
            quantize_model(model, quantize)
        if read_as_stored:
            widen_unquantized_(model, dtype)
        return model.eval()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t + 1 from position t, over labels != -100."""
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]  # shift left; the last position predicts nothing
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten().to(logits.device), ignore_index=-100
    )


def resolve_device(device_map: str | torch.device | None) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"device_map={device_map!r}: expected 'auto', 'cpu', 'cuda' or a torch.device"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device_map={device_map!r}: CUDA is not available on this machine")
    return device


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device, path: Path) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(f"dtype={dtype}: expected one of {sorted(_DTYPES)}")
        return dtype
    if dtype not in (None, "auto") and dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r}: expected 'auto' or one of {sorted(_DTYPES)}")
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    config = json.loads((path / "config.json").read_text())
    saved = _DTYPES.get(config.get("dtype") or config.get("torch_dtype"), torch.float32)  # 5.x or 4.x key
    if device.type == "cuda" or dtype == "auto":
        return saved
    # CPU default: bf16 checkpoints stay bf16 only where the CPU multiplies bf16 natively (half the memory
    # and faster than fp32 there); elsewhere bf16 and fp16 products are emulated, several times slower.
    return saved if saved == torch.bfloat16 and cpu_has_native_bf16() else torch.float32
