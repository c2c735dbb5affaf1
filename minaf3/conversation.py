"""What `Pipeline.chat` hands the processor: a conversation with its audio loaded and held to 600 s.

    build_conversation("What is it?", audio="a.wav")  -> [{"role": "user", "content": [audio, text]}]
    add_think_request(conversation)                  appends AF-Think's request to the last user turn
    load_conversation_audio(conversation, refuse)    every audio part as a 16 kHz waveform of <= 600 s

Paths, URLs and arrays go through one loader and one length policy, so `chat` treats them alike; parts that
are malformed are passed on untouched for the processor to name.
"""

from typing import Any

import numpy as np

from minaf3.audio import load_audio
from minaf3.chat_template import AUDIO_SOURCE_KEYS
from minaf3.errors import AudioError, AudioFileError, InputError
from minaf3.windows import REFUSAL as AF3_REFUSAL
from minaf3.windows import SAMPLING_RATE, kept_samples

THINK_SUFFIX = "Please think and reason about the input audio before you respond."  # AF-Think's trigger
# What chat says when audio is past 600 s (templates of windows.kept_samples): unlike the processor, chat
# can point to transcribe(), which reads any length in segments.
CUT_WARNING = "{what} is {seconds:.1f} s long; chat uses its first {kept} s (transcribe() reads all of it)"
REFUSAL = AF3_REFUSAL + " (use transcribe() for long recordings, or let chat use the first {kept} s)"


def build_conversation(messages_or_question: str | list[dict], audio: Any = None) -> list[dict]:
    """A question and its audio as one user turn (audio first, as AF3's template renders it), or a copy
    of the given messages (each message dict copied, so adding the think request never edits the caller's)."""
    if isinstance(messages_or_question, str):
        clips = [] if audio is None else list(audio) if isinstance(audio, list | tuple) else [audio]
        content = [{"type": "audio", "audio": clip} for clip in clips]
        return [{"role": "user", "content": content + [{"type": "text", "text": messages_or_question}]}]
    if not isinstance(messages_or_question, list | tuple) or not messages_or_question:
        raise InputError(
            "chat: expected a question (str) or a non-empty list of messages, "
            f"got {messages_or_question!r:.80}"
        )
    if audio is not None:
        raise InputError(
            "chat: with a list of messages, put the audio inside them as {'type': 'audio', ...} parts"
        )
    return [dict(m) if isinstance(m, dict) else m for m in messages_or_question]


def add_think_request(conversation: list[dict]) -> None:
    """Append AF-Think's request to the text of the last user message (in place; see build_conversation)."""
    users = [m for m in conversation if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise InputError("chat: think=True needs a user message to add the reasoning request to")
    message = users[-1]
    content = message.get("content")
    if isinstance(content, str) or content is None:
        message["content"] = f"{content} {THINK_SUFFIX}".strip() if content else THINK_SUFFIX
        return
    parts = list(content)
    texts = [i for i, part in enumerate(parts) if isinstance(part, dict) and part.get("type") == "text"]
    if texts:
        last = parts[texts[-1]]
        parts[texts[-1]] = {**last, "text": f"{last.get('text', '')} {THINK_SUFFIX}".strip()}
    else:
        parts.append({"type": "text", "text": THINK_SUFFIX})
    message["content"] = parts


def load_conversation_audio(conversation: list[dict], refuse_long_audio: bool) -> list[dict]:
    """A copy with every audio part loaded and held to 600 s, so one policy covers paths, URLs and arrays.

    Malformed parts are left as they are for the processor to report.
    """
    out = []
    for m, message in enumerate(conversation):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for p, part in enumerate(content):
            keys = [k for k in AUDIO_SOURCE_KEYS if isinstance(part, dict) and part.get(k) is not None]
            if isinstance(part, dict) and part.get("type") == "audio" and len(keys) == 1:
                name = f"message {m}, part {p}"
                waveform = read_audio(part[keys[0]], name)
                part = {"type": "audio", "audio": _limit(waveform, name, refuse_long_audio)}
            parts.append(part)
        out.append({**message, "content": parts})
    return out


def read_audio(source: Any, name: str) -> np.ndarray:
    """load_audio at 16 kHz, with `name` (which input or part) in front of any error."""
    try:
        return load_audio(source, SAMPLING_RATE)
    except (AudioError, AudioFileError) as exc:
        raise type(exc)(f"{name}: {exc}") from exc


def _limit(waveform: np.ndarray, name: str, refuse: bool) -> np.ndarray:
    """The first 600 s of `waveform` by windows.kept_samples: a warning when that drops audio, or an
    InputError if refusing, both in chat's words (transcribe() reads long recordings whole)."""
    kept = kept_samples(len(waveform), name, refuse=refuse, warning=CUT_WARNING, refusal=REFUSAL)
    return waveform[:kept]
