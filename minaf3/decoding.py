"""The decoding loop: prefill the prompt once, then one token per step, on a static KV cache.

    inputs_embeds (B, T, D)  the prompt, audio already in place, left-padded
      prefill                -> logits (B, V) of the last prompt position; cache slots 0..T-1 filled
      loop: choose_tokens                   -> tokens (B,)     (sampling.py)
            decode_one_token(tokens at slot T + i)      -> logits (B, V)
    -> new tokens (B, n): n = the longest row's new tokens; stopped rows padded with pad_token_id

Position bookkeeping lives here, not in the decoder (`Schedule`). A row with p padding tokens on the left
holds its token t in cache slot t but at RoPE position t - p, so it gets exactly the positions it would have
alone; its generated tokens go to slots T, T + 1, ... at positions T - p, T - p + 1, .... The key mask over
the S >= T + max_new_tokens slots is the prompt's attention mask followed by ones; slots not yet written are
hidden by causality (query slot i sees key slots <= i).

Nothing grows in the loop: the cache, the key mask, the output ids and the repetition table are allocated
once. The only host synchronisation per step is the stop check (and the streamer, which needs the tokens).
The step may run as a torch.compile'd graph (`decode_step`); generate.py chooses, and sizes the cache. On
the CPU, steps after the first call that graph directly (`DirectStep`).
"""

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import GenerationError
from .sampling import GenerationConfig, choose_tokens, mark_seen_, seen_tokens

# torch.compile modes the decode step accepts; see `compile_mode`.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Compiled decoding rounds the cache length up to a power of two, at least this: each length is a graph of its
# own (a minute to compile for 28 layers on a CPU), so prompts from 1 to 16k tokens share at most 7 graphs.
# The extra slots are never attended to (causality hides slots past the current one); attention reads them,
# which at batch 1 costs little next to reading the weights.
MIN_COMPILED_SLOTS = 256
_compiled: dict[tuple[str, str], Callable] = {}
# The graph a compiled CPU step ran last in this thread and the inputs it got (see DirectStep).
_last_graph = threading.local()


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
            # inductor as torch.compile runs it, its graph noted for DirectStep
            compiled = dict(backend=noting_inductor(options))
        else:  # CUDA: "reduce-overhead" replays CUDA graphs, which torch.compile's own backend manages
            compiled = dict(options=options)
        _compiled[key] = torch.compile(decode_one_token, dynamic=False, fullgraph=True, **compiled)
    return _compiled[key]


def noting_inductor(options: dict) -> Callable:
    """torch.compile's backend: inductor with `options` (what torch.compile(options=...) runs), its compiled
    graph noting each call and its inputs in this thread's _last_graph, for DirectStep."""
    from torch._inductor.compile_fx import compile_fx

    def backend(graph_module, example_inputs):
        graph = compile_fx(graph_module, example_inputs, config_patches=options)

        def run(*inputs):
            _last_graph.call = graph, inputs
            return graph(*inputs)

        return run

    return backend


class DirectStep:
    """A compiled decode step called without torch.compile's work around each call.

    Around a small model's step (about a millisecond) that work is a sixth of it: checking the graph's
    guards, gathering its inputs (~10 tensors a layer, read through the model's modules) and its runtime
    wrapper. The first step of a loop runs through torch.compile, whose guards are checked in full and
    choose the graph; `after_first` takes that graph and its inputs, and each later step swaps in its own
    tokens, positions and cache slot. Valid for the loop it was made in: the model is locked and every step
    has the first step's shapes (the tensors the graph reads, the weights and the cache, stay the same).
    """

    def __init__(self, graph: Callable, inputs: list, at: tuple[int, int, int]):
        self.graph, self.inputs, self.at = graph, inputs, at

    @classmethod
    def after_first(cls, tokens, positions, input_pos) -> "DirectStep | None":
        """From the step just run with these step inputs; None when no noting graph ran it (a CUDA step,
        or torch.compile ran the step some other way)."""
        graph, inputs = getattr(_last_graph, "call", None) or (None, ())
        _last_graph.call = None  # the inputs hold the cache: nothing keeps them after the loop
        where = {id(tensor): i for i, tensor in enumerate(inputs)}
        at = tuple(where.get(id(tensor)) for tensor in (tokens, positions, input_pos))
        return None if graph is None or None in at else cls(graph, list(inputs), at)

    def __call__(self, tokens, positions, input_pos) -> torch.Tensor:
        """tokens (B, 1), positions (B, 1), input_pos (1,) as decode_one_token's -> logits (B, V) f32."""
        inputs, (t, p, i) = self.inputs, self.at
        inputs[t], inputs[p], inputs[i] = tokens, positions, input_pos
        (logits,) = self.graph(*inputs)
        return logits


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
    direct = None  # the compiled step, called directly from the second step on (DirectStep)
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
            inputs = tokens[:, None], plan.step_positions[step], plan.step_slots[step]
            if direct is not None:
                logits = direct(*inputs)
                continue
            logits = step_fn(model, inputs[0], inputs[1], plan.key_mask, inputs[2])
            if step == 0 and step_fn is not decode_one_token:
                direct = DirectStep.after_first(*inputs)
                if direct is None:
                    # torch.compile re-checks every model parameter before each call (~0.3 ms for 28
                    # layers). Nothing those guards check changes within this loop (see DirectStep), so the
                    # first call's check covers the rest. The stance is process-wide, so it is held for this
                    # loop only; entering it costs ~60 us, so only once.
                    guards.enter_context(torch.compiler.set_stance("default", skip_guard_eval_unsafe=True))
    _last_graph.call = None  # (a loop that never made a DirectStep)
    return torch.stack(chosen, dim=1), kept  # (B, n)


def should_continue(logits: torch.Tensor, stopping: Stopping, step: int, max_new_tokens: int) -> bool:
    """The one host synchronisation per step: whether any row runs on, and whether these logits held a NaN
    (corrupt weights, fp16 overflow), which would otherwise be decoded as token 0 without a word."""
    running, has_nan = torch.stack((stopping.unfinished.any(), torch.isnan(logits).any())).tolist()
    if has_nan:
        raise GenerationError(f"the model produced NaN logits at generation step {step}")
    return running and step + 1 < max_new_tokens
