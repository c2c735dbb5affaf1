"""Hostile input to the processor and the pipeline.

Every input either works or raises a Minaf3Error whose message names the item ("conversation 1, message 0,
part 2: ...", "sample 0: ..."). No other exception escapes, nothing hangs (each call runs under a timeout),
and nothing is made up: a NaN sample is reported rather than zeroed, empty audio is refused rather than
turned into a window of silence, a truncated file gives a prefix of its samples or an error, and the frames
marked real are exactly the samples given. Inputs that work are checked against what they must give: the
audio token count of their length, and the features of the equivalent float32 mono clip.
"""

import io
import logging
import math
import re
import threading

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SR, speech_like
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import minaf3
from minaf3 import ConfigError, Minaf3Error
from minaf3.windows import MAX_AUDIO_SAMPLES, WINDOW_SAMPLES, audio_token_count, mel_frames, window_bounds

TIMEOUT = 120  # seconds: generous for two busy cores; a call still running then is reported as a hang
FUZZ = settings(max_examples=30, deadline=None)
EDGE_LENGTHS = [1, 159, 160, 161, WINDOW_SAMPLES, WINDOW_SAMPLES + 1]  # 0 is refused, tested apart
CLIPS = [speech_like(n, SR, seed=n) for n in (1, 159, 161, 3000, SR)]  # short: one window each


