"""OpenAI's requests, checked field by field (the answers' bodies are in responses.py).

    parse_chat_request(body, limits) -> ChatRequest                    POST /v1/chat/completions
    parse_transcription_form(fields) -> TranscriptionRequest           POST /v1/audio/transcriptions

Every problem is an APIError naming the field as OpenAI's `param` does ("messages[0].content[1].input_audio
.format") and saying what is wrong; unknown fields are refused by name rather than ignored, so a client never
believes a setting took effect when it did not. Nothing here decodes audio or touches the model: an audio
part becomes an AudioRef (its bytes, or a URL to fetch), which audio_sources.py turns into a waveform.
"""

import math
from dataclasses import dataclass, field
from typing import Any

from minaf3.serve.audio_sources import AUDIO_FORMATS, AudioRef, decode_base64, parse_data_url
from minaf3.serve.responses import APIError

# Beyond OpenAI's fields: "think" (AF-Think's reasoning request) and "min_tokens" (no end of sequence before
# that many tokens, vLLM's name for it).
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
CHAT_FIELDS = set(
    "model messages stream stream_options max_tokens max_completion_tokens temperature top_p seed stop n "
    "think min_tokens presence_penalty frequency_penalty logprobs".split()
)
# Fields OpenAI defines that change nothing at these values; any other value is refused by name.
NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False}
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
TRANSCRIPTION_FORMATS = ("json", "text", "srt", "verbose_json")
TRANSCRIPTION_FIELDS = {"file", "model", "response_format", "prompt", "temperature", "stream"}
# timestamp_granularities[] is accepted when it asks for what minaf3 gives: segment times.
GRANULARITY_FIELDS = ("timestamp_granularities[]", "timestamp_granularities")


