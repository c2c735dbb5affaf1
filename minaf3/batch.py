"""`minaf3 batch`: answers for every line of a JSONL manifest, on one process or many (torchrun), resumable.

    minaf3 batch --model DIR --manifest in.jsonl --out out.jsonl                       one process
    torchrun --nproc-per-node 8 -m minaf3.batch --model DIR --manifest in.jsonl --out out.jsonl

Each rank runs its own copy of the model on a disjoint share of the items (data parallel); torch.distributed
only exchanges audio lengths at the start and waits for every rank at the end. The flow:

    every rank: read + check the manifest (manifest.py) -> ids already done (part files, merged output)
      -> read the headers of a strided 1/N of the pending audio -> all_gather the lengths
      -> longest first, dealt round robin (equal shares of audio) -> batches under a token budget
    each batch: generate -> append one line per item to OUT.parts/rank-R.jsonl, flush, fsync (records.py)
    barrier -> rank 0 merges every record into OUT in manifest order and removes OUT.parts/

`run_batch` reads a manifest file; `answer_items` runs items already read and checked, which is how
`minaf3 eval` (evaluate.py) generates its answers through the same machinery.

Resume: a re-run skips every id with a record (an error counts as done unless retry_errors); a kill loses
at most the batches in flight (a torn last line is ignored). A batch that fails as a whole is retried item by
item; an item that fails alone becomes {"id": ..., "error": "AudioError: ..."}. OUT must be on a file system
every node sees.
"""

import argparse
import logging
import os
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from minaf3 import command
from minaf3.audio import load_audio
from minaf3.errors import ConfigError, GenerationError, InputError
from minaf3.manifest import Item, audio_samples, build_conversation, pack, read_manifest, shard
from minaf3.pipeline import Pipeline, load
from minaf3.processor import strip_transcription_prefix
from minaf3.records import PartWriter, merge, parts_dir, read_records
from minaf3.sampling import DEFAULT_MAX_NEW_TOKENS
from minaf3.weights.loader import check_model_folder
from minaf3.windows import SAMPLING_RATE

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_BUDGET = 65_536  # rows x (prompt + new tokens) per batch: the 7B's bf16 KV cache is 56 KiB a
# token (28 layers x K and V x 4 heads x 128 x 2 bytes), so 3.5 GiB of cache on top of 16.5 GiB of weights
DEFAULT_MAX_BATCH_SIZE = 32
# The final barrier waits for the slowest rank, which may finish hours after the fastest; torch's default
# (30 min for gloo) would abort a healthy job there. A dead rank is caught sooner: torchrun stops the group.
DIST_TIMEOUT = timedelta(hours=48)


