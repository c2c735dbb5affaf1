"""Issue 5's "Must show" table: minaf3 against transformers 5.23 on the same random weights, in one run.

    python tools/bench.py [--threads 2] [--tokens 64] [--autotune] [--dir DIR]

Checkpoints are written by transformers' own save_pretrained into a temporary folder; both libraries load
them in float32. Rows (times are the minimum over repeats; the machine is shared):
  1. Overhead-bound decode: full depth (32 encoder, 28 decoder layers) at tiny width (decoder 112 wide, 7
     query / 1 KV head, ffn 224; vocabulary 4096), batch 1, greedy. ms/token = (t(n tokens) - t(1)) / (n - 1).
     minaf3 eager and with its compiled decode step (inductor; --autotune adds "max-autotune-no-cudagraphs").
  2. Time to first token at official widths with 2 encoder + 2 decoder layers: a 5 s clip (125 audio tokens)
     and a 30-token question. Limit: FLOPs of the valid work (conv front end and encoder over the clip's
     frames only, projector, decoder prefill) at the fp32 matrix-product rate measured here, plus reading the
     lm_head once at the measured bandwidth (the first token's logits are one matrix-vector product).
  3. Memory-bound decode at official widths (2 decoder layers + lm_head, vocabulary 151,672), batch 1.
     Limit = weight bytes read per token (decoder layers and lm_head) / read bandwidth measured here.
     int8 logits are compared with fp32 on the same prompt (relative L2).
  4. Batched decode throughput: the tiny model of row 1, batch 8, prompts of 8..50 tokens (left padded).
  5. CUDA only: the full official model in bf16 (random weights built in memory): batch-1 decode tokens/s,
     its fraction of the copy bandwidth measured here, and the encoder on 10 minutes (20 windows).
The matrix-product rate is the best of several 2048^3 float32 products; the bandwidth the best of several
sums over 1 GiB. Each row's "of limit" is limit time / measured time.
"""

import argparse
import gc
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SR = 16_000
TINY = dict(audio_layers=32, text_layers=28, audio_hidden=64, audio_heads=4, audio_ffn=128,
            text_hidden=112, text_heads=7, text_kv_heads=1, text_ffn=224, vocab=4096, std=0.08)  # fmt: skip
OFFICIAL = dict(audio_layers=2, text_layers=2, audio_hidden=1280, audio_heads=20, audio_ffn=5120,
                text_hidden=3584, text_heads=28, text_kv_heads=4, text_ffn=18944, vocab=151_672,
                std=0.02)  # fmt: skip
CLIP_SAMPLES = 5 * SR  # 500 mel frames -> 250 encoder frames -> 125 audio tokens
GIB = 2**30


def hf_config(sizes: dict):
    from transformers import AudioFlamingo3Config, AudioFlamingo3EncoderConfig, Qwen2Config

    s, vocab = sizes, sizes["vocab"]
    audio = AudioFlamingo3EncoderConfig(
        num_mel_bins=128,
        hidden_size=s["audio_hidden"],
        num_hidden_layers=s["audio_layers"],
        num_attention_heads=s["audio_heads"],
        intermediate_size=s["audio_ffn"],
        max_source_positions=1500,
    )
    text = Qwen2Config(
        vocab_size=vocab,
        hidden_size=s["text_hidden"],
        intermediate_size=s["text_ffn"],
        num_hidden_layers=s["text_layers"],
        num_attention_heads=s["text_heads"],
        num_key_value_heads=s["text_kv_heads"],
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        bos_token_id=vocab - 3,
        eos_token_id=vocab - 2,
        tie_word_embeddings=False,
    )
    return AudioFlamingo3Config(audio_config=audio, text_config=text, audio_token_id=vocab - 1)


def init_random_(model: torch.nn.Module, std: float, seed: int = 0) -> None:
    """Norm weights near 1 (so activations keep their scale), everything else N(0, std) (biases 0.05)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, std if p.ndim >= 2 else 0.05, generator=gen)


def write_checkpoint(folder: Path, sizes: dict) -> Path:
    """A random AF3 checkpoint written by transformers' save_pretrained (fp32, hub layout)."""
    from transformers import AudioFlamingo3ForConditionalGeneration as Reference

    with torch.device("meta"):  # skip transformers' own initialisation: every tensor is drawn below
        model = Reference(hf_config(sizes))
    model.to_empty(device="cpu")
    init_random_(model, sizes["std"])
    model.save_pretrained(folder)
    del model
    gc.collect()
    return folder


def race(candidates: dict, repeats: int) -> dict[str, float]:
    """Best wall time (s) of each zero-argument callable, measured in turns after one warm-up call each, so
    that a slow spell of the shared machine (its speed varies by 1.5x within minutes) hits all of them."""
    for fn in candidates.values():
        fn()
    times = {name: math.inf for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - start)
    return times


