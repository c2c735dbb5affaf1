"""Throughput of `minaf3 batch` on the CPU: one process against torchrun ranks, items per second.

    python tools/bench_batch.py [--items 48] [--max-new-tokens 16] [--repeats 2] [--tiny] [--dir DIR]

Writes a random-weight checkpoint in the hub layout (minaf3.demo, no transformers needed; BENCH_SIZES: wide
enough that matrix products, not Python, take most of the time) and a manifest of speech-like clips of 2 to
12 s, then runs the same manifest, greedy, as:

    1 rank  x all cores    python -m minaf3.batch ... --threads <cores>
    1 rank  x 1 thread     python -m minaf3.batch ... --threads 1
    N ranks x 1 thread     torchrun --standalone --nproc-per-node N -m minaf3.batch ...   (N = cores)

Each run is a fresh process tree with a fresh output file. "generate s" is rank 0's clock from the barrier
after every rank has loaded the model to the barrier after every rank has written its records, so it leaves
out interpreter start, rendezvous and loading, which "wall s" includes. The best of --repeats runs is shown,
with the machine's load average: other work on the cores slows the runs that use more of them most.
Every run must produce the same output file (greedy decoding): the script checks it. On a machine shared
with other work the numbers move by tens of percent from run to run.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf

from minaf3.demo import demo_clip, write_demo_checkpoint
from minaf3.windows import SAMPLING_RATE

# Two layers each, hidden 256 / 512: ~1 GFLOP per second of audio in the encoder, ~20 MFLOP per decoded
# token; the demo's sizes (--tiny) are small enough that per-call Python overhead dominates instead.
BENCH_SIZES = {
    "audio_layers": 2,
    "audio_hidden": 256,
    "audio_heads": 4,
    "text_layers": 2,
    "text_hidden": 512,
    "text_heads": 8,
    "text_kv_heads": 2,
}
SUMMARY = re.compile(r"(\d+) generated now in ([\d.]+) s")
PROMPTS = ("What is in this audio?", "Describe the sound in detail.", None)  # None: a transcription request


def write_corpus(root: Path, items: int) -> Path:
    """`items` clips of 2 to 12 s and a manifest mixing questions and transcription requests."""
    (root / "clips").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(items):
        seconds = 2 + (i * 7) % 11  # lengths spread over 2..12 s, in no order
        sf.write(root / f"clips/{i:03d}.wav", demo_clip(seconds, seed=i), SAMPLING_RATE, subtype="PCM_16")
        line = {"id": f"{i:03d}", "audio": f"clips/{i:03d}.wav"}
        prompt = PROMPTS[i % len(PROMPTS)]
        lines.append(line if prompt is None else {**line, "prompt": prompt})
    manifest = root / "in.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def run(ranks: int, threads: int | None, model: Path, manifest: Path, out: Path, new_tokens: int) -> dict:
    """One run in fresh processes -> wall seconds, rank 0's generate seconds, the output's text."""
    out.unlink(missing_ok=True)
    args = [
        "--model",
        str(model),
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--greedy",
        "--no-progress",
    ]
    args += ["--max-new-tokens", str(new_tokens)] + (["--threads", str(threads)] if threads else [])
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    started = time.perf_counter()
    done = subprocess.run([*launcher, "-m", "minaf3.batch", *args], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"run with {ranks} rank(s) failed:\n{done.stderr}")
    if '"error": ' in out.read_text():  # a broken build would otherwise time how fast items fail
        sys.exit(f"run with {ranks} rank(s) recorded errors:\n{out.read_text()}")
    generated, seconds = SUMMARY.search(done.stderr).groups()
    return {"wall": wall, "generate": float(seconds), "items": int(generated), "output": out.read_text()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the demo's sizes instead of BENCH_SIZES")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench_batch_"))
    model = write_demo_checkpoint(root / "model", **({} if args.tiny else BENCH_SIZES))
    manifest = write_corpus(root, args.items)
    configs = [(1, cores), (1, 1), (cores, 1)] if cores > 1 else [(1, 1)]
    runs: dict[tuple[int, int], list[dict]] = {config: [] for config in configs}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):  # configurations interleaved, so a change in the machine's load hits all
        for ranks, threads in configs:
            out = root / "out.jsonl"
            runs[ranks, threads].append(
                run(ranks, threads if ranks == 1 else None, model, manifest, out, args.max_new_tokens)
            )
    outputs = {r["output"] for config_runs in runs.values() for r in config_runs}
    if len(outputs) != 1:
        sys.exit("the runs wrote different outputs; greedy decoding must not depend on ranks or threads")
    sizes = "demo sizes" if args.tiny else ", ".join(f"{k} {v}" for k, v in BENCH_SIZES.items())
    print(
        f"minaf3 batch on {cores} CPU cores: {args.items} items of 2-12 s, greedy, max_new_tokens "
        f"{args.max_new_tokens}, best of {args.repeats}; random weights ({sizes})\n"
    )
    print("| ranks x threads | generate s | items/s | vs 1 rank x 1 thread | wall s (start, load, merge) |")
    print("|---|---|---|---|---|")
    best = {config: min(config_runs, key=lambda r: r["generate"]) for config, config_runs in runs.items()}
    base = best[1, 1]["items"] / best[1, 1]["generate"]
    for (ranks, threads), run_ in best.items():
        rate = run_["items"] / run_["generate"]
        wall = min(r["wall"] for r in runs[ranks, threads])
        print(
            f"| {ranks} x {threads} | {run_['generate']:.2f} | {rate:.2f} | {rate / base:.2f}x | {wall:.1f} |"
        )
    print(f"\nload average (1 min) before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
