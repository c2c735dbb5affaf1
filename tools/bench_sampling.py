"""Choosing the next token with AF3's sampling settings: minaf3 against transformers, per decode step.

    python tools/bench_sampling.py [--batch 1 8] [--repeats 50]

AF3's checkpoint samples by default (generation_config.json: temperature 0.7, top_k 20, top_p 0.8,
repetition_penalty 1.05), and `minaf3 chat` and `minaf3 batch` use those settings. At each step, both
libraries turn the last position's logits over the whole vocabulary (151,672) into one token per row:
    transformers  its logits processors (repetition penalty, temperature, top-k, top-p over the sorted
                  vocabulary), softmax and torch.multinomial, as its generate runs them
    minaf3        sampling.choose_tokens: the same processors, then top-p and the draw on the top-k
                  candidates alone
on the same random logits and a prompt of 200 seen tokens per row. Times are the best of --repeats turns,
the two raced in each turn (racing.race).
"""

import argparse

import torch
from racing import race

from minaf3.sampling import GenerationConfig, choose_tokens, seen_tokens

VOCAB = 151_672
SETTINGS = dict(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)


def step_times(batch: int, reference, config: GenerationConfig, repeats: int) -> tuple[float, float]:
    """(transformers, minaf3) best ms to choose one token per row of `batch` rows of random logits."""
    gen = torch.Generator().manual_seed(batch)
    logits = 4 * torch.randn(batch, VOCAB, generator=gen)
    ids = torch.randint(0, VOCAB, (batch, 200), generator=gen)
    seen = seen_tokens(ids, torch.ones_like(ids), VOCAB)

    def transformers_step():
        scores = reference(ids, logits.clone())
        return torch.multinomial(scores.softmax(-1), 1, generator=gen)[:, 0]

    def minaf3_step():
        return choose_tokens(logits, config, seen, 1, None, gen)

    times = race({"transformers": transformers_step, "minaf3": minaf3_step}, repeats)
    return 1e3 * times["transformers"], 1e3 * times["minaf3"]


def main() -> None:
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(SETTINGS["repetition_penalty"]),
            TemperatureLogitsWarper(SETTINGS["temperature"]),
            TopKLogitsWarper(SETTINGS["top_k"]),
            TopPLogitsWarper(SETTINGS["top_p"]),
        ]
    )
    config = GenerationConfig(do_sample=True, **SETTINGS)
    print(f"torch {torch.__version__}, {args.threads} threads; vocabulary {VOCAB}, settings {SETTINGS}\n")
    print("| batch | transformers ms/step | minaf3 ms/step | speed-up |\n|---|---:|---:|---:|")
    for batch in args.batch:
        ref, ours = step_times(batch, reference, config, args.repeats)
        print(f"| {batch} | {ref:.2f} | {ours:.2f} | {ref / ours:.1f}x |")


if __name__ == "__main__":
    main()
