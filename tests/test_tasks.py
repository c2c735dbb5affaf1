"""The synthetic tasks meet their contract, measured from the waveforms themselves.

Each check listens the way a test outside the package would: an RMS envelope thresholded into bursts, FFT
peaks for frequencies, a level fit for loudness, an on/off decoder for Morse. The generator's own numbers
(`Example.facts`) are never used to pass a check; the answer text is what the measurement must agree with.
"""

import json
import re

import numpy as np
import pytest
import soundfile as sf
from conftest import build_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from minaf3 import tasks
from minaf3.errors import ConfigError
from minaf3.processor import AudioFlamingo3Processor, strip_transcription_prefix
from minaf3.tasks import Example, example_at, example_rng, examples, make_example, score_answer

SR = 16000
SEEDS = st.integers(0, 2**32 - 1)
PROPERTY = settings(max_examples=12, deadline=None)
ENVELOPE_SECONDS = 0.01  # RMS window of the burst detector
FLICKER = 0.01  # s: runs and gaps shorter than this are threshold noise
EDGE = 0.015  # s: how far a measured edge may sit from the true one (envelope window + fade)

# The contract, typed out independently of the module.
PHRASINGS = {
    "count": {"How many beeps are there?", "Count the beeps.", "How many times does the tone sound?"},
    "pitch": {"Is the tone high or low?", "Is this a high or a low pitch?", "High or low tone?"},
    "kind": {"What kind of sound is this?", "What do you hear?", "Describe the sound."},
    "duration": {
        "How long is the sound?",
        "How many seconds does the sound last?",
        "What is the duration of the sound?",
    },
    "loudness": {
        "Does the sound get louder or quieter?",
        "Is the sound getting louder or quieter?",
        "Louder or quieter over time?",
    },
    "morse": {"Transcribe the input speech."},
    "order": {
        "Is the second beep higher or lower than the first?",
        "Is the second beep higher or lower?",
        "Second beep: higher or lower?",
    },
}
ANSWERS = {
    "count": {"1 beep"} | {f"{n} beeps" for n in range(2, 7)},
    "pitch": {"high", "low"},
    "kind": {"a pure tone", "white noise", "a rising chirp", "a falling chirp", "a click train", "silence"},
    "duration": {"1 second"} | {f"{n} seconds" for n in range(2, 9)},
    "loudness": {"louder", "quieter"},
    "order": {"higher", "lower"},
}
MORSE_ANSWER = re.compile(r'The spoken content of the audio is "([A-Z]{1,3})"\.')
MORSE = dict(zip("ABCDEFGHIJKLMNOPQRSTUVWXYZ", (
    ".- -... -.-. -.. . ..-. --. .... .. .--- -.- .-.. -- -. --- "
    ".--. --.- .-. ... - ..- ...- .-- -..- -.-- --.."
).split(), strict=True))  # fmt: skip


# --- measuring a waveform -----------------------------------------------------------------------------------


def envelope(x: np.ndarray, seconds: float = ENVELOPE_SECONDS) -> np.ndarray:
    """Moving RMS over `seconds`, same length as x."""
    n = int(seconds * SR)
    return np.sqrt(np.convolve(x.astype(np.float64) ** 2, np.ones(n) / n, mode="same"))


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) sample indices of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def bursts(x: np.ndarray, fraction: float = 0.3, seconds: float = ENVELOPE_SECONDS) -> list[tuple[int, int]]:
    """The stretches where the envelope exceeds `fraction` of its maximum. Flicker where the envelope crosses
    the threshold (runs or gaps under FLICKER) is smoothed over: no real burst or gap is under 60 ms."""
    env = envelope(x, seconds)
    merged: list[tuple[int, int]] = []
    for start, stop in runs(env > fraction * env.max()):
        if merged and start - merged[-1][1] < FLICKER * SR:
            merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    return [(start, stop) for start, stop in merged if stop - start >= FLICKER * SR]


def dominant_hz(x: np.ndarray) -> float:
    """The frequency of the largest FFT peak (Hann window, zero-padded to 1 Hz bins)."""
    n = max(len(x), SR)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=n))
    return float(np.fft.rfftfreq(n, 1 / SR)[np.argmax(spectrum)])


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def seconds(run: tuple[int, int]) -> float:
    return (run[1] - run[0]) / SR


def within(value: float, bounds: tuple[float, float], tolerance: float) -> bool:
    return bounds[0] - tolerance <= value <= bounds[1] + tolerance


# --- one check per family: the waveform agrees with the answer and the contract ----------------------------


