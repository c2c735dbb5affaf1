"""`minaf3.load(folder)`: a checkpoint ready to chat about audio and to transcribe it, in one call.

    pipe = minaf3.load("audio-flamingo-3-hf")
    pipe.chat("What is in this audio?", audio="clip.wav")               -> str
    for piece in pipe.chat("Describe it.", audio="clip.wav", stream=True): print(piece, end="")
    pipe.transcribe("lecture.flac").text, .segments                     -> Transcription
    pipe.transcribe(["a.wav", "b.wav"])                                 -> [Transcription, ...]

The pipeline owns nothing but glue: the processor builds the prompt, the model generates, and
segments.py cuts audio longer than 10 minutes. `chat` reads at most 600 s of each audio (the model's limit):
longer audio is cut with a logged warning, or refused with refuse_long_audio=True. `transcribe` reads any
length: it splits at quiet points near every 10-minute mark, runs the segments in batches and joins the text.

`last_timings` holds the seconds each stage of the last call took (features, encoder, prefill, decode).
"""

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from minaf3.config import AudioFlamingo3Config
from minaf3.conversation import add_think_request, build_conversation, load_conversation_audio, read_audio
from minaf3.errors import ConfigError, InputError
from minaf3.model import THINK_FOLDER, AudioFlamingo3ForConditionalGeneration
from minaf3.processor import AudioFlamingo3Processor
from minaf3.quantize import check_mode
from minaf3.sampling import DEFAULT_MAX_NEW_TOKENS
from minaf3.segments import Segment, Transcription, join_texts, segment_bounds, to_seconds
from minaf3.streamer import TextIteratorStreamer
from minaf3.weights.loader import check_model_folder

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 4  # segments per generate call in transcribe: a 600 s segment is ~15k prompt tokens


def load(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
    think: bool = False,
    revision: str | None = None,
    adapter: str | os.PathLike | None = None,
    merge_adapter: bool = True,
) -> "Pipeline":
    """Load the checkpoint folder or hub model id `path` (any layout weights/ reads) with its processor.

    device: "cpu" (default), "cuda", "auto" or a torch.device. dtype: "float32", "bfloat16", "float16" or a
    torch dtype (default: as from_pretrained: the checkpoint's bf16 on CUDA and on CPUs with bf16
    instructions, else float32). quantize: None, "int8" or "int4"
    (weight-only, decoder and lm_head). think: ask for reasoning in every chat (AF-Think's request), with
    the AF-Think adapter from the folder's think/ when it has one (a warning is logged when it has not).
    revision: for a hub model id, the branch, tag or commit (weights/hub.py: cached copies, HF_HUB_OFFLINE).
    adapter: a LoRA adapter folder in PEFT's format (a fine-tune's), applied instead of think/; merged into
    the weights, or with merge_adapter=False added on every call (slower; the weights stay as stored). A
    CheckpointError lists what does not fit the model.
    """
    check_mode(quantize)
    folder = check_model_folder(path, revision)
    processor = AudioFlamingo3Processor.from_pretrained(folder)  # cheap: tokenizer problems show first
    check_processor_fits_model(processor, AudioFlamingo3Config.from_file(folder), folder)
    # from_pretrained merges the adapter (no cost per token) before it quantizes, the only working order.
    has_adapter = think and adapter is None and (folder / THINK_FOLDER).is_dir()
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(
        folder,
        dtype=dtype,
        device_map=device,
        quantize=quantize,
        think=has_adapter,
        adapter=adapter,
        merge_adapter=merge_adapter,
    )
    if think and adapter is None and not has_adapter:
        logger.warning(
            "%s has no think/ adapter folder: the base model is asked to reason without it", folder
        )
    return Pipeline(model, processor, think=think)


def check_processor_fits_model(
    processor: AudioFlamingo3Processor, config: AudioFlamingo3Config, folder: Path
) -> None:
    """Refuse a processor whose ids the model would misread, before any weight is read.

    The model finds audio positions by config.json's audio_token_id: a different id from the processor
    would leave the audio unused (or fail on a count mismatch deep in generate). Every id the tokenizer
    can produce indexes the embedding table, so the largest must be below text_config.vocab_size.
    Raises ConfigError naming both values and the files they come from.
    """
    if processor.audio_token_id != config.audio_token_id:
        raise ConfigError(
            f"{folder}: config.json has audio_token_id={config.audio_token_id} but the processor's audio "
            f"token {processor.audio_token!r} is id {processor.audio_token_id} in tokenizer.json; "
            "the two files come from different checkpoints"
        )
    largest = max(processor.tokenizer.get_vocab(with_added_tokens=True).values())
    if largest >= config.decoder.vocab_size:
        raise ConfigError(
            f"{folder}: tokenizer.json holds token ids up to {largest} but config.json has "
            f"text_config.vocab_size={config.decoder.vocab_size} (ids 0 to {config.decoder.vocab_size - 1}); "
            "the two files come from different checkpoints"
        )


