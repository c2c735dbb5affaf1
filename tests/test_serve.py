"""`minaf3 serve` through the official openai client and raw HTTP: every answer equals minaf3.load(...)'s.

Real uvicorn servers run in threads of this process on free loopback ports (serve_support.py), on the demo
checkpoint; decoding is greedy unless a test samples with a seed, so the server's answer and the pipeline's
must be equal, text and token counts. The batching tests use a server whose window is long enough that a
batch forms only when it is full, so what they assert does not depend on timing.
"""

import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import run_python, speech_like
from serve_support import ThreadServer, ask, audio_part, error_of, open_stream, read_event, request

import minaf3
from minaf3.cli import main
from minaf3.demo import CLIP_NAME

openai = pytest.importorskip("openai", reason="the test extra installs openai")

MODEL = "audio-flamingo-3-hf"  # served under the official name, as the README's examples say
TOKENS = 12  # the main server's --max-new-tokens: every default-length answer is this long at most
QUESTION = "What is in this audio?"
KEY = "test-key"
README_TOKENS = 48


@pytest.fixture(scope="module")
def clips(demo_checkpoint, tmp_path_factory) -> dict:
    """The demo clip (wav) and speech-like clips of other lengths in flac, mp3 and ogg."""
    folder = tmp_path_factory.mktemp("serve_clips")
    paths = {"wav": demo_checkpoint / CLIP_NAME}
    for i, (fmt, rate, seconds) in enumerate([("flac", 16000, 2.5), ("mp3", 22050, 3.0), ("ogg", 8000, 1.5)]):
        paths[fmt] = folder / f"clip{i}.{fmt}"
        sf.write(paths[fmt], speech_like(int(rate * seconds), rate, seed=i + 1), rate, format=fmt.upper())
    return paths


@pytest.fixture(scope="module")
def server(demo_checkpoint):
    argv = ["--model", demo_checkpoint, "--max-new-tokens", TOKENS, "--served-model-name", MODEL]
    with ThreadServer(*argv, "--max-upload-mb", 2) as running:
        yield running.wait_ready()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def batching(demo_checkpoint):
    """Batches of 2, a 30 s window (a batch forms when full), a queue of 2 rows, an API key; any padding, so
    clips of any length batch together (how rows are grouped by length: test_serve_batcher.py)."""
    argv = ["--model", demo_checkpoint, "--max-batch-size", 2, "--batch-window-ms", 30_000, "--max-queue", 2]
    argv += ["--max-padding", 100]
    with ThreadServer(*argv, "--max-new-tokens", 4000, "--api-key", KEY) as running:
        yield running.wait_ready()


def greedy(pipe, path, question=QUESTION, tokens=TOKENS, **kwargs) -> str:
    return pipe.chat(question, audio=str(path), do_sample=False, max_new_tokens=tokens, **kwargs)


def counts(pipe, path, question=QUESTION, tokens=TOKENS) -> tuple[int, int]:
    """(prompt tokens, new tokens up to and including the end-of-sequence token) of the greedy answer."""
    conversation = [
        {
            "role": "user",
            "content": [{"type": "audio", "path": str(path)}, {"type": "text", "text": question}],
        }
    ]
    inputs = pipe.processor.apply_chat_template(conversation)
    prompt = inputs["input_ids"].shape[1]
    new = pipe.model.generate(**inputs, do_sample=False, max_new_tokens=tokens)[0, prompt:].tolist()
    eos = set(pipe.model.generation_config.eos_token_id)
    return prompt, next((i + 1 for i, t in enumerate(new) if t in eos), len(new))


# ---- chat ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "ogg"])
def test_chat_with_input_audio_equals_pipeline(client, clips, demo_pipeline, fmt):
    question = QUESTION if fmt in ("wav", "mp3") else "Describe it."
    reply = client.chat.completions.create(
        model=MODEL, messages=ask(clips[fmt], question), temperature=0, max_tokens=TOKENS
    )
    assert reply.choices[0].message.content == greedy(demo_pipeline, clips[fmt], question)
    prompt, new = counts(demo_pipeline, clips[fmt], question)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt, new)
    assert reply.usage.total_tokens == prompt + new
    assert reply.choices[0].finish_reason == ("length" if new == TOKENS else "stop")
    assert reply.model == MODEL and reply.object == "chat.completion"