def invalid(param: str, problem: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {problem}", param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """What the server accepts: the largest max_tokens, and whether http(s) audio URLs may be fetched."""

    max_tokens: int
    allow_audio_urls: bool = False
    max_audio_bytes: int = 25 * 2**20


@dataclass
class Settings:
    """How tokens are chosen. None leaves a setting to the checkpoint's generation_config.json."""

    do_sample: bool | None = None  # False: greedy
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    min_tokens: int = 0

    def generate_kwargs(self) -> dict:
        """The settings for model.generate (the seed becomes a generator where the batch is run); rows with
        equal settings can share a generate call."""
        kwargs = {"min_new_tokens": self.min_tokens} if self.min_tokens else {}
        if self.do_sample is False:
            return {**kwargs, "do_sample": False}
        names = ("do_sample", "temperature", "top_p")
        return {**kwargs, **{name: getattr(self, name) for name in names if getattr(self, name) is not None}}


@dataclass
class ChatRequest:
    """A checked chat request. messages are in the processor's format, audio parts holding AudioRefs."""

    model: str | None
    messages: list[dict]
    max_tokens: int
    settings: Settings
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    think: bool = False


@dataclass
class TranscriptionRequest:
    """A checked transcription request; `audio` holds the uploaded file's bytes."""

    model: str | None
    audio: bytes
    filename: str
    response_format: str = "json"
    prompt: str | None = None
    settings: Settings = field(default_factory=lambda: Settings(do_sample=False))


# ---- checks of single values -------------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value, param: str, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid(param, f"expected a number, got {_show(value)}", "invalid_type")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise invalid(param, f"{value} is out of range {bracket}{low}, {high}]")
    return float(value)


def _integer(value, param: str, low: int, high: int) -> int:
    if not _is_int(value):
        raise invalid(param, f"expected an integer, got {_show(value)}", "invalid_type")
    if not low <= value <= high:
        raise invalid(param, f"{value} is out of range [{low}, {high}]")
    return value


def _string(value, param: str) -> str:
    if not isinstance(value, str):
        raise invalid(param, f"expected a string, got {_show(value)}", "invalid_type")
    return value


def _boolean(value, param: str) -> bool:
    if not isinstance(value, bool):
        raise invalid(param, f"expected true or false, got {_show(value)}", "invalid_type")
    return value


def _object(value, param: str) -> dict:
    if not isinstance(value, dict):
        raise invalid(param, f"expected an object, got {_show(value)}", "invalid_type")
    return value


def _show(value) -> str:
    """A short description of a wrong value: its JSON type and the start of it."""
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    text = repr(value)
    return f"{kind.get(type(value), type(value).__name__)} {text[:40]}{'...' if len(text) > 40 else ''}"


def _unknown(keys, allowed, where: str = "") -> None:
    extra = sorted(str(k) for k in keys if k not in allowed)
    if extra:
        name = f"{where}.{extra[0]}" if where else extra[0]
        raise APIError(
            400,
            f"unknown or unsupported parameter{'s' if len(extra) > 1 else ''}: {', '.join(extra)}"
            + (f" (in {where})" if where else ""),
            param=name,
            code="unknown_parameter",
        )


# ---- chat --------------------------------------------------------------------------------------------------
def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    """A checked ChatRequest from a decoded JSON body; APIError(400) naming the first bad field."""
    body = _object(body, "body")
    _unknown(body, CHAT_FIELDS)
    body = {k: v for k, v in body.items() if v is not None}  # OpenAI reads null as "not given"
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] != neutral:
            raise invalid(
                name, f"only {neutral!r} is supported, got {_show(body[name])}", "unsupported_value"
            )
    if "messages" not in body:
        raise invalid("messages", "is required", "missing_required_parameter")
    model = _string(body["model"], "model") if "model" in body else None
    messages = _messages(body["messages"], limits)
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise invalid("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
    tokens_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = limits.max_tokens
    if tokens_key in body:
        max_tokens = _integer(body[tokens_key], tokens_key, 1, limits.max_tokens)
    settings = Settings()
    if "temperature" in body:
        settings.temperature = _number(body["temperature"], "temperature", 0.0, MAX_TEMPERATURE)
        settings.do_sample = settings.temperature > 0  # 0 means greedy, as OpenAI documents it
        if not settings.do_sample:
            settings.temperature = None
    if "top_p" in body:
        settings.top_p = _number(body["top_p"], "top_p", 0.0, 1.0, low_open=True)
    if "seed" in body:
        settings.seed = _integer(body["seed"], "seed", 0, 2**63 - 1)
    if "min_tokens" in body:
        settings.min_tokens = _integer(body["min_tokens"], "min_tokens", 0, max_tokens)
    stream = _boolean(body.get("stream", False), "stream")
    include_usage = False
    if "stream_options" in body:
        options = _object(body["stream_options"], "stream_options")
        _unknown(options, {"include_usage"}, "stream_options")
        if not stream:
            raise invalid("stream_options", "is only allowed with stream: true")
        include_usage = _boolean(options.get("include_usage", False), "stream_options.include_usage")
    return ChatRequest(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        settings=settings,
        stop=_stop(body["stop"]) if "stop" in body else (),
        stream=stream,
        include_usage=include_usage,
        think=_boolean(body.get("think", False), "think"),
    )


def _stop(value) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not 1 <= len(values) <= MAX_STOP_STRINGS:
        raise invalid("stop", f"expected a string or an array of 1 to {MAX_STOP_STRINGS} strings")
    for i, text in enumerate(values):
        _string(text, f"stop[{i}]")
        if not 1 <= len(text) <= MAX_STOP_CHARS:
            raise invalid(f"stop[{i}]", f"a stop string must be 1 to {MAX_STOP_CHARS} characters")
    return tuple(values)


def _messages(value, limits: Limits) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise invalid("messages", "expected a non-empty array of messages")
    out = []
    for m, message in enumerate(value):
        where = f"messages[{m}]"
        message = _object(message, where)
        _unknown(message, {"role", "content"}, where)
        role = _string(message.get("role"), f"{where}.role")
        if role not in ROLES:
            raise invalid(
                f"{where}.role", f"unknown role {role!r:.40} (system, developer, user or assistant)"
            )
        if "content" not in message:
            raise invalid(f"{where}.content", "is required", "missing_required_parameter")
        content = message["content"]
        if isinstance(content, str) or content is None:
            out.append({"role": ROLES[role], "content": content or ""})
            continue
        if not isinstance(content, list):
            raise invalid(f"{where}.content", f"expected a string or an array of parts, got {_show(content)}")
        parts = [_part(part, f"{where}.content[{p}]", limits) for p, part in enumerate(content)]
        out.append({"role": ROLES[role], "content": parts})
    return out


def _part(part, where: str, limits: Limits) -> dict:
    part = _object(part, where)
    kind = _string(part.get("type"), f"{where}.type")
    if kind == "text":
        _unknown(part, {"type", "text"}, where)
        return {"type": "text", "text": _string(part.get("text"), f"{where}.text")}
    if kind == "input_audio":
        _unknown(part, {"type", "input_audio"}, where)
        audio = _object(part.get("input_audio"), f"{where}.input_audio")
        _unknown(audio, {"data", "format"}, f"{where}.input_audio")
        fmt = _string(audio.get("format"), f"{where}.input_audio.format")
        if fmt not in AUDIO_FORMATS:
            raise invalid(
                f"{where}.input_audio.format",
                f"unknown format {fmt!r:.40} (one of {', '.join(AUDIO_FORMATS)})",
            )
        data = _string(audio.get("data"), f"{where}.input_audio.data")
        ref = AudioRef(
            f"{where}.input_audio.data",
            data=decode_base64(data, f"{where}.input_audio.data", limits.max_audio_bytes),
        )
        return {"type": "audio", "audio": ref}
    if kind == "audio_url":
        _unknown(part, {"type", "audio_url"}, where)
        audio = _object(part.get("audio_url"), f"{where}.audio_url")
        _unknown(audio, {"url"}, f"{where}.audio_url")
        url = _string(audio.get("url"), f"{where}.audio_url.url")
        param = f"{where}.audio_url.url"
        if url.startswith("data:"):
            return {
                "type": "audio",
                "audio": AudioRef(param, data=parse_data_url(url, param, limits.max_audio_bytes)),
            }
        if url.startswith(("http://", "https://")):
            if not limits.allow_audio_urls:
                raise invalid(
                    param,
                    "this server does not fetch http(s) audio URLs (start it with "
                    "--allow-audio-urls); send the audio as input_audio or a data: URL",
                    "url_not_allowed",
                )
            return {"type": "audio", "audio": AudioRef(param, url=url)}
        raise invalid(param, f"expected a data: or http(s) URL, got {url[:40]!r}")
    raise invalid(f"{where}.type", f"unsupported part type {kind!r:.40} (text, input_audio or audio_url)")


# ---- transcriptions ----------------------------------------------------------------------------------------
def parse_transcription_form(fields: dict[str, list]) -> TranscriptionRequest:
    """A checked TranscriptionRequest from multipart fields: name -> [str or (filename, bytes), ...]."""
    _unknown(fields, TRANSCRIPTION_FIELDS | set(GRANULARITY_FIELDS))
    for name, values in fields.items():
        if len(values) > 1 and name not in GRANULARITY_FIELDS:
            raise invalid(name, "given more than once")
    if "file" not in fields:
        raise invalid(
            "file",
            "is required: upload the audio as the multipart field 'file'",
            "missing_required_parameter",
        )
    upload = fields["file"][0]
    if not isinstance(upload, tuple):
        raise invalid("file", "expected an uploaded file, got a text field", "invalid_type")
    filename, data = upload
    text = {name: values[0] for name, values in fields.items() if name != "file"}
    for name, value in text.items():
        if not isinstance(value, str):
            raise invalid(name, "expected a text field, got a file", "invalid_type")
    response_format = text.get("response_format", "json")
    if response_format not in TRANSCRIPTION_FORMATS:
        raise invalid(
            "response_format", f"{response_format!r:.40} is not one of {', '.join(TRANSCRIPTION_FORMATS)}"
        )
    if text.get("stream", "false").lower() != "false":
        raise invalid("stream", "streamed transcriptions are not supported", "unsupported_value")
    for name in GRANULARITY_FIELDS:
        for value in fields.get(name, []):
            if value != "segment":
                raise invalid(
                    name,
                    f"{value!r:.40}: only 'segment' timestamps exist (no word timestamps)",
                    "unsupported_value",
                )
    settings = Settings(do_sample=False)
    if "temperature" in text:
        try:
            value = float(text["temperature"])
        except ValueError:
            raise invalid(
                "temperature", f"expected a number, got {text['temperature'][:40]!r}", "invalid_type"
            ) from None
        if _number(value, "temperature", 0.0, MAX_TEMPERATURE) > 0:
            settings = Settings(do_sample=True, temperature=value)
    prompt = text.get("prompt") or None
    return TranscriptionRequest(
        text.get("model"), data, filename or "file", response_format, prompt, settings
    )