@dataclass
class Timings:
    """Seconds each stage of the last call took, and the tokens it handled (summed over the batch)."""

    features: float = 0.0  # audio decoding, log-mel and tokenization (the processor)
    encoder: float = 0.0  # the Whisper encoder over every window
    prefill: float = 0.0  # projector and decoder over the prompt, up to the first new token
    decode: float = 0.0  # every step after the first
    prompt_tokens: int = 0
    new_tokens: int = 0
    decode_tokens: int = 0  # tokens produced in `decode`: the batch size times (steps - 1)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode if self.decode > 0 else 0.0

    def __add__(self, other: "Timings") -> "Timings":
        return Timings(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


class _StageClock:
    """A streamer that only notes when generate hands over the prompt, the first token and the end.

    generate calls put(prompt) before encoding the audio, put(tokens) after each step and end() when done;
    it forwards everything to `inner` (a TextIteratorStreamer when streaming).
    """

    def __init__(self, inner=None):
        self.inner, self.start, self.first, self.steps, self.prompt_shape = inner, None, None, 0, (0, 0)

    def put(self, ids: torch.Tensor) -> None:
        now = time.perf_counter()
        if self.start is None:
            self.start, self.prompt_shape = now, tuple(ids.shape)
        else:
            self.steps += 1
            self.first = self.first or now
        if self.inner is not None:
            self.inner.put(ids)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()

    def fail(self, error: BaseException) -> None:
        if self.inner is not None:
            self.inner.fail(error)


class Pipeline:
    """A loaded model and its processor; see the module docstring.

    Calls from several threads are safe (generate serialises use of the model's KV cache), but then
    last_timings is approximate: the encoder hooks of overlapping calls add to one counter.
    """

    def __init__(self, model: AudioFlamingo3ForConditionalGeneration, processor, think: bool = False):
        self.model, self.processor, self.think = model, processor, think
        self.last_timings = Timings()
        self._encoder_seconds = 0.0
        self._encoder_started = 0.0
        # The encoder runs inside generate; hooks time it without changing how it is called.
        model.audio_tower.register_forward_pre_hook(self._encoder_begins)
        model.audio_tower.register_forward_hook(self._encoder_ends)

    # ---- chat ------------------------------------------------------------------------------------------
    def chat(
        self,
        messages_or_question: str | list[dict],
        audio: Any = None,
        think: bool | None = None,
        stream: bool = False,
        refuse_long_audio: bool = False,
        **generation_kwargs,
    ) -> str | Iterator[str]:
        """The model's answer to a question about `audio`, or to a whole conversation.

        messages_or_question: a question (str), or a list of messages in the processor's format (audio
        then goes inside the messages). audio: a source (path, URL, bytes, array at 16 kHz) or a list of
        them. think: append AF-Think's request to the last user message (default: as loaded). stream: return
        an iterator of text pieces as they are generated. generation_kwargs: generate()'s settings
        (max_new_tokens defaults to 1024; sampling settings to the checkpoint's generation_config.json).
        """
        conversation = build_conversation(messages_or_question, audio)
        if self.think if think is None else think:
            add_think_request(conversation)
        conversation = load_conversation_audio(conversation, refuse_long_audio)
        started = time.perf_counter()
        inputs = self.processor.apply_chat_template(conversation)
        features = time.perf_counter() - started
        generation_kwargs.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        prompt_length = inputs["input_ids"].shape[1]
        if not stream:
            ids = self._generate(inputs, features, None, generation_kwargs)
            return self.processor.decode(ids[0, prompt_length:], skip_special_tokens=True)
        streamer = TextIteratorStreamer(self.processor, skip_prompt=True)

        def run() -> None:
            try:
                self._generate(inputs, features, streamer, generation_kwargs)
            except BaseException as error:
                # generate reports errors to the streamer only once it has started; settings it refuses
                # up front would otherwise leave the consumer waiting forever. The consumer re-raises it.
                streamer.fail(error)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        return _drain(streamer, worker)

    # ---- transcribe ------------------------------------------------------------------------------------
    def transcribe(
        self,
        audio_or_list: Any,
        prompt: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: bool | None = False,
        **generation_kwargs,
    ) -> Transcription | list[Transcription]:
        """Transcripts of one audio (a Transcription) or of a list of them (a list), of any length.

        Audio over 600 s is split at the quietest point near each 10-minute mark (segments.py); all segments
        of all inputs run `batch_size` at a time. Decoding is greedy unless do_sample=True is passed, so a
        transcript does not change from run to run. progress: a tqdm bar over segments on stderr (None: only
        when there is more than one segment).
        """
        from tqdm import tqdm

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r}: expected a positive integer")
        is_list = isinstance(audio_or_list, list | tuple)
        sources = list(audio_or_list) if is_list else [audio_or_list]
        if not sources:
            raise InputError("transcribe: no audio given")
        generation_kwargs.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        generation_kwargs.setdefault("do_sample", False)
        work = []  # (input index, start sample, end sample, waveform)
        for i, source in enumerate(sources):
            waveform = read_audio(source, f"audio {i}" if is_list else "audio")
            work += [(i, start, end, waveform) for start, end in segment_bounds(waveform)]
        # Longest first, so each batch holds segments of similar length and pads little; results go back
        # to their places below (a row's output does not depend on its batch mates).
        order = sorted(range(len(work)), key=lambda j: work[j][1] - work[j][2])
        texts = [""] * len(work)
        totals = Timings()
        show = progress or (progress is None and len(work) > 1)
        with tqdm(total=len(work), unit="segment", desc="transcribing", disable=not show) as bar:
            for b in range(0, len(order), batch_size):
                batch = order[b : b + batch_size]
                started = time.perf_counter()
                clips = [work[j][3][work[j][1] : work[j][2]] for j in batch]
                inputs = self.processor.apply_transcription_request(clips, prompt)
                ids = self._generate(inputs, time.perf_counter() - started, None, generation_kwargs)
                new = ids[:, inputs["input_ids"].shape[1] :]
                decoded = self.processor.decode(new, skip_special_tokens=True, strip_prefix=True)
                for j, text in zip(batch, decoded, strict=True):
                    texts[j] = text
                totals += self.last_timings
                bar.update(len(batch))
        self.last_timings = totals
        results = [Transcription(text="", segments=[]) for _ in sources]
        for (i, start, end, _), text in zip(work, texts, strict=True):
            results[i].segments.append(Segment(to_seconds(start), to_seconds(end), text.strip()))
        for result in results:
            result.text = join_texts([s.text for s in result.segments])
        return results if is_list else results[0]

    # ---- internals -------------------------------------------------------------------------------------
    def _generate(self, inputs, features_seconds: float, streamer, generation_kwargs: dict) -> torch.Tensor:
        clock = _StageClock(streamer)
        self._encoder_seconds = 0.0
        ids = self.model.generate(**inputs.to(self.model.device), streamer=clock, **generation_kwargs)
        end = time.perf_counter()
        batch, prompt = clock.prompt_shape
        first = clock.first or end
        self.last_timings = Timings(
            features=features_seconds,
            encoder=self._encoder_seconds,
            prefill=max(first - clock.start - self._encoder_seconds, 0.0),
            decode=end - first,
            prompt_tokens=batch * prompt,
            new_tokens=batch * clock.steps,
            decode_tokens=batch * max(clock.steps - 1, 0),
        )
        return ids

    def _encoder_begins(self, module, args) -> None:
        self._sync()
        self._encoder_started = time.perf_counter()

    def _encoder_ends(self, module, args, output) -> None:
        self._sync()
        self._encoder_seconds += time.perf_counter() - self._encoder_started

    def _sync(self) -> None:
        if self.model.device.type == "cuda":  # CUDA runs asynchronously: time the work, not its launch
            torch.cuda.synchronize(self.model.device)


def _drain(streamer: TextIteratorStreamer, worker: threading.Thread) -> Iterator[str]:
    """Yield the streamer's pieces, then wait for the generating thread (its errors come through too)."""
    try:
        yield from streamer
    finally:
        worker.join()
