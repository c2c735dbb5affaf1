"""`minaf3 finetune`: LoRA adapters on the decoder, trained on a dataset's answers, saved in PEFT's format.

    minaf3 finetune --model DIR --data train.json --out ADAPTER [--eval-data test.json] [--lora-rank 16 ...]
    minaf3 eval --model DIR --adapter ADAPTER --data test.json --out report.json

The data is what `minaf3 eval` reads (datasets.py: NVIDIA's JSON or a JSONL manifest with answers): each
item's conversation, with its answer as the assistant's turn, is one training example. Every step, top to
bottom:

    items     batch_size items of the dataset, in an order shuffled anew each epoch (from the seed)
    batch     the processor: chat template with the answer, log-mel, labels on the answer only
    loss      model(**batch).loss: cross-entropy over the answer's tokens (logits at those positions only)
    update    backward through the frozen model into the LoRA factors (and the projector with
              --projector), gradient norm clipped, AdamW at the step's learning rate (warmup, then cosine)

The base weights stay as loaded (bf16 stays bf16, float32 float32, and with --quantize int8 the decoder and
lm_head int8, quantized from the stored tensors), frozen: no gradients, no optimizer state, no float32 copy
(over int8 the backward pass widens a chunk of a layer's rows at a time: quantize.Int8Product). Each
targeted layer becomes a LoRALinear (LoRAInt8Linear over int8) whose updates hold float32 factors A (r, in,
PEFT's Kaiming-uniform init) and B (out, r, zeros), so training starts from the base model's answers.

Files in --out: adapter_config.json and adapter_model.safetensors as PEFT saves them for transformers'
AF3 (`PeftModel.from_pretrained` and minaf3's `--adapter` load them), rewritten at every checkpoint;
train/state.pt (factors, optimizer, step: what a resume reads) and train/log.jsonl (loss, learning rate,
gradient norm, tokens/s every log_every steps; each evaluation's scores). The same command again after a
kill resumes.
"""

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from minaf3.audio import load_audio
from minaf3.datasets import EvalItem, read_dataset
from minaf3.errors import ConfigError, InputError
from minaf3.finetune_config import BOOKKEEPING, PROJECTOR, TARGETS, FinetuneConfig
from minaf3.lora import LoRALinear, LoRAUpdate, checkpoint_linears, lora_updates
from minaf3.manifest import AUDIO_URL_PREFIXES, audio_samples, build_conversation
from minaf3.metrics import score_item, summarize
from minaf3.processor import TRANSCRIPTION_PREFIXES, strip_transcription_prefix
from minaf3.quantize import Int8Linear, LoRAInt8Linear
from minaf3.train import log_line, train_step, truncate_log
from minaf3.train_config import add_options, from_options, learning_rate
from minaf3.weights.adapter import CONFIG_FILE, WEIGHT_FILES
from minaf3.weights.layouts import TRANSFORMERS5, checkpoint_names
from minaf3.windows import SAMPLING_RATE

STATE, LOG = "train/state.pt", "train/log.jsonl"
PEFT_PREFIX = "base_model.model."  # PEFT's PeftModel -> LoraModel wrapper around transformers' module names
# ---- the adapter ------------------------------------------------------------------------------------------


def add_lora(model, config: FinetuneConfig) -> list[torch.nn.Parameter]:
    """Freeze `model` and put a trainable LoRA update on every targeted decoder layer (a fused layer gets
    one per part); returns the parameters to train, in a fixed order (the projector's last)."""
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed)
    updates: dict[str, list[LoRAUpdate]] = {}
    linears = checkpoint_linears(model, kinds=(torch.nn.Linear, Int8Linear))
    for target, (module, rows, (out_features, in_features)) in linears.items():
        in_decoder = target.startswith("language_model.layers.") or target == "lm_head"
        if not in_decoder or target.rpartition(".")[2] not in config.targets:
            continue
        A = torch.empty(config.lora_rank, in_features)
        bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)), PEFT's and nn.Linear's init
        A.uniform_(-bound, bound, generator=generator)
        B = torch.zeros(out_features, config.lora_rank)
        like = model.get_submodule(module).weight
        scaling = config.lora_alpha / config.lora_rank
        updates.setdefault(module, []).append(LoRAUpdate(target, rows, A, B, scaling, like, trainable=True))
    for module, its_updates in updates.items():
        parent, _, child = module.rpartition(".")
        base = model.get_submodule(module)
        wrapper = LoRAInt8Linear if isinstance(base, Int8Linear) else LoRALinear
        setattr(model.get_submodule(parent) if parent else model, child, wrapper(base, its_updates))
    trained = [p for update in lora_updates(model).values() for p in (update.lora_A, update.lora_B)]
    if config.projector:
        projector = getattr(model, PROJECTOR)
        projector.requires_grad_(True)
        trained += list(projector.parameters())
    return trained


