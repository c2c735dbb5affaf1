"""`generate`: the transformers-style entry point of text generation, on a static KV cache.

It checks the arguments (before any compute), resolves the settings (generation_config.json under the
call's arguments), embeds the prompt with its audio, sizes the cache, and runs decoding.py's loop: prefill
the prompt once, then one token per step, eager or as a compiled step (`compile=`).

Thread safety: the KV cache belongs to the model, so concurrent `generate` calls on one model are serialised
by a per-model lock (audio encoding and input checks run outside it). Use one model per thread for
parallelism.

Streaming: generate feeds each step's tokens to a `TextIteratorStreamer` (streamer.py).
"""

import threading
import weakref
from dataclasses import dataclass

import torch

from .decoding import MIN_COMPILED_SLOTS, compile_mode, decode_loop, decode_step, prefill
from .errors import GenerationError, InputError
from .kernels.registry import available
from .sampling import GenerationConfig
from .streamer import TextIteratorStreamer

__all__ = ["GenerationConfig", "GenerateOutput", "TextIteratorStreamer", "generate", "prefill"]

# Arguments the reference's generate accepts that change nothing here when left at these values.
_NEUTRAL_KWARGS = {
    "use_cache": True,
    "num_beams": 1,
    "num_return_sequences": 1,
    "output_scores": False,
    "output_attentions": False,
    "output_hidden_states": False,
}
# Inputs a processor may return, and the reference's stop-string tokenizer, that generation does not use.
_UNUSED_INPUTS = ("labels", "position_ids", "token_type_ids", "tokenizer")

_locks: "weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def model_lock(model: torch.nn.Module) -> threading.Lock:
    """The lock that serialises use of `model`'s KV cache, created on first use."""
    with _locks_guard:
        return _locks.setdefault(model, threading.Lock())


@dataclass
class GenerateOutput:
    """What generate returns with return_dict_in_generate=True.

    sequences: (B, T + n) prompt + new tokens.
    logits: with output_logits=True, one (B, V) float32 tensor per step: the raw logits each token was chosen
    from (before repetition penalty and the other processors), as the reference's `output.logits`.
    """

    sequences: torch.Tensor
    logits: tuple[torch.Tensor, ...] | None = None


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    input_features: torch.Tensor | None = None,
    input_features_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    min_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    streamer=None,
    generation_config: GenerationConfig | None = None,
    return_dict_in_generate: bool = False,
    output_logits: bool = False,
    compile: bool | str | None = None,
    **kwargs,
) -> torch.Tensor | GenerateOutput:
    """Generate continuations of a batch of prompts; the arguments mean what they mean in transformers.

    input_ids, attention_mask (B, T): the processor's output, padded on the left. input_features (W, 128, F),
    input_features_mask (W, F): the audio windows of all samples, when the prompts hold audio.
    Settings left at None come from `generation_config` (default: the model's, read from the checkpoint's
    generation_config.json). eos_token_id: one id or a list; a row stops at the first token from the list
    (pass [] to never stop early). generator: a torch.Generator on the model's device, for reproducible
    sampling. streamer: an object with put(token_ids) and end(), such as `TextIteratorStreamer`; it first
    receives the prompt (B, T), then each step's tokens (B,).

    compile: run each decode step as a torch.compile'd graph: True (the device's mode, see `compile_mode`),
    False (eager), a torch.compile mode name, or None (automatic: compiled on CUDA, eager on the CPU).

    Returns prompt + new tokens (B, T + n) long, or a `GenerateOutput` with return_dict_in_generate=True.
    Raises GenerationError for bad settings or a prompt + max_new_tokens beyond the model's context, and
    InputError for malformed inputs, both before any compute.
    """
    try:
        config = resolve_settings(model, generation_config, kwargs, dict(
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        ))  # fmt: skip
        check_generator(generator, model.device)
        input_ids, attention_mask = prompt_tensors(model, input_ids, attention_mask, config.max_new_tokens)
        if model.device.type == "cpu":
            # Resolve the CPU kernels now (built side by side on a machine's first use, with a notice): the
            # notice then comes before any streamed text, and a compiled step's trace finds them resolved.
            available()
        if streamer is not None:
            streamer.put(input_ids.cpu())
        with torch.inference_mode():
            if input_features is not None:
                input_features = input_features.to(model.device)
                input_features_mask = (
                    None if input_features_mask is None else input_features_mask.to(model.device)
                )
            embeds = model.embed_inputs(input_ids, input_features, input_features_mask)  # (B, T, D)
            mode = compile_mode(compile, model.device)
            with model_lock(model):
                new_tokens, logits = decode_with_cache(
                    model, input_ids, attention_mask, embeds, config, generator, streamer, output_logits, mode
                )
    except BaseException as error:
        # A consumer iterating over the streamer in another thread would otherwise wait forever.
        if streamer is not None and hasattr(streamer, "fail"):
            streamer.fail(error)
        raise
    if streamer is not None:
        streamer.end()
    sequences = torch.cat([input_ids, new_tokens], dim=1)  # (B, T) + (B, n) -> (B, T + n)
    if return_dict_in_generate:
        return GenerateOutput(sequences=sequences, logits=tuple(logits) if output_logits else None)
    return sequences


