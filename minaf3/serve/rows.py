"""One generate call, many requests: each row's tokens to its own text, its own end, its own client.

    model.generate(..., streamer=FanOut(rows))
      put(prompt (B, T))      ignored
      put(tokens (B,))        row b's RowSink.push(tokens[b]) while row b is open
      end() / fail(error)     every row still open is closed (max tokens reached) or failed

A RowSink ends on the first of: an end-of-sequence token (finish_reason "stop"), one of the request's stop
strings ("stop", the text cut before it), its own max_tokens ("length"; rows of one batch may ask for
different lengths, the call runs to the longest), or its client going away (cancelled). generate has no
hook to stop early, so once every row has ended, FanOut.put raises RowsSettled: generate re-raises it after
releasing the model (its KV cache is cleared on the way out) and the batcher takes it as a normal end.

Text: without streaming or stop strings a row decodes its tokens once, at the end, exactly as Pipeline.chat
does. Otherwise it decodes as it goes, as TextIteratorStreamer does: a piece is emitted once its characters
are complete (byte-level BPE can split a character across tokens), the decode window restarts after a
newline, and text that might be the start of a stop string is held back until it is known not to be.
"""

import threading
from collections.abc import Callable

import torch

REPLACEMENT_CHAR = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


class RowsSettled(Exception):
    """Raised from FanOut.put when every row has ended: generate stops instead of running on for nobody."""


class RowSink:
    """The receiving end of one row: its tokens, its text and how it ended.

    decode: token ids -> text (the processor's, special tokens skipped). eos_ids: tokens that end the row
    (not part of its text, counted in its tokens). emit(kind, value) is called from the generating thread:
    ("delta", text) for each streamed piece, ("done", self) once when the row ends, ("error", exc) if its
    generation failed. cancel() may be called from any thread.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        eos_ids: set[int],
        max_tokens: int,
        stop: tuple[str, ...] = (),
        stream: bool = False,
        emit: Callable[[str, object], None] = lambda kind, value: None,
    ):
        self.decode, self.eos_ids, self.max_tokens, self.stop = decode, eos_ids, max_tokens, stop
        self.stream, self.emit = stream, emit
        self.incremental = stream or bool(stop)
        self.tokens: list[int] = []  # every generated token, the end-of-sequence token included
        self.finish_reason: str | None = None  # "stop" or "length" once ended
        self.text = ""  # the final text once ended
        self._cancelled = threading.Event()
        self._window: list[int] = []  # tokens decoded together since the last restart
        self._window_chars = 0  # characters of decode(window) already in _seen
        self._seen = ""  # text decoded so far, complete characters only, stop strings cut
        self._sent = 0  # characters of _seen emitted as deltas

    # ---- state ---------------------------------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def open(self) -> bool:
        return self.finish_reason is None and not self.cancelled

    def cancel(self) -> None:
        """The client went away: take no more tokens (the batch stops once no row is open)."""
        self._cancelled.set()

    # ---- producer side -------------------------------------------------------------------------------------
    def push(self, token: int) -> None:
        """One generated token (the generating thread only, while open)."""
        self.tokens.append(token)
        if token in self.eos_ids:
            return self.finish("stop")
        if self.incremental and self._extend([token]) and self._cut_at_stop():
            return self.finish("stop", cut=True)
        if self.stream:
            self._send(len(self._seen) - self._held_back())
        if len(self.tokens) >= self.max_tokens:
            self.finish("length")

    def finish(self, reason: str, cut: bool = False) -> None:
        """End the row: settle its text, emit what is left and ("done", self)."""
        if self.finish_reason is not None:
            return
        if not self.incremental:
            self.text = self.decode([t for t in self.tokens if t not in self.eos_ids])
        else:
            if not cut:  # flush the window, a trailing partial character included (as the full decode shows)
                self._seen += self.decode(self._window)[self._window_chars :]
                if self._cut_at_stop():
                    reason = "stop"
            self.text = self._seen
            self._send(len(self._seen))
        self.finish_reason = reason
        self.emit("done", self)

    def fail(self, error: BaseException) -> None:
        if self.finish_reason is None:
            self.finish_reason = "error"
            self.emit("error", error)

    # ---- incremental text ----------------------------------------------------------------------------------
    def _extend(self, tokens: list[int]) -> bool:
        """Decode the window with `tokens`; True if new complete characters joined _seen."""
        self._window += tokens
        text = self.decode(self._window)
        if text.endswith(REPLACEMENT_CHAR):
            return False  # a character split across tokens: wait for the rest of its bytes
        self._seen += text[self._window_chars :]
        if text.endswith("\n"):  # restart the window: each step then decodes a short window
            self._window, self._window_chars = [], 0
        else:
            self._window_chars = len(text)
        return True

    def _cut_at_stop(self) -> bool:
        """Cut _seen before the first stop string in it, if any (only text not yet sent can hold one)."""
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self._sent - longest)
        found = [i for i in (self._seen.find(s, start) for s in self.stop) if i >= 0]
        if not found:
            return False
        self._seen = self._seen[: min(found)]
        return True

    def _held_back(self) -> int:
        """Characters at the end of _seen that could begin a stop string, not to be sent yet."""
        for size in range(min(len(self._seen), max((len(s) for s in self.stop), default=0)), 0, -1):
            tail = self._seen[-size:]
            if any(s.startswith(tail) for s in self.stop):
                return size
        return 0

    def _send(self, upto: int) -> None:
        if self.stream and upto > self._sent:
            self.emit("delta", self._seen[self._sent : upto])
            self._sent = upto


class FanOut:
    """generate's streamer for a batch: row b of each step goes to rows[b] (see the module docstring).

    steps counts the tokens generate produced per row, for the server's statistics.
    """

    def __init__(self, rows: list[RowSink]):
        self.rows = rows
        self.steps = 0
        self._prompt_seen = False

    def put(self, ids: torch.Tensor) -> None:
        if not self._prompt_seen:  # the prompt (B, T) comes first
            self._prompt_seen = True
            return
        self.steps += 1
        for row, token in zip(self.rows, ids.tolist(), strict=True):
            if row.open:
                row.push(token)
        if not any(row.open for row in self.rows):
            raise RowsSettled()

    def end(self) -> None:
        """generate ran to max_new_tokens (or every row stopped): close what is still open."""
        for row in self.rows:
            if row.open:
                row.finish("length")

    def fail(self, error: BaseException) -> None:
        """generate raised; RowsSettled is our own stop, anything else fails the open rows (the batcher
        decides whether to retry them alone first)."""
