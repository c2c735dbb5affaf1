"""Synthetic listening tasks: clips a tiny AF3 can learn to hear, with questions and exact answers.

Every clip is 16 kHz mono float32 of shape (n,), at most ~11.2 s (under the encoder's 30 s window): a random
start offset of near-silence, the sound, a short tail; white background noise 25-40 dB below the RMS of the
sound's nonzero samples; then scaled to a peak |x| of 0.05-0.9 ("silence": noise only, peak 0.001-0.005).

The six trained families, in `TASKS` order, and the held-out one (`HELD_OUT`, kept for a fine-tuning test):

    count     1-6 beeps                                   "3 beeps"
    pitch     one tone, 150-400 Hz or 1500-4000 Hz          "high" | "low"
    kind      tone, noise, chirp, click train or silence    "a rising chirp", ...
    duration  one burst of N s +- 0.2 s (N = 1-8)           "4 seconds"
    loudness  a level ramp of 12-30 dB                      "louder" | "quieter"
    morse     1-3 letters A-Z in Morse code, asked with     'The spoken content of the audio is "SOS".'
              AF3's transcription request                   (so `minaf3 transcribe` prints SOS)
    order     two beeps at different pitches                "higher" | "lower"

Seeds: clip `index` of `seed` comes from numpy's SeedSequence((seed, crc32(task), index)), so any clip is
reproducible on its own. Evaluation uses seeds 0..999 (`EVAL_SEEDS`), training seeds >= 1000
(`FIRST_TRAIN_SEED`), so fresh evaluation clips are never training clips.
"""

import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from minaf3.chat_template import AUDIO_TOKEN
from minaf3.errors import ConfigError
from minaf3.processor import DEFAULT_TRANSCRIPTION_PROMPT, TRANSCRIPTION_PREFIXES, strip_transcription_prefix
from minaf3.windows import SAMPLING_RATE

TASKS = ("count", "pitch", "kind", "duration", "loudness", "morse")  # the families the shipped model learns
HELD_OUT = "order"  # kept out of training, for a later fine-tuning test
ALL_TASKS = (*TASKS, HELD_OUT)
EVAL_SEEDS = range(0, 1000)
FIRST_TRAIN_SEED = 1000

# Every clip. Ranges are (low, high), drawn uniformly; frequencies are drawn uniformly on a log scale.
PEAK = (0.05, 0.9)  # peak |x| after mixing
SILENCE_PEAK = (0.001, 0.005)  # peak |x| of a "silence" clip, which is background noise only
NOISE_DB_BELOW = (25.0, 40.0)  # background noise RMS below the RMS of the sound's nonzero samples, dB
LEAD_SECONDS = (0.05, 1.0)  # the random start offset; never 0, so a gap always shows the noise floor
TAIL_SECONDS = (0.05, 0.5)
FADE_SECONDS = 0.005  # raised-cosine fade at both ends of every burst, so bursts do not click
TONE_HZ = (200.0, 3000.0)  # the tones of kind, duration and loudness
BEEPS = (1, 6)  # count
BEEP_SECONDS = (0.08, 0.3)
GAP_SECONDS = (0.1, 0.6)  # also between the two beeps of order
BEEP_HZ = (300.0, 3000.0)
PITCH_SECONDS = (0.5, 3.0)  # pitch
LOW_HZ, HIGH_HZ = (150.0, 400.0), (1500.0, 4000.0)
KIND_SECONDS = (1.0, 4.0)  # kind
CHIRP_HZ = (200.0, 6000.0)
CHIRP_MIN_RATIO = 4.0  # at least two octaves between the start and end frequencies
CLICK_SECONDS = 0.001
CLICKS_PER_SECOND = (5.0, 30.0)
KINDS = ("a pure tone", "white noise", "a rising chirp", "a falling chirp", "a click train", "silence")
DURATION_SECONDS = (1, 8)  # duration: the whole seconds N the answers name
DURATION_JITTER = 0.2  # the burst lasts N +- this many seconds
DURATION_PAD_SECONDS = (0.3, 1.5)  # silence before and after the burst (its start offset and tail)
LOUDNESS_SECONDS = (2.0, 5.0)  # loudness
LOUDNESS_CHANGE_DB = (12.0, 30.0)
MORSE_LETTERS = (1, 3)  # morse
MORSE_HZ = (600.0, 800.0)
MORSE_WPM = (15.0, 20.0)
MORSE_UNIT_SECONDS = 1.2  # one unit lasts 1.2 / wpm s (the "PARIS" standard word is 50 units)
DOT, DASH, ELEMENT_GAP, LETTER_GAP = 1, 3, 1, 3  # in units
MORSE_CODE = dict(zip("ABCDEFGHIJKLMNOPQRSTUVWXYZ", (  # letter -> dots and dashes
    ".- -... -.-. -.. . ..-. --. .... .. .--- -.- .-.. -- -. --- .--. --.- .-. ... - ..- ...- .-- "
    "-..- -.-- --.."
).split(), strict=True))  # fmt: skip
ORDER_BEEP_SECONDS = (0.15, 0.4)  # order
ORDER_HZ = (300.0, 3000.0)
ORDER_MIN_SEMITONES = 4.0

