"""AudioFlamingo3Processor: prompts, conversations and audio to the model's input tensors; ids back to text.

    text (+ `<sound>` placeholders) --tokenizers--> ids --each placeholder -> its audio ids--> input_ids
    audio --load_audio--> 16 kHz waveform --30 s windows--> log_mel_windows (one call for the whole batch)

Outputs use the reference's names: input_ids and attention_mask (B, T) int64, left-padded by default;
input_features (W, 128, 3000) float32 and input_features_mask (W, 3000) int32 for the W windows of every
audio of the batch in placeholder order; labels (B, T) int64, the ids where a token is learned and -100
elsewhere. output_labels=True learns every text token (the reference: audio and padding at -100);
output_labels="assistant" learns only the assistant turns' content and their closing <|im_end|>, what
training on answers (and fine-tuning) needs: system prompt, questions and the turns' headers are -100 too.

`__call__(text, audio)` accepts three prompt forms per sample: no `<sound>` (the audio tokens go first),
one `<sound>` per audio (expanded in place, as transformers does), or one `<sound>` per 30 s window (each
expanded for its window). Unlike the reference, a batch may mix text-only and audio samples, and a sample or
conversation may hold several audios (see chat_template.py for where their placeholders go).

Limits: audio past `max_audio_len` (600 s) is cut with a logged warning, as the reference does; a prompt
longer than `max_prompt_tokens` (16,000 by default, the model card's input limit; None lifts it) is an
InputError naming the sample, rather than a failure deep inside the model.
"""

import os
from typing import Any

import numpy as np
import torch

from minaf3 import windows
from minaf3.audio import load_audio
from minaf3.chat_template import (
    AUDIO_TOKEN,
    assistant_spans,
    audio_parts,
    check_text,
    parse,
    render,
    split_batch,
)
from minaf3.errors import AudioError, AudioFileError, ConfigError, InputError
from minaf3.features import SampleError, log_mel_windows
from minaf3.loss import IGNORE_INDEX
from minaf3.processor_files import BatchFeature, read_processor_files, write_processor_files
from minaf3.weights.hub import model_folder

MAX_PROMPT_TOKENS = 16_000  # the model card's input limit, in tokens after audio expansion
DEFAULT_TRANSCRIPTION_PROMPT = "Transcribe the input speech."
# The framings AF3 puts around a transcription; strip_prefix removes one (transformers' list and order).
TRANSCRIPTION_PREFIXES = (
    "The spoken content of the audio is",
    "The transcription of the audio is",
    "The content of the input audio is",
)
# Audio arguments that are one clip; a list or tuple holds several.
_SINGLE_AUDIO = (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, torch.Tensor)