def resolve_settings(
    model, generation_config: GenerationConfig | None, kwargs: dict, overrides: dict
) -> GenerationConfig:
    """The call's settings: `overrides` (None leaves a setting alone) over `generation_config`, else the
    model's generation_config.json, else the defaults its config.json implies. Unknown kwargs are refused."""
    check_kwargs(kwargs)
    base = generation_config or model.generation_config or GenerationConfig.from_model_config(model.config)
    return base.replace(**overrides)


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and not isinstance(getattr(generator, "device", None), torch.device):
        raise GenerationError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator is not None and generator.device.type != device.type:
        raise GenerationError(f"generator is on {generator.device} but the model on {device}")


def prompt_tensors(
    model, input_ids, attention_mask: torch.Tensor | None, max_new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (B, T) on the model's device, checked (see check_inputs, check_length)."""
    if not isinstance(input_ids, torch.Tensor):
        raise InputError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
    device = model.device
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    decoder = model.config.decoder
    check_inputs(input_ids, attention_mask, decoder.vocab_size)
    check_length(input_ids.shape[1], max_new_tokens, decoder.max_position_embeddings)
    return input_ids, attention_mask


def decode_with_cache(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    embeds: torch.Tensor,
    config: GenerationConfig,
    generator: torch.Generator | None,
    streamer,
    keep_logits: bool,
    mode: str | None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """decode_loop on a KV cache sized for the call (or its compiled bucket); eager calls free it after."""
    decoder = model.config.decoder
    B, T = input_ids.shape
    slots = T + config.max_new_tokens
    if mode is not None:  # one graph per bucket of cache lengths, not per prompt length
        bucket = max(MIN_COMPILED_SLOTS, 1 << (slots - 1).bit_length())
        slots = min(bucket, decoder.max_position_embeddings)
    if model.language_model.cache_shape != (B, decoder.num_kv_heads, slots, decoder.head_dim):
        model.language_model.setup_cache(B, slots, model.dtype, model.device)
    try:
        return decode_loop(
            model, input_ids, attention_mask, embeds, config, generator, streamer, keep_logits,
            decode_step(mode, model.device),
        )  # fmt: skip
    finally:
        if mode is None:
            model.language_model.clear_cache()  # give the memory back between calls


def check_kwargs(kwargs: dict) -> None:
    """Accept the reference's arguments that are neutral here; refuse anything else by name."""
    for name, value in kwargs.items():
        if name in _UNUSED_INPUTS:
            continue
        if name in _NEUTRAL_KWARGS:
            if value != _NEUTRAL_KWARGS[name]:
                supported = _NEUTRAL_KWARGS[name]
                raise GenerationError(
                    f"{name}={value!r} is not supported (minaf3 generates with {supported!r})"
                )
            continue
        raise GenerationError(f"generate() got an unknown argument {name!r}")


def check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int) -> None:
    """Refuse inputs the loop cannot honour, naming the sample: wrong shapes, ids, or padding on the right."""
    if input_ids.ndim != 2 or input_ids.shape[1] == 0 or input_ids.dtype.is_floating_point:
        shape = tuple(input_ids.shape)
        raise InputError(
            f"input_ids must be integer ids of shape (batch, length), got {input_ids.dtype} {shape}"
        )
    if attention_mask.shape != input_ids.shape:
        raise InputError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}"
        )
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if bad.any():
        b, t = bad.nonzero()[0].tolist()
        raise InputError(
            f"sample {b}: token id {int(input_ids[b, t])} is outside the vocabulary (0..{vocab_size - 1})"
        )
    real_tokens, last_column = attention_mask.sum(-1).tolist(), attention_mask[:, -1].tolist()
    for b, (real, last) in enumerate(zip(real_tokens, last_column, strict=True)):
        if real == 0:
            raise InputError(f"sample {b}: attention_mask holds no real token")
        if last == 0:
            raise InputError(
                f"sample {b}: the prompt ends in padding; generation needs left padding (padding_side='left')"
            )


def check_length(prompt_length: int, max_new_tokens: int, max_positions: int) -> None:
    if prompt_length + max_new_tokens > max_positions:
        raise GenerationError(
            f"prompt of {prompt_length} tokens + max_new_tokens={max_new_tokens} = "
            f"{prompt_length + max_new_tokens} exceeds the model's context of {max_positions} positions "
            "(max_position_embeddings in config.json); shorten the prompt or lower max_new_tokens"
        )
