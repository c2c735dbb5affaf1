"""TextIteratorStreamer (streamer.py) fed by hand: text pieces, partial characters, errors, the prompt.

Its use with generate (pieces joining to the decoded output, errors from inside generate) is in
test_generate.py.
"""

import queue

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minaf3.errors import ConfigError, GenerationError
from minaf3.streamer import TextIteratorStreamer


def feed(streamer: TextIteratorStreamer, prompt: list[int], tokens: list[int]) -> list[str]:
    """What a consumer reads after generate puts `prompt` (1, T), then each token (1,), then ends."""
    streamer.put(torch.tensor([prompt]))
    for token in tokens:
        streamer.put(torch.tensor([token]))
    streamer.end()
    return list(streamer)


def test_holds_back_partial_characters(reference_processor):
    tokenizer = reference_processor.tokenizer
    text = "héllo wörld: 日本語 ✓ 🎵"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = feed(TextIteratorStreamer(tokenizer.decode), ids[:1], ids[1:])
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert len(pieces) < len(ids)  # multi-byte characters arrived in several tokens


@settings(max_examples=25, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40))
def test_pieces_join_to_the_decoded_text_of_what_was_put(reference_processor, text):
    tokenizer = reference_processor.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = tokenizer.encode("Say it:", add_special_tokens=False)
    pieces = feed(TextIteratorStreamer(tokenizer, skip_prompt=True), prompt, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_without_skip_prompt_the_prompt_is_emitted_too():
    pieces = feed(TextIteratorStreamer(lambda ids: "".join(chr(97 + i) for i in ids)), [0, 1], [2, 3])
    assert "".join(pieces) == "abcd" and pieces[0] == "ab"


def test_a_newline_restarts_the_decoded_window():
    calls = []

    def decode(ids):
        calls.append(list(ids))
        return "".join("\n" if i == 0 else chr(96 + i) for i in ids)

    pieces = feed(TextIteratorStreamer(decode, skip_prompt=True), [5], [1, 0, 2, 3])
    assert "".join(pieces) == "a\nbc"
    assert calls[-1] == [2, 3]  # after the newline only the tokens since it are decoded again


def test_can_stream_again_after_end():
    streamer = TextIteratorStreamer(lambda ids: "x" * len(ids), skip_prompt=True)
    assert feed(streamer, [1, 2], [3]) == ["x"]
    assert feed(streamer, [1, 2, 3], [4, 5]) == ["x", "x"]  # the next prompt is skipped again


def test_a_batch_is_refused():
    streamer = TextIteratorStreamer(lambda ids: "")
    with pytest.raises(GenerationError, match="streams one sequence; got a batch of 2"):
        streamer.put(torch.zeros(2, 3, dtype=torch.long))


def test_a_failure_reaches_the_consumer():
    streamer = TextIteratorStreamer(lambda ids: "")
    streamer.fail(GenerationError("logits hold NaN"))
    with pytest.raises(GenerationError, match="logits hold NaN"):
        next(streamer)


def test_timeout_raises_queue_empty_when_nothing_comes():
    with pytest.raises(queue.Empty):
        next(TextIteratorStreamer(lambda ids: "", timeout=0.01))


def test_refuses_a_decoder_it_cannot_call():
    with pytest.raises(ConfigError, match="decoder must be callable or have a decode method, got int"):
        TextIteratorStreamer(42)