def check_count(ex: Example) -> None:
    found = bursts(ex.waveform)
    assert ex.answer == ("1 beep" if len(found) == 1 else f"{len(found)} beeps")
    assert all(within(seconds(b), (0.08, 0.3), EDGE) for b in found)
    assert all(within((b[0] - a[1]) / SR, (0.1, 0.6), EDGE) for a, b in zip(found, found[1:], strict=False))
    pitches = [dominant_hz(ex.waveform[a:b]) for a, b in found]
    assert all(within(hz, (300, 3000), 15) for hz in pitches)
    assert max(pitches) / min(pitches) < 1.03  # one frequency per clip


def check_pitch(ex: Example) -> None:
    (burst,) = bursts(ex.waveform)
    assert within(seconds(burst), (0.5, 3.0), EDGE)
    hz = dominant_hz(ex.waveform)
    assert within(hz, (1500, 4000), 5) if ex.answer == "high" else within(hz, (150, 400), 2)


def frame_pitches(x: np.ndarray, frame: float = 0.05) -> list[float]:
    n = int(frame * SR)
    return [dominant_hz(x[i : i + n]) for i in range(0, len(x) - n + 1, n)]


def check_kind(ex: Example) -> None:
    x = ex.waveform
    if ex.answer == "silence":
        env = envelope(x, 0.05)[SR // 20 : -SR // 20]
        assert 0.001 - 1e-6 <= np.max(np.abs(x)) <= 0.005 + 1e-6 and env.max() < 2 * np.median(env)
        return
    if ex.answer == "a click train":
        clicks = runs(np.abs(x) > 0.5 * np.max(np.abs(x)))
        assert all(14 <= b - a <= 18 for a, b in clicks)  # 1 ms = 16 samples
        period = np.diff([a for a, _ in clicks])
        assert np.ptp(period) <= 2 and within(SR / np.median(period), (5, 30), 0.1)  # steady, 5-30 per s
        # the train lasts 1-4 s, which may end up to a period after its last click
        span = (clicks[-1][1] - clicks[0][0]) / SR
        assert within(span, (1 - np.max(period) / SR, 4), 0.01)
        return
    (burst,) = bursts(x, fraction=0.2)
    assert within(seconds(burst), (1, 4), EDGE)
    sound = x[burst[0] + SR // 50 : burst[1] - SR // 50]  # inside the fades
    frames = sound[: len(sound) // 512 * 512].reshape(-1, 512)
    power = np.mean(np.abs(np.fft.rfft(frames, axis=1)) ** 2, axis=0)[1:]  # averaged over 32 ms frames
    flatness = np.exp(np.mean(np.log(power))) / np.mean(power)
    if ex.answer == "white noise":
        assert flatness > 0.8
    elif ex.answer == "a pure tone":
        hz = dominant_hz(sound)
        spectrum = np.abs(np.fft.rfft(sound)) ** 2
        near = np.abs(np.fft.rfftfreq(len(sound), 1 / SR) - hz) < 0.03 * hz
        assert within(hz, (200, 3000), 5) and spectrum[near].sum() > 0.95 * spectrum.sum()
    else:
        pitches = frame_pitches(sound)
        rising = ex.answer == "a rising chirp"
        assert ex.answer in ("a rising chirp", "a falling chirp") and flatness < 0.5
        assert all(within(hz, (200, 6000), 30) for hz in pitches)
        steps = np.diff(pitches) * (1 if rising else -1)
        assert np.all(steps > -40)  # monotone, up to the 20 Hz bins of a 50 ms frame
        assert (pitches[-1] / pitches[0]) ** (1 if rising else -1) > 3.5  # two octaves, less the trimmed ends


def check_duration(ex: Example) -> None:
    found = bursts(ex.waveform, fraction=0.2)
    start, stop = found[0][0], found[-1][1]  # a noise burst's envelope may dip, so first start to last stop
    whole = int(ex.answer.split()[0])
    assert abs((stop - start) / SR - whole) <= 0.2 + EDGE
    assert within(start / SR, (0.3, 1.5), EDGE) and within((len(ex.waveform) - stop) / SR, (0.3, 1.5), EDGE)


def check_loudness(ex: Example) -> None:
    x = ex.waveform
    floor = rms(x[: int(0.04 * SR)])  # the start offset is >= 50 ms of background noise
    env = envelope(x, 0.05)
    on = np.flatnonzero(env > 2 * floor)
    t = np.arange(on[0], on[-1]) / SR
    level = 20 * np.log10(env[on[0] : on[-1]] + 1e-12)
    slope = np.polyfit(t, level, 1)[0]  # dB per second
    assert (slope > 0) == (ex.answer == "louder")
    assert abs(slope) * (t[-1] - t[0]) > 8  # a steady change of 12-30 dB, less what sinks into the noise
    assert within(t[-1] - t[0], (0.85 * 2, 5), 0.1)  # 2-5 s, of which the quietest end may sink in the noise


def decode_morse(x: np.ndarray) -> tuple[str, list[float], list[float]]:
    """Letters from the on/off pattern; elements shorter than 130 ms are dots or gaps inside a letter (60-80
    ms at 15-20 wpm), longer ones dashes or gaps between letters (180-240 ms)."""
    found = bursts(x)
    letters, symbols = [], ""
    for i, burst in enumerate(found):
        if i and (burst[0] - found[i - 1][1]) / SR > 0.13:
            letters.append(symbols)
            symbols = ""
        symbols += "." if seconds(burst) < 0.13 else "-"
    letters.append(symbols)
    decode = {code: letter for letter, code in MORSE.items()}
    ons = [seconds(b) for b in found]
    offs = [(b[0] - a[1]) / SR for a, b in zip(found, found[1:], strict=False)]
    return "".join(decode[s] for s in letters), ons, offs


def check_morse(ex: Example) -> None:
    letters, ons, offs = decode_morse(ex.waveform)
    assert ex.answer == f'The spoken content of the audio is "{letters}".'
    assert MORSE_ANSWER.fullmatch(ex.answer) and strip_transcription_prefix(ex.answer) == letters
    units = [(1, 1.2 / 20, 1.2 / 15), (3, 3 * 1.2 / 20, 3 * 1.2 / 15)]  # dot or dash at 15-20 wpm
    assert all(any(within(s, (lo, hi), EDGE) for _, lo, hi in units) for s in ons + offs)
    assert within(dominant_hz(ex.waveform), (600, 800), 3)


def check_order(ex: Example) -> None:
    first, second = bursts(ex.waveform)
    assert all(within(seconds(b), (0.15, 0.4), EDGE) for b in (first, second))
    a, b = (dominant_hz(ex.waveform[start:stop]) for start, stop in (first, second))
    assert ex.answer == ("higher" if b > a else "lower")
    assert max(a, b) / min(a, b) > 2 ** (4 / 12) * 0.98 and all(within(hz, (300, 3000), 15) for hz in (a, b))


CHECKS = {
    "count": check_count, "pitch": check_pitch, "kind": check_kind, "duration": check_duration,
    "loudness": check_loudness, "morse": check_morse, "order": check_order,
}  # fmt: skip


# --- the contract, per family and for every clip ------------------------------------------------------------


@pytest.mark.parametrize("task", tasks.ALL_TASKS)
@PROPERTY
@given(seed=SEEDS)
def test_clip_meets_its_family_contract(task, seed):
    ex = example_at(task, seed, 0)
    assert ex.task == task and ex.question in PHRASINGS[task]
    CHECKS[task](ex)


def test_every_kind_appears_and_passes():
    clips = list(examples("kind", seed=0, n=24))
    assert {ex.answer for ex in clips} == ANSWERS["kind"]
    for ex in clips:
        check_kind(ex)


@pytest.mark.parametrize("task", tasks.ALL_TASKS)
@PROPERTY
@given(seed=SEEDS)
def test_every_clip_is_16k_mono_float32_with_a_peak_an_offset_and_a_bounded_length(task, seed):
    ex = example_at(task, seed, 1)
    x = ex.waveform
    assert x.dtype == np.float32 and x.ndim == 1 and np.all(np.isfinite(x))
    assert len(x) <= 11.25 * SR  # the longest: 1.5 s + 8.2 s + 1.5 s, well under the 30 s window
    peak = float(np.max(np.abs(x)))
    silence = ex.answer == "silence"
    assert within(peak, (0.001, 0.005) if silence else (0.05, 0.9), 1e-6)
    if not silence:  # the first 40 ms are background noise only: the sound starts later
        assert np.max(np.abs(x[: int(0.04 * SR)])) < 0.3 * peak


@pytest.mark.parametrize("task", ["count", "pitch", "duration", "morse", "order"])
@PROPERTY
@given(seed=SEEDS)
def test_background_noise_sits_25_to_40_db_below_the_sound(task, seed):
    """Measured in the start offset (a gap) against the RMS of the steady-level sound."""
    x = example_at(task, seed, 2).waveform
    found = bursts(x)
    noise = rms(x[: found[0][0] - int(EDGE * SR)])
    sound = rms(np.concatenate([x[a:b] for a, b in found]))
    assert within(20 * np.log10(sound / noise), (25, 40), 1.0)


def test_start_offsets_vary():
    onsets = {bursts(example_at("pitch", 0, i).waveform)[0][0] for i in range(8)}
    assert len(onsets) == 8


# --- seeds, determinism, phrasings, answers ----------------------------------------------------------------


@pytest.mark.parametrize("task", tasks.ALL_TASKS)
def test_same_seed_same_bytes_and_different_seeds_differ(task):
    a, b, c = example_at(task, 7, 3), example_at(task, 7, 3), example_at(task, 8, 3)
    assert a.waveform.tobytes() == b.waveform.tobytes() and (a.question, a.answer) == (b.question, b.answer)
    assert a.waveform.tobytes() != c.waveform.tobytes()
    assert example_at(task, 7, 4).waveform.tobytes() != a.waveform.tobytes()


def test_examples_are_clips_reproducible_on_their_own():
    batch = list(examples(tasks.TASKS, seed=5, n=8, start=2))
    assert [ex.task for ex in batch] == [tasks.TASKS[i % 6] for i in range(2, 10)]
    for i, ex in zip(range(2, 10), batch, strict=True):
        alone = example_at(ex.task, 5, i)
        assert alone.waveform.tobytes() == ex.waveform.tobytes() and alone.question == ex.question


def test_train_and_eval_seeds_are_disjoint():
    assert tasks.split_of(0) == tasks.split_of(999) == "eval" and tasks.split_of(1000) == "train"
    assert tasks.FIRST_TRAIN_SEED == 1000 and tasks.FIRST_TRAIN_SEED not in tasks.EVAL_SEEDS
    train = {example_at("count", seed, 0).waveform.tobytes() for seed in range(1000, 1004)}
    assert not train & {example_at("count", seed, 0).waveform.tobytes() for seed in range(4)}


@pytest.mark.parametrize("task", tasks.ALL_TASKS)
def test_each_phrasing_is_asked_and_the_waveform_does_not_depend_on_it(task):
    count = len(PHRASINGS[task])
    asked = {make_example(task, example_rng(task, 0, 0), phrasing=k).question for k in range(count)}
    assert asked == PHRASINGS[task]
    assert {ex.question for ex in examples(task, seed=1, n=24)} == PHRASINGS[task]
    chosen = make_example(task, example_rng(task, 0, 0), phrasing=0).waveform
    assert chosen.tobytes() == make_example(task, example_rng(task, 0, 0)).waveform.tobytes()


@pytest.mark.parametrize("task", sorted(ANSWERS))
def test_answers_take_exactly_the_listed_forms(task):
    seen = {ex.answer for ex in examples(task, seed=2, n=48)}
    assert seen == ANSWERS[task]


def test_families_and_the_held_out_one():
    assert tasks.TASKS == ("count", "pitch", "kind", "duration", "loudness", "morse")
    assert tasks.HELD_OUT == "order" and tasks.HELD_OUT not in tasks.TASKS


def test_morse_table_is_the_international_code():
    assert tasks.MORSE_CODE == MORSE


# --- conversations, the dataset file, scoring --------------------------------------------------------------


def test_conversations_are_what_the_processor_takes():
    processor = AudioFlamingo3Processor(build_tokenizer(), pad_token="<|endoftext|>", eos_token="<|im_end|>")
    morse = example_at("morse", 0, 0)
    messages, answer = tasks.conversation(morse)
    assert answer == morse.answer
    assert [processor.apply_chat_template(messages, tokenize=False)] == processor.apply_transcription_request(
        morse.waveform, tokenize=False
    )
    messages, answer = tasks.conversation(example_at("count", 0, 0))
    assert messages[0]["content"][0]["text"] in PHRASINGS["count"] and answer in ANSWERS["count"]
    inputs = processor.apply_chat_template(messages)
    assert (inputs["input_ids"] == processor.audio_token_id).any() and len(inputs["input_features"]) == 1


def test_write_dataset_round_trips(tmp_path):
    clips = [example_at(task, 0, 0) for task in tasks.ALL_TASKS]
    path = tasks.write_dataset(tmp_path / "set", clips)
    records = json.loads(path.read_text())
    assert len(records) == len(clips) and len({r["id"] for r in records}) == len(clips)
    for record, ex in zip(records, clips, strict=True):
        assert set(record) == {"id", "sound", "conversations", "task"} and record["task"] == ex.task
        human, gpt = record["conversations"]
        assert human == {"from": "human", "value": "<sound>\n" + ex.question}
        assert gpt == {"from": "gpt", "value": ex.answer}
        audio, rate = sf.read(path.parent / record["sound"], dtype="float32")
        assert rate == SR and audio.shape == ex.waveform.shape
        assert np.max(np.abs(audio - ex.waveform)) <= 1.5 / 32768  # PCM_16


def test_score_answer():
    assert score_answer("count", "3 beeps", "3 beeps") == {"exact": 1.0}
    assert score_answer("count", "  3  Beeps ", "3 beeps") == {"exact": 1.0}
    assert score_answer("count", "3 beep", "3 beeps") == {"exact": 0.0}
    truth = 'The spoken content of the audio is "SOS".'
    assert score_answer("morse", truth, truth) == {"exact": 1.0, "letters": 1.0}
    assert score_answer("morse", 'The spoken content of the audio is "SOX".', truth)["letters"] == 2 / 3
    assert score_answer("morse", "SOS", truth) == {"exact": 0.0, "letters": 1.0}
    assert score_answer("morse", '"SOSS".', truth)["letters"] == 3 / 4  # an extra letter counts as wrong
    assert score_answer("morse", "", truth)["letters"] == 0.0


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: make_example("whistle", np.random.default_rng(0)), "task"),
        (lambda: make_example("count", 0), "rng"),
        (lambda: make_example("count", np.random.default_rng(0), phrasing=3), "phrasing"),
        (lambda: make_example("morse", np.random.default_rng(0), phrasing=1), "phrasing"),
        (lambda: examples(tasks.TASKS, seed=0, n=-1), "n"),
        (lambda: examples(tasks.TASKS, seed=-1, n=1), "seed"),
        (lambda: examples([], seed=0, n=1), "tasks"),
        (lambda: examples(["count", "song"], seed=0, n=1), "tasks"),
        (lambda: example_at("count", 0, 1.5), "index"),
        (lambda: tasks.split_of(-3), "seed"),
        (lambda: score_answer("song", "a", "a"), "task"),
    ],
)
def test_bad_arguments_raise_config_errors_naming_them(call, argument):
    with pytest.raises(ConfigError, match=re.escape(argument)):
        call()


