"""minaf3/evaluate.py on the demo checkpoint: scores against a direct count of the report's predictions, both
dataset formats through generation, item errors, re-scoring, resuming, settings, torchrun, and the errors
that come before any model work."""

import json
import re
import subprocess
import sys

import pytest
import soundfile as sf

import minaf3.batch
import minaf3.evaluate
from minaf3 import tasks
from minaf3.cli import main
from minaf3.errors import ConfigError
from minaf3.evaluate import evaluate, format_table, predictions_path
from minaf3.metrics import word_errors

NEW_TOKENS = 6
RUN = {"max_new_tokens": NEW_TOKENS, "progress": False}
CLI_RUN = ["--max-new-tokens", str(NEW_TOKENS), "--no-progress"]
TASKS = ("count", "pitch", "kind")
CLIPS = 9  # three per task
TIMEOUT = 300  # seconds for a torchrun launch


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Nine task clips as a JSONL dataset (clips/ beside it), plus an item whose file is not audio and one
    whose file does not exist."""
    root = tmp_path_factory.mktemp("eval_corpus")
    (root / "clips").mkdir()
    lines = []
    for i, example in enumerate(tasks.examples(TASKS, seed=0, n=CLIPS)):
        sf.write(root / f"clips/{i}.wav", example.waveform, 16000, subtype="PCM_16")
        lines.append(
            {"id": f"q{i}", "audio": f"clips/{i}.wav", "prompt": example.question, "answer": example.answer}
            | {"task": example.task}
        )
    (root / "clips/broken.wav").write_bytes(b"RIFF\x00\x00 not a wave file")
    lines.insert(3, {"id": "broken", "audio": "clips/broken.wav", "prompt": "Count.", "answer": "1 beep"})
    lines.insert(5, {"id": "gone", "audio": "clips/nowhere.wav", "prompt": "Count.", "answer": "1 beep"})
    for line in lines[3], lines[5]:
        line["task"] = "count"
    (root / "eval.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


@pytest.fixture(scope="module")
def first(demo_checkpoint, corpus) -> dict:
    """The JSONL dataset answered and scored once (exact)."""
    return evaluate(demo_checkpoint, corpus / "eval.jsonl", corpus / "first.json", **RUN)


def words(text: str) -> list[str]:
    """The test's own normalisation, written apart from metrics.py: lower case, letters and digits, no
    articles."""
    kept = re.sub(r"[^a-z0-9]+", " ", text.lower().replace("'", "")).split()
    return [word for word in kept if word not in {"a", "an", "the"}]


def no_generation(monkeypatch):
    """Make loading a model fail: what runs after this must score recorded answers only."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(minaf3.batch, "load", refuse)


def test_report_holds_every_item_and_unreadable_audio_is_an_error(first, corpus):
    items = {item["id"]: item for item in first["items"]}
    assert list(items) == [
        json.loads(line)["id"] for line in (corpus / "eval.jsonl").read_text().splitlines()
    ]
    assert items["broken"]["error"].startswith("AudioError: ") and "broken.wav" in items["broken"]["error"]
    assert items["gone"]["error"].startswith("AudioFileError: ") and "nowhere.wav" in items["gone"]["error"]
    assert "prediction" not in items["broken"] and "score" not in items["gone"]  # not a wrong answer
    answered = [item for item in first["items"] if "error" not in item]
    assert len(answered) == CLIPS and all(isinstance(item["prediction"], str) for item in answered)
    count = first["tasks"]["count"]
    assert (count["items"], count["errors"]) == (5, 2)  # three clips and the two failures
    assert count["score"] == count["correct"] / 3  # the failures are outside the score
    assert (first["overall"]["items"], first["overall"]["errors"]) == (CLIPS + 2, 2)
    assert list(first["tasks"]) == list(TASKS)


def test_scores_equal_a_direct_count_of_the_predictions(first, demo_checkpoint, corpus):
    """The same clips as NVIDIA's JSON, with answers made from the first run's predictions: every other
    item's answer is its prediction in another case, with an article and punctuation (a match), the others
    a text no prediction holds. The scores must be exactly the count of matches, per task and overall."""
    entries, matched = [], {task: 0 for task in TASKS}
    lines = [json.loads(line) for line in (corpus / "eval.jsonl").read_text().splitlines()]
    predictions = {item["id"]: item.get("prediction") for item in first["items"]}
    for i, line in enumerate(lines):
        prediction = predictions[line["id"]]
        match = prediction is not None and i % 2 == 0
        answer = f"The {prediction.upper()} !! " if match else "zq unmatched"
        matched[line["task"]] += match
        turns = [{"from": "human", "value": f"<sound>\n{line['prompt']}"}, {"from": "gpt", "value": answer}]
        entries.append(
            {"id": line["id"], "sound": line["audio"], "conversations": turns, "task": line["task"]}
        )
    (corpus / "nvidia.json").write_text(json.dumps(entries))
    report = evaluate(demo_checkpoint, corpus / "nvidia.json", corpus / "nvidia_report.json", **RUN)

    # NVIDIA's format puts the audio where <sound> stands, before the question: the same conversation.
    assert {i["id"]: i.get("prediction") for i in report["items"]} == predictions
    for task, row in report["tasks"].items():
        mine = [i for i in report["items"] if i["task"] == task and "error" not in i]
        assert (
            row["correct"] == matched[task] == sum(words(i["prediction"]) == words(i["answer"]) for i in mine)
        )
        assert row["score"] == matched[task] / len(mine) == sum(i["score"] for i in mine) / len(mine)
    overall = report["overall"]
    assert overall["correct"] == sum(matched.values()) > 0
    assert overall["score"] == sum(matched.values()) / CLIPS
    saved = json.loads((corpus / "nvidia_report.json").read_text())
    assert saved == json.loads(json.dumps(report))  # the file is the report returned


