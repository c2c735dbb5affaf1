"""minaf3/datasets.py: NVIDIA's JSON and JSONL with answers read into items, and every malformed entry refused
with its index or line."""

import json
import os

import pytest

from minaf3.datasets import read_dataset
from minaf3.errors import InputError
from minaf3.manifest import build_conversation


def human(text: str) -> dict:
    return {"from": "human", "value": text}


def gpt(text) -> dict:
    return {"from": "gpt", "value": text}


def entry(key="e0", sound="clips/e0.wav", turns=None, **more) -> dict:
    turns = turns if turns is not None else [human("<sound>\nHow many beeps?"), gpt("3 beeps")]
    return {"id": key, "sound": sound, "conversations": turns, **more}


def write_json(folder, entries, name="bench.json"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(entries, indent=1))
    return path


def write_jsonl(folder, lines, name="bench.jsonl"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# ---- NVIDIA's JSON -----------------------------------------------------------------------------------------
def test_nvidia_json_items(tmp_path, monkeypatch):
    entries = [
        entry(),
        entry("e1", "/abs/e1.flac", [human("Listen: <sound> Is it loud?"), gpt("yes")], task="loudness"),
        entry(
            7,
            "https://example.com/e2.wav",
            [human("<sound>\nDescribe it."), gpt("A dog."), human("What is it doing?"), gpt("Barking.")],
            duration=3.5,  # AF3's files carry more keys; they are ignored
        ),
    ]
    path = write_json(tmp_path / "data", entries)
    monkeypatch.chdir(tmp_path)  # relative paths start from the file's folder, not the working directory
    items = read_dataset(os.path.relpath(path))
    assert [e.id for e in items] == ["e0", "e1", 7]
    assert [e.item.audio for e in items] == [
        os.path.join("data", "clips/e0.wav"),
        "/abs/e1.flac",
        "https://example.com/e2.wav",
    ]
    assert [e.answer for e in items] == ["3 beeps", "yes", "Barking."]
    assert [e.task for e in items] == ["bench", "loudness", "bench"]  # the file's stem by default
    assert [e.question for e in items] == ["How many beeps?", "Listen: Is it loud?", "What is it doing?"]
    assert items[0].item.request["conversation"] == [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "How many beeps?"}]}
    ]
    assert items[1].item.request["conversation"][0]["content"] == [
        {"type": "text", "text": "Listen:"},
        {"type": "audio"},
        {"type": "text", "text": "Is it loud?"},
    ]
    # Earlier turns are the conversation the model continues; the audio lands where <sound> stood.
    messages, transcription = build_conversation(items[2].item, "WAVEFORM", "Transcribe.")
    assert not transcription and messages == [
        {
            "role": "user",
            "content": [{"type": "audio", "audio": "WAVEFORM"}, {"type": "text", "text": "Describe it."}],
        },
        {"role": "assistant", "content": "A dog."},
        {"role": "user", "content": "What is it doing?"},
    ]


@pytest.mark.parametrize(
    "entries, fragment",
    [
        ([entry(), "e1"], "entry 1: expected a JSON object, got str"),
        ([entry(), {"id": "e1", "conversations": []}], "entry 1: missing 'sound'"),
        ([entry(), entry("e1", sound=["a.wav", "b.wav"])], "entry 1 (id 'e1'): 'sound' is a list"),
        ([entry(sound="")], "entry 0 (id 'e0'): 'sound' must be a file path or URL"),
        ([entry(), entry("e0")], "entry 1: duplicate id 'e0' (first at entry 0)"),
        ([entry(key=True)], "entry 0: 'id' must be a non-empty string or an integer"),
        ([entry(turns="<sound> hi")], "entry 0 (id 'e0'): 'conversations' must be a list"),
        (
            [entry(turns=[human("<sound> hi")])],
            "'conversations' must be a list of at least a human and a gpt",
        ),
        (
            [entry(turns=[human("<sound> hi"), {"from": "bot", "value": "x"}])],
            "conversations[1]: 'from' is 'bot'",
        ),
        ([entry(turns=[gpt("x"), human("<sound> hi")])], "conversations[0]: 'from' is 'gpt'"),
        (
            [entry(turns=[human("<sound> hi"), {"value": "x"}])],
            "conversations[1]: expected an object with 'from'",
        ),
        (
            [entry(turns=[human("<sound> hi"), gpt(3)])],
            "entry 0 (id 'e0'), conversations[1]: 'value' must be a string, got int",
        ),
        (
            [entry(turns=[human("<sound> hi"), gpt(["a"])])],
            "conversations[1]: 'value' must be a string, got list",
        ),
        ([entry(turns=[human("<sound> a"), gpt("b"), human("c")])], "the last turn must be gpt's"),
        (
            [entry(turns=[human("hi"), gpt("x")])],
            "<sound> must stand exactly once in the human turns, found 0",
        ),
        ([entry(turns=[human("<sound><sound>"), gpt("x")])], "found 2"),
        ([entry(turns=[human("<sound>"), gpt("x <sound>")])], "conversations[1]: <sound> in a gpt turn"),
        ([entry(turns=[human("<sound> hi"), gpt("  ")])], "the last gpt turn (the expected answer) is empty"),
        ([entry(), entry("e1", task=5)], "entry 1 (id 'e1'): 'task' must be a non-empty string"),
        ([], "the dataset holds no items"),
    ],
)
def test_malformed_nvidia_entries_are_refused_with_their_index(tmp_path, entries, fragment):
    path = write_json(tmp_path, entries)
    with pytest.raises(InputError) as caught:
        read_dataset(path)
    assert fragment in str(caught.value) and str(path) in str(caught.value)