def test_audio_url_data_url_and_system_message(client, clips, demo_pipeline):
    data = audio_part(clips["flac"])["input_audio"]["data"]
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "audio_url", "audio_url": {"url": f"data:audio/flac;base64,{data}"}},
                {"type": "text", "text": QUESTION},
            ],
        },
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6)
    expected = [
        dict(messages[0]),
        {
            "role": "user",
            "content": [{"type": "audio", "path": str(clips["flac"])}, {"type": "text", "text": QUESTION}],
        },
    ]
    assert reply.choices[0].message.content == demo_pipeline.chat(expected, do_sample=False, max_new_tokens=6)


def test_streaming_equals_pipeline(client, server, clips, demo_pipeline):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ask(clips["wav"], QUESTION),
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # it did stream, piece by piece
    assert "".join(pieces) == greedy(demo_pipeline, clips["wav"])
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    prompt, new = counts(demo_pipeline, clips["wav"])
    assert finish == ["length" if new == TOKENS else "stop"]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == new
    assert chunks[-1].usage.prompt_tokens == prompt
    # On the wire, the stream ends with OpenAI's sentinel.
    connection, response = open_stream(server.port, {"model": MODEL, "messages": ask(clips["ogg"], QUESTION)})
    events = list(iter(lambda: read_event(response), None))
    connection.close()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"]


def test_seeded_sampling_equals_pipeline(client, clips, demo_pipeline):
    settings = {"temperature": 0.9, "top_p": 0.95}
    reply = client.chat.completions.create(
        model=MODEL, messages=ask(clips["mp3"], QUESTION), seed=7, **settings
    )
    generator = torch.Generator().manual_seed(7)
    expected = demo_pipeline.chat(
        QUESTION,
        audio=str(clips["mp3"]),
        do_sample=True,
        generator=generator,
        max_new_tokens=TOKENS,
        **settings,
    )
    assert reply.choices[0].message.content == expected


