"""Audio longer than the model reads at once: where to cut it, and the transcript of the pieces.

AF3 reads at most 600 s (20 windows of 30 s) per prompt. `segment_bounds` cuts longer audio into
n = ceil(duration / 600) segments, the fewest that fit, choosing each cut at the quietest moment (lowest
short-time energy) of a search window that ends at the 10-minute mark. A cut in a pause between words loses
nothing; a cut through a word would split it between two segments and garble it in both.

    |----- segment 1 (<= 600 s) -----|----- segment 2 -----| ...
                           [ search  ]^ 600 s
                                 ^ cut: the quietest 200 ms in the search window

Every segment must stay within 600 s and the last segment must still fit, so cut k lies in
[duration - (n - k) * 600, previous cut + 600] as well as in its search window. When the audio is exactly
n * 600 s long those bounds leave no choice and every cut falls on a 10-minute mark.

Transcripts are honest about their granularity: a Segment's times are the cut points, not word timestamps.
"""

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from minaf3.windows import HOP_LENGTH, MAX_AUDIO_SAMPLES, SAMPLING_RATE

SEARCH_SECONDS = 30.0  # how far before each 10-minute mark a cut may move to find a pause
SMOOTH_FRAMES = 20  # energy averaged over 20 hops of 10 ms: a 200 ms pause, about one gap between words


@dataclass(frozen=True)
class Segment:
    """One piece of a transcript: start and end in seconds from the start of the audio, and its text."""

    start: float
    end: float
    text: str


@dataclass
class Transcription:
    """The transcript of one audio: the joined text and the segments it was read in (one for <= 600 s)."""

    text: str
    segments: list[Segment] = field(default_factory=list)

    def __str__(self) -> str:
        return self.text

    @property
    def duration(self) -> float:
        """Seconds of audio transcribed (the end of the last segment)."""
        return self.segments[-1].end if self.segments else 0.0

    def to_dict(self) -> dict:
        """{"text": ..., "segments": [{"start", "end", "text"}, ...]}: the JSON the CLI prints."""
        return {"text": self.text, "segments": [asdict(s) for s in self.segments]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def to_srt(self) -> str:
        """SubRip subtitles, one cue per segment (numbered from 1, times as HH:MM:SS,mmm)."""
        cues = [
            f"{i}\n{srt_time(s.start)} --> {srt_time(s.end)}\n{s.text}\n"
            for i, s in enumerate(self.segments, start=1)
        ]
        return "\n".join(cues)


def srt_time(seconds: float) -> str:
    """Seconds -> 'HH:MM:SS,mmm' (SubRip's format), rounded to the millisecond."""
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d},{millis:03d}"


def join_texts(texts: list[str]) -> str:
    """The segments' texts as one transcript: stripped, empty ones dropped, separated by a space."""
    return " ".join(t.strip() for t in texts if t.strip())


def quietest_sample(waveform: np.ndarray, lo: int, hi: int) -> int:
    """The sample in [lo, hi] at the centre of the quietest 200 ms (lowest mean square) of that range.

    Energy is measured per 10 ms hop and averaged over SMOOTH_FRAMES hops, so one silent sample inside a
    word does not count as a pause. Ties go to the earliest, which keeps the result deterministic.
    """
    if hi - lo < HOP_LENGTH * SMOOTH_FRAMES:
        return hi  # too short a range to hold a pause: keep the segments as long as allowed
    frames = (hi - lo) // HOP_LENGTH
    region = waveform[lo : lo + frames * HOP_LENGTH].astype(np.float64)
    energy = (region.reshape(frames, HOP_LENGTH) ** 2).mean(axis=1)  # (frames,) mean square per hop
    smooth = np.convolve(energy, np.ones(SMOOTH_FRAMES) / SMOOTH_FRAMES, mode="valid")  # (frames - 19,)
    best = int(np.argmin(smooth))
    return lo + (best + SMOOTH_FRAMES // 2) * HOP_LENGTH


def segment_bounds(
    waveform: np.ndarray,
    max_samples: int = MAX_AUDIO_SAMPLES,
    search_seconds: float = SEARCH_SECONDS,
) -> list[tuple[int, int]]:
    """[start, end) sample ranges covering the whole waveform, each at most `max_samples` long.

    Audio that fits is one segment. Longer audio gets n = ceil(len / max_samples) segments cut at the
    quietest point near each multiple of max_samples (see the module docstring for the window rules).
    """
    total = len(waveform)
    if total <= max_samples:
        return [(0, total)]
    n = -(-total // max_samples)
    search = int(search_seconds * SAMPLING_RATE)
    cuts = [0]
    for k in range(1, n):
        # Latest allowed: this segment at most max_samples, and never past the k-th 10-minute mark.
        hi = min(cuts[-1] + max_samples, k * max_samples)
        # Earliest allowed: the n - k segments still to come must hold the rest.
        lo = max(hi - search, total - (n - k) * max_samples, cuts[-1] + 1)
        cuts.append(quietest_sample(waveform, lo, hi))
    cuts.append(total)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def to_seconds(sample: int) -> float:
    """A sample index at 16 kHz as seconds."""
    return sample / SAMPLING_RATE
