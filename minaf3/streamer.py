"""Streaming: decoded text pieces of the tokens generate produces, as an iterator for another thread.

    streamer = TextIteratorStreamer(processor, skip_prompt=True)
    Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer)).start()
    for piece in streamer: print(piece, end="", flush=True)

generate (generate.py) is the producer: put(prompt), put(token) per step, then end() or fail(error).
"""

import queue
from collections.abc import Callable
from typing import Any

import torch

from .errors import ConfigError, GenerationError

REPLACEMENT_CHAR = "\ufffd"  # what an incomplete UTF-8 sequence decodes to
_END = object()


class TextIteratorStreamer:
    """Iterator over decoded text pieces; fed by generate via put/end, read with `for piece in streamer`.

    decoder: a callable ids -> text, or any object with `.decode(ids, **decode_kwargs)` (minaf3's processor,
    a tokenizer); decode_kwargs default to skip_special_tokens=True. skip_prompt: do not emit the prompt (the
    first put). timeout: seconds `next` waits for a piece before raising queue.Empty (None: as long as
    generation runs). Batch size 1 only, like transformers' streamers.

    generate calls `put(prompt_ids (1, T))` once, `put(tokens (1,))` per step, then `end()`; if generation
    raises, `fail(error)` makes `next` raise that error rather than leave the consumer waiting. The pieces
    concatenate to the decoded text of everything put (minus the prompt with skip_prompt).

    Each put decodes the token cache and emits the new text. A byte-level BPE token may hold part of a
    multi-byte UTF-8 character, which decodes to a trailing U+FFFD: held back until a later token completes
    it. After a newline the cache restarts (as in transformers), bounding the cost per token. This needs a
    decoder that is prefix-stable apart from partial characters, as byte-level BPE (Qwen2's) is.
    """

    def __init__(
        self,
        decoder: Callable[[list[int]], str] | Any,
        skip_prompt: bool = False,
        timeout: float | None = None,
        **decode_kwargs,
    ):
        if callable(getattr(decoder, "decode", None)):
            decode_kwargs.setdefault("skip_special_tokens", True)
            self._decode = lambda ids: decoder.decode(ids, **decode_kwargs)
        elif callable(decoder):
            self._decode = decoder
        else:
            raise ConfigError(
                f"decoder must be callable or have a decode method, got {type(decoder).__name__}"
            )
        self.skip_prompt = skip_prompt
        self.timeout = timeout
        self._queue: queue.Queue = queue.Queue()
        self._tokens: list[int] = []
        self._emitted = 0  # characters of decode(self._tokens) already emitted
        self._prompt_pending = True

    # ---- producer side (generate) ------------------------------------------------------------------------
    def put(self, token_ids: torch.Tensor) -> None:
        """token_ids: the prompt (1, T) on the first call, then one step's token (1,)."""
        if token_ids.ndim > 1:
            if token_ids.shape[0] > 1:
                raise GenerationError(
                    f"TextIteratorStreamer streams one sequence; got a batch of {token_ids.shape[0]}"
                )
            token_ids = token_ids[0]
        if self._prompt_pending:
            self._prompt_pending = False
            if self.skip_prompt:
                return
        self._tokens.extend(token_ids.tolist())
        text = self._decode(self._tokens)
        if text.endswith(REPLACEMENT_CHAR):
            return  # a character split across tokens: wait for its remaining bytes
        self._emit(text[self._emitted :])
        if text.endswith("\n"):
            self._tokens, self._emitted = [], 0
        else:
            self._emitted = len(text)

    def end(self) -> None:
        """Flush what is held back (a partial character stays as U+FFFD, as the full decode shows it)."""
        if self._tokens:
            self._emit(self._decode(self._tokens)[self._emitted :])
        self._tokens, self._emitted, self._prompt_pending = [], 0, True
        self._queue.put(_END)

    def fail(self, error: BaseException) -> None:
        """Generation raised `error`: the consumer gets it raised from `next` instead of waiting forever."""
        self._queue.put(error)

    def _emit(self, text: str) -> None:
        if text:
            self._queue.put(text)

    # ---- consumer side -----------------------------------------------------------------------------------
    def __iter__(self) -> "TextIteratorStreamer":
        return self

    def __next__(self) -> str:
        item = self._queue.get(timeout=self.timeout)
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item
