"""Text generation with a static KV cache: prefill the prompt once, then decode one token per step.

    inputs_embeds (B, T, D)  the prompt, audio already in place, left-padded
      prefill                -> logits (B, V) of the last prompt position; cache slots 0..T-1 filled
      loop: choose_tokens                   -> tokens (B,)     (sampling.py)
            decode_one_token(tokens at slot T + i)      -> logits (B, V)
    -> prompt + new tokens (B, T + n): n = the longest row's new tokens; stopped rows padded with pad_token_id

Position bookkeeping lives here, not in the decoder. A row with p padding tokens on the left holds its
token t in cache slot t but at RoPE position t - p, so it gets exactly the positions it would have alone;
its generated tokens go to slots T, T + 1, ... at positions T - p, T - p + 1, .... The key mask over the
S = T + max_new_tokens slots is the prompt's attention mask followed by ones; slots not yet written are
hidden by causality (query slot i sees key slots <= i).

Nothing grows in the loop: the cache, the key mask, the output ids and the repetition table are allocated
once. The only host synchronisation per step is the stop check (and the streamer, which needs the tokens).

Thread safety: the KV cache belongs to the model, so concurrent `generate` calls on one model are serialised
by a per-model lock (audio encoding and input checks run outside it). Use one model per thread for
parallelism.

Streaming: generate feeds each step's tokens to a `TextIteratorStreamer` (streamer.py).
"""

import contextlib
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import GenerationError, InputError
from .kernels.registry import available
from .sampling import GenerationConfig, choose_tokens, mark_seen_, seen_tokens
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

# torch.compile modes the decode step accepts; see `compile_mode`.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Compiled decoding rounds the cache length up to a power of two, at least this: each length is a graph of its
# own (a minute to compile for 28 layers on a CPU), so prompts from 1 to 16k tokens share at most 7 graphs.
# The extra slots are never attended to (causality hides slots past the current one); attention reads them,
# which at batch 1 costs little next to reading the weights.
MIN_COMPILED_SLOTS = 256
_compiled: dict[tuple[str, str], Callable] = {}

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


def prefill(
    model,
    inputs_embeds: torch.Tensor,
    positions: torch.Tensor,
    key_mask: torch.Tensor,
    input_pos: torch.Tensor,
) -> torch.Tensor:
    """Run the prompt through the decoder, filling cache slots `input_pos`; logits (B, V) float32 of its last
    position only (the lm_head over every prompt position would cost T times as much and be thrown away).

    inputs_embeds (B, T, D); positions (B, T) RoPE positions; key_mask (B, S) bool; input_pos (T,) slots.
    """
    hidden = model.language_model(inputs_embeds, positions, key_mask, input_pos)  # (B, T, D)
    return model.lm_head(hidden[:, -1]).float()  # (B, D) -> (B, V)


def decode_one_token(
    model, tokens: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor, input_pos: torch.Tensor
) -> torch.Tensor:
    """tokens (B, 1) at RoPE positions (B, 1), written to cache slot input_pos (1,) -> logits (B, V) f32."""
    embeds = model.language_model.embed_tokens(tokens)  # (B, 1, D)
    hidden = model.language_model(embeds, positions, key_mask, input_pos)  # (B, 1, D)
    return model.lm_head(hidden[:, -1]).float()


def compile_mode(compile: bool | str | None, device: torch.device) -> str | None:
    """The torch.compile mode of the decode step, or None for eager (see `generate`'s `compile`).

    CUDA: "reduce-overhead", which replays the whole step as one CUDA graph: at batch 1 the step is a few
    hundred small kernels whose launch cost would otherwise exceed their run time. CPU: inductor's default
    mode (generated C++ for the element-wise work between the matrix products).
    """
    if compile is None:
        compile = device.type == "cuda"
    if compile is False:
        return None
    if compile is True:
        return "reduce-overhead" if device.type == "cuda" else "default"
    if compile not in COMPILE_MODES:
        raise GenerationError(f"compile={compile!r}: expected True, False, None or one of {COMPILE_MODES}")
    return compile


def decode_step(mode: str | None, device: torch.device) -> Callable:
    """decode_one_token, or its torch.compile'd form in `mode`, for one generate call.

    Static shapes: the cache length is fixed for a whole call (and bucketed across calls), so each (model,
    batch size, bucket) gets one specialised graph. Three CPU settings, each measured on tools/bench.py's rows
    1 and 3: the graph's wrapper is C++ (its Python form spends more time allocating and checking buffers
    than a small model's kernels run); every intermediate vector is materialised (realize_opcount_threshold
    0), where by default inductor recomputes an RMSNorm or SiLU output inside the loop that streams the next
    weight matrix, once per output row, which halved the bandwidth of the one-row products; and loops of
    under 64k elements per thread run on one thread (the default 512 split vectors of a few thousand
    elements across threads, whose synchronisation costs more than the work: 7-15% of a step).
    """
    if mode is None:
        return decode_one_token
    key = (mode, device.type)
    if key not in _compiled:
        options = torch._inductor.list_mode_options(mode)
        if device.type == "cpu":
            options.update(
                {"cpp_wrapper": True, "realize_opcount_threshold": 0, "cpp.min_chunk_size": 1 << 16}
            )
        _compiled[key] = torch.compile(decode_one_token, dynamic=False, fullgraph=True, options=options)
    return _compiled[key]


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


