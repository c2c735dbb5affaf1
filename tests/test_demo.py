"""The demo checkpoint writer and `run_demo` (minaf3/demo.py).

The writer works without transformers; these tests prove it right with transformers: the reference loads
the folder with no missing or unexpected tensor, re-saves every file it reads identically, and computes the
same logits as minaf3 on the same inputs.
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open

from minaf3.demo import CLIP_NAME, CLIP_SECONDS, demo_clip, run_demo, write_demo_checkpoint
from minaf3.errors import ConfigError
from minaf3.model import AudioFlamingo3ForConditionalGeneration
from minaf3.processor import AudioFlamingo3Processor

QUESTION = [{"type": "text", "text": "What is in this audio?"}]


def conversation(folder: Path) -> list[dict]:
    return [{"role": "user", "content": [{"type": "audio", "path": str(folder / CLIP_NAME)}, *QUESTION]}]


def test_transformers_loads_every_tensor(demo_checkpoint):
    from transformers import AudioFlamingo3ForConditionalGeneration as Reference

    _, info = Reference.from_pretrained(demo_checkpoint, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]


def test_logits_match_transformers(demo_checkpoint):
    """Same folder, same conversation: transformers' processor and model against minaf3's, fp32."""
    from transformers import AudioFlamingo3ForConditionalGeneration as Reference
    from transformers import AutoProcessor

    ref_processor = AutoProcessor.from_pretrained(demo_checkpoint)
    ref_inputs = ref_processor.apply_chat_template(
        conversation(demo_checkpoint), tokenize=True, add_generation_prompt=True, return_dict=True
    )
    inputs = AudioFlamingo3Processor.from_pretrained(demo_checkpoint).apply_chat_template(
        conversation(demo_checkpoint)
    )
    assert torch.equal(inputs["input_ids"], ref_inputs["input_ids"])
    torch.testing.assert_close(inputs["input_features"], ref_inputs["input_features"], atol=1e-4, rtol=0)

    reference = Reference.from_pretrained(demo_checkpoint, dtype=torch.float32).eval()
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(demo_checkpoint, dtype=torch.float32)
    with torch.no_grad():
        expected = reference(**ref_inputs).logits
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    # Random weights are meant to give a non-trivial answer: the greedy choice is not the same everywhere.
    assert len(set(expected[0].argmax(-1).tolist())) > 1


@pytest.mark.parametrize(
    "name", ["config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja"]
)
def test_files_are_what_transformers_writes(demo_checkpoint, tmp_path, name):
    """transformers reads each file and writes it back unchanged (its version stamp aside)."""
    from transformers import AudioFlamingo3Config, AutoProcessor

    AudioFlamingo3Config.from_pretrained(demo_checkpoint).save_pretrained(tmp_path)
    AutoProcessor.from_pretrained(demo_checkpoint).save_pretrained(tmp_path)
    ours, theirs = (demo_checkpoint / name).read_text(), (tmp_path / name).read_text()
    if name.endswith(".json"):
        ours, theirs = json.loads(ours), json.loads(theirs)
        theirs.pop("transformers_version", None)
    assert ours == theirs


def test_tokenizer_and_generation_config_as_transformers_reads_them(demo_checkpoint, tmp_path):
    from transformers import AutoProcessor, GenerationConfig

    tokenizer = AutoProcessor.from_pretrained(demo_checkpoint).tokenizer
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>"]) == [
        0,
        1,
        2,
        3,
    ]
    generation = GenerationConfig.from_pretrained(demo_checkpoint)
    assert (generation.do_sample, generation.temperature, generation.top_k, generation.top_p) == (
        True,
        0.7,
        20,
        0.8,
    )
    assert generation.eos_token_id == [2, 0] and generation.pad_token_id == 0


def test_weights_depend_on_the_seed_only(tmp_path):
    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        with safe_open(folder / "model.safetensors", "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    a, b, c = (
        write_demo_checkpoint(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))
    )
    ta, tb, tc = tensors(a), tensors(b), tensors(c)
    assert ta.keys() == tc.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["language_model.lm_head.weight"], tc["language_model.lm_head.weight"])
    assert all(k.startswith(("audio_tower.", "multi_modal_projector.", "language_model.")) for k in ta)


def test_sizes_are_configurable(tmp_path):
    folder = write_demo_checkpoint(tmp_path, audio_layers=1, text_heads=2, text_kv_heads=1, text_hidden=32)
    config = json.loads((folder / "config.json").read_text())
    assert config["audio_config"]["num_hidden_layers"] == 1
    assert (
        config["text_config"]["num_attention_heads"] == 2
        and config["text_config"]["num_key_value_heads"] == 1
    )
    AudioFlamingo3ForConditionalGeneration.from_pretrained(folder)  # loads: names and shapes agree


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="text_depth"):
        write_demo_checkpoint(tmp_path, text_depth=3)


def test_clip():
    clip = demo_clip()
    assert clip.dtype == np.float32 and len(clip) == CLIP_SECONDS * 16000
    assert np.isfinite(clip).all() and np.abs(clip).max() < 1.0
    assert np.array_equal(clip, demo_clip()) and not np.array_equal(clip, demo_clip(seed=1))


def test_clip_file_matches_clip(demo_checkpoint):
    audio, rate = sf.read(demo_checkpoint / CLIP_NAME, dtype="float32")
    assert rate == 16000
    np.testing.assert_allclose(audio, demo_clip(), atol=1 / 32768)  # 16-bit PCM rounding


def test_run_demo_answers_a_clip_of_each_task_beside_the_truth():
    """The shipped tiny model: a fresh clip per task, its answer (the pipeline's own), the truth, timings."""
    import minaf3
    from minaf3.tasks import TASKS, example_at

    out = io.StringIO()
    answers, timings = run_demo(out=out)
    text = out.getvalue()
    pipe = minaf3.load(minaf3.TINY_MODEL)
    for i, task in enumerate(TASKS):
        clip = example_at(task, 0, i)
        assert f"  {task} " in text and f"truth   {clip.answer}" in text
        expected = pipe.chat(clip.question, audio=clip.waveform, do_sample=False, max_new_tokens=32)
        assert answers[i] == expected and f"answer  {expected}" in text
    for stage in ("load", "kernels", "clips", "features", "encoder", "prefill", "decode"):
        assert f"\n  {stage} " in text
    assert "RANDOM" not in text and "huggingface-cli download nvidia/audio-flamingo-3-hf" in text
    assert timings.encoder > 0 and timings.prefill > 0 and timings.new_tokens >= len(TASKS)
