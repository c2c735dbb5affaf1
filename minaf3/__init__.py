"""minaf3: Audio Flamingo 3 in plain PyTorch.

The pipeline, one module per stage:

    audio.py          decode, downmix and resample any audio source to 16 kHz mono float32
    windows.py        30 s windows, mel frame counts and audio token counts (pure integer math)
    features.py       log-mel spectrogram, batched over windows
    encoder.py        Whisper encoder, average pool and LayerNorm
    decoder.py        Qwen2 decoder with a static KV cache
    attention.py      one attention signature, three backends (triton, sdpa, eager)
    model.py          encoder + projector + decoder, `from_pretrained`, `forward`, `generate`
    chat_template.py  AF3's chat template in Python; conversation parsing and validation
    processor.py      tokenizer and features: conversations to model inputs (processor_files.py reads
                      the checkpoint's processor files)
    sampling.py       GenerationConfig and the logits processors (repetition penalty, top-k, top-p, ...)
    generate.py       prefill, decode_one_token and the generation loop with a static KV cache
    lora.py           AF-Think: LoRA adapters merged into (or wrapped around) the decoder's linears
    pipeline.py       `minaf3.load(...)`: chat and transcribe in one call; segments.py splits long audio
    cli.py            the `minaf3` command: chat, transcribe, demo (demo.py), estimate (estimate.py),
                      train (train.py: a tiny AF3 learns the synthetic listening tasks of tasks.py)

Checkpoint layouts live in `minaf3.weights` (weights/), Triton kernels in `minaf3.kernels` (kernels/).
Names are imported lazily so that `import minaf3` costs little beyond importing torch.
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

__all__ = sorted([*_EXPORTS, "TINY_MODEL"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"minaf3.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'minaf3' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
