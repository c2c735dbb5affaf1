"""Evaluation datasets: NVIDIA's JSON and minaf3 batch's JSONL with answers, read into checked items.

Two formats, told apart by the file's first character (`[` starts NVIDIA's JSON list):

NVIDIA's JSON (the audio-flamingo repository's training and evaluation files): a list of entries

    {"id": "x1", "sound": "clips/x1.wav", "conversations": [
        {"from": "human", "value": "<sound>\\nWhat is the mood?\\n(A) Sad to happy\\n(B) Calm"},
        {"from": "gpt", "value": "(A) Sad to happy"}]}

  Turns alternate human, gpt, human, ... and end with gpt: the last one is the expected answer, the turns
  before it the conversation the model continues. `<sound>` stands once, in a human turn, where the audio
  goes. An optional "task" (a string) groups the report; other keys (AF3's "duration", ...) are ignored.

minaf3 batch's JSONL manifest (manifest.py), each line with an "answer" (a string) and an optional "task":

    {"id": "x1", "audio": "clips/x1.wav", "prompt": "How many beeps?", "answer": "3 beeps", "task": "count"}

In both, relative paths start from the dataset file's folder and ids are unique. Items without a task are
grouped under the file's name without its extension (NVIDIA keeps one file per benchmark). Anything wrong
with the file (not JSON, a missing or mistyped field, a duplicate id) is an InputError naming the entry's
index (JSON) or line (JSONL), raised before any model work. Audio files are not opened here: one that cannot
be read becomes its item's error when the item runs.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minaf3.chat_template import AUDIO_TOKEN
from minaf3.errors import InputError
from minaf3.manifest import AUDIO_URL_PREFIXES, Item, read_manifest

ROLES = {"human": "user", "gpt": "assistant"}  # NVIDIA's "from" -> the processor's role
EXTRA_KEYS = ("answer", "task")  # what a JSONL evaluation line adds to a batch manifest line


@dataclass(frozen=True)
class EvalItem:
    """One question with its expected answer.

    item: what the batch machinery runs (id, resolved audio path, request); answer: the reference text;
    task: its group in the report; question: the text of the last user turn (without `<sound>`), where the
    choice metric finds the options, or None for a transcription request (a JSONL line without a prompt).
    """

    item: Item
    answer: str
    task: str
    question: str | None

    @property
    def id(self) -> str | int:
        return self.item.id


def read_dataset(path: str | os.PathLike) -> list[EvalItem]:
    """Every item of an evaluation file in either format, checked; raises InputError (see the docstring)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such dataset file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc})") from None
    items = read_nvidia_json(path, text) if text.lstrip().startswith("[") else read_answer_manifest(path)
    if not items:
        raise InputError(f"{path}: the dataset holds no items")
    return items


