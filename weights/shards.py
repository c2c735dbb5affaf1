"""The safetensors files of one checkpoint folder: found, checked and listed without reading tensor data.

A safetensors file is an 8-byte little-endian header length N, an N-byte JSON header mapping each tensor
name to {dtype, shape, data_offsets: [begin, end]} (offsets counted from the byte after the header), then the
tensor bytes packed back to back. Everything that can go wrong with a download shows in the header and the
file size, so every file is checked here before any tensor is read: a missing shard, a header that does not
parse, a truncated file, or an index that disagrees with its shards are reported together, naming the files.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from minaf3.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Real headers are small (the official 7B shards: ~60 KB). A larger claimed length means the first 8 bytes
# are not a safetensors header, and reading that many bytes would only waste memory.
MAX_HEADER_BYTES = 100 * 2**20
# Bytes per element of each safetensors dtype name.
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# Error messages list this many items of each kind, then a count of the rest.
LIST_LIMIT = 20


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its file's header describes it."""

    file: Path  # the file that holds it
    label: str  # that file, relative to the checkpoint folder, for messages
    key: str  # its name inside the file
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # byte offset of its data in the file; reading in this order reads the file front to back

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


def listing(items: list[str], what: str) -> str:
    """'  <what> (N):' and the first LIST_LIMIT items, one per line: the body of a CheckpointError."""
    lines = [f"  {what} ({len(items)}):"] + [f"    {item}" for item in items[:LIST_LIMIT]]
    if len(items) > LIST_LIMIT:
        lines.append(f"    ... and {len(items) - LIST_LIMIT} more")
    return "\n".join(lines)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_header_bytes(path: Path, label: str, size: int) -> bytes:
    """The JSON header of a `size`-byte file: the bytes its first 8 (a little-endian length) announce."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{label}: {size} bytes, too short to be a safetensors file")
        header_bytes = int.from_bytes(head, "little")
        if header_bytes > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{label}: not a safetensors file or a corrupt one: its first 8 bytes give a header "
                f"length of {header_bytes} bytes in a file of {size} bytes"
            )
        return f.read(header_bytes)


def _parse_header(raw: bytes, label: str) -> dict:
    """The header's entries (tensor name -> entry), without the free-form __metadata__."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{label}: corrupt safetensors header, not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{label}: corrupt safetensors header, not a JSON object")
    header.pop("__metadata__", None)  # free-form strings, not a tensor
    return header


def _entry_fields(key: str, entry: object, label: str) -> tuple[str, list[int], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked: a known dtype, counts, and a byte span
    [begin, end) of the data area exactly as long as dtype and shape need."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{label}: corrupt safetensors header entry for {key!r}: {entry!r}") from None
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{label}: tensor {key!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(map(_is_count, shape)) and _is_count(begin) and _is_count(end)):
        raise CheckpointError(f"{label}: corrupt safetensors header entry for {key!r}: {entry!r}")
    if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise CheckpointError(
            f"{label}: corrupt safetensors header: tensor {key!r} ({dtype} {shape}) spans "
            f"{end - begin} bytes, its shape needs {math.prod(shape) * DTYPE_BYTES[dtype]}"
        )
    return dtype, shape, begin, end


def _check_spans(spans: list[tuple[int, int, str]], data_bytes: int, label: str) -> None:
    """The spans (begin, end, key) tile the `data_bytes` after the header from 0, without gaps or overlaps."""
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            raise CheckpointError(
                f"{label}: corrupt safetensors header: tensor {key!r} starts at byte {begin} of the data, "
                f"the previous tensor ends at {position} (gap or overlap)"
            )
        position = end
    if data_bytes < position:
        raise CheckpointError(
            f"{label}: truncated: the header describes {position} bytes of tensor data, the file holds "
            f"{data_bytes} (an interrupted download or copy?)"
        )
    if data_bytes > position:
        raise CheckpointError(
            f"{label}: corrupt: {data_bytes - position} bytes follow the last tensor the header describes"
        )


