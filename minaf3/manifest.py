"""Batch manifests: JSON lines to checked items, each item's conversation, and the work split into batches.

A manifest line (one JSON object per line; blank lines are skipped):

    {"id": "a1", "audio": "clips/a1.wav", "prompt": "What is in this audio?", "max_new_tokens": 64}

    id            a string or an integer, unique in the manifest: the key of the output and of resuming
    audio         a file path (relative paths start from the manifest's folder) or an http(s) URL
    prompt        a question about the audio, or
    conversation  messages in the processor's format: the item's audio goes where a bare {"type": "audio"}
                  part stands, else first in the first user message
                  (neither: a transcription request, answered as `minaf3 transcribe` does, framing removed)
    options       max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
                  seed (a seeded item runs alone, so its sample does not depend on its batch mates)

A line that is not a JSON object, lacks `id` or `audio`, or repeats an id stops the run before any model
work (InputError naming the line). Anything wrong inside an item (its audio, its conversation, its options)
is that item's error, reported in its output line.
"""

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import soundfile as sf

from minaf3.chat_template import AUDIO_SOURCE_KEYS
from minaf3.errors import InputError
from minaf3.windows import MAX_AUDIO_SAMPLES, SAMPLING_RATE, audio_token_count

logger = logging.getLogger(__name__)

GENERATION_KEYS = (
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "seed",
)
ITEM_KEYS = ("id", "audio", "prompt", "conversation", *GENERATION_KEYS)
AUDIO_URL_PREFIXES = ("http://", "https://")
# The chat template around the text: the default system prompt and the role markers are ~25 Qwen2 tokens.
TEMPLATE_TOKENS = 32


@dataclass
class Item:
    """One manifest line. samples: its audio's length at 16 kHz from the file header, None if unknown."""

    index: int  # position among the manifest's items: the output order
    line: int  # 1-based line number in the manifest, for messages
    id: str | int
    audio: str  # path resolved against the manifest's folder, or a URL
    request: dict = field(repr=False)  # the line as read
    samples: int | None = None

    @property
    def options(self) -> dict:
        return {k: self.request[k] for k in GENERATION_KEYS if k in self.request}


