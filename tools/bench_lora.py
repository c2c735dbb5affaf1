"""Memory and step time of LoRA fine-tuning at the official widths: minaf3 finetune's step against
transformers + peft on the same batch.

    python tools/bench_lora.py [--dir DIR] [--steps 4] [--rank 16]

The checkpoint has AF3's official widths (encoder 1280, decoder 3584, vocabulary 151,672) with 2 + 2 layers,
bf16 as the official one is stored (tools/bench_load.py writes it, with transformers' save_pretrained). Each
contender runs in a fresh process: load the model in bf16, put LoRA (rank 16, alpha 32) on every linear
layer of the decoder, and take `--steps` AdamW steps on one batch of two 5 s clips with a question and an
answer (labels on the answer only, built by minaf3's processor for both). Each child reports its peak
resident memory (VmHWM), its weights' bytes, the bytes autograd saved for the backward pass during one
forward other than the model's own tensors (the activations), its resident memory before loading (Python,
torch and the library: the runtime), and its step times (the first is a warm-up).

Target: minaf3's peak resident memory at most its runtime + weights x 1.15 + activations: the base model
is trained in place, frozen, with no float32 copy, no gradients and no optimizer state of its own.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from racing import cpu_flags, describe_cpu

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9
ANSWER = "A person speaks over a low hum."
QUESTION = "What is in this audio?"
TARGET = 1.15  # peak <= runtime + TARGET x weights + activations


def resident_bytes() -> int:
    """This process's resident memory now, from /proc/self/statm."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    """This process's peak resident memory since it started its program: VmHWM in /proc/self/status.

    Not wait4's ru_maxrss, which a child inherits from the parent it was forked from (here a parent that
    may have just written the checkpoint)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def batch_for(path: Path, torch) -> dict:
    """Two clips (5 s, 2.5 s), each with the question and the answer; labels on the answer only."""
    import numpy as np

    from minaf3 import AutoProcessor

    clip = np.load(path / "clip.npy")
    conversations = [
        [
            {
                "role": "user",
                "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": QUESTION}],
            },
            {"role": "assistant", "content": ANSWER},
        ]
        for audio in (clip, clip[: len(clip) // 2])
    ]
    batch = AutoProcessor.from_pretrained(path).apply_chat_template(
        conversations, add_generation_prompt=False, output_labels="assistant", padding_side="right"
    )
    return dict(batch) | {"input_features": batch["input_features"].to(torch.bfloat16)}


def child(package: str, path: Path, steps: int, rank: int) -> None:
    """One contender in a fresh process; prints its figures as JSON."""
    import torch

    from minaf3.finetune import add_lora, target_pattern
    from minaf3.finetune_config import DECODER_LINEARS, FinetuneConfig

    torch.manual_seed(0)
    if package == "minaf3":
        from minaf3 import AudioFlamingo3ForConditionalGeneration

        runtime = resident_bytes()  # Python, torch and the package, before any weight
        model = AudioFlamingo3ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
        trained = add_lora(model, FinetuneConfig(lora_rank=rank, lora_alpha=2.0 * rank))
    else:
        import peft
        from transformers import AudioFlamingo3ForConditionalGeneration

        runtime = resident_bytes()
        base = AudioFlamingo3ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target_pattern(DECODER_LINEARS))
        model = peft.get_peft_model(base, config)
        trained = [p for p in model.parameters() if p.requires_grad]
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values() if not t.requires_grad)
    loaded = resident_bytes()
    model.train()
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    batch = batch_for(path, torch)
    saved: dict[int, int] = {}
    # Autograd also saves the frozen weights (the backward pass multiplies by them): not activations.
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def pack(tensor):  # one count per storage: views of a saved tensor share it
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    times, losses = [], []
    for step in range(steps):
        started = time.perf_counter()
        if step == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(**batch).loss
        else:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        losses.append(loss.item())
    result = {"runtime": runtime, "loaded": loaded, "weights": weights, "activations": sum(saved.values())}
    result["peak"] = peak_resident_bytes()
    result |= {"trained": sum(p.numel() for p in trained), "times": times, "losses": losses}
    result["tokens"] = int(batch["attention_mask"].sum())
    print(json.dumps(result))


def run_child(arguments: list[str]) -> dict:
    """This script with `arguments` in a fresh interpreter: the JSON line it prints."""
    result = subprocess.run([sys.executable, __file__, *arguments], stdout=subprocess.PIPE, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(arguments)}: failed with exit code {result.returncode}")
    return json.loads(result.stdout.decode().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=None, help="checkpoint folder (default ~/.cache/minaf3/bench-lora)")
    parser.add_argument("--steps", type=int, default=4, help="steps each; the first is a warm-up")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--child", nargs=2, metavar=("PACKAGE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.steps, args.rank)
        return
    import torch

    print(describe_cpu(*cpu_flags()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    path = Path(args.dir or Path.home() / ".cache" / "minaf3" / "bench-lora")
    if not (path / "model.safetensors").is_file():
        from bench_load import write_checkpoint

        path.mkdir(parents=True, exist_ok=True)
        write_checkpoint(path, audio_layers=2, text_layers=2)
    options = ["--steps", str(args.steps), "--rank", str(args.rank)]
    results = {name: run_child([*options, "--child", name, str(path)]) for name in ("minaf3", "transformers")}
    tokens = results["minaf3"]["tokens"]
    print(f"\nofficial widths, 2 + 2 layers, bf16; LoRA r={args.rank} on the decoder's 7 linears per layer;")
    print(f"batch: 2 clips (5 s, 2.5 s) with a question and an answer, {tokens} tokens; {args.steps} steps\n")
    print(
        "| | weights GB | runtime GB | activations GB | peak RSS GB | peak - runtime - activations | step s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        spare = (r["peak"] - r["runtime"] - r["activations"]) / r["weights"]
        step = sorted(r["times"][1:])[len(r["times"][1:]) // 2] if len(r["times"]) > 1 else r["times"][0]
        cells = [r["weights"], r["runtime"], r["activations"], r["peak"]]
        print(
            f"| {name} | "
            + " | ".join(f"{c / GB:.2f}" for c in cells)
            + f" | {spare:.2f}x weights | {step:.2f} |"
        )
    m = results["minaf3"]
    limit = m["runtime"] + TARGET * m["weights"] + m["activations"]
    ok = "✓" if m["peak"] <= limit else "✗"
    print(
        f"\nminaf3: peak {m['peak'] / GB:.2f} GB against runtime + {TARGET} x weights + activations = "
        f"{limit / GB:.2f} GB {ok}; trained parameters {m['trained'] / 1e6:.1f} M; "
        f"step time transformers / minaf3 {results['transformers']['times'][-1] / m['times'][-1]:.2f}x"
    )


if __name__ == "__main__":
    main()
