"""AudioFlamingo3Processor against transformers' on the tiny checkpoint: ids, masks, labels and features.

Audio lengths are picked to cover the window math: a short clip, a full window, several windows, and a tail
of 2 mel frames that adds a window but no tokens.
"""

import logging

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import speech_like
from hypothesis import given
from hypothesis import strategies as st

from minaf3 import windows
from minaf3.chat_template import render
from minaf3.errors import AudioError, AudioFileError, ConfigError, InputError
from minaf3.processor import AudioFlamingo3Processor, AutoProcessor, strip_transcription_prefix

SR = 16000
SHORT = speech_like(SR * 3 // 2, seed=1)  # 1.5 s: one window, 37 tokens
LONG = speech_like(SR * 65, seed=2)  # 65 s: three windows, the last one 5 s
FULL = speech_like(windows.WINDOW_SAMPLES, seed=3)  # exactly one window: 750 tokens
TAIL = speech_like(windows.WINDOW_SAMPLES + 320, seed=4)  # 2 mel frames past a window: 2 windows, 750 tokens


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return AudioFlamingo3Processor.from_pretrained(tiny_checkpoint)


def user(*parts, role="user"):
    return {
        "role": role,
        "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts],
    }


def clip(audio):
    return {"type": "audio", "audio": audio}


def assert_same(ours, ref):
    """The reference's outputs: ids, masks and labels exactly, features within 1e-4."""
    assert set(ours) == set(ref)
    for key in ("input_ids", "attention_mask", "labels"):
        if key in ref:
            assert ours[key].dtype == torch.int64 and torch.equal(ours[key], ref[key]), key
    if "input_features" in ref:
        assert ours["input_features"].dtype == torch.float32
        assert ours["input_features"].shape == ref["input_features"].shape
        torch.testing.assert_close(ours["input_features"], ref["input_features"], atol=1e-4, rtol=0)
        assert ours["input_features_mask"].dtype == torch.int32
        assert torch.equal(ours["input_features_mask"], ref["input_features_mask"].to(torch.int32))


CONVERSATIONS = {
    "single": [[user(clip(SHORT), "What is in this audio?")]],
    "audio_only": [[user(clip(FULL))]],
    "text_only": [[user("Describe a dog barking.")]],
    "system": [[{"role": "system", "content": "You are terse."}, user("Transcribe.", clip(TAIL))]],
    "multi_turn": [
        [
            user(clip(LONG), "Which instruments can you hear?"),
            {"role": "assistant", "content": "A piano and <|endoftext|> drums."},
            user("Is it happy or sad?"),
        ]
    ],
    "batched": [
        [user(clip(LONG), "Describe the sound in detail.")],
        [user("Transcribe the input speech.", clip(SHORT))],
        [{"role": "system", "content": "Be brief."}, user(clip(TAIL), "Happy?")],
    ],
    "batched_text_only": [[user("Hello")], [user("A longer question about the sound?")]],
}


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_apply_chat_template_matches_reference(processor, reference_processor, name, padding_side):
    conversations = CONVERSATIONS[name]
    ours = processor.apply_chat_template(conversations, output_labels=True, padding_side=padding_side)
    ref = reference_processor.apply_chat_template(
        conversations,
        tokenize=True,
        add_generation_prompt=True,
        return_dict=True,
        processor_kwargs={"output_labels": True, "padding_side": padding_side},
    )
    assert_same(ours, ref)
    ids = processor.apply_chat_template(conversations, return_dict=False, padding_side=padding_side)
    assert torch.equal(ids, ref["input_ids"])


def test_untokenized_prompts_match_reference(processor, reference_processor):
    for conversations in (CONVERSATIONS["batched"], CONVERSATIONS["multi_turn"][0]):
        for add in (True, False):
            expected = reference_processor.apply_chat_template(
                conversations, tokenize=False, add_generation_prompt=add
            )
            assert (
                processor.apply_chat_template(conversations, tokenize=False, add_generation_prompt=add)
                == expected
            )


def test_audio_from_a_file(processor, reference_processor, tmp_path):
    path = tmp_path / "clip.wav"
    sf.write(path, speech_like(22050 * 2, 22050, seed=5), 22050)  # resampled to 16 kHz on load
    conversation = [user({"type": "audio", "path": str(path)}, "What is this?")]
    ref = reference_processor.apply_chat_template(
        conversation, tokenize=True, add_generation_prompt=True, return_dict=True
    )
    assert_same(processor.apply_chat_template(conversation), ref)


def test_mixed_batch_equals_its_samples(processor):
    """The reference refuses a batch mixing audio and text-only samples; rows equal their sample alone."""
    audio_conv, text_conv = [user(clip(SHORT), "What?")], [user("Only text here, and longer.")]
    batch = processor.apply_chat_template([audio_conv, text_conv], output_labels=True)
    alone = [processor.apply_chat_template(c, output_labels=True) for c in (audio_conv, text_conv)]
    for row, single in enumerate(alone):
        keep = batch["attention_mask"][row].bool()
        assert torch.equal(batch["input_ids"][row][keep], single["input_ids"][0])
        assert torch.equal(batch["labels"][row][keep], single["labels"][0])
    assert torch.equal(batch["input_features"], alone[0]["input_features"])
    assert "input_features" not in alone[1]


# --- __call__: the three prompt forms -------------------------------------------------------------------

PROMPT = "<|im_start|>user\n<sound>Describe the audio.<|im_end|>\n<|im_start|>assistant\n"


def test_call_in_place_matches_reference(processor, reference_processor):
    prompts = [PROMPT, PROMPT.replace("Describe the audio.", "Is it music?")]
    ours = processor(prompts, [LONG, SHORT], output_labels=True)
    assert_same(ours, reference_processor(text=prompts, audio=[LONG, SHORT], output_labels=True))


def test_call_without_placeholder_prepends_audio(processor, reference_processor):
    text = PROMPT.replace("<sound>", "")
    ours = processor(text, SHORT)
    assert_same(ours, reference_processor(text="<sound>" + text, audio=[SHORT]))


def test_call_one_placeholder_per_window(processor):
    """Adjacent per-window placeholders give the in-place ids; separated ones each get their window's run."""
    adjacent = processor(PROMPT.replace("<sound>", "<sound>" * 3), LONG)
    assert torch.equal(adjacent["input_ids"], processor(PROMPT, LONG)["input_ids"])
    separated = processor("a<sound>b<sound>c<sound>d", LONG)["input_ids"][0]
    is_audio = (separated == processor.audio_token_id).int()
    runs = [len(r) for r in "".join(map(str, is_audio.tolist())).split("0") if r]
    assert runs == windows.window_token_counts(len(LONG)) == [750, 750, 125]


def test_call_mixed_batch_and_several_audios(processor):
    out = processor(["<sound> and <sound>?", "no audio here", "first"], [[SHORT, FULL], None, SHORT])
    counts = (out["input_ids"] == processor.audio_token_id).sum(-1).tolist()
    assert counts == [37 + 750, 0, 37]
    assert out["input_features"].shape == (3, 128, 3000)


def test_placeholder_window_mismatch(processor):
    with pytest.raises(
        InputError, match=r"sample 0: found 3 placeholders but audio was split into 2 window\(s\)"
    ):
        processor("<sound><sound><sound>hi", TAIL)
    with pytest.raises(InputError, match=r"sample 1: found 3 placeholders for 2 audios split into 4 window"):
        processor(["<sound>", "<sound>" * 3], [SHORT, [LONG, SHORT]])
    with pytest.raises(InputError, match=r"sample 0: found 1 '<sound>' placeholder\(s\) but no audio"):
        processor("<sound> where is it?")


@pytest.mark.parametrize(
    ("text", "audio", "match"),
    [
        (["a", "b"], [SHORT], r"got 2 prompts but 1 audio entries"),
        (["a", "b"], SHORT, r"got 2 prompts but 1 audio entries"),
        (3, None, r"text must be a string"),
        ([], None, r"text must be a string or a non-empty list"),
    ],
)
def test_call_bad_arguments(processor, text, audio, match):
    with pytest.raises(InputError, match=match):
        processor(text, audio)


def test_call_bad_audio_names_the_sample(processor):
    bad = SHORT.copy()
    bad[5] = np.nan
    with pytest.raises(AudioError, match=r"^sample 1, audio 0: .*NaN"):
        processor(["a", "b"], [SHORT, bad])
    with pytest.raises(AudioFileError, match=r"^sample 0, audio 1: .*nope.wav"):
        processor("x", [SHORT, "nope.wav"])
    with pytest.raises(InputError, match="padding_side"):
        processor("x", padding_side="middle")


# --- conversations: several audios, errors --------------------------------------------------------------


def test_several_audios_expand_at_their_own_positions_in_order(processor):
    clips = [LONG, SHORT, TAIL]
    conversation = [
        user("Compare ", clip(clips[0]), " with ", clip(clips[1]), "."),
        {"role": "assistant", "content": "They differ."},
        user("And this one? ", clip(clips[2])),
    ]
    out = processor.apply_chat_template(conversation, output_labels=True)
    ids = out["input_ids"][0]
    is_audio = ids == processor.audio_token_id
    starts = torch.nonzero(is_audio & ~torch.roll(is_audio, 1)).flatten()
    runs = [int(is_audio[s:].int().cumprod(0).sum()) for s in starts]
    assert runs == [windows.audio_token_count(len(c)) for c in clips]
    # Collapsing each run back to one placeholder gives the rendered conversation: runs sit where parts were.
    collapsed = [t for i, t in enumerate(ids.tolist()) if not (is_audio[i] and i not in starts.tolist())]
    assert processor.decode(collapsed, skip_special_tokens=False) == render(conversation)
    # Windows are in placeholder order: each clip's own features, one after the other.
    alone = [processor("x", c)["input_features"] for c in clips]
    torch.testing.assert_close(out["input_features"], torch.cat(alone), atol=1e-6, rtol=0)
    assert (out["labels"][0][is_audio] == -100).all()


def test_each_audio_embedding_lands_on_its_own_run(processor, tiny_checkpoint):
    """Through the model: the k-th placeholder run holds the k-th clip's audio embeddings, and only them."""
    from minaf3.model import AudioFlamingo3ForConditionalGeneration

    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    clips = [speech_like(SR * 2, seed=6), SHORT, speech_like(SR, seed=7)]  # 50, 37 and 25 tokens
    conversation = [
        user("A ", clip(clips[0]), " B ", clip(clips[1])),
        {"role": "assistant", "content": "ok"},
        user(clip(clips[2]), "C?"),
    ]
    inputs = processor.apply_chat_template(conversation)
    with torch.no_grad():
        embeds = model.embed_inputs(inputs.input_ids, inputs.input_features, inputs.input_features_mask)[0]
        alone = [processor("x", c) for c in clips]
        expected = [model.get_audio_features(a.input_features, a.input_features_mask) for a in alone]
    is_audio = inputs.input_ids[0] == processor.audio_token_id
    torch.testing.assert_close(embeds[is_audio], torch.cat(expected), atol=1e-5, rtol=1e-5)
    assert [len(e) for e in expected] == [50, 37, 25]


def test_conversation_errors_name_the_item(processor):
    with pytest.raises(InputError, match=r"conversation 1, message 0: unknown role 'robot'"):
        processor.apply_chat_template([[user("a")], [user("b", role="robot")]])
    with pytest.raises(InputError, match=r"conversation 0, message 0, part 1: unknown part type 'video'"):
        processor.apply_chat_template([user("a", {"type": "video", "path": "v.mp4"})])
    with pytest.raises(AudioFileError, match=r"^conversation 1, message 0, part 1: .*missing.wav"):
        processor.apply_chat_template([[user("a")], [user("b", {"type": "audio", "path": "missing.wav"})]])
    with pytest.raises(AudioError, match=r"^conversation 0, message 1, part 0: .*no audio samples"):
        processor.apply_chat_template([user("a"), user(clip(np.zeros(0, np.float32)))])
    with pytest.raises(InputError, match=r"conversation 0: its text holds '<sound>' \(1 time"):
        processor.apply_chat_template([user(clip(SHORT), "what is <sound>?")])


# --- limits ---------------------------------------------------------------------------------------------


def test_prompt_over_the_limit(processor, tiny_checkpoint):
    with pytest.raises(InputError, match=r"sample 1: the prompt is 1[0-9],[0-9]{3} tokens .*limit of 16,000"):
        processor(["short", "hello world " * 9000])
    small = AudioFlamingo3Processor.from_pretrained(tiny_checkpoint, max_prompt_tokens=40)
    with pytest.raises(InputError, match=r"conversation 0: the prompt is \d+ tokens \(37 of them audio\)"):
        small.apply_chat_template([user(clip(SHORT), "What?")])
    unlimited = AudioFlamingo3Processor.from_pretrained(tiny_checkpoint, max_prompt_tokens=None)
    assert unlimited("hello world " * 9000)["input_ids"].shape[1] > 16_000
    with pytest.raises(ConfigError, match="max_prompt_tokens must be a positive integer or None"):
        AudioFlamingo3Processor.from_pretrained(tiny_checkpoint, max_prompt_tokens=0)


def test_audio_over_max_len_is_truncated_with_a_warning(processor, caplog):
    long = np.tile(SHORT, 401)  # 601.5 s
    with caplog.at_level(logging.WARNING, logger="minaf3.processor"):
        out = processor("<sound>", long)
    assert "sample 0, audio 0: audio duration (601.5s) exceeds 600s; truncating to first 600s." in caplog.text
    assert out["input_features"].shape[0] == windows.MAX_WINDOWS
    assert int((out["input_ids"] == processor.audio_token_id).sum()) == 20 * 750


# --- transcription and decoding -------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [None, "Write down what is said.", ["One?", None]])
def test_transcription_request_matches_reference(processor, reference_processor, prompt):
    clips = [SHORT, TAIL]
    ours = processor.apply_transcription_request(clips, prompt=prompt)
    assert_same(ours, reference_processor.apply_transcription_request(clips, prompt=prompt))
    strings = processor.apply_transcription_request(clips, prompt=prompt, tokenize=False)
    assert strings == reference_processor.apply_transcription_request(clips, prompt=prompt, tokenize=False)


def test_transcription_request_errors(processor):
    with pytest.raises(InputError, match="at least one clip"):
        processor.apply_transcription_request([])
    with pytest.raises(InputError, match="list of 2"):
        processor.apply_transcription_request([SHORT, SHORT], prompt=["only one"])
    with pytest.raises(InputError, match="prompt 0 must be a string"):
        processor.apply_transcription_request([SHORT], prompt=[3])


ANSWERS = [
    'The spoken content of the audio is "hello world".',
    "The transcription of the audio is 'dog barks'.",
    "The content of the input audio is music plays.",
    "A dog barks while music plays.",
    '  "quoted only"  ',
]


@pytest.mark.parametrize("strip_prefix", [False, True])
def test_batch_decode_matches_reference(processor, reference_processor, strip_prefix):
    ids = processor.tokenizer.encode_batch(ANSWERS)
    longest = max(len(e.ids) for e in ids)
    batch = torch.tensor([[processor.pad_token_id] * (longest - len(e.ids)) + e.ids for e in ids])
    batch = torch.cat([batch, torch.full((len(ANSWERS), 1), processor.eos_token_id)], dim=1)
    expected = reference_processor.batch_decode(batch, skip_special_tokens=True, strip_prefix=strip_prefix)
    assert processor.batch_decode(batch, strip_prefix=strip_prefix) == expected
    assert processor.decode(batch[0], strip_prefix=strip_prefix) == expected[0]
    assert processor.decode(batch.numpy()) == processor.batch_decode(batch.tolist())
    assert processor.batch_decode(list(batch)) == processor.batch_decode(batch)
    assert processor.decode(int(batch[0, -2])) == processor.decode(batch[0, -2:])
    with pytest.raises(InputError, match="-100"):
        processor.decode([3, -100])


@given(
    st.lists(
        st.sampled_from(["The spoken content of the audio is", " ", '"', "'", ".", "hi", "é"]), max_size=8
    )
)
def test_strip_prefix_matches_reference(pieces):
    from transformers import AudioFlamingo3Processor as Reference

    text = "".join(pieces)
    assert strip_transcription_prefix(text) == Reference._strip_assistant_prefix_and_quotes(None, text)


def test_auto_processor_alias():
    assert AutoProcessor is AudioFlamingo3Processor


# --- labels on the assistant's answers only (training) --------------------------------------------------


def answer_ids(processor, *answers: str) -> list[int]:
    """The definition: each answer tokenized alone, followed by its turn's closing <|im_end|>."""
    im_end = processor.tokenizer.token_to_id("<|im_end|>")
    return [i for a in answers for i in [*processor.tokenizer.encode(a).ids, im_end]]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_assistant_labels_hold_the_answers_and_nothing_else(processor, padding_side):
    two_turns = [
        user("Compare ", clip(SHORT), " with ", clip(TAIL), "."),
        {"role": "assistant", "content": "They differ."},
        user("And now?"),
        {"role": "assistant", "content": [{"type": "text", "text": "Still a dog."}]},
    ]
    one_turn = [
        {"role": "system", "content": "Be brief."},
        user(clip(SHORT), "Hi"),
        {"role": "assistant", "content": "Hello"},
    ]
    out = processor.apply_chat_template(
        [two_turns, one_turn],
        add_generation_prompt=False,
        output_labels="assistant",
        padding_side=padding_side,
    )
    expected = [answer_ids(processor, "They differ.", "Still a dog."), answer_ids(processor, "Hello")]
    for ids, labels, answers in zip(out["input_ids"], out["labels"], expected, strict=True):
        learned = labels != -100
        assert labels[learned].tolist() == answers
        assert torch.equal(labels[learned], ids[learned])
    # The reference's labels (True) learn the system prompt and the questions too: a strict superset.
    everything = processor.apply_chat_template(
        [two_turns, one_turn], add_generation_prompt=False, output_labels=True, padding_side=padding_side
    )["labels"]
    answers_only = out["labels"] != -100
    assert (everything[answers_only] != -100).all() and (everything != -100).sum() > answers_only.sum()


def test_assistant_labels_from_a_raw_prompt_and_without_an_answer(processor):
    prompt = render(
        [user("Hi"), {"role": "assistant", "content": "Hello there"}], add_generation_prompt=False
    )
    out = processor(prompt, output_labels="assistant")
    assert out["labels"][0][out["labels"][0] != -100].tolist() == answer_ids(processor, "Hello there")
    asked = processor.apply_chat_template([user(clip(SHORT), "Hi")], output_labels="assistant")
    assert (asked["labels"] == -100).all()  # a generation prompt's open turn teaches nothing


def test_output_labels_must_be_a_known_mode(processor):
    with pytest.raises(InputError, match="output_labels must be False, True or 'assistant'"):
        processor.apply_chat_template([user("Hi")], output_labels="answers")
