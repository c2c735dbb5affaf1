"""Dynamic batching: requests that arrive together share one model.generate call.

Every request becomes one or more Jobs, one prompt row each (a chat is one row; a transcription is one row
per segment of up to 600 s). One worker thread owns the model and loops:

    wait for a job
    collect: until `max_batch_size` jobs compatible with the oldest are queued, or `window` seconds have
             passed since the oldest arrived (no wait at all when it has already waited that long, e.g.
             behind a running batch)
    take:    the oldest job and, from its group (jobs with the same key: greedy, or the same sampling
             settings; a seeded sampled job is a group of its own, so its draws depend on its seed alone),
             the jobs nearest it in prompt length, up to max_batch_size rows while rows x (longest prompt +
             most new tokens) <= token_budget, within the model's context, and while left padding adds at
             most max_padding of the rows' real prompt tokens (prefill pays for every padded position)
    run:     left-pad the rows into one batch, generate once (max_new_tokens: the largest the rows ask for),
             each row's tokens to its RowSink (rows.py)

So a request waits at most `window` plus the batches already queued ahead of it (each a generate call of up
to max_batch_size rows), and runs no longer than its own max_tokens. A row's tokens do not depend on its
batch mates (left padding with each row's own positions: tests/test_generate.py), so a batched answer is
the answer the request would get alone. This is static batching per call: a request arriving while a batch
runs waits for the next call, generate cannot take rows mid-flight.

The queue holds at most `max_queue` rows; submit raises QueueFull beyond that (the server answers 503 with
Retry-After). A job whose client has gone is dropped from the queue unstarted, and a running batch stops at
the next step once none of its rows has a client (RowsSettled). If a batch fails before producing a token,
its rows run again one by one, so one bad row fails only its own request.
"""

import logging
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import torch

from minaf3.errors import Minaf3Error
from minaf3.serve.rows import FanOut, RowSink, RowsSettled

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_SECONDS = 0.01
DEFAULT_MAX_QUEUE = 256
DEFAULT_MAX_PADDING = 0.25  # padded prompt positions a call may add, as a fraction of its real ones


