"""`minaf3 train`: a tiny Audio Flamingo 3 learns the synthetic listening tasks (tasks.py) on the CPU.

    torchrun --standalone --nproc-per-node 2 -m minaf3 train --out minaf3/tiny
                                           the shipped model: its recipe is the defaults below
    minaf3 train --out runs/x --steps 300  one process; the same command again after a kill resumes

The model is minaf3's own AF3 (model.py) at small sizes, with a byte-level BPE tokenizer learned from the
tasks' text, trained from `init_weights` as the 7B would be fine-tuned. Every step, top to bottom:

    clips     batch_size fresh clips, never seen before: the task drawn by task_weights (in the first
              listen_steps steps, among listen_tasks only), the clip from its training seed
    batch     the processor: chat template with the answer, log-mel, labels on the answer only
    loss      model(**batch).loss: next-token cross-entropy over the answers' tokens and closing <|im_end|>,
              plus, on count and morse clips, beep_loss and letter_loss x the span heads' losses on the
              audio rows (sound_heads.py: which beep, which letter sounds at each audio token)
    update    backward, gradient norm clipped to grad_clip, AdamW at the step's learning rate
              (linear warmup over warmup_steps, then cosine decay to min_lr at `steps`)

Clips are drawn for pool_batches steps at a time, sorted by length and cut into batches: the decoder then
pads each row to a similar length rather than to the longest clip of a random batch. A step's batch depends
on (seed, step) alone, and the CPU computes it the same way every time, so a run is reproducible and a
resumed run ends with the weights of an uninterrupted one.

Under torchrun, each process (one thread each: ranks x threads = cores) takes its share of every batch and
the gradients are averaged before each update, as in nanoGPT: on a shared machine two single-threaded
processes keep both cores busy where one process's two threads wait on each other.

Files in --out: the model in the hub layout (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, processor_config.json, chat_template.jinja, generation_config.json), which minaf3 and
transformers load, rewritten at every checkpoint; train/state.pt (weights, optimizer, step: what a resume
reads) and train/log.jsonl (a line every log_every steps: loss, learning rate, gradient norm, tokens/s, wall
and CPU seconds, and the accuracy of each periodic evaluation).
"""

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from minaf3.batch import default_threads, distributed
from minaf3.chat_template import AUDIO_TOKEN, render
from minaf3.config import AudioFlamingo3Config
from minaf3.demo import ENDOFTEXT, IM_END, model_config, train_tokenizer
from minaf3.dtypes import cpu_has_native_bf16
from minaf3.errors import ConfigError
from minaf3.model import AudioFlamingo3ForConditionalGeneration
from minaf3.processor import TRANSCRIPTION_PREFIXES, AudioFlamingo3Processor
from minaf3.sampling import GenerationConfig
from minaf3.sound_heads import SpanHead, loss_with_heads, span_targets
from minaf3.tasks import (
    ALL_TASKS,
    FIRST_TRAIN_SEED,
    KINDS,
    MORSE_CODE,
    PHRASINGS,
    Example,
    conversation,
    example_at,
    examples,
    score_answer,
)
from minaf3.train_config import (
    BOOKKEEPING,
    TrainConfig,
    add_options,
    aid_weights,
    from_options,
    learning_rate,
)
from minaf3.windows import MAX_AUDIO_SECONDS

STATE, LOG = "train/state.pt", "train/log.jsonl"
EVAL_SEED = 1  # the clips of the evaluations during training (an evaluation seed: never a training clip)
MAX_ANSWER_TOKENS = 24  # the longest answer, morse's 'The spoken content of the audio is "XYZ".', is 13


# ---- the model and its tokenizer ------------------------------------------------------------------------


def task_corpus() -> list[str]:
    """What the tokenizer learns its merges from: every task's questions and answers as the chat template
    renders them. Morse's letters come one at a time, so no merge joins two capitals: a letter is a token."""
    answers = {
        "count": [f"{n} beep{'s' * (n > 1)}" for n in range(1, 7)],
        "pitch": ["high", "low"],
        "kind": list(KINDS),
        "duration": [f"{n} second{'s' * (n > 1)}" for n in range(1, 9)],
        "loudness": ["louder", "quieter"],
        "morse": [f'{TRANSCRIPTION_PREFIXES[0]} "{letter}".' for letter in MORSE_CODE],  # tasks' framing
        "order": ["higher", "lower"],
    }
    return [
        render(
            [{"role": "user", "content": AUDIO_TOKEN + question}, {"role": "assistant", "content": answer}]
        )
        for task in ALL_TASKS
        for question in PHRASINGS[task]
        for answer in answers[task]
    ]


