"""Cold start, minaf3 against transformers: import, load a checkpoint with official widths, one forward.

    python tools/bench_load.py [--audio-layers 2] [--text-layers 2] [--repeats 2] [--dir DIR]

The script writes an AF3 checkpoint with the official widths (encoder 1280 wide, 20 heads, ffn 5120; decoder
3584 wide, 28 query / 4 KV heads, ffn 18944; vocabulary 151,672) but only a few layers, with transformers'
own save_pretrained in bf16 as the official one is stored. Each run is a fresh Python process that imports,
loads the checkpoint and processor, and runs the first forward of generation (last-position logits) on a 5 s
clip; the parent takes its wall time and its peak resident memory from wait4. The checkpoint's pages are in
the page cache for every run (dropping the cache needs root and would disturb others on a shared machine),
so "cold" means a cold process, not disk.

Both libraries run twice: with from_pretrained's default dtype and in float32. transformers' default is the
checkpoint's bf16; minaf3's is bf16 on CPUs with bf16 instructions (AVX-512 BF16, AMX) and float32 on the
others, where bf16 products are emulated and several times slower.
Targets: minaf3's peak RSS <= 1.2x its weights in memory; `import minaf3` adds < 0.3 s to torch's
import; the whole run >= 2x faster than transformers'.
"""

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SR = 16_000
CLIP_SECONDS = 5
QUESTION = "What is in this audio?"
GB = 1e9

# (label, package, from_pretrained dtype; None: the package's default). Each transformers run is compared
# with the minaf3 run of the same dtype, and the two defaults with each other.
RUNS = [
    ("minaf3", "minaf3", None),
    ("minaf3 float32", "minaf3", "float32"),
    ("transformers", "transformers", None),
    ("transformers float32", "transformers", "float32"),
]


def write_checkpoint(path: Path, audio_layers: int, text_layers: int) -> None:
    """An AF3 checkpoint folder with official widths, written by transformers in bf16, and a 5 s clip."""
    import numpy as np
    import torch
    from transformers import AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import speech_like

    write_support_files(path, audio_layers, text_layers)
    torch.manual_seed(0)
    model = AudioFlamingo3ForConditionalGeneration(AudioFlamingo3Config.from_pretrained(path)).to(
        torch.bfloat16
    )
    model.save_pretrained(path)
    np.save(path / "clip.npy", speech_like(CLIP_SECONDS * SR, SR, seed=0))


def write_support_files(path: Path, audio_layers: int, text_layers: int) -> None:
    """Everything of an official-width AF3 checkpoint folder but its weights, as transformers saves it:
    config.json (bf16), generation, tokenizer and processor files (a small BPE vocabulary inside the
    official 151,672-row embedding)."""
    from transformers import (
        AudioFlamingo3Config,
        AudioFlamingo3EncoderConfig,
        AudioFlamingo3Processor,
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
        WhisperFeatureExtractor,
    )

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tokenizer

    from minaf3.chat_template import REFERENCE_TEMPLATE

    tok = build_tokenizer()
    bos, eos, sound = (tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>", "<sound>"))
    audio = AudioFlamingo3EncoderConfig(
        num_mel_bins=128,
        hidden_size=1280,
        num_hidden_layers=audio_layers,
        num_attention_heads=20,
        intermediate_size=5120,
        max_source_positions=1500,
    )
    text = Qwen2Config(
        vocab_size=151_672,
        hidden_size=3584,
        intermediate_size=18_944,
        num_hidden_layers=text_layers,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=False,
    )
    config = AudioFlamingo3Config(
        audio_config=audio, text_config=text, audio_token_id=sound, dtype="bfloat16"
    )
    config.save_pretrained(path)
    GenerationConfig(bos_token_id=bos, eos_token_id=[eos, bos], pad_token_id=bos).save_pretrained(path)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<sound>"],
    )
    AudioFlamingo3Processor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128, return_attention_mask=True),
        tokenizer=tokenizer,
        chat_template=REFERENCE_TEMPLATE,
    ).save_pretrained(path)


def child(package: str, path: Path, dtype: str | None) -> None:
    """One cold run; prints its timings as JSON. Runs in a fresh process (`--child`)."""
    start = time.perf_counter()
    import torch

    after_torch = time.perf_counter()
    importlib.import_module(package)  # the bare package, before its model and processor modules
    after_package = time.perf_counter()
    if package == "minaf3":
        from minaf3 import AudioFlamingo3ForConditionalGeneration as Model
        from minaf3 import AudioFlamingo3Processor as Processor
    else:
        from transformers import AudioFlamingo3ForConditionalGeneration as Model
        from transformers import AudioFlamingo3Processor as Processor
    after_import = time.perf_counter()

    model = Model.from_pretrained(path, **({"dtype": getattr(torch, dtype)} if dtype else {})).eval()
    processor = Processor.from_pretrained(path)
    after_load = time.perf_counter()

    import numpy as np

    clip = np.load(path / "clip.npy")
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "audio", "audio": clip}]}
    ]
    inputs = dict(
        processor.apply_chat_template(
            conversation, tokenize=True, add_generation_prompt=True, return_dict=True
        )
    )
    inputs["input_features"] = inputs["input_features"].to(model.dtype)
    # The forward that starts generation: logits for the last position only (both libraries take
    # logits_to_keep), so the 151,672-row lm_head runs once, not once per prompt token.
    with torch.no_grad():
        logits = model(**inputs, logits_to_keep=1).logits
    after_forward = time.perf_counter()
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(
        json.dumps(
            {
                "import_torch": after_torch - start,
                "import_package": after_package - after_torch,
                "import_classes": after_import - after_torch,
                "load": after_load - after_import,
                "forward": after_forward - after_load,
                "weights_bytes": weights,
                "dtype": str(model.dtype).removeprefix("torch."),
                "tokens": int(logits.shape[1]),
            }
        )
    )


