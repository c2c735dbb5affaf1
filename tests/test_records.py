"""minaf3/records.py: records on disk survive torn lines, texts beat errors, merge writes manifest order, and
answers made with other settings are not mixed with new ones."""

import json

import pytest

from minaf3.errors import ConfigError
from minaf3.manifest import read_manifest
from minaf3.records import PartWriter, check_settings, merge, parts_dir, read_records, settings_path


def records_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_on_disk_survive_torn_lines_and_prefer_texts(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "error": "AudioError: old"}\n{"id": "b", "text": "B"}\n')
    part = parts_dir(out) / "rank-00001.jsonl"
    part.parent.mkdir()
    part.write_text('{"id": "a", "text": "A"}\n{"id": "b", "error": "X: later"}\n{"id": "c", "text": "C"}')
    records = read_records(out)
    assert records == {"a": {"id": "a", "text": "A"}, "b": {"id": "b", "text": "B"}}  # "c" is torn
    writer = PartWriter(part)  # drops the torn tail before appending
    writer.write([{"id": "c", "text": "C2"}, {"id": 4, "text": "ü"}])
    writer.close()
    assert part.read_text(encoding="utf-8").endswith(
        '"X: later"}\n{"id": "c", "text": "C2"}\n{"id": 4, "text": "ü"}\n'
    )
    manifest = tmp_path / "in.jsonl"
    manifest.write_text("".join(json.dumps({"id": k, "audio": "x.wav"}) + "\n" for k in ["c", 4, "a", "b"]))
    counts = merge(read_manifest(manifest), out)
    assert counts == {"items": 4, "texts": 4, "errors": 0} and not parts_dir(out).exists()
    assert [r["id"] for r in records_of(out)] == ["c", 4, "a", "b"]


def test_two_texts_for_one_id_in_the_parts_are_an_error(tmp_path):
    out = tmp_path / "out.jsonl"
    parts_dir(out).mkdir()
    for rank in range(2):
        (parts_dir(out) / f"rank-0000{rank}.jsonl").write_text('{"id": "a", "text": "A"}\n')
    with pytest.raises(ConfigError, match="a second result for id 'a'; do two jobs write --out"):
        read_records(out)


SETTINGS = {"model": "/models/a", "adapter": None, "max_new_tokens": 6}


def test_settings_are_checked_only_against_existing_records(tmp_path):
    out = tmp_path / "answers.jsonl"
    check_settings(out, SETTINGS, rank=0)  # nothing recorded: anything goes, and rank 0 notes the settings
    assert json.loads(settings_path(out).read_text()) == SETTINGS
    check_settings(out, {**SETTINGS, "max_new_tokens": 7}, rank=0)  # still nothing recorded
    out.write_text('{"id": "a", "text": "A"}\n')
    check_settings(out, {**SETTINGS, "max_new_tokens": 7}, rank=1)  # the settings the records were made with
    with pytest.raises(ConfigError) as caught:
        check_settings(out, {**SETTINGS, "max_new_tokens": 7, "adapter": "/adapters/b"}, rank=1)
    message = str(caught.value)
    assert "adapter None then, '/adapters/b' now" in message and "give another output file" in message
    assert "max_new_tokens" not in message  # only what differs is named
    assert json.loads(settings_path(out).read_text())["max_new_tokens"] == 7  # a refusal writes nothing


def test_settings_of_records_in_part_files_count_and_a_damaged_file_matches_nothing(tmp_path):
    out = tmp_path / "answers.jsonl"
    parts_dir(out).mkdir()
    (parts_dir(out) / "rank-00000.jsonl").write_text('{"id": "a", "error": "AudioError: x"}\n')
    check_settings(out, SETTINGS, rank=0)
    with pytest.raises(ConfigError, match="model '/models/a' then, '/models/b' now"):
        check_settings(out, {**SETTINGS, "model": "/models/b"}, rank=0)
    settings_path(out).write_text("{not json")
    with pytest.raises(ConfigError, match="other settings"):
        check_settings(out, SETTINGS, rank=0)
    settings_path(out).unlink()  # records without settings (minaf3 batch's) are taken as they are
    check_settings(out, SETTINGS, rank=0)
