"""minaf3.load(...) -> Pipeline: chat, streaming, think, long-audio policy, transcribe, errors (pipeline.py).

Each pipeline result is compared with the same work done by hand through the public processor and model
APIs, so the tests check the glue (conversation building, think request, segment batching, decoding).
"""

import logging
import shutil

import numpy as np
import pytest
import torch

import minaf3
from minaf3.conversation import THINK_SUFFIX
from minaf3.demo import CLIP_NAME
from minaf3.errors import AudioFileError, CheckpointError, ConfigError, InputError
from minaf3.windows import MAX_AUDIO_SAMPLES, SAMPLING_RATE

GREEDY = {"do_sample": False, "max_new_tokens": 12}


def by_hand(pipe, conversation, strip_prefix=False, **generation):
    """What the pipeline should give: processor -> generate -> decode of the new tokens."""
    inputs = pipe.processor.apply_chat_template(conversation)
    ids = pipe.model.generate(**inputs, **{**GREEDY, **generation})
    new = ids[:, inputs["input_ids"].shape[1] :]
    return pipe.processor.decode(new, skip_special_tokens=True, strip_prefix=strip_prefix)


def user_turn(clip, text):
    return [{"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def clip(demo_checkpoint):
    return minaf3.load_audio(demo_checkpoint / CLIP_NAME)


def test_chat_equals_processor_and_generate(demo_pipeline, demo_checkpoint, clip):
    answer = demo_pipeline.chat("What is in this audio?", audio=demo_checkpoint / CLIP_NAME, **GREEDY)
    assert answer == by_hand(demo_pipeline, user_turn(clip, "What is in this audio?"))[0]
    t = demo_pipeline.last_timings
    assert t.features > 0 and t.encoder > 0 and t.prefill > 0 and 1 <= t.new_tokens <= 12
    assert (
        t.prompt_tokens
        == demo_pipeline.processor.apply_chat_template(user_turn(clip, "What is in this audio?"))[
            "input_ids"
        ].numel()
    )


def test_stream_pieces_join_to_the_answer(demo_pipeline, clip):
    pieces = list(demo_pipeline.chat("Describe the sound.", audio=clip, stream=True, **GREEDY))
    assert len(pieces) > 1
    assert "".join(pieces) == demo_pipeline.chat("Describe the sound.", audio=clip, **GREEDY)


def test_stream_reports_errors_to_the_consumer(demo_pipeline, clip):
    stream = demo_pipeline.chat("Describe.", audio=clip, stream=True, max_new_tokens=0)
    with pytest.raises(minaf3.GenerationError, match="max_new_tokens"):
        list(stream)


def test_messages_multi_turn_and_text_only(demo_pipeline, clip):
    messages = user_turn(clip, "What is it?") + [
        {"role": "assistant", "content": "A sound."},
        {"role": "user", "content": "Say more."},
    ]
    assert demo_pipeline.chat(messages, **GREEDY) == by_hand(demo_pipeline, messages)[0]
    assert (
        demo_pipeline.chat("Hello there.", **GREEDY)
        == by_hand(demo_pipeline, [{"role": "user", "content": [{"type": "text", "text": "Hello there."}]}])[
            0
        ]
    )


def test_think_appends_the_request(demo_pipeline, clip):
    answer = demo_pipeline.chat("What is it?", audio=clip, think=True, **GREEDY)
    assert answer == by_hand(demo_pipeline, user_turn(clip, f"What is it? {THINK_SUFFIX}"))[0]


def test_load_think_sets_the_default_and_warns_without_adapter(demo_checkpoint, clip, caplog):
    with caplog.at_level(logging.WARNING, logger="minaf3"):
        pipe = minaf3.load(demo_checkpoint, think=True)
    assert "think/" in caplog.text
    expected = by_hand(pipe, user_turn(clip, f"Why? {THINK_SUFFIX}"))[0]
    assert pipe.chat("Why?", audio=clip, **GREEDY) == expected
    assert pipe.chat("Why?", audio=clip, think=False, **GREEDY) == by_hand(pipe, user_turn(clip, "Why?"))[0]


class Stop(Exception):
    """Raised in place of the processor to stop a chat once its conversation is built."""


@pytest.fixture
def prompt_audio(demo_pipeline, monkeypatch):
    """chat() raises Stop instead of encoding; the returned function gives the audio it would have read.

    Long-audio tests need only the prompt: a real 600 s prefill takes tens of seconds on 2 cores.
    """
    seen = []

    def capture(conversation, **kwargs):
        seen.append(conversation)
        raise Stop

    monkeypatch.setattr(demo_pipeline.processor, "apply_chat_template", capture)

    def run(audio, **chat_kwargs):
        with pytest.raises(Stop):
            demo_pipeline.chat("Summarise.", audio=audio, **chat_kwargs)
        (part,) = [p for p in seen.pop()[0]["content"] if p["type"] == "audio"]
        return part["audio"]

    return run


def test_load_think_applies_the_adapter(demo_checkpoint, tmp_path, clip):
    """With a think/ folder (a PEFT LoRA adapter made here), the loaded model computes what peft computes."""
    import peft
    from transformers import AudioFlamingo3ForConditionalGeneration as Reference

    folder = shutil.copytree(demo_checkpoint, tmp_path / "with_think")
    reference = Reference.from_pretrained(folder, dtype=torch.float32).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    with_adapter = peft.get_peft_model(reference, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in with_adapter.named_parameters():
            if "lora_" in name:  # peft starts B at zero (a no-op adapter) and A from the global RNG
                p.normal_(0.0, 0.3, generator=generator)
    with_adapter.save_pretrained(folder / "think")
    pipe = minaf3.load(folder, think=True)
    inputs = pipe.processor.apply_chat_template(user_turn(clip, f"Why? {THINK_SUFFIX}"))
    with torch.no_grad():
        expected = with_adapter.eval()(**inputs).logits
        base = minaf3.load(folder).model(**inputs).logits
        got = pipe.model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - base).abs().max() > 1e-2  # the adapter changes the model


def test_chat_cuts_long_audio_with_a_warning(prompt_audio, caplog):
    audio = np.random.default_rng(0).standard_normal(MAX_AUDIO_SAMPLES + SAMPLING_RATE).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="minaf3"):
        read = prompt_audio(audio)
    assert "601.0 s" in caplog.text and "first 600 s" in caplog.text
    np.testing.assert_array_equal(read, audio[:MAX_AUDIO_SAMPLES])


def test_chat_refuses_long_audio_when_asked(prompt_audio, demo_pipeline, caplog):
    with pytest.raises(InputError, match="message 0, part 0: audio is 600.0 s long"):
        demo_pipeline.chat(
            "Summarise.", audio=np.zeros(MAX_AUDIO_SAMPLES + 1, dtype=np.float32), refuse_long_audio=True
        )
    audio = np.ones(MAX_AUDIO_SAMPLES, dtype=np.float32) * 0.1  # exactly 600 s: read whole, no warning
    with caplog.at_level(logging.WARNING, logger="minaf3"):
        np.testing.assert_array_equal(prompt_audio(audio, refuse_long_audio=True), audio)
    assert caplog.text == ""


def test_transcribe_one_and_many(demo_pipeline, clip):
    clips = [clip, clip[: 2 * SAMPLING_RATE], np.concatenate([clip, clip])]
    one = demo_pipeline.transcribe(clip, max_new_tokens=6)
    inputs = demo_pipeline.processor.apply_transcription_request([clip])
    ids = demo_pipeline.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = demo_pipeline.processor.decode(ids[:, inputs["input_ids"].shape[1] :], strip_prefix=True)[0]
    assert one.text == expected.strip()
    assert [(s.start, s.end) for s in one.segments] == [(0.0, len(clip) / SAMPLING_RATE)]
    # Batched (2 at a time, different lengths, left-padded) gives what each clip gives alone.
    many = demo_pipeline.transcribe(clips, batch_size=2, max_new_tokens=6)
    alone = [demo_pipeline.transcribe(c, max_new_tokens=6) for c in clips]
    assert [m.text for m in many] == [a.text for a in alone]
    assert [m.duration for m in many] == [len(c) / SAMPLING_RATE for c in clips]


def test_transcribe_custom_prompt(demo_pipeline, clip):
    got = demo_pipeline.transcribe([clip], prompt="Write down what is said.", max_new_tokens=6)[0]
    inputs = demo_pipeline.processor.apply_transcription_request([clip], prompt="Write down what is said.")
    ids = demo_pipeline.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert (
        got.text
        == demo_pipeline.processor.decode(ids[0, inputs["input_ids"].shape[1] :], strip_prefix=True).strip()
    )


def test_missing_folder(tmp_path):
    with pytest.raises(
        CheckpointError, match="no such model folder.*huggingface-cli download nvidia/audio-flamingo-3-hf"
    ):
        minaf3.load(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "missing", ["tokenizer.json", "config.json", "model.safetensors", "processor_config.json"]
)
def test_incomplete_folder_names_the_file(demo_checkpoint, tmp_path, missing):
    folder = shutil.copytree(demo_checkpoint, tmp_path / "partial")
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=rf"missing .*{missing}.*huggingface-cli download"):
        minaf3.load(folder)