@dataclass
class Schedule:
    """Where every token of one call goes: prompt positions (B, T), each new token's positions (B, N) and
    cache slot (N,), and the key mask over all S slots (B, S): the prompt's mask, then ones."""

    prompt_positions: torch.Tensor
    prompt_slots: torch.Tensor
    step_positions: tuple[torch.Tensor, ...]  # N x (B, 1)
    step_slots: tuple[torch.Tensor, ...]  # N x (1,)
    key_mask: torch.Tensor

    @classmethod
    def plan(cls, attention_mask: torch.Tensor, new_tokens: int, slots: int) -> "Schedule":
        B, T = attention_mask.shape
        mask = attention_mask.bool()
        # RoPE positions: each row counts only its real tokens (left padding gets position 0, masked anyway).
        prompt_positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)  # (B, T)
        new_positions = mask.sum(-1, keepdim=True) + torch.arange(new_tokens, device=mask.device)  # (B, N)
        slot = torch.arange(slots, device=mask.device)  # cache slot of every prompt and generated token
        key_mask = torch.cat([mask, mask.new_ones(B, slots - T)], dim=1)  # (B, S)
        # Each step's inputs as views made up front: slicing costs microseconds per call, and a small
        # model's whole compiled step takes about a millisecond.
        return cls(
            prompt_positions,
            slot[:T],
            new_positions.split(1, dim=1),
            slot[T : T + new_tokens].split(1),
            key_mask,
        )


class Stopping:
    """Which rows still run: a row stops at its first eos token and emits padding from then on, as in the
    reference (pad_token_id, else the first eos). Without eos ids no row stops early."""

    def __init__(self, config: GenerationConfig, batch: int, device: torch.device):
        ids = config.eos_token_id
        self.eos = torch.tensor(ids, dtype=torch.long, device=device) if ids else None
        self.pad = config.pad_token_id if config.pad_token_id is not None else (ids or (0,))[0]
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)

    def apply(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) with stopped rows replaced by padding; marks rows that emit eos as stopped."""
        if self.eos is None:
            return tokens
        tokens = torch.where(self.unfinished, tokens, self.pad)
        self.unfinished &= ~torch.isin(tokens, self.eos)
        return tokens


def decode_loop(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    embeds: torch.Tensor,
    config: GenerationConfig,
    generator: torch.Generator | None,
    streamer,
    keep_logits: bool,
    step_fn: Callable = decode_one_token,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill, then choose and decode tokens until every row has stopped or max_new_tokens are out.

    Needs the cache set up for S >= T + max_new_tokens slots. Returns the new tokens (B, n) and, when
    keep_logits, each step's raw logits (B, V). step_fn: decode_one_token or its compiled form.
    """
    N = config.max_new_tokens
    plan = Schedule.plan(attention_mask, N, model.language_model.cache_shape[2])
    stopping = Stopping(config, input_ids.shape[0], input_ids.device)
    vocab_size = model.lm_head.out_features
    seen = seen_tokens(input_ids, attention_mask, vocab_size) if config.repetition_penalty != 1.0 else None
    chosen: list[torch.Tensor] = []  # each step's (B,) tokens, stacked once at the end
    kept: list[torch.Tensor] = []
    logits = prefill(model, embeds, plan.prompt_positions, plan.key_mask, plan.prompt_slots)
    with contextlib.ExitStack() as guards:
        for step in range(N):
            if keep_logits:  # a CUDA graph overwrites its output at the next step: keep a copy
                kept.append(logits if step_fn is decode_one_token else logits.clone())
            tokens = stopping.apply(
                choose_tokens(logits, config, seen, step, stopping.eos, generator)
            )  # (B,)
            chosen.append(tokens)
            if seen is not None:
                mark_seen_(seen, tokens)
            if streamer is not None:
                streamer.put(tokens.cpu())
            if not should_continue(logits, stopping, step, N):
                break
            logits = step_fn(
                model, tokens[:, None], plan.step_positions[step], plan.key_mask, plan.step_slots[step]
            )
            if step == 0 and step_fn is not decode_one_token:
                # torch.compile re-checks every model parameter before each call (~0.3 ms for 28 layers).
                # Nothing those guards check changes within this loop (the model is locked, every step has
                # the first step's shapes), so the first call's check covers the rest. The stance is
                # process-wide, so it is held for this loop only; entering it costs ~60 us, so only once.
                guards.enter_context(torch.compiler.set_stance("default", skip_guard_eval_unsafe=True))
    return torch.stack(chosen, dim=1), kept  # (B, n)


def should_continue(logits: torch.Tensor, stopping: Stopping, step: int, max_new_tokens: int) -> bool:
    """The one host synchronisation per step: whether any row runs on, and whether these logits held a NaN
    (corrupt weights, fp16 overflow), which would otherwise be decoded as token 0 without a word."""
    running, has_nan = torch.stack((stopping.unfinished.any(), torch.isnan(logits).any())).tolist()
    if has_nan:
        raise GenerationError(f"the model produced NaN logits at generation step {step}")
    return running and step + 1 < max_new_tokens


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
