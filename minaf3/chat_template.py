"""The AF3 chat template in Python: conversations (lists of messages) to prompt strings, and their audio.

The checkpoint ships a Jinja template (`chat_template.jinja`); `render` produces exactly its string for every
conversation it accepts, without a Jinja dependency:

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n   if the first message is not "system"
    <|im_start|>{role}\\n{content}<|im_end|>\\n                         each message
    <|im_start|>assistant\\n                                            if add_generation_prompt

A message's content is a string, None (rendered empty, as the template does) or a list of parts:
`{"type": "text", "text": str}` and `{"type": "audio", "path" | "url" | "audio": source}`.

Where `<sound>` goes (several audios per conversation):
- a message with one audio part renders as the reference does: `<sound>` first, then the concatenation of
  all its text parts, wherever the audio part stood among them;
- a message with two or more audio parts renders its parts in order, each audio part as its own `<sound>`
  where it stands, so that "clip A: <audio> clip B: <audio>" keeps each clip next to its words.
So a conversation with exactly one audio part (indeed, with at most one per message) renders exactly as the
reference template does, and the i-th `<sound>` of a rendered prompt always belongs to the i-th audio part in
reading order (messages in order, parts in order), which is the order `audio_parts` returns.

Validation is strict where the reference is silent: roles other than system/user/assistant, part types
other than text/audio, audio parts without exactly one source and non-string text are InputErrors naming
the conversation, message and part.
"""

import re
from dataclasses import dataclass
from typing import Any

from minaf3.errors import InputError

AUDIO_TOKEN = "<sound>"  # the placeholder the template writes for an audio part
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")
AUDIO_SOURCE_KEYS = ("path", "url", "audio")  # the keys transformers' chat templates read audio from
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# The Jinja template transformers' AF3 conversion script writes to `chat_template.jinja`: the one `render`
# reproduces. A checkpoint shipping another template gets a warning from the processor.
REFERENCE_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages if m['content'] is not none %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}"
    "{{ m['content'] }}"
    "{% else %}"
    "{% set audio = namespace(found=False) %}"
    "{% set text_buf = namespace(v='') %}"
    "{% for c in m['content'] %}"
    "{% if c.get('type') == 'audio' or 'audio' in c %}"
    "{% set audio.found = True %}"
    "{% elif c.get('type') == 'text' or 'text' in c %}"
    "{% set text_buf.v = text_buf.v + c['text'] %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if audio.found %}{{ '<sound>' }}{% endif %}{{ text_buf.v }}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


@dataclass(frozen=True)
class AudioPart:
    """One `{"type": "audio", ...}` part: its source and where it stood, for error messages."""

    source: Any  # path or URL string, os.PathLike, bytes, numpy array or torch tensor
    message: int  # index of the message in its conversation
    part: int  # index of the part in the message's content

    @property
    def where(self) -> str:
        return f"message {self.message}, part {self.part}"


@dataclass(frozen=True)
class Message:
    """A validated message. `content` is a string, or a tuple of text strings and AudioParts in order."""

    role: str
    content: str | tuple[str | AudioPart, ...]