def adapter_tensors(model, config: FinetuneConfig) -> dict[str, torch.Tensor]:
    """PEFT's adapter_model.safetensors: `base_model.model.<transformers name>.lora_A.weight` (r, in) and
    `.lora_B.weight` (out, r) for each update, and the projector's tensors when it is trained."""
    updates = lora_updates(model)
    names = checkpoint_names(TRANSFORMERS5, [f"{target}.weight" for target in updates])
    tensors = {}
    for target, update in updates.items():
        module = PEFT_PREFIX + names[f"{target}.weight"].removesuffix(".weight")
        tensors[f"{module}.lora_A.weight"] = update.lora_A.detach().float().contiguous()
        tensors[f"{module}.lora_B.weight"] = update.lora_B.detach().float().contiguous()
    if config.projector:
        state = {f"{PROJECTOR}.{k}": v for k, v in getattr(model, PROJECTOR).state_dict().items()}
        for ours, theirs in checkpoint_names(TRANSFORMERS5, state).items():
            tensors[PEFT_PREFIX + theirs] = state[ours].detach().contiguous()
    return tensors


def target_pattern(targets: tuple[str, ...]) -> str:
    """PEFT's target_modules as a regex over transformers' module names: the decoder layers' `targets`, and
    lm_head when named, so that PEFT puts LoRA where minaf3 did (never on the encoder)."""
    layers = [t for t in targets if t != "lm_head"]
    pattern = rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(layers)})" if layers else ""
    return "|".join(filter(None, [pattern, "lm_head" if "lm_head" in targets else ""]))


def adapter_config(config: FinetuneConfig, base: str) -> dict:
    """adapter_config.json: PEFT's LoraConfig for these targets (a regex over transformers' module names, so
    that PEFT puts LoRA on the decoder's layers only, as minaf3 did)."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base,
        "r": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": target_pattern(config.targets),
        "modules_to_save": [PROJECTOR] if config.projector else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_adapter(model, config: FinetuneConfig, folder: Path, base: str) -> None:
    """Write the adapter in PEFT's format into `folder` (tensors first, the config last)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_tensors(model, config), str(folder / WEIGHT_FILES[0]), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(adapter_config(config, base), indent=2) + "\n")


# ---- the data ---------------------------------------------------------------------------------------------