def new_model(config: TrainConfig) -> tuple[AudioFlamingo3ForConditionalGeneration, AudioFlamingo3Processor]:
    """A freshly initialised model (seed `config.seed`) and its processor with a newly learned tokenizer."""
    tokenizer = train_tokenizer(task_corpus(), config.vocab_size)
    processor = AudioFlamingo3Processor(
        tokenizer, pad_token=ENDOFTEXT, eos_token=IM_END, max_audio_len=MAX_AUDIO_SECONDS
    )
    model_settings = AudioFlamingo3Config.from_dict(
        model_config(tokenizer.get_vocab_size(), **config.sizes())
    )
    model = AudioFlamingo3ForConditionalGeneration(model_settings).init_weights(config.seed)
    ids = {name: tokenizer.token_to_id(name) for name in (ENDOFTEXT, IM_END)}
    # Greedy, no repetition penalty: an exact answer such as "SOS" repeats letters on purpose.
    model.generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=MAX_ANSWER_TOKENS,
        eos_token_id=(ids[IM_END], ids[ENDOFTEXT]),
        pad_token_id=ids[ENDOFTEXT],
        bos_token_id=ids[ENDOFTEXT],
    )
    return model, processor


def save(model, processor, folder: Path) -> None:
    """The model and processor in the hub layout (module docstring), loadable by minaf3 and transformers."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


# ---- the data: fresh clips every step, sorted by length in pools of pool_batches steps --------------------


def pool_examples(config: TrainConfig, pool: int) -> list[Example]:
    """The clips of steps pool * pool_batches ... (pool + 1) * pool_batches - 1, in drawing order."""
    rng = np.random.default_rng((config.seed, pool))
    n = config.pool_batches * config.batch_size
    weights = np.asarray(config.task_weights, dtype=np.float64)
    if pool * config.pool_batches < config.listen_steps:
        weights = weights * [task in config.listen_tasks for task in config.tasks]
    drawn = rng.choice(len(config.tasks), size=n, p=weights / weights.sum())
    seed = FIRST_TRAIN_SEED + config.seed  # a training seed: no clip of it is ever an evaluation clip
    return [example_at(config.tasks[t], seed, pool * n + i) for i, t in enumerate(drawn)]


def pool_batches(config: TrainConfig, pool: int) -> list[list[Example]]:
    """The pool's clips sorted by length, cut into pool_batches batches, in a random order of batches."""
    clips = sorted(pool_examples(config, pool), key=lambda e: len(e.waveform))
    batches = [clips[i : i + config.batch_size] for i in range(0, len(clips), config.batch_size)]
    order = np.random.default_rng((config.seed, pool, 1)).permutation(len(batches))
    return [batches[i] for i in order]


def training_batch(processor: AudioFlamingo3Processor, clips: list[Example]) -> dict:
    """Model inputs with labels on the answers: input_ids, attention_mask, labels (B, T), right-padded (each
    row then starts at position 0, as it does alone), and input_features, input_features_mask."""
    conversations = [conversation(e)[0] + [{"role": "assistant", "content": e.answer}] for e in clips]
    return processor.apply_chat_template(
        conversations, add_generation_prompt=False, output_labels="assistant", padding_side="right"
    )


# ---- evaluation -----------------------------------------------------------------------------------------


@torch.no_grad()
def answer(model, processor, clips: list[Example], batch_size: int = 32) -> list[str]:
    """Greedy answers to each clip's question, batch_size clips per generate call."""
    answers = []
    for start in range(0, len(clips), batch_size):
        part = clips[start : start + batch_size]
        inputs = processor.apply_chat_template([conversation(e)[0] for e in part], add_generation_prompt=True)
        out = model.generate(
            **inputs, do_sample=False, max_new_tokens=MAX_ANSWER_TOKENS, repetition_penalty=1.0
        )
        answers += [text.strip() for text in processor.decode(out[:, inputs["input_ids"].shape[1] :])]
    return answers


def evaluate(model, processor, tasks: tuple[str, ...], clips: int, seed: int = EVAL_SEED) -> dict[str, dict]:
    """{task: {"exact": fraction of exact answers, and for morse "letters": letters right}} over the first
    `clips` clips of each task under `seed`."""
    scores = {}
    for task in tasks:
        chosen = list(examples(task, seed, clips))
        said = answer(model, processor, chosen)
        each = [score_answer(task, s, e.answer) for s, e in zip(said, chosen, strict=True)]
        scores[task] = {key: sum(s[key] for s in each) / len(each) for key in each[0]}
    return scores


