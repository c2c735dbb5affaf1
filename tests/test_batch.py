"""minaf3/batch.py: torchrun ranks (gloo, CPU) against one process, kill and resume, errors.

The torchrun tests launch real processes (`python -m torch.distributed.run --standalone`, a free port each
time) on the tiny reference checkpoint; decoding is greedy, so every run must give the same text per item.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
from conftest import speech_like

from minaf3.batch import main, parts_dir, read_records, run_batch
from minaf3.manifest import pack, read_manifest, shard

ITEMS = 20
BROKEN = "item-07"  # its file is not audio
NEW_TOKENS = 5
COMMON = ["--greedy", "--max-new-tokens", str(NEW_TOKENS), "--no-progress"]
TIMEOUT = 300  # seconds for one launch: a hung rendezvous fails the test instead of the suite


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """20 short clips (0.3-2.2 s, two sampling rates, one broken file) and a manifest mixing every kind of
    request: prompts, transcription requests, a conversation, per-item options and a seeded sampled item."""
    root = tmp_path_factory.mktemp("batch_corpus")
    lines = []
    for i in range(ITEMS):
        name, rate = f"clips/c{i:02d}.wav", 8000 if i % 4 == 0 else 16000
        (root / "clips").mkdir(exist_ok=True)
        sf.write(root / name, speech_like(int(rate * (0.3 + 0.1 * ((i * 7) % 20))), rate, seed=i), rate)
        line = {"id": f"item-{i:02d}", "audio": name, "prompt": "What is in this audio?"}
        if i % 5 == 2:
            del line["prompt"]  # a transcription request
        if i % 6 == 1:
            line["max_new_tokens"] = 3
        lines.append(line)
    (root / "clips/c07.wav").write_bytes(b"RIFF\x00\x00 this is not a wave file")
    lines[11] = {**lines[11], "conversation": [{"role": "user", "content": "Describe it."}]}
    lines[11].pop("prompt")
    lines[13].update(do_sample=True, seed=3)
    (root / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def torchrun(*args: str, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.Popen(
        [*command, "-m", "minaf3.batch", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen
    )


def children(pid: int) -> list[int]:
    """Ids of the processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)": state, ppid, ...
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def finish(process: subprocess.Popen) -> str:
    _, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, err.decode()
    return err.decode()


@pytest.fixture(scope="module")
def single(tiny_checkpoint, corpus) -> list[dict]:
    """The one-process run (no torchrun) every distributed run must reproduce."""
    out = corpus / "single.jsonl"
    summary = run_batch(
        tiny_checkpoint, corpus / "in.jsonl", out, greedy=True, max_new_tokens=NEW_TOKENS, progress=False
    )
    assert summary["items"] == summary["processed"] == ITEMS and summary["errors"] == 1
    return records_of(out)


def check_complete(records: list[dict], single: list[dict]) -> None:
    assert [r["id"] for r in records] == [f"item-{i:02d}" for i in range(ITEMS)]  # each once, in order
    assert records == single
    broken = next(r for r in records if r["id"] == BROKEN)
    assert (
        "text" not in broken and broken["error"].startswith("AudioError: ") and "c07.wav" in broken["error"]
    )
    assert all(r["text"] for r in records if r["id"] != BROKEN)


def test_two_gloo_ranks_equal_one_process(tiny_checkpoint, corpus, single):
    out = corpus / "two.jsonl"
    err = finish(
        torchrun(
            "--model",
            str(tiny_checkpoint),
            "--manifest",
            str(corpus / "in.jsonl"),
            "--out",
            str(out),
            *COMMON,
        )
    )
    check_complete(records_of(out), single)
    assert not parts_dir(out).exists()
    assert f"{ITEMS} items ({ITEMS - 1} answered, 1 failed)" in err