# ---- distributed plumbing ----------------------------------------------------------------------------------
def rank_device(device: str | None, local_rank: int) -> torch.device:
    """The device of this rank: "cuda" and "auto" mean the GPU with this node's rank index."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device("cuda", local_rank) if device == "cuda" else torch.device(device or "cpu")
    except RuntimeError:
        raise ConfigError(f"device={device!r}: expected cpu, cuda, cuda:N or auto") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():  # before NCCL fails less clearly
        raise ConfigError(f"device={device!r}: CUDA is not available on this machine")
    return chosen


@contextmanager
def distributed(device: torch.device):
    """(rank, world size) under torchrun (its RANK, WORLD_SIZE... variables), else (0, 1) without a group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    owned = world > 1 and not dist.is_initialized()
    if owned:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # object collectives over NCCL stage through the current device
        cuda = {"device_id": device} if device.type == "cuda" else {}  # barriers then know the rank's GPU
        dist.init_process_group("nccl" if cuda else "gloo", timeout=DIST_TIMEOUT, **cuda)
    try:
        yield (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if owned:
            # The ranks tear the group down together, so that none closes its connections while another
            # (rank 0 saving a checkpoint) still holds them open. Not on an error: the others may not arrive.
            dist.barrier()
    finally:
        if owned:
            dist.destroy_process_group()


def default_threads(device: torch.device) -> int | None:
    """Cores per rank on the CPU when torchrun starts several ranks on a node: ranks x threads = cores."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type != "cpu" or local_world == 1:
        return None
    return max(1, len(os.sched_getaffinity(0)) // local_world)


# ---- generation --------------------------------------------------------------------------------------------
def _error(item: Item, exc: BaseException) -> dict:
    return {"id": item.id, "error": f"{type(exc).__name__}: {exc}"}


def _generate(pipe: Pipeline, ready: list[tuple[Item, list, bool]], options: dict) -> tuple[list[dict], int]:
    """One generate call for items that share options -> their records and the new tokens produced."""
    kwargs = {k: v for k, v in options.items() if k != "seed"}
    if "seed" in options:  # a seeded item runs alone (manifest.pack), so its draw is the same on any rank
        kwargs["generator"] = torch.Generator(pipe.model.device).manual_seed(options["seed"])
    inputs = pipe.processor.apply_chat_template([conversation for _, conversation, _ in ready])
    ids = pipe.model.generate(**inputs.to(pipe.model.device), **kwargs)
    new = ids[:, inputs["input_ids"].shape[1] :]  # (B, T + n) -> (B, n)
    texts = pipe.processor.decode(new, skip_special_tokens=True)
    records = [
        {"id": item.id, "text": strip_transcription_prefix(text) if strip else text}
        for (item, _, strip), text in zip(ready, texts, strict=True)
    ]
    pad = pipe.model.generation_config.pad_token_id if pipe.model.generation_config else None
    return records, int((new != pad).sum()) if pad is not None else new.numel()


def run_items(pipe: Pipeline, batch: list[Item], options: dict) -> tuple[list[dict], int]:
    """Records for one packed batch (in batch order) and its new tokens; never raises for an item's fault.

    Each item's audio and conversation are prepared alone, so a broken file costs only its own record. If
    generate then fails for the batch (a conversation the processor refuses, memory), every item is retried
    alone: one bad item cannot take its batch mates down with it.
    """
    records: dict[int, dict] = {}
    ready = []
    for item in batch:
        try:
            check_options(pipe, options)
            waveform = load_audio(item.audio, SAMPLING_RATE)
            conversation, strip = build_conversation(
                item, waveform, pipe.processor.default_transcription_prompt
            )
            ready.append((item, conversation, strip))
        except Exception as exc:  # an item's fault (file, conversation, options) stays with the item
            records[item.index] = _error(item, exc)
    tokens = 0
    attempts = [ready] if len(ready) > 1 else [[entry] for entry in ready]
    while attempts:
        entries = attempts.pop(0)
        try:
            done, n = _generate(pipe, entries, options)
        except Exception as exc:
            if len(entries) > 1:  # failed as a whole: each item again, alone, to find the one at fault
                logger.warning(
                    "a batch of %d failed (%s: %s); retrying its items one by one",
                    len(entries),
                    type(exc).__name__,
                    exc,
                )
                attempts += [[entry] for entry in entries]
            else:
                records[entries[0][0].index] = _error(entries[0][0], exc)
            continue
        tokens += n
        records.update((entry[0].index, record) for entry, record in zip(entries, done, strict=True))
    return [records[item.index] for item in batch], tokens


def check_options(pipe: Pipeline, options: dict) -> None:
    """Settings generate would refuse, refused per item before any compute (GenerationError)."""
    seed = options.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise GenerationError(f"seed={seed!r}: expected a non-negative integer")
    base = pipe.model.generation_config
    if base is not None:
        base.replace(**{k: v for k, v in options.items() if k != "seed"})


def process(
    pipe: Pipeline, batches: list[tuple[list[Item], dict]], part: Path, show: bool, desc: str
) -> None:
    """Run the batches, each one's records appended to `part` as soon as it ends; a tqdm bar if `show`."""
    writer = PartWriter(part)
    bar = tqdm(total=sum(len(batch) for batch, _ in batches), unit="item", desc=desc, disable=not show)
    started, tokens, seconds = time.perf_counter(), 0, 0.0
    try:
        for batch, options in batches:
            results, n = run_items(pipe, batch, options)
            writer.write(results)
            tokens += n
            seconds += sum(item.samples or 0 for item in batch) / SAMPLING_RATE
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"{seconds / 3600:.2f} h audio, {rate:.0f} tokens/s", refresh=False)
            bar.update(len(batch))
    finally:
        bar.close()
        writer.close()