def test_damaged_weights_are_reported_with_the_hint(demo_checkpoint, tmp_path):
    folder = shutil.copytree(demo_checkpoint, tmp_path / "damaged")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"(?s)model.safetensors.*huggingface-cli download"):
        minaf3.load(folder)


def test_bad_arguments(demo_pipeline, demo_checkpoint, clip, tmp_path):
    with pytest.raises(ConfigError, match="quantize='int3'"):
        minaf3.load(demo_checkpoint, quantize="int3")
    with pytest.raises(InputError, match="inside them"):
        demo_pipeline.chat(user_turn(clip, "Hi"), audio=clip)
    with pytest.raises(InputError, match="non-empty list"):
        demo_pipeline.chat([])
    with pytest.raises(AudioFileError, match=r"message 0, part 0: .*missing.wav"):
        demo_pipeline.chat("Hi", audio=tmp_path / "missing.wav")
    with pytest.raises(AudioFileError, match=r"audio 1: .*missing.wav"):
        demo_pipeline.transcribe([clip, tmp_path / "missing.wav"])
    with pytest.raises(InputError, match="no audio"):
        demo_pipeline.transcribe([])
    with pytest.raises(ConfigError, match="batch_size=0"):
        demo_pipeline.transcribe(clip, batch_size=0)
    with pytest.raises(minaf3.AudioError, match="NaN"):
        demo_pipeline.transcribe(np.full(16000, np.nan, dtype=np.float32))


def test_generation_settings_pass_through(demo_pipeline, clip):
    seeded = [
        demo_pipeline.chat("Hi", audio=clip, max_new_tokens=8, generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    with pytest.raises(minaf3.GenerationError, match="top_p"):
        demo_pipeline.chat("Hi", audio=clip, top_p=2.0)
