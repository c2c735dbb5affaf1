"""minaf3/manifest.py: manifest checks with line numbers, conversations, header lengths, sharding, packing."""

import json
import logging

import numpy as np
import pytest
import soundfile as sf
from conftest import speech_like
from hypothesis import given, settings
from hypothesis import strategies as st

from minaf3.audio import load_audio
from minaf3.errors import InputError
from minaf3.manifest import Item, audio_samples, build_conversation, pack, read_manifest, row_tokens, shard


def write_lines(path, lines):
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines))
    return path


def test_read_manifest_resolves_paths_keeps_order_and_skips_blank_lines(tmp_path):
    path = write_lines(
        tmp_path / "in.jsonl",
        [
            {"id": "a", "audio": "clips/a.wav", "prompt": "Q?"},
            "\n",
            {"id": 7, "audio": "/abs/b.flac", "max_new_tokens": 3},
            {"id": "c", "audio": "https://example.org/c.wav"},
        ],
    )
    items = read_manifest(path)
    assert [(it.index, it.line, it.id) for it in items] == [(0, 1, "a"), (1, 3, 7), (2, 4, "c")]
    assert items[0].audio == str(tmp_path / "clips" / "a.wav")  # relative to the manifest's folder
    assert items[1].audio == "/abs/b.flac" and items[2].audio == "https://example.org/c.wav"
    assert items[1].options == {"max_new_tokens": 3} and items[0].options == {}


GOOD = {"id": "a", "audio": "a.wav"}


@pytest.mark.parametrize(
    "second, message",
    [
        ('{"id": "b", "audio": \n', r"line 2: not JSON"),
        ('["b", "b.wav"]\n', r"line 2: expected a JSON object, got list"),
        ({"audio": "b.wav"}, r"line 2: missing 'id'"),
        ({"id": "b"}, r"line 2: missing 'audio'"),
        ({"id": "a", "audio": "b.wav"}, r"line 2: duplicate id 'a' \(first on line 1\)"),
        ({"id": ["b"], "audio": "b.wav"}, r"line 2: 'id' must be a non-empty string or an integer"),
        ({"id": True, "audio": "b.wav"}, r"line 2: 'id' must be"),
        ({"id": "", "audio": "b.wav"}, r"line 2: 'id' must be"),
        ({"id": "b", "audio": 3}, r"line 2: 'audio' must be a file path or URL"),
    ],
)
def test_read_manifest_names_the_bad_line(tmp_path, second, message):
    path = write_lines(tmp_path / "in.jsonl", [GOOD, second])
    with pytest.raises(InputError, match=message):
        read_manifest(path)


def test_read_manifest_refuses_missing_and_empty_files(tmp_path):
    with pytest.raises(InputError, match="no such manifest file"):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="holds no items"):
        read_manifest(write_lines(tmp_path / "empty.jsonl", ["\n", "  \n"]))


def test_read_manifest_warns_about_unknown_keys(tmp_path, caplog):
    path = write_lines(tmp_path / "in.jsonl", [GOOD, {"id": "b", "audio": "b.wav", "max_new_token": 4}])
    with caplog.at_level(logging.WARNING, logger="minaf3.manifest"):
        read_manifest(path)
    assert "'max_new_token' (line 2)" in caplog.text


def item(**request) -> Item:
    return Item(0, 1, request.get("id", "x"), "x.wav", {"id": "x", "audio": "x.wav", **request})


def test_build_conversation_places_the_audio():
    wav = np.zeros(16000, np.float32)
    messages, strip = build_conversation(item(prompt="What?"), wav, "Transcribe.")
    assert not strip and messages[0]["content"][1] == {"type": "text", "text": "What?"}
    assert messages[0]["content"][0]["audio"] is wav
    messages, strip = build_conversation(item(), wav, "Transcribe.")
    assert strip and messages[0]["content"][1]["text"] == "Transcribe."
    # A bare audio part is filled in where it stands; the request itself is left as it was.
    content = [{"type": "text", "text": "Hear "}, {"type": "audio"}]
    request = item(conversation=[{"role": "user", "content": content}])
    messages, _ = build_conversation(request, wav, "T")
    assert messages[0]["content"][1]["audio"] is wav and content[1] == {"type": "audio"}
    # No audio part: it goes first in the first user message.
    request = item(conversation=[{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}])
    messages, _ = build_conversation(request, wav, "T")
    assert messages[1]["content"] == [{"type": "audio", "audio": wav}, {"type": "text", "text": "Hi"}]