# ---- the run -----------------------------------------------------------------------------------------------
def pending_items(items: list[Item], out: Path, retry_errors: bool) -> list[Item]:
    """The items without a result in `out` or its part files (an error counts unless retry_errors)."""
    records = read_records(out)
    done = {key for key, r in records.items() if "text" in r or not retry_errors}
    return [item for item in items if item.id not in done]


def share_audio_lengths(pending: list[Item], rank: int, world: int) -> None:
    """Set every pending item's `samples`: each rank reads the headers of a strided 1/world of the audio
    files, then all_gather gives every rank all of them."""
    shares: list = [{it.index: audio_samples(it.audio) for it in pending[rank::world]}] * world
    if world > 1:
        dist.all_gather_object(shares, shares[rank])
    lengths = {index: samples for share in shares for index, samples in share.items()}
    for item in pending:
        item.samples = lengths[item.index]


def run_share(
    pipe: Pipeline | None, batches: list, out: Path, rank: int, world: int, progress: bool
) -> float:
    """Run this rank's batches into its part file; the seconds from every rank ready to every rank done."""
    if world > 1:
        dist.barrier()  # start the clock when every rank is ready: time the work, not the loading
    started = time.perf_counter()
    if batches:
        desc = "batch" if world == 1 else f"rank 0 of {world}"
        part = parts_dir(out) / f"rank-{rank:05d}.jsonl"
        process(pipe, batches, part, show=progress and rank == 0, desc=desc)
    if world > 1:
        dist.barrier()  # every rank's records are on disk
    return time.perf_counter() - started


def run_batch(
    model_dir: str | os.PathLike,
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    **options: Any,
) -> dict[str, Any]:
    """Answer every item of the JSONL `manifest` into `out` (see the module docstring); call it on every rank.

    options: those of `answer_items`. Returns, on rank 0, the merged counts (items, texts, errors) and the
    seconds spent generating; {} on the other ranks.
    """
    items = read_manifest(manifest)  # every rank checks it, so a bad line stops them all before any work
    out = Path(out)
    if out.is_dir() or out.resolve() == Path(manifest).resolve():
        raise InputError(f"--out {out}: expected a new or earlier output file, not the manifest or a folder")
    return answer_items(model_dir, items, out, **options)