def test_broken_json_names_its_line(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text('[\n {"id": "a", "sound": "a.wav",\n  "conversations": []\n ,]\n')
    with pytest.raises(InputError, match=r"bench.json: not valid JSON at line 4, column 3"):
        read_dataset(path)


# ---- JSONL with answers ------------------------------------------------------------------------------------
def test_jsonl_items(tmp_path):
    content = [{"type": "audio"}, {"type": "text", "text": "Which?\n(A) Dog\n(B) Cat"}]
    lines = [
        {"id": "a", "audio": "a.wav", "prompt": "How many beeps?", "answer": "3 beeps", "task": "count"},
        {"id": 2, "audio": "b.wav", "answer": "hello world", "max_new_tokens": 16},
        {
            "id": "c",
            "audio": "c.wav",
            "answer": "(B) Cat",
            "conversation": [{"role": "user", "content": content}],
        },
    ]
    path = write_jsonl(tmp_path / "sets", lines)
    items = read_dataset(path)
    assert [e.id for e in items] == ["a", 2, "c"]
    assert [e.item.audio for e in items] == [str(tmp_path / "sets" / n) for n in ("a.wav", "b.wav", "c.wav")]
    assert [e.task for e in items] == ["count", "bench", "bench"]
    assert [e.question for e in items] == ["How many beeps?", None, "Which?\n(A) Dog\n(B) Cat"]
    assert items[1].item.options == {"max_new_tokens": 16}  # batch's per-line settings still apply


def line(**changes) -> dict:
    """Line 2 of a JSONL dataset, with `changes` (a None value removes the key)."""
    fields = {"id": "b", "audio": "b.wav", "answer": "x"} | changes
    return {key: value for key, value in fields.items() if value is not None}


NO_USER = [{"role": "system", "content": "s"}]


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ('{"id": "b", "audio": "b.wav", "answer": "x"', "line 2: not JSON"),
        (line(audio=None), "line 2: missing 'audio'"),
        (line(id="a"), "line 2: duplicate id 'a' (first on line 1)"),
        (line(answer=None), "line 2 (id 'b'): missing 'answer'"),
        (line(answer=3), "line 2 (id 'b'): 'answer' must be a string, got int"),
        (line(answer=["x", "y"]), "'answer' must be a string, got list"),
        (line(answer=" "), "line 2 (id 'b'): 'answer' is empty"),
        (line(task=""), "line 2 (id 'b'): 'task' must be a non-empty"),
        (line(prompt=5), "line 2 (id 'b'): 'prompt' must be a string"),
        (line(conversation=[]), "'conversation' must be a non-empty"),
        (line(conversation=NO_USER), "line 2 (id 'b'): the conversation has no user message"),
        (line(prompt="p", conversation=NO_USER), "give 'prompt' or 'conversation', not both"),
    ],
)
def test_malformed_jsonl_lines_are_refused_with_their_line(tmp_path, bad, fragment):
    path = write_jsonl(tmp_path, [{"id": "a", "audio": "a.wav", "answer": "x"}, bad])
    with pytest.raises(InputError) as caught:
        read_dataset(path)
    assert fragment in str(caught.value) and str(path) in str(caught.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InputError, match="no such dataset file"):
        read_dataset(tmp_path / "none.json")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="holds no items"):
        read_dataset(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.json").write_bytes(b'[{"id": "\xe9"}]')
    with pytest.raises(InputError, match="not UTF-8 text"):
        read_dataset(tmp_path / "latin1.json")