def test_write_dataset_refuses_what_is_not_an_example(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("items[1]")):
        tasks.write_dataset(tmp_path, [example_at("count", 0, 0), "clip.wav"])


@PROPERTY
@given(seed=SEEDS)
def test_labelled_spans_are_where_the_waveform_keys_each_letter(seed):
    """tasks.labelled_spans of a morse clip (what sound_heads.py trains on) against the on/off pattern: a
    letter runs from the start of its first burst to the end of its last, and the letters are those the
    answer names."""
    ex = example_at("morse", seed, 0)
    found = bursts(ex.waveform)
    groups = [[found[0]]]
    for before, burst in zip(found, found[1:], strict=False):
        if (burst[0] - before[1]) / SR > 0.13:  # a gap between letters (3 units), not inside one (1 unit)
            groups.append([])
        groups[-1].append(burst)
    spans = tasks.labelled_spans(ex)
    assert "".join(letter for letter, _, _ in spans) == strip_transcription_prefix(ex.answer)
    assert len(spans) == len(groups)
    for (_, start, end), group in zip(spans, groups, strict=True):
        assert abs(start - group[0][0] / SR) < EDGE and abs(end - group[-1][1] / SR) < EDGE


@PROPERTY
@given(seed=SEEDS)
def test_labelled_spans_are_where_the_waveform_beeps(seed):
    """tasks.labelled_spans of a count clip against the bursts the detector finds: one span per beep,
    numbered 1, 2, ... in time order up to the answer's count, each where its burst is."""
    ex = example_at("count", seed, 0)
    found = bursts(ex.waveform)
    spans = tasks.labelled_spans(ex)
    assert [label for label, _, _ in spans] == [str(i + 1) for i in range(int(ex.answer.split()[0]))]
    assert len(spans) == len(found)
    for (_, start, end), (a, b) in zip(spans, found, strict=True):
        assert abs(start - a / SR) < EDGE and abs(end - b / SR) < EDGE


@pytest.mark.parametrize("task", ["pitch", "kind", "duration", "loudness", "order"])
def test_labelled_spans_are_for_count_and_morse_clips_only(task):
    with pytest.raises(ConfigError, match="count or morse example"):
        tasks.labelled_spans(example_at(task, 0, 0))
