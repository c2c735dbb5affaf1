"""Read a checkpoint folder into our tensor names: check everything first, then map or copy each tensor.

    read_checkpoint(folder, expected)   -> {our name: tensor}, in any of the three layouts (layouts.py)
    checkpoint_files(folder, required)  -> {role: path} of the config, tokenizer and processor files
    check_model_folder(path)            -> the folder, or one CheckpointError line naming what is missing

Order of work, so that a bad download costs seconds and a clear message rather than a half-built model:
1. headers only (layouts.scan_checkpoint): every file present, parseable, as long as its header says, and
   consistent with the index;
2. names and shapes: the checkpoint against `expected` (our model's state_dict shapes); missing,
   unexpected, wrongly shaped and integer (or 8-bit) tensors are reported together in one CheckpointError;
3. data, one tensor at a time. A tensor already in the wanted dtype on CPU is a view of the memory-mapped
   file: loading costs nothing and pages are read on first use, as transformers does. Any other tensor is
   copied into its final dtype and device from a mapping opened for it alone, then closed.

Peak memory is therefore the weights in their final dtype plus one tensor: a converted tensor's source pages
are unmapped as soon as it is copied (one mapping kept open for a whole file would keep every page read so
far resident too). Views of the file live as long as the tensors: the kernel keeps a deleted or replaced
file's data for them, but a file truncated or rewritten in place changes or breaks them (SIGBUS), so a save
into the same folder must write new files (unlink or rename over), as transformers' save_pretrained does.
"""

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from minaf3.errors import CheckpointError, ConfigError

from .hub import model_folder
from .layouts import checkpoint_names, scan_checkpoint
from .shards import INDEX_FILE, SINGLE_FILE, TensorInfo, listing

# Our model's parameters are all floating point; the checkpoint may store them in any of these (8-bit
# floats need scales that a plain safetensors file does not carry).
STORED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}

# Files besides the weights, by role, in order of preference. transformers 5 nests the feature extractor
# settings in processor_config.json; older saves have preprocessor_config.json.
SUPPORT_FILES = {
    "config": ("config.json",),
    "generation config": ("generation_config.json",),
    "tokenizer": ("tokenizer.json",),
    "tokenizer config": ("tokenizer_config.json",),
    "chat template": ("chat_template.jinja", "chat_template.json"),
    "processor config": ("processor_config.json", "preprocessor_config.json"),
}
# The roles a model folder needs besides the weights (check_model_folder).
REQUIRED_FILES = ("config", "tokenizer", "tokenizer config", "processor config")
# How check_model_folder's messages end: a partial or interrupted download is the usual cause.
DOWNLOAD_HINT = (
    "Pass the model id nvidia/audio-flamingo-3-hf (downloaded into the Hugging Face cache on first use), or "
    "download it with `huggingface-cli download nvidia/audio-flamingo-3-hf --local-dir audio-flamingo-3-hf` "
    "and pass that folder."
)


def _mismatches(
    expected: dict[str, torch.Size], names: dict[str, str], stored: dict[str, TensorInfo]
) -> list[str]:
    """The body of the error for a checkpoint that does not fit the model; empty when it fits."""
    missing, shapes, dtypes = [], [], []
    for ours, shape in expected.items():
        theirs = names[ours]
        name = ours if theirs == ours else f"{ours} (stored as {theirs})"
        info = stored.get(theirs)
        if info is None:
            missing.append(name)
        elif info.shape != tuple(shape):
            shapes.append(f"{name}: the model expects {tuple(shape)}, {info.label} holds {info.shape}")
        elif info.dtype not in STORED_DTYPES:
            dtypes.append(f"{name}: {info.label} holds {info.dtype}; expected {', '.join(STORED_DTYPES)}")
    mapped = set(names.values())
    unexpected = [f"{key} in {info.label}" for key, info in sorted(stored.items()) if key not in mapped]
    parts = [
        (missing, "missing tensors"),
        (unexpected, "unexpected tensors, not in the model"),
        (shapes, "tensors with the wrong shape"),
        (dtypes, "tensors in a dtype that cannot be loaded"),
    ]
    return [listing(items, what) for items, what in parts if items]