def test_stop_strings_cut_the_answer(client, clips, demo_pipeline):
    full = greedy(demo_pipeline, clips["wav"])
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.find(stop)]
    common = {
        "model": MODEL,
        "messages": ask(clips["wav"], QUESTION),
        "temperature": 0,
        "stop": [stop, "\x00"],
    }
    reply = client.chat.completions.create(**common)
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (expected, "stop")
    streamed = list(client.chat.completions.create(**common, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_think_appends_the_reasoning_request(client, clips, demo_pipeline):
    plain = client.chat.completions.create(model=MODEL, messages=ask(clips["wav"], QUESTION), temperature=0)
    reply = client.chat.completions.create(
        model=MODEL, messages=ask(clips["wav"], QUESTION), temperature=0, extra_body={"think": True}
    )
    assert reply.choices[0].message.content == greedy(demo_pipeline, clips["wav"], think=True)
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens  # the request is in the prompt


# ---- transcriptions and models ---------------------------------------------------------------------------
def test_transcriptions_in_every_format(client, clips, demo_pipeline):
    expected = demo_pipeline.transcribe(str(clips["flac"]), max_new_tokens=TOKENS)

    def create(fmt):
        with open(clips["flac"], "rb") as f:
            return client.audio.transcriptions.create(model=MODEL, file=f, response_format=fmt)

    assert create("json").text == expected.text
    assert create("text").strip() == expected.text
    assert create("srt").strip() == expected.to_srt().strip()
    verbose = create("verbose_json")
    assert verbose.text == expected.text and verbose.duration == pytest.approx(expected.duration)
    got = [(s.start, s.end, s.text) for s in verbose.segments]
    assert got == [(s.start, s.end, s.text) for s in expected.segments]


def test_long_audio_is_transcribed_in_segments(hour_checkpoint, tmp_path):
    """610 s: two segments cut at a quiet point, as Pipeline.transcribe cuts them (on the smallest model)."""
    path = tmp_path / "long.flac"
    sf.write(path, speech_like(16000 * 610, seed=3), 16000, format="FLAC")
    expected = minaf3.load(hour_checkpoint).transcribe(str(path), max_new_tokens=8)
    assert len(expected.segments) == 2
    with ThreadServer("--model", hour_checkpoint, "--max-new-tokens", 8) as running:
        hour = openai.OpenAI(
            base_url=f"{running.wait_ready().url}/v1", api_key="-", max_retries=0, timeout=300
        )
        with open(path, "rb") as f:
            verbose = hour.audio.transcriptions.create(
                model=hour_checkpoint.name, file=f, response_format="verbose_json"
            )
    got = [(s.start, s.end, s.text) for s in verbose.segments]
    assert got == [(s.start, s.end, s.text) for s in expected.segments]
    assert verbose.text == expected.text


def test_models_list_and_unknown_model(client, server, clips):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="whisper-1", messages=ask(clips["wav"], QUESTION))
    assert caught.value.body["code"] == "model_not_found" and MODEL in caught.value.body["message"]
    status, _, body = request(server.port, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, headers, body = request(server.port, "GET", "/")
    assert (
        status == 200 and headers["content-type"].startswith("text/html") and b"/v1/chat/completions" in body
    )


# ---- batching, disconnects, a full queue, keys -------------------------------------------------------------
def test_requests_arriving_together_share_one_generate_call(batching, clips, demo_pipeline):
    """A streamed and a plain request with different max_tokens run as one batch of 2, each getting the
    answer it gets alone."""
    before = batching.stats()
    auth = {"Authorization": f"Bearer {KEY}"}
    results = {}

    def plain():
        body = {"messages": ask(clips["flac"], "Describe it."), "temperature": 0, "max_tokens": 9}
        results["plain"] = request(batching.port, "POST", "/v1/chat/completions", body, auth)

    thread = threading.Thread(target=plain)
    thread.start()
    connection, response = open_stream(
        batching.port, {"messages": ask(clips["wav"], QUESTION), "temperature": 0, "max_tokens": 5}, auth
    )
    events = list(iter(lambda: read_event(response), None))
    connection.close()
    thread.join(120)
    streamed = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert streamed == greedy(demo_pipeline, clips["wav"], tokens=5)
    status, _, body = results["plain"]
    assert status == 200
    assert json.loads(body)["choices"][0]["message"]["content"] == greedy(
        demo_pipeline, clips["flac"], "Describe it.", 9
    )
    after = batching.stats()
    assert (after["batches"] - before["batches"], after["rows"] - before["rows"]) == (1, 2)


def test_a_client_that_leaves_stops_its_work(batching, clips, demo_pipeline):
    """Queued rows of a client that left are dropped unstarted, a full queue answers 503 with Retry-After,
    and a running row whose client left stops being generated."""
    auth = {"Authorization": f"Bearer {KEY}"}
    before = batching.stats()
    # Two sampled requests with different settings cannot share a batch: each waits for a mate in the queue.
    waiting = [
        open_stream(batching.port, {"messages": ask(clips["wav"], QUESTION), "temperature": t}, auth)
        for t in (0.5, 0.6)
    ]
    for _, response in waiting:
        assert json.loads(read_event(response))["choices"][0]["delta"]["role"] == "assistant"  # queued
    status, headers, body = request(
        batching.port, "POST", "/v1/chat/completions", {"messages": ask(clips["wav"], QUESTION)}, auth
    )
    assert status == 503 and int(headers["retry-after"]) >= 1
    assert error_of(status, body)["code"] == "overloaded"
    for connection, _ in waiting:
        connection.close()
    stats = batching.wait_stats(lambda s: s["dropped"] == before["dropped"] + 2, "both queued rows dropped")
    assert stats["rows"] == before["rows"] and stats["queued"] == 0
    # Running: A and B ask for 4000 tokens each (min_tokens: no early end) and run as one batch. A leaves
    # after its first piece; B goes on as it would alone, then leaves too: the batch stops.
    long = {"temperature": 0, "max_tokens": 4000, "min_tokens": 4000}
    a_connection, a = open_stream(batching.port, {"messages": ask(clips["wav"], QUESTION), **long}, auth)
    b_connection, b = open_stream(batching.port, {"messages": ask(clips["ogg"], QUESTION), **long}, auth)
    while not json.loads(read_event(a))["choices"][0]["delta"].get("content"):
        pass  # the role first, then the first piece: the batch is running
    a_connection.close()
    alone = greedy(demo_pipeline, clips["ogg"], tokens=30, min_new_tokens=30)
    text = ""
    while len(text) < len(alone) // 2:
        text += json.loads(read_event(b))["choices"][0]["delta"].get("content") or ""
    assert alone.startswith(text)
    b_connection.close()
    stats = batching.wait_stats(
        lambda s: s["batches"] == before["batches"] + 1 and s["running"] == 0, "the end of the batch"
    )
    assert stats["abandoned"] == before["abandoned"] + 2 and stats["rows"] == before["rows"] + 2
    assert stats["steps"] - before["steps"] < 4000  # stopped long before its 4000 tokens


def test_api_key(batching):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, _, body = request(batching.port, "GET", "/v1/models", headers=headers)
        assert status == 401 and error_of(status, body)["code"] == "invalid_api_key"
    keyed = openai.OpenAI(base_url=f"{batching.url}/v1", api_key=KEY, max_retries=0)
    assert len(keyed.models.list().data) == 1
    assert request(batching.port, "GET", "/health")[0] == 200  # probes need no key


# ---- lifecycle ---------------------------------------------------------------------------------------------
def test_health_is_ready_only_once_the_model_is_loaded(demo_checkpoint):
    import uvicorn

    from minaf3.serve.app import ServeOptions, create_app

    release = threading.Event()

    def slow_load():
        release.wait(60)
        return minaf3.load(demo_checkpoint)

    app = create_app(ServeOptions(model_id="demo"), slow_load)
    with ThreadServer(server=uvicorn.Server(uvicorn.Config(app, port=0, log_level="warning"))) as running:
        status, _, body = request(running.port, "GET", "/health")
        assert (status, json.loads(body)["status"]) == (503, "loading")
        status, headers, body = request(running.port, "POST", "/v1/chat/completions", {"messages": []})
        assert status == 503 and error_of(status, body)["code"] == "loading" and headers["retry-after"]
        release.set()
        running.wait_ready()
        assert request(running.port, "GET", "/health")[0] == 200


def test_sigterm_finishes_running_requests_and_refuses_new_ones(demo_checkpoint, tmp_path):
    """The `minaf3 serve` command in its own process: SIGTERM while a stream runs, which still ends whole."""
    command = [sys.executable, "-m", "minaf3", "serve", "--model", str(demo_checkpoint)]
    command += "--port 0 --max-new-tokens 1024".split()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    lines: queue.Queue = queue.Queue()  # stderr, read by a thread so that every wait has a deadline
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr] + [lines.put(None)]).start()
    stderr = []
    try:
        while not (listening := re.search(r"listening on http://127.0.0.1:(\d+)/", "".join(stderr))):
            line = lines.get(timeout=120)
            assert line is not None, f"the server ended: {''.join(stderr)}"
            stderr.append(line)
        port = int(listening[1])
        deadline = time.monotonic() + 120
        while request(port, "GET", "/health")[0] != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.1)
        body = {
            "messages": ask(demo_checkpoint / CLIP_NAME, QUESTION),
            "temperature": 0,
            "max_tokens": 1024,
            "min_tokens": 1024,
            "stream_options": {"include_usage": True},
        }
        connection, response = open_stream(port, body)
        while not json.loads(read_event(response))["choices"][0]["delta"].get("content"):
            pass  # the role first, then the first piece: the row is being generated
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # let the signal land; the assertions below hold whenever it does
        try:
            status, _, refusal = request(port, "POST", "/v1/chat/completions", body)
            assert status == 503 and error_of(status, refusal)["code"] == "shutting_down"
        except ConnectionError:
            pass  # the listening socket is already closed: refused as well
        events = list(iter(lambda: read_event(response), None))
        connection.close()
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 1024
        # Drained, uvicorn re-raises the signal it caught: the process ends as SIGTERM asked.
        assert process.wait(60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    stderr += iter(lambda: lines.get(timeout=60), None)
    assert "SIGTERM: finishing 1 request(s) in flight, refusing new ones" in "".join(stderr), stderr


def test_cli_errors_are_one_line(demo_checkpoint, tmp_path, capsys, monkeypatch):
    def error(*argv):
        assert main(["serve", *map(str, argv)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("minaf3: error: "), err
        return err

    assert "no such model folder" in error("--model", tmp_path / "missing")
    assert "no such adapter folder" in error("--model", demo_checkpoint, "--adapter", tmp_path / "none")
    (tmp_path / "lora").mkdir()
    assert "--quantize" in error(
        "--model", demo_checkpoint, "--adapter", tmp_path / "lora", "--quantize", "int8"
    )
    assert "--max-batch-size 0" in error("--model", demo_checkpoint, "--max-batch-size", 0)
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the serve extra were not installed
    assert "pip install 'minaf3[serve]'" in error("--model", demo_checkpoint)


def write_lora(folder, seed: int = 0):
    """A PEFT LoRA folder for the demo model's decoder (q, v and down projections), strong enough to change
    greedy answers."""
    from safetensors.torch import save_file

    folder.mkdir()
    targets = r"language_model\.model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.down_proj)"
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets})
    )
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for name, (out, inp) in {
            "self_attn.q_proj": (128, 128),
            "self_attn.v_proj": (64, 128),
            "mlp.down_proj": (128, 256),
        }.items():
            prefix = f"base_model.model.language_model.model.layers.{layer}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = 0.5 * torch.randn(4, inp, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = 0.5 * torch.randn(out, 4, generator=generator)
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def test_adapter_is_applied(demo_checkpoint, demo_pipeline, tmp_path):
    adapter = write_lora(tmp_path / "lora")
    reference = minaf3.load(demo_checkpoint)
    reference.model.load_adapter(adapter)
    clip = demo_checkpoint / CLIP_NAME
    expected = greedy(reference, clip, tokens=8)
    assert expected != greedy(demo_pipeline, clip, tokens=8)  # the adapter changes this answer
    with ThreadServer("--model", demo_checkpoint, "--adapter", adapter) as running:
        body = {"messages": ask(clip, QUESTION), "temperature": 0, "max_tokens": 8}
        status, _, answer = request(running.wait_ready().port, "POST", "/v1/chat/completions", body)
    assert status == 200 and json.loads(answer)["choices"][0]["message"]["content"] == expected


