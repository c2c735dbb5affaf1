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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .config import AudioFlamingo3Config
from .decoder import Qwen2Decoder, RMSNorm
from .dtypes import resolve_dtype
from .encoder import WhisperEncoder, sinusoids
from .errors import CheckpointError, ConfigError, InputError
from .estimate import weights_dtype
from .linear import Linear, fused_groups, join_parts
from .lora import load_adapter
from .loss import lm_loss
from .quantize import (
    QUANTIZED_LAYERS,
    check_mode,
    quantizable_linears,
    quantize_layers,
    quantize_model,
    quantize_state_dict,
    widen_unquantized_,
)
from .sampling import GenerationConfig
from .weights.adapter import LoraSettings, check_adapter_folder
from .weights.buffers import read_ahead
from .weights.hub import model_folder
from .weights.layouts import HUB, checkpoint_names
from .weights.loader import DOWNLOAD_HINT, read_checkpoint
from .windows import audio_token_lengths, frames_needed

# Encoder windows batched together may be padded by up to this fraction of their own length: batching saves
# per-call overhead (GPU launches), padding costs attention and matrix products in proportion.
GROUP_SLACK = 0.25
THINK_FOLDER = "think"  # the AF-Think LoRA adapter's subfolder in the hub checkpoint
INIT_STD = 0.02  # the std of linear, convolution and embedding weights at init: AF3's initializer_range


