"""`minaf3 batch`: answers for every line of a JSONL manifest, on one process or many (torchrun), resumable.

    minaf3 batch --model DIR --manifest in.jsonl --out out.jsonl                       one process
    torchrun --nproc-per-node 8 -m minaf3.batch --model DIR --manifest in.jsonl --out out.jsonl

Each rank runs its own copy of the model on a disjoint share of the items (data parallel); torch.distributed
only exchanges audio lengths at the start and waits for every rank at the end. The flow:

    every rank: read + check the manifest (manifest.py) -> ids already done (part files, merged output)
      -> read the headers of a strided 1/N of the pending audio -> all_gather the lengths
      -> longest first, dealt round robin (equal shares of audio) -> batches under a token budget
    each batch: generate -> append one line per item to OUT.parts/rank-R.jsonl, flush, fsync
    barrier -> rank 0 merges every record into OUT in manifest order and removes OUT.parts/

Resume: a re-run skips every id with a record (an error counts as done unless retry_errors); a kill loses
at most the batches in flight (a torn last line is ignored). A batch that fails as a whole is retried item by
item; an item that fails alone becomes {"id": ..., "error": "AudioError: ..."}. OUT must be on a file system
every node sees.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from minaf3.audio import load_audio
from minaf3.errors import ConfigError, GenerationError, InputError, Minaf3Error
from minaf3.manifest import Item, audio_samples, build_conversation, pack, read_manifest, shard
from minaf3.pipeline import Pipeline, load
from minaf3.processor import strip_transcription_prefix
from minaf3.sampling import DEFAULT_MAX_NEW_TOKENS
from minaf3.weights.loader import check_model_folder
from minaf3.windows import SAMPLING_RATE

logger = logging.getLogger(__name__)

PARTS_SUFFIX = ".parts"  # OUT.parts/rank-00003.jsonl: what rank 3 finished
DEFAULT_TOKEN_BUDGET = 65_536  # rows x (prompt + new tokens) per batch: the 7B's bf16 KV cache is 56 KiB a
# token (28 layers x K and V x 4 heads x 128 x 2 bytes), so 3.5 GiB of cache on top of 16.5 GiB of weights
DEFAULT_MAX_BATCH_SIZE = 32
# The final barrier waits for the slowest rank, which may finish hours after the fastest; torch's default
# (30 min for gloo) would abort a healthy job there. A dead rank is caught sooner: torchrun stops the group.
DIST_TIMEOUT = timedelta(hours=48)


# ---- records on disk ---------------------------------------------------------------------------------------
def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + PARTS_SUFFIX)


def _lines(path: Path) -> list[dict]:
    """The complete JSON lines of a record file; a last line without its newline is a torn write, dropped."""
    data = path.read_bytes()
    records = []
    for line in data.split(b"\n")[:-1]:  # the last piece is "" after a final newline, else the torn tail
        try:
            record = json.loads(line)
        except ValueError:
            continue  # not a record (a damaged or foreign line): its item, if any, runs again
        if isinstance(record, dict) and ("text" in record or "error" in record):
            if isinstance(record.get("id"), str | int):  # the types a manifest id can have
                records.append(record)
    return records


def read_records(out: Path) -> dict[Any, dict]:
    """Every result recorded so far, by id: the merged output first, then each rank's part file.

    A text beats an error (an error retried with success); otherwise the later record wins. Two texts for
    one id in the part files cannot happen (each id is dealt to one rank, and done ids are skipped), so they
    mean two jobs share OUT: a ConfigError rather than a silent pick.
    """
    sources = [out] if out.is_file() else []
    parts = parts_dir(out)
    sources += sorted(parts.glob("rank-*.jsonl")) if parts.is_dir() else []
    records: dict[Any, dict] = {}
    texts_in_parts: set = set()
    for source in sources:
        for record in _lines(source):
            key, old = record["id"], records.get(record["id"])
            if "text" in record and source != out:
                if key in texts_in_parts:
                    raise ConfigError(
                        f"{source}: a second result for id {key!r}; do two jobs write --out {out}?"
                    )
                texts_in_parts.add(key)
            if old is None or "error" in old or "text" in record:
                records[key] = record
    return records


class PartWriter:
    """Appends to one rank's part file; each `write` is on disk (flushed and fsync'd) when it returns."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a+b")  # noqa: SIM115 - held for the run, closed by close()
        self.file.seek(0)  # reads start where asked; writes in append mode still go to the end
        data = self.file.read()
        if data and not data.endswith(b"\n"):  # a torn last line: cut, or the next record is glued to it
            self.file.truncate(data.rfind(b"\n") + 1)

    def write(self, records: list[dict]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        self.file.write(data.encode("utf-8"))
        self.file.flush()
        os.fsync(self.file.fileno())  # a record counts as done on re-run: it must survive a power cut

    def close(self) -> None:
        self.file.close()


def merge(items: list[Item], out: Path) -> dict[str, int]:
    """Write OUT with one record per manifest item, in manifest order, then remove OUT.parts/.

    OUT is replaced atomically, so a crash here leaves the old OUT or the new one, and the parts stay until
    the new one is in place. Returns counts of texts and errors.
    """
    records = read_records(out)
    missing = [item.id for item in items if item.id not in records]
    if missing:  # every rank finished before the barrier: a missing result is a bug, not a user error
        raise RuntimeError(f"merge: {len(missing)} item(s) have no result, first {missing[0]!r}")
    dropped = len(records) - len(items)
    if dropped:
        logger.warning("%s: %d record(s) for ids no longer in the manifest are left out", out, dropped)
    # One line per manifest item, whose ids are unique (read_manifest): each id exactly once.
    lines = [json.dumps(records[item.id], ensure_ascii=False) + "\n" for item in items]
    staging = out.with_name(out.name + ".tmp")
    with open(staging, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, out)
    shutil.rmtree(parts_dir(out), ignore_errors=True)
    errors = sum("error" in records[item.id] for item in items)
    return {"items": len(items), "texts": len(items) - errors, "errors": errors}


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
    *,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    greedy: bool = False,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    threads: int | None = None,
    retry_errors: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer every item of `manifest` into `out` (see the module docstring); call it on every rank.

    max_new_tokens and greedy set the default generation options; a manifest line's own options win.
    threads: torch threads per rank (default: the node's cores shared out among its CPU ranks).
    Returns, on rank 0, the merged counts (items, texts, errors) and the seconds spent generating.
    """
    for name, value in (("token_budget", token_budget), ("max_batch_size", max_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r}: expected a positive integer")
    out = Path(out)
    items = read_manifest(manifest)  # every rank checks it, so a bad line stops them all before any work
    if out.is_dir() or out.resolve() == Path(manifest).resolve():
        raise InputError(f"--out {out}: expected a new or earlier output file, not the manifest or a folder")
    model_dir = check_model_folder(model_dir)
    rank_dev = rank_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    threads = threads or default_threads(rank_dev)
    if threads:
        torch.set_num_threads(threads)
    defaults = {"max_new_tokens": max_new_tokens, **({"do_sample": False} if greedy else {})}
    with distributed(rank_dev) as (rank, world):
        pending = pending_items(items, out, retry_errors)
        # all_gather is also the point after which writing starts, so no rank reads a part file while
        # another truncates or appends to it.
        share_audio_lengths(pending, rank, world)
        batches = pack(shard(pending, rank, world), defaults, token_budget, max_batch_size)
        # Loaded only when there is work: a re-run with nothing left to do never reads the weights.
        pipe = load(model_dir, device=rank_dev, dtype=dtype, quantize=quantize) if batches else None
        elapsed = run_share(pipe, batches, out, rank, world, progress)
        if rank > 0:
            return {}
    summary = merge(items, out)
    return {**summary, "processed": len(pending), "seconds": elapsed}


# ---- command line ------------------------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `batch` on the `minaf3` command's subparsers."""
    p = subparsers.add_parser("batch", help="answer every line of a JSONL manifest (torchrun for many GPUs)")
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder")
    p.add_argument("--manifest", required=True, metavar="FILE", help="JSON lines: id, audio, prompt, ...")
    p.add_argument("--out", required=True, metavar="FILE", help="JSON lines: id and text, or id and error")
    p.add_argument("--device", default=None, help="cpu (default), cuda (each rank its LOCAL_RANK GPU), auto")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="compute dtype")
    p.add_argument(
        "--quantize", default=None, choices=["int8", "int4"], help="weight-only int8 or int4 decoder, lm_head"
    )
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N")
    p.add_argument("--greedy", action="store_true", help="greedy decoding unless a line sets do_sample")
    p.add_argument("--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET, metavar="N", help="per batch")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE, metavar="N")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads per rank")
    p.add_argument("--retry-errors", action="store_true", help="re-run items recorded as errors")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=main_batch)
    return p


def main_batch(args: argparse.Namespace) -> int:
    """Run `minaf3 batch` with parsed arguments; rank 0 prints a one-line summary to stderr."""
    names = ("device", "dtype", "quantize", "max_new_tokens", "greedy", "token_budget", "max_batch_size")
    summary = run_batch(
        args.model,
        args.manifest,
        args.out,
        **{name: getattr(args, name) for name in (*names, "threads", "retry_errors")},
        progress=not args.no_progress,
    )
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
    args = parser.parse_args(["batch", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(format="minaf3: %(levelname)s: %(message)s", level=logging.WARNING)
    try:
        return args.run(args)
    except Minaf3Error as error:
        print(f"minaf3: error: {error}", file=sys.stderr)
        return 2  # as cli.py: argparse's status for usage errors


if __name__ == "__main__":
    sys.exit(main())