# ---- checkpoints ----------------------------------------------------------------------------------------


def save_state(
    folder: Path, model, optimizer, step: int, config: TrainConfig, world: int = 1, heads=()
) -> None:
    """Write train/state.pt atomically (a kill while writing keeps the previous one), then the hub files.
    heads: the SpanHeads training beside the model, kept in the state only."""
    path = folder / STATE
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.asdict(config) | {"processes": world}
    state = {"step": step, "config": settings, "model": model.state_dict()}
    if heads:
        state["heads"] = {head.task: head.state_dict() for head in heads}
    torch.save(state | {"optimizer": optimizer.state_dict()}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    model.save_pretrained(folder)


def resume(folder: Path, model, optimizer, config: TrainConfig, world: int = 1, heads=()) -> int:
    """Load train/state.pt into model, optimizer (and heads) if there is one; the step to start from (0 if
    none). The run must go on with the settings it started with (bookkeeping aside) and as many processes."""
    path = folder / STATE
    if not path.is_file():
        return 0
    state = torch.load(path, weights_only=True)
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()}
    settings = dataclasses.asdict(config) | {"processes": world}
    changed = [k for k, v in settings.items() if k not in BOOKKEEPING and saved.get(k) != v]
    if changed:
        listing = ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
        raise ConfigError(
            f"{path}: this run was started with other settings ({listing}); "
            "resume with the same ones or train into another --out folder"
        )
    model.load_state_dict(state["model"])
    for head in heads:
        head.load_state_dict(state["heads"][head.task])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def log_line(folder: Path, record: dict) -> None:
    with open(folder / LOG, "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")


def truncate_log(folder: Path, step: int) -> None:
    """Drop the log lines of steps after `step`: a resumed run logs them again."""
    path = folder / LOG
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


# ---- the loop -------------------------------------------------------------------------------------------


