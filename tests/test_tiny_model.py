"""The tiny AF3 that ships with minaf3 (minaf3.TINY_MODEL): a package folder both minaf3 and transformers
load, whose greedy answers are the same in both. tools/eval_tiny.py measures how often they are right."""

import json

import pytest
import torch
from conftest import run_python

import minaf3
from minaf3.tasks import TASKS, examples
from minaf3.train import MAX_ANSWER_TOKENS, TrainConfig, answer

MAX_BYTES = 10_000_000  # the limit on the shipped files
PARITY_SEED = 3  # an evaluation seed: clips the model never trained on


@pytest.fixture(scope="module")
def pipe():
    return minaf3.load(minaf3.TINY_MODEL)


def test_tiny_model_is_a_small_package_folder():
    folder = minaf3.TINY_MODEL
    assert folder.is_dir() and folder.parent.name == "minaf3"
    files = {p.name for p in folder.iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert {"processor_config.json", "chat_template.jinja", "generation_config.json"} <= files
    assert sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) <= MAX_BYTES


def test_import_minaf3_gives_the_path_without_torch():
    result = run_python("import sys, minaf3; print(minaf3.TINY_MODEL); print('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    path, torch_loaded = result.stdout.split()
    assert path == str(minaf3.TINY_MODEL) and torch_loaded == "False"


def test_defaults_are_the_shipped_recipe():
    """`minaf3 train` without options (the README's command) trains a model of the shipped sizes."""
    config = json.loads((minaf3.TINY_MODEL / "config.json").read_text())
    default = TrainConfig()
    audio, text = config["audio_config"], config["text_config"]
    assert (audio["num_hidden_layers"], audio["hidden_size"], audio["intermediate_size"]) == (
        default.audio_layers,
        default.audio_hidden,
        default.audio_intermediate,
    )
    assert (text["num_hidden_layers"], text["hidden_size"], text["intermediate_size"]) == (
        default.text_layers,
        default.text_hidden,
        default.text_intermediate,
    )
    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (
        default.text_heads,
        default.text_kv_heads,
    )


def test_transformers_gives_the_same_greedy_answers_on_50_clips(pipe):
    from transformers import AudioFlamingo3ForConditionalGeneration as Reference
    from transformers import AutoProcessor

    reference = Reference.from_pretrained(minaf3.TINY_MODEL, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(minaf3.TINY_MODEL)
    clips = list(examples(TASKS, PARITY_SEED, 50))
    ours = answer(pipe.model, pipe.processor, clips, batch_size=10)
    theirs = []
    for start in range(0, len(clips), 10):
        part = clips[start : start + 10]
        conversations = [
            [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": c.question}, {"type": "audio", "audio": c.waveform}],
                }
            ]
            for c in part
        ]
        inputs = processor.apply_chat_template(
            conversations, tokenize=True, add_generation_prompt=True, return_dict=True
        )
        with torch.no_grad():
            out = reference.generate(
                **inputs, do_sample=False, max_new_tokens=MAX_ANSWER_TOKENS, repetition_penalty=1.0
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        theirs += [text.strip() for text in processor.batch_decode(new, skip_special_tokens=True)]
    assert ours == theirs
    assert len(set(ours)) > 10  # real answers, not one string for every clip