@pytest.mark.parametrize(
    "request_, message",
    [
        ({"prompt": 3}, "'prompt' must be a string"),
        ({"prompt": "a", "conversation": [{"role": "user", "content": "b"}]}, "not both"),
        ({"conversation": "hello"}, "non-empty list of messages"),
        ({"conversation": [{"role": "system", "content": "S"}]}, "no user message"),
        ({"conversation": [{"role": "user", "content": [{"type": "audio", "path": "y.wav"}]}]}, "own source"),
    ],
)
def test_build_conversation_errors_name_the_item(request_, message):
    with pytest.raises(InputError, match=rf"item 'x' \(line 1\): .*{message}"):
        build_conversation(item(**request_), np.zeros(10, np.float32), "T")


@pytest.mark.parametrize("rate, frames", [(16000, 12345), (8000, 4001), (44100, 30001), (22050, 1)])
def test_audio_samples_from_the_header_equals_the_loaded_length(tmp_path, rate, frames):
    path = tmp_path / "a.flac"
    sf.write(path, speech_like(frames, rate), rate)
    assert audio_samples(str(path)) == len(load_audio(path))


def test_audio_samples_is_none_when_the_header_cannot_be_read(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really")
    assert audio_samples(str(tmp_path / "bad.wav")) is None
    assert audio_samples(str(tmp_path / "missing.wav")) is None
    assert audio_samples("https://example.org/a.wav") is None


lengths = st.lists(st.one_of(st.none(), st.integers(0, 20 * 480_000)), min_size=1, max_size=60)


def make_items(samples: list[int | None], seeded: set[int] = frozenset(), tokens: dict = None) -> list[Item]:
    items = []
    for i, n in enumerate(samples):
        request = {"id": i, "audio": "a.wav", **({"seed": 1, "do_sample": True} if i in seeded else {})}
        if tokens and i in tokens:
            request["max_new_tokens"] = tokens[i]
        items.append(Item(i, i + 1, i, "a.wav", request, samples=n))
    return items


@given(lengths, st.integers(1, 9))
def test_shard_deals_every_item_once_in_equal_shares(samples, world):
    items = make_items(samples)
    shares = [shard(items, rank, world) for rank in range(world)]
    dealt = sorted(it.index for share in shares for it in share)
    assert dealt == list(range(len(items)))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    known = [it.samples for it in shard(items, 0, 1) if it.samples is not None]
    assert known == sorted(known, reverse=True)  # longest first


@settings(deadline=None)
@given(
    lengths,
    st.integers(1, 40_000),
    st.integers(1, 8),
    st.sets(st.integers(0, 59), max_size=5),
    st.dictionaries(st.integers(0, 59), st.sampled_from([4, 64]), max_size=10),
)
def test_pack_covers_every_item_once_within_budget(samples, budget, max_rows, seeded, tokens):
    items = shard(make_items(samples, seeded, tokens), 0, 1)
    defaults = {"max_new_tokens": 16}
    batches = pack(items, defaults, budget, max_rows)
    assert sorted(it.index for batch, _ in batches for it in batch) == sorted(it.index for it in items)
    for batch, options in batches:
        assert all({**defaults, **it.options} == options for it in batch)  # one generate call's settings
        assert len(batch) <= max_rows
        if len(batch) > 1:
            assert max(row_tokens(it, options) for it in batch) * len(batch) <= budget
            assert all(it.samples is not None and "seed" not in it.options for it in batch)
