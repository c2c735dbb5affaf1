"""`minaf3 demo`: the tiny AF3 minaf3 ships answers questions about clips it has never heard, no download.

`run_demo()` loads minaf3.TINY_MODEL (trained by `minaf3 train`, see train.py), makes one fresh clip of each
task of tasks.py from an evaluation seed, asks each clip's question and prints every answer beside the truth,
with the time each stage took.

`write_demo_checkpoint(path)` writes a complete Audio Flamingo 3 checkpoint folder in the official hub layout
(nvidia/audio-flamingo-3-hf), only smaller and with random weights, without transformers: the tests' fixture.

    config.json               the fields transformers' save_pretrained writes, at tiny sizes
    model.safetensors         hub tensor names (weights/layouts.py HUB table), float32
    generation_config.json    the sampling defaults the official checkpoint ships
    tokenizer.json            byte-level BPE trained here with `tokenizers`, with Qwen2's special tokens
    tokenizer_config.json, processor_config.json, chat_template.jinja   as transformers writes them
    clip.wav                  a few seconds of a generated speech-like signal

transformers loads this folder as it loads its own saves (tests/test_demo.py checks the logits agree), so it
is also a small fixture for anyone who wants to try minaf3 or the reference without 16 GB of weights.
`train_tokenizer` and `model_config` are also what `minaf3 train` builds its model from.
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import save_file

from minaf3.chat_template import DEFAULT_SYSTEM_PROMPT
from minaf3.config import AudioFlamingo3Config, DecoderConfig, EncoderConfig
from minaf3.errors import ConfigError
from minaf3.kernels.registry import available
from minaf3.processor import DEFAULT_TRANSCRIPTION_PROMPT
from minaf3.processor_files import write_processor_files
from minaf3.weights.layouts import HUB, checkpoint_names
from minaf3.windows import HOP_LENGTH, MAX_AUDIO_SECONDS, N_MELS, SAMPLING_RATE, WINDOW_SAMPLES

if TYPE_CHECKING:
    from minaf3.pipeline import Pipeline, Timings
    from minaf3.tasks import Example

ENDOFTEXT, IM_START, IM_END, AUDIO_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, AUDIO_TOKEN]  # ids 0..3, in Qwen2's order
VOCAB_SIZE = 512  # BPE merges learned until the vocabulary holds this many tokens
BYTE_TOKENS = 256  # byte-level BPE's initial alphabet: ids 4..259, right after the special tokens
# Sentences the BPE merges are learned from: the prompts a demo user types, so they tokenize compactly.
CORPUS = [
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_TRANSCRIPTION_PROMPT,
    "What is in this audio? Describe the sound in detail.",
    "The spoken content of the audio is hello world.",
    "A dog barks while music plays in the background, then a man speaks.",
    "Please think and reason about the input audio before you respond.",
    "Is this music happy or sad? Which instruments can you hear?",
    "A woman speaks calmly over the sound of rain and distant traffic.",
]
# Tiny but complete: several heads, grouped-query attention (4 query heads share 2 KV heads), biases.
DEMO_SIZES = {
    "audio_layers": 2,
    "audio_hidden": 64,
    "audio_heads": 4,
    "text_layers": 2,
    "text_hidden": 128,
    "text_heads": 4,
    "text_kv_heads": 2,
}
MATRIX_STD, VECTOR_STD = 0.08, 0.05  # wider than the usual 0.02 so greedy decoding is not flat noise
CLIP_SECONDS = 4.0
CLIP_NAME = "clip.wav"
DEMO_SEED = 0  # the evaluation seed (tasks.EVAL_SEEDS) of the demo's clips: never heard in training
# Printed after the answers: the step from this demo to one's own clips and to the real model.
NEXT_STEP = (
    "\nYour own clip:\n"
    "  minaf3 chat --model {folder} --audio beeps.wav --greedy 'How many beeps are there?'\n"
    "The 7B model (16.5 GB), same code:\n"
    "  huggingface-cli download nvidia/audio-flamingo-3-hf --local-dir audio-flamingo-3-hf\n"
    '  minaf3 chat --model audio-flamingo-3-hf --audio clip.wav "What is in this audio?"'
)


def train_tokenizer(corpus: list[str] = CORPUS, vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE `tokenizers.Tokenizer` with AF3's special tokens, as transformers saves it: merges
    learned from `corpus` until the vocabulary holds `vocab_size` tokens (or no pair repeats)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # transformers' save adds this no-op post-processor; writing it too makes the file identical to its save.
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A:0 $B:1", special_tokens=[])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 20, trainer)
    return tok


def model_config(
    vocab_size: int,
    *,
    audio_layers: int,
    audio_hidden: int,
    audio_heads: int,
    text_layers: int,
    text_hidden: int,
    text_heads: int,
    text_kv_heads: int,
    audio_intermediate: int | None = None,
    text_intermediate: int | None = None,
) -> dict:
    """config.json with the fields and spellings transformers 5 writes for AudioFlamingo3Config, for a model
    of these sizes and SPECIAL_TOKENS' ids; the feed-forward widths default to twice the hidden widths."""
    token = {name: SPECIAL_TOKENS.index(name) for name in SPECIAL_TOKENS}
    encoder = EncoderConfig(
        num_mel_bins=N_MELS,
        hidden_size=audio_hidden,
        num_layers=audio_layers,
        num_heads=audio_heads,
        intermediate_size=audio_intermediate or 2 * audio_hidden,
        max_source_positions=WINDOW_SAMPLES // HOP_LENGTH // 2,  # 1500 frames after conv2's stride 2
    )
    decoder = DecoderConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=text_intermediate or 2 * text_hidden,
        num_layers=text_layers,
        num_heads=text_heads,
        num_kv_heads=text_kv_heads,
        head_dim=text_hidden // text_heads,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        bos_token_id=token[ENDOFTEXT],
        eos_token_id=token[IM_END],
    )
    return AudioFlamingo3Config(encoder, decoder, audio_token_id=token[AUDIO_TOKEN]).to_dict()


