"""Malformed requests to `minaf3 serve`: each gets its 4xx in OpenAI's error shape naming the problem, and
the server answers the next good request. Hand-picked cases first, then hypothesis-generated ones."""

import base64
import io
import json

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_support import ThreadServer, announce, ask, audio_part, error_of, request

from minaf3.demo import CLIP_NAME
from minaf3.serve.openai_format import CHAT_FIELDS

CAP = 8  # the server's --max-new-tokens
UPLOAD_MB = 1


@pytest.fixture(scope="module")
def server(demo_checkpoint):
    argv = ["--model", demo_checkpoint, "--max-new-tokens", CAP, "--served-model-name", "m"]
    with ThreadServer(*argv, "--max-upload-mb", UPLOAD_MB) as running:
        yield running.wait_ready()


@pytest.fixture(scope="module")
def good(demo_checkpoint) -> dict:
    """A valid chat body: the demo clip and a question, greedy, one token."""
    return {
        "model": "m",
        "messages": ask(demo_checkpoint / CLIP_NAME, "Describe it."),
        "temperature": 0,
        "max_tokens": 1,
    }


def still_answers(server, good) -> None:
    status, _, body = request(server.port, "POST", "/v1/chat/completions", good)
    assert status == 200, body
    assert isinstance(json.loads(body)["choices"][0]["message"]["content"], str)


def with_part(good: dict, part: dict) -> dict:
    return {**good, "messages": [{"role": "user", "content": [part, {"type": "text", "text": "Hi."}]}]}


def silent_flac(seconds: float) -> str:
    """Base64 of a silent FLAC (a few kB even for ten minutes)."""
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(int(16000 * seconds), np.float32), 16000, format="FLAC")
    return base64.b64encode(buffer.getvalue()).decode()