# ---- NVIDIA's JSON -----------------------------------------------------------------------------------------
def read_nvidia_json(path: Path, text: str) -> list[EvalItem]:
    """The entries of NVIDIA's JSON format (`text`, read from `path`), in order."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(entries, list):
        raise InputError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    first_index: dict[Any, int] = {}
    items = []
    for index, entry in enumerate(entries):
        where = f"{path} entry {index}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        for key in ("id", "sound", "conversations"):
            if key not in entry:
                raise InputError(
                    f"{where}: missing {key!r} (each entry needs 'id', 'sound', 'conversations')"
                )
        key = _check_id(entry["id"], where)
        if key in first_index:
            raise InputError(f"{where}: duplicate id {key!r} (first at entry {first_index[key]})")
        first_index[key] = index
        where = f"{where} (id {key!r})"
        sound = entry["sound"]
        if isinstance(sound, list):
            raise InputError(f"{where}: 'sound' is a list; one audio file per entry is supported")
        if not isinstance(sound, str) or not sound.strip():
            raise InputError(f"{where}: 'sound' must be a file path or URL, got {sound!r:.60}")
        messages, answer, question = _conversation(entry["conversations"], where)
        task = _check_task(entry.get("task"), where, default=path.stem)
        request = {"id": key, "audio": sound, "conversation": messages}
        # Item.line, which messages quote, holds the entry's index: a JSON list has no line per entry.
        item = Item(index, index, key, _resolve(path, sound), request)
        items.append(EvalItem(item, answer, task, question))
    return items


def _conversation(turns: Any, where: str) -> tuple[list[dict], str, str]:
    """NVIDIA's turns -> (the messages before the last gpt turn, its value: the answer, the last human text).

    The human turn with `<sound>` gets an audio part where the placeholder stood, between its texts.
    """
    if not isinstance(turns, list) or len(turns) < 2:
        raise InputError(f"{where}: 'conversations' must be a list of at least a human and a gpt turn")
    messages = []
    sounds = 0
    for number, turn in enumerate(turns):
        at = f"{where}, conversations[{number}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise InputError(f"{at}: expected an object with 'from' and 'value'")
        expected = "human" if number % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise InputError(f"{at}: 'from' is {turn['from']!r}; turns alternate human, gpt, ... from human")
        value = turn["value"]
        if not isinstance(value, str):
            raise InputError(f"{at}: 'value' must be a string, got {type(value).__name__}")
        count = value.count(AUDIO_TOKEN)
        if count and expected == "gpt":
            raise InputError(f"{at}: {AUDIO_TOKEN} in a gpt turn; the audio goes in a human turn")
        sounds += count
        content: str | list[dict] = value
        if count:
            before, _, after = (text.strip() for text in value.partition(AUDIO_TOKEN))
            content = [{"type": "text", "text": before}] if before else []
            content.append({"type": "audio"})
            content += [{"type": "text", "text": after}] if after else []
        messages.append({"role": ROLES[expected], "content": content})
    if len(turns) % 2:
        raise InputError(f"{where}: the last turn must be gpt's: its value is the expected answer")
    if sounds != 1:
        raise InputError(f"{where}: {AUDIO_TOKEN} must stand exactly once in the human turns, found {sounds}")
    answer = turns[-1]["value"]
    if not answer.strip():
        raise InputError(f"{where}: the last gpt turn (the expected answer) is empty")
    question = " ".join(text.strip() for text in turns[-2]["value"].split(AUDIO_TOKEN) if text.strip())
    return messages[:-1], answer, question


# ---- JSONL with answers ------------------------------------------------------------------------------------
def read_answer_manifest(path: Path) -> list[EvalItem]:
    """The lines of a batch manifest (manifest.read_manifest's checks) with their answers and tasks."""
    items = []
    for item in read_manifest(path, extra_keys=EXTRA_KEYS):
        where = f"{path} line {item.line} (id {item.id!r})"
        answer = item.request.get("answer")
        if answer is None:
            raise InputError(f"{where}: missing 'answer' (the expected answer, a string)")
        if not isinstance(answer, str):
            raise InputError(
                f"{where}: 'answer' must be a string, got {type(answer).__name__}: {answer!r:.60}"
            )
        if not answer.strip():
            raise InputError(f"{where}: 'answer' is empty")
        task = _check_task(item.request.get("task"), where, default=path.stem)
        items.append(EvalItem(item, answer, task, _question(item.request, where)))
    return items


def _question(request: dict, where: str) -> str | None:
    """The text of a line's question: its prompt, or the text of its last user message; None for neither.

    The shapes the run would refuse are refused here, before any model work."""
    if "prompt" in request and "conversation" in request:
        raise InputError(f"{where}: give 'prompt' or 'conversation', not both")
    prompt = request.get("prompt")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise InputError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
        return prompt
    if "conversation" not in request:
        return None  # a transcription request
    messages = request["conversation"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise InputError(f"{where}: 'conversation' must be a non-empty list of message objects")
    users = [m.get("content") for m in messages if m.get("role") == "user"]
    if not users:
        raise InputError(f"{where}: the conversation has no user message")
    content = users[-1]
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else []
    return " ".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))


# ---- shared checks -----------------------------------------------------------------------------------------
def _check_id(key: Any, where: str) -> str | int:
    if isinstance(key, bool) or not isinstance(key, str | int) or key == "":
        raise InputError(f"{where}: 'id' must be a non-empty string or an integer, got {key!r:.60}")
    return key


def _check_task(task: Any, where: str, default: str) -> str:
    if task is None:
        return default
    if not isinstance(task, str) or not task.strip():
        raise InputError(f"{where}: 'task' must be a non-empty string, got {task!r:.60}")
    return task


def _resolve(path: Path, audio: str) -> str:
    """An audio path from the dataset's folder (an absolute path or a URL stays as it is)."""
    return audio if audio.startswith(AUDIO_URL_PREFIXES) else str(path.parent / audio)