class AudioFlamingo3Processor:
    """Tokenizer, chat template and audio front end of Audio Flamingo 3 (`from_pretrained(folder)`)."""

    def __init__(
        self,
        tokenizer,
        *,
        pad_token: str | None,
        eos_token: str | None,
        audio_token: str = AUDIO_TOKEN,
        default_transcription_prompt: str = DEFAULT_TRANSCRIPTION_PROMPT,
        max_audio_len: int = windows.MAX_AUDIO_SECONDS,
        max_prompt_tokens: int | None = MAX_PROMPT_TOKENS,
    ):
        """tokenizer: a `tokenizers.Tokenizer` holding `audio_token`; max_audio_len in seconds (30 to 600)."""
        self.tokenizer = tokenizer
        self.audio_token = audio_token
        self.audio_token_id = _token_id(tokenizer, audio_token, "audio_token")
        self.pad_token_id = None if pad_token is None else _token_id(tokenizer, pad_token, "pad_token")
        self.eos_token_id = None if eos_token is None else _token_id(tokenizer, eos_token, "eos_token")
        self.default_transcription_prompt = default_transcription_prompt
        if not isinstance(max_audio_len, int) or not (
            windows.WINDOW_SECONDS <= max_audio_len <= windows.MAX_AUDIO_SECONDS
        ):
            raise ConfigError(
                f"max_audio_len must be whole seconds from {windows.WINDOW_SECONDS} to "
                f"{windows.MAX_AUDIO_SECONDS}, got {max_audio_len!r}"
            )
        self.max_audio_len = max_audio_len  # windows.kept_samples keeps max_audio_len // 30 whole windows
        if max_prompt_tokens is not None and (
            not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1
        ):
            raise ConfigError(
                f"max_prompt_tokens must be a positive integer or None, got {max_prompt_tokens!r}"
            )
        self.max_prompt_tokens = max_prompt_tokens

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        max_prompt_tokens: int | None = MAX_PROMPT_TOKENS,
        revision: str | None = None,
    ) -> "AudioFlamingo3Processor":
        """Read tokenizer.json, tokenizer_config.json and the processor configs of a checkpoint folder (or
        of a hub model id at `revision`: weights/hub.py).

        Raises CheckpointError for a missing or unreadable file, ConfigError for feature-extractor settings
        other than the ones minaf3 computes (128 mels, 16 kHz, n_fft 400, hop 160, 30 s windows).
        """
        return cls(**read_processor_files(model_folder(path, revision)), max_prompt_tokens=max_prompt_tokens)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the tokenizer, its settings, the processor config and the chat template into folder `path`
        (the files from_pretrained reads; see processor_files.write_processor_files)."""
        write_processor_files(
            path,
            self.tokenizer,
            pad_token=None if self.pad_token_id is None else self.tokenizer.id_to_token(self.pad_token_id),
            eos_token=None if self.eos_token_id is None else self.tokenizer.id_to_token(self.eos_token_id),
            audio_token=self.audio_token,
            default_transcription_prompt=self.default_transcription_prompt,
            max_audio_len=self.max_audio_len,
        )

    # --- text + audio -> tensors ------------------------------------------------------------------------

    def __call__(
        self,
        text: str | list[str],
        audio: Any = None,
        output_labels: bool = False,
        padding_side: str = "left",
    ) -> BatchFeature:
        """Tokenize prompts and their audio.

        text: one prompt or a list. audio: for one prompt, a clip (array at 16 kHz, tensor, path, URL, bytes)
        or a list of clips; for a list of prompts, a list with one entry per prompt: a clip, a list of clips,
        or None for a text-only prompt. output_labels: False, True or "assistant" (module docstring).
        """
        texts, clips = _pair_text_and_audio(text, audio)
        clip_names = [
            [f"sample {i}, audio {j}" for j in range(len(sample))] for i, sample in enumerate(clips)
        ]
        waveforms = self._load_all(clips, clip_names)
        names = [f"sample {i}" for i in range(len(texts))]
        return self._encode(
            texts, waveforms, names, clip_names, output_labels, padding_side, placeholders_from_text=True
        )

    def apply_chat_template(
        self,
        conversations: list,
        tokenize: bool = True,
        add_generation_prompt: bool = True,
        return_dict: bool = True,
        output_labels: bool | str = False,
        padding_side: str = "left",
    ) -> BatchFeature | torch.Tensor | str | list[str]:
        """Render one conversation (a list of messages) or a batch of them; tokenize=False returns the
        prompt string(s), return_dict=False only input_ids (B, T).

        For training, give conversations that end with the assistant's answer, add_generation_prompt=False
        and output_labels="assistant": labels then hold the answers' ids (and each closing <|im_end|>) only.
        """
        batch, is_batch = split_batch(conversations)
        parsed = [parse(conversation, i) for i, conversation in enumerate(batch)]
        texts = [render(messages, add_generation_prompt, self.audio_token) for messages in parsed]
        if not tokenize:
            return texts if is_batch else texts[0]
        names = [f"conversation {i}" for i in range(len(parsed))]
        parts = [audio_parts(messages) for messages in parsed]
        clip_names = [[f"{name}, {p.where}" for p in ps] for name, ps in zip(names, parts, strict=True)]
        waveforms = self._load_all([[p.source for p in ps] for ps in parts], clip_names)
        out = self._encode(
            texts, waveforms, names, clip_names, output_labels, padding_side, placeholders_from_text=False
        )
        return out if return_dict else out["input_ids"]

    def apply_transcription_request(
        self, audio: Any, prompt: str | list[str | None] | None = None, tokenize: bool = True
    ) -> BatchFeature | list[str]:
        """One user turn per clip: the prompt (default "Transcribe the input speech.") and the audio."""
        clips = list(audio) if isinstance(audio, list | tuple) else [audio]
        if not clips:
            raise InputError("apply_transcription_request: audio must hold at least one clip")
        if prompt is None or isinstance(prompt, str):
            prompts = [prompt] * len(clips)
        elif isinstance(prompt, list | tuple) and len(prompt) == len(clips):
            prompts = list(prompt)
        else:
            raise InputError(
                f"apply_transcription_request: prompt must be None, a string, or a list of {len(clips)} "
                f"(one per clip), got {prompt!r:.80}"
            )
        conversations = []
        for i, (clip, text) in enumerate(zip(clips, prompts, strict=True)):
            if text is not None and not isinstance(text, str):
                raise InputError(f"apply_transcription_request: prompt {i} must be a string or None")
            text = self.default_transcription_prompt if text is None else text
            content = [{"type": "text", "text": text}, {"type": "audio", "audio": clip}]
            conversations.append([{"role": "user", "content": content}])
        return self.apply_chat_template(conversations, tokenize=tokenize, add_generation_prompt=True)

    # --- ids -> text ------------------------------------------------------------------------------------

    def decode(
        self, ids: Any, skip_special_tokens: bool = True, strip_prefix: bool = False
    ) -> str | list[str]:
        """Token ids (T,) -> a string, (B, T) -> a list of strings. strip_prefix removes AF3's transcription
        framing ('The spoken content of the audio is "..."') and keeps the quoted text."""
        try:
            rows = torch.as_tensor(ids).tolist() if not isinstance(ids, list) else ids
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"decode: expected token ids (integers), got {type(ids).__name__}") from None
        rows = [rows] if isinstance(rows, int) else [r.tolist() if hasattr(r, "tolist") else r for r in rows]
        is_batch = bool(rows) and isinstance(rows[0], list | tuple)
        rows = rows if is_batch else [rows]
        # The tokenizer would fail on a float or None with a TypeError that names nothing.
        for b, row in enumerate(rows):
            bad = [t for t in row if isinstance(t, bool) or not isinstance(t, int)]
            if bad:
                raise InputError(f"decode: row {b}: token ids must be integers, got {bad[0]!r:.40}")
        if any(t < 0 for row in rows for t in row):
            raise InputError("decode: token ids must be >= 0 (labels mark ignored positions with -100)")
        texts = self.tokenizer.decode_batch(rows, skip_special_tokens=skip_special_tokens)
        if strip_prefix:
            texts = [strip_transcription_prefix(t) for t in texts]
        return texts if is_batch else texts[0]

    batch_decode = decode  # transformers' AF3 processor treats the two as one

    # --- internals ------------------------------------------------------------------------------------

    def _load_all(self, sources: list[list[Any]], names: list[list[str]]) -> list[list[np.ndarray]]:
        """Each sample's clips loaded, names[i][j] naming clip j of sample i in errors."""
        return [
            [self._load(source, name) for source, name in zip(clips, clip_names, strict=True)]
            for clips, clip_names in zip(sources, names, strict=True)
        ]

    def _load(self, source: Any, name: str) -> np.ndarray:
        """A clip as a float32 waveform cut to max_audio_len; load errors are re-raised naming the part."""
        try:
            waveform = load_audio(source, windows.SAMPLING_RATE)
        except (AudioError, AudioFileError) as exc:
            raise type(exc)(f"{name}: {exc}") from exc
        # Past max_audio_len: the reference's warning, naming the clip, and its first whole windows only.
        return waveform[: windows.kept_samples(len(waveform), name, max_seconds=self.max_audio_len)]

    def _repeats(self, ids: np.ndarray, waveforms: list[np.ndarray], name: str, from_text: bool):
        """How many times each id of one sample appears once every placeholder is replaced by its run of
        audio-token ids: 1 for text, the run's length for a placeholder. ids (T,) -> repeats (T,)."""
        at = np.flatnonzero(ids == self.audio_token_id)
        per_window = [windows.window_token_counts(len(w)) for w in waveforms]
        num_windows = sum(len(counts) for counts in per_window)
        if len(at) == len(waveforms):
            runs = [sum(counts) for counts in per_window]
        elif from_text and len(at) == num_windows:
            runs = [k for counts in per_window for k in counts]
        elif not waveforms:
            raise InputError(
                f"{name}: found {len(at)} '{self.audio_token}' placeholder(s) but no audio was given"
            )
        elif not from_text:
            raise InputError(
                f"{name}: its text holds '{self.audio_token}' ({len(at) - len(waveforms)} time(s)); "
                "pass audio as {'type': 'audio', ...} parts, not as placeholders in the text"
            )
        elif len(waveforms) == 1:
            raise InputError(
                f"{name}: found {len(at)} placeholders but audio was split into {num_windows} window(s). "
                f"Use no '{self.audio_token}', one, or one per 30 s window."
            )
        else:
            raise InputError(
                f"{name}: found {len(at)} placeholders for {len(waveforms)} audios split into {num_windows} "
                f"window(s); use none, {len(waveforms)} (one per audio) or {num_windows} (one per window)."
            )
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[at] = runs
        return repeats

    def _encode(
        self,
        texts: list[str],
        waveforms: list[list[np.ndarray]],
        names: list[str],
        clip_names: list[list[str]],
        output_labels: bool,
        padding_side: str,
        placeholders_from_text: bool,
    ) -> BatchFeature:
        """Prompts and their loaded clips -> model inputs. placeholders_from_text: the prompt forms of
        `__call__` apply; otherwise (rendered conversations) there is exactly one placeholder per clip.
        names: one per sample; clip_names: one per clip, as waveforms, for errors found in the features."""
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not (isinstance(output_labels, bool) or output_labels == "assistant"):
            raise InputError(f"output_labels must be False, True or 'assistant', got {output_labels!r:.40}")
        if placeholders_from_text:
            # A prompt without placeholders gets one per audio in front: "audio tokens first" form.
            texts = [
                self.audio_token * len(clips) + text if clips and self.audio_token not in text else text
                for text, clips in zip(texts, waveforms, strict=True)
            ]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        rows, learned = [], []  # per sample: ids (T,) with audio runs in place; which of them are learned
        for text, e, clips, name in zip(texts, encodings, waveforms, names, strict=True):
            ids = np.asarray(e.ids, dtype=np.int64)
            repeats = self._repeats(ids, clips, name, placeholders_from_text)
            rows.append(np.repeat(ids, repeats))  # (T,) -> (T - placeholders + audio tokens,)
            if output_labels == "assistant":
                learned.append(np.repeat(_in_spans(e.offsets, assistant_spans(text)), repeats))
        for row, name in zip(rows, names, strict=True):
            if self.max_prompt_tokens is not None and len(row) > self.max_prompt_tokens:
                audio = int((row == self.audio_token_id).sum())
                raise InputError(
                    f"{name}: the prompt is {len(row):,} tokens ({audio:,} of them audio), over the limit of "
                    f"{self.max_prompt_tokens:,} (max_prompt_tokens); shorten the text or audio, or raise it"
                )
        input_ids, attention_mask = self._pad(rows, padding_side)
        out = BatchFeature(input_ids=input_ids, attention_mask=attention_mask)
        clips = [w for sample in waveforms for w in sample]
        if clips:
            flat_names = [name for sample in clip_names for name in sample]
            out["input_features"], out["input_features_mask"] = _features(clips, flat_names)
        if output_labels:
            labels = input_ids.clone()
            labels[input_ids == self.audio_token_id] = IGNORE_INDEX
            labels[attention_mask == 0] = IGNORE_INDEX
            # The reference also ignores every pad-token id in the text itself (<|endoftext|> for AF3).
            if self.pad_token_id is not None:
                labels[input_ids == self.pad_token_id] = IGNORE_INDEX
            if output_labels == "assistant":
                labels[~_padded(learned, labels.shape[1], padding_side, fill=False)] = IGNORE_INDEX
            out["labels"] = labels
        return out

    def _pad(self, rows: list[np.ndarray], padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of different lengths -> input_ids and attention_mask (B, T_max), int64."""
        longest = max(len(row) for row in rows)
        if self.pad_token_id is None and any(len(row) != longest for row in rows):
            raise InputError(
                "cannot pad prompts of different lengths: tokenizer_config.json has no pad_token"
            )
        input_ids = _padded(rows, longest, padding_side, fill=self.pad_token_id or 0)
        attention_mask = _padded([np.ones(len(row), np.int64) for row in rows], longest, padding_side, fill=0)
        return input_ids, attention_mask


def _padded(rows: list[np.ndarray], length: int, padding_side: str, fill: int | bool) -> torch.Tensor:
    """Rows (T_b,) of one dtype -> (B, length), each row placed on the right (padding left) or the left."""
    out = torch.full((len(rows), length), fill, dtype=torch.from_numpy(rows[0][:0]).dtype)
    for b, row in enumerate(rows):
        span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        out[b, span] = torch.from_numpy(row)
    return out


def _in_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """(T,) bool: which tokens start inside one of the character spans [start, end) of their text.

    offsets: each token's (start, end) characters, as `tokenizers` reports them."""
    starts = np.array([start for start, _ in offsets], dtype=np.int64)
    inside = np.zeros(len(starts), dtype=bool)
    for start, end in spans:
        inside |= (starts >= start) & (starts < end)
    return inside


def _features(clips: list[np.ndarray], names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every window of every clip, in order, through one batched log-mel call: (W, 128, 3000), (W, 3000).

    A window whose features are not finite is reported as its clip's sample (names: one per clip).
    """
    bounds = [windows.window_bounds(len(clip)) for clip in clips]
    # Not zeroed: log_mel_windows never reads past each window's valid samples, and a 10 min clip's slab
    # is 38 MB to fill for nothing.
    slab = torch.empty(sum(len(b) for b in bounds), windows.WINDOW_SAMPLES, dtype=torch.float32)
    valid = torch.zeros(len(slab), dtype=torch.int64)
    origin = []  # per window: (clip, offset of its first sample in the clip)
    for c, (clip, clip_bounds) in enumerate(zip(clips, bounds, strict=True)):
        for start, end in clip_bounds:
            w = len(origin)
            slab[w, : end - start] = torch.from_numpy(clip[start:end])
            valid[w] = end - start
            origin.append((c, start))
    try:
        return log_mel_windows(slab, valid)
    except SampleError as exc:
        c, start = origin[exc.window]
        raise AudioError(f"{names[c]}: sample {start + exc.sample} {exc.problem}") from exc


def _pair_text_and_audio(text: Any, audio: Any) -> tuple[list[str], list[list[Any]]]:
    """(prompts, clips per prompt) from `__call__`'s text and audio arguments."""
    single = isinstance(text, str)
    texts = [text] if single else list(text) if isinstance(text, list | tuple) else None
    if texts is None or not texts or not all(isinstance(t, str) for t in texts):
        raise InputError(f"text must be a string or a non-empty list of strings, got {text!r:.80}")
    for i, t in enumerate(texts):
        check_text(t, f"sample {i}: ")
    if audio is None:
        return texts, [[] for _ in texts]
    if single:
        return texts, [list(audio) if isinstance(audio, list | tuple) else [audio]]
    if isinstance(audio, _SINGLE_AUDIO) or len(audio) != len(texts):
        count = 1 if isinstance(audio, _SINGLE_AUDIO) else len(audio)
        raise InputError(
            f"got {len(texts)} prompts but {count} audio entries; pass a list with one entry per prompt "
            "(a clip, a list of clips, or None for a text-only prompt)"
        )
    return texts, [[] if a is None else list(a) if isinstance(a, list | tuple) else [a] for a in audio]


def _token_id(tokenizer, token: str, what: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ConfigError(f"{what} {token!r} is not in the tokenizer's vocabulary (tokenizer.json)")
    return token_id


def strip_transcription_prefix(text: str) -> str:
    """'The spoken content of the audio is "hello".' -> 'hello' (transformers' _strip_assistant_prefix...)."""
    stripped = text.strip()
    for prefix in TRANSCRIPTION_PREFIXES:
        if stripped.startswith(prefix):
            stripped = stripped[len(prefix) :].strip()
            break
    if stripped.endswith("."):
        stripped = stripped[:-1].strip()
    if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
        stripped = stripped[1:-1].strip()
    return stripped


AutoProcessor = AudioFlamingo3Processor