# The questions of each family; a model must answer every phrasing with the same exact answer.
PHRASINGS = {
    "count": ("How many beeps are there?", "Count the beeps.", "How many times does the tone sound?"),
    "pitch": ("Is the tone high or low?", "Is this a high or a low pitch?", "High or low tone?"),
    "kind": ("What kind of sound is this?", "What do you hear?", "Describe the sound."),
    "duration": ("How long is the sound?", "How many seconds does the sound last?",
                 "What is the duration of the sound?"),
    "loudness": ("Does the sound get louder or quieter?", "Is the sound getting louder or quieter?",
                 "Louder or quieter over time?"),
    "morse": (DEFAULT_TRANSCRIPTION_PROMPT,),  # AF3's own transcription request, the only phrasing
    "order": ("Is the second beep higher or lower than the first?", "Is the second beep higher or lower?",
              "Second beep: higher or lower?"),
}  # fmt: skip


@dataclass(frozen=True, eq=False)
class Example:
    """One clip with its question and exact answer. waveform: float32 (n,) at 16 kHz. facts: what the
    generator drew (Hz, seconds, dB, letters) and the mixing ("lead_seconds", "noise_db_below", "peak")."""

    task: str
    question: str
    answer: str
    waveform: np.ndarray
    facts: dict


# --- building blocks: numbers of samples, tones, noise, fades ---------------------------------------------


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """A frequency in Hz, uniform on a log scale: every octave of the range is equally likely."""
    return float(np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]))))


def _samples(seconds: float) -> int:
    return int(round(seconds * SAMPLING_RATE))


def _tone(rng: np.random.Generator, hz: float, seconds: float) -> np.ndarray:
    """A unit-amplitude sine of `hz` Hz and random phase, (round(seconds * 16000),) float64."""
    t = np.arange(_samples(seconds)) / SAMPLING_RATE
    return np.sin(2 * np.pi * hz * t + rng.uniform(0, 2 * np.pi))