def train_step(
    model, optimizer, batch: dict, lr: float, config: TrainConfig, world: int = 1, aids=()
) -> tuple[float, float]:
    """One update: the loss of `batch` (with aids = [(head, targets, weight), ...], plus the span heads',
    as in sound_heads.py), its gradients (averaged over the `world` processes of a torchrun run, each
    holding its share of the batch), their norm clipped to grad_clip, AdamW at `lr`. Returns (the model's
    own loss averaged over the processes, gradient norm before clipping). Any model whose forward takes the
    processor's outputs and returns `.loss` trains here (tools/bench_train.py runs transformers' AF3)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16 and cpu_has_native_bf16()):
        if aids:
            minimised, loss = loss_with_heads(model, batch, aids)
        else:
            minimised = loss = model(**batch).loss
    minimised.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    loss = loss.detach()
    if world > 1:  # one all-reduce of every gradient and the loss: each process then takes the same step
        flat = torch.cat([p.grad.flatten() for p in params] + [loss[None]])
        dist.all_reduce(flat)
        flat /= world
        for p, part in zip(params, flat[:-1].split([p.numel() for p in params]), strict=True):
            p.grad.copy_(part.view_as(p.grad))
        loss = flat[-1]
    norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), float(norm)


def new_optimizer(model, config: TrainConfig, heads=()) -> torch.optim.AdamW:
    """AdamW over the parameters that train (the model's, and those of the SpanHeads beside it),
    weight decay on matrices only (not on norms and biases, as GPT-2 and nanoGPT): the encoder's positions
    stay Whisper's sinusoids, as in Whisper."""
    for name, parameter in model.named_parameters():
        if name.endswith("audio_tower.embed_positions.weight"):
            parameter.requires_grad_(False)
    modules = (model, *heads)
    trained = [p for module in modules for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trained if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


@dataclass
class TrainResult:
    folder: Path  # the trained model, in the hub layout
    losses: list[float]  # the loss of every step this call ran, in order
    step: int  # steps done in all (with those of earlier calls on the same folder)
    seconds: float  # the wall time of this call's steps


def train(
    config: TrainConfig, out: str | os.PathLike, progress: bool = True, until: int | None = None
) -> TrainResult:
    """Train (or resume training) into folder `out`; see the module docstring. Under torchrun each process
    takes its share of every batch (data parallel); process 0 logs, evaluates and saves. until: stop
    before step `until` without a checkpoint, as a kill would (tests resume from there)."""
    with distributed(torch.device("cpu")) as (rank, world):
        if config.batch_size % world:
            raise ConfigError(f"train: batch_size {config.batch_size} does not split over {world} processes")
        torch.set_num_threads(
            config.threads or default_threads(torch.device("cpu")) or torch.get_num_threads()
        )
        return _train(config, Path(out), progress and rank == 0, until, rank, world)


def _train(config: TrainConfig, folder: Path, progress: bool, until: int | None, rank: int, world: int):
    model, processor = new_model(config)
    if (folder / STATE).is_file():  # the tokenizer of a resumed run is the one it started with
        processor = AudioFlamingo3Processor.from_pretrained(folder)
    # The span heads train beside the model for the tasks that have them (sound_heads.py).
    weights = aid_weights(config)
    heads = [SpanHead(task, model.config.decoder.hidden_size, config.seed) for task in weights]
    optimizer = new_optimizer(model, config, heads)
    start = resume(folder, model, optimizer, config, world, heads)
    if start == 0 and rank == 0:
        (folder / LOG).parent.mkdir(parents=True, exist_ok=True)
        save(model, processor, folder)
    if rank == 0:
        truncate_log(folder, start)
    model.train()
    losses, window = [], {"tokens": 0, "seconds": 0.0, "loss": 0.0}
    began, cpu_began = time.perf_counter(), time.process_time()  # wall and this process's CPU seconds
    pool, batches = None, []
    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", disable=not progress)
    for step in range(start, config.steps if until is None else min(until, config.steps)):
        tick = time.perf_counter()
        if step // config.pool_batches != pool:
            pool = step // config.pool_batches
            batches = pool_batches(config, pool)
        clips = batches[step % config.pool_batches][rank::world]
        batch = training_batch(processor, clips)
        tokens = (batch["input_ids"] == model.config.audio_token_id).sum(-1).tolist()
        aids = [(head, span_targets(head.task, clips, tokens), weights[head.task]) for head in heads]
        lr = learning_rate(config, step)
        loss, norm = train_step(model, optimizer, batch, lr, config, world, aids)
        losses.append(loss)
        window["tokens"] += int(batch["attention_mask"].sum()) * world  # about: the other shares are alike
        window["seconds"] += time.perf_counter() - tick
        window["loss"] += losses[-1]
        done = step + 1
        if rank == 0 and (done % config.log_every == 0 or done == config.steps):
            n = config.log_every if done % config.log_every == 0 else done % config.log_every
            rate = window["tokens"] / window["seconds"]
            record = {"step": done, "loss": window["loss"] / n, "lr": lr, "grad_norm": norm}
            clock = {"elapsed_s": time.perf_counter() - began, "cpu_s": time.process_time() - cpu_began}
            log_line(folder, record | {"tokens_per_s": rate} | clock)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{rate:,.0f}")
        if done % config.log_every == 0:
            window = {"tokens": 0, "seconds": 0.0, "loss": 0.0}
        if rank == 0 and config.eval_every and done % config.eval_every == 0:
            scores = evaluate(model, processor, config.tasks, config.eval_clips)
            log_line(folder, {"step": done, "eval": scores})
            bar.write(f"step {done}: " + ", ".join(f"{t} {s['exact']:.0%}" for t, s in scores.items()))
        if rank == 0 and (done % config.save_every == 0 or done == config.steps):
            save_state(folder, model, optimizer, done, config, world, heads)
        bar.update(1)
    bar.close()
    return TrainResult(folder, losses, start + len(losses), time.perf_counter() - began)


# ---- the command line -----------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `train` on the `minaf3` command's subparsers: --out, and one option per TrainConfig field."""
    p = subparsers.add_parser("train", help="train a tiny AF3 on synthetic listening tasks (resumable)")
    p.add_argument("--out", required=True, metavar="DIR", help="the model folder (and train/ for resuming)")
    add_options(p, TrainConfig, {"tasks": {}, "task_weights": {"type": float}, "listen_tasks": {}})
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=main_train)
    return p


def main_train(args: argparse.Namespace) -> int:
    """Run `minaf3 train` with parsed arguments; prints where the model is and the last loss."""
    result = train(from_options(TrainConfig, args), args.out, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, process 0 speaks for all
        last = f", last loss {result.losses[-1]:.4f}" if result.losses else " (already done)"
        print(f"minaf3 train: {result.step} steps{last}; model in {result.folder}")
    return 0
