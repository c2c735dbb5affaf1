"""conversation.py: the user turn chat() builds, the think request, audio loaded and held to 600 s.

chat() itself (these pieces joined to the processor and generate) is tested in test_pipeline.py.
"""

import logging

import numpy as np
import pytest
import soundfile as sf

from minaf3.conversation import THINK_SUFFIX, add_think_request, build_conversation, load_conversation_audio
from minaf3.errors import AudioError, AudioFileError, InputError
from minaf3.windows import MAX_AUDIO_SAMPLES, SAMPLING_RATE


def test_a_question_becomes_one_user_turn_with_the_audio_first():
    a, b = np.zeros(10, np.float32), np.ones(10, np.float32)
    for audio, clips in ((None, []), (a, [a]), ([a, b], [a, b]), ((a,), [a])):
        (turn,) = build_conversation("What is it?", audio)
        assert turn["role"] == "user"
        assert [part.get("audio") for part in turn["content"][:-1]] == clips
        assert turn["content"][-1] == {"type": "text", "text": "What is it?"}


@pytest.mark.parametrize(
    "messages, audio, message",
    [
        ([], None, "expected a question \\(str\\) or a non-empty list of messages, got \\[\\]"),
        (42, None, "expected a question \\(str\\) or a non-empty list of messages, got 42"),
        ([{"role": "user", "content": "Hi"}], "a.wav", "put the audio inside them"),
    ],
)
def test_build_conversation_errors(messages, audio, message):
    with pytest.raises(InputError, match=message):
        build_conversation(messages, audio)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("Why?", f"Why? {THINK_SUFFIX}"),
        ([{"type": "text", "text": "Why?"}], [{"type": "text", "text": f"Why? {THINK_SUFFIX}"}]),
        (
            [{"type": "audio", "path": "a.wav"}],
            [{"type": "audio", "path": "a.wav"}, {"type": "text", "text": THINK_SUFFIX}],
        ),
    ],
)
def test_add_think_request_edits_only_the_last_user_turn(content, expected):
    messages = [
        {"role": "user", "content": "First."},
        {"role": "assistant", "content": "Ok."},
        {"role": "user", "content": content},
    ]
    original = [dict(m) for m in messages]
    conversation = build_conversation(messages)
    add_think_request(conversation)
    assert conversation[-1]["content"] == expected
    assert conversation[0]["content"] == "First."
    assert messages == original  # the caller's messages are not modified


def test_think_request_needs_a_user_turn():
    with pytest.raises(InputError, match="think=True needs a user message"):
        add_think_request([{"role": "system", "content": "Be brief."}])


def test_audio_parts_are_loaded_at_16_khz_and_the_rest_is_kept(tmp_path):
    path = tmp_path / "tone.wav"
    tone = 0.1 * np.sin(np.arange(8000) / 8).astype(np.float32)
    sf.write(path, tone, 8000)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "audio", "path": str(path)}, {"type": "text", "text": "Hm?"}]},
        {"role": "user", "content": [{"type": "audio", "audio": tone}, {"type": "audio"}]},
    ]
    loaded = load_conversation_audio(conversation, refuse_long_audio=False)
    assert loaded[0] == conversation[0] and loaded[1]["content"][1] == conversation[1]["content"][1]
    assert loaded[1]["content"][0]["audio"].shape == (SAMPLING_RATE,)  # 1 s, resampled from 8 kHz
    np.testing.assert_array_equal(loaded[2]["content"][0]["audio"], tone)  # arrays are taken as 16 kHz
    assert loaded[2]["content"][1] == {"type": "audio"}  # malformed: left for the processor to name
    assert conversation[1]["content"][0] == {"type": "audio", "path": str(path)}  # the caller's is untouched


def test_long_audio_is_cut_with_a_warning_or_refused(caplog):
    audio = np.zeros(MAX_AUDIO_SAMPLES + SAMPLING_RATE // 2, np.float32)
    conversation = build_conversation("Summarise.", [np.zeros(5, np.float32), audio])
    with caplog.at_level(logging.WARNING, logger="minaf3"):
        loaded = load_conversation_audio(conversation, refuse_long_audio=False)
    assert len(loaded[0]["content"][1]["audio"]) == MAX_AUDIO_SAMPLES
    assert "message 0, part 1: audio is 600.5 s long; chat uses its first 600 s" in caplog.text
    with pytest.raises(InputError, match="message 0, part 1: audio is 600.5 s long; AF3 reads at most 600 s"):
        load_conversation_audio(conversation, refuse_long_audio=True)


def test_unreadable_audio_is_named_by_its_place(tmp_path):
    missing = build_conversation("Hm?", str(tmp_path / "missing.wav"))
    with pytest.raises(AudioFileError, match="^message 0, part 0: .*missing.wav"):
        load_conversation_audio(missing, refuse_long_audio=False)
    silent = build_conversation("Hm?", [np.zeros(3, np.float32), np.array([np.nan], np.float32)])
    with pytest.raises(AudioError, match="^message 0, part 1: "):
        load_conversation_audio(silent, refuse_long_audio=False)
