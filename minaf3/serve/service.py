"""What a request asks of the model: a chat or a transcription as batcher jobs, and their answers.

    prepare_chat(request, channel)        audio decoded, AF-Think's request added, prompt built and checked
                                          (a worker thread: decoding and log-mel take milliseconds to seconds)
    prepare_transcription(request, ...)   one job per segment of up to 600 s (segments.py cuts long audio)
    answer_chat / stream_chat / answer_transcription   wait for the rows (asyncio), build OpenAI's bodies

The prompt is built as Pipeline.chat and Pipeline.transcribe build theirs (the same processor calls on the
same waveforms), and a batched row's tokens equal the row's alone, so every answer equals what
`minaf3.load(...).chat/.transcribe` gives for the same input and settings. Chat audio over 600 s is refused
(Pipeline.chat(refuse_long_audio=True)): a server cutting it silently would answer about part of the clip.

A Channel carries one request's row events from the worker thread into the event loop (through the loop's
Mailbox, one wake-up for all the rows of a step). A client that goes away cancels its rows: queued ones are
dropped, running ones stop being decoded and end the batch once no row of it has a client.
"""

import asyncio
import itertools
import json
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi.sse import format_sse_event

from minaf3.batch import check_options
from minaf3.conversation import add_think_request, load_conversation_audio
from minaf3.errors import GenerationError
from minaf3.segments import Segment, Transcription, join_texts, segment_bounds, to_seconds
from minaf3.serve import openai_format as fmt
from minaf3.serve import responses
from minaf3.serve.audio_sources import resolve, to_waveform
from minaf3.serve.batcher import Batcher, Job
from minaf3.serve.responses import to_api_error
from minaf3.serve.rows import RowSink

POLL_SECONDS = 0.25  # how often a waiting non-streamed request checks that its client is still there
KEEPALIVE_SECONDS = 5.0  # a comment line on an idle stream: proxies keep it open, a gone client is noticed
_seeded = itertools.count()  # makes each seeded job's key unique: it runs alone


class Mailbox:
    """Events from the worker thread into one event loop, delivered in one wake-up per burst.

    Each call_soon_threadsafe wakes the loop, which then takes the GIL from the decode loop; a batch step
    emits a piece for every streamed row, so they are posted here and handed over together.
    """

    _of_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox]" = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, tuple]] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "Mailbox":
        """The loop's mailbox (called in the loop's own thread, so no two are made for one loop)."""
        if loop not in cls._of_loop:
            cls._of_loop[loop] = cls(loop)
        return cls._of_loop[loop]

    def post(self, queue: asyncio.Queue, event: tuple) -> None:
        with self._lock:
            self._pending.append((queue, event))
            first = len(self._pending) == 1
        if first:  # later posts of this burst ride on the wake-up already scheduled
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


