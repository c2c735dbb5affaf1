"""Reliability: long runs keep memory flat, threads share one pipeline, limits are refused up
front, corrupt audio is an AudioError.

Broken checkpoints and config.json values are in test_broken_checkpoints.py; hostile inputs to the
processor and the pipeline are fuzzed in test_fuzz.py; batch invariance, stopping and the model-level
limits and threads are in test_generate.py; file-by-file damage in test_weights.py.
"""

import gc
import io
import resource
import threading

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SR, speech_like

import minaf3
from minaf3 import AudioFlamingo3ForConditionalGeneration, AutoProcessor
from minaf3.errors import AudioError, GenerationError, InputError

JOIN_SECONDS = 120  # a thread still running after this long is a hang, reported instead of waited for


# ---- limits, at the pipeline ----------------------------------------------------------------------------
@pytest.fixture
def compute_calls(demo_pipeline) -> list:
    """Names of the model parts that ran (encoder, decoder), recorded by forward pre-hooks."""
    calls = []
    model = demo_pipeline.model
    hooks = [
        part.register_forward_pre_hook(lambda module, args, name=name: calls.append(name))
        for name, part in (("encoder", model.audio_tower), ("decoder", model.language_model))
    ]
    yield calls
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("stream", [False, True])
def test_chat_refuses_prompt_plus_max_new_tokens_beyond_the_context_up_front(
    demo_pipeline, compute_calls, stream
):
    clip = speech_like(SR, SR)
    conversation = [
        {"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": "Hi"}]}
    ]
    prompt = demo_pipeline.processor.apply_chat_template(conversation)["input_ids"].shape[1]
    context = demo_pipeline.model.config.decoder.max_position_embeddings
    with pytest.raises(GenerationError) as error:
        answer = demo_pipeline.chat("Hi", audio=clip, max_new_tokens=context - prompt + 1, stream=stream)
        list(answer) if stream else None
    for number in (prompt, context - prompt + 1, context + 1, context):
        assert str(number) in str(error.value)
    assert compute_calls == [] and demo_pipeline.model.language_model.cache_shape is None
    # At exactly the context it is accepted; every id as eos stops it after one token.
    every_id = list(range(demo_pipeline.model.config.decoder.vocab_size))
    demo_pipeline.chat("Hi", audio=clip, max_new_tokens=context - prompt, eos_token_id=every_id)
    assert demo_pipeline.last_timings.new_tokens == 1


def test_transcribe_and_long_prompts_are_refused_up_front(demo_pipeline, compute_calls):
    context = demo_pipeline.model.config.decoder.max_position_embeddings
    with pytest.raises(GenerationError, match=f"exceeds the model's context of {context} positions"):
        demo_pipeline.transcribe(speech_like(SR, SR), max_new_tokens=context)
    with pytest.raises(
        InputError,
        match=r"conversation 0: the prompt is \d+,\d{3} tokens \(0 of them audio\), over the limit",
    ):
        demo_pipeline.chat("word " * 20_000, max_new_tokens=1)
    assert compute_calls == []


