"""Helpers of the server's tests: a real uvicorn server in a thread on a free port, and raw HTTP requests.

The servers listen on 127.0.0.1 at a port the OS picks (port 0), are stopped by the tests that start them,
and every wait has a deadline, so a hung server fails its test instead of hanging the suite.
"""

import base64
import http.client
import json
import socket
import threading
import time
from pathlib import Path

START_SECONDS = 120  # generous: a machine's first run compiles the CPU kernels
REQUEST_SECONDS = 120


class ThreadServer:
    """`minaf3 serve ARGS` run by uvicorn in a thread of this process; use as a context manager.

    --threads is this process's torch thread count, so that starting a server leaves it as it was for the
    tests that run after (torch's setting is process-wide)."""

    def __init__(self, *argv: str, server=None):
        if server is None:
            import torch

            from minaf3.cli import build_parser
            from minaf3.serve.server import make_server

            argv = ("--port", "0", "--threads", str(torch.get_num_threads()), *map(str, argv))
            args = build_parser().parse_args(["serve", *argv])
            server = make_server(args)
        self.server = server
        self.thread = threading.Thread(target=server.run, name="test-server", daemon=True)

    @property
    def state(self):
        return self.server.config.app.minaf3

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + START_SECONDS
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def wait_ready(self) -> "ThreadServer":
        """Wait until /health says the model is loaded."""
        deadline = time.monotonic() + START_SECONDS
        while request(self.port, "GET", "/health")[0] != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the test server's model did not load")
            time.sleep(0.05)
        return self

    def stats(self) -> dict:
        return json.loads(request(self.port, "GET", "/health")[2])["batcher"]

    def wait_stats(self, check, what: str) -> dict:
        """Poll /health until check(stats) holds; its stats then."""
        deadline = time.monotonic() + REQUEST_SECONDS
        while not check(stats := self.stats()):
            if time.monotonic() > deadline:
                raise AssertionError(f"the server never reached: {what}; stats {stats}")
            time.sleep(0.02)
        return stats

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def request(port: int, method: str, path: str, body=None, headers=None, chunked: bool = False):
    """(status, headers dict, body bytes) of one HTTP request on a fresh connection. body: bytes, str or
    anything JSON; chunked: sent without a Content-Length, in chunks."""
    if body is not None and not isinstance(body, bytes | str):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    if chunked:
        data = body
        body = (data[i : i + 65536] for i in range(0, len(data), 65536))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_SECONDS)
    try:
        connection.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def announce(port: int, path: str, length: int, headers=None):
    """(status, body bytes) of a POST that announces a Content-Length but sends no body: a server that
    answers before reading the body answers this one."""
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_SECONDS) as sock:
        lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {length}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def open_stream(port: int, body: dict, headers=None):
    """Start a streamed chat request; (connection, response) with the response's headers read."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_SECONDS)
    connection.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps({**body, "stream": True}),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    return connection, connection.getresponse()


def read_event(response) -> str | None:
    """The data of the next server-sent event (comments skipped); None at the end of the stream."""
    data = []
    while True:
        line = response.readline()
        if not line:
            return None
        line = line.decode().rstrip("\r\n")
        if line.startswith("data: "):
            data.append(line[6:])
        elif not line and data:
            return "\n".join(data)


def error_of(status: int, body: bytes) -> dict:
    """The `error` object of an OpenAI-shaped error body, checked to have exactly its four keys."""
    parsed = json.loads(body)
    assert set(parsed) == {"error"}, parsed
    error = parsed["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert "Traceback" not in error["message"]
    assert error["type"] == (
        "server_error"
        if status >= 500
        else "authentication_error"
        if status == 401
        else "invalid_request_error"
    )
    return error


def audio_part(path: Path | str, fmt: str | None = None) -> dict:
    """An input_audio part holding the file at `path`, its format from its extension by default."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt or Path(path).suffix[1:]}}


def ask(path, question: str, fmt: str | None = None) -> list[dict]:
    """One user message: the audio first (as Pipeline.chat puts it), then the question."""
    return [{"role": "user", "content": [audio_part(path, fmt), {"type": "text", "text": question}]}]