def random_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Hub-layout tensor name -> random float32 tensor, for every parameter the config's model has.

    Shapes come from minaf3's own model built on the meta device (no memory), names from the HUB table, so
    the writer cannot drift from what the loader expects.
    """
    from minaf3.model import AudioFlamingo3ForConditionalGeneration

    with torch.device("meta"):
        model = AudioFlamingo3ForConditionalGeneration(AudioFlamingo3Config.from_dict(config))
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    names = checkpoint_names(HUB, shapes)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for ours in sorted(shapes):  # a fixed order, so a seed always gives the same weights
        std = MATRIX_STD if len(shapes[ours]) >= 2 else VECTOR_STD
        tensors[names[ours]] = torch.randn(shapes[ours], generator=generator) * std
    # Single-byte tokens get zero logits, so random text is made of learned word pieces: otherwise it is
    # mostly stray UTF-8 continuation bytes, printed as U+FFFD, which reads like a decoding bug.
    tensors[names["lm_head.weight"]][len(SPECIAL_TOKENS) : len(SPECIAL_TOKENS) + BYTE_TOKENS] = 0.0
    return tensors


def demo_clip(seconds: float = CLIP_SECONDS, seed: int = 0) -> np.ndarray:
    """A speech-like 16 kHz float32 clip: a voice gliding around 120 Hz, syllables at 4 Hz, then a chime.

    Harmonics under a syllable envelope give the encoder the structure of voiced speech; the final second is
    a decaying 880 Hz tone so the clip has a second, distinct sound event.
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLING_RATE)
    t = np.arange(n) / SAMPLING_RATE
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.5 * t)  # Hz: a slow intonation contour
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLING_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllables = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2
    chime_start = max(0.0, seconds - 1.0)
    chime = np.where(t >= chime_start, np.sin(2 * np.pi * 880 * t) * np.exp(-4 * (t - chime_start)), 0.0)
    voice = np.where(t < chime_start, 0.2 * voiced * syllables, 0.0)
    return (voice + 0.3 * chime + 0.01 * rng.standard_normal(n)).astype(np.float32)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def generation_config(token: dict[str, int]) -> dict:
    """generation_config.json: the official checkpoint's sampling defaults, with `token` (name -> id)."""
    return {
        "bos_token_id": token[ENDOFTEXT],
        "do_sample": True,
        "eos_token_id": [token[IM_END], token[ENDOFTEXT]],
        "pad_token_id": token[ENDOFTEXT],
        "repetition_penalty": 1.05,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
    }


