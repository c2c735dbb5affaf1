"""The `minaf3` command line (cli.py), run in-process through main(argv) and as `python -m minaf3`."""

import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import speech_like

import minaf3
from minaf3.cli import main
from minaf3.conversation import THINK_SUFFIX
from minaf3.demo import CLIP_NAME

GREEDY = ["--greedy", "--max-new-tokens", "8"]
SRT_CUE = re.compile(r"(\d+)\n(\d\d:\d\d:\d\d,\d{3}) --> (\d\d:\d\d:\d\d,\d{3})\n(.*)\n")


def run(capsys, *argv):
    """(exit status, stdout, stderr) of `minaf3 argv...` run in this process."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, *fragments):
    assert status == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minaf3: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


class Terminal(io.StringIO):
    """Typed input at an interactive terminal."""

    def isatty(self):
        return True


@pytest.fixture(scope="module")
def clips(demo_checkpoint, tmp_path_factory):
    """The demo clip and a shorter second file."""
    folder = tmp_path_factory.mktemp("clips")
    first = shutil.copy(demo_checkpoint / CLIP_NAME, folder / "first.wav")
    sf.write(folder / "second.wav", speech_like(3 * 16000, seed=2), 16000)
    return [first, folder / "second.wav"]


# ---- chat ----------------------------------------------------------------------------------------------


def test_chat_one_question(capsys, demo_checkpoint, demo_pipeline, clips):
    status, out, err = run(
        capsys, "chat", "--model", demo_checkpoint, "--audio", clips[0], "What is it?", *GREEDY
    )
    assert status == 0 and err == ""
    expected = demo_pipeline.chat("What is it?", audio=clips[0], do_sample=False, max_new_tokens=8)
    assert out == expected + "\n"


def test_chat_reads_the_question_from_a_pipe(capsys, monkeypatch, demo_checkpoint, demo_pipeline, clips):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is it?\n"))
    status, out, _ = run(capsys, "chat", "--model", demo_checkpoint, "--audio", clips[0], *GREEDY)
    assert status == 0
    assert out == demo_pipeline.chat("What is it?", audio=clips[0], do_sample=False, max_new_tokens=8) + "\n"


def test_chat_is_multi_turn_at_a_terminal(capsys, monkeypatch, demo_checkpoint, demo_pipeline, clips):
    monkeypatch.setattr(sys, "stdin", Terminal("What is it?\n\nAnd then?\n"))  # EOF ends the conversation
    status, out, err = run(capsys, "chat", "--model", demo_checkpoint, "--audio", clips[0], *GREEDY)
    assert status == 0 and err.count("you> ") == 4
    first, second = out.splitlines()
    audio = minaf3.load_audio(clips[0])
    history = [
        {
            "role": "user",
            "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": "What is it?"}],
        },
        {"role": "assistant", "content": first},
        {"role": "user", "content": [{"type": "text", "text": "And then?"}]},
    ]
    assert first == demo_pipeline.chat(history[:1], do_sample=False, max_new_tokens=8)
    assert second == demo_pipeline.chat(history, do_sample=False, max_new_tokens=8)


def test_chat_at_a_terminal_survives_a_bad_turn(capsys, monkeypatch, demo_checkpoint, demo_pipeline, clips):
    """--max-new-tokens beyond the context fails each turn; the session reports it and goes on to EOF."""
    monkeypatch.setattr(sys, "stdin", Terminal("What is it?\nAnd then?\n"))
    status, out, err = run(capsys, "chat", "--model", demo_checkpoint, "--max-new-tokens", "40000")
    assert status == 0 and out == ""
    assert err.count("minaf3: error: ") == 2 and "max_new_tokens=40000" in err and err.count("you> ") == 3


def test_chat_think(capsys, demo_checkpoint, demo_pipeline, clips):
    status, out, err = run(
        capsys, "chat", "--model", demo_checkpoint, "--audio", clips[0], "--think", "Why?", *GREEDY
    )
    assert status == 0 and "think/" in err  # the demo checkpoint has no adapter: said on stderr
    expected = demo_pipeline.chat(f"Why? {THINK_SUFFIX}", audio=clips[0], do_sample=False, max_new_tokens=8)
    assert out == expected + "\n"


def test_chat_seed_makes_sampling_repeatable(capsys, demo_checkpoint, clips):
    argv = [
        "chat",
        "--model",
        demo_checkpoint,
        "--audio",
        clips[0],
        "Hi",
        "--seed",
        "5",
        "--max-new-tokens",
        "8",
    ]
    assert run(capsys, *argv)[1] == run(capsys, *argv)[1]


# ---- transcribe ----------------------------------------------------------------------------------------


def test_transcribe_text_json_srt(capsys, demo_checkpoint, demo_pipeline, clips):
    expected = demo_pipeline.transcribe(clips, max_new_tokens=8)
    base = ["transcribe", "--model", demo_checkpoint, *clips, *GREEDY]

    status, out, err = run(capsys, *base)
    assert status == 0 and "transcribing" in err  # several files: a progress bar on stderr
    assert out == f"==> {clips[0]} <==\n{expected[0].text}\n\n==> {clips[1]} <==\n{expected[1].text}\n"

    status, out, _ = run(capsys, *base, "--format", "json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert status == 0 and [r["file"] for r in rows] == [str(c) for c in clips]
    assert [{k: r[k] for k in ("text", "segments")} for r in rows] == [e.to_dict() for e in expected]

    status, out, _ = run(
        capsys, "transcribe", "--model", demo_checkpoint, clips[1], *GREEDY, "--format", "srt"
    )
    ((number, start, end, text),) = SRT_CUE.findall(out)
    assert status == 0 and (number, start, end, text) == (
        "1",
        "00:00:00,000",
        "00:00:03,000",
        expected[1].text,
    )


def test_transcribe_one_file_prints_only_its_text(capsys, demo_checkpoint, demo_pipeline, clips):
    status, out, err = run(capsys, "transcribe", "--model", demo_checkpoint, clips[1], *GREEDY)
    assert status == 0 and err == ""  # one short file: no progress bar
    assert out == demo_pipeline.transcribe(clips[1], max_new_tokens=8).text + "\n"


def test_transcribe_sample_with_seed(capsys, demo_checkpoint, demo_pipeline, clips):
    argv = [
        "transcribe",
        "--model",
        demo_checkpoint,
        clips[1],
        "--sample",
        "--seed",
        "3",
        "--max-new-tokens",
        "8",
    ]
    status, out, _ = run(capsys, *argv)
    assert status == 0 and out == run(capsys, *argv)[1]
    expected = demo_pipeline.transcribe(
        clips[1], do_sample=True, max_new_tokens=8, generator=torch.Generator().manual_seed(3)
    )
    assert out == expected.text + "\n"
    status, _, err = run(capsys, *argv, "--greedy")
    assert status == 2 and "not allowed with argument" in err


@pytest.mark.slow
def test_transcribe_an_hour(capsys, hour_checkpoint, tmp_path):
    """One hour of speech-like audio with pauses: six 10-minute segments, in batches, with a progress bar."""
    unit = speech_like(10 * 16000)
    unit[-8000:] = 0.0  # a 0.5 s pause every 10 s
    path = tmp_path / "hour.wav"
    sf.write(path, np.tile(unit, 360), 16000, subtype="PCM_16")
    argv = ["transcribe", "--model", hour_checkpoint, path, "--format", "json", "--batch-size", "2"]
    status, out, err = run(capsys, *argv, "--greedy", "--max-new-tokens", "3")
    assert status == 0 and "6/6" in err and "segment" in err
    (row,) = [json.loads(line) for line in out.splitlines()]
    bounds = [(s["start"], s["end"]) for s in row["segments"]]
    assert bounds == [(600.0 * k, 600.0 * (k + 1)) for k in range(6)]
    assert row["text"] == " ".join(s["text"].strip() for s in row["segments"] if s["text"].strip())


# ---- demo and estimate ---------------------------------------------------------------------------------


def test_demo_in_process(capsys):
    status, out, _ = run(capsys, "demo", "--seed", "1")
    assert status == 0 and "evaluation seed 1" in out and "huggingface-cli download" in out
    assert out.count("truth ") == 6 and "answers right" in out


def test_python_m_minaf3(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    demo = subprocess.run([sys.executable, "-m", "minaf3", "demo"], env=env, capture_output=True, text=True)
    assert demo.returncode == 0, demo.stderr
    assert "answers right" in demo.stdout and "decode" in demo.stdout
    error = subprocess.run(
        [sys.executable, "-m", "minaf3", "chat", "--model", str(tmp_path / "nowhere"), "Hi"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert_one_line_error(error.returncode, error.stderr, "no such model folder", "huggingface-cli download")


def test_estimate(capsys, demo_checkpoint):
    status, out, _ = run(capsys, "estimate", "--model", demo_checkpoint, "--seconds", "600", "--batch", "2")
    assert status == 0
    for part in ("weights", "KV cache", "activations", "total", "available", "fits: yes"):
        assert part in out
    status, out, _ = run(capsys, "estimate", "--model", demo_checkpoint, "--batch", "100000")
    assert status == 1 and "fits: no" in out


# ---- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["chat", "Hi"], ["transcribe", "x.wav"], ["estimate"]])
def test_missing_model_folder(capsys, tmp_path, command):
    status, _, err = run(capsys, command[0], "--model", tmp_path / "nowhere", *command[1:])
    assert_one_line_error(
        status, err, "no such model folder", "huggingface-cli download nvidia/audio-flamingo-3-hf"
    )


@pytest.mark.parametrize("command", ["chat", "transcribe", "estimate"])
def test_missing_tokenizer(capsys, tmp_path, demo_checkpoint, clips, command):
    folder = shutil.copytree(demo_checkpoint, tmp_path / "partial")
    (folder / "tokenizer.json").unlink()
    extra = {"chat": ["Hi"], "transcribe": [clips[0]], "estimate": []}[command]
    status, _, err = run(capsys, command, "--model", folder, *extra)
    assert_one_line_error(status, err, "missing tokenizer.json", "huggingface-cli download")


def test_missing_audio_file(capsys, tmp_path, demo_checkpoint, clips):
    missing = tmp_path / "missing.wav"
    status, _, err = run(capsys, "chat", "--model", demo_checkpoint, "--audio", missing, "Hi")
    assert_one_line_error(status, err, str(missing))
    status, _, err = run(capsys, "transcribe", "--model", demo_checkpoint, clips[0], missing)
    assert_one_line_error(status, err, str(missing), "no such audio file")


def test_unreadable_audio_file(capsys, tmp_path, demo_checkpoint):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wav file")
    status, _, err = run(capsys, "transcribe", "--model", demo_checkpoint, bad)
    assert_one_line_error(status, err, str(bad), "cannot decode")


def test_usage_errors(capsys, demo_checkpoint, clips):
    status, _, err = run(capsys, "transcribe", "--model", demo_checkpoint, clips[0], "--format", "xml")
    assert status == 2 and "invalid choice: 'xml'" in err and "Traceback" not in err
    status, _, err = run(capsys)
    assert status == 2 and "COMMAND" in err
    status, _, err = run(capsys, "estimate", "--model", demo_checkpoint, "--batch", "0")
    assert_one_line_error(status, err, "batch=0")
    status, out, _ = run(capsys, "--help")
    assert status == 0 and "transcribe" in out


def test_empty_question_from_a_pipe(capsys, monkeypatch, demo_checkpoint):
    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n"))
    status, _, err = run(capsys, "chat", "--model", demo_checkpoint)
    assert_one_line_error(status, err, "no question")


def test_batch_subcommand(capsys, demo_checkpoint, tmp_path):
    """`minaf3 batch` runs a manifest in one process: one JSON line per id, errors recorded per item."""
    clip = demo_checkpoint / CLIP_NAME
    manifest = tmp_path / "in.jsonl"
    items = [
        {"id": "a", "audio": str(clip), "prompt": "What is in this audio?"},
        {"id": "b", "audio": str(tmp_path / "missing.wav"), "prompt": "What is in this audio?"},
    ]
    manifest.write_text("".join(json.dumps(item) + "\n" for item in items))
    out = tmp_path / "out.jsonl"
    argv = [
        "batch",
        "--model",
        demo_checkpoint,
        "--manifest",
        manifest,
        "--out",
        out,
        *GREEDY,
        "--no-progress",
    ]
    status, _, _ = run(capsys, *argv)
    assert status == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "b"]
    assert isinstance(records[0]["text"], str) and "missing.wav" in records[1]["error"]
    status, _, err = run(
        capsys, "batch", "--model", demo_checkpoint, "--manifest", tmp_path / "no.jsonl", "--out", out
    )
    assert_one_line_error(status, err, "no.jsonl")
