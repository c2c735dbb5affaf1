"""Issue 5's "Must show" table: minaf3 against transformers 5.23 on the same random weights, in one run.

    python tools/bench.py [--threads 2] [--tokens 64] [--rows all|tiny|official] [--autotune] [--dir DIR]

Checkpoints are written by transformers' own save_pretrained into a temporary folder; both libraries load
them in float32 (both memory-map them, so two models cost the pages once). The machine is shared and its
speed drifts by 1.5x within minutes, so every row races its contenders in turns (`race`): each time is the
best of --repeats turns, and the rates behind the limits are raced alongside.
  1. Overhead-bound decode: full depth (32 encoder, 28 decoder layers) at tiny width (decoder 112 wide, 7
     query / 1 KV head, ffn 224; vocabulary 4096), batch 1, greedy: ms/token = (t(n) - t(1)) / (n - 1).
     minaf3 eager and with its compiled decode step (--autotune adds "max-autotune-no-cudagraphs").
     The same after long prompts, one 30 s window (780 tokens) and twenty (16k): tools/bench_prompts.py.
  2. Time to first token, official widths with 2 encoder + 2 decoder layers, a 5 s clip (125 audio tokens)
     and a 30-token question. Limit: FLOPs of the valid work (conv front end and encoder over the clip's
     frames only, projector, decoder prefill) at the fp32 2048^3 matmul rate (the faster of MKL and oneDNN),
     plus one read of the lm_head at the read bandwidth. The same with int8 and int4 decoders, and with each
     on the kernels a CPU whose best vector unit is AVX2 runs (gemm.cpp's products; kernels.registry.override
     switches the AVX-512 ones off). The same in bf16 against transformers in bf16 (no target; a quarter of
     --repeats).
  3. Memory-bound decode, official widths (2 decoder layers + lm_head, vocabulary 151,672), batch 1, fp32
     and int8 against transformers in fp32, and bf16 (eager) against transformers in bf16. Limit = weight
     bytes read per token / read bandwidth (sum over 1 GiB). int8 logits are compared with fp32 on the
     same prompt (relative L2).
  4. Batched decode throughput: the tiny model of row 1, batch 8, prompts of 8..50 tokens (left padded).
  5. CUDA only: the full official model in bf16 (random weights made in memory): batch-1 decode tokens/s,
     its fraction of the copy bandwidth, and the encoder on 10 minutes of audio (20 windows).
"of limit" is limit time / measured time (1 = at the limit).
"""

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from racing import GIB, cpu_flags, decode_race, describe_cpu, race, rate_probes, rates

# (audio_config, text_config, init std) in transformers' own names
TINY = (
    dict(hidden_size=64, num_hidden_layers=32, num_attention_heads=4, intermediate_size=128),
    dict(hidden_size=112, num_hidden_layers=28, num_attention_heads=7, num_key_value_heads=1,
         intermediate_size=224, vocab_size=4096),
    0.08,
)  # fmt: skip
OFFICIAL = (
    dict(hidden_size=1280, num_hidden_layers=2, num_attention_heads=20, intermediate_size=5120),
    dict(hidden_size=3584, num_hidden_layers=2, num_attention_heads=28, num_key_value_heads=4,
         intermediate_size=18944, vocab_size=151_672),
    0.02,
)  # fmt: skip
CLIP_SAMPLES = 5 * 16_000  # 500 mel frames -> 250 encoder frames -> 125 audio tokens


def hf_config(audio: dict, text: dict):
    from transformers import AudioFlamingo3Config, AudioFlamingo3EncoderConfig, Qwen2Config

    vocab = text["vocab_size"]
    return AudioFlamingo3Config(
        audio_config=AudioFlamingo3EncoderConfig(num_mel_bins=128, max_source_positions=1500, **audio),
        text_config=Qwen2Config(max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, **text,
                                bos_token_id=vocab - 3, eos_token_id=vocab - 2, tie_word_embeddings=False),
        audio_token_id=vocab - 1,
    )  # fmt: skip