def read_header(path: Path, label: str) -> dict[str, TensorInfo]:
    """The tensors listed in one safetensors file; a CheckpointError naming `label` if the file is damaged.

    Checks the header parses, every entry's byte span matches its dtype and shape, the spans tile the data
    area from 0 without gaps or overlaps (as safetensors requires), and the file is exactly that long.
    """
    size = path.stat().st_size
    raw = _read_header_bytes(path, label, size)
    data_start = 8 + len(raw)
    tensors, spans = {}, []
    for key, entry in _parse_header(raw, label).items():
        dtype, shape, begin, end = _entry_fields(key, entry, label)
        tensors[key] = TensorInfo(path, label, key, dtype, tuple(shape), data_start + begin)
        spans.append((begin, end, key))
    _check_spans(spans, size - data_start, label)
    return tensors


def weight_files(directory: Path, root: Path) -> tuple[list[Path], Path | None]:
    """The safetensors files of the checkpoint in `directory` and its index (None if not sharded).

    Same precedence as transformers: `model.safetensors`, then the index, then a lone `*.safetensors`
    (the original NVIDIA folders may name theirs differently). No weights at all gives ([], None).
    """
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE], None
    if (directory / INDEX_FILE).is_file():
        return [], directory / INDEX_FILE
    found = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if len(found) > 1:
        names = ", ".join(p.relative_to(root).as_posix() for p in found[:LIST_LIMIT])
        raise CheckpointError(
            f"{directory}: {len(found)} safetensors files ({names}) but no {INDEX_FILE} to say how they "
            f"form one checkpoint"
        )
    return found, None


def read_index(index: Path, label: str) -> dict[str, str]:
    """The index's weight_map: tensor name -> shard file name (a plain name in the index's folder)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as e:
        raise CheckpointError(f"{label}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{label}: weight_map must map tensor names to file names")
    for shard in set(weight_map.values()):
        # A path outside the folder is never a shard: refuse rather than read an arbitrary file.
        if Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise CheckpointError(f"{label}: {shard!r} is not a safetensors file name in this folder")
    return weight_map


def scan_folder(directory: Path, root: Path) -> tuple[dict[str, TensorInfo], list[str]]:
    """Every tensor of the checkpoint in `directory` (key in its file -> info), and every problem found.

    Problems are collected, not raised, so that one error can list all of them; `root` is the checkpoint
    folder that messages name files relative to. No weights at all is a problem too.
    """

    def label(path: Path) -> str:
        return path.relative_to(root).as_posix()

    files, index = weight_files(directory, root)
    weight_map = read_index(index, label(index)) if index else None
    if weight_map is not None:
        files = [directory / shard for shard in sorted(set(weight_map.values()))]
    if not files:
        return {}, [f"{label(directory) if directory != root else '.'}: no safetensors files"]

    tensors: dict[str, TensorInfo] = {}
    problems, unreadable = [], set()
    for path in files:
        if not path.is_file():
            listed = [k for k, v in weight_map.items() if v == path.name]
            shown = ", ".join(listed[:3]) + (", ..." if len(listed) > 3 else "")
            problems.append(
                f"{label(path)}: missing; {label(index)} lists it for {len(listed)} tensor(s): {shown}"
            )
            unreadable.add(path.name)
            continue
        try:
            header = read_header(path, label(path))
        except CheckpointError as e:
            problems.append(str(e))
            unreadable.add(path.name)
            continue
        for key, info in header.items():
            if key in tensors:
                problems.append(f"{key}: stored twice, in {tensors[key].label} and {info.label}")
            tensors[key] = info

    if weight_map is not None:
        # The index and the shards must agree both ways: a disagreement means files from two different saves.
        for key, shard in weight_map.items():
            info = tensors.get(key)
            if info is None and shard not in unreadable:
                problems.append(f"{label(index)}: lists {key} in {shard}, which does not hold it")
            elif info is not None and info.file.name != shard:
                problems.append(f"{label(index)}: lists {key} in {shard}, but {info.label} holds it")
        for key, info in tensors.items():
            if key not in weight_map:
                problems.append(f"{info.label}: holds {key}, which {label(index)} does not list")
    return tensors, problems
