"""minaf3/serve/rows.py on its own: a row's text as tokens arrive (stop strings, split characters) and the
fan-out of a batch's steps, with a byte-level decoder standing in for the tokenizer."""

import pytest
import torch

from minaf3.serve.rows import FanOut, RowSink, RowsSettled

EOS = 0


def byte_decoder(ids: list[int]) -> str:
    """Token i is byte i (EOS aside): a character's bytes may come in several tokens, as in byte-level BPE."""
    return bytes(t for t in ids if t != EOS).decode("utf-8", errors="replace")


def row(text_tokens: str | bytes = b"", max_tokens: int = 100, **kwargs) -> tuple[RowSink, list]:
    events = []
    sink = RowSink(
        byte_decoder, {EOS}, max_tokens, emit=lambda kind, value: events.append((kind, value)), **kwargs
    )
    for token in text_tokens.encode() if isinstance(text_tokens, str) else text_tokens:
        if sink.open:
            sink.push(token)
    return sink, events


def deltas(events) -> str:
    return "".join(value for kind, value in events if kind == "delta")


def test_stop_string_across_tokens_is_cut_and_never_streamed():
    sink, events = row("Hello world!", stop=("o w",), stream=True)
    assert (sink.text, sink.finish_reason) == ("Hell", "stop")
    assert deltas(events) == "Hell"  # the "o" that began the stop string was held back, then dropped
    assert events[-1] == ("done", sink) and len(sink.tokens) == len("Hello w")


def test_held_back_text_that_is_not_a_stop_string_is_sent():
    sink, events = row("Hello!", stop=("lox",), stream=True)
    sink.finish("length")
    assert deltas(events) == sink.text == "Hello!"
    assert [v for k, v in events if k == "delta"][:3] == [
        "H",
        "e",
        "l",
    ]  # "l", "lo" waited for their next byte


def test_a_character_split_across_tokens_is_emitted_whole():
    sink, events = row("é€".encode(), stream=True)
    assert [v for k, v in events if k == "delta"] == ["é", "€"]  # never a U+FFFD in between
    sink.push(EOS)
    assert (sink.text, sink.finish_reason) == ("é€", "stop") and len(sink.tokens) == 6


def test_a_row_cut_mid_character_ends_as_the_full_decode_shows():
    streamed, events = row(b"a" + "é".encode()[:1], max_tokens=2, stream=True)
    plain, _ = row(b"a" + "é".encode()[:1], max_tokens=2)
    assert streamed.finish_reason == plain.finish_reason == "length"
    assert streamed.text == plain.text == deltas(events) == "a\ufffd"


@pytest.mark.parametrize("stream", [False, True])
def test_rows_end_at_their_own_max_tokens(stream):
    sink, events = row("abcdef", max_tokens=3, stream=stream)
    assert (sink.text, sink.finish_reason, len(sink.tokens)) == ("abc", "length", 3)
    assert deltas(events) == ("abc" if stream else "")


def test_fan_out_stops_the_batch_once_no_row_is_open():
    first, _ = row(max_tokens=5)
    second, _ = row(max_tokens=5)
    fan = FanOut([first, second])
    fan.put(torch.tensor([[1, 2], [3, 4]]))  # the prompt: ignored
    fan.put(torch.tensor([ord("a"), ord("b")]))
    second.cancel()
    fan.put(torch.tensor([ord("c"), ord("d")]))  # goes to the first row only
    with pytest.raises(RowsSettled):
        fan.put(torch.tensor([EOS, EOS]))
    assert (first.text, first.finish_reason, second.finish_reason) == ("ac", "stop", None)
    assert fan.steps == 3


def test_fan_out_end_closes_what_is_open():
    first, _ = row(max_tokens=5)
    fan = FanOut([first])
    fan.put(torch.tensor([[1]]))
    fan.put(torch.tensor([ord("z")]))
    fan.end()
    assert (first.text, first.finish_reason) == ("z", "length")