def decode_race(runs: dict, n: int, repeats: int, extra: dict | None = None) -> dict[str, float]:
    """Seconds per decode step of each `runs[name](k)` (a call generating k tokens): (t(n) - t(1)) / (n - 1),
    so the prefill cancels out. `extra` callables are raced alongside and their best times returned too."""
    candidates = dict(extra or {})
    for name, run in runs.items():
        candidates[name, n] = lambda run=run: run(n)
        candidates[name, 1] = lambda run=run: run(1)
    times = race(candidates, repeats)
    out = {name: (times[name, n] - times[name, 1]) / (n - 1) for name in runs}
    return out | {name: times[name] for name in extra or {}}


def rate_probes() -> dict:
    """Callables whose best times give the fp32 matmul rate (2048^3) and the read bandwidth (1 GiB)."""
    a, b, x = torch.randn(2048, 2048), torch.randn(2048, 2048), torch.randn(GIB // 4)
    return {"matmul": lambda: a @ b, "read": lambda: x.sum()}


def rates(times: dict) -> tuple[float, float]:
    """(FLOP/s, bytes/s) from the best times of `rate_probes`."""
    return 2 * 2048**3 / times["matmul"], GIB / times["read"]


def hf_generate(model, ids, mask, n, **audio):
    with torch.inference_mode():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            **audio,
        )


def ours_generate(model, ids, mask, n, compile=False, **audio):
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=n,
        do_sample=False,
        repetition_penalty=1.0,
        eos_token_id=[],
        compile=compile,
        **audio,
    )


def load(path: Path, which: str, **options):
    """transformers' or minaf3's model on `path`, in float32. Both memory-map the checkpoint, so loading
    both costs its pages once (plus minaf3's fused projections)."""
    if which == "transformers":
        from transformers import AudioFlamingo3ForConditionalGeneration as Reference

        return Reference.from_pretrained(path, dtype=torch.float32).eval()
    from minaf3 import AudioFlamingo3ForConditionalGeneration

    return AudioFlamingo3ForConditionalGeneration.from_pretrained(path, **options)


class Table:
    def __init__(self):
        self.rows: list[str] = []

    def add(self, what, ref, ours, unit, speedup_target=None, limit=None, limit_target=None, fmt="{:.2f}"):
        """ref/ours: measured values in `unit`; times unless unit ends in "/s" (higher is better)."""
        higher = unit.endswith("/s")
        speedup = None if ref is None else (ours / ref if higher else ref / ours)
        of_limit = None if limit is None else (ours / limit if higher else limit / ours)
        checks = []
        if speedup_target is not None:
            checks.append(f"≥ {speedup_target:g}x " + ("✓" if speedup >= speedup_target else "✗"))
        if limit_target is not None:
            checks.append(f"≥ {limit_target:.0%} of limit " + ("✓" if of_limit >= limit_target else "✗"))
        cells = [
            what,
            "" if ref is None else fmt.format(ref),
            fmt.format(ours),
            "" if speedup is None else f"{speedup:.2f}x",
            "" if limit is None else fmt.format(limit),
            "" if of_limit is None else f"{of_limit:.0%}",
            "; ".join(checks),
        ]
        self.rows.append("| " + " | ".join(cells) + " |")
        print("  " + self.rows[-1], flush=True)

    def note(self, text: str) -> None:
        self.rows.append(f"| {text} |  |  |  |  |  |  |")
        print("  " + text, flush=True)

    def markdown(self) -> str:
        head = "| measurement | transformers | minaf3 | speed-up | limit | of limit | target |\n"
        return head + "|---|---:|---:|---:|---:|---:|---|\n" + "\n".join(self.rows)


def decode_bytes(model) -> int:
    """Bytes a batch-1 decode step reads: every decoder layer's weights, the final norm and the lm_head."""
    lm = model.language_model if hasattr(model, "language_model") else model.model.language_model
    parts = [lm.layers, lm.norm, model.lm_head]
    return sum(t.nbytes for part in parts for name, t in part.state_dict().items() if "cache" not in name)