def test_killed_run_resumes_without_losing_or_repeating_an_item(tiny_checkpoint, corpus, single):
    out = corpus / "killed.jsonl"
    args = ["--model", str(tiny_checkpoint), "--manifest", str(corpus / "in.jsonl"), "--out", str(out)]
    args += [*COMMON, "--max-batch-size", "1"]  # a record on disk after every item
    process = torchrun(*args)
    deadline = time.monotonic() + TIMEOUT
    while not any(p.stat().st_size for p in parts_dir(out).glob("*.jsonl")) and process.poll() is None:
        assert time.monotonic() < deadline, "no record appeared"
        time.sleep(0.005)
    # torchrun starts each rank in a session of its own: kill the ranks by their ids, then torchrun itself,
    # all with SIGKILL, so nothing gets to clean up (as when a node is lost).
    for pid in [*children(process.pid), process.pid]:
        os.kill(pid, signal.SIGKILL)
    process.communicate()
    done_before = len(read_records(out))
    assert not out.exists() and 0 < done_before < ITEMS, "the kill must land mid-run"

    err = finish(torchrun(*args))
    check_complete(records_of(out), single)
    assert f"{ITEMS - done_before} generated now" in err  # what was on disk was not run again


def test_rerun_skips_done_items_and_retry_errors_reruns_failures(tiny_checkpoint, corpus, single, tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    out = root / "single.jsonl"
    kwargs = {"greedy": True, "max_new_tokens": NEW_TOKENS, "progress": False}
    assert run_batch(tiny_checkpoint, root / "in.jsonl", out, **kwargs)["processed"] == 0
    assert records_of(out) == single
    shutil.copy(root / "clips/c06.wav", root / "clips/c07.wav")  # the broken file repaired
    assert run_batch(tiny_checkpoint, root / "in.jsonl", out, **kwargs)["processed"] == 0
    summary = run_batch(tiny_checkpoint, root / "in.jsonl", out, retry_errors=True, **kwargs)
    assert summary["processed"] == 1 and summary["errors"] == 0
    records = records_of(out)
    assert [r for r in records if r["id"] != BROKEN] == [r for r in single if r["id"] != BROKEN]
    assert "text" in next(r for r in records if r["id"] == BROKEN)


def test_a_bad_item_does_not_poison_its_batch(tiny_checkpoint, tmp_path, caplog):
    sf.write(tmp_path / "a.wav", speech_like(12000), 16000)
    good = [{"id": i, "audio": "a.wav", "prompt": f"Question {i}?"} for i in range(3)]
    # Passes the item's own checks; the processor refuses it, in the middle of a batch of four.
    conversation = [{"role": "robot", "content": "Hi"}, {"role": "user", "content": "Describe."}]
    bad = {"id": "bad", "audio": "a.wav", "conversation": conversation}
    for name, lines in (("all", [good[0], bad, *good[1:]]), ("good", good)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    items = read_manifest(tmp_path / "all.jsonl")
    for item in items:
        item.samples = 12000
    assert len(pack(shard(items, 0, 1), {"max_new_tokens": 4}, 65536, 32)) == 1  # one batch of four
    kwargs = {"greedy": True, "max_new_tokens": 4, "progress": False}
    with caplog.at_level(logging.WARNING, logger="minaf3.batch"):
        run_batch(tiny_checkpoint, tmp_path / "all.jsonl", tmp_path / "all.out", **kwargs)
    assert "a batch of 4 failed (InputError" in caplog.text
    run_batch(tiny_checkpoint, tmp_path / "good.jsonl", tmp_path / "good.out", **kwargs)
    records = records_of(tmp_path / "all.out")
    assert records[1]["id"] == "bad" and records[1]["error"].startswith("InputError: ")
    assert "robot" in records[1]["error"]
    assert [records[0], *records[2:]] == records_of(tmp_path / "good.out")


def test_manifest_and_option_errors_come_before_any_model_work(tmp_path, capsys):
    manifest = tmp_path / "in.jsonl"
    manifest.write_text(
        '{"id": "a", "audio": "a.wav"}\n{"id": "b", "audio": "b"}\n{"id": "a", "audio": "c"}\n'
    )
    base = ["--model", str(tmp_path / "no-model"), "--manifest", str(manifest)]
    assert main([*base, "--out", str(tmp_path / "o")]) == 2
    assert "in.jsonl line 3: duplicate id 'a' (first on line 1)" in capsys.readouterr().err
    manifest.write_text('{"id": "a", "audio": "a.wav"}\n')
    for extra, message in [
        (
            ["--out", str(tmp_path / "o"), "--token-budget", "0"],
            "token_budget=0: expected a positive integer",
        ),
        (["--out", str(manifest)], "not the manifest or a folder"),
        (["--out", str(tmp_path)], "not the manifest or a folder"),
        (["--out", str(tmp_path / "o")], "no such model folder"),
    ]:
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not parts_dir(tmp_path / "o").exists()
