"""Shared fixtures: tiny AF3 checkpoints written by transformers itself, and audio the tests make.

The reference checkpoints come from transformers' own `save_pretrained` (model and processor), so every
parity test compares minaf3 with the reference on files neither side wrote by hand.
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from minaf3.kernels.int4_linear import (
    ZERO_POINT,
    int4_dequantize_reference,
    pack_int4,
    pack_scales,
    padded_width,
)

from minaf3.chat_template import REFERENCE_TEMPLATE

SR = 16000
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>"]
CORPUS = [
    "Transcribe the input speech.",
    "What is in this audio? Describe the sound in detail.",
    "You are a helpful assistant.",
    "The spoken content of the audio is hello world.",
    "A dog barks while music plays in the background, then a man speaks.",
    "Please think and reason about the input audio before you respond.",
    "Is this music happy or sad? Which instruments can you hear?",
]


def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a few sentences, with AF3's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def reference_configs(tok, *, audio_layers=2, text_layers=2, audio_hidden=32, text_hidden=64):
    """transformers configs for a tiny AF3 whose shapes exercise GQA, biases and several heads."""
    from transformers import AudioFlamingo3Config, AudioFlamingo3EncoderConfig, Qwen2Config

    audio = AudioFlamingo3EncoderConfig(
        num_mel_bins=128,
        hidden_size=audio_hidden,
        num_hidden_layers=audio_layers,
        num_attention_heads=4,
        intermediate_size=audio_hidden * 2,
        max_source_positions=1500,
    )
    text = Qwen2Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id("<|im_end|>"),
        tie_word_embeddings=False,
    )
    return AudioFlamingo3Config(
        audio_config=audio, text_config=text, audio_token_id=tok.token_to_id("<sound>")
    )


def write_reference_checkpoint(path: Path, seed: int = 0, max_shard_size=None, **sizes) -> Path:
    """Write a complete tiny AF3 checkpoint folder with transformers' own save_pretrained."""
    from transformers import (
        AudioFlamingo3ForConditionalGeneration,
        AudioFlamingo3Processor,
        GenerationConfig,
        PreTrainedTokenizerFast,
        WhisperFeatureExtractor,
    )

    torch.manual_seed(seed)
    tok = build_tokenizer()
    config = reference_configs(tok, **sizes)
    model = AudioFlamingo3ForConditionalGeneration(config).eval()
    # std 0.02 init gives near-flat logits; a wider spread makes greedy decoding a meaningful test. Norm
    # weights stay near 1: drawn around 0 they shrink the hidden states so much that the logits barely
    # depend on position, and a 1e-4 tolerance could no longer see a RoPE or cache bug.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.08 if p.ndim >= 2 else 0.05)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **save_kwargs)
    bos, eos = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    GenerationConfig(
        bos_token_id=bos,
        do_sample=True,
        eos_token_id=[eos, bos],
        pad_token_id=bos,
        repetition_penalty=1.05,
        temperature=0.7,
        top_k=20,
        top_p=0.8,
    ).save_pretrained(path)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<sound>"],
    )
    processor = AudioFlamingo3Processor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128, return_attention_mask=True),
        tokenizer=hf_tok,
        # the official checkpoint's template; the parity tests render it with transformers' Jinja
        chat_template=REFERENCE_TEMPLATE,
    )
    processor.save_pretrained(path)
    return Path(path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A single-file tiny AF3 checkpoint in the hub layout (seed 0)."""
    return write_reference_checkpoint(tmp_path_factory.mktemp("af3_tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_sharded(tmp_path_factory) -> Path:
    """The hub layout split into several shards with an index (seed 1)."""
    return write_reference_checkpoint(tmp_path_factory.mktemp("af3_sharded"), seed=1, max_shard_size="100KB")


@pytest.fixture(scope="session")
def bf16_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint stored in bf16, as the official one is."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("af3_bf16")
    for file in tiny_checkpoint.iterdir():
        if file.is_file() and file.suffix != ".safetensors":
            shutil.copy(file, path / file.name)
    for file in tiny_checkpoint.glob("*.safetensors"):
        tensors = {k: t.bfloat16() if t.is_floating_point() else t for k, t in load_file(file).items()}
        save_file(tensors, path / file.name, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"dtype": "bfloat16"}))
    return path


@pytest.fixture(scope="session")
def reference_model(tiny_checkpoint):
    """transformers' AudioFlamingo3ForConditionalGeneration on the tiny checkpoint, fp32, eval mode."""
    from transformers import AudioFlamingo3ForConditionalGeneration

    return AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def reference_processor(tiny_checkpoint):
    """transformers' AudioFlamingo3Processor on the tiny checkpoint."""
    from transformers import AudioFlamingo3Processor

    return AudioFlamingo3Processor.from_pretrained(tiny_checkpoint)


def speech_like(num_samples: int, sampling_rate: int = SR, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-like signal: harmonics of a gliding pitch under a 4 Hz envelope, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / sampling_rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sampling_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2
    signal = 0.2 * voiced * envelope + 0.01 * rng.standard_normal(num_samples)
    return signal.astype(np.float32)


@pytest.fixture
def make_speech():
    return speech_like


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| over all elements, in float32."""
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------------------------------
# Triton interpreter switch (owner: kernels, tests/test_kernels.py).
# Triton reads TRITON_INTERPRET once, when it is imported (triton.language's own helpers are decorated then),
# so the switch must be set before any module imports triton; conftest.py is loaded before every test module.
# Only without CUDA: on a GPU the kernels (and torch.compile's generated Triton code) must run compiled.


def _interpret_triton_without_cuda() -> None:
    import os

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_triton_without_cuda()


# ------------------------------------------------------------------------------------------------------------
# Demo checkpoint (owner: minaf3/demo.py, pipeline, CLI and estimate tests).
# write_demo_checkpoint writes the hub layout without transformers; tests/test_demo.py proves transformers
# loads it and agrees with minaf3, so the pipeline tests can use it as a complete checkpoint folder.

# The smallest useful model: one layer and one head each, so an hour of audio (120 encoder windows and six
# decoder prompts of ~15,000 tokens) runs in seconds.
HOUR_SIZES = {
    "audio_layers": 1,
    "audio_hidden": 8,
    "audio_heads": 1,
    "text_layers": 1,
    "text_hidden": 16,
    "text_heads": 1,
    "text_kv_heads": 1,
}


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> Path:
    """The `minaf3 demo` checkpoint (DEMO_SIZES, seed 0), with clip.wav."""
    from minaf3.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("af3_demo"))


@pytest.fixture(scope="session")
def demo_pipeline(demo_checkpoint):
    """minaf3.load(demo_checkpoint) on the CPU in float32, shared by the pipeline tests."""
    import minaf3

    return minaf3.load(demo_checkpoint)


@pytest.fixture(scope="session")
def hour_checkpoint(tmp_path_factory) -> Path:
    """A demo checkpoint at HOUR_SIZES, for hour-long transcription."""
    from minaf3.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("af3_hour"), **HOUR_SIZES)


# ---- a fresh interpreter: C++ kernel builds as CI meets them, imports a first forward must not pay for ----
def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter with this environment plus `env`, its venv's bin/ not on PATH."""
    bin_dir = os.path.dirname(sys.executable)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != bin_dir)
    full_env = {**os.environ, "PATH": path, **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True)


# ---- documentation snippets (tests/test_doc_snippets.py, tests/test_readme.py) ----------------------------
def run_snippet(code: str, namespace: dict) -> str:
    """Execute `code` as written, its globals in `namespace`; what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, namespace)
    return out.getvalue()


# ---- a LoRA adapter for the demo checkpoint (owner: evaluation and the --adapter option) -------------------
DEMO_ADAPTER_TARGETS = ("q_proj", "v_proj")


def write_demo_adapter(folder: Path, checkpoint: Path, seed: int = 0, r: int = 4) -> Path:
    """A LoRA adapter for `checkpoint`'s decoder as PEFT saves one for transformers' AF3: adapter_config.json
    and adapter_model.safetensors, named `base_model.model.model.language_model.layers.N.self_attn.q_proj...`.

    lora_B is random rather than PEFT's zeros (a trained adapter's), and large enough that greedy answers
    change: A and B entries have std 0.3 and alpha / r = 2, against the demo's weights of std 0.08.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(Path(checkpoint) / "model.safetensors"), "pt") as f:
        for name in f.keys():
            layer, _, leaf = name.removeprefix("language_model.model.").rpartition(".")
            if not name.startswith("language_model.model.layers.") or leaf != "weight":
                continue
            if layer.rpartition(".")[2] not in DEMO_ADAPTER_TARGETS:
                continue
            out_features, in_features = f.get_slice(name).get_shape()
            key = f"base_model.model.model.language_model.{layer}"
            tensors[f"{key}.lora_A.weight"] = 0.3 * torch.randn(r, in_features, generator=generator)
            tensors[f"{key}.lora_B.weight"] = 0.3 * torch.randn(out_features, r, generator=generator)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    targets = rf".*language_model\.layers\.\d+\.self_attn\.({'|'.join(DEMO_ADAPTER_TARGETS)})"
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": targets}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def demo_adapter(tmp_path_factory, demo_checkpoint) -> Path:
    """write_demo_adapter's adapter for the demo checkpoint (seed 0)."""
    return write_demo_adapter(tmp_path_factory.mktemp("demo_adapter"), demo_checkpoint)


