"""Training throughput: minaf3's training step against transformers' AudioFlamingo3 on the same batches.

    python tools/bench_train.py                 # the shipped recipe's model and batches, 12 steps each
    python tools/bench_train.py --steps 20 --threads 1

Both models start from the same weights (the recipe's `init_weights`, saved in the hub layout and loaded by
each library in float32) and take the same batches of `minaf3 train` (fresh clips, sorted by length, answer
labels) through the same step (`train.train_step`: loss, backward, clipping, AdamW). Only the model differs:
transformers' AudioFlamingo3ForConditionalGeneration computes every window's 30 s of encoder frames and the
logits of every position; minaf3 encodes only each clip's real frames and computes the loss at the labelled
positions. The first step's losses are compared (same weights, same batch: they must agree), then the two
race in turns, each turn one step of each on the same batch, so drift in the machine's speed hits both.
Tokens are the batch's real decoder tokens (audio + text, padding excluded). Rows: float32 for both, and
bf16 autocast for both where the CPU has bf16 instructions (what `minaf3 train` uses there).
"""

import argparse
import dataclasses
import tempfile
import time

import torch
from racing import cpu_flags, describe_cpu

from minaf3.dtypes import cpu_has_native_bf16
from minaf3.model import AudioFlamingo3ForConditionalGeneration
from minaf3.train import TrainConfig, new_model, new_optimizer, pool_batches, train_step, training_batch

TARGET = 1.5  # minaf3's tokens/s over transformers'


def race(models: dict, batches: list[dict], config: TrainConfig) -> dict[str, dict]:
    """Each turn one step of every model on the same batch; {name: {"tokens", "seconds", "losses"}}."""
    optimizers = {name: new_optimizer(model, config) for name, model in models.items()}
    results = {name: {"tokens": 0, "seconds": 0.0, "losses": []} for name in models}
    for i, batch in enumerate(batches):
        for name, model in models.items():
            started = time.perf_counter()
            loss, _ = train_step(model, optimizers[name], batch, config.lr, config)
            seconds = time.perf_counter() - started
            results[name]["losses"].append(loss)
            if i > 0:  # the first step warms up allocators and kernels
                results[name]["seconds"] += seconds
                results[name]["tokens"] += int(batch["attention_mask"].sum())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="steps each (the first is a warm-up)")
    # One thread: what each of `minaf3 train`'s two torchrun processes runs with on a 2-core machine.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from transformers import AudioFlamingo3ForConditionalGeneration as Reference

    torch.set_num_threads(args.threads)
    print(describe_cpu(*cpu_flags()))
    print(f"torch {torch.__version__}, {args.threads} threads")
    config = TrainConfig(threads=args.threads)
    model, processor = new_model(config)
    folder = tempfile.mkdtemp(prefix="bench_train_")
    model.save_pretrained(folder)
    batches = []
    for pool in range(args.steps // config.pool_batches + 1):
        batches += [training_batch(processor, clips) for clips in pool_batches(config, pool)]
    batches = batches[: args.steps]
    rows = [("float32", dataclasses.replace(config, bf16=False))]
    if cpu_has_native_bf16():
        rows.append(("bf16 autocast", dataclasses.replace(config, bf16=True)))
    print(f"model: the recipe's sizes, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters;")
    print(f"batches: {args.steps} of {config.batch_size} clips (the first a warm-up)\n")
    print("| step | transformers tokens/s | minaf3 tokens/s | speed-up | first loss, transformers / minaf3 |")
    print("|---|---:|---:|---:|---|")
    for label, settings in rows:
        models = {
            "transformers": Reference.from_pretrained(folder, dtype=torch.float32).train(),
            "minaf3": AudioFlamingo3ForConditionalGeneration.from_pretrained(folder, dtype="float32").train(),
        }
        results = race(models, batches, settings)
        rate = {name: r["tokens"] / r["seconds"] for name, r in results.items()}
        first = [results[name]["losses"][0] for name in ("transformers", "minaf3")]
        ratio = rate["minaf3"] / rate["transformers"]
        mark = "✓" if ratio >= TARGET else "✗"
        print(
            f"| {label} | {rate['transformers']:,.0f} | {rate['minaf3']:,.0f} | {ratio:.2f}x "
            f"(target ≥ {TARGET}x {mark}) | {first[0]:.4f} / {first[1]:.4f} |"
        )


if __name__ == "__main__":
    main()