# ---- long-running use -----------------------------------------------------------------------------------
def resident_bytes() -> int:
    """Resident set size now (/proc/self/statm counts pages); ru_maxrss would only give the peak."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


@pytest.fixture
def one_torch_thread():
    """Tiny ops spend most of their time in intra-op thread barriers on a busy machine; one thread makes
    the 220 calls below ~10x faster and changes nothing about memory."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_200_generate_calls_keep_resident_memory_flat(tiny_checkpoint, one_torch_thread):
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    audio = {"type": "audio", "audio": speech_like(SR // 2, SR)}
    batch = processor.apply_chat_template(
        [
            [{"role": "user", "content": [audio, {"type": "text", "text": "What is in this audio?"}]}],
            [{"role": "user", "content": "Is this music happy or sad?"}],
        ]
    )

    every_id = list(range(model.config.decoder.vocab_size))

    def run(calls: int) -> None:
        for i in range(calls):
            if i % 2:
                # A KV cache of 2,000-4,000 slots (~4-8 MB: a leak of it would show at once), stopped at once.
                model.generate(**batch, max_new_tokens=2000 * (1 + i % 4 // 2), eos_token_id=every_id)
            else:  # a few decode steps, sampled
                model.generate(**batch, max_new_tokens=4, generator=torch.Generator().manual_seed(i))

    run(20)  # warm-up: allocator pools, lazily built tables
    gc.collect()
    baseline = resident_bytes()
    samples = []
    for _ in range(4):
        run(50)
        gc.collect()
        samples.append(resident_bytes())
    assert max(samples) <= 1.05 * baseline, [f"{s / 2**20:.1f} MiB" for s in [baseline, *samples]]
    assert model.language_model.cache_shape is None


# ---- one pipeline, several threads ------------------------------------------------------------------------
def chat_in_threads(pipe, questions: list, clips: list, stream: bool, **generation) -> list:
    """Each (question, clip) asked from its own thread, all released at once; the answers in order."""
    answers = [None] * len(questions)
    start = threading.Barrier(len(questions))

    def work(i: int) -> None:
        start.wait()
        answer = pipe.chat(questions[i], audio=clips[i], stream=stream, **generation)
        answers[i] = "".join(answer) if stream else answer

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_SECONDS)
    assert not any(thread.is_alive() for thread in threads), "a chat call hung"
    return answers


def test_concurrent_chats_equal_sequential_chats(demo_pipeline):
    """generate serialises the shared KV cache; everything around it (features, encoder, decoding the
    answer, streaming) runs in the callers' threads and must not mix their results."""
    clips = [speech_like(n, SR, seed) for seed, n in enumerate((SR, SR // 2, 3 * SR, 3000))]
    questions = ["What is in this audio?", "Describe.", "Transcribe the input speech.", "Is it music?"]
    greedy = {"max_new_tokens": 8, "do_sample": False}
    sequential = [demo_pipeline.chat(q, audio=c, **greedy) for q, c in zip(questions, clips, strict=True)]
    for stream in (False, True, False):
        assert chat_in_threads(demo_pipeline, questions, clips, stream, **greedy) == sequential, stream


# ---- corrupt or impossible audio ------------------------------------------------------------------------
def header_lie(ext: str) -> bytes:
    """A 1 s stereo file whose header announces ~10^11 frames (a corrupt download): reading all the frames
    the header announces up front would be a MemoryError."""
    buffer = io.BytesIO()
    clip = speech_like(SR, SR)
    sf.write(buffer, np.stack([clip, clip], 1), SR, format=ext.upper())
    data = bytearray(buffer.getvalue())
    # MP3: the top byte of the Xing header's frame count; FLAC: the top bits of STREAMINFO's total samples.
    data[data.find(b"Xing") + 8 if ext == "mp3" else 21] |= 0x7F if ext == "mp3" else 0x0F
    return bytes(data)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(
            lambda: minaf3.load_audio(header_lie("mp3")),
            r"^<\d+ bytes>: decoded \d+ of the \d{12,} frames its header announces",
            id="mp3 frame count",
        ),
        pytest.param(lambda: minaf3.load_audio(header_lie("flac")), r"^<\d+ bytes>: ", id="flac frame count"),
        pytest.param(
            lambda: minaf3.load_audio(torch.empty(8, device="meta")),
            r"^Tensor of shape \(8,\): is a meta tensor",
            id="meta tensor",
        ),
        pytest.param(
            lambda: minaf3.log_mel_spectrogram(np.full(1600, 1e30, np.float32)),
            r"^audio sample 0 is 1e\+30: samples this large overflow",
            id="huge samples",
        ),
    ],
)
def test_corrupt_or_impossible_audio_is_an_audio_error(call, message):
    with pytest.raises(AudioError, match=message):
        call()


def test_huge_samples_are_refused_naming_the_part_and_the_sample(tiny_checkpoint):
    """Finite samples so large that their power overflows float32 (the reference's features are NaN):
    the processor names the clip, the sample's offset in it and the problem, not NaN or Inf."""
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    clip = speech_like(SR + 30 * SR, SR)  # two windows: the offset is counted from the clip's start
    clip[30 * SR + 7] = -1e30
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "audio", "audio": clip}]}
    ]
    with pytest.raises(
        AudioError, match=rf"^conversation 0, message 0, part 1: sample {30 * SR + 7} is -1e\+30: "
    ):
        processor.apply_chat_template(conversation)
    with pytest.raises(
        AudioError, match=rf"^sample 1, audio 0: sample {30 * SR + 7} is -1e\+30: .*\[-1, 1\]"
    ):
        processor(["a", "b"], [speech_like(SR, SR), clip])