def init_random_(model: torch.nn.Module, std: float) -> None:
    """Norm weights N(1, 0.1) so that activations keep their scale; matrices N(0, std), vectors N(0, 0.05)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, std if p.ndim >= 2 else 0.05, generator=gen)


def write_checkpoint(folder: Path, sizes: tuple) -> Path:
    from transformers import AudioFlamingo3ForConditionalGeneration as Reference

    with torch.device("meta"):  # skip transformers' own initialisation: every tensor is drawn below
        model = Reference(hf_config(*sizes[:2]))
    model.to_empty(device="cpu")
    init_random_(model, sizes[2])
    model.save_pretrained(folder)
    return folder


def load(path: Path, which: str, **options):
    if which == "transformers":
        from transformers import AudioFlamingo3ForConditionalGeneration as Reference

        return Reference.from_pretrained(path, dtype=options.get("dtype", torch.float32)).eval()
    from minaf3 import AudioFlamingo3ForConditionalGeneration

    return AudioFlamingo3ForConditionalGeneration.from_pretrained(path, **options)


def hf_generate(model, ids, mask, n, streamer=None, **audio):
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, streamer=streamer, **audio)  # fmt: skip


def ours_generate(model, ids, mask, n, compile=False, streamer=None, **audio):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, repetition_penalty=1.0,
                          eos_token_id=[], compile=compile, streamer=streamer, **audio)  # fmt: skip


def decode_bytes(model) -> int:
    """Bytes a batch-1 decode step reads: every decoder layer's weights, the final norm and the lm_head."""
    lm = model.language_model if hasattr(model, "language_model") else model.model.language_model
    parts = [lm.layers, lm.norm, model.lm_head]
    return sum(t.nbytes for part in parts for name, t in part.state_dict().items() if "cache" not in name)


class Table:
    def __init__(self):
        self.rows: list[str] = []

    def add(self, what, ref, ours, unit, speedup=None, limit=None, of_limit=None, fmt="{:.2f}") -> None:
        """ref/ours in `unit`, times unless it ends in "/s"; speedup/of_limit: the targets, if any."""
        higher = unit.endswith("/s")
        ratio = None if ref is None else (ours / ref if higher else ref / ours)
        fraction = None if limit is None else (ours / limit if higher else limit / ours)
        checks = [f"≥ {speedup:g}x " + "✗✓"[ratio >= speedup]] if speedup else []
        checks += [f"≥ {of_limit:.0%} of limit " + "✗✓"[fraction >= of_limit]] if of_limit else []
        cells = [what, "" if ref is None else fmt.format(ref), fmt.format(ours),
                 "" if ratio is None else f"{ratio:.2f}x", "" if limit is None else fmt.format(limit),
                 "" if fraction is None else f"{fraction:.0%}", "; ".join(checks)]  # fmt: skip
        self.rows.append("| " + " | ".join(cells) + " |")
        print("  " + self.rows[-1], flush=True)

    def note(self, text: str) -> None:
        self.rows.append(f"| {text} |  |  |  |  |  |  |")
        print("  " + text, flush=True)

    def markdown(self) -> str:
        head = "| measurement | transformers | minaf3 | speed-up | limit | of limit | target |\n"
        return head + "|---|---:|---:|---:|---:|---:|---|\n" + "\n".join(self.rows)