def _read_file(
    items: list[tuple[str, TensorInfo]], dtype: torch.dtype | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """The tensors `items` (our name, info) of one file, in `dtype` (None: as stored) on `device`."""
    out = {}
    file, label = items[0][1].file, items[0][1].label
    try:
        # One mapping shared by every tensor that stays a view of the file.
        with safe_open(file, framework="pt", device="cpu") as shared:
            for ours, info in items:
                if device.type == "cpu" and dtype in (None, STORED_DTYPES[info.dtype]):
                    out[ours] = shared.get_tensor(info.key)
                    continue
                # Its own mapping, closed right after the copy: this tensor's pages leave memory again.
                with safe_open(file, framework="pt", device="cpu") as own:
                    stored = own.get_tensor(info.key)  # a view: nothing read yet
                    out[ours] = torch.empty(stored.shape, dtype=dtype or stored.dtype, device=device)
                    out[ours].copy_(stored)  # reads, converts and moves in one pass, no intermediate copy
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{label}: could not be read ({e})") from None
    return out


def read_checkpoint(
    folder: str | Path,
    expected: dict[str, torch.Size],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint in `folder`, under our names, in `dtype` (None: as stored) on `device`.

    `expected` maps each of our tensor names to its shape (a model's `state_dict()` shapes); the result has
    exactly these keys. Raises CheckpointError before any tensor data is read if a file is missing, damaged
    or inconsistent, or if any tensor is missing, unexpected, wrongly shaped or not a 16/32/64-bit float.
    """
    folder = Path(folder)
    layout, stored = scan_checkpoint(folder)
    names = checkpoint_names(layout, expected)
    problems = _mismatches(expected, names, stored)
    if problems:
        raise CheckpointError(
            f"{folder} ({layout.name} layout) does not match the model:\n" + "\n".join(problems)
        )
    device = torch.device(device)
    by_file: dict[Path, list[tuple[str, TensorInfo]]] = {}
    for ours in expected:
        info = stored[names[ours]]
        by_file.setdefault(info.file, []).append((ours, info))
    tensors = {}
    for items in by_file.values():
        # In file order, so that a checkpoint on a cold disk is read front to back.
        tensors.update(_read_file(sorted(items, key=lambda item: item[1].offset), dtype, device))
    return {ours: tensors[ours] for ours in expected}


def checkpoint_files(folder: str | Path, required: tuple[str, ...] = ()) -> dict[str, Path | None]:
    """Role -> path of each support file in `folder` (None when absent): config, tokenizer, ...

    Roles are the keys of SUPPORT_FILES. A missing `required` role raises one CheckpointError that names
    every missing file and lists what the folder does hold.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    found = {
        role: next((folder / name for name in names if (folder / name).is_file()), None)
        for role, names in SUPPORT_FILES.items()
    }
    unknown = [role for role in required if role not in SUPPORT_FILES]
    if unknown:
        raise ConfigError(f"unknown support file roles {unknown}; known: {list(SUPPORT_FILES)}")
    missing = [f"{role} ({' or '.join(SUPPORT_FILES[role])})" for role in required if found[role] is None]
    if missing:
        held = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
        raise CheckpointError(
            f"{folder}: incomplete checkpoint folder:\n"
            + listing(missing, "missing files")
            + "\n"
            + listing(held, "entries in the folder")
        )
    return found


def check_model_folder(path: str | Path, revision: str | None = None) -> Path:
    """The checkpoint folder of `path` (a folder, or a hub model id: hub.model_folder), checked: fails early
    with one line naming what is missing when it is not a complete checkpoint folder.

    Reads only the folder listing and the safetensors headers. The message ends with how to download the
    official checkpoint, since an interrupted or partial download is the usual cause.
    """
    folder = model_folder(path, revision)
    if not folder.is_dir():
        kind = "is a file, not a model folder" if folder.exists() else "no such model folder"
        raise CheckpointError(f"{folder}: {kind}. {DOWNLOAD_HINT}")
    missing = [
        " or ".join(SUPPORT_FILES[role])
        for role in REQUIRED_FILES
        if not any((folder / name).is_file() for name in SUPPORT_FILES[role])
    ]
    has_weights = (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()
    if not has_weights and not (folder / "llm").is_dir():  # llm/: the original NVIDIA layout's folders
        missing.append(f"{SINGLE_FILE} (or {INDEX_FILE} and its shards)")
    if missing:
        raise CheckpointError(
            f"{folder}: incomplete model folder, missing {', '.join(missing)}. {DOWNLOAD_HINT}"
        )
    try:
        scan_checkpoint(folder)  # damaged or missing shards, listed file by file
    except CheckpointError as e:
        raise CheckpointError(f"{e}\n{DOWNLOAD_HINT}") from None
    return folder