def run_cold(arguments: list[str]) -> dict:
    """Run this script with `arguments` in a fresh interpreter; its wall time, CPU time and peak RSS.

    The parent stays small on purpose: a child starts as a copy of it, and the kernel's peak RSS of the
    child includes the parent's pages it was forked (or vforked) from.
    """
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, *arguments], stdout=subprocess.PIPE, cwd=ROOT)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting again
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(arguments)}: failed with exit code {process.returncode}")
    lines = out.decode().strip().splitlines()
    result = json.loads(lines[-1]) if lines else {}
    cpu = usage.ru_utime + usage.ru_stime
    return dict(result, wall=wall, cpu=cpu, peak_rss=usage.ru_maxrss * 1024)  # ru_maxrss is in KiB


COLUMNS = (
    "| run | dtype | wall s | CPU s | import pkg s | import classes s | load s | forward s | peak RSS GB "
    "| weights in memory GB | RSS / weights | wall vs minaf3 same dtype |"
)


def report(results: dict[str, list[dict]], stored_bytes: int) -> None:
    """A markdown table of the medians, then the ratios the targets are stated in."""
    med = {
        label: {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "dtype"}
        for label, runs in results.items()
    }
    dtypes = {label: runs[0]["dtype"] for label, runs in results.items()}
    ours_by_dtype = {dtypes[label]: med[label] for label in med if label.startswith("minaf3")}
    repeats = len(results["minaf3"])
    print(f"\ncheckpoint files: {stored_bytes / GB:.2f} GB (bf16); medians of {repeats} cold run(s)\n")
    print(COLUMNS)
    print("|---" * COLUMNS.count(" | ") + "|---|")
    for label, m in med.items():
        same = ours_by_dtype.get(dtypes[label])
        versus = f"{m['wall'] / same['wall']:.2f}x" if same and not label.startswith("minaf3") else ""
        print(
            f"| {label} | {dtypes[label]} | {m['wall']:.2f} | {m['cpu']:.2f} | {m['import_package']:.2f} | "
            f"{m['import_classes']:.2f} | {m['load']:.2f} | {m['forward']:.2f} | {m['peak_rss'] / GB:.2f} | "
            f"{m['weights_bytes'] / GB:.2f} | {m['peak_rss'] / m['weights_bytes']:.2f} | {versus} |"
        )
    ours, theirs = med["minaf3"], med["transformers"]
    print(f"\nimport torch: {ours['import_torch']:.2f} s")
    print(f"on top of torch: `import minaf3` {ours['import_package']:.3f} s, with the model and processor")
    print(f"  modules {ours['import_classes']:.2f} s (target < 0.3 s); transformers")
    print(
        f"  {theirs['import_package']:.2f} s, with its model and processor {theirs['import_classes']:.2f} s"
    )
    print(f"defaults against each other: transformers' wall {theirs['wall'] / ours['wall']:.2f}x minaf3's,")
    print(f"  CPU {theirs['cpu'] / ours['cpu']:.2f}x (target >= 2x)")
    for label in med:
        if label.startswith("minaf3"):
            ratio = med[label]["peak_rss"] / med[label]["weights_bytes"]
            print(f"{label}: peak RSS / weights in memory {ratio:.2f} (target <= 1.2)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio-layers", type=int, default=2)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="reuse or keep the checkpoint here")
    parser.add_argument("--child", nargs=2, metavar=("PACKAGE", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--write", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.dtype)
        return
    if args.write:
        write_checkpoint(args.write, args.audio_layers, args.text_layers)
        return

    path = args.dir or Path(tempfile.mkdtemp(prefix="af3_bench_"))
    try:
        if not (path / "config.json").is_file():
            print(f"writing the checkpoint to {path} ...", flush=True)
            layers = ["--audio-layers", str(args.audio_layers), "--text-layers", str(args.text_layers)]
            run_cold(["--write", str(path), *layers])
        stored = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        results = {label: [] for label, _, _ in RUNS}
        for repeat in range(args.repeats):
            for label, package, dtype in RUNS:
                print(f"run {repeat + 1}/{args.repeats}: {label} ...", flush=True)
                results[label].append(
                    run_cold(["--child", package, str(path), *(["--dtype", dtype] if dtype else [])])
                )
        report(results, stored)
    finally:
        if args.dir is None:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