def check_audio(items: list[EvalItem], data: str | os.PathLike) -> None:
    """Refuse a training set with audio files whose header cannot be read, before any training."""
    bad = [
        e
        for e in items
        if not e.item.audio.startswith(AUDIO_URL_PREFIXES) and audio_samples(e.item.audio) is None
    ]
    if bad:
        shown = ", ".join(f"{e.id!r} ({e.item.audio})" for e in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise InputError(f"{data}: {len(bad)} item(s) with unreadable audio: {shown}{more}")


def training_conversation(entry: EvalItem, transcription_prompt: str) -> list[dict]:
    """The item's conversation with its answer as the assistant's turn. A transcription request (a JSONL line
    without a prompt) is answered in AF3's framing, which `minaf3 eval` strips again."""
    waveform = load_audio(entry.item.audio, SAMPLING_RATE)
    messages, transcription = build_conversation(entry.item, waveform, transcription_prompt)
    answer = entry.answer
    if transcription and strip_transcription_prefix(answer) == answer:
        answer = f'{TRANSCRIPTION_PREFIXES[0]} "{answer}".'
    return [*messages, {"role": "assistant", "content": answer}]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The items' order in `epoch`: a permutation that depends on (seed, epoch) alone."""
    return np.random.default_rng((seed, epoch)).permutation(n).tolist()


def step_items(items: list, config: FinetuneConfig, step: int) -> list:
    """The items of `step`: epoch step // batches, its slice of that epoch's order (the last may be short)."""
    batches = math.ceil(len(items) / config.batch_size)
    epoch, index = divmod(step, batches)
    order = epoch_order(len(items), config.seed, epoch)
    return [items[i] for i in order[index * config.batch_size : (index + 1) * config.batch_size]]


# ---- evaluation -------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    pipe, items: list[EvalItem], metric: str, batch_size: int = 16, max_new_tokens: int = 64
) -> dict:
    """{task: report row (metrics.summarize)} and "overall", of greedy answers to `items` from the model as
    it is now (updates unmerged); an item that fails is counted in "errors", as `minaf3 eval` does."""
    from minaf3.batch import run_items

    was_training = pipe.model.training
    pipe.model.eval()
    results = []
    options = {"do_sample": False, "max_new_tokens": max_new_tokens}
    for start in range(0, len(items), batch_size):
        part = items[start : start + batch_size]
        records, _ = run_items(pipe, [entry.item for entry in part], options)
        for entry, record in zip(part, records, strict=True):
            scored = (
                None
                if "error" in record
                else score_item(metric, record["text"], entry.answer, entry.question)
            )
            results.append((entry.task, scored))
    pipe.model.train(was_training)
    tasks = list(dict.fromkeys(task for task, _ in results))
    rows = {task: summarize(metric, [r for t, r in results if t == task]) for task in tasks}
    return rows | {"overall": summarize(metric, [r for _, r in results])}


# ---- checkpoints ------------------------------------------------------------------------------------------