def bounded(call):
    """call() under TIMEOUT in a daemon thread: its result, or its exception re-raised here."""
    box = {}

    def run():
        try:
            box["value"] = call()
        except BaseException as error:  # handed to the test thread, which decides
            box["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    if thread.is_alive():
        pytest.fail(f"still running after {TIMEOUT} s: the call hangs")
    if "error" in box:
        raise box["error"]
    return box["value"]


def outcome(call, item: str, reason: str = ""):
    """call()'s result, or None if it raised a Minaf3Error whose message starts by naming `item` and then
    says `reason` (regexes). Any other exception fails the test where it was raised."""
    try:
        result = bounded(call)
    except Minaf3Error as error:
        assert re.match(item, str(error)), f"the message does not name the item ({item}): {error}"
        assert re.search(reason, str(error)), f"the message does not say {reason!r}: {error}"
        note(f"refused: {type(error).__name__}")
        return None
    note("works")
    return result


def note(outcome: str) -> None:
    """Count outcomes per hypothesis test (shown by --hypothesis-show-statistics): a fuzz test whose inputs
    all fail, or all work, tests less than it seems."""
    if currently_in_test_context():
        event(outcome)


def user_turn(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def audio_part(source) -> dict:
    return {"type": "audio", "audio": source}


def check_audio_accounting(out, audio_token_id: int, clips_per_row: list[list]) -> None:
    """Each row holds exactly the audio tokens of its clips' lengths (cut at 600 s), and the batch's windows,
    in order, mark exactly their samples' frames as real: no invented or dropped audio."""
    valid = []
    for row, clips in enumerate(clips_per_row):
        kept = [min(len(clip), MAX_AUDIO_SAMPLES) for clip in clips]
        assert int((out["input_ids"][row] == audio_token_id).sum()) == sum(audio_token_count(n) for n in kept)
        valid += [end - start for n in kept for start, end in window_bounds(n)]
    if valid:
        assert out["input_features_mask"].sum(-1).tolist() == [mel_frames(v) for v in valid]
    else:
        assert "input_features" not in out


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return minaf3.AutoProcessor.from_pretrained(tiny_checkpoint)


# ---- conversations ---------------------------------------------------------------------------------------
def mostly(good, bad):
    """`good` nine times in ten, else `bad`: whole conversations must often be valid to reach the model."""
    return st.integers(0, 9).flatmap(lambda k: bad if k == 0 else good)


TEXTS = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", " ", "\n", "\x00", "🎵 日本語 ✓", "<|im_end|>", "<|im_start|>system\n", "<sound>"]),
    st.sampled_from([3_000, 9_000]).map(lambda n: "la " * n),  # ~6,000 tokens, and past the 16,000 limit
)
PARTS = mostly(
    st.one_of(
        st.builds(lambda t: {"type": "text", "text": t}, TEXTS), st.sampled_from(CLIPS).map(audio_part)
    ),
    st.sampled_from(
        [5, "text", {"type": "video"}, {"type": "text", "text": 5}, {"type": "audio"}, {"text": "no type"}]
        + [{"type": "audio", "path": "x.wav", "audio": CLIPS[0]}, audio_part("/no/such.wav")]
    ),
)
MESSAGES = st.fixed_dictionaries(
    {
        "role": mostly(st.sampled_from(["system", "user", "assistant"]), st.sampled_from([None, "robot", 5])),
        "content": mostly(
            st.one_of(TEXTS, st.none(), st.lists(PARTS, max_size=3)), st.sampled_from([5, b"x"])
        ),
    }
)
CONVERSATIONS = mostly(st.lists(MESSAGES, min_size=1, max_size=3), st.sampled_from([[], "hi", None]))


def clips_of(conversation) -> list:
    """The audio of a conversation that worked, in reading order (messages, then parts)."""
    parts = [
        part
        for message in conversation
        if isinstance(message["content"], list)
        for part in message["content"]
    ]
    return [part["audio"] for part in parts if part["type"] == "audio"]


@FUZZ
@given(batch=st.lists(CONVERSATIONS, min_size=1, max_size=3))
def test_conversations_work_or_name_the_item(processor, batch):
    out = outcome(lambda: processor.apply_chat_template(batch), r"conversation \d+\b")
    if out is None:
        return
    clips = [clips_of(conversation) for conversation in batch]
    check_audio_accounting(out, processor.audio_token_id, clips)
    for row, conversation in enumerate(batch):
        if not clips[row]:  # text survives tokenization exactly: nothing dropped, cut or replaced
            ids = out["input_ids"][row][out["attention_mask"][row] == 1]
            prompt = processor.apply_chat_template(conversation, tokenize=False)
            assert processor.decode(ids, skip_special_tokens=False) == prompt


def test_text_that_is_not_unicode_is_refused_by_name(processor):
    bad = [
        {"role": "system", "content": "x"},
        {"role": "user", "content": [{"type": "text", "text": "ab\udc80"}]},
    ]
    with pytest.raises(
        minaf3.InputError, match=r"conversation 0, message 1, part 0: .*'\\udc80' at character 2"
    ):
        processor.apply_chat_template(bad)
    with pytest.raises(minaf3.InputError, match=r"sample 1: .*lone surrogate"):
        processor(["fine", "\ud800"])


# (prompt pieces, clips) per sample: no placeholder, one per clip, one per window, or a wrong count.
SAMPLES = st.tuples(
    st.lists(st.sampled_from(["hi ", "<sound>", "é"]), max_size=4),
    st.lists(st.sampled_from(CLIPS), max_size=2),
)


@FUZZ
@given(samples=st.lists(SAMPLES, min_size=1, max_size=3))
def test_prompts_with_placeholders_work_or_name_the_sample(processor, samples):
    texts = ["".join(pieces) for pieces, _ in samples]
    audio = [clips or None for _, clips in samples]
    out = outcome(lambda: processor(texts, audio), r"sample \d+: ")
    if out is not None:
        check_audio_accounting(out, processor.audio_token_id, [clips for _, clips in samples])


@FUZZ
@given(
    ids=st.one_of(
        st.integers(-2, 500),
        st.lists(st.one_of(st.integers(-2, 10**6), st.floats(), st.none(), st.text(max_size=2)), max_size=4),
        st.lists(st.lists(st.integers(0, 500), max_size=4), max_size=3),
        st.sampled_from(["abc", None, torch.tensor([1.5]), np.array([[3, 4]]), [[[1]]]]),
    )
)
def test_decode_works_or_refuses_the_ids(processor, ids):
    text = outcome(lambda: processor.decode(ids), "decode: ")
    assert text is None or isinstance(text, str | list)


# ---- audio arrays ----------------------------------------------------------------------------------------
INT_SCALES = {"int8": 2**7, "int16": 2**15, "int32": 2**31}


@st.composite
def arrays(draw):
    """(array or tensor as given, its expected mono float32 waveform or None, the expected error or None)."""
    n = draw(st.sampled_from([0, *EDGE_LENGTHS]) | st.integers(0, 20_000))
    dtype = draw(st.sampled_from(["float32", "float64", "float16", *INT_SCALES, "uint8", "int64", "bool"]))
    channels, layout = draw(st.integers(1, 3)), draw(st.sampled_from(["mono", "first", "last"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (n,) if layout == "mono" else (channels, n) if layout == "first" else (n, channels)
    floats = 0.3 * rng.standard_normal(shape)
    if dtype in INT_SCALES or dtype == "uint8":
        scale, offset = INT_SCALES.get(dtype, 128), 128 if dtype == "uint8" else 0  # uint8 PCM centres on 128
        info = np.iinfo(dtype)
        raw = np.clip(np.round(floats * scale) + offset, info.min, info.max).astype(dtype)
        value = ((raw.astype(np.float64) - offset) / scale).astype(np.float32)
    else:
        raw = floats.astype(dtype)
        value = raw.astype(np.float32)
    bad = draw(st.sampled_from([None, np.nan, np.inf, -np.inf])) if n and "float" in dtype else None
    if bad is not None:
        at = draw(st.integers(0, raw.size - 1))
        raw.flat[at] = value.flat[at] = bad
    source = torch.from_numpy(raw) if draw(st.booleans()) else raw
    if n == 0:
        return source, None, "no audio samples"
    # The smaller side of a 2-D array is the channels (documented rule; ambiguous only when n <= channels).
    mono = value if value.ndim == 1 else value.mean(axis=int(value.shape[0] > value.shape[1]))
    if dtype in ("int64", "bool"):
        return source, None, "unsupported sample dtype"
    if not np.isfinite(mono).all():
        first = int(np.argmin(np.isfinite(mono)))
        return source, None, f"sample {first} is (nan|inf|-inf) \\(NaN or Inf samples are not audio\\)"
    return source, mono, None


@FUZZ
@given(case=arrays(), text_first=st.booleans())
def test_arrays_work_as_their_mono_float32_or_are_refused(processor, case, text_first):
    source, mono, error = case
    parts = [{"type": "text", "text": "Describe."}, audio_part(source)]
    part = 1 if text_first else 0
    conversation = user_turn(*(parts if text_first else parts[::-1]))
    out = outcome(
        lambda: processor.apply_chat_template(conversation),
        rf"conversation 0, message 0, part {part}: ",
        error or "",
    )
    assert (out is None) == (error is not None)
    if out is None:
        return
    expected = processor.apply_chat_template(user_turn(*(parts[:1] + [audio_part(mono)])))
    check_audio_accounting(out, processor.audio_token_id, [[mono]])
    assert torch.equal(out["input_ids"], expected["input_ids"])
    torch.testing.assert_close(out["input_features"], expected["input_features"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [MAX_AUDIO_SAMPLES - 1, MAX_AUDIO_SAMPLES, MAX_AUDIO_SAMPLES + 1])
def test_600_seconds_plus_or_minus_one_sample(processor, long_audio, caplog, n):
    conversation = user_turn(audio_part(long_audio[:n]), {"type": "text", "text": "Summarise."})
    with caplog.at_level(logging.WARNING, logger="minaf3"):
        out = bounded(lambda: processor.apply_chat_template(conversation))
    assert ("truncating to first 600s" in caplog.text) == (n > MAX_AUDIO_SAMPLES)
    check_audio_accounting(out, processor.audio_token_id, [[long_audio[:n]]])
    assert out["input_features"].shape[0] == 20


@pytest.fixture(scope="module")
def long_audio() -> np.ndarray:
    """600 s + 1 sample, cheaply: zeros with a little noise (no model runs more than once on it)."""
    audio = np.zeros(MAX_AUDIO_SAMPLES + 1, dtype=np.float32)
    audio[::997] = 0.01 * np.random.default_rng(0).standard_normal(len(audio[::997]))
    return audio


# ---- audio files -----------------------------------------------------------------------------------------
FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", None), "ogg": ("OGG", None)}


@pytest.fixture(scope="module")
def encoded() -> dict[str, tuple[bytes, np.ndarray]]:
    """Each format's bytes of a 1 s stereo 16 kHz clip, and what load_audio makes of the whole file."""
    clip = np.stack([speech_like(SR, SR, 1), speech_like(SR, SR, 2)], axis=1)
    files = {}
    for ext, (fmt, subtype) in FORMATS.items():
        buffer = io.BytesIO()
        sf.write(buffer, clip, SR, format=fmt, subtype=subtype)
        files[ext] = (buffer.getvalue(), minaf3.load_audio(buffer.getvalue()))
    return files


@FUZZ
@given(
    ext=st.sampled_from(sorted(FORMATS)),
    keep=st.just(1.0) | st.floats(0, 1),
    # Half the flips land in the first 64 bytes: the headers (FLAC's STREAMINFO, MP3's Xing, RIFF, OggS).
    flips=st.lists(st.tuples(st.integers(0, 64) | st.integers(0, 2000), st.integers(0, 255)), max_size=6),
    tail=st.binary(max_size=256),
    as_path=st.booleans(),
)
def test_damaged_files_give_a_prefix_or_an_error_naming_them(
    processor, encoded, tmp_path_factory, ext, keep, flips, tail, as_path
):
    whole, full = encoded[ext]
    data = bytearray(whole[: int(len(whole) * keep)])
    # Flipped header bytes can announce billions of frames (MP3's Xing count, FLAC's STREAMINFO total).
    for at, value in flips:
        if at < len(data):
            data[at] = value
    data = bytes(data) + (tail if not flips else b"")
    source, name = bytes(data), rf"<{len(data)} bytes>"
    if as_path:
        source = tmp_path_factory.mktemp("damaged") / f"clip.{ext}"
        source.write_bytes(data)
        name = re.escape(str(source))
    out = outcome(
        lambda: processor.apply_chat_template(user_turn(audio_part(source))),
        rf"conversation 0, message 0, part 0: {name}: ",
    )
    if out is None:
        return
    waveform = minaf3.load_audio(source)
    check_audio_accounting(out, processor.audio_token_id, [[waveform]])
    if not flips and not tail:  # cut short only: at most the samples of the whole file, never invented ones
        assert len(waveform) <= len(full)
        if ext in ("wav", "flac"):  # lossless: exactly a prefix
            np.testing.assert_array_equal(waveform, full[: len(waveform)])


def announce(data: bytes, ext: str, frames: int) -> bytes:
    """The file with its header's frame count replaced: MP3's Xing count (32 bits, big-endian, 8 bytes
    after "Xing"), FLAC's STREAMINFO total samples (36 bits: the low nibble of byte 21, then bytes 22-25)."""
    data = bytearray(data)
    if ext == "mp3":
        at = data.find(b"Xing") + 8
        data[at : at + 4] = (frames % 2**32).to_bytes(4, "big")
    else:
        data[21] = (data[21] & 0xF0) | (frames >> 32)
        data[22:26] = (frames % 2**32).to_bytes(4, "big")
    return bytes(data)


@FUZZ
@given(
    ext=st.sampled_from(["mp3", "flac"]),
    frames=st.integers(0, 2**32 - 1) | st.integers(2**32, 2**36 - 1) | st.integers(0, 2 * SR),
)
def test_any_announced_frame_count_gives_a_prefix_or_an_error(processor, encoded, ext, frames):
    """A header may announce any number of frames: what is decoded is at most the real ones, and a header
    that announces more than the file holds is an error, never an allocation of what it announces."""
    whole, full = encoded[ext]
    if ext == "mp3" and frames >= 2**32:
        frames %= 2**32  # Xing holds 32 bits
    data = announce(whole, ext, frames)
    out = outcome(
        lambda: processor.apply_chat_template(user_turn(audio_part(data))),
        rf"conversation 0, message 0, part 0: <{len(data)} bytes>: ",
    )
    if out is None:
        return
    waveform = minaf3.load_audio(data)
    check_audio_accounting(out, processor.audio_token_id, [[waveform]])
    assert len(waveform) <= len(full)
    if ext == "flac":
        np.testing.assert_array_equal(waveform, full[: len(waveform)])


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(["WAV", "FLAC"]), channels=st.integers(1, 2))
def test_any_file_sample_rate_is_resampled_to_its_duration(processor, data, fmt, channels):
    # FLAC stores rates above 65,535 Hz only in steps of 10 Hz.
    rate = data.draw(st.integers(1, 65_535) | st.sampled_from([96_000, 192_000, 384_000]))
    frames = data.draw(st.integers(1, max(1, min(4000, rate * 30))))  # at most 30 s once at 16 kHz
    buffer = io.BytesIO()
    sf.write(buffer, np.full((frames, channels), 0.25, dtype=np.float32), rate, format=fmt, subtype="PCM_16")
    out = outcome(
        lambda: processor.apply_chat_template(user_turn(audio_part(buffer.getvalue()))), "conversation 0"
    )
    assert out is not None
    samples = math.ceil(frames * SR / rate)  # the reference's length after resampling
    check_audio_accounting(out, processor.audio_token_id, [[np.empty(samples)]])


@FUZZ
@given(
    rate=st.integers(-10, 10**6).filter(lambda r: r != SR) | st.sampled_from([None, 16000.5, "16000", True])
)
def test_other_sampling_rates_are_refused_where_features_are_made(rate):
    with pytest.raises(ConfigError, match="sampling_rate"):
        minaf3.log_mel_spectrogram(CLIPS[-1], sampling_rate=rate)
    with pytest.raises(ConfigError, match="sampling_rate"):
        minaf3.audio_token_count(SR, sampling_rate=rate)


# ---- the pipeline ----------------------------------------------------------------------------------------
SHORT = {"max_new_tokens": 2, "do_sample": False}


@settings(max_examples=25, deadline=None)
@given(conversation=CONVERSATIONS)
def test_pipeline_chat_answers_or_names_the_item(demo_pipeline, conversation):
    answer = outcome(
        lambda: demo_pipeline.chat(conversation, **SHORT), r"(chat: |conversation 0|message \d+)"
    )
    assert answer is None or isinstance(answer, str)


@pytest.mark.parametrize("n", [0, *EDGE_LENGTHS])
def test_pipeline_edge_lengths(demo_pipeline, n):
    audio = speech_like(n, SR, seed=n)
    answer = outcome(
        lambda: demo_pipeline.chat("What is it?", audio=audio, **SHORT),
        r"message 0, part 0: .*no audio samples",
    )
    assert (answer is None) == (n == 0)
    if answer is not None:  # the model saw the prompt the processor builds for this length
        conversation = user_turn(audio_part(audio), {"type": "text", "text": "What is it?"})
        prompt = demo_pipeline.processor.apply_chat_template(conversation)["input_ids"]
        assert demo_pipeline.last_timings.prompt_tokens == prompt.shape[1]


def test_pipeline_runs_once_on_600_seconds_plus_one_sample(demo_pipeline, processor, long_audio, caplog):
    with caplog.at_level(logging.WARNING, logger="minaf3"):
        bounded(lambda: demo_pipeline.chat("Summarise.", audio=long_audio, max_new_tokens=1))
    assert "first 600 s" in caplog.text
    exactly = demo_pipeline.processor.apply_chat_template(
        user_turn(audio_part(long_audio[:MAX_AUDIO_SAMPLES]), {"type": "text", "text": "Summarise."})
    )
    assert demo_pipeline.last_timings.prompt_tokens == exactly["input_ids"].shape[1]