def check_text(text: str, where: str) -> str:
    """`text`, refused with an InputError naming `where` if it is not valid Unicode.

    Python strings may hold lone surrogates (a bad decode, `surrogateescape`); the tokenizer takes UTF-8
    and would fail on them with a bare TypeError that names nothing.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"{where}the text holds {text[exc.start]!r} at character {exc.start}: a lone surrogate, "
            "not valid Unicode"
        ) from None
    return text


def _prefix(conversation_index: int | None) -> str:
    return "" if conversation_index is None else f"conversation {conversation_index}, "


def _parse_part(part: Any, message: int, index: int, where: str) -> str | AudioPart:
    if not isinstance(part, dict):
        raise InputError(f"{where}part {index}: a part must be a dict, got {type(part).__name__}")
    kind = part.get("type")
    # Compared only as a string: `array == "text"` would raise a bare ValueError.
    if isinstance(kind, str) and kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise InputError(
                f"{where}part {index}: a text part needs a string 'text', got {type(text).__name__}"
            )
        return check_text(text, f"{where}part {index}: ")
    if isinstance(kind, str) and kind == "audio":
        keys = [key for key in AUDIO_SOURCE_KEYS if part.get(key) is not None]
        if len(keys) != 1:
            found = "none" if not keys else " and ".join(repr(k) for k in keys)
            raise InputError(
                f"{where}part {index}: an audio part needs exactly one of 'path', 'url' or 'audio', "
                f"found {found}"
            )
        return AudioPart(source=part[keys[0]], message=message, part=index)
    raise InputError(
        f"{where}part {index}: unknown part type {kind!r:.40} (AF3 understands 'text' and 'audio' parts)"
    )


def parse(conversation: Any, conversation_index: int | None = None) -> list[Message]:
    """Validate one conversation (a list of message dicts) into Messages.

    conversation_index, when given, names the conversation of a batch in error messages.
    """
    prefix = _prefix(conversation_index)
    if not isinstance(conversation, list | tuple) or not conversation:
        name = f"conversation {conversation_index}" if conversation_index is not None else "a conversation"
        raise InputError(f"{name} must be a non-empty list of message dicts, got {conversation!r:.80}")
    messages = []
    for m, message in enumerate(conversation):
        where = f"{prefix}message {m}: "
        if not isinstance(message, dict):
            raise InputError(f"{where}a message must be a dict with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InputError(f"{where}unknown role {role!r:.40} (expected one of {', '.join(ROLES)})")
        if "content" not in message:
            raise InputError(f"{where}has no 'content' (use None or '' for an empty message)")
        content = message["content"]
        # None renders as an empty message: transformers drops None keys and the template prints nothing.
        if content is None:
            content = ""
        if isinstance(content, str):
            messages.append(Message(role, check_text(content, where)))
        elif isinstance(content, list | tuple):
            where = f"{prefix}message {m}, "
            messages.append(Message(role, tuple(_parse_part(p, m, i, where) for i, p in enumerate(content))))
        else:
            raise InputError(
                f"{where}content must be a string or a list of parts, got {type(content).__name__}"
            )
    return messages


def _render_content(content: str | tuple[str | AudioPart, ...], audio_token: str) -> str:
    if isinstance(content, str):
        return content
    num_audio = sum(isinstance(p, AudioPart) for p in content)
    if num_audio <= 1:
        # The reference: one placeholder before all the message's text, whatever the part order.
        texts = "".join(p for p in content if isinstance(p, str))
        return (audio_token if num_audio else "") + texts
    return "".join(audio_token if isinstance(p, AudioPart) else p for p in content)


def render(conversation: Any, add_generation_prompt: bool = True, audio_token: str = AUDIO_TOKEN) -> str:
    """The prompt string of one conversation (a list of message dicts, or the Messages `parse` returns)."""
    messages = conversation if _is_parsed(conversation) else parse(conversation)
    pieces = []
    if messages[0].role != "system":
        pieces.append(f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n")
    for message in messages:
        pieces.append(f"{IM_START}{message.role}\n{_render_content(message.content, audio_token)}{IM_END}\n")
    if add_generation_prompt:
        pieces.append(f"{IM_START}assistant\n")
    return "".join(pieces)


# An assistant turn of a rendered prompt: group 1 is what training learns, its content and closing <|im_end|>.
_ASSISTANT_TURN = re.compile(re.escape(f"{IM_START}assistant\n") + f"(.*?{re.escape(IM_END)})", re.DOTALL)


def assistant_spans(prompt: str) -> list[tuple[int, int]]:
    """The character spans [start, end) of a rendered prompt that hold an assistant turn's content and its
    closing <|im_end|>: the text an answer-only loss learns. A generation prompt's open turn has none."""
    return [match.span(1) for match in _ASSISTANT_TURN.finditer(prompt)]


def audio_parts(messages: list[Message]) -> list[AudioPart]:
    """The audio parts of a parsed conversation in reading order: the order of its `<sound>` placeholders."""
    return [
        p
        for message in messages
        if not isinstance(message.content, str)
        for p in message.content
        if isinstance(p, AudioPart)
    ]


def _is_parsed(conversation: Any) -> bool:
    return isinstance(conversation, list) and bool(conversation) and isinstance(conversation[0], Message)


def is_reference_template(template: str) -> bool:
    """Whether a checkpoint's Jinja template is AF3's, the one `render` implements (outer blanks aside)."""
    return template.strip() == REFERENCE_TEMPLATE


def split_batch(conversations: Any) -> tuple[list[Any], bool]:
    """(list of conversations, whether the input was a batch): one conversation is a list of message dicts,
    a batch is a list of such lists. Mirrors transformers' test on the first element."""
    if (
        isinstance(conversations, list | tuple)
        and conversations
        and isinstance(conversations[0], list | tuple)
    ):
        return list(conversations), True
    return [conversations], False