def test_model_options_reach_the_model(demo_checkpoint, demo_pipeline):
    """--quantize int8 serves what minaf3.load(quantize="int8") answers (which differs from float32's)."""
    clip = demo_checkpoint / CLIP_NAME
    expected = greedy(minaf3.load(demo_checkpoint, quantize="int8"), clip, tokens=40)
    assert expected != greedy(demo_pipeline, clip, tokens=40)
    with ThreadServer("--model", demo_checkpoint, "--quantize", "int8", "--dtype", "float32") as running:
        body = {"messages": ask(clip, QUESTION), "temperature": 0, "max_tokens": 40}
        status, _, answer = request(running.wait_ready().port, "POST", "/v1/chat/completions", body)
    assert status == 200 and json.loads(answer)["choices"][0]["message"]["content"] == expected


def test_import_minaf3_does_not_import_the_server():
    result = run_python(
        "import sys, minaf3, minaf3.cli; minaf3.cli.build_parser(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'uvicorn', 'starlette')"
        " or m in ('minaf3.serve.app', 'minaf3.serve.batcher')))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ---- the README's examples -------------------------------------------------------------------------------
def readme_serving_blocks() -> list[tuple[str, str]]:
    """The fenced (language, code) blocks of the README's "Serving over HTTP" section, in order."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Serving over HTTP") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```(sh|python)\n(.*?)```", section, re.S)


def test_readme_serving_examples(demo_checkpoint, demo_pipeline, tmp_path):
    """The README's server command (the demo checkpoint under the README's model name, any free port, and a
    cap of 48 tokens: the random weights rarely stop, and 1024 steps per answer would take a while), then its
    curl and openai-client examples, word for word but the port; their output is the pipeline's."""
    (_, setup), (_, curl), (_, python) = readme_serving_blocks()
    argv = shlex.split(next(line for line in setup.splitlines() if line.startswith("minaf3 serve")))[2:]
    name = argv[argv.index("--model") + 1]
    argv[argv.index("--model") + 1], argv[argv.index("--port") + 1] = str(demo_checkpoint), "0"
    clip = Path(shutil.copy(demo_checkpoint / CLIP_NAME, tmp_path / "clip.wav"))
    with ThreadServer(*argv, "--served-model-name", name, "--max-new-tokens", README_TOKENS) as running:
        port = str(running.wait_ready().port)
        shell = subprocess.run(
            ["bash", "-c", curl.replace("8000", port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        client = subprocess.run(
            [sys.executable, "-c", python.replace("8000", port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
    answer = greedy(demo_pipeline, clip, tokens=README_TOKENS)
    transcript = demo_pipeline.transcribe(str(clip), max_new_tokens=README_TOKENS)
    assert shell.returncode == 0, shell.stderr
    reply, end = json.JSONDecoder().raw_decode(shell.stdout)  # curl -s prints the JSON without a newline
    assert reply["choices"][0]["message"]["content"] == answer
    assert shell.stdout[end:] == transcript.to_srt()
    assert client.returncode == 0, client.stderr
    assert client.stdout == f"{answer}\n{transcript.text}\n"


def test_default_torch_threads_leave_a_core_for_the_requests():
    from minaf3.cli import build_parser
    from minaf3.serve.server import torch_threads

    def threads(*argv):
        return torch_threads(build_parser().parse_args(["serve", "--model", "m", *argv]))

    assert threads() == max(1, len(os.sched_getaffinity(0)) - 1)
    assert threads("--threads", "3") == 3
    assert threads("--device", "cuda") is None  # torch's own default where the CPU does not generate