def write_demo_checkpoint(path: str | os.PathLike, seed: int = 0, **sizes: int) -> Path:
    """Write a tiny random-weight AF3 checkpoint folder (hub layout) and clip.wav into `path`.

    sizes: any key of DEMO_SIZES (layers, hidden widths, heads) to override; a hidden width must be a
    multiple of its head count and text_heads a multiple of text_kv_heads. Returns the folder.
    """
    unknown = sorted(set(sizes) - set(DEMO_SIZES))
    if unknown:
        raise ConfigError(
            f"write_demo_checkpoint: unknown size argument(s) {unknown}; use {sorted(DEMO_SIZES)}"
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    config = model_config(tok.get_vocab_size(), **{**DEMO_SIZES, **sizes})
    _write_json(folder / "config.json", config)
    save_file(random_weights(config, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    token = {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}
    _write_json(folder / "generation_config.json", generation_config(token))
    write_processor_files(
        folder,
        tok,
        pad_token=ENDOFTEXT,
        eos_token=IM_END,
        audio_token=AUDIO_TOKEN,
        default_transcription_prompt=DEFAULT_TRANSCRIPTION_PROMPT,
        max_audio_len=MAX_AUDIO_SECONDS,
    )
    # The clip goes last: is_complete() takes a folder with it as finished.
    sf.write(folder / CLIP_NAME, demo_clip(seed=seed), SAMPLING_RATE, subtype="PCM_16")
    return folder


def _timed(step, *args, **kwargs) -> tuple:
    """(step(*args, **kwargs), the seconds it took)."""
    started = time.perf_counter()
    result = step(*args, **kwargs)
    return result, time.perf_counter() - started


def print_setup(pipe: "Pipeline", folder: Path, seed: int, out: TextIO) -> None:
    """What the demo runs: the model folder, its size and device, where the clips come from."""
    params = sum(p.numel() for p in pipe.model.parameters())
    config = pipe.model.config
    print(
        "minaf3 demo: a tiny Audio Flamingo 3, trained by `minaf3 train` on synthetic sounds, answers",
        file=out,
    )
    print(f"questions about clips it has never heard (tasks.py, evaluation seed {seed}).", file=out)
    print(f"  model   {folder}", file=out)
    print(
        f"          {config.encoder.num_layers} encoder + {config.decoder.num_layers} decoder layers, "
        f"{params / 1e6:.2f} M parameters, on {pipe.model.device.type}\n",
        file=out,
    )


def ask(pipe: "Pipeline", clips: list["Example"], out: TextIO) -> tuple[list[str], "Timings"]:
    """Each clip's question, answered greedily and printed beside the truth; (answers, summed timings)."""
    from minaf3.pipeline import Timings
    from minaf3.tasks import score_answer

    answers, totals, right = [], Timings(), 0
    for clip in clips:
        said = pipe.chat(clip.question, audio=clip.waveform, do_sample=False, max_new_tokens=32)
        totals += pipe.last_timings
        ok = score_answer(clip.task, said, clip.answer)["exact"] == 1.0
        right += ok
        answers.append(said)
        seconds = len(clip.waveform) / SAMPLING_RATE
        print(f"  {clip.task:<9} {seconds:4.1f} s   {clip.question}", file=out)
        print(f"            answer  {said}", file=out)
        print(f"            truth   {clip.answer}   {'right' if ok else 'WRONG'}", file=out)
    print(f"\n{right} of {len(clips)} answers right.", file=out)
    return answers, totals


def print_timings(setup: dict[str, float], t: "Timings", clips: int, out: TextIO) -> None:
    """One line per stage: the demo's own (`setup`: load, kernels and clips seconds), then the chats' (`t`,
    summed over `clips` clips)."""
    rows = [
        ("load", setup["load"], "config, tokenizer and weights"),
        ("kernels", setup["kernels"], "C++ CPU kernels: built on a machine's first run, loaded after"),
        ("clips", setup["clips"], "the synthetic clips generated (tasks.py)"),
        ("features", t.features, "log-mel and tokenization"),
        ("encoder", t.encoder, "Whisper encoder"),
        ("prefill", t.prefill, f"{t.prompt_tokens} prompt tokens"),
        ("decode", t.decode, f"{t.new_tokens} new tokens, {t.decode_tokens_per_second:.0f} tokens/s"),
    ]
    print(f"Timings, all {clips} clips:", file=out)
    for name, seconds, note in rows:
        print(f"  {name:<9} {seconds * 1000:8.1f} ms   {note}", file=out)


def run_demo(
    model: str | os.PathLike | None = None,
    seed: int = DEMO_SEED,
    device: str | None = None,
    out: TextIO | None = None,
) -> tuple[list[str], "Timings"]:
    """Load the tiny model (`model`, default minaf3.TINY_MODEL), ask the question of one fresh clip of each
    task (clip index = the task's position in TASKS, from evaluation seed `seed`), and print each greedy
    answer beside the truth, then the time each stage took over all the clips. Returns (answers, timings).
    """
    import minaf3
    from minaf3.pipeline import load
    from minaf3.tasks import TASKS, example_at

    out = out or sys.stdout
    folder = Path(model) if model is not None else minaf3.TINY_MODEL
    pipe, loaded = _timed(load, folder, device=device)
    _, kernels = _timed(available) if pipe.model.device.type == "cpu" else (None, 0.0)
    clips, made = _timed(lambda: [example_at(task, seed, i) for i, task in enumerate(TASKS)])
    print_setup(pipe, folder, seed, out)
    answers, totals = ask(pipe, clips, out)
    print_timings({"load": loaded, "kernels": kernels, "clips": made}, totals, len(clips), out)
    print(NEXT_STEP.format(folder=folder), file=out)
    return answers, totals