@dataclass
class CausalLMOutput:
    """logits (B, T, vocab) in the model's dtype (None when only the loss was asked for); loss: mean
    next-token cross-entropy over the labelled positions (labels given)."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None


class Projector(nn.Module):
    """linear_1 -> GELU -> linear_2: encoder width to decoder width."""

    def __init__(self, audio_hidden: int, text_hidden: int, bias: bool):
        super().__init__()
        self.linear_1 = Linear(audio_hidden, text_hidden, bias=bias)
        self.linear_2 = Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


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
        self.lm_head = Linear(dec.hidden_size, dec.vocab_size, bias=False)
        self.generation_config = None  # set by from_pretrained from generation_config.json
        # Encode only the frames that hold audio (plus the convolutions' margin) rather than 30 s per window.
        self.crop_audio_padding = True

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (a quantized lm_head keeps int8 or int4 weights: not this)."""
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
        return_logits: bool | None = None,
        **unused,
    ) -> CausalLMOutput:
        """Logits for every position (or the last `logits_to_keep`), and the loss when labels are given.

        labels (B, T): the token each position should hold, IGNORE_INDEX (-100) where nothing is learned;
        position t is scored on predicting labels[t + 1]. The loss computes logits at the labelled positions
        only (`lm_loss`), so with labels the logits are None unless return_logits=True asks for them too.
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
        loss = None if labels is None else lm_loss(hidden, self.lm_head, labels)
        logits = None
        if return_logits or (return_logits is None and labels is None):
            logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return CausalLMOutput(logits=logits, loss=loss)

    def generate(self, *args, **kwargs) -> torch.Tensor:
        """Prompt + new tokens (B, T + n); see `minaf3.generate.generate` for the arguments."""
        from .generate import generate

        return generate(self, *args, **kwargs)

    # ---- initialisation and saving ---------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> "AudioFlamingo3ForConditionalGeneration":
        """Fill every weight as the architecture starts training: linear, convolution and embedding weights
        normal with std INIT_STD, biases zero, norms one, and the encoder's positions Whisper's sinusoids.

        Draws come from a generator seeded with `seed`, in module order, so a seed always gives the same
        model. The constructor leaves the weights unset (torch.empty), which from_pretrained overwrites.
        Returns the model.
        """
        generator = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv1d | nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * INIT_STD)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm | RMSNorm):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        positions = self.audio_tower.embed_positions.weight
        positions.copy_(sinusoids(*positions.shape))
        return self

    def save_pretrained(self, path: str | Path) -> Path:
        """Write config.json, model.safetensors (hub tensor names, float32 or the model's dtype) and, when the
        model has one, generation_config.json into folder `path`: what from_pretrained and transformers read.

        The processor's files are `AudioFlamingo3Processor.save_pretrained`'s. Returns the folder.
        """
        if any(isinstance(m, QUANTIZED_LAYERS) for m in self.modules()):
            raise ConfigError(
                "save_pretrained: a quantized model has no hub layout; save it before quantizing"
            )
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()  # the checkpoint's names: fused layers speak their parts' names
        names = checkpoint_names(HUB, state)
        # Fused layers' parts are views of one tensor: safetensors stores tensors that share no memory.
        tensors = {names[name]: tensor.detach().clone().contiguous() for name, tensor in state.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = self.config.to_dict() | {"dtype": str(self.dtype).removeprefix("torch.")}
        _write_json(folder / "config.json", config)
        if self.generation_config is not None:
            settings = asdict(self.generation_config)
            settings["eos_token_id"] = list(settings["eos_token_id"])
            _write_json(folder / "generation_config.json", settings)
        return folder

    # ---- adapters and loading --------------------------------------------------------------------------
    def load_adapter(self, path: str | Path, merge: bool = True) -> LoraSettings:
        """Apply the LoRA adapter in folder `path` (AF-Think: `<checkpoint>/think`); see minaf3.lora.

        Returns the adapter's LoraSettings. A quantized weight cannot take the update: load adapters first.
        """
        if any(isinstance(m, QUANTIZED_LAYERS) for m in self.language_model.modules()):
            raise ConfigError(
                "load the adapter before quantizing: a quantized weight cannot take the LoRA update"
            )
        return load_adapter(self, path, merge=merge)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | str | None = None,
        device_map: str | torch.device | None = None,
        quantize: str | None = None,
        think: bool = False,
        revision: str | None = None,
        adapter: str | Path | None = None,
        merge_adapter: bool = True,
    ) -> "AudioFlamingo3ForConditionalGeneration":
        """Load a checkpoint folder in any of the three layouts (see weights/layouts.py), or a hub model id
        (`nvidia/audio-flamingo-3-hf`, at `revision`: weights/hub.py).

        device_map: None or "cpu", "cuda", "auto" (CUDA when available) or a torch.device.
        dtype: None (minaf3 chooses: dtypes.py), "auto" (the checkpoint's), or a dtype or its name; weights
        that cannot fit in a dtype asked for are a ConfigError before anything is read (estimate.py).
        The model is built on the meta device and the checkpoint's tensors are assigned as they are read, so
        no second copy of the weights is ever made: q/k/v and gate/up are concatenated into their fused
        layers one group at a time.
        think: also apply the AF-Think LoRA adapter of `<path>/think`, merged into the weights.
        adapter: instead, the LoRA adapter in this folder (PEFT's format; see minaf3.lora), merged into the
        weights unless merge_adapter=False (then added on every call, and quantize must be None).
        quantize: None, "int8" or "int4": weight-only decoder and lm_head (minaf3.quantize), quantized from
        the tensors as stored (a bf16 checkpoint loaded in float32 never holds its decoder in float32), or
        with an adapter, after it is merged in the model's dtype.
        """
        check_mode(quantize)
        path = model_folder(path, revision)
        adapter = chosen_adapter(path, think, adapter, quantize, merge_adapter)
        config = AudioFlamingo3Config.from_file(path)
        device = resolve_device(device_map)
        # With an adapter the weights are merged in the model's dtype first, then quantized.
        quantize_on_read = quantize if adapter is None else None
        dtype = weights_dtype(
            path, resolve_dtype(dtype, device, path), device, quantize_on_read, dtype is None
        )
        # Every small file is read and checked before the first tensor, so a bad one fails fast.
        generation_config = GenerationConfig.from_pretrained(path, config)
        with torch.device("meta"):
            model = cls(config)
        tensors = read_weights(model, path, dtype, device, quantize_on_read)
        model.load_state_dict(tensors, strict=True, assign=True)
        del tensors  # the model holds the only references now
        model.language_model.reset_buffers(device)
        # Decoding reads one row of the embedding per token. Where the table is a view of the file, each
        # row would be a page fault, a disk read once the file has left the page cache: read it ahead now.
        read_ahead(model.language_model.embed_tokens.weight)
        model.generation_config = generation_config
        if adapter is not None:
            model.load_adapter(adapter, merge=merge_adapter)
        if quantize is not None and adapter is not None:
            quantize_model(model, quantize)
        if quantize_on_read is not None and dtype == torch.float32:
            widen_unquantized_(model, dtype)  # what stays floating point, read as stored
        return model.eval()


def chosen_adapter(
    path: Path, think: bool, adapter: str | Path | None, quantize: str | None, merge: bool
) -> Path | None:
    """The adapter folder from_pretrained applies (think/ or `adapter`), checked before any weight is read;
    CheckpointError or ConfigError for a missing folder or options that do not go together."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder not found. {DOWNLOAD_HINT}")
    if think and adapter is not None:
        raise ConfigError(f"think=True applies {THINK_FOLDER}/; give it or adapter={adapter!r}, not both")
    if think and not (path / THINK_FOLDER).is_dir():
        raise CheckpointError(f"{path}: think=True but the folder has no {THINK_FOLDER}/ adapter")
    adapter = path / THINK_FOLDER if think else adapter
    if adapter is not None:
        check_adapter_folder(adapter)  # its config, before a single weight is read
        if quantize is not None and not merge:
            raise ConfigError("an unmerged adapter needs the float weights: merge it, or do not quantize")
    return None if adapter is None else Path(adapter)


def read_weights(
    model: nn.Module, path: Path, dtype: torch.dtype, device: torch.device, quantize: str | None
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in the form `model`'s load_state_dict takes: fused layers concatenated,
    and with `quantize`, the decoder's and lm_head's weights quantized (and `model`'s layers swapped for
    empty quantized ones to receive them).

    To be quantized, weights are read as stored (on the CPU, views of the file) and converted one at a
    time; reading them in float32 first would hold the whole decoder in float32 at once (33 GB for AF3).
    """
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}  # the checkpoint's names
    as_stored = quantize is not None and dtype == torch.float32
    tensors = read_checkpoint(path, expected, dtype=None if as_stored else dtype, device=device)
    groups = fused_groups(model)
    if quantize is not None:
        quantized = quantizable_linears(model)
        parts = [part for name in quantized for part in groups.get(name, [name])]
        quantize_layers(model, quantized, quantize)  # empty quantized layers; checks them before any work
        quantize_state_dict(tensors, parts, quantize)
    join_parts(tensors, groups)
    return tensors


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


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