def read_manifest(path: str | os.PathLike, extra_keys: tuple[str, ...] = ()) -> list[Item]:
    """Every item of a JSONL manifest, checked for what the run cannot do without: raises InputError.

    extra_keys: keys a caller reads besides ITEM_KEYS (evaluation's "answer"), not warned about as unknown.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such manifest file")
    items: list[Item] = []
    first_line: dict[Any, int] = {}
    unknown: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path} line {number}"
            try:
                request = json.loads(text)
            except ValueError as exc:
                raise InputError(f"{where}: not JSON ({exc})") from None
            if not isinstance(request, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(request).__name__}")
            for key in ("id", "audio"):
                if key not in request:
                    raise InputError(f"{where}: missing {key!r} (each line needs 'id' and 'audio')")
            key = request["id"]
            if isinstance(key, bool) or not isinstance(key, str | int) or key == "":
                raise InputError(f"{where}: 'id' must be a non-empty string or an integer, got {key!r:.60}")
            if key in first_line:
                raise InputError(f"{where}: duplicate id {key!r} (first on line {first_line[key]})")
            first_line[key] = number
            audio = request["audio"]
            if not isinstance(audio, str) or not audio:
                raise InputError(f"{where}: 'audio' must be a file path or URL, got {audio!r:.60}")
            if not audio.startswith(AUDIO_URL_PREFIXES):
                audio = str(path.parent / audio)  # an absolute path stays as it is
            for name in request.keys() - {*ITEM_KEYS, *extra_keys}:
                unknown.setdefault(name, number)
            items.append(Item(len(items), number, key, audio, request))
    if not items:
        raise InputError(f"{path}: the manifest holds no items")
    if unknown:
        names = ", ".join(f"{k!r} (line {n})" for k, n in sorted(unknown.items(), key=lambda kv: kv[1]))
        logger.warning("%s: ignoring unknown key(s) %s; item keys are %s", path, names, ", ".join(ITEM_KEYS))
    return items


def build_conversation(item: Item, waveform: Any, transcription_prompt: str) -> tuple[list[dict], bool]:
    """The item's conversation with its audio (a waveform) in place, and whether it is a transcription
    request (whose answer loses AF3's framing, as in `transcribe`). Raises InputError for a bad request;
    malformed messages are left for the processor to name."""
    request, name = item.request, f"item {item.id!r} (line {item.line})"
    if "conversation" not in request:
        prompt = request.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise InputError(f"{name}: 'prompt' must be a string, got {type(prompt).__name__}")
        text = transcription_prompt if prompt is None else prompt
        return [
            {
                "role": "user",
                "content": [{"type": "audio", "audio": waveform}, {"type": "text", "text": text}],
            }
        ], (prompt is None)
    if "prompt" in request:
        raise InputError(f"{name}: give 'prompt' or 'conversation', not both")
    conversation = request["conversation"]
    if not isinstance(conversation, list) or not conversation:
        raise InputError(f"{name}: 'conversation' must be a non-empty list of messages")
    messages = [dict(m) if isinstance(m, dict) else m for m in conversation]
    placed = False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "audio":
                if any(part.get(k) is not None for k in AUDIO_SOURCE_KEYS):
                    raise InputError(
                        f"{name}: an audio part names its own source; the item's 'audio' is its only audio "
                        "(leave the part as {'type': 'audio'})"
                    )
                part, placed = {"type": "audio", "audio": waveform}, True
            parts.append(part)
        message["content"] = parts
    if not placed:
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise InputError(f"{name}: the conversation has no user message to put the audio in")
        content = users[0].get("content")
        text = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        users[0]["content"] = [{"type": "audio", "audio": waveform}, *text]
    return messages, False


def audio_samples(source: str) -> int | None:
    """Length at 16 kHz from the file header (no decoding), or None when the header cannot be read."""
    if source.startswith(AUDIO_URL_PREFIXES):
        return None
    try:
        info = sf.info(source)
    except Exception:  # unreadable or missing: the item fails properly when its audio is loaded
        return None
    if info.frames <= 0 or info.samplerate <= 0:
        return None
    return math.ceil(info.frames * SAMPLING_RATE / info.samplerate)  # what load_audio's resampling returns


def shard(items: list[Item], rank: int, world: int) -> list[Item]:
    """This rank's share: all items longest first, dealt round robin, so every rank gets as much audio.

    Items of unknown length (unreadable headers) go last; ties keep manifest order, so every rank computes
    the same order from the same lengths.
    """
    ordered = sorted(items, key=lambda it: (it.samples is None, -(it.samples or 0), it.index))
    return ordered[rank::world]


def row_tokens(item: Item, options: dict) -> int:
    """An upper bound on one row's sequence: audio tokens + text bytes (byte-level BPE makes at most one
    token per byte) + the template + max_new_tokens."""
    audio = audio_token_count(min(item.samples or 0, MAX_AUDIO_SAMPLES))  # the processor cuts at 600 s
    text = json.dumps([item.request.get("prompt"), item.request.get("conversation")], ensure_ascii=False)
    new = options.get("max_new_tokens")
    new = new if isinstance(new, int) and not isinstance(new, bool) and new > 0 else 0
    return audio + len(text.encode("utf-8")) + TEMPLATE_TOKENS + new


def pack(
    items: list[Item], defaults: dict, token_budget: int, max_batch_size: int
) -> list[tuple[list[Item], dict]]:
    """Batches of items that share generation options (one generate call each), with those options.

    Items come in `shard`'s order (longest first), so consecutive rows have similar lengths and little
    padding. A batch grows while rows x its longest row stays within token_budget and it holds at most
    max_batch_size rows; a longer item runs alone. Items of unknown length and seeded items run alone.
    """
    groups: dict[str, list[Item]] = {}
    for item in items:  # dicts keep insertion order: within a group, still longest first
        options = {**defaults, **item.options}
        groups.setdefault(json.dumps(options, sort_keys=True), []).append(item)
    batches: list[tuple[list[Item], dict]] = []
    for key, group in groups.items():
        options = json.loads(key)
        alone = "seed" in options
        batch: list[Item] = []
        longest = 0
        for item in group:
            tokens = row_tokens(item, options)
            fits = max(longest, tokens) * (len(batch) + 1) <= token_budget and len(batch) < max_batch_size
            if batch and (alone or item.samples is None or not fits):
                batches.append((batch, options))
                batch, longest = [], 0
            batch.append(item)
            longest = max(longest, tokens)
            if item.samples is None:  # close it: nothing joins an item of unknown length
                batches.append((batch, options))
                batch, longest = [], 0
        if batch:
            batches.append((batch, options))
    return batches
