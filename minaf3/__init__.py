"""minaf3: Audio Flamingo 3 in plain PyTorch.

The pipeline, one module per stage:

    audio.py          decode, downmix and resample any audio source to 16 kHz mono float32
    windows.py        30 s windows, mel frame counts and audio token counts (integer and tensor forms)
    mel.py            Whisper's log-mel: constants, filters and a plain reference
    features.py       log-mel spectrogram, fast and batched over windows
    linear.py         Linear layers that pick their own product; layers fused by rows
    encoder.py        Whisper encoder, average pool and LayerNorm
    decoder.py        Qwen2 decoder with a static KV cache
    attention.py      one attention signature, four backends (triton, cpp, sdpa, eager)
    model.py          encoder + projector + decoder, `from_pretrained`, `forward`, `generate`; loss.py:
                      the next-token loss over labelled positions
    dtypes.py         the dtype a model computes in
    quantize.py       int8 weight-only layers, swapped in
    chat_template.py  AF3's chat template in Python; conversation parsing and validation
    processor.py      tokenizer and features: conversations to model inputs (processor_files.py reads
                      the checkpoint's processor files)
    sampling.py       GenerationConfig and the logits processors (repetition penalty, top-k, top-p, ...)
    generate.py       `generate`: arguments, settings, the KV cache; decoding.py: prefill, then one
                      token per step
    lora.py           AF-Think: LoRA adapters merged into (or added to) the decoder's linears
    tasks.py          synthetic listening tasks: clips, questions and exact answers
    pipeline.py       `minaf3.load(...)`: chat and transcribe in one call; segments.py splits long audio
    cli.py            the `minaf3` command: chat, transcribe, demo (demo.py), estimate (estimate.py),
                      batch (batch.py, manifest.py, records.py), eval (evaluate.py, datasets.py,
                      metrics.py), finetune (finetune.py: LoRA adapters in PEFT's format), serve
                      (serve/), train (train.py: a tiny AF3 learns the synthetic listening tasks of tasks.py;
                      sound_heads.py: the aids that teach it to count and to read Morse)

Checkpoint layouts live in `minaf3.weights` (weights/), Triton and C++ kernels in `minaf3.kernels` (kernels/).
`import minaf3` imports nothing else: the names below and the submodules (`minaf3.attention.use_backend(...)`)
are imported on first use.
"""

import importlib
from pathlib import Path

__version__ = "0.1.0"

# The tiny AF3 minaf3 ships, trained by `minaf3 train` on the synthetic tasks: a checkpoint folder in the hub
# layout that minaf3.load and transformers' from_pretrained both accept (the README says how it was made).
TINY_MODEL = Path(__file__).with_name("tiny")

# public name -> module that defines it
_EXPORTS = {
    "load_audio": "audio",
    "audio_token_count": "windows",
    "log_mel_spectrogram": "features",
    "AudioFlamingo3Config": "config",
    "AudioFlamingo3ForConditionalGeneration": "model",
    "AudioFlamingo3Processor": "processor",
    "AutoProcessor": "processor",
    "GenerationConfig": "sampling",
    "TextIteratorStreamer": "streamer",
    "load": "pipeline",
    "Minaf3Error": "errors",
    "AudioError": "errors",
    "AudioFileError": "errors",
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "InputError": "errors",
    "GenerationError": "errors",
}

# Every submodule, reachable as an attribute (minaf3.attention) without an import statement of its own.
_SUBMODULES = set(
    """attention audio batch chat_template cli command config conversation datasets decoder decoding demo
    dtypes encoder errors estimate evaluate features finetune finetune_config generate kernels linear lora
    loss manifest mel metrics model pipeline processor processor_files quantize records sampling segments
    sound_heads streamer tasks train train_config weights windows""".split()
)

__all__ = sorted([*_EXPORTS, "TINY_MODEL"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"minaf3.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"minaf3.{name}")  # which also binds it here: no second call
    raise AttributeError(f"module 'minaf3' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
