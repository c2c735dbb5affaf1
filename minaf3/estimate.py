"""`minaf3 estimate`: the memory a run will take and whether it fits the device, before loading anything.

Three parts, from files that are cheap to read (config.json and the safetensors headers, no tensor data):

    weights      every tensor the model loads, in the dtype it will run in; with quantize="int8" the
                 decoder's and lm_head's matrices take 1 byte per element plus a float32 scale per output
                 row, with "int4" half a byte per element plus a bf16 scale per group of 32 (rows padded
                 to a multiple of 128 columns): quantize.quantized_bytes
    KV cache     2 (k, v) x decoder layers x batch x KV heads x head_dim x (prompt + max_new_tokens) slots,
                 allocated once by generate in the model's dtype
    activations  the larger of the two peaks of one generate call: the encoder over all windows of the batch,
                 and the decoder's prefill over the whole prompt (on the CPU, torch's attention also builds a
                 boolean and a float mask of prompt x cache slots per sequence)

The prompt of an audio is its audio tokens (750 per 30 s window, windows.py) plus the chat template and a
short question (PROMPT_OVERHEAD_TOKENS). Audio longer than 600 s is read in segments of at most 600 s
(transcribe), so the largest sequence is that of 600 s. The activation figure is an upper-bound sketch of the
largest tensors alive at once, not a measurement; weights and KV cache are exact.
"""

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from minaf3.config import AudioFlamingo3Config
from minaf3.dtypes import resolve_dtype
from minaf3.errors import ConfigError
from minaf3.quantize import check_mode, quantized_bytes
from minaf3.sampling import DEFAULT_MAX_NEW_TOKENS
from minaf3.weights.layouts import our_names, scan_checkpoint
from minaf3.weights.loader import check_model_folder
from minaf3.windows import (
    FRAMES_PER_WINDOW,
    MAX_AUDIO_SECONDS,
    N_MELS,
    SAMPLING_RATE,
    audio_token_count,
    num_windows,
)

logger = logging.getLogger(__name__)