# The quantized products' tests (test_int4_linear.py, test_int8_linear.py, test_vnni_prefill.py): random
# layers and the error allowed.
FLOAT32_EPS = torch.finfo(torch.float32).eps


def random_int4_layer(out_features: int, in_features: int, bias: bool, seed: int, group: int = 32):
    """An int4 weight of random 4-bit values and bf16 scales of both signs, for in_features columns (the
    padding columns zero, as the quantizer makes them)."""
    g = torch.Generator().manual_seed(seed)
    Kp = padded_width(in_features)
    q = torch.randint(0, 16, (out_features, Kp), generator=g)
    q[:, in_features:] = ZERO_POINT
    scales = ((torch.rand(out_features, Kp // group, generator=g) - 0.5) * 0.02).bfloat16()
    b = torch.randn(out_features, generator=g) if bias else None
    return pack_int4(q), pack_scales(scales), b


def int4_error_bound(x, w, scales, bias, rel: float, int8_group: int | None = None) -> torch.Tensor:
    """|y - y_ref| allowed per element: rel * sum_k |x_k W_nk| (+ |bias|), the scale of rounding errors.

    int8_group: the path rounds the activations to int8 per group of that many columns, each group with the
    scale max |x| / 127 over it: add half of that scale times the group's sum_k |W_nk|."""
    W = int4_dequantize_reference(w, scales).float()
    size = x.float().abs() @ W[:, : x.shape[-1]].abs().T
    bound = rel * (size + (0 if bias is None else bias.abs())) + 1e-6
    if int8_group is None:
        return bound
    xp = torch.nn.functional.pad(x.float(), (0, W.shape[1] - x.shape[-1]))
    return bound + int8_activation_bound(xp, W, int8_group)


def int8_activation_bound(x: torch.Tensor, W: torch.Tensor, group: int) -> torch.Tensor:
    """What rounding x (..., K) to int8 per group of `group` columns (scale max |x| / 127 over the group)
    can change in x @ W.T, W (N, K) float: half that scale times the group's sum_k |W_nk|, summed."""
    N, K = W.shape
    half_step = x.float().abs().unflatten(-1, (K // group, group)).amax(-1) / 254  # (..., groups)
    group_weight = W.float().abs().view(N, K // group, group).sum(-1)  # (N, groups)
    return 1.01 * half_step @ group_weight.T
