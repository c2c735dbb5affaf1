"""Load test of `minaf3 serve` on loopback: concurrent clients, dynamic batching against one at a time.

    python tools/load_serve.py [--clients 32] [--requests 4]      the tiny trained model, task clips
    python tools/load_serve.py --model DIR --workload speech [--min-tokens 32] [--max-tokens 64]

Starts two `minaf3 serve` subprocesses on 127.0.0.1 (free ports), on minaf3.TINY_MODEL unless --model is
given: one with --max-batch-size 1 (one request per generate call: serving one request at a time), one with
dynamic batching (--max-batch-size 32, the default 10 ms window, the default --max-padding or the one
given). In each of --rounds rounds, the two take turns (an idle server costs nothing, and turns spread the
machine's other load over both); each time the same
clients x requests chat requests are sent by `clients` threads at once, each client sending its requests one
after another, every fourth one streamed, greedy. The "tasks" workload: 8 clips of the listening tasks
(tasks.py, evaluation seed 0) with their own questions, answered to their end (at most --max-tokens). The
"speech" workload, for random-weight checkpoints: 8 speech-like clips of 1-6 s, four questions, answers of
--min-tokens to --max-tokens tokens. It checks that every request is answered (nothing lost) and that every
answer equals the one-at-a-time server's first-round answer, and prints the CPU it ran on (/proc/cpuinfo:
model and flags), then a table: answered, equal, median wall time and requests per second over the rounds,
median and 95th percentile latency (all rounds), mean rows and milliseconds per generate call, the share of
the time spent in generate, and the speed-up in throughput (ratio of the median rates; each round's is listed
too).

Bounded: loopback only, each request times out after REQUEST_SECONDS, each run after RUN_SECONDS, and the
servers are stopped (SIGTERM, then SIGKILL) whatever happens.
"""

import argparse
import base64
import contextlib
import http.client
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REQUEST_SECONDS = 120
RUN_SECONDS = 600
START_SECONDS = 300  # a machine's first run compiles the CPU kernels
QUESTIONS = [
    "What is in this audio?",
    "Describe it.",
    "Transcribe the input speech.",
    "Is this music happy or sad?",
]


def cpu_description() -> str:
    """The CPU's model name and flags, from /proc/cpuinfo (Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"CPU: {platform.processor() or 'unknown'} (no /proc/cpuinfo)"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = textwrap.fill(fields.get("flags", "?"), 110, initial_indent="    ", subsequent_indent="    ")
    return f"CPU: {fields.get('model name', '?')}, {os.cpu_count()} logical cores; flags:\n{flags}"


def load_average() -> str:
    """The 1-minute load average: how busy the machine was with other work."""
    return f"{os.getloadavg()[0]:.1f}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wav_base64(waveform: np.ndarray) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, waveform, 16000, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


def body(clip: str, question: str, n: int, **options) -> dict:
    """A chat request about a base64 wav clip; every fourth one (by n) streamed."""
    audio = {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}}
    messages = [{"role": "user", "content": [audio, {"type": "text", "text": question}]}]
    return {"model": "load", "messages": messages, "temperature": 0, "stream": n % 4 == 3, **options}


def task_workload(clients: int, requests: int, max_tokens: int) -> list[dict]:
    """clients x requests chat bodies over 8 clips of the listening tasks, each with its own question."""
    from minaf3.tasks import TASKS, examples

    clips = list(examples(TASKS, seed=0, n=8))
    encoded = [wav_base64(clip.waveform) for clip in clips]
    return [
        body(encoded[n % 8], clips[n % 8].question, n, max_tokens=max_tokens)
        for n in range(clients * requests)
    ]


def workload(clients: int, requests: int, min_tokens: int, max_tokens: int) -> list[dict]:
    """clients x requests chat bodies over 8 clips of 1-6 s (the demo's speech-like signal).

    Every answer is min_tokens to max_tokens long: a random-weight model would often end after a few tokens,
    far shorter than AF3's answers; one min_tokens for all keeps them batchable together.
    """
    from minaf3.demo import demo_clip

    clips = [wav_base64(demo_clip(1.0 + 5.0 * i / 7, seed=i)) for i in range(8)]
    return [
        body(
            clips[n % 8],
            QUESTIONS[n % len(QUESTIONS)],
            n,
            max_tokens=min_tokens + (n * 7) % (max_tokens - min_tokens + 1),
            min_tokens=min_tokens,
        )
        for n in range(clients * requests)
    ]


def send(port: int, body: dict) -> str:
    """The answer's text (a stream's pieces joined); raises on anything but 200."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_SECONDS)
    try:
        connection.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        if not body["stream"]:
            return json.loads(response.read())["choices"][0]["message"]["content"]
        pieces = []
        for line in response:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                choices = json.loads(line[6:])["choices"]
                pieces += [c["delta"].get("content") or "" for c in choices]
        return "".join(pieces)
    finally:
        connection.close()


