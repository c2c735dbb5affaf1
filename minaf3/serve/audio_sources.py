"""The audio of a request as a waveform: base64 data, data: URLs and, when allowed, http(s) URLs, all bounded.

    input_audio {"data": base64, "format": "wav"}   decode_base64 (at parse time: bad base64 is a 400 at once)
    audio_url {"url": "data:audio/wav;base64,..."}  parse_data_url
    audio_url {"url": "https://..."}                fetch, only with --allow-audio-urls: at most max_bytes,
                                                    FETCH_SECONDS in all, http(s) redirects only
    multipart file                                  the upload's bytes
      -> to_waveform(bytes, where)                  16 kHz mono float32 (minaf3.audio), errors naming `where`

The declared format is checked against the formats minaf3 decodes; the data's own header then decides how
it is decoded (libsndfile reads WAV, FLAC, OGG and MP3). Strings from a request never reach load_audio as
strings: it would read them as paths on the server.
"""

import base64
import binascii
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np

from minaf3.conversation import read_audio

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
FETCH_SECONDS = 20.0  # the whole download, connection included; each read also times out after this
FETCH_BLOCK = 1 << 16
DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,")


class SourceError(ValueError):
    """Audio bytes that cannot be had: bad base64, a malformed data: URL, a failed or oversized download.

    status: the HTTP status the server answers with (400, or 413 for audio over the size limit).
    """

    def __init__(self, param: str, message: str, status: int = 400):
        super().__init__(f"{param}: {message}")
        self.param, self.status = param, status


@dataclass
class AudioRef:
    """One audio part of a request: its bytes, or an http(s) URL still to fetch. where names it in errors."""

    where: str
    data: bytes | None = None
    url: str | None = None


def decode_base64(text: str, where: str, max_bytes: int) -> bytes:
    """Standard base64 (padding required, no line breaks) -> bytes, at most max_bytes of them."""
    if len(text) // 4 * 3 > max_bytes:
        raise SourceError(
            where, f"audio of about {len(text) // 4 * 3:,} bytes is over the {max_bytes:,}-byte limit", 413
        )
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SourceError(where, f"not valid base64 ({exc})") from None
    if not data:
        raise SourceError(where, "is empty: no audio")
    return data


def parse_data_url(url: str, where: str, max_bytes: int) -> bytes:
    """The bytes of a base64 data: URL (data:audio/wav;base64,....); other data: URLs are refused."""
    match = DATA_URL.match(url)
    if match is None or not match["b64"]:
        raise SourceError(where, "expected a base64 data: URL such as data:audio/wav;base64,...")
    mime = match["mime"] or ""
    if mime and not mime.startswith(("audio/", "application/octet-stream")):
        raise SourceError(where, f"a data: URL of type {mime!r} is not audio")
    return decode_base64(url[match.end() :], where, max_bytes)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) URLs only (urllib's default also follows ftp)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.startswith(("http://", "https://")):
            raise urllib.error.URLError(f"redirect to a non-http(s) URL {newurl[:60]!r}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.OpenerDirector()
for _handler in (
    urllib.request.HTTPHandler,
    urllib.request.HTTPSHandler,
    _HttpOnlyRedirects,
    urllib.request.HTTPErrorProcessor,
    urllib.request.HTTPDefaultErrorHandler,
):
    _OPENER.add_handler(_handler())


def fetch(url: str, where: str, max_bytes: int, seconds: float = FETCH_SECONDS) -> bytes:
    """Download `url` (http or https): at most max_bytes, within `seconds` in all; SourceError otherwise."""
    deadline = time.monotonic() + seconds
    try:
        with _OPENER.open(url, timeout=seconds) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise SourceError(
                    where, f"{url[:80]}: {int(declared):,} bytes, over the {max_bytes:,}-byte limit", 413
                )
            blocks, size = [], 0
            while block := response.read(FETCH_BLOCK):
                size += len(block)
                if size > max_bytes:
                    raise SourceError(where, f"{url[:80]}: more than the {max_bytes:,}-byte limit", 413)
                if time.monotonic() > deadline:
                    raise SourceError(where, f"{url[:80]}: download took over {seconds:g} s")
                blocks.append(block)
    except urllib.error.HTTPError as exc:
        raise SourceError(where, f"{url[:80]}: download failed with HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SourceError(where, f"{url[:80]}: download failed ({getattr(exc, 'reason', exc)})") from None
    if not size:
        raise SourceError(where, f"{url[:80]}: the download is empty")
    return b"".join(blocks)


def resolve(ref: AudioRef, max_bytes: int) -> bytes:
    """The bytes of an audio part, fetching a URL if it holds one."""
    return ref.data if ref.data is not None else fetch(ref.url, ref.where, max_bytes)


def to_waveform(data: bytes, where: str) -> np.ndarray:
    """Decoded, downmixed and resampled to 16 kHz mono float32; AudioError naming `where` if it cannot be."""
    return read_audio(bytes(data), where)
