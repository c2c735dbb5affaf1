"""Row 1 of tools/bench.py after long prompts: decode at tiny width once a prompt fills the cache.

    python tools/bench_prompts.py [--threads 2] [--repeats 3] [--no-compile] [--dir DIR]

(tools/bench.py runs these rows after row 1; this runs them alone.) Prompts: one 30 s window of audio (750
audio tokens + 30 text tokens = 780) and twenty (600 s, the longest AF3 takes: 15,000 audio tokens + 1,000
text tokens = 16k), batch 1, greedy, 48 new tokens, minaf3 eager and compiled against transformers 5.23.
ms/token is timed between streamed tokens (`racing.step_race`): a 16k prompt's prefill varies from turn to
turn by more than all 48 steps take, so subtracting a one-token call, as row 1 does, would measure noise.
Each contender's time is its best turn: twice --repeats turns after 780 tokens (a turn is a second), a quarter
as many after 16k (a prefill of a minute a turn).
Then compiled decoding at 16k against 780 prompt tokens: how much more a step costs beyond the attention
arithmetic the extra slots bring (`growth`), and the same at 2,350 tokens (three windows), where the keys and
values a step reads (8.6 MB) and the weights (13.5 MB) would still fit a 32 MB L3 together. The four times
behind it, minaf3's compiled step after each prompt and the attention kernel alone over each prompt's slots,
are taken in the same turn, and the growth is computed from each turn's four (the machine's speed drifts by
more than the 10% measured, and the best of each time taken apart could pair a fast turn's attention with a
slow turn's step): the median over the turns, and their range. The same four again with the caches emptied
before every step and every attention call (a 64 MiB sum between them, not timed): the weights then come from
memory after either prompt, so the comparison leaves out what the keys and values each step reads push out of
the caches, and the 780 step's own time emptied against warm is what losing the caches costs a step. How much
of the L3 this process gets (on a shared machine, less than the CPU has) is measured first (`cache_share`):
the read rate of a sum over buffers of growing size, each read again and again; where the rate falls, the
buffer no longer stays in cache.
"""

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench import TINY, Table, hf_generate, load, ours_generate, write_checkpoint
from racing import Clock, cpu_flags, describe_cpu, step_race

# (30 s windows of audio, text tokens after them) of each prompt, and the new tokens timed
LONG_PROMPTS = {"780-token (one 30 s window)": (1, 30), "16k-token (twenty windows, 600 s)": (20, 1000)}
# prompts timed in the growth turns alone (no race against transformers): 2,350 tokens (three windows)
GROWTH_PROMPTS = [(3, 100)]
LONG_NEW_TOKENS = 48
EMPTYING_BYTES = 64 * 2**20  # twice a 32 MiB L3
CACHE_PROBE_MB = (8, 16, 24, 32, 64)  # cache_share's buffer sizes


def long_prompt(windows: int, text_tokens: int, seed: int) -> tuple[torch.Tensor, dict]:
    """input_ids (1, 750 * windows + text_tokens): the audio tokens, then random text; and the features of
    `windows` 30 s windows of noise."""
    from minaf3.features import log_mel_spectrogram
    from minaf3.windows import WINDOW_SAMPLES, audio_token_count

    samples = windows * WINDOW_SAMPLES
    clip = (0.1 * np.random.default_rng(seed).standard_normal(samples)).astype(np.float32)
    features, features_mask = log_mel_spectrogram(clip)
    vocab = TINY[1]["vocab_size"]
    text = torch.randint(0, vocab - 100, (1, text_tokens), generator=torch.Generator().manual_seed(seed))
    ids = torch.cat([torch.full((1, audio_token_count(samples)), vocab - 1), text], dim=1)
    return ids, dict(input_features=features, input_features_mask=features_mask)