def tiny_rows(path: Path, table: Table, args) -> None:
    """Rows 1 and 4: per-step overhead at full depth, batch 1 and batch 8 (prompts of 8..50 tokens)."""
    n, nb, gen = args.tokens, max(8, args.tokens // 2), torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4000, (1, 32), generator=gen)
    mask = torch.ones_like(ids)
    lengths = torch.tensor([8, 14, 20, 26, 32, 38, 44, 50])
    batch_mask = (torch.arange(50) >= 50 - lengths[:, None]).long()  # (8, 50), left padding
    batch_ids = torch.randint(0, 4000, (8, 50), generator=gen) * batch_mask
    ref, ours = load(path, "transformers"), load(path, "minaf3")
    modes = {"eager": False, "compiled": "default"}
    if args.autotune:
        modes["compiled, max-autotune"] = "max-autotune-no-cudagraphs"
    expected = hf_generate(ref, ids, mask, n), hf_generate(ref, batch_ids, batch_mask, nb)
    for label, mode in modes.items():
        start = time.perf_counter()
        got = ours_generate(ours, ids, mask, n, mode), ours_generate(ours, batch_ids, batch_mask, nb, mode)
        same = [torch.equal(a, b) for a, b in zip(got, expected, strict=True)]
        table.note(
            f"{label}: greedy tokens equal transformers' (batch 1, batch 8): {same[0]}, {same[1]}; "
            f"first calls {time.perf_counter() - start:.0f} s (compilation included)"
        )

    def runs(i, m):
        one = {"transformers": lambda k: hf_generate(ref, i, m, k)}
        return one | {
            label: lambda k, mode=mode: ours_generate(ours, i, m, k, mode) for label, mode in modes.items()
        }

    single = decode_race(runs(ids, mask), n, args.repeats, extra=rate_probes())
    batch = decode_race(runs(batch_ids, batch_mask), nb, args.repeats)
    limit_ms = 1e3 * decode_bytes(ours) / rates(single)[1]
    for label in modes:
        table.add(
            f"1. decode, tiny width, 32+28 layers, batch 1, {label} (ms/token)",
            1e3 * single["transformers"],
            1e3 * single[label],
            "ms",
            speedup_target=8,
            limit=limit_ms,
        )
    for label in modes:
        table.add(
            f"4. decode, tiny width, batch 8, prompts 8..50, {label} (tokens/s)",
            8 / batch["transformers"],
            8 / batch[label],
            "tokens/s",
            speedup_target=2,
            fmt="{:.0f}",
        )
    table.note(f"1. limit: {decode_bytes(ours) / 1e6:.1f} MB of weights per token at the read bandwidth")


def ttft_flops(s: dict, samples: int, prompt: int) -> float:
    """FLOPs of the valid work before the first token: conv front end and encoder layers over the clip's
    frames only, projector over its audio tokens, decoder layers over the prompt (causal attention)."""
    L = math.ceil(samples / 160)  # mel frames
    L1 = (L - 1) // 2 + 1  # after conv2
    K = (L1 - 2) // 2 + 1  # audio tokens
    H, F = s["audio_hidden"], s["audio_ffn"]
    encoder = 2 * L * 128 * 3 * H + 2 * L1 * 3 * H * H
    encoder += s["audio_layers"] * (2 * L1 * (4 * H * H + 2 * H * F) + 2 * 2 * L1 * L1 * H)
    D, ffn, heads, kv = s["text_hidden"], s["text_ffn"], s["text_heads"], s["text_kv_heads"]
    hd = D // heads
    projector = 2 * K * (H * D + D * D)
    layer = 2 * prompt * (D * (heads + 2 * kv) * hd + heads * hd * D + 3 * D * ffn)
    layer += 2 * 2 * (prompt * (prompt + 1) / 2) * heads * hd  # scores and values, causal half
    return encoder + projector + s["text_layers"] * layer


def official_rows(path: Path, table: Table, args) -> None:
    """Rows 2 and 3: time to first token on a 5 s clip, and memory-bound decode in fp32 and int8."""
    from minaf3.features import log_mel_spectrogram
    from minaf3.windows import audio_token_count

    s, gen = OFFICIAL, torch.Generator().manual_seed(1)
    clip = (0.1 * np.random.default_rng(0).standard_normal(CLIP_SAMPLES)).astype(np.float32)
    features, features_mask = log_mel_spectrogram(clip)
    audio = dict(input_features=features, input_features_mask=features_mask)
    num_audio = audio_token_count(CLIP_SAMPLES)
    question = torch.randint(0, 150_000, (1, 30), generator=gen)
    ids = torch.cat([torch.full((1, num_audio), s["vocab"] - 1), question], dim=1)
    text = torch.randint(0, 150_000, (1, 16), generator=gen)
    ref, ours, int8 = load(path, "transformers"), load(path, "minaf3"), load(path, "minaf3", quantize="int8")
    ones = torch.ones_like(ids)
    ttft = race(
        {
            "transformers": lambda: hf_generate(ref, ids, ones, 1, **audio),
            "minaf3": lambda: ours_generate(ours, ids, ones, 1, **audio),
        }
        | rate_probes(),
        args.repeats,
    )
    flops, read = rates(ttft)
    limit = ttft_flops(s, CLIP_SAMPLES, ids.shape[1]) / flops + s["text_hidden"] * s["vocab"] * 4 / read
    table.add(
        "2. time to first token, official widths, 2+2 layers, 5 s clip + 30 tokens (s)",
        ttft["transformers"],
        ttft["minaf3"],
        "s",
        speedup_target=1.8,
        limit=limit,
        limit_target=1 / 1.2,
    )

    ones = torch.ones_like(text)
    runs = {"transformers": lambda k: hf_generate(ref, text, ones, k)}
    for label, model in (("fp32", ours), ("int8", int8)):
        for mode in (False, "default"):
            runs[f"{label}, {'compiled' if mode else 'eager'}"] = lambda k, model=model, mode=mode: (
                ours_generate(model, text, ones, k, mode)
            )
    step = decode_race(runs, args.big_tokens, args.repeats, extra=rate_probes())
    read = rates(step)[1]
    for label in runs:
        if label != "transformers":
            model = int8 if label.startswith("int8") else ours
            table.add(
                f"3. decode, official widths, 2 layers + lm_head, batch 1, {label} (ms/token)",
                1e3 * step["transformers"],
                1e3 * step[label],
                "ms",
                fmt="{:.1f}",
                speedup_target=3 if label.startswith("int8") else None,
                limit=1e3 * decode_bytes(model) / read,
                limit_target=0.8,
            )
    with torch.inference_mode():
        fp32_logits, int8_logits = (m(input_ids=text).logits[0, -1] for m in (ours, int8))
    error = ((int8_logits - fp32_logits).norm() / fp32_logits.norm()).item()
    table.note(
        f"3. int8 logits vs fp32: relative L2 {error:.2%} (target < 2%: {'✓' if error < 0.02 else '✗'})"
    )


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s moved (read + write) by copying 2 GiB on `device`."""
    x = torch.empty(2 * GIB, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)

    def copy():
        y.copy_(x)
        torch.cuda.synchronize()

    return 2 * x.nbytes / race({"copy": copy}, 10)["copy"]


def cuda_rows(table: Table, args) -> None:
    """Row 5: the full official model in bf16 on the GPU (random weights made in memory, no checkpoint)."""
    from minaf3 import AudioFlamingo3ForConditionalGeneration
    from minaf3.config import AudioFlamingo3Config

    device = torch.device("cuda")
    full = dict(OFFICIAL, audio_layers=32, text_layers=28)
    config = AudioFlamingo3Config.from_dict(hf_config(full).to_dict())
    with torch.device("meta"):
        model = AudioFlamingo3ForConditionalGeneration(config)
    model = model.to_empty(device=device).to(torch.bfloat16).eval()
    init_random_(model, full["std"])
    model.language_model.reset_buffers(device)

    peak = copy_bandwidth(device)
    ids = torch.randint(0, 150_000, (1, 64), device=device)

    def decode(k):
        ours_generate(model, ids, torch.ones_like(ids), k, compile=True)
        torch.cuda.synchronize()

    tps = 1 / decode_race({"bf16": decode}, 4 * args.tokens, args.repeats)["bf16"]
    fraction = decode_bytes(model) * tps / peak
    table.add(
        "5. CUDA decode, full model, bf16, batch 1 (tokens/s)",
        None,
        tps,
        "tokens/s",
        limit=peak / decode_bytes(model),
        fmt="{:.0f}",
    )
    table.note(f"5. CUDA HBM: {fraction:.0%} of the {peak / 1e12:.2f} TB/s copy bandwidth measured")
    features = torch.randn(20, 128, 3000, device=device)
    mask = torch.ones(20, 3000, dtype=torch.long, device=device)

    def encode():
        with torch.inference_mode():
            model.get_audio_features(features, mask)
        torch.cuda.synchronize()

    table.add(
        "5. CUDA encoder, 10 minutes of audio (20 windows), 32 layers (ms)",
        None,
        1e3 * race({"encode": encode}, args.repeats)["encode"],
        "ms",
        fmt="{:.0f}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per timed call, tiny model")
    parser.add_argument(
        "--big-tokens", type=int, default=8, help="new tokens per timed call, official widths"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--autotune", action="store_true", help="also max-autotune-no-cudagraphs (slow compile)"
    )
    parser.add_argument("--dir", default=None, help="folder for the temporary checkpoints (about 7 GB)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    start = time.perf_counter()
    flops, read = rates(race(rate_probes(), 5))
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads; "
        f"now: fp32 matmul {flops / 1e9:.0f} GFLOP/s, read bandwidth {read / 1e9:.1f} GB/s, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    table = Table()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tiny_rows(write_checkpoint(Path(tmp) / "tiny", TINY), table, args)
        official_rows(write_checkpoint(Path(tmp) / "official", OFFICIAL), table, args)
    if torch.cuda.is_available():
        cuda_rows(table, args)
    print(
        f"\n{table.markdown()}\n\n{time.perf_counter() - start:.0f} s in all; "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )


if __name__ == "__main__":
    main()