def _faded(burst: np.ndarray) -> np.ndarray:
    """The burst with FADE_SECONDS raised-cosine ramps in and out (shorter for a very short burst)."""
    n = min(_samples(FADE_SECONDS), len(burst) // 2)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(n) / n)  # 0 -> 1, raised cosine
    out = burst.copy()
    out[:n] *= ramp
    out[len(out) - n :] *= ramp[::-1]
    return out


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(_samples(seconds))


def _tone_or_noise(rng: np.random.Generator, seconds: float) -> tuple[np.ndarray, dict]:
    """Half the time a tone (TONE_HZ), half the time white noise: the sources of duration and loudness."""
    if rng.random() < 0.5:
        hz = _log_uniform(rng, TONE_HZ)
        return _tone(rng, hz, seconds), {"source": "tone", "frequency_hz": hz}
    return rng.standard_normal(_samples(seconds)), {"source": "noise"}


def _plural(number: int, unit: str) -> str:
    return f"{number} {unit}" + ("s" if number > 1 else "")


# --- the seven families: each returns the clean sound (float64, before noise), its answer and its facts --


def _count(rng: np.random.Generator) -> tuple[np.ndarray, str, dict]:
    count = int(rng.integers(BEEPS[0], BEEPS[1] + 1))
    hz = _log_uniform(rng, BEEP_HZ)
    beeps = [rng.uniform(*BEEP_SECONDS) for _ in range(count)]
    gaps = [rng.uniform(*GAP_SECONDS) for _ in range(count - 1)]
    parts, spans = [_faded(_tone(rng, hz, beeps[0]))], [(0, _samples(beeps[0]))]
    for gap, beep in zip(gaps, beeps[1:], strict=True):
        parts += [_silence(gap), _faded(_tone(rng, hz, beep))]
        end = sum(map(len, parts))
        spans.append((end - len(parts[-1]), end))  # each beep's first and last sample + 1
    facts = {"count": count, "frequency_hz": hz, "beep_seconds": beeps, "gap_seconds": gaps}
    facts["beep_samples"] = spans
    return np.concatenate(parts), _plural(count, "beep"), facts


def _pitch(rng: np.random.Generator) -> tuple[np.ndarray, str, dict]:
    high = bool(rng.random() < 0.5)
    hz = _log_uniform(rng, HIGH_HZ if high else LOW_HZ)
    seconds = rng.uniform(*PITCH_SECONDS)
    facts = {"frequency_hz": hz, "seconds": seconds}
    return _faded(_tone(rng, hz, seconds)), "high" if high else "low", facts


def _chirp(rng: np.random.Generator, seconds: float, rising: bool) -> tuple[np.ndarray, dict]:
    """An exponential sweep between two frequencies at least CHIRP_MIN_RATIO apart inside CHIRP_HZ."""
    low = _log_uniform(rng, (CHIRP_HZ[0], CHIRP_HZ[1] / CHIRP_MIN_RATIO))
    high = _log_uniform(rng, (low * CHIRP_MIN_RATIO, CHIRP_HZ[1]))
    start, end = (low, high) if rising else (high, low)
    t = np.arange(_samples(seconds)) / SAMPLING_RATE
    # frequency start * k^(t / seconds), k = end / start; the phase is its integral
    k = end / start
    phase = 2 * np.pi * start * seconds / np.log(k) * (k ** (t / seconds) - 1)
    return _faded(np.sin(phase)), {"start_hz": start, "end_hz": end}


def _click_train(rng: np.random.Generator, seconds: float) -> tuple[np.ndarray, dict]:
    """Rectangular 1 ms clicks at a steady rate; no fades, the clicks are the point."""
    rate = rng.uniform(*CLICKS_PER_SECOND)
    sound = _silence(seconds)
    for start in (np.arange(0, seconds - CLICK_SECONDS, 1 / rate) * SAMPLING_RATE).round().astype(int):
        sound[start : start + _samples(CLICK_SECONDS)] = 1.0
    return sound, {"clicks_per_second": rate}


def _kind(rng: np.random.Generator) -> tuple[np.ndarray, str, dict]:
    kind = KINDS[int(rng.integers(len(KINDS)))]
    seconds = rng.uniform(*KIND_SECONDS)
    facts: dict = {"seconds": seconds}
    if kind == "a pure tone":
        facts["frequency_hz"] = _log_uniform(rng, TONE_HZ)
        sound = _faded(_tone(rng, facts["frequency_hz"], seconds))
    elif kind == "white noise":
        sound = _faded(rng.standard_normal(_samples(seconds)))
    elif kind in ("a rising chirp", "a falling chirp"):
        sound, more = _chirp(rng, seconds, rising=kind == "a rising chirp")
        facts.update(more)
    elif kind == "a click train":
        sound, more = _click_train(rng, seconds)
        facts.update(more)
    else:
        sound = _silence(seconds)
    return sound, kind, facts


def _duration(rng: np.random.Generator) -> tuple[np.ndarray, str, dict]:
    whole = int(rng.integers(DURATION_SECONDS[0], DURATION_SECONDS[1] + 1))
    seconds = whole + rng.uniform(-DURATION_JITTER, DURATION_JITTER)
    burst, facts = _tone_or_noise(rng, seconds)
    return _faded(burst), _plural(whole, "second"), {"seconds": seconds, **facts}


def _loudness(rng: np.random.Generator) -> tuple[np.ndarray, str, dict]:
    louder = bool(rng.random() < 0.5)
    change_db = rng.uniform(*LOUDNESS_CHANGE_DB)
    seconds = rng.uniform(*LOUDNESS_SECONDS)
    source, facts = _tone_or_noise(rng, seconds)
    ramp_db = np.linspace(-change_db, 0.0, len(source))  # a straight line in dB: a steady change
    gain = 10 ** ((ramp_db if louder else ramp_db[::-1]) / 20)
    facts = {"change_db": change_db, "seconds": seconds, **facts}
    return _faded(source * gain), "louder" if louder else "quieter", facts


def _morse(rng: np.random.Generator) -> tuple[np.ndarray, str, dict]:
    size = int(rng.integers(MORSE_LETTERS[0], MORSE_LETTERS[1] + 1))
    letters = "".join(rng.choice(list(MORSE_CODE), size=size))
    hz = rng.uniform(*MORSE_HZ)
    wpm = rng.uniform(*MORSE_WPM)
    unit = _samples(MORSE_UNIT_SECONDS / wpm)  # every element is a whole number of these samples
    t = np.arange(DASH * unit) / SAMPLING_RATE
    carrier = np.sin(2 * np.pi * hz * t + rng.uniform(0, 2 * np.pi))
    parts, spans = [], []  # spans: each letter's first and last sample + 1, from the sound's start
    for i, letter in enumerate(letters):
        start = sum(map(len, parts))
        for j, symbol in enumerate(MORSE_CODE[letter]):
            if j:
                parts.append(np.zeros(ELEMENT_GAP * unit))
            parts.append(_faded(carrier[: (DOT if symbol == "." else DASH) * unit]))
        spans.append((start, sum(map(len, parts))))
        if i < len(letters) - 1:
            parts.append(np.zeros(LETTER_GAP * unit))
    answer = f'{TRANSCRIPTION_PREFIXES[0]} "{letters}".'  # AF3's framing: transcribe strips it again
    facts = {"letters": letters, "frequency_hz": hz, "wpm": wpm, "letter_samples": spans}
    return np.concatenate(parts), answer, facts


def _order(rng: np.random.Generator) -> tuple[np.ndarray, str, dict]:
    higher = bool(rng.random() < 0.5)
    max_semitones = 12 * np.log2(ORDER_HZ[1] / ORDER_HZ[0])
    semitones = rng.uniform(ORDER_MIN_SEMITONES, max_semitones)
    low = _log_uniform(rng, (ORDER_HZ[0], ORDER_HZ[1] / 2 ** (semitones / 12)))
    pair = (low, low * 2 ** (semitones / 12))
    first, second = pair if higher else pair[::-1]
    gap = rng.uniform(*GAP_SECONDS)
    beeps = [_faded(_tone(rng, hz, rng.uniform(*ORDER_BEEP_SECONDS))) for hz in (first, second)]
    sound = np.concatenate([beeps[0], _silence(gap), beeps[1]])
    facts = {"first_hz": first, "second_hz": second, "gap_seconds": gap}
    return sound, "higher" if higher else "lower", facts


GENERATORS = {
    "count": _count, "pitch": _pitch, "kind": _kind, "duration": _duration,
    "loudness": _loudness, "morse": _morse, "order": _order,
}  # fmt: skip


# --- mixing: offset, background noise, peak ------------------------------------------------------------


def _mix(rng: np.random.Generator, task: str, sound: np.ndarray) -> tuple[np.ndarray, dict]:
    """Pad the clean sound with the start offset and tail, add the background noise and set the peak.
    Returns float32 (n,) and the mixing facts (seconds, dB, peak |x|)."""
    pad = DURATION_PAD_SECONDS if task == "duration" else None
    lead, tail = rng.uniform(*(pad or LEAD_SECONDS)), rng.uniform(*(pad or TAIL_SECONDS))
    clean = np.concatenate([_silence(lead), sound, _silence(tail)])
    noise_db = rng.uniform(*NOISE_DB_BELOW)
    noise = rng.standard_normal(len(clean))
    on = clean[clean != 0]  # the sound's own samples: gaps between beeps or clicks do not dilute its RMS
    if len(on):
        signal_rms = np.sqrt(np.mean(on**2))
        mixed = clean + noise * signal_rms * 10 ** (-noise_db / 20)
        peak = rng.uniform(*PEAK)
    else:  # silence: the background noise is all there is
        mixed, noise_db = noise, None
        peak = rng.uniform(*SILENCE_PEAK)
    mixed *= peak / np.max(np.abs(mixed))
    return mixed.astype(np.float32), {"lead_seconds": lead, "noise_db_below": noise_db, "peak": peak}


# --- examples, seeds, conversations --------------------------------------------------------------------


def _check_natural(argument: str, value: object) -> None:
    """Seeds, indices and counts are integers >= 0."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{argument} must be an integer >= 0, got {value!r}")


def _check_task(task: object, argument: str = "task") -> None:
    if task not in ALL_TASKS:
        raise ConfigError(f"{argument} must be one of {', '.join(ALL_TASKS)}; got {task!r}")


def make_example(task: str, rng: np.random.Generator, phrasing: int | None = None) -> Example:
    """One clip of `task` from `rng`. phrasing: an index into PHRASINGS[task], or None for a random one.
    The waveform does not depend on `phrasing` (the phrasing is drawn either way)."""
    _check_task(task)
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    phrasings = PHRASINGS[task]
    drawn = int(rng.integers(len(phrasings)))
    if phrasing is not None and (not isinstance(phrasing, int) or not 0 <= phrasing < len(phrasings)):
        raise ConfigError(f"phrasing must be None or 0..{len(phrasings) - 1} for {task}, got {phrasing!r}")
    sound, answer, facts = GENERATORS[task](rng)
    waveform, mixing = _mix(rng, task, sound)
    question = phrasings[drawn if phrasing is None else phrasing]
    return Example(task, question, answer, waveform, {**facts, **mixing})


LABELLED = ("count", "morse")  # the tasks whose sounds labelled_spans names


def labelled_spans(example: Example) -> list[tuple[str, float, float]]:
    """The sounds of a count or morse clip in order, each a (label, start, end) with the seconds from the
    clip's first sample where it starts and ends: for count each beep, labelled by its number ("1".."6");
    for morse each letter, from its first element's start to its last one's end."""
    if example.task not in LABELLED:
        raise ConfigError(f"labelled_spans needs a count or morse example, got a {example.task} one")
    lead = _samples(example.facts["lead_seconds"])  # the samples of silence _mix put before the sound
    if example.task == "count":
        labels, spans = [str(i + 1) for i in range(example.facts["count"])], example.facts["beep_samples"]
    else:
        labels, spans = example.facts["letters"], example.facts["letter_samples"]
    return [
        (label, (lead + start) / SAMPLING_RATE, (lead + end) / SAMPLING_RATE)
        for label, (start, end) in zip(labels, spans, strict=True)
    ]


def example_rng(task: str, seed: int, index: int) -> np.random.Generator:
    """The generator of clip `index` of `task` under `seed`: SeedSequence((seed, crc32(task), index))."""
    return np.random.default_rng(np.random.SeedSequence((seed, zlib.crc32(task.encode()), index)))


def example_at(task: str, seed: int, index: int) -> Example:
    """Clip `index` of `task` under `seed`, reproducible on its own (random phrasing)."""
    _check_task(task)
    _check_natural("seed", seed)
    _check_natural("index", index)
    return make_example(task, example_rng(task, seed, index))


def examples(tasks: str | Iterable[str], seed: int, n: int, start: int = 0) -> Iterator[Example]:
    """n examples, indices start..start+n-1, cycling through `tasks` (index i is tasks[i % len(tasks)]).
    Evaluation: seeds in EVAL_SEEDS (0..999); training: seeds >= FIRST_TRAIN_SEED."""
    names = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    if not names:
        raise ConfigError("tasks must name at least one task")
    for name in names:
        _check_task(name, "tasks")
    for argument, value in (("seed", seed), ("n", n), ("start", start)):
        _check_natural(argument, value)
    return (example_at(names[i % len(names)], seed, i) for i in range(start, start + n))


def split_of(seed: int) -> str:
    """'eval' for seeds 0..999, 'train' for seeds >= 1000."""
    _check_natural("seed", seed)
    return "eval" if seed in EVAL_SEEDS else "train"


def conversation(example: Example) -> tuple[list[dict], str]:
    """The messages minaf3's processor takes (`apply_chat_template`) and the expected assistant answer: one
    user turn, text then audio, as `apply_transcription_request` builds it (morse's text is its prompt)."""
    content = [{"type": "text", "text": example.question}, {"type": "audio", "audio": example.waveform}]
    return [{"role": "user", "content": content}], example.answer


def write_dataset(folder: str | os.PathLike, items: Iterable[Example], name: str = "dataset.json") -> Path:
    """Write `items` in the NVIDIA repository's JSON format: folder/name holds a list of {"id", "sound",
    "conversations", "task"}, each "sound" a 16 kHz PCM_16 wav beside it ("task" groups `minaf3 eval`'s
    report). Returns the JSON's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, example in enumerate(items):
        if not isinstance(example, Example):
            raise ConfigError(f"items[{i}] must be an Example, got {type(example).__name__}")
        ident = f"{i:06d}-{example.task}"
        sf.write(folder / f"{ident}.wav", example.waveform, SAMPLING_RATE, subtype="PCM_16")
        human = {"from": "human", "value": f"{AUDIO_TOKEN}\n{example.question}"}
        gpt = {"from": "gpt", "value": example.answer}
        records.append(
            {"id": ident, "sound": f"{ident}.wav", "conversations": [human, gpt], "task": example.task}
        )
    path = folder / name
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path


# --- scoring ---------------------------------------------------------------------------------------------


def score_answer(task: str, predicted: str, truth: str) -> dict[str, float]:
    """{"exact": 1.0 or 0.0}: equal up to case and runs of whitespace. Morse adds "letters": the fraction of
    letter positions that agree once AF3's framing is stripped, over the longer of the two (extra or missing
    letters count as wrong)."""
    _check_task(task)
    said, meant = (" ".join(text.split()).lower() for text in (predicted, truth))
    scores = {"exact": float(said == meant)}
    if task == "morse":
        said, meant = (strip_transcription_prefix(t).replace(" ", "").upper() for t in (predicted, truth))
        agree = sum(a == b for a, b in zip(said, meant, strict=False))
        scores["letters"] = agree / max(len(said), len(meant), 1)
    return scores
