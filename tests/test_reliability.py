"""Reliability (issue 7): broken checkpoints fail typed and before any compute, config.json values are
checked, long runs keep memory flat, threads share one pipeline, limits are refused up front.

Hostile inputs to the processor and the pipeline are fuzzed in test_fuzz.py; batch invariance, stopping and
the model-level limits and threads are in test_generate.py; file-by-file damage in test_weights.py.
"""

import copy
import gc
import io
import json
import math
import os
import re
import resource
import shutil
import threading

import minaf3.weights.loader as loader
import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SR, speech_like
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import minaf3
from minaf3 import AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration, AutoProcessor
from minaf3.decoder import Qwen2Decoder
from minaf3.encoder import WhisperEncoder
from minaf3.errors import AudioError, CheckpointError, ConfigError, GenerationError, InputError

JOIN_SECONDS = 120  # a thread still running after this long is a hang, reported instead of waited for


# ---- broken checkpoints, end to end ------------------------------------------------------------------------
# One tensor in the sharded checkpoint, under its hub name, to damage.
TENSOR = "language_model.model.layers.0.mlp.up_proj.weight"


def shard_of(folder, name: str = TENSOR):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][name]


def edit_json(folder, name: str, change) -> None:
    data = json.loads((folder / name).read_text())
    change(data)
    (folder / name).write_text(json.dumps(data))


def rewrite_tensor(folder, change) -> None:
    """Re-save TENSOR's shard with `change(tensors)` applied, as a new file renamed over the old one."""
    shard = shard_of(folder)
    tensors = {name: t.clone() for name, t in load_file(shard).items()}  # clones: the file is replaced
    change(tensors)
    save_file(tensors, folder / "new.safetensors")
    os.replace(folder / "new.safetensors", shard)


def cut_shard(folder) -> None:
    data = shard_of(folder).read_bytes()
    shard_of(folder).write_bytes(data[:-100])


def garble_header(folder) -> None:
    data = shard_of(folder).read_bytes()
    shard_of(folder).write_bytes(data[:8] + b"#" * 32 + data[40:])


def drop_index_entry(folder) -> None:
    edit_json(folder, "model.safetensors.index.json", lambda index: index["weight_map"].pop(TENSOR))


SHARD = r"model-000\d\d-of-000\d\d\.safetensors"
UP_PROJ = r"language_model.layers.0.mlp.up_proj.weight \(stored as " + re.escape(TENSOR) + r"\)"
# damage -> (change to the folder, error class, message). The model's from_pretrained and minaf3.load raise it
# (the processor does not read weights or config.json, and loads).
MODEL_SIDE = {
    "truncated shard": (cut_shard, CheckpointError, SHARD + ": truncated: the header describes"),
    "corrupt shard header": (garble_header, CheckpointError, SHARD + ": corrupt safetensors header"),
    "missing shard": (lambda f: shard_of(f).unlink(), CheckpointError, SHARD + ": missing; model"),
    "missing index entry": (
        drop_index_entry,
        CheckpointError,
        f"holds {TENSOR}, which model.safetensors.index",
    ),
    "wrong dtype": (
        lambda f: rewrite_tensor(f, lambda t: t.update({TENSOR: t[TENSOR].to(torch.int32)})),
        CheckpointError,
        UP_PROJ + ": " + SHARD + " holds I32; expected F16, BF16, F32, F64",
    ),
    "wrong shape": (
        lambda f: rewrite_tensor(f, lambda t: t.update({TENSOR: t[TENSOR][:-1].contiguous()})),
        CheckpointError,
        UP_PROJ + r": the model expects \(128, 64\), " + SHARD + r" holds \(127, 64\)",
    ),
    "config missing a field": (
        lambda f: edit_json(f, "config.json", lambda c: c["text_config"].pop("num_key_value_heads")),
        ConfigError,
        "config.json: text_config is missing required field 'num_key_value_heads'",
    ),
    "config field of the wrong type": (
        lambda f: edit_json(f, "config.json", lambda c: c["text_config"].update(num_attention_heads="4")),
        ConfigError,
        r"config.json: text_config.num_attention_heads='4' must be an integer >= 1",
    ),
}
# The same for the processor's files: AutoProcessor's from_pretrained and minaf3.load raise, the model loads.
PROCESSOR_SIDE = {
    "missing tokenizer.json": (
        lambda f: (f / "tokenizer.json").unlink(),
        CheckpointError,
        "tokenizer.json: missing|missing tokenizer.json",
    ),
    "missing tokenizer_config.json": (
        lambda f: (f / "tokenizer_config.json").unlink(),
        CheckpointError,
        "tokenizer_config.json: missing|missing tokenizer_config.json",
    ),
    "corrupt tokenizer.json": (
        lambda f: (f / "tokenizer.json").write_text('{"model": 5'),
        CheckpointError,
        "tokenizer.json: cannot be loaded by tokenizers",
    ),
    "pad token missing from the vocabulary": (
        lambda f: edit_json(f, "tokenizer_config.json", lambda c: c.update(pad_token="<|pad|>")),
        ConfigError,
        r"tokenizer_config.json: pad_token '<\|pad\|>' is not in tokenizer.json's vocabulary",
    ),
}
ENTRY_POINTS = {
    "model": AudioFlamingo3ForConditionalGeneration.from_pretrained,
    "processor": AutoProcessor.from_pretrained,
    "load": minaf3.load,
}