def audio(data: str = "AA==", fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


def url(address: str) -> dict:
    return {"type": "audio_url", "audio_url": {"url": address}}


def part(content: dict):
    return lambda good: with_part(good, content)


def fields(**changed):
    return lambda good: {**good, **changed}


def message(**one):
    return lambda good: {**good, "messages": [one]}


P = "messages[0].content[0]"
# name -> (a body made from a good one, status, param or None, a fragment of the message)
CHAT_CASES = {
    "not JSON": (lambda g: b'{"messages": [', 400, None, "not valid JSON"),
    "not UTF-8": (lambda g: b'{"model": "\xff"}', 400, None, "not valid JSON"),
    "an array": (lambda g: [g], 400, "body", "expected an object"),
    "no messages": (lambda g: {"model": "m"}, 400, "messages", "is required"),
    "messages a string": (fields(messages="hi"), 400, "messages", "non-empty array"),
    "no message": (fields(messages=[]), 400, "messages", "non-empty array"),
    "unknown role": (message(role="robot", content="x"), 400, "messages[0].role", "unknown role"),
    "no content": (message(role="user"), 400, "messages[0].content", "required"),
    "content a number": (message(role="user", content=5), 400, "messages[0].content", "a string or an array"),
    "a name": (message(role="user", content="x", name="b"), 400, "messages[0].name", "parameter: name"),
    "an image": (part({"type": "image_url", "image_url": {"url": "x"}}), 400, f"{P}.type", "'image_url'"),
    "bad base64": (part(audio("UklG!")), 400, f"{P}.input_audio.data", "not valid base64"),
    "empty audio": (part(audio("")), 400, f"{P}.input_audio.data", "empty"),
    "unknown format": (part(audio(fmt="aac")), 400, f"{P}.input_audio.format", "unknown format 'aac'"),
    "no data": (
        part({"type": "input_audio", "input_audio": {"format": "wav"}}),
        400,
        f"{P}.input_audio.data",
        "expected a string",
    ),
    "not audio": (part(audio("UklGRg==")), 400, None, f"{P}.input_audio.data: <4 bytes>: cannot decode"),
    "http URL": (part(url("http://127.0.0.1:9/a.wav")), 400, f"{P}.audio_url.url", "--allow-audio-urls"),
    "text data URL": (part(url("data:text/plain;base64,aGk=")), 400, f"{P}.audio_url.url", "is not audio"),
    "file URL": (part(url("file:///etc/passwd")), 400, f"{P}.audio_url.url", "a data: or http(s) URL"),
    "audio over 600 s": (lambda g: with_part(g, audio(silent_flac(601), "flac")), 400, None, "at most 600 s"),
    "a placeholder": (message(role="user", content="<sound> what?"), 400, None, "<sound>"),
    "a long prompt": (message(role="user", content="hello " * 20_000), 400, None, "over the limit"),
    "unknown field": (fields(foo=1, bar=None), 400, "bar", "parameters: bar, foo"),
    "n=2": (fields(n=2), 400, "n", "only 1 is supported"),
    "logprobs": (fields(logprobs=True), 400, "logprobs", "only False is supported"),
    "max_tokens 0": (fields(max_tokens=0), 400, "max_tokens", "out of range [1, 8]"),
    "max_tokens over": (fields(max_tokens=CAP + 1), 400, "max_tokens", "out of range [1, 8]"),
    "max_tokens text": (fields(max_tokens="5"), 400, "max_tokens", "expected an integer"),
    "both lengths": (fields(max_completion_tokens=2), 400, "max_completion_tokens", "not both"),
    "min over max": (fields(min_tokens=2), 400, "min_tokens", "out of range [0, 1]"),
    "temperature": (fields(temperature=-0.5), 400, "temperature", "out of range"),
    "temperature text": (fields(temperature="hot"), 400, "temperature", "expected a number"),
    "top_p 0": (fields(top_p=0), 400, "top_p", "out of range (0.0, 1.0]"),
    "seed": (fields(seed=-1), 400, "seed", "out of range"),
    "five stops": (fields(stop=list("abcde")), 400, "stop", "1 to 4 strings"),
    "a long stop": (fields(stop="x" * 300), 400, "stop[0]", "1 to 256 characters"),
    "stream": (fields(stream="yes"), 400, "stream", "expected true or false"),
    "stream_options": (fields(stream_options={"include_usage": True}), 400, "stream_options", "with stream"),
    "think": (fields(think=1), 400, "think", "expected true or false"),
    "another model": (fields(model="gpt-4o"), 404, "model", "not served here"),
}


@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_malformed_chat_requests(server, good, case):
    make, status, param, fragment = CHAT_CASES[case]
    got, _, body = request(server.port, "POST", "/v1/chat/completions", make(good))
    assert got == status, body
    error = error_of(got, body)
    assert error["param"] == param and fragment in error["message"], error
    still_answers(server, good)


def form(fields: list[tuple[str, str | tuple[str, bytes]]]) -> tuple[bytes, dict]:
    """A multipart/form-data body (urllib3's encoder): (name, text) and (name, (filename, bytes)) fields."""
    from urllib3 import encode_multipart_formdata

    body, content_type = encode_multipart_formdata(fields)
    return body, {"Content-Type": content_type}


TRANSCRIPTION_CASES = {
    "no file": ([("model", "m")], "file", "is required"),
    "file as text": ([("file", "abc")], "file", "expected an uploaded file"),
    "vtt": ([("file", "CLIP"), ("response_format", "vtt")], "response_format", "'vtt' is not one of"),
    "language": ([("file", "CLIP"), ("language", "en")], "language", "unknown or unsupported parameter"),
    "words": ([("file", "CLIP"), ("timestamp_granularities[]", "word")], "timestamp_granularities[]", "word"),
    "stream": ([("file", "CLIP"), ("stream", "true")], "stream", "not supported"),
    "temperature": ([("file", "CLIP"), ("temperature", "warm")], "temperature", "expected a number"),
    "twice": ([("file", "CLIP"), ("model", "m"), ("model", "m")], "model", "more than once"),
    "not audio": ([("file", ("a.wav", b"RIFF....WAVE"))], None, "cannot decode audio"),
    "two files": ([("file", "CLIP"), ("other", "CLIP")], None, "malformed request"),
}


@pytest.mark.parametrize("case", list(TRANSCRIPTION_CASES))
def test_malformed_transcription_requests(server, good, demo_checkpoint, case):
    fields, param, fragment = TRANSCRIPTION_CASES[case]
    clip = ("clip.wav", (demo_checkpoint / CLIP_NAME).read_bytes())
    body, headers = form([(name, clip if value == "CLIP" else value) for name, value in fields])
    status, _, answer = request(server.port, "POST", "/v1/audio/transcriptions", body, headers)
    assert status == 400, answer
    error = error_of(status, answer)
    assert error["param"] == param and fragment in error["message"], error
    still_answers(server, good)


def test_oversized_bodies_get_413(server, good):
    """Over --max-upload-mb: refused on its Content-Length before any of it is read, or counted as it
    arrives when sent in chunks; JSON or multipart."""
    big = json.dumps({**good, "pad": "x" * (UPLOAD_MB * 2**20)}).encode()
    upload, headers = form([("file", ("big.wav", b"x" * (UPLOAD_MB * 2**20)))])
    for path, body, kind in (
        ("/v1/chat/completions", big, {}),
        ("/v1/audio/transcriptions", upload, headers),
    ):
        status, answer = announce(server.port, path, len(body), kind)
        assert status == 413 and f"{len(body):,} bytes" in error_of(status, answer)["message"]
        status, _, answer = request(server.port, "POST", path, body, kind, chunked=True)
        assert status == 413, (path, answer)
        assert "over this server's limit" in error_of(status, answer)["message"]
        still_answers(server, good)


def test_unknown_routes_and_methods(server, good):
    for method, path, status in (
        ("GET", "/v1/nothing", 404),
        ("GET", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models", 405),
    ):
        got, _, body = request(server.port, method, path)
        assert got == status and path in error_of(got, body)["message"]
    still_answers(server, good)


# ---- generated ---------------------------------------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
# null means "not given", so the wrong values are never null.
NOT_INT = JSON.filter(lambda v: v is not None and (isinstance(v, bool) or not isinstance(v, int)))
NOT_NUMBER = JSON.filter(lambda v: v is not None and (isinstance(v, bool) or not isinstance(v, int | float)))
# Per field, values that are wrong for it: of a wrong type or out of range.
WRONG = {
    "max_tokens": NOT_INT | st.integers(max_value=0) | st.integers(min_value=CAP + 1),
    "temperature": NOT_NUMBER | st.floats(max_value=-1e-6) | st.floats(min_value=2.001),
    "top_p": NOT_NUMBER | st.floats(max_value=0) | st.floats(min_value=1.001),
    "seed": NOT_INT | st.integers(max_value=-1),
    "stream": JSON.filter(lambda v: v is not None and not isinstance(v, bool)),
    "stop": JSON.filter(
        lambda v: (
            v is not None
            and not isinstance(v, str)
            and not (isinstance(v, list) and 1 <= len(v) <= 4 and all(isinstance(s, str) and s for s in v))
        )
    )
    | st.just(""),
    "n": JSON.filter(lambda v: v is not None and v != 1),
    "messages": JSON.filter(
        lambda v: (
            v is not None
            and not (
                isinstance(v, list)
                and v
                and all(
                    isinstance(m, dict) and m.get("role") in ("user", "system", "assistant", "developer")
                    for m in v
                )
            )
        )
    ),
    "think": JSON.filter(lambda v: v is not None and not isinstance(v, bool)),
}
NOT_BASE64 = st.text(min_size=1, max_size=12).map(lambda s: s + "!")
NOT_A_FORMAT = st.text(max_size=8).filter(lambda f: f not in ("wav", "mp3", "flac", "ogg"))


@st.composite
def malformed(draw, good: dict) -> bytes:
    """A chat body with exactly one thing wrong with it, as bytes."""
    kind = draw(st.sampled_from(["field", "unknown", "audio", "truncated", "bytes"]))
    body = json.loads(json.dumps(good))
    if kind == "field":
        name = draw(st.sampled_from(sorted(WRONG)))
        body[name] = draw(WRONG[name])
    elif kind == "unknown":
        body[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in CHAT_FIELDS))] = draw(JSON)
    elif kind == "audio":
        audio = body["messages"][0]["content"][0]["input_audio"]
        which = draw(st.sampled_from(["data", "format", "bytes"]))
        if which == "data":
            audio["data"] = draw(NOT_BASE64)
        elif which == "format":
            audio["format"] = draw(NOT_A_FORMAT)
        else:  # valid base64 of bytes that are not audio
            audio["data"] = base64.b64encode(draw(st.binary(min_size=1, max_size=64))).decode()
    text = json.dumps(body).encode()
    if kind == "truncated":
        return text[: draw(st.integers(1, len(text) - 1))]
    if kind == "bytes":
        return draw(st.binary(max_size=40))
    return text


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_generated_malformed_chat_requests(server, good, data):
    body = data.draw(malformed(good))
    status, _, answer = request(server.port, "POST", "/v1/chat/completions", body)
    assert 400 <= status < 500, (body[:200], answer)
    error_of(status, answer)
    still_answers(server, good)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    upload=st.binary(max_size=200),
    extra=st.lists(
        st.tuples(st.text("abcdefghij_", min_size=1, max_size=8), st.text(max_size=8)), max_size=3
    ),
    response_format=st.one_of(st.none(), NOT_A_FORMAT.filter(lambda f: f not in ("json", "text", "srt"))),
)
def test_generated_malformed_transcriptions(server, good, upload, extra, response_format):
    """Bytes that are not audio, unknown fields, unknown formats: 400 whatever the mix."""
    fields = [("file", ("upload.bin", upload)), *[(f"x_{name}", value) for name, value in extra]]
    if response_format is not None:
        fields.append(("response_format", response_format))
    body, headers = form(fields)
    status, _, answer = request(server.port, "POST", "/v1/audio/transcriptions", body, headers)
    assert status == 400, answer
    error_of(status, answer)
    still_answers(server, good)


def test_valid_audio_still_answers(server, good, demo_checkpoint):
    """The good request these tests lean on is not refused for a reason of its own."""
    assert good["messages"][0]["content"][0] == audio_part(demo_checkpoint / CLIP_NAME, "wav")
    still_answers(server, good)