class Server:
    """`minaf3 serve` in a subprocess on a free loopback port; a context manager that always stops it."""

    def __init__(self, model: Path, *options: str):
        self.port = free_port()
        command = [
            sys.executable,
            "-m",
            "minaf3",
            "serve",
            "--model",
            str(model),
            "--port",
            str(self.port),
            "--served-model-name",
            "load",
            "--max-queue",
            "1024",
            *options,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + START_SECONDS
        while self.health().get("status") != "ok":
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {self.process.stderr.read()[-2000:]}")
            time.sleep(0.2)
        return self

    def health(self) -> dict:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            connection.request("GET", "/health")
            return json.loads(connection.getresponse().read())
        except (OSError, ValueError):
            return {}

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def run(port: int, bodies: list[dict], clients: int) -> tuple[list, list, float]:
    """Send the bodies from `clients` threads at once; (answers or None, latencies in s, wall time in s)."""
    answers: list = [None] * len(bodies)
    latencies: list = [None] * len(bodies)
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        start.wait()
        for n in range(c, len(bodies), clients):
            begun = time.perf_counter()
            try:
                answers[n] = send(port, bodies[n])
            except Exception as exc:  # reported as lost below
                print(f"request {n}: {type(exc).__name__}: {exc}", file=sys.stderr)
            latencies[n] = time.perf_counter() - begun

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    begun = time.perf_counter()
    deadline = begun + RUN_SECONDS
    for thread in threads:
        thread.join(max(0.0, deadline - time.perf_counter()))
    return answers, latencies, time.perf_counter() - begun


def measure(server: Server, bodies: list[dict], clients: int) -> dict:
    """One round on a running server: answers, latencies and wall time (s), rows, calls, time in generate."""
    before = server.health()["batcher"]
    answers, latencies, wall = run(server.port, bodies, clients)
    after = server.health()["batcher"]
    calls = after["batches"] - before["batches"]
    return {
        "answers": answers,
        "latencies": latencies,
        "wall": wall,
        "rows": after["rows"] - before["rows"],
        "calls": calls,
        "busy": after["busy_seconds"] - before["busy_seconds"],
    }


def report(rounds: dict[str, list[dict]]) -> bool:
    """Print the table (medians over rounds, latencies pooled); True if nothing was lost and all are equal."""
    baseline = rounds["one at a time"]
    reference = baseline[0]["answers"]
    rate = {
        name: float(np.median([len(r["answers"]) / r["wall"] for r in runs])) for name, runs in rounds.items()
    }
    print(
        "| serving | answered | equal to one at a time | median wall s | requests/s | p50 latency s "
        "| p95 latency s | rows per generate call | ms per generate call | time in generate "
        "| throughput vs one at a time |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ok = True
    for name, runs in rounds.items():
        total = sum(len(r["answers"]) for r in runs)
        answered = sum(a is not None for r in runs for a in r["answers"])
        equal = sum(
            a is not None and a == b for r in runs for a, b in zip(r["answers"], reference, strict=True)
        )
        done = [t for r in runs for t, a in zip(r["latencies"], r["answers"], strict=True) if a is not None]
        p50, p95 = np.percentile(done, [50, 95]) if done else (float("nan"),) * 2
        calls = max(1, sum(r["calls"] for r in runs))
        rows, per_call = sum(r["rows"] for r in runs) / calls, 1000 * sum(r["busy"] for r in runs) / calls
        busy = sum(r["busy"] for r in runs) / sum(r["wall"] for r in runs)
        wall = float(np.median([r["wall"] for r in runs]))
        speedup = rate[name] / rate["one at a time"]
        print(
            f"| {name} | {answered}/{total} | {equal}/{total} | {wall:.2f} | {rate[name]:.1f} | {p50:.3f} | "
            f"{p95:.3f} | {rows:.1f} | {per_call:.0f} | {busy:.0%} | {speedup:.2f}x |"
        )
        ok &= answered == total and equal == total
    ratios = [
        len(b["answers"]) / b["wall"] / (len(a["answers"]) / a["wall"])
        for a, b in zip(baseline, rounds["dynamic batching"], strict=True)
    ]
    print(f"\nthroughput vs one at a time, round by round: {', '.join(f'{x:.2f}x' for x in ratios)}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: minaf3.TINY_MODEL)")
    parser.add_argument("--workload", choices=["tasks", "speech"], default="tasks")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--min-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=32, help="of the batched server")
    parser.add_argument(
        "--max-padding", type=float, default=None, help="of the batched server (default: the server's)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds, the two servers taking turns")
    parser.add_argument("--threads", type=int, default=None, help="the servers' torch threads")
    args = parser.parse_args()
    import torch

    import minaf3

    print(cpu_description())
    print(f"torch {torch.__version__}, python {platform.python_version()}; load average {load_average()}")
    if args.workload == "tasks":
        bodies = task_workload(args.clients, args.requests, args.max_tokens)
        answers = f"the tasks' own questions, answered to their end (at most {args.max_tokens} tokens)"
    else:
        bodies = workload(args.clients, args.requests, args.min_tokens, args.max_tokens)
        answers = f"answers of {args.min_tokens} to {args.max_tokens} tokens"
    options = ["--max-new-tokens", str(args.max_tokens)] + (
        ["--threads", str(args.threads)] if args.threads else []
    )
    model = args.model or minaf3.TINY_MODEL
    print(
        f"model: {model}; {args.workload} workload: {args.clients} clients x {args.requests} requests, "
        f"greedy, {answers}; {args.rounds} rounds, the servers taking turns; torch threads: "
        f"{args.threads or 'the server default'}\n"
    )
    padding = ["--max-padding", str(args.max_padding)] if args.max_padding is not None else []
    modes = {"one at a time": ["--max-batch-size", "1"]}
    modes["dynamic batching"] = ["--max-batch-size", str(args.max_batch_size), *padding]
    rounds: dict[str, list[dict]] = {name: [] for name in modes}
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(Server(model, *mode, *options)) for name, mode in modes.items()}
        for server in servers.values():
            send(server.port, bodies[0])  # warm up: kernels loaded, first-call costs paid
        for _ in range(args.rounds):
            for name, server in servers.items():
                rounds[name].append(measure(server, bodies, args.clients))
    ok = report(rounds)
    print(f"load average at the end {load_average()} (other jobs on this machine slow both servers)")
    print("nothing lost, every answer equal to its one-at-a-time answer: " + ("yes" if ok else "NO"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
