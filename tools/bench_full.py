"""The real model's size on this machine: a full-size AF3 checkpoint (random bf16 weights, the official names,
shapes and sharding) loaded and run in bf16, int8 and int4, and transformers 5.23 in bf16 as far as it gets.

    python tools/bench_full.py [--dir ~/.cache/minaf3/bench-full] [--modes bf16 int8 int4] [--tokens 16]
                               [--transformers-cap 900] [--audio-layers 32] [--text-layers 28]

The checkpoint is written once into --dir (16.5 GB at full depth, about two minutes) and reused: nothing of
it is kept in the repository. Each mode runs in a fresh process, so that its memory is its own:
  load          seconds from from_pretrained's call to a model ready to generate
  peak anon     the largest anonymous resident memory seen during the whole run (RssAnon, sampled every
                20 ms): what the process itself allocated, weights it holds in memory included
  file mapped   resident pages of the checkpoint's files still mapped after loading (RssFile): weights
                used in place as views of the file, which the OS can drop and read again
  TTFT 5 s / 60 s   time to the first token for a 5 s and a 60 s clip (features, encoder, prefill)
  decode        ms per token after the 5 s clip's prompt, timed between streamed tokens (the prefill, which
                varies by more than a few steps take, is not in it), greedy; best of DECODE_ROUNDS + 1 (one
                before the read probe is allocated, one after each probe)
  read GB/s     the memory's read rate (a sum over READ_PROBE_BYTES), measured in the same process in turns
                with the decode rounds, best of DECODE_ROUNDS: this machine's read speed moves in phases of
                seconds, so a rate taken minutes apart would set the wrong limit
  limit         bytes the decoder and lm_head read per token / that read rate
  peak RSS      the kernel's peak resident memory of the process (VmHWM): anonymous and file pages
  estimate      `minaf3 estimate` for one 60 s clip in that mode, against the measured peak RSS
transformers runs in a process of its own under a time cap; what it has not reached by then is left empty.
"""

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from racing import Clock, cpu_flags, describe_cpu

ROOT = Path(__file__).resolve().parent.parent
SR = 16_000
GB = 1e9
SHARD_BYTES = 4 * 10**9  # the hub checkpoint's shards hold up to 4 GB each (5 shards at full size)
DONE = "bench-full-complete"  # written last: a folder without it is rewritten
MODES = {"bf16": (None, "bfloat16"), "int8": ("int8", None), "int4": ("int4", None)}
DECODE_ROUNDS = 3
# The read probe: far larger than any cache. It is allocated after the peak memory has been reported, so it
# is not counted in it.
READ_PROBE_BYTES = 256 * 2**20


