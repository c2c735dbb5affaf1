"""The HTTP routes of `minaf3 serve`, on FastAPI: OpenAI's chat, transcription and model routes, /health, /.

    POST /v1/chat/completions       JSON in, JSON out; server-sent events with "stream": true
    POST /v1/audio/transcriptions   multipart: file, model, response_format json|text|srt|verbose_json
    GET  /v1/models, /v1/models/ID  the one model served
    GET  /health                    200 {"status": "ok", ...} once the model is loaded; 503 while loading
                                    or shutting down
    GET  /                          page.html: upload or record audio, ask, watch the answer stream

The server listens at once and loads the model in a thread, so /health can say "loading" (and /v1 answers
503 with Retry-After) until it is ready. With an API key, /v1 needs `Authorization: Bearer KEY`. After
SIGTERM (server.py) every new request gets 503 while the ones in flight finish. Errors are answered in
OpenAI's shape by responses.py's handlers; request bodies over max_body_bytes get 413 from FastAPI's limit.
"""

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile

from minaf3.serve import responses
from minaf3.serve.batcher import DEFAULT_MAX_PADDING, Batcher, Closed, QueueFull
from minaf3.serve.openai_format import Limits, parse_chat_request, parse_transcription_form
from minaf3.serve.responses import APIError
from minaf3.serve.service import Channel, Service

logger = logging.getLogger("minaf3.serve")

MAX_FORM_FIELDS = 16  # transcription forms have a handful of text fields
MAX_FORM_FIELD_BYTES = 64 * 1024  # one text field (the prompt is the longest)
LOADING_RETRY_SECONDS = 2


@dataclass
class ServeOptions:
    """The server's settings (`minaf3 serve`'s options, see server.py)."""

    model_id: str
    api_key: str | None = None
    max_batch_size: int = 32
    batch_window: float = 0.01  # seconds the batcher waits for mates of the oldest request
    max_queue: int = 256  # rows
    max_tokens: int = 1024  # default and largest max_tokens; also each transcription segment's limit
    max_body_bytes: int = 25 * 2**20  # request bodies: uploads, JSON with base64 audio
    allow_audio_urls: bool = False
    compile: bool = False
    max_padding: float = DEFAULT_MAX_PADDING  # left padding a call may add, a fraction of its prompt tokens