class QueueFull(Exception):
    """The queue cannot take the rows now; retry_after: seconds worth waiting before trying again."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Closed(Exception):
    """The batcher is shutting down and takes no new work."""


@dataclass
class Job:
    """One prompt row and where its tokens go.

    inputs: the processor's output for this row alone: input_ids and attention_mask (1, T) int64, and for
    audio input_features (W, 128, 3000) and input_features_mask (W, 3000) for its W windows. kwargs: the
    generate settings of its group (do_sample, temperature, top_p); key: equal keys may share a call;
    seed: a seeded sampled job runs alone with torch.Generator(device).manual_seed(seed).
    """

    inputs: dict
    sink: RowSink
    kwargs: dict
    key: tuple
    seed: int | None = None
    arrived: float = field(default_factory=time.monotonic)

    @property
    def length(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["attention_mask"].sum())


@dataclass
class Stats:
    """Counters since start, for /health and the load script."""

    batches: int = 0  # generate calls
    rows: int = 0  # rows run in them
    steps: int = 0  # generation steps over all calls (one token for every row of the call)
    largest_batch: int = 0
    dropped: int = 0  # queued rows whose client left before they started
    abandoned: int = 0  # running rows whose client left
    rejected: int = 0  # rows refused because the queue was full
    busy_seconds: float = 0.0  # time spent in generate


def collate(jobs: list[Job], pad_id: int) -> dict:
    """Rows of different lengths -> one left-padded batch: input_ids, attention_mask (B, T_max); the audio
    windows of every row concatenated in row order (the order the model assigns them to placeholders)."""
    longest = max(job.length for job in jobs)
    input_ids = torch.full((len(jobs), longest), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(jobs), longest), dtype=torch.int64)
    for b, job in enumerate(jobs):
        input_ids[b, longest - job.length :] = job.inputs["input_ids"][0]
        attention_mask[b, longest - job.length :] = job.inputs["attention_mask"][0]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    with_audio = [job.inputs for job in jobs if "input_features" in job.inputs]
    if with_audio:
        batch["input_features"] = torch.cat([row["input_features"] for row in with_audio])
        batch["input_features_mask"] = torch.cat([row["input_features_mask"] for row in with_audio])
    return batch


class Batcher:
    """The queue and the worker thread that runs it (see the module docstring).

    model: the loaded AudioFlamingo3ForConditionalGeneration; pad_id: the id left padding uses; context:
    the model's positions (max_position_embeddings); compile: generate's `compile` argument (eager by
    default: a compiled step is a graph per batch size, and batch sizes vary here).
    """

    def __init__(
        self,
        model,
        pad_id: int,
        context: int,
        max_batch_size: int = 32,
        window: float = DEFAULT_WINDOW_SECONDS,
        max_queue: int = DEFAULT_MAX_QUEUE,
        token_budget: int = 65_536,
        compile: bool = False,
        max_padding: float = DEFAULT_MAX_PADDING,
    ):
        self.model, self.pad_id, self.context = model, pad_id, context
        self.max_batch_size, self.window, self.max_queue = max_batch_size, window, max_queue
        self.token_budget, self.compile, self.max_padding = token_budget, compile, max_padding
        self.stats = Stats()
        self.running = 0  # rows in the generate call under way
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="minaf3-batcher", daemon=True)
        self._thread.start()

    # ---- the requests' side --------------------------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> None:
        """Queue all rows of one request, or none: QueueFull when they would overflow a non-empty queue
        (an empty queue takes any request, so a long transcription is never refused for its size alone)."""
        with self._cond:
            if self._closing:
                raise Closed("the server is shutting down")
            queued = len(self._queue)
            if queued and queued + len(jobs) > self.max_queue:
                self.stats.rejected += len(jobs)
                raise QueueFull(
                    f"the queue holds {queued} rows (limit {self.max_queue})", self._retry_after()
                )
            self._queue.extend(jobs)
            self._cond.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """The client of `jobs` has gone: their rows take no more tokens, queued ones are dropped now."""
        for job in jobs:
            job.sink.cancel()
        with self._cond:
            self._cond.notify()

    def snapshot(self) -> dict:
        with self._cond:
            return {"queued": len(self._queue), "running": self.running, **asdict(self.stats)}

    def close(self, timeout: float | None = None) -> None:
        """Stop taking work, let the worker finish what is queued, then stop it."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _retry_after(self) -> int:
        """Seconds until the queue has likely drained by one batch: the mean generate call so far."""
        mean = self.stats.busy_seconds / self.stats.batches if self.stats.batches else 1.0
        return max(1, math.ceil(mean))

    # ---- the worker ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                jobs = self._collect()
                if jobs is None:
                    return
                self.running = len(jobs)
            started = time.perf_counter()
            try:
                self._run(jobs)
            except BaseException as exc:  # never leave a client waiting on a row that will not end
                for job in jobs:
                    job.sink.fail(exc)
                logger.exception("batch of %d failed", len(jobs))
            finally:
                with self._cond:
                    self.running = 0
                    self.stats.busy_seconds += time.perf_counter() - started

    def _collect(self) -> list[Job] | None:
        """Wait for work and the batching window (holding the lock), then take a batch; None when closing."""
        while True:
            self._drop_cancelled()
            if self._queue:
                oldest = self._queue[0]
                deadline = oldest.arrived + self.window
                mates = sum(job.key == oldest.key for job in self._queue)
                if mates >= self.max_batch_size or time.monotonic() >= deadline or self._closing:
                    return self._take()
                self._cond.wait(deadline - time.monotonic())
            elif self._closing:
                return None
            else:
                self._cond.wait()

    def _drop_cancelled(self) -> None:
        kept = [job for job in self._queue if not job.sink.cancelled]
        self.stats.dropped += len(self._queue) - len(kept)
        self._queue = deque(kept)

    def _take(self) -> list[Job]:
        """The oldest job and the jobs of its group closest to it in length, within max_batch_size, the
        token budget, the context and max_padding (see _grouped); the rest wait for the next call."""
        oldest = self._queue[0]
        mates = [job for job in self._queue if job.key == oldest.key]
        batch = [oldest] if oldest.seed is not None else self._grouped(mates)  # a seeded job runs alone
        taken = {id(job) for job in batch}
        self._queue = deque(job for job in self._queue if id(job) not in taken)
        return batch

    def _grouped(self, mates: list[Job]) -> list[Job]:
        """mates[0] (the oldest) and its neighbours in prompt length: with the rows sorted by length, a run
        of them grows around the oldest, each time by the neighbour (shorter or longer) that leaves fewer
        padded positions, while the padding stays within max_padding of the real prompt tokens
        (rows x longest - their sum <= max_padding x their sum) and the call fits. A call's prefill costs
        its rows times its longest prompt, so rows of like length waste the least."""
        order = sorted(range(len(mates)), key=lambda i: (mates[i].length, i))
        at = order.index(0)
        low, high = at, at + 1  # the run is order[low:high]

        def waste(first: int, end: int) -> int:  # padded positions of the run order[first:end]
            rows = [mates[i].length for i in order[first:end]]
            return len(rows) * max(rows) - sum(rows)

        def fits(first: int, end: int) -> bool:
            rows = [mates[i] for i in order[first:end]]
            total = max(j.length for j in rows) + max(j.sink.max_tokens for j in rows)
            return (
                len(rows) <= self.max_batch_size
                and total <= self.context
                and len(rows) * total <= self.token_budget
                and waste(first, end) <= self.max_padding * sum(j.length for j in rows)
            )

        while True:
            grown = [(low - 1, high)] if low > 0 else []
            grown += [(low, high + 1)] if high < len(order) else []
            grown = [(waste(*g), g) for g in grown if fits(*g)]
            if not grown:
                return [mates[i] for i in order[low:high]]
            low, high = min(grown)[1]

    def _run(self, jobs: list[Job]) -> None:
        """One generate call for `jobs`; rows of a call that failed before its first token run again alone."""
        fan = FanOut([job.sink for job in jobs])
        kwargs = dict(jobs[0].kwargs)
        if jobs[0].seed is not None:
            kwargs["generator"] = torch.Generator(self.model.device).manual_seed(jobs[0].seed)
        try:
            self.model.generate(
                **collate(jobs, self.pad_id),
                max_new_tokens=max(job.sink.max_tokens for job in jobs),
                streamer=fan,
                compile=self.compile,
                **kwargs,
            )
        except RowsSettled:
            pass  # every row ended before max_new_tokens: stop strings, short max_tokens or gone clients
        except Exception as exc:
            if fan.steps == 0 and len(jobs) > 1:
                logger.warning(
                    "a batch of %d failed (%s: %s); its rows run alone", len(jobs), type(exc).__name__, exc
                )
                for job in jobs:
                    if job.sink.open:
                        self._run([job])
                return
            if not isinstance(exc, Minaf3Error):  # a bug or the machine, not the request: keep its traceback
                logger.error("a batch of %d failed", len(jobs), exc_info=exc)
            for job in jobs:
                job.sink.fail(exc)
        with self._cond:
            self.stats.batches += 1
            self.stats.rows += len(jobs)
            self.stats.steps += fan.steps
            self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
            self.stats.abandoned += sum(job.sink.cancelled and job.sink.finish_reason is None for job in jobs)
