"""What the server sends back, in OpenAI's shapes: answers, and every failure as an error body.

Answers: a chat completion, the chunks of a streamed one (usage last when asked), a transcription in its
formats. They are the shapes OpenAI's clients parse (the official `openai` package reads each one in the
tests); a field minaf3 has no value for is null or absent, never made up (no logprobs, no language).

Errors, {"error": {"message", "type", "param", "code"}} with an HTTP status:

    APIError                  raised by the server's own checks (openai_format.py, app.py)
    SourceError               audio bytes that cannot be had (audio_sources.py): 400, or 413 over the limit
    minaf3's typed errors     (minaf3/errors.py: bad audio, prompts, settings) 400, code = the class name
    Starlette's HTTPException unknown route 404, wrong method 405, body over the limit 413, bad multipart 400
    anything else             500 "internal server error": logged with its traceback, never shown to clients
    a client gone mid-request 499, unlogged (nobody is there to read it)

install(app) registers the handlers, so no route needs its own try/except.
"""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from minaf3.errors import Minaf3Error
from minaf3.serve.audio_sources import SourceError


# ---- answers ----------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(rid: str, created: int, model: str, text: str, finish_reason: str, counts: dict) -> dict:
    """A whole chat.completion: one choice and its usage."""
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish_reason,
        "logprobs": None,
    }
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": counts,
    }


def chunk(rid: str, created: int, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    """One chat.completion.chunk of a stream: a piece of text (delta), or the end (finish_reason)."""
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(rid: str, created: int, model: str, counts: dict) -> dict:
    """The last chunk when stream_options.include_usage is set: no choices, the usage."""
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": counts,
    }


def transcription_json(text: str, counts: dict) -> dict:
    return {"text": text, "usage": _transcription_usage(counts)}


def transcription_verbose(transcription, tokens: list[list[int]], counts: dict) -> dict:
    """verbose_json: the text, the audio's duration in seconds and its segments (start and end in seconds).

    Segments are the pieces long audio is read in (up to 600 s each, cut at quiet points), not sentences;
    no language is reported, since AF3 does not detect one.
    """
    segments = [
        {"id": i, "start": s.start, "end": s.end, "text": s.text, "tokens": ids}
        for i, (s, ids) in enumerate(zip(transcription.segments, tokens, strict=True))
    ]
    return {
        "task": "transcribe",
        "duration": transcription.duration,
        "text": transcription.text,
        "segments": segments,
        "usage": _transcription_usage(counts),
    }


def _transcription_usage(counts: dict) -> dict:
    # The shape OpenAI gives for token-billed transcription models.
    return {
        "type": "tokens",
        "input_tokens": counts["prompt_tokens"],
        "output_tokens": counts["completion_tokens"],
        "total_tokens": counts["total_tokens"],
    }


# ---- errors -----------------------------------------------------------------------------------------------
class APIError(Exception):
    """A request the server refuses, in OpenAI's error shape, with its HTTP status and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        if self.status >= 500:
            return "server_error"
        return "authentication_error" if self.status == 401 else "invalid_request_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


HTTP_MESSAGES = {
    404: ("no such route", "not_found"),
    405: ("method not allowed on this route", "method_not_allowed"),
    413: ("the request body is over this server's limit", "request_too_large"),
}


def to_api_error(error: BaseException, request: Request | None = None) -> APIError:
    """The APIError a client sees for `error` (see the module docstring)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, SourceError):
        return APIError(
            error.status,
            str(error),
            error.param,
            "invalid_audio" if error.status == 400 else "request_too_large",
        )
    if isinstance(error, Minaf3Error):
        return APIError(400, str(error), None, type(error).__name__)
    if isinstance(error, HTTPException):
        message, code = HTTP_MESSAGES.get(error.status_code, (str(error.detail), None))
        if request is not None and error.status_code in (404, 405):
            message = f"{message}: {request.method} {request.url.path}"
        elif error.status_code == 400:
            message, code = f"malformed request: {error.detail}", "invalid_request"
        status = error.status_code if 400 <= error.status_code < 600 else 400
        return APIError(status, message, None, code, dict(error.headers or {}))
    if isinstance(error, RequestValidationError):
        return APIError(400, f"invalid request: {error.errors()[:1]}", None, "invalid_request")
    return APIError(500, "internal server error (the server's log has the details)", None, "internal_error")


def install(app: FastAPI) -> None:
    """Answer every exception a route raises in OpenAI's shape."""

    async def handle(request: Request, error: Exception) -> JSONResponse:
        # Starlette re-raises what reaches the `Exception` handler after answering, so uvicorn logs it
        # with its traceback: nothing to log here.
        return to_api_error(error, request).response()

    async def gone(request: Request, error: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nobody reads it: the client left while sending its request

    for kind in (APIError, SourceError, Minaf3Error, HTTPException, RequestValidationError, Exception):
        app.add_exception_handler(kind, handle)
    app.add_exception_handler(ClientDisconnect, gone)