def tiny_rows(path: Path, table: Table, args) -> None:
    """Rows 1 and 4: the per-step overhead at full depth, batch 1 and batch 8."""
    n, nb, gen = args.tokens, max(8, args.tokens // 2), torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4000, (1, 32), generator=gen)
    lengths = torch.tensor([8, 14, 20, 26, 32, 38, 44, 50])
    batch_mask = (torch.arange(50) >= 50 - lengths[:, None]).long()  # (8, 50), left padding
    batch = (torch.randint(0, 4000, (8, 50), generator=gen) * batch_mask, batch_mask)
    single = (ids, torch.ones_like(ids))
    ref, ours = load(path, "transformers"), load(path, "minaf3")
    modes = {"eager": False, "compiled": "default"} | (
        {"max-autotune": "max-autotune-no-cudagraphs"} if args.autotune else {}
    )
    expected = hf_generate(ref, *single, n), hf_generate(ref, *batch, nb)
    for label, mode in modes.items():
        start = time.perf_counter()
        same = (
            torch.equal(ours_generate(ours, *single, n, mode), expected[0]),
            torch.equal(ours_generate(ours, *batch, nb, mode), expected[1]),
        )
        table.note(f"{label}: greedy tokens equal transformers' (batch 1, batch 8): {same[0]}, {same[1]}; "
                   f"first calls {time.perf_counter() - start:.0f} s (with compilation)")  # fmt: skip

    def runs(inputs):
        return {"transformers": lambda k: hf_generate(ref, *inputs, k)} | {
            label: lambda k, mode=mode: ours_generate(ours, *inputs, k, mode) for label, mode in modes.items()
        }

    step = decode_race(runs(single), n, args.repeats, extra=rate_probes())
    step8 = decode_race(runs(batch), nb, args.repeats)
    limit = 1e3 * decode_bytes(ours) / rates(step)[1]
    for label in modes:
        table.add(f"1. decode, tiny width, 32+28 layers, batch 1, {label} (ms/token)",
                  1e3 * step["transformers"], 1e3 * step[label], "ms", speedup=8, limit=limit)  # fmt: skip
    for label in modes:
        ref_rate, rate = 8 / step8["transformers"], 8 / step8[label]
        table.add(f"4. decode, tiny width, batch 8, prompts 8..50, {label} (tokens/s)", ref_rate, rate,
                  "tokens/s", speedup=2, fmt="{:.0f}")  # fmt: skip
    table.note(f"1. limit: {decode_bytes(ours) / 1e6:.1f} MB of weights read per token at the read bandwidth")
    from bench_prompts import prompt_rows  # imported here: bench_prompts imports this module

    prompt_rows(ref, ours, modes, table, args)


def ttft_flops(audio: dict, text: dict, samples: int, prompt: int) -> float:
    """FLOPs before the first token: conv front end and encoder over the clip's frames only, projector over
    its audio tokens, decoder layers over the prompt (causal attention: half the score matrix)."""
    L = math.ceil(samples / 160)  # mel frames
    L1 = (L - 1) // 2 + 1  # after conv2
    K = (L1 - 2) // 2 + 1  # audio tokens
    H, F = audio["hidden_size"], audio["intermediate_size"]
    encoder = 2 * L * 128 * 3 * H + 2 * L1 * 3 * H * H
    encoder += audio["num_hidden_layers"] * (2 * L1 * (4 * H * H + 2 * H * F) + 4 * L1 * L1 * H)
    D, ffn, heads, kv = (text[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                           "num_key_value_heads"))  # fmt: skip
    hd = D // heads
    layer = 2 * prompt * (D * (heads + 2 * kv) * hd + heads * hd * D + 3 * D * ffn)
    layer += 4 * (prompt * (prompt + 1) / 2) * heads * hd
    return encoder + 2 * K * (H * D + D * D) + text["num_hidden_layers"] * layer


def official_rows(path: Path, table: Table, args) -> None:
    """Rows 2 and 3: time to first token on a 5 s clip (fp32, int8, int4, bf16), and memory-bound decode in
    fp32, int8 and bf16."""
    from minaf3.kernels import gemm
    from minaf3.kernels.registry import override

    from minaf3.features import log_mel_spectrogram
    from minaf3.windows import audio_token_count

    audio_cfg, text_cfg, _ = OFFICIAL
    vocab, gen = text_cfg["vocab_size"], torch.Generator().manual_seed(1)
    clip = (0.1 * np.random.default_rng(0).standard_normal(CLIP_SAMPLES)).astype(np.float32)
    features, features_mask = log_mel_spectrogram(clip)
    audio = dict(input_features=features, input_features_mask=features_mask)
    question = torch.randint(0, 150_000, (1, 30), generator=gen)
    ids = torch.cat([torch.full((1, audio_token_count(CLIP_SAMPLES)), vocab - 1), question], dim=1)
    text = torch.randint(0, 150_000, (1, 16), generator=gen)
    ref, ours, int8 = load(path, "transformers"), load(path, "minaf3"), load(path, "minaf3", quantize="int8")
    int4 = load(path, "minaf3", quantize="int4")
    ones = torch.ones_like(ids)

    def on_avx2_kernels(model):  # the products a CPU without AVX-512 runs
        def call():
            with override(gemm=True, vnni_prefill=False, bf16_prefill=False):
                return ours_generate(model, ids, ones, 1, **audio)

        return call

    ttft = race(
        {
            "transformers": lambda: hf_generate(ref, ids, ones, 1, **audio),
            "minaf3": lambda: ours_generate(ours, ids, ones, 1, **audio),
            "minaf3 int8": lambda: ours_generate(int8, ids, ones, 1, **audio),
            "minaf3 int4": lambda: ours_generate(int4, ids, ones, 1, **audio),
        }
        | (
            {"minaf3 int8 avx2": on_avx2_kernels(int8), "minaf3 int4 avx2": on_avx2_kernels(int4)}
            if gemm.load_library()
            else {}
        )
        | rate_probes(),
        args.repeats,
    )
    flops, read = rates(ttft)
    limit = (
        ttft_flops(audio_cfg, text_cfg, CLIP_SAMPLES, ids.shape[1]) / flops
        + text_cfg["hidden_size"] * vocab * 4 / read
    )
    table.add(
        "2. time to first token, official widths, 2+2 layers, 5 s clip + 30 tokens (s)",
        ttft["transformers"],
        ttft["minaf3"],
        "s",
        speedup=1.8,
        limit=limit,
        of_limit=1 / 1.2,
    )
    for label, name in (
        ("int8 decoder", "minaf3 int8"),
        ("int4 decoder", "minaf3 int4"),
        ("int8 decoder, a CPU without AVX-512's kernels", "minaf3 int8 avx2"),
        ("int4 decoder, a CPU without AVX-512's kernels", "minaf3 int4 avx2"),
    ):
        if name in ttft:
            table.add(f"2. time to first token as above, {label} (s)", ttft["transformers"], ttft[name], "s")

    ones = torch.ones_like(text)
    runs = {"transformers": lambda k: hf_generate(ref, text, ones, k)}
    for label, model in (("fp32", ours), ("int8", int8)):
        for mode in (False, "default"):
            name = f"{label}, {'compiled' if mode else 'eager'}"
            runs[name] = lambda k, model=model, mode=mode: ours_generate(model, text, ones, k, mode)
    # bf16 (the default on CPUs with bf16 instructions), eager, against transformers in bf16
    ref_bf16, ours_bf16 = (load(path, which, dtype=torch.bfloat16) for which in ("transformers", "minaf3"))
    runs["transformers bf16"] = lambda k: hf_generate(ref_bf16, text, ones, k)
    runs["bf16, eager"] = lambda k: ours_generate(ours_bf16, text, ones, k)
    step = decode_race(runs, args.big_tokens, args.repeats, extra=rate_probes())
    # Row 2 in bf16, what a model too large for float32 runs (transformers wants features in its dtype).
    # transformers' bf16 products are emulated on CPUs without bf16 instructions (~30 s a call on the
    # 2-core machine), hence a quarter of the turns.
    mask16 = torch.ones_like(ids)
    ttft16 = race(
        {
            "transformers": lambda: hf_generate(
                ref_bf16,
                ids,
                mask16,
                1,
                input_features=features.bfloat16(),
                input_features_mask=features_mask,
            ),
            "minaf3": lambda: ours_generate(ours_bf16, ids, mask16, 1, **audio),
        },
        max(1, args.repeats // 4),
    )
    table.add("2. time to first token as above, bf16 (s)", ttft16["transformers"], ttft16["minaf3"], "s")
    for name in [name for name in runs if not name.startswith("transformers")]:
        model = {"int8": int8, "bf16": ours_bf16}.get(name.split(",")[0], ours)
        ref_name = "transformers bf16" if model is ours_bf16 else "transformers"
        table.add(
            f"3. decode, official widths, 2 layers + lm_head, batch 1, {name} (ms/token)",
            1e3 * step[ref_name],
            1e3 * step[name],
            "ms",
            speedup=3 if model is int8 else None,
            limit=1e3 * decode_bytes(model) / rates(step)[1],
            of_limit=None if model is ours_bf16 else 0.8,  # bf16: no target
            fmt="{:.1f}",
        )
    with torch.inference_mode():
        expected, got = (m(input_ids=text).logits[0, -1] for m in (ours, int8))
    error = ((got - expected).norm() / expected.norm()).item()
    table.note(f"3. int8 logits vs fp32: relative L2 {error:.2%} (target < 2%: {'✗✓'[error < 0.02]})")
    sources = ", ".join(f"{what} {e:.2%}" for what, e in int8_error_sources(path, text, expected).items())
    table.note(f"3. the same with only some layers int8: {sources}")
    with torch.inference_mode():  # how much this random model amplifies small weight errors, on the reference
        ref_fp32, ref_half = (m(input_ids=text).logits[0, -1].float() for m in (ref, ref_bf16))
    error = ((ref_half - ref_fp32).norm() / ref_fp32.norm()).item()
    table.note(f"3. for scale, transformers' own bf16 logits vs its fp32: relative L2 {error:.2%}")


def int8_error_sources(path: Path, text: torch.Tensor, expected: torch.Tensor) -> dict:
    """Relative L2 of the last position's logits when only the layers under one prefix are int8: where the
    whole model's error comes from (each run loads the fp32 model afresh and quantizes those layers)."""
    from minaf3.quantize import quantizable_linears, quantize_layers

    errors = {}
    for what, prefix in (("lm_head", "lm_head"), ("layer 0", "language_model.layers.0."),
                         ("layer 1", "language_model.layers.1.")):  # fmt: skip
        model = load(path, "minaf3")
        quantize_layers(model, [name for name in quantizable_linears(model) if name.startswith(prefix)])
        with torch.inference_mode():
            got = model(input_ids=text).logits[0, -1]
        errors[what] = ((got - expected).norm() / expected.norm()).item()
    return errors


def cuda_rows(table: Table, args) -> None:
    """Row 5: the full official model in bf16 on the GPU (random weights made in memory, no checkpoint)."""
    from minaf3 import AudioFlamingo3ForConditionalGeneration
    from minaf3.config import AudioFlamingo3Config

    device = torch.device("cuda")
    audio_cfg, text_cfg, std = OFFICIAL
    audio_cfg, text_cfg = dict(audio_cfg, num_hidden_layers=32), dict(text_cfg, num_hidden_layers=28)
    with torch.device("meta"):
        model = AudioFlamingo3ForConditionalGeneration(
            AudioFlamingo3Config.from_dict(hf_config(audio_cfg, text_cfg).to_dict())
        )
    model = model.to_empty(device=device).to(torch.bfloat16).eval()
    init_random_(model, std)
    model.language_model.reset_buffers(device)
    x = torch.empty(2 * GIB, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ids = torch.randint(0, 150_000, (1, 64), device=device)
    features = torch.randn(20, 128, 3000, device=device)
    mask = torch.ones(20, 3000, dtype=torch.long, device=device)

    def synced(fn):
        return lambda *a: (fn(*a), torch.cuda.synchronize())

    times = race(
        {
            "copy": synced(lambda: y.copy_(x)),
            "encode": synced(lambda: model.get_audio_features(features, mask)),
        },
        args.repeats,
    )
    peak = 2 * x.nbytes / times["copy"]  # read + write
    decode = synced(lambda k: ours_generate(model, ids, torch.ones_like(ids), k, compile=True))
    tps = 1 / decode_race({"bf16": decode}, 4 * args.tokens, args.repeats)["bf16"]
    table.add("5. CUDA decode, full model, bf16, batch 1 (tokens/s)", None, tps, "tokens/s",
              limit=peak / decode_bytes(model), fmt="{:.0f}")  # fmt: skip
    table.note(
        f"5. CUDA: {decode_bytes(model) * tps / peak:.0%} of the {peak / 1e12:.2f} TB/s copy bandwidth"
    )
    table.add("5. CUDA encoder, 10 minutes of audio (20 windows), 32 layers (ms)", None,
              1e3 * times["encode"], "ms", fmt="{:.0f}")  # fmt: skip


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
    parser.add_argument("--autotune", action="store_true", help="also max-autotune-no-cudagraphs (slow)")
    parser.add_argument("--rows", choices=["all", "tiny", "official"], default="all",
                        help="tiny: rows 1 (long prompts too), 4; official: 2, 3 (5 on CUDA)")  # fmt: skip
    parser.add_argument("--dir", default=None, help="folder for the temporary checkpoints (about 7 GB)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    start = time.perf_counter()
    flops, read = rates(race(rate_probes(), 5))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads; "
          f"at the start: fp32 matmul {flops / 1e9:.0f} GFLOP/s, read {read / 1e9:.1f} GB/s, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    print(describe_cpu(*cpu_flags()), flush=True)
    table = Table()
    with torch.inference_mode(), tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if args.rows != "official":
            tiny_rows(write_checkpoint(Path(tmp) / "tiny", TINY), table, args)
        if args.rows != "tiny":
            official_rows(write_checkpoint(Path(tmp) / "official", OFFICIAL), table, args)
        if torch.cuda.is_available() and args.rows != "tiny":
            cuda_rows(table, args)
    print(f"\n{table.markdown()}\n\n{time.perf_counter() - start:.0f} s in all; "
          f"load average {os.getloadavg()[0]:.1f} at the end")  # fmt: skip


if __name__ == "__main__":
    main()