def settings_of(config: FinetuneConfig, model_dir: str, data: str, quantize: str | None) -> dict:
    """What a resumed run must share with the run it continues."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in BOOKKEEPING}
    return fields | {"targets": list(config.targets), "model": model_dir, "data": data, "quantize": quantize}


def save_state(folder: Path, trained: list[torch.nn.Parameter], optimizer, step: int, settings: dict) -> None:
    """train/state.pt, written atomically (a kill while writing keeps the previous one)."""
    path = folder / STATE
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "settings": settings, "trained": [p.detach().clone() for p in trained]}
    torch.save(state | {"optimizer": optimizer.state_dict()}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


@torch.no_grad()
def resume(folder: Path, trained: list[torch.nn.Parameter], optimizer, settings: dict) -> int:
    """Load train/state.pt into the trained tensors and the optimizer; the step to go on from (0 if none)."""
    path = folder / STATE
    if not path.is_file():
        return 0
    state = torch.load(path, weights_only=True)
    changed = sorted(
        k for k in settings.keys() | state["settings"].keys() if settings.get(k) != state["settings"].get(k)
    )
    if changed:
        listing = ", ".join(f"{k}={state['settings'].get(k)!r}" for k in changed)
        raise ConfigError(
            f"{path}: this run was started with other settings ({listing}); "
            "resume with the same ones or fine-tune into another --out folder"
        )
    for parameter, value in zip(trained, state["trained"], strict=True):
        parameter.copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


# ---- the loop ---------------------------------------------------------------------------------------------


def finetune(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: FinetuneConfig | None = None,
    eval_data: str | os.PathLike | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    progress: bool = True,
    until: int | None = None,
) -> dict:
    """Fine-tune the model in `model_dir` on `data` into the adapter folder `out` (module docstring).

    Everything that can be checked without training (settings, datasets, audio headers, the model) is
    checked first. quantize: None or "int8" (int4 has no backward pass). until: stop before step `until`
    without a checkpoint, as a kill would (tests resume from there). Returns {"steps", "losses" (this
    call's), "seconds", "eval" (the last scores, if any)}.
    """
    from minaf3.pipeline import Pipeline, load

    config = config or FinetuneConfig()
    if quantize not in (None, "int8"):
        raise ConfigError(
            f"finetune: quantize must be None or 'int8' (int4 has no backward pass), got {quantize!r}"
        )
    items = read_dataset(data)
    check_audio(items, data)
    held = read_dataset(eval_data) if eval_data is not None else []
    folder = Path(out)
    if folder.is_file():
        raise InputError(f"--out {folder}: expected an adapter folder, found a file")
    loaded = load(model_dir, dtype=dtype, quantize=quantize)
    model, processor = loaded.model, loaded.processor
    steps = config.steps or config.epochs * math.ceil(len(items) / config.batch_size)
    config = dataclasses.replace(config, steps=steps)
    trained = add_lora(model, config)
    groups = [
        {"params": [p for p in trained if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
    settings = settings_of(config, str(Path(model_dir)), str(Path(data).resolve()), quantize)
    start = resume(folder, trained, optimizer, settings)
    (folder / LOG).parent.mkdir(parents=True, exist_ok=True)
    truncate_log(folder, start)
    pipe = Pipeline(model, processor)
    prompt = processor.default_transcription_prompt
    model.train()
    losses, scores, began = [], None, time.perf_counter()
    window = {"tokens": 0, "seconds": 0.0, "loss": 0.0, "steps": 0}
    bar = tqdm(total=steps, initial=start, desc="finetune", unit="step", disable=not progress)
    for step in range(start, steps if until is None else min(until, steps)):
        tick = time.perf_counter()
        chosen = step_items(items, config, step)
        batch = processor.apply_chat_template(
            [training_conversation(e, prompt) for e in chosen],
            add_generation_prompt=False,
            output_labels="assistant",
            padding_side="right",
        )
        lr = learning_rate(config, step)
        loss, norm = train_step(model, optimizer, batch, lr, config)
        losses.append(loss)
        window["tokens"] += int(batch["attention_mask"].sum())
        window["seconds"] += time.perf_counter() - tick
        window["loss"] += loss
        window["steps"] += 1
        done = step + 1
        if done % config.log_every == 0 or done == steps:
            rate = window["tokens"] / window["seconds"]
            record = {"step": done, "loss": window["loss"] / window["steps"], "lr": lr, "grad_norm": norm}
            log_line(folder, record | {"tokens_per_s": rate, "elapsed_s": time.perf_counter() - began})
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{rate:,.0f}")
            window = {"tokens": 0, "seconds": 0.0, "loss": 0.0, "steps": 0}
        if held and ((config.eval_every and done % config.eval_every == 0) or done == steps):
            scores = evaluate(pipe, held, config.metric)
            log_line(folder, {"step": done, "eval": scores})
            bar.write(f"step {done}: " + ", ".join(f"{t} {r['score']:.1%}" for t, r in scores.items()))
        if done % config.save_every == 0 or done == steps:
            save_adapter(model, config, folder, str(model_dir))
            save_state(folder, trained, optimizer, done, settings)
        bar.update(1)
    bar.close()
    return {
        "steps": start + len(losses),
        "losses": losses,
        "seconds": time.perf_counter() - began,
        "eval": scores,
    }


# ---- the command line -------------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `finetune` on the `minaf3` command's subparsers."""
    p = subparsers.add_parser("finetune", help="train a LoRA adapter on a dataset (PEFT format, resumable)")
    p.add_argument("--model", required=True, metavar="DIR|ID", help="the base model")
    p.add_argument("--data", required=True, metavar="FILE", help="training set: NVIDIA JSON or JSONL")
    p.add_argument("--out", required=True, metavar="DIR", help="the adapter folder (and train/ for resuming)")
    p.add_argument("--eval-data", metavar="FILE", help="scored during training (--eval-every) and at the end")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", default=None, choices=["int8"], help="train over int8 decoder weights")
    add_options(p, FinetuneConfig, {"targets": {"choices": TARGETS}})
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=main_finetune)
    return p


def main_finetune(args: argparse.Namespace) -> int:
    """Run `minaf3 finetune` with parsed arguments; prints where the adapter is and the last scores."""
    config = from_options(FinetuneConfig, args)
    result = finetune(
        args.model,
        args.data,
        args.out,
        config,
        args.eval_data,
        args.dtype,
        args.quantize,
        progress=not args.no_progress,
    )
    last = f", last loss {result['losses'][-1]:.4f}" if result["losses"] else " (already done)"
    print(f"minaf3 finetune: {result['steps']} steps{last}; adapter in {args.out}")
    if result["eval"]:
        print(", ".join(f"{task} {row['score']:.1%}" for task, row in result["eval"].items()))
    return 0