@pytest.fixture
def tensor_reads(monkeypatch) -> list:
    """The files the loader opens to read tensor data (headers are parsed without it); any forward fails."""
    opened = []
    real_open = loader.safe_open
    monkeypatch.setattr(
        loader, "safe_open", lambda file, *a, **k: opened.append(file) or real_open(file, *a, **k)
    )

    def no_compute(*args, **kwargs):
        raise AssertionError("a forward ran while loading a checkpoint")

    for module in (AudioFlamingo3ForConditionalGeneration, WhisperEncoder, Qwen2Decoder):
        monkeypatch.setattr(module, "forward", no_compute)
    return opened


@pytest.mark.parametrize("damage", [*MODEL_SIDE, *PROCESSOR_SIDE])
def test_broken_checkpoint_fails_clearly_before_any_tensor_is_read(
    tmp_path, tiny_checkpoint_sharded, tensor_reads, damage
):
    folder = shutil.copytree(tiny_checkpoint_sharded, tmp_path / "ckpt")
    side = "model" if damage in MODEL_SIDE else "processor"
    change, error, pattern = {**MODEL_SIDE, **PROCESSOR_SIDE}[damage]
    change(folder)
    for entry, load in ENTRY_POINTS.items():
        tensor_reads.clear()
        if entry not in (side, "load"):
            load(folder)  # the damage does not concern this entry point: it loads
            continue
        with pytest.raises(error, match=pattern):
            load(folder)
        assert tensor_reads == [], f"{entry}: tensor data was read before the error"


# config.json from another checkpoint than the processor's files: only minaf3.load holds both, and refuses.
MISMATCHES = {
    "audio token id": (
        lambda c: c.update(audio_token_id=4),
        r"config.json has audio_token_id=4 but the processor's audio token '<sound>' is id 3 in "
        r"tokenizer.json",
    ),
    "vocabulary larger than the embeddings": (
        lambda c: c["text_config"].update(vocab_size=399),
        r"tokenizer.json holds token ids up to 399 but config.json has text_config.vocab_size=399",
    ),
}


@pytest.mark.parametrize("mismatch", MISMATCHES)
def test_load_refuses_a_processor_the_model_would_misread(tmp_path, tiny_checkpoint, tensor_reads, mismatch):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    change, pattern = MISMATCHES[mismatch]
    assert AutoProcessor.from_pretrained(folder).audio_token_id == 3  # the values the patterns name
    assert max(AutoProcessor.from_pretrained(folder).tokenizer.get_vocab(True).values()) == 399
    edit_json(folder, "config.json", change)
    with pytest.raises(ConfigError, match=re.escape(str(folder)) + ": " + pattern):
        minaf3.load(folder)
    assert tensor_reads == []


# ---- config.json values ------------------------------------------------------------------------------------
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 4000),
    st.floats(-10, 5000) | st.sampled_from([math.nan, math.inf, 64.0]),  # sizes stay buildable
    st.text(max_size=4),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["rope_type", "rope_theta"]), st.integers(-1, 3) | st.text(max_size=3)),
)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), value=JSON_VALUES)
def test_any_config_value_loads_or_names_the_field(tiny_checkpoint, data, value):
    """Whatever a field holds, the config is refused naming it, or the model builds with it (no bare
    ValueError, ZeroDivisionError or negative tensor size later on)."""
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    section = data.draw(st.sampled_from(["audio_config", "text_config", None]))
    fields = config[section] if section else config
    key = data.draw(st.sampled_from(sorted(k for k in fields if not isinstance(fields[k], dict) or section)))
    changed = copy.deepcopy(config)
    (changed[section] if section else changed)[key] = value
    try:
        parsed = AudioFlamingo3Config.from_dict(changed)
    except ConfigError as e:
        named = key.split("_")[0] if key.startswith("rope") else key
        assert str(e).startswith("config.json:") and named in str(e), (key, value, str(e))
        return
    with torch.device("meta"):
        AudioFlamingo3ForConditionalGeneration(parsed)


def test_config_refuses_a_front_end_the_features_cannot_feed(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    for key, value, message in [
        ("num_mel_bins", 80, "num_mel_bins=80 is not supported"),
        ("max_source_positions", 1000, "max_source_positions=1000 is below the 1500 encoder frames"),
    ]:
        with pytest.raises(ConfigError, match=message):
            AudioFlamingo3Config.from_dict({**config, "audio_config": {**config["audio_config"], key: value}})
    with pytest.raises(ConfigError, match=r"audio_token_id=9999 is outside the vocabulary"):
        AudioFlamingo3Config.from_dict({**config, "audio_token_id": 9999})


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


def test_bad_generation_config_fails_before_any_tensor_is_read(tmp_path, tiny_checkpoint, tensor_reads):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    edit_json(folder, "generation_config.json", lambda c: c.update(top_k=-3))
    with pytest.raises(ConfigError, match="generation_config.json: top_k=-3"):
        AudioFlamingo3ForConditionalGeneration.from_pretrained(folder)
    assert tensor_reads == []