PROMPT_OVERHEAD_TOKENS = 64  # system prompt (~20 tokens), role markers and a question of a few dozen tokens
FLOAT32_BYTES = 4
# Weight-only quantization covers the decoder's linear layers and lm_head.
QUANTIZED = re.compile(r"language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight|lm_head\.weight")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes each part will take on `device`, and what the device has free (None: cannot tell here)."""

    device: str
    dtype: torch.dtype
    quantize: str | None
    batch: int
    seconds: float
    parameters: int
    weights: int
    kv_cache: int
    activations: int
    prompt_tokens: int  # per sequence
    max_new_tokens: int
    available: int | None
    available_what: str

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available


def estimate_memory(
    path: str | os.PathLike,
    seconds: float,
    batch: int = 1,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> MemoryEstimate:
    """The memory a `batch` of `seconds`-long audios will need on `device` (see the module docstring)."""
    if not seconds >= 0 or isinstance(seconds, bool):
        raise ConfigError(f"seconds={seconds!r}: expected a duration >= 0")
    for name, value in (("batch", batch), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r}: expected a positive integer")
    check_mode(quantize)
    folder = check_model_folder(path)
    target = _parse_device(device)
    automatic = dtype is None
    dtype = resolve_dtype(dtype, target, folder)
    if automatic:  # what from_pretrained would load in: float32, or the stored bf16 when float32 cannot fit
        try:
            dtype = weights_dtype(folder, dtype, target, quantize, automatic=True)
        except ConfigError:
            pass  # neither fits: the report below says by how much
    config = AudioFlamingo3Config.from_file(folder)
    parameters, weights = weight_bytes(folder, dtype, quantize)
    samples = int(min(seconds, MAX_AUDIO_SECONDS) * SAMPLING_RATE)
    prompt = audio_token_count(samples) + PROMPT_OVERHEAD_TOKENS
    slots = prompt + max_new_tokens
    size = dtype.itemsize
    dec = config.decoder
    kv = 2 * dec.num_layers * batch * dec.num_kv_heads * dec.head_dim * slots * size
    activations = max(
        encoder_peak(config, batch * num_windows(samples), size),
        prefill_peak(config, batch, prompt, slots, size, target.type == "cpu"),
    )
    available, what = available_memory(target)
    return MemoryEstimate(
        device=str(target),
        dtype=dtype,
        quantize=quantize,
        batch=batch,
        seconds=float(seconds),
        parameters=parameters,
        weights=weights,
        kv_cache=kv,
        activations=activations,
        prompt_tokens=prompt,
        max_new_tokens=max_new_tokens,
        available=available,
        available_what=what,
    )


def weight_bytes(folder: Path, dtype: torch.dtype, quantize: str | None) -> tuple[int, int]:
    """(parameters, bytes) of the tensors the model loads, from the safetensors headers alone."""
    layout, stored = scan_checkpoint(folder)
    parameters = total = 0
    for theirs, ours in our_names(layout, stored).items():
        shape = stored[theirs].shape
        numel = int(torch.Size(shape).numel())
        parameters += numel
        if quantize is not None and QUANTIZED.fullmatch(ours):
            total += quantized_bytes(shape[0], shape[1], quantize)
        else:
            total += numel * dtype.itemsize
    return parameters, total


def weights_dtype(
    folder: Path, dtype: torch.dtype, device: torch.device, quantize: str | None, automatic: bool
) -> torch.dtype:
    """The dtype from_pretrained loads in: `dtype` if its weights fit the memory available (available_memory),
    else, when minaf3 chose `dtype` itself (`automatic`: float32 over a bf16 checkpoint on a CPU without
    bf16 instructions), the checkpoint's own dtype with a warning; else a ConfigError before any read.

    Only new memory counts: on the CPU, tensors kept in their stored dtype are views of the file, whose pages
    the OS can drop and read again. Without this check the load would end in the OOM killer, without a word.
    """
    stored = resolve_dtype("auto", device, folder)
    if device.type == "cpu" and dtype == stored and quantize is None:
        return dtype
    available, what = available_memory(device)
    _, needed = weight_bytes(folder, dtype, quantize)
    if available is None or needed <= available:
        return dtype
    name = str(dtype).removeprefix("torch.")
    if automatic and stored != dtype:
        own = 0 if device.type == "cpu" and quantize is None else weight_bytes(folder, stored, quantize)[1]
        if own <= available:
            stored_name = str(stored).removeprefix("torch.")
            logger.warning(
                "%s: the weights need %.1f GB in %s but %s is %.1f GB: loading them in %s as stored "
                "(its products are slower on this CPU; dtype= or quantize='int8' choose otherwise)",
                folder, needed / 1e9, name, what, available / 1e9, stored_name,
            )  # fmt: skip
            return stored
    with_quantize = f" with quantize={quantize!r}" if quantize else ""
    raise ConfigError(
        f"{folder}: the weights need {needed / 1e9:.1f} GB in {name}{with_quantize} "
        f"but {what} is {available / 1e9:.1f} GB; try dtype='bfloat16', quantize='int8' or another device "
        "(`minaf3 estimate` shows the whole budget)"
    )


def encoder_peak(config: AudioFlamingo3Config, windows: int, size: int) -> int:
    """Largest tensors alive while encoding `windows` 30 s windows at once (bytes).

    The log-mel input (float32, kept for the whole call) plus the larger of: the conv front end (input in
    the model dtype, conv1 output at 3000 frames, conv2 output at 1500) and one transformer layer at 1500
    frames (residual, norm, q, k, v, attention output, fc1's intermediate).
    """
    enc = config.encoder
    frames, conv_frames = FRAMES_PER_WINDOW, FRAMES_PER_WINDOW // 2
    features = windows * N_MELS * frames * FLOAT32_BYTES
    conv = windows * (N_MELS * frames + enc.hidden_size * (frames + conv_frames)) * size
    layer = windows * conv_frames * (6 * enc.hidden_size + enc.intermediate_size) * size
    return features + max(conv, layer)


def prefill_peak(
    config: AudioFlamingo3Config, batch: int, prompt: int, slots: int, size: int, cpu_masks: bool
) -> int:
    """Largest tensors alive during the prefill of `batch` prompts of `prompt` tokens (bytes).

    The prompt embeddings and one decoder layer's working set (residual, norm, q, k, v, attention output,
    gate, up and their product), the last position's float32 logits and, on the CPU, the (prompt x slots)
    boolean mask and the float mask torch's attention makes of it.
    """
    dec = config.decoder
    qkv = (dec.num_heads + 2 * dec.num_kv_heads) * dec.head_dim
    layer = batch * prompt * (4 * dec.hidden_size + qkv + 3 * dec.intermediate_size) * size
    masks = batch * prompt * slots * (1 + FLOAT32_BYTES) if cpu_masks else 0
    logits = batch * dec.vocab_size * FLOAT32_BYTES
    return layer + masks + logits


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes free for a new process on `device`, what that figure is); None when it cannot be known here."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None, "free CUDA memory (no CUDA device on this machine)"
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory on {device}"
    available = _meminfo_available()
    limit = _cgroup_free()
    if limit is not None and (available is None or limit < available):
        return limit, "memory left under this container's limit"
    return available, "available RAM"


def _meminfo_available() -> int | None:
    """MemAvailable from /proc/meminfo (free + reclaimable cache); free pages elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # reported in KiB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_free() -> int | None:
    """limit - usage of the cgroup v2 this process runs in, when it has a memory limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r}: expected 'cpu', 'cuda' or 'cuda:N'") from None
    if target.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    return target


def gigabytes(n: int) -> str:
    """Bytes as a right-aligned 'x.xx GB' (or MB below 0.1 GB)."""
    return f"{n / 1e9:8.2f} GB" if n >= 1e8 else f"{n / 1e6:8.2f} MB"


def count(n: int) -> str:
    """A parameter count as '8.27 B' or '0.63 M'."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def format_estimate(e: MemoryEstimate, model: str) -> str:
    """The report `minaf3 estimate` prints."""
    dtype = str(e.dtype).removeprefix("torch.") + (f" + {e.quantize} decoder" if e.quantize else "")
    windows = num_windows(int(min(e.seconds, MAX_AUDIO_SECONDS) * SAMPLING_RATE))
    lines = [
        f"minaf3 estimate: {model} on {e.device}, {dtype}, batch of {e.batch} x {e.seconds:g} s of audio",
        f"  weights      {gigabytes(e.weights)}   {count(e.parameters)} parameters",
        f"  KV cache     {gigabytes(e.kv_cache)}   {e.batch} x {e.prompt_tokens + e.max_new_tokens:,} slots "
        f"({e.prompt_tokens:,} prompt + {e.max_new_tokens:,} new tokens)",
        f"  activations  {gigabytes(e.activations)}   peak of the encoder ({e.batch * windows} x 30 s "
        "windows) and the prefill",
        f"  total        {gigabytes(e.total)}",
    ]
    if e.seconds > MAX_AUDIO_SECONDS:
        limit = MAX_AUDIO_SECONDS
        lines.append(f"  (audio over {limit} s is transcribed in segments of at most {limit} s)")
    if e.available is None:
        lines.append(f"  available    unknown: {e.available_what}")
        return "\n".join(lines)
    lines.append(f"  available    {gigabytes(e.available)}   {e.available_what}")
    if e.fits:
        lines.append(f"fits: yes, {gigabytes(e.available - e.total).strip()} to spare")
    else:
        lines.append(
            f"fits: no, {gigabytes(e.total - e.available).strip()} short; try a smaller --batch, "
            "--dtype bfloat16, --quantize int8 or another --device"
        )
    return "\n".join(lines)
