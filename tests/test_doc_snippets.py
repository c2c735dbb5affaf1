"""Every usage snippet of transformers' AF3 documentation runs on minaf3 with only the import line, the model
id and the audio paths changed (the snippets name hub URLs; these tests write local files instead).

The snippets are kept as text, word for word, and executed: if minaf3's API drifts from the reference's, the
text stops running.
"""

import numpy as np
import pytest
import soundfile as sf
from conftest import SR, run_snippet, speech_like

IMPORT = "from minaf3 import AudioFlamingo3ForConditionalGeneration, AutoProcessor\n"

AUDIO_TEXT = """
conversation = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Transcribe the input speech."},
            {"type": "audio", "path": SPEECH_MP3},
        ],
    }
]
"""

MULTI_TURN = """
conversation = [
    {
        "role": "user",
        "content": [
            {
                "type": "text",
                "text": "Instruction: How does the tone of female speech change throughout the audio? Choose the correct option among the options below: (A) Sad to happy (B) Happy to sad (C) Neutral to happy (D) Happy to neutral.",
            },
            {"type": "audio", "path": LONG_WAV},
        ],
    },
    {
        "role": "assistant",
        "content": [{"type": "text", "text": "(A) Sad to happy"}],
    },
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Why do you think so?"},
        ],
    },
]
"""

TEXT_ONLY = """
conversation = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is the capital of France?"},
        ],
    }
]
"""

AUDIO_ONLY = """
conversation = [
    {
        "role": "user",
        "content": [
            {"type": "audio", "path": SPEECH_MP3},
        ],
    }
]
"""

BATCHED = """
conversation = [
    [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Transcribe the input speech."},
                {
                    "type": "audio",
                    "path": LONG_WAV,
                },
            ],
        }
    ],
    [
        {
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": "This track feels really peaceful and introspective. What elements make it feel so calming and meditative?",
                },
                {"type": "audio", "path": MUSIC_MP3},
            ],
        }
    ],
]
"""

# The documentation's generate-and-decode tail, shared by the five chat snippets.
GENERATE = """
batch = processor.apply_chat_template(
    conversation,
    tokenize=True,
    add_generation_prompt=True,
    return_dict=True,
).to(model.device)

gen_ids = model.generate(**batch)

inp_len = batch["input_ids"].shape[1]
new_tokens = gen_ids[:, inp_len:]
texts = processor.batch_decode(new_tokens, skip_special_tokens=True)
print(texts)
"""

LOAD = """
processor = AutoProcessor.from_pretrained(MODEL_ID)
model = AudioFlamingo3ForConditionalGeneration.from_pretrained(MODEL_ID, device_map="auto")
"""

TRANSCRIPTION_SHORTCUT = """
inputs = processor.apply_transcription_request(audio=LONG_WAV).to(model.device)

generated = model.generate(**inputs)
transcription = processor.batch_decode(generated[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)

print(transcription[0])
"""

SINGLE_TURN_PROMPTS = """
prompt = "Describe the melody in detail."
inputs = processor(text=prompt, audio=audio_array)
prompt = "<sound>\\nDescribe the audio in detail."
inputs = processor(text=prompt, audio=audio_array)
inputs = processor.apply_transcription_request(audio=audio_array)
"""

TRAINING = """
conversation = [
    [
        {"role": "user", "content": [{"type": "text", "text": "Transcribe the input speech."},
                                     {"type": "audio", "path": SPEECH_MP3}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The spoken content of the audio is hello."}]},
    ],
    [
        {"role": "user", "content": [{"type": "text", "text": "What is in this audio?"},
                                     {"type": "audio", "path": MUSIC_MP3}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A dog barks while music plays."}]},
    ],
]
model.train()
batch = processor.apply_chat_template(
    conversation, tokenize=True, add_generation_prompt=False, return_dict=True, output_labels=True
).to(model.device)
loss = model(**batch).loss
loss.backward()
print(loss.item())
"""


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("doc_audio")
    files = {
        "SPEECH_MP3": (folder / "speech.mp3", speech_like(10 * SR, SR, seed=1)),
        "LONG_WAV": (folder / "long.wav", speech_like(45 * SR, SR, seed=2)),
        "MUSIC_MP3": (folder / "music.mp3", 0.3 * np.sin(2 * np.pi * 440 * np.arange(8 * SR) / SR)),
    }
    for path, audio in files.values():
        sf.write(path, audio.astype(np.float32), SR)
    return {name: str(path) for name, (path, _) in files.items()}


@pytest.mark.parametrize(
    "conversation",
    [AUDIO_TEXT, MULTI_TURN, TEXT_ONLY, AUDIO_ONLY, BATCHED],
    ids=lambda c: c.split('"')[5][:12],
)
def test_chat_snippets(tiny_checkpoint, audio_files, conversation):
    namespace = {"MODEL_ID": str(tiny_checkpoint), **audio_files}
    printed = run_snippet(IMPORT + LOAD + conversation + GENERATE, namespace)
    texts = namespace["texts"]
    assert isinstance(texts, list) and all(isinstance(t, str) for t in texts)
    assert len(texts) == (2 if conversation is BATCHED else 1)
    assert printed.strip() == str(texts)
    assert namespace["new_tokens"].shape[1] >= 1


def test_transcription_shortcut_and_prompt_forms(tiny_checkpoint, audio_files):
    namespace = {"MODEL_ID": str(tiny_checkpoint), "audio_array": speech_like(3 * SR), **audio_files}
    printed = run_snippet(IMPORT + LOAD + TRANSCRIPTION_SHORTCUT + SINGLE_TURN_PROMPTS, namespace)
    assert printed.strip() == namespace["transcription"][0].strip()


def test_training_snippet(tiny_checkpoint, audio_files):
    namespace = {"MODEL_ID": str(tiny_checkpoint), **audio_files}
    run_snippet(IMPORT + LOAD + TRAINING, namespace)
    model = namespace["model"]
    assert np.isfinite(namespace["loss"].item())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