class Channel:
    """Row events ("delta", text) / ("done", sink) / ("error", exc) from the worker thread to one request."""

    def __init__(self):
        self.mailbox = Mailbox.of(asyncio.get_running_loop())
        self.queue: asyncio.Queue = asyncio.Queue()

    def emit(self, kind: str, value) -> None:
        self.mailbox.post(self.queue, (kind, value))

    async def next(self, timeout: float) -> tuple[str, object] | None:
        """The next event, or None after `timeout` seconds without one."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None


class Service:
    """The loaded pipeline, its batcher and the request limits; one per server."""

    def __init__(self, pipe, batcher: Batcher, limits: fmt.Limits, model_id: str):
        self.pipe, self.batcher, self.limits, self.model_id = pipe, batcher, limits, model_id
        config = pipe.model.generation_config
        eos = config.eos_token_id if config is not None else None
        self.eos_ids = set(eos if isinstance(eos, list | tuple) else [] if eos is None else [eos])
        self.default_do_sample = bool(config.do_sample) if config is not None else False
        self.context = pipe.model.config.decoder.max_position_embeddings

    # ---- preparing jobs (worker threads) ---------------------------------------------------------------
    def prepare_chat(self, request: fmt.ChatRequest, channel: Channel) -> Job:
        """The request as one job; Minaf3Error or SourceError (400/413) for anything the model cannot take."""
        conversation = self._with_waveforms(request.messages)
        if request.think:
            add_think_request(conversation)
        conversation = load_conversation_audio(conversation, refuse_long_audio=True)
        inputs = self.pipe.processor.apply_chat_template(conversation)
        sink = RowSink(
            self._decode, self.eos_ids, request.max_tokens, request.stop, request.stream, channel.emit
        )
        return self._job(inputs, sink, request.settings)

    def _with_waveforms(self, messages: list[dict]) -> list[dict]:
        """A copy of the messages whose audio parts hold decoded waveforms instead of AudioRefs."""
        out = []
        for message in messages:
            content = message["content"]
            if isinstance(content, list):
                content = [self._decoded(part) if part["type"] == "audio" else dict(part) for part in content]
            out.append({**message, "content": content})
        return out

    def _decoded(self, part: dict) -> dict:
        ref = part["audio"]
        return {"type": "audio", "audio": to_waveform(resolve(ref, self.limits.max_audio_bytes), ref.where)}

    def prepare_transcription(
        self, request: fmt.TranscriptionRequest, channel: Channel
    ) -> tuple[list[Job], list]:
        """One job per segment (segments.py), and the segments' (start, end) sample bounds."""
        waveform = to_waveform(request.audio, f"file {request.filename[:80]!r}")
        bounds = segment_bounds(waveform)
        jobs = []
        for start, end in bounds:
            inputs = self.pipe.processor.apply_transcription_request(waveform[start:end], request.prompt)
            sink = RowSink(self._decode_transcript, self.eos_ids, self.limits.max_tokens, emit=channel.emit)
            jobs.append(self._job(inputs, sink, request.settings))
        return jobs, bounds

    def _job(self, inputs, sink: RowSink, settings: fmt.Settings) -> Job:
        """Check the settings and the length against the model, then group: greedy rows all share a key,
        sampled rows share theirs with equal settings, a seeded sampled row has a key of its own."""
        kwargs = settings.generate_kwargs()
        check_options(self.pipe, {**kwargs, "max_new_tokens": sink.max_tokens})
        length = int(inputs["input_ids"].shape[1])
        if length + sink.max_tokens > self.context:
            raise GenerationError(
                f"prompt of {length} tokens + max_tokens={sink.max_tokens} exceeds the model's context of "
                f"{self.context} positions; shorten the prompt or lower max_tokens"
            )
        if not kwargs.get("do_sample", self.default_do_sample):  # sampling settings mean nothing here
            greedy = {k: v for k, v in kwargs.items() if k == "min_new_tokens"} | {"do_sample": False}
            return Job(dict(inputs), sink, greedy, ("greedy", settings.min_tokens))
        key = ("sample", tuple(sorted(kwargs.items())))
        if settings.seed is not None:
            return Job(dict(inputs), sink, kwargs, (*key, "seed", next(_seeded)), seed=settings.seed)
        return Job(dict(inputs), sink, kwargs, key)

    def _decode(self, ids: list[int]) -> str:
        return self.pipe.processor.decode(ids, skip_special_tokens=True)

    def _decode_transcript(self, ids: list[int]) -> str:
        return self.pipe.processor.decode(ids, skip_special_tokens=True, strip_prefix=True)

    # ---- answers (the event loop) ----------------------------------------------------------------------
    async def wait(self, jobs: list[Job], channel: Channel, gone: Callable[[], Awaitable[bool]]) -> bool:
        """Wait until every row has ended; False (rows cancelled) if the client went away first.
        A row's generation error is raised here."""
        pending = {id(job.sink) for job in jobs}
        while pending:
            event = await channel.next(POLL_SECONDS)
            if event is None:
                if await gone():
                    self.batcher.cancel(jobs)
                    return False
                continue
            kind, value = event
            if kind == "error":  # the request fails as a whole: its other rows are not needed
                self.batcher.cancel(jobs)
                raise value
            if kind == "done":
                pending.discard(id(value))
        return True

    async def answer_chat(self, request: fmt.ChatRequest, job: Job, channel: Channel, gone) -> dict | None:
        """The chat.completion body, or None if the client went away."""
        if not await self.wait([job], channel, gone):
            return None
        sink = job.sink
        counts = responses.usage(job.prompt_tokens, len(sink.tokens))
        return responses.completion(
            new_id(), int(time.time()), self.model_id, sink.text, sink.finish_reason, counts
        )

    async def stream_chat(self, request: fmt.ChatRequest, job: Job, channel: Channel) -> AsyncIterator[bytes]:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.

        When the client disconnects, Starlette cancels this generator at its await: `finally` cancels the
        row. A generation error after the stream began is sent as an {"error": ...} event (OpenAI's clients
        raise it), since the status line has already gone out.
        """
        rid, created, model = new_id(), int(time.time()), self.model_id
        try:
            yield sse(responses.chunk(rid, created, model, {"role": "assistant", "content": ""}))
            while True:
                event = await channel.next(KEEPALIVE_SECONDS)
                if event is None:
                    yield format_sse_event(comment="keep-alive")
                    continue
                kind, value = event
                if kind == "delta":
                    yield sse(responses.chunk(rid, created, model, {"content": value}))
                elif kind == "error":
                    yield sse(error_body(value))
                    return
                elif kind == "done":
                    yield sse(responses.chunk(rid, created, model, {}, job.sink.finish_reason))
                    if request.include_usage:
                        counts = responses.usage(job.prompt_tokens, len(job.sink.tokens))
                        yield sse(responses.usage_chunk(rid, created, model, counts))
                    yield format_sse_event(data_str="[DONE]")
                    return
        finally:
            self.batcher.cancel([job])  # no effect on a row that has ended; stops one whose client left

    async def answer_transcription(
        self, request: fmt.TranscriptionRequest, jobs: list[Job], bounds: list, channel: Channel, gone
    ) -> dict | str | None:
        """The transcript in the requested format, or None if the client went away."""
        if not await self.wait(jobs, channel, gone):
            return None
        segments = [
            Segment(to_seconds(start), to_seconds(end), job.sink.text.strip())
            for job, (start, end) in zip(jobs, bounds, strict=True)
        ]
        transcript = Transcription(join_texts([s.text for s in segments]), segments)
        counts = responses.usage(sum(j.prompt_tokens for j in jobs), sum(len(j.sink.tokens) for j in jobs))
        if request.response_format == "text":
            return transcript.text
        if request.response_format == "srt":
            return transcript.to_srt()
        if request.response_format == "verbose_json":
            tokens = [[t for t in job.sink.tokens if t not in self.eos_ids] for job in jobs]
            return responses.transcription_verbose(transcript, tokens, counts)
        return responses.transcription_json(transcript.text, counts)


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def sse(body: dict) -> bytes:
    return format_sse_event(data_str=json.dumps(body, ensure_ascii=False))


def error_body(error: BaseException) -> dict:
    """OpenAI's error shape for an error raised while generating."""
    return to_api_error(error).body()
