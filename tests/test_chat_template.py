"""The Python chat template against the checkpoint's Jinja template, rendered by transformers' processor."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minaf3.chat_template import (
    AUDIO_TOKEN,
    REFERENCE_TEMPLATE,
    ROLES,
    AudioPart,
    Message,
    audio_parts,
    is_reference_template,
    parse,
    render,
    split_batch,
)
from minaf3.errors import InputError

AUDIO = {"type": "audio", "path": "clip.wav"}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


# Conversations the reference renders: each shape the issue lists, plus the template's corner cases.
CASES = {
    "single": [{"role": "user", "content": [AUDIO, text("What is in this audio?")]}],
    "text_before_audio": [{"role": "user", "content": [text("Transcribe the input speech."), AUDIO]}],
    "audio_between_texts": [{"role": "user", "content": [text("Before "), AUDIO, text("after")]}],
    "audio_only": [{"role": "user", "content": [AUDIO]}],
    "text_only": [{"role": "user", "content": "Hello there"}],
    "system": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": [AUDIO, text("Describe it.")]},
    ],
    "multi_turn": [
        {"role": "user", "content": [AUDIO, text("What instrument?")]},
        {"role": "assistant", "content": "A piano."},
        {"role": "user", "content": [text("Is it happy?")]},
    ],
    "audio_in_later_turn": [
        {"role": "user", "content": "Listen to the next clip."},
        {"role": "assistant", "content": [text("Ready.")]},
        {"role": "user", "content": [text("Here: "), {"type": "audio", "url": "https://x/a.wav"}]},
    ],
    "none_content": [{"role": "user", "content": None}, {"role": "assistant", "content": "ok"}],
    "empty_parts": [{"role": "user", "content": []}, {"role": "user", "content": [text("")]}],
    "late_system": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
    "unicode": [
        {"role": "user", "content": [text("héllo 🎵\n\t 日本語 "), {"type": "audio", "audio": [0.0]}]}
    ],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CASES))
def test_cases_match_reference(reference_processor, name, add_generation_prompt):
    conversation = CASES[name]
    expected = reference_processor.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert render(conversation, add_generation_prompt=add_generation_prompt) == expected


def test_reference_template_is_the_checkpoints(tiny_checkpoint, reference_processor):
    """The parity above is against the template file the checkpoint ships, not a copy."""
    assert reference_processor.chat_template == (tiny_checkpoint / "chat_template.jinja").read_text()


def test_single_audio_prompt_shape():
    assert render(CASES["single"]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<sound>What is in this audio?<|im_end|>\n<|im_start|>assistant\n"
    )


# --- hypothesis: any conversation with at most one audio part per message renders as the reference ------

_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "\n", "<sound>", "<|im_end|>", "{{ x }}", "{% if %}", "'\"", "日本", "🎵"]),
)
_text_part = _text.map(text)
_audio_part = st.sampled_from(
    [
        {"type": "audio", "path": "a.wav"},
        {"type": "audio", "url": "http://h/b.flac"},
        {"type": "audio", "audio": 0},
    ]
)


@st.composite
def _content(draw):
    if draw(st.booleans()):
        return draw(_text)
    parts = draw(st.lists(_text_part, max_size=4))
    if draw(st.booleans()):
        parts.insert(draw(st.integers(0, len(parts))), draw(_audio_part))
    return parts


_message = st.builds(
    lambda role, content: {"role": role, "content": content}, st.sampled_from(ROLES), _content()
)
_conversation = st.lists(_message, min_size=1, max_size=5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversation=_conversation, add_generation_prompt=st.booleans())
def test_hypothesis_matches_reference(reference_processor, conversation, add_generation_prompt):
    expected = reference_processor.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert render(conversation, add_generation_prompt=add_generation_prompt) == expected


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(_conversation, min_size=1, max_size=3))
def test_hypothesis_batch_matches_reference(reference_processor, batch):
    expected = reference_processor.apply_chat_template(batch, tokenize=False, add_generation_prompt=True)
    conversations, is_batch = split_batch(batch)
    assert is_batch and [render(c) for c in conversations] == expected


# --- several audios per conversation ------------------------------------------------------------------


def test_several_audios_in_one_message_stay_at_their_positions():
    clips = [{"type": "audio", "audio": np.full(4, i, np.float32)} for i in range(3)]
    conversation = [
        {"role": "user", "content": [text("First: "), clips[0], text(" second: "), clips[1], text(" same?")]},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": [text("And this? "), clips[2]]},
    ]
    messages = parse(conversation)
    assert render(messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nFirst: <sound> second: <sound> same?<|im_end|>\n"
        "<|im_start|>assistant\nYes.<|im_end|>\n"
        "<|im_start|>user\n<sound>And this? <|im_end|>\n<|im_start|>assistant\n"
    )
    parts = audio_parts(messages)
    assert [(p.message, p.part) for p in parts] == [(0, 1), (0, 3), (2, 1)]
    assert [int(p.source[0]) for p in parts] == [0, 1, 2]  # reading order = placeholder order


def _without_placeholders(content):
    if isinstance(content, str):
        return content.replace(AUDIO_TOKEN, "")
    return [text(p["text"].replace(AUDIO_TOKEN, "")) if p["type"] == "text" else p for p in content]


@given(conversation=st.lists(_message, min_size=1, max_size=5), extra_audio=st.integers(0, 3))
def test_placeholder_count_equals_audio_parts(conversation, extra_audio):
    """Every audio part gets exactly one placeholder (when the text itself holds none), however many."""
    conversation = [{**m, "content": _without_placeholders(m["content"])} for m in conversation]
    conversation.append({"role": "user", "content": [AUDIO, text("x")] * extra_audio})
    messages = parse(conversation)
    assert render(messages).count(AUDIO_TOKEN) == len(audio_parts(messages))


def test_parse_returns_messages():
    messages = parse(CASES["multi_turn"])
    assert [m.role for m in messages] == ["user", "assistant", "user"]
    assert isinstance(messages[0].content[0], AudioPart) and messages[1] == Message("assistant", "A piano.")


def test_split_batch():
    assert split_batch(CASES["single"]) == ([CASES["single"]], False)
    assert split_batch([CASES["single"], CASES["text_only"]]) == ([CASES["single"], CASES["text_only"]], True)


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conversation", "match"),
    [
        ([{"role": "tool", "content": "x"}], r"message 0: unknown role 'tool'"),
        ([{"role": "user", "content": "a"}, {"content": "b"}], r"message 1: unknown role None"),
        (
            [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}],
            r"message 0, part 0: unknown part type 'image'",
        ),
        ([{"role": "user", "content": [{"text": "no type"}]}], r"part 0: unknown part type None"),
        (
            [{"role": "user", "content": [text("a"), {"type": "audio"}]}],
            r"part 1: .*exactly one of .* found none",
        ),
        (
            [{"role": "user", "content": [{"type": "audio", "path": "a", "url": "b"}]}],
            r"found 'path' and 'url'",
        ),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], r"part 0: a text part needs a string"),
        ([{"role": "user", "content": ["bare string part"]}], r"part 0: a part must be a dict"),
        (
            [{"role": "user", "content": {"type": "text", "text": "a"}}],
            r"message 0: content must be a string or a list",
        ),
        ([{"role": "user"}], r"message 0: has no 'content'"),
        (["user: hi"], r"message 0: a message must be a dict"),
        ([], r"non-empty list"),
        ("just a string", r"non-empty list"),
    ],
)
def test_invalid_conversations(conversation, match):
    with pytest.raises(InputError, match=match):
        render(conversation)


def test_errors_name_the_conversation_of_a_batch():
    with pytest.raises(InputError, match=r"conversation 2, message 0: unknown role 'bot'"):
        parse([{"role": "bot", "content": "x"}], conversation_index=2)
    with pytest.raises(InputError, match=r"conversation 1 must be a non-empty list"):
        parse([], conversation_index=1)


def test_reference_template_constant_is_the_checkpoints(tiny_checkpoint):
    assert is_reference_template((tiny_checkpoint / "chat_template.jinja").read_text())
    assert not is_reference_template(REFERENCE_TEMPLATE.replace("helpful", "terse"))