def answer_items(
    model_dir: str | os.PathLike,
    items: list[Item],
    out: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    adapter: str | os.PathLike | None = None,
    merge_adapter: bool = True,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    greedy: bool = False,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    threads: int | None = None,
    retry_errors: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer checked manifest items (read_manifest's, or datasets.py's) into `out`; call it on every rank.

    max_new_tokens and greedy set the default generation options; an item's own options win.
    adapter: a LoRA adapter folder in PEFT's format, merged into the weights unless merge_adapter=False.
    threads: torch threads per rank (default: the node's cores shared out among its CPU ranks).
    Returns, on rank 0, the merged counts (items, texts, errors) and the seconds spent generating.
    """
    for name, value in (("token_budget", token_budget), ("max_batch_size", max_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r}: expected a positive integer")
    out = Path(out)
    model_dir = check_model_folder(model_dir)
    rank_dev = rank_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    threads = threads or default_threads(rank_dev)
    if threads:
        torch.set_num_threads(threads)
    defaults = {"max_new_tokens": max_new_tokens, **({"do_sample": False} if greedy else {})}
    loading = {"device": rank_dev, "dtype": dtype, "quantize": quantize}
    loading |= {"adapter": adapter, "merge_adapter": merge_adapter}
    with distributed(rank_dev) as (rank, world):
        pending = pending_items(items, out, retry_errors)
        # all_gather is also the point after which writing starts, so no rank reads a part file while
        # another truncates or appends to it.
        share_audio_lengths(pending, rank, world)
        batches = pack(shard(pending, rank, world), defaults, token_budget, max_batch_size)
        # Loaded only when there is work: a re-run with nothing left to do never reads the weights.
        pipe = load(model_dir, **loading) if batches else None
        elapsed = run_share(pipe, batches, out, rank, world, progress)
        if rank > 0:
            return {}
    summary = merge(items, out)
    return {**summary, "processed": len(pending), "seconds": elapsed}


# ---- command line ------------------------------------------------------------------------------------------
def add_adapter_options(p: argparse.ArgumentParser) -> None:
    """--adapter and --adapter-unmerged, for the commands that load a model: chat, transcribe, batch, eval."""
    p.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="a LoRA adapter folder in PEFT's format (adapter_config.json, adapter_model.safetensors), "
        "merged into the weights",
    )
    p.add_argument(
        "--adapter-unmerged",
        action="store_true",
        help="apply the adapter beside the weights on every call instead (slower; not with --quantize)",
    )


def adapter_options(args: argparse.Namespace) -> dict:
    """load()'s adapter and merge_adapter from parsed arguments; --adapter-unmerged alone is a ConfigError."""
    if args.adapter_unmerged and args.adapter is None:
        raise ConfigError("--adapter-unmerged needs --adapter DIR")
    return {"adapter": args.adapter, "merge_adapter": not args.adapter_unmerged}


def add_run_options(p: argparse.ArgumentParser) -> None:
    """What `batch` and `eval` share: the model to load and how the items are run."""
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder or hub model id")
    p.add_argument("--device", default=None, help="cpu (default), cuda (each rank its LOCAL_RANK GPU), auto")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="compute dtype")
    p.add_argument(
        "--quantize", default=None, choices=["int8", "int4"], help="weight-only int8 or int4 decoder, lm_head"
    )
    add_adapter_options(p)
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N")
    p.add_argument("--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET, metavar="N", help="per batch")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE, metavar="N")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads per rank")
    p.add_argument("--retry-errors", action="store_true", help="re-run items recorded as errors")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run_options(args: argparse.Namespace) -> dict:
    """answer_items' keyword arguments (all but greedy) from arguments parsed by add_run_options."""
    names = ("device", "dtype", "quantize", "max_new_tokens", "token_budget", "max_batch_size", "threads")
    return {
        **{name: getattr(args, name) for name in names},
        **adapter_options(args),
        "retry_errors": args.retry_errors,
        "progress": not args.no_progress,
    }


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `batch` on the `minaf3` command's subparsers."""
    p = subparsers.add_parser("batch", help="answer every line of a JSONL manifest (torchrun for many GPUs)")
    p.add_argument("--manifest", required=True, metavar="FILE", help="JSON lines: id, audio, prompt, ...")
    p.add_argument("--out", required=True, metavar="FILE", help="JSON lines: id and text, or id and error")
    p.add_argument("--greedy", action="store_true", help="greedy decoding unless a line sets do_sample")
    add_run_options(p)
    p.set_defaults(run=main_batch)
    return p


def main_batch(args: argparse.Namespace) -> int:
    """Run `minaf3 batch` with parsed arguments; rank 0 prints a one-line summary to stderr."""
    summary = run_batch(args.model, args.manifest, args.out, greedy=args.greedy, **run_options(args))
    if summary:
        rate = summary["processed"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
        counts = f"{summary['items']} items ({summary['texts']} answered, {summary['errors']} failed)"
        print(
            f"minaf3 batch: {counts} in {args.out}; {summary['processed']} generated now in "
            f"{summary['seconds']:.2f} s ({rate:.2f} items/s)",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m minaf3.batch ...` (what torchrun runs with -m): the `minaf3 batch` command on its own."""
    parser = argparse.ArgumentParser(prog="minaf3")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return command.run(parser, ["batch", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