class ServerState:
    """What the routes share: the options, the service once loaded, and the shutdown flag."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.service: Service | None = None
        self.load_error: BaseException | None = None
        self.draining = False
        self.in_flight = 0  # HTTP requests being answered
        self.created = int(time.time())


class Admission:
    """The outermost ASGI layer: counts requests in flight; once draining, answers new ones 503 (/health
    aside). `minaf3` is the ServerState the routes share.

    A body whose Content-Length is over the limit is answered 413 here, in OpenAI's shape, before any of it
    is read (FastAPI's own limit, which sits outside its exception handlers, would answer in plain text);
    a body without a length (chunked) is counted as it arrives by FastAPI's limit, whose error reaches
    responses.py's handlers.
    """

    def __init__(self, app: FastAPI, state: ServerState):
        self.app, self.minaf3 = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.minaf3
        limit, declared = state.options.max_body_bytes, Headers(scope=scope).get("content-length", "")
        refusal = None
        if state.draining and scope["path"] != "/health":
            refusal = APIError(503, "the server is shutting down", code="shutting_down")
        elif declared.isdigit() and int(declared) > limit:
            message = f"the request body is {int(declared):,} bytes, over this server's limit of {limit:,}"
            refusal = APIError(413, message, code="request_too_large")
        if refusal is not None:
            refusal.headers["Connection"] = "close"
            return await refusal.response()(scope, receive, send)
        state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.in_flight -= 1


def create_app(options: ServeOptions, load: Callable, on_load_error: Callable | None = None) -> Admission:
    """The application (FastAPI's, inside Admission; its ServerState is `.minaf3`). load() -> Pipeline runs
    in a thread at start-up; on_load_error(exc) if it raises."""
    state = ServerState(options)
    limits = Limits(
        max_tokens=options.max_tokens,
        allow_audio_urls=options.allow_audio_urls,
        max_audio_bytes=options.max_body_bytes,
    )

    def load_model() -> None:
        try:
            pipe = load()
            processor = pipe.processor
            batcher = Batcher(
                pipe.model,
                pad_id=processor.pad_token_id or 0,
                context=pipe.model.config.decoder.max_position_embeddings,
                max_batch_size=options.max_batch_size,
                window=options.batch_window,
                max_queue=options.max_queue,
                compile=options.compile,
                max_padding=options.max_padding,
            )
            state.service = Service(pipe, batcher, limits, options.model_id)
            logger.info("minaf3 serve: model %s loaded, ready", options.model_id)
        except BaseException as exc:
            state.load_error = exc
            logger.error("minaf3 serve: loading the model failed: %s", exc)
            if on_load_error is not None:
                on_load_error(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load_model, name="minaf3-load", daemon=True).start()
        yield
        if state.service is not None:  # the server has answered every request it took: stop the worker
            await run_in_threadpool(state.service.batcher.close)

    app = FastAPI(
        title="minaf3",
        lifespan=lifespan,
        max_body_size=options.max_body_bytes,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    responses.install(app)

    async def authorize(request: Request) -> None:
        if options.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), options.api_key.encode()
        ):
            raise APIError(
                401,
                "missing or wrong API key: send the header Authorization: Bearer KEY",
                code="invalid_api_key",
            )

    def ready() -> Service:
        if state.service is None:
            raise APIError(
                503,
                "the model is still loading",
                code="loading",
                headers={"Retry-After": str(LOADING_RETRY_SECONDS)},
            )
        return state.service

    def check_model(name: str | None) -> None:
        if name is not None and name != options.model_id:
            raise APIError(
                404,
                f"model {name[:80]!r} is not served here; this server serves {options.model_id!r}",
                param="model",
                code="model_not_found",
            )

    def submit(service: Service, jobs) -> None:
        try:
            service.batcher.submit(jobs)
        except QueueFull as exc:
            raise APIError(
                503,
                f"the server is busy: {exc}; retry later",
                code="overloaded",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        except Closed:
            raise APIError(503, "the server is shutting down", code="shutting_down") from None

    v1 = [Depends(authorize)]

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(request: Request):
        service = ready()
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError) as exc:
            raise APIError(
                400, f"the body is not valid JSON ({str(exc)[:120]})", code="invalid_json"
            ) from None
        chat = parse_chat_request(body, limits)
        check_model(chat.model)
        channel = Channel()
        job = await run_in_threadpool(service.prepare_chat, chat, channel)
        submit(service, [job])
        if chat.stream:
            stream = service.stream_chat(chat, job, channel)
            return EventSourceResponse(
                stream, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        answer = await service.answer_chat(chat, job, channel, request.is_disconnected)
        return JSONResponse(answer) if answer is not None else Response(status_code=499)

    @app.post("/v1/audio/transcriptions", dependencies=v1)
    async def transcriptions(request: Request):
        service = ready()
        fields: dict[str, list] = {}
        form_limits = {"max_files": 1, "max_fields": MAX_FORM_FIELDS, "max_part_size": MAX_FORM_FIELD_BYTES}
        async with request.form(**form_limits) as form:
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    value = (value.filename, await value.read())
                fields.setdefault(name, []).append(value)
        transcription = parse_transcription_form(fields)
        check_model(transcription.model)
        channel = Channel()
        jobs, bounds = await run_in_threadpool(service.prepare_transcription, transcription, channel)
        submit(service, jobs)
        answer = await service.answer_transcription(
            transcription, jobs, bounds, channel, request.is_disconnected
        )
        if answer is None:
            return Response(status_code=499)
        return PlainTextResponse(answer) if isinstance(answer, str) else JSONResponse(answer)

    def model_card() -> dict:
        return {"id": options.model_id, "object": "model", "created": state.created, "owned_by": "minaf3"}

    @app.get("/v1/models", dependencies=v1)
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=v1)
    async def model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.get("/health")
    async def health():
        if state.load_error is not None:
            return JSONResponse({"status": "error", "error": str(state.load_error)}, status_code=503)
        if state.service is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        body = {
            "status": "draining" if state.draining else "ok",
            "model": options.model_id,
            "in_flight": state.in_flight,
            "batcher": state.service.batcher.snapshot(),
        }
        return JSONResponse(body, status_code=503 if state.draining else 200)

    page = resources.files("minaf3.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    return Admission(app, state)