def test_other_metrics_rescore_the_recorded_answers(first, demo_checkpoint, corpus, capsys, monkeypatch):
    no_generation(monkeypatch)
    base = [
        "eval",
        "--model",
        demo_checkpoint,
        "--data",
        corpus / "eval.jsonl",
        "--out",
        corpus / "first.json",
    ]
    assert main([str(a) for a in [*base, "--metric", "wer", *CLI_RUN]]) == 0
    out = capsys.readouterr().out
    report = json.loads((corpus / "first.json").read_text())
    assert report["metric"] == "wer" and out.strip() == format_table(report)
    answered = [item for item in report["items"] if "error" not in item]
    for item in answered:
        assert item["prediction"] == next(i for i in first["items"] if i["id"] == item["id"])["prediction"]
        assert (item["edits"], item["words"]) == word_errors(item["prediction"], item["answer"])
    overall = report["overall"]
    assert overall["score"] == sum(i["edits"] for i in answered) / sum(i["words"] for i in answered)
    assert overall["low"] <= overall["score"] <= overall["high"]
    assert re.search(r"^\| overall \| 11 \| 2 \| \d+\.\d% \| \[\d+\.\d%, \d+\.\d%\] \|$", out, re.MULTILINE)
    assert "| count | 5 | 2 |" in out and "95% percentile bootstrap" in out


def test_other_settings_are_refused_rather_than_mixed(first, demo_checkpoint, corpus, monkeypatch):
    no_generation(monkeypatch)
    with pytest.raises(ConfigError, match=r"max_new_tokens 6 then, 7 now.*give another output file"):
        evaluate(demo_checkpoint, corpus / "eval.jsonl", corpus / "first.json", max_new_tokens=7)
    with pytest.raises(ConfigError, match=r"sample False then, True now"):
        evaluate(demo_checkpoint, corpus / "eval.jsonl", corpus / "first.json", sample=True, **RUN)


def test_an_interrupted_run_resumes_where_it_stopped(first, demo_checkpoint, corpus, monkeypatch):
    run_items, calls = minaf3.batch.run_items, []

    def interrupted(pipe, batch, options):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C in the third batch
        calls.append([item.id for item in batch])
        return run_items(pipe, batch, options)

    out = corpus / "resumed.json"
    monkeypatch.setattr(minaf3.batch, "run_items", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(demo_checkpoint, corpus / "eval.jsonl", out, max_batch_size=2, **RUN)
    assert not out.exists()
    done = {key for batch in calls for key in batch}
    monkeypatch.setattr(
        minaf3.batch, "run_items", lambda *a: calls.append([i.id for i in a[1]]) or run_items(*a)
    )
    report = evaluate(demo_checkpoint, corpus / "eval.jsonl", out, max_batch_size=2, **RUN)
    again = {key for batch in calls[2:] for key in batch}
    assert len(done) == 4 and not done & again and len(done | again) == CLIPS + 2  # each item once
    assert report["items"] == first["items"] and report["tasks"] == first["tasks"]


def test_two_torchrun_ranks_give_the_one_process_report(first, demo_checkpoint, corpus):
    out = corpus / "torchrun.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [
        "-m",
        "minaf3.evaluate",
        "--model",
        str(demo_checkpoint),
        "--data",
        str(corpus / "eval.jsonl"),
    ]
    done = subprocess.run(
        [*command, "--out", str(out), *CLI_RUN], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["items"] == first["items"] and report["overall"] == first["overall"]
    assert done.stdout.count("| overall |") == 1  # rank 0 alone prints the table


# ---- errors before any model work -----------------------------------------------------------------------
def test_unknown_metric_is_refused(capsys, demo_checkpoint, corpus):
    with pytest.raises(ConfigError, match="metric 'bleu': expected one of exact, contains, choice, wer"):
        evaluate(demo_checkpoint, corpus / "does-not-exist.json", corpus / "r.json", metric="bleu")
    argv = ["eval", "--model", demo_checkpoint, "--data", corpus / "eval.jsonl", "--out", corpus / "r.json"]
    assert main([str(a) for a in [*argv, "--metric", "bleu"]]) == 2
    assert "invalid choice: 'bleu'" in capsys.readouterr().err
    assert not (corpus / "r.json").exists()


def test_a_malformed_dataset_is_refused_before_the_model_is_looked_at(capsys, tmp_path):
    turns = [{"from": "human", "value": "<sound>"}, {"from": "gpt", "value": "x"}]
    entries = [{"id": "a", "sound": "a.wav", "conversations": turns}, {"id": "b", "conversations": []}]
    (tmp_path / "bad.json").write_text(json.dumps(entries))
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "bad.json")]
    assert main([*argv, "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("minaf3: error: ")
        and "bad.json entry 1: missing 'sound'" in err
        and "no-model" not in err
    )
    (tmp_path / "bad.json").write_text(json.dumps(entries[:1]))
    assert main([*argv, "--out", str(tmp_path / "r.json")]) == 2
    assert "no-model" in capsys.readouterr().err  # a good dataset: then the model is looked at
    assert main([*argv, "--out", str(tmp_path / "bad.json")]) == 2
    assert "not the dataset or a folder" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists() and not predictions_path(tmp_path / "r.json").exists()
    # `python -m minaf3.evaluate` (torchrun's form) is the same command with the same errors
    assert minaf3.evaluate.main([*argv[1:], "--out", str(tmp_path / "bad.json")]) == 2
    assert capsys.readouterr().err.startswith("minaf3: error: ") and not (tmp_path / "r.json").exists()