# ---- the checkpoint ---------------------------------------------------------------------------------------
def write_checkpoint(folder: Path, audio_layers: int, text_layers: int) -> None:
    """The official widths and names (hub layout), random bf16 weights, shards of SHARD_BYTES, support files
    written by transformers' own save_pretrained; skipped when the folder is complete."""
    if (folder / DONE).exists():
        return
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tools"))
    from bench_load import write_support_files
    from minaf3.weights.layouts import HUB, checkpoint_names

    from minaf3 import AudioFlamingo3ForConditionalGeneration
    from minaf3.config import AudioFlamingo3Config

    folder.mkdir(parents=True, exist_ok=True)
    write_support_files(folder, audio_layers, text_layers)
    with torch.device("meta"):
        model = AudioFlamingo3ForConditionalGeneration(AudioFlamingo3Config.from_file(folder))
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    names = checkpoint_names(HUB, shapes)
    generator = torch.Generator().manual_seed(0)
    shards, shard, size = [], {}, 0
    for ours, shape in shapes.items():
        if "norm" in ours and len(shape) == 1:
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        if shard and size + tensor.nbytes > SHARD_BYTES:
            shards.append(shard)
            shard, size = {}, 0
        shard[names[ours]] = tensor
        size += tensor.nbytes
    shards.append(shard)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s.values())}, "weight_map": {}}
    for file, tensors in zip(files, shards, strict=True):
        save_file(tensors, folder / file, metadata={"format": "pt"})
        index["weight_map"].update(dict.fromkeys(tensors, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / DONE).touch()


# ---- one mode, in its own process -------------------------------------------------------------------------
class PeakAnon:
    """The largest RssAnon of this process, sampled by a thread every 20 ms."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.status("RssAnon"))

    def stop(self) -> None:
        self._stop.set()


def say(report: dict, peak: PeakAnon) -> None:
    """Print the report so far, with the peak anonymous memory up to now, as one JSON line."""
    report["peak_anon"] = max(report.get("peak_anon", 0), peak.peak, PeakAnon.status("RssAnon"))
    report["peak_rss"] = PeakAnon.status("VmHWM")  # the kernel's own peak: anonymous and file pages
    print(json.dumps(report), flush=True)


def child(library: str, folder: Path, mode: str, tokens: int) -> None:
    """Load, time the first token for 5 s and 60 s clips, then decoding; print one JSON line per stage so
    that a run stopped by the time cap still reports what it reached."""
    peak = PeakAnon()
    import numpy as np
    import torch

    quantize, dtype = MODES[mode]
    started = time.perf_counter()
    if library == "minaf3":
        import minaf3

        pipe = minaf3.load(folder, quantize=quantize, dtype=dtype)
        model, processor = pipe.model, pipe.processor
    else:
        from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor

        model = AudioFlamingo3ForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
        processor = AutoProcessor.from_pretrained(folder)
    loaded = time.perf_counter() - started
    report = {"load": loaded, "file": PeakAnon.status("RssFile")}
    say(report, peak)

    def run(seconds: float, new_tokens: int, clock: Clock | None = None):
        """Seconds for one call on a `seconds` clip, or `clock` (a streamer) timing its tokens."""
        clip = (np.random.default_rng(0).standard_normal(int(seconds * SR)) * 0.1).astype(np.float32)
        content = [{"type": "text", "text": "What is in this audio?"}, {"type": "audio", "audio": clip}]
        conversation = [{"role": "user", "content": content}]
        begin = time.perf_counter()
        inputs = dict(
            processor.apply_chat_template(
                conversation, tokenize=True, add_generation_prompt=True, return_dict=True
            )
        )
        inputs["input_features"] = inputs["input_features"].to(model.dtype)  # transformers wants its dtype
        with torch.inference_mode():
            n = new_tokens
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock)
        return clock if clock is not None else time.perf_counter() - begin

    run(5, 1)  # warm: kernels loaded, caches allocated
    for seconds in (5, 60):
        report[f"ttft_{seconds}"] = min(run(seconds, 1) for _ in range(2))
        say(report, peak)
    step = run(5, tokens, Clock()).per_step()
    say(report, peak)  # the last peak: the read probe below is the benchmark's, not the model's
    peak.stop()
    probe = torch.ones(READ_PROBE_BYTES // 4)
    read_rate = 0.0
    for _ in range(DECODE_ROUNDS):
        begin = time.perf_counter()
        probe.sum()
        read_rate = max(read_rate, probe.nbytes / (time.perf_counter() - begin))
        step = min(step, run(5, tokens, Clock()).per_step())
    report["decode"], report["read_rate"] = step, read_rate
    # What one token reads: every decoder layer's tensors and the lm_head (embed_tokens is only indexed).
    read = [
        t
        for n, t in model.state_dict().items()
        if ("language_model" in n and ".layers." in n) or "lm_head" in n
    ]
    report["read_per_token"] = sum(t.nbytes for t in read)
    print(json.dumps(report), flush=True)


def run_child(library: str, folder: Path, mode: str, tokens: int, cap: float | None) -> dict:
    """This script as a child process; the last JSON line it printed (all of it when it was cut short)."""
    command = [sys.executable, __file__, "--child", library, "--mode", mode, "--folder", str(folder)]
    command += ["--tokens", str(tokens)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=cap, cwd=ROOT)
        out, finished = done.stdout, done.returncode == 0
        if not finished:
            print(done.stderr[-2000:], file=sys.stderr)
    except subprocess.TimeoutExpired as stopped:
        out, finished = (stopped.stdout or b"").decode() if isinstance(stopped.stdout, bytes) else (
            stopped.stdout or ""), False  # fmt: skip
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return dict(json.loads(lines[-1]) if lines else {}, finished=finished)


# ---- the parent: the table ------------------------------------------------------------------------------
def estimate_peak(folder: Path, mode: str) -> int:
    from minaf3.estimate import estimate_memory

    quantize, dtype = MODES[mode]
    return estimate_memory(folder, seconds=60, quantize=quantize, dtype=dtype or "bfloat16").total


def table(results: dict[str, dict], estimates: dict[str, int]) -> str:
    rows = [
        "| run | load s | peak anon GB | peak RSS GB | estimate GB (vs RSS) | file mapped GB | TTFT 5 s "
        "| TTFT 60 s "
        "| decode ms/token | read GB/s | limit ms/token | of limit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(value, fmt):
        return "" if value is None else fmt.format(value)

    for run, r in results.items():
        rate = r.get("read_rate")
        limit = r["read_per_token"] / rate * 1e3 if rate and r.get("read_per_token") else None
        decode = r["decode"] * 1e3 if "decode" in r else None
        estimate = estimates.get(run)
        peak, rss = r.get("peak_anon"), r.get("peak_rss")
        versus = f" ({estimate / rss - 1:+.0%})" if estimate and rss else ""
        rows.append(
            f"| {run}{'' if r['finished'] else ' (stopped by the time cap)'} "
            f"| {cell(r.get('load'), '{:.1f}')} "
            f"| {cell(peak and peak / GB, '{:.2f}')} | {cell(rss and rss / GB, '{:.2f}')} "
            f"| {cell(estimate and estimate / GB, '{:.2f}')}{versus} "
            f"| {cell(r.get('file') and r['file'] / GB, '{:.2f}')} | {cell(r.get('ttft_5'), '{:.2f}')} "
            f"| {cell(r.get('ttft_60'), '{:.2f}')} | {cell(decode, '{:.0f}')} "
            f"| {cell(rate and rate / GB, '{:.1f}')} | {cell(limit, '{:.0f}')} "
            f"| {cell(limit and decode and limit / decode, '{:.0%}')} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "minaf3" / "bench-full")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--tokens", type=int, default=16, help="new tokens of the decode measurement")
    parser.add_argument("--transformers-cap", type=float, default=900, help="seconds; 0 skips transformers")
    parser.add_argument("--audio-layers", type=int, default=32)
    parser.add_argument("--text-layers", type=int, default=28)
    parser.add_argument("--child", choices=["minaf3", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.dir / f"af3-{args.audio_layers}-{args.text_layers}"
    if args.child:
        return child(args.child, args.folder, args.mode, args.tokens)
    started = time.perf_counter()
    write_checkpoint(folder, args.audio_layers, args.text_layers)
    layers = f"{args.audio_layers} encoder + {args.text_layers} decoder layers"
    print(describe_cpu(*cpu_flags()))
    print(f"checkpoint {folder} ({layers}, ready in {time.perf_counter() - started:.0f} s)")
    results, estimates = {}, {}
    for mode in args.modes:
        results[f"minaf3 {mode}"] = run_child("minaf3", folder, mode, args.tokens, None)
        estimates[f"minaf3 {mode}"] = estimate_peak(folder, mode)
        print(f"  minaf3 {mode}: {results[f'minaf3 {mode}']}", flush=True)
    if args.transformers_cap > 0:
        results["transformers bf16"] = run_child(
            "transformers", folder, "bf16", args.tokens, args.transformers_cap
        )
        print(f"  transformers bf16: {results['transformers bf16']}", flush=True)
    print(f"{time.perf_counter() - started:.0f} s in all")
    print(table(results, estimates))


if __name__ == "__main__":
    main()