def prompt_rows(ref, ours, modes: dict, table: Table, args) -> None:
    """Row 1 after long prompts (LONG_PROMPTS): ms/token between streamed tokens, the greedy tokens against
    transformers', and compiled decoding's growth from 780 to 16k prompt tokens net of the attention
    arithmetic. modes: {label: minaf3's compile argument}."""
    prompts = {}
    for i, (label, (windows, text_tokens)) in enumerate(LONG_PROMPTS.items()):
        ids, audio = long_prompt(windows, text_tokens, seed=i)
        start = time.perf_counter()
        # the 16k prompt's turns take minutes (a prefill each): a quarter as many
        turns = 2 * args.repeats if windows == 1 else max(1, args.repeats // 2)
        step, same = race_prompt(ref, ours, modes, ids, audio, turns)
        table.note(f"{label} prompt: greedy tokens equal transformers' ({', '.join(modes)}): "
                   f"{', '.join(map(str, same.values()))}; {time.perf_counter() - start:.0f} s")  # fmt: skip
        for name in modes:
            # eager 3x after both prompts; compiled 8x after 780 tokens, and after 16k
            # a step within 10% of 780's beyond the attention arithmetic (below)
            target = {"eager": 3, "compiled": 8 if windows == 1 else None}.get(name)
            table.add(f"1. decode, tiny width, {label} prompt, batch 1, {name} (ms/token)",
                      1e3 * step["transformers"], 1e3 * step[name], "ms", speedup=target)  # fmt: skip
        prompts[ids.shape[1]] = ids, audio
    if "compiled" in modes:
        rates = ", ".join(f"{mb} MB {rate:.0f} GB/s" for mb, rate in cache_share().items())
        table.note(f"1. read rate of a sum over a buffer read again and again, "
                   f"{torch.get_num_threads()} threads: {rates}")  # fmt: skip
        for i, (windows, text_tokens) in enumerate(GROWTH_PROMPTS):
            ids, audio = long_prompt(windows, text_tokens, seed=len(LONG_PROMPTS) + i)
            # untimed: compiles the step for this cache size, as the races above did for theirs
            ours_generate(ours, ids, torch.ones_like(ids), LONG_NEW_TOKENS, modes["compiled"], **audio)
            prompts[ids.shape[1]] = ids, audio
        lengths, turns = growth(ours, modes["compiled"], prompts, max(5, args.repeats))
        report_growth(table, lengths, turns)


def cache_share(sizes_mb: tuple = CACHE_PROBE_MB) -> dict:
    """{MB: GB/s}: the read rate of torch.sum over a float32 buffer of that size, summed again and again
    (the best of 3 rounds of about 0.4 GB each): the rate of the cache level the buffer fits in, or of the
    memory once it fits in none."""
    rates = {}
    for mb in sizes_mb:
        buffer = torch.ones(mb * 2**20 // 4)
        buffer.sum()
        calls = max(4, 400 // mb)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(calls):
                buffer.sum()
            best = min(best, (time.perf_counter() - start) / calls)
        rates[mb] = mb * 2**20 / best / 1e9
    return rates


def report_growth(table: Table, lengths: list[int], turns: dict) -> None:
    """Notes for growth's turns: the step after each longer prompt against the step after the shortest,
    beyond the attention arithmetic, each turn's four times taken together; the median over the turns and
    their range (the target is the longest prompt's); and what emptying the caches costs the shortest."""
    short, long = lengths[0], lengths[-1]
    kinds = (("warm", ""), ("emptied", "caches emptied before every step and attention call: "))
    # (kind, length): per turn (step after short, step after length, attention over the extra slots), ms
    paired = {}
    for kind, by_length in turns.items():
        for n in lengths[1:]:
            pairs = zip(by_length[short], by_length[n], strict=True)
            paired[kind, n] = [(1e3 * s, 1e3 * s_n, 1e3 * (a_n - a)) for (s, a), (s_n, a_n) in pairs]
    for (kind, how), n in itertools.product(kinds, lengths[1:]):
        beyond = [(s_n - extra) / s - 1 for s, s_n, extra in paired[kind, n]]
        step, step_n, extra = (statistics.median(times) for times in zip(*paired[kind, n], strict=True))
        median_growth = statistics.median(beyond)
        target = f" (target ≤ +10%: {'✗✓'[median_growth <= 0.10]})" if kind == "warm" and n == long else ""
        table.note(f"1. compiled, {n} against {short} prompt tokens ({len(beyond)} turns of their own, "
                   f"medians), {how}{step_n:.2f} against {step:.2f} ms per token, of which the attention "
                   f"arithmetic over the extra slots {extra:.2f} ms; beyond it {median_growth:+.0%} (turns "
                   f"{min(beyond):+.0%} to {max(beyond):+.0%}){target}")  # fmt: skip
    warm, emptied = paired["warm", long], paired["emptied", long]
    losing_l3 = statistics.median(e[0] - w[0] for w, e in zip(warm, emptied, strict=True))
    residual = {n: statistics.median(s_n - e - s for s, s_n, e in paired["warm", n]) for n in lengths[1:]}
    after = " and ".join(f"after {n} {ms:+.2f} ms" for n, ms in residual.items())
    table.note(f"1. compiled, {short} prompt tokens: the caches emptied before every step cost it "
               f"{losing_l3:+.2f} ms per token (median over the turns); the warm step costs {after} beyond "
               f"the step after {short} and the attention arithmetic")  # fmt: skip


class BeforeEachStep(Clock):
    """A Clock that runs `before()` as each piece arrives, before the next step, and leaves its time out."""

    def __init__(self, before):
        super().__init__()
        self.before, self.spent = before, 0.0

    def put(self, value) -> None:
        start = time.perf_counter()
        self.before()
        end = time.perf_counter()
        self.spent += end - start
        self.times.append(end - self.spent)


def growth(ours, mode: str, prompts: dict, turns: int) -> tuple[list[int], dict]:
    """The prompt lengths of `prompts` ({tokens: (input_ids, audio)}), shortest first, and
    {"warm" or "emptied": {tokens: [(seconds per compiled decode step after the prompt, seconds of the
    step's attention alone) for each turn]}}, "emptied" with the caches emptied before every step and
    attention call: in each of `turns` turns every prompt's two generate calls, then its attention kernel
    alone for as many steps."""
    lengths = sorted(prompts)
    kernels = {n: attention_step(n) for n in lengths}
    other = torch.ones(EMPTYING_BYTES // 4)
    kinds = {"warm": lambda: None, "emptied": other.sum}  # what runs before each step (not timed)
    times = {kind: {n: [] for n in lengths} for kind in kinds}
    for _ in range(turns):
        for n in lengths:
            ids, audio = prompts[n]
            for kind, before in kinds.items():
                clock = BeforeEachStep(before)
                ours_generate(ours, ids, torch.ones_like(ids), LONG_NEW_TOKENS, mode, streamer=clock, **audio)
                took = 0.0
                for _ in range(LONG_NEW_TOKENS):
                    before()
                    start = time.perf_counter()
                    kernels[n]()
                    took += time.perf_counter() - start
                times[kind][n].append((clock.per_step(), took / LONG_NEW_TOKENS))
    return lengths, times


def race_prompt(ref, ours, modes: dict, ids: torch.Tensor, audio: dict, repeats: int) -> tuple[dict, dict]:
    """Seconds per step of transformers and of minaf3 in each mode on one prompt (step_race), and whether
    each mode's greedy tokens equal transformers' ({mode: bool})."""
    mask, n, outputs = torch.ones_like(ids), LONG_NEW_TOKENS, {}

    def run(name: str, generate, model, **options):
        def call(streamer):
            outputs[name] = generate(model, ids, mask, n, streamer=streamer, **options, **audio)

        return call

    runs = {"transformers": run("transformers", hf_generate, ref)}
    runs |= {name: run(name, ours_generate, ours, compile=mode) for name, mode in modes.items()}
    step = step_race(runs, repeats)
    return step, {name: torch.equal(outputs[name], outputs["transformers"]) for name in modes}


def attention_step(filled: int):
    """A callable that runs row 1's 28 decoder layers of one token's attention over `filled` slots: the
    C++ kernel alone on caches of their own (as a decode step meets them, not in cache from the previous
    layer)."""
    from minaf3.attention import attention

    text = TINY[1]
    layers, heads, head_dim = text["num_hidden_layers"], text["num_attention_heads"], 16
    slots = filled + LONG_NEW_TOKENS
    caches = [(torch.randn(1, 1, slots, head_dim), torch.randn(1, 1, slots, head_dim)) for _ in range(layers)]
    q, key_mask, slot = (
        torch.randn(1, heads, 1, head_dim),
        torch.ones(1, slots, dtype=torch.bool),
        torch.tensor([filled]),
    )

    def step():
        for k, v in caches:
            attention(q, k, v, key_mask, slot, backend="cpp")

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    parser.add_argument("--dir", default=None, help="folder for the temporary checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe_cpu(*cpu_flags()), flush=True)
    table = Table()
    modes = {"eager": False} | ({} if args.no_compile else {"compiled": "default"})
    with torch.inference_mode(), tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = write_checkpoint(Path(tmp) / "tiny", TINY)
        prompt_rows(load(path, "transformers"), load(path, "minaf3"), modes, table, args)
    print(f"\n{table.markdown()}")


if __name__ == "__main__":
    main()
