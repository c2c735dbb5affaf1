"""Score the tiny AF3 that ships with minaf3 (minaf3.TINY_MODEL) on fresh clips of every task it learned.

    python tools/eval_tiny.py                      # 200 clips per task, evaluation seed 0, float32
    python tools/eval_tiny.py --quantize int8      # the same clips in float32 and with an int8 decoder
    python tools/eval_tiny.py --quantize int4      # ... and with int4 weights (reported, no target)
    python tools/eval_tiny.py --model runs/x --clips 30 --seed 2

Clips come from an evaluation seed (tasks.EVAL_SEEDS, 0..999), which training never draws from, so every
clip is new to the model. Answers are greedy (batched `generate`) and scored by tasks.score_answer: exact
match up to case and spaces; morse also reports the fraction of letters right. The output is the README's
table: each task's accuracy against its target, and with --quantize the quantized accuracy beside float32's
and whether it stays within 1 point of it. The CPU's vector flags and the threads used are printed first.
"""

import argparse
import sys
import time

import torch
from racing import cpu_flags, describe_cpu

import minaf3
from minaf3.tasks import EVAL_SEEDS, TASKS, examples, score_answer
from minaf3.train import answer

# The targets, exact answers per task (fractions)
TARGETS = {"count": 0.90, "pitch": 0.95, "kind": 0.95, "duration": 0.95, "loudness": 0.95, "morse": 0.60}
TOLERANCE = {"int8": 0.01}  # int8 accuracy within 1 point of float32's; int4's is reported without a target


def score(model, processor, clips_by_task: dict) -> dict[str, dict[str, float]]:
    """{task: {"exact": ..., ("letters": ...)}} of greedy answers to each task's clips."""
    scores = {}
    for task, clips in clips_by_task.items():
        said = answer(model, processor, clips)
        each = [score_answer(task, s, c.answer) for s, c in zip(said, clips, strict=True)]
        scores[task] = {key: sum(s[key] for s in each) / len(each) for key in each[0]}
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(minaf3.TINY_MODEL), help="model folder (default: the shipped)")
    parser.add_argument("--clips", type=int, default=200, help="clips per task (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="an evaluation seed, 0..999 (default 0)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument(
        "--quantize", choices=["int8", "int4"], help="also score with a quantized decoder and lm_head"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.seed not in EVAL_SEEDS:
        parser.error(f"--seed must be an evaluation seed ({EVAL_SEEDS.start}..{EVAL_SEEDS.stop - 1})")
    torch.set_num_threads(args.threads)
    print(describe_cpu(*cpu_flags()))
    print(f"torch {torch.__version__}, {args.threads} threads; model {args.model}")
    clips = {task: list(examples(task, args.seed, args.clips)) for task in args.tasks}
    modes = [None] + ([args.quantize] if args.quantize else [])
    results, seconds = {}, {}
    for mode in modes:
        pipe = minaf3.load(args.model, dtype="float32", quantize=mode)
        started = time.perf_counter()
        results[mode] = score(pipe.model, pipe.processor, clips)
        seconds[mode] = time.perf_counter() - started
    print(f"{args.clips} clips per task from evaluation seed {args.seed}; greedy answers; ", end="")
    print(", ".join(f"{mode or 'float32'} {s:.0f} s" for mode, s in seconds.items()))
    print()
    mode = args.quantize
    header = "| task | target | float32 exact |" + (f" {mode} exact | {mode} - float32 |" if mode else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    met = True
    for task in args.tasks:
        fp = results[None][task]
        ok = fp["exact"] >= TARGETS[task]
        met &= ok
        cells = [task, f"≥ {TARGETS[task]:.0%}", f"{fp['exact']:.1%} {'✓' if ok else '✗'}"]
        if args.quantize:
            q = results[args.quantize][task]
            diff = f"{(q['exact'] - fp['exact']) * 100:+.1f} points"
            if mode in TOLERANCE:
                close = abs(q["exact"] - fp["exact"]) <= TOLERANCE[mode] + 1e-9
                met &= close
                diff += f" {'✓' if close else '✗'}"
            cells += [f"{q['exact']:.1%}", diff]
        print("| " + " | ".join(cells) + " |")
        if "letters" in fp:
            cells = [f"{task} letters", "", f"{fp['letters']:.1%}"]
            if args.quantize:
                q = results[args.quantize][task]
                cells += [f"{q['letters']:.1%}", f"{(q['letters'] - fp['letters']) * 100:+.1f} points"]
            print("| " + " | ".join(cells) + " |")
    print(f"\nall targets met: {met}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
