"""The three checkpoint layouts Audio Flamingo 3 ships in: one explicit name table each, and detection.

    hub            audio_tower.*, multi_modal_projector.*, language_model.model.*,
                   language_model.lm_head.weight
                   (nvidia/audio-flamingo-3-hf; what transformers' save_pretrained writes)
    transformers5  model.audio_tower.*, model.multi_modal_projector.*, model.language_model.*, lm_head.weight
                   (transformers 5's in-memory names, found in state_dicts and some re-saved checkpoints)
    nvidia         llm/ (Qwen2: model.*, lm_head.weight), sound_tower/ (the encoder's own names),
                   sound_mm_projector/ (layers.0 and layers.2 of nn.Sequential(Linear, GELU, Linear))
                   (nvidia/audio-flamingo-3; transformers' convert_audioflamingo3_to_hf.py prefixes each
                   folder's keys, renames the projector and loads strictly: the folders hold no other tensors)

A table maps our module names to the checkpoint's module names; a tensor's leaf (`weight`, `bias`) is the
same everywhere, so `language_model.layers.3.mlp.up_proj.weight` is looked up as module
`language_model.layers.3.mlp.up_proj` plus `.weight`. `{e}` stands for an encoder layer index, `{d}` for a
decoder layer index. In the nvidia layout a checkpoint name starts with its folder: `llm/model.norm`.
"""

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from minaf3.errors import CheckpointError, ConfigError

from .shards import INDEX_FILE, SINGLE_FILE, TensorInfo, listing, scan_folder, weight_files


@dataclass(frozen=True)
class Layout:
    name: str
    folders: tuple[str, ...]  # the folders holding weights; "" is the checkpoint folder itself
    table: dict[str, str]  # our module template -> checkpoint module template


HUB = Layout(
    name="hub",
    folders=("",),
    table={
        "audio_tower.conv1": "audio_tower.conv1",
        "audio_tower.conv2": "audio_tower.conv2",
        "audio_tower.embed_positions": "audio_tower.embed_positions",
        "audio_tower.layers.{e}.self_attn.q_proj": "audio_tower.layers.{e}.self_attn.q_proj",
        "audio_tower.layers.{e}.self_attn.k_proj": "audio_tower.layers.{e}.self_attn.k_proj",
        "audio_tower.layers.{e}.self_attn.v_proj": "audio_tower.layers.{e}.self_attn.v_proj",
        "audio_tower.layers.{e}.self_attn.out_proj": "audio_tower.layers.{e}.self_attn.out_proj",
        "audio_tower.layers.{e}.self_attn_layer_norm": "audio_tower.layers.{e}.self_attn_layer_norm",
        "audio_tower.layers.{e}.fc1": "audio_tower.layers.{e}.fc1",
        "audio_tower.layers.{e}.fc2": "audio_tower.layers.{e}.fc2",
        "audio_tower.layers.{e}.final_layer_norm": "audio_tower.layers.{e}.final_layer_norm",
        "audio_tower.layer_norm": "audio_tower.layer_norm",
        "multi_modal_projector.linear_1": "multi_modal_projector.linear_1",
        "multi_modal_projector.linear_2": "multi_modal_projector.linear_2",
        "language_model.embed_tokens": "language_model.model.embed_tokens",
        "language_model.layers.{d}.self_attn.q_proj": "language_model.model.layers.{d}.self_attn.q_proj",
        "language_model.layers.{d}.self_attn.k_proj": "language_model.model.layers.{d}.self_attn.k_proj",
        "language_model.layers.{d}.self_attn.v_proj": "language_model.model.layers.{d}.self_attn.v_proj",
        "language_model.layers.{d}.self_attn.o_proj": "language_model.model.layers.{d}.self_attn.o_proj",
        "language_model.layers.{d}.mlp.gate_proj": "language_model.model.layers.{d}.mlp.gate_proj",
        "language_model.layers.{d}.mlp.up_proj": "language_model.model.layers.{d}.mlp.up_proj",
        "language_model.layers.{d}.mlp.down_proj": "language_model.model.layers.{d}.mlp.down_proj",
        "language_model.layers.{d}.input_layernorm": "language_model.model.layers.{d}.input_layernorm",
        "language_model.layers.{d}.post_attention_layernorm": (
            "language_model.model.layers.{d}.post_attention_layernorm"
        ),
        "language_model.norm": "language_model.model.norm",
        "lm_head": "language_model.lm_head",
    },
)

TRANSFORMERS5 = Layout(
    name="transformers5",
    folders=("",),
    table={
        "audio_tower.conv1": "model.audio_tower.conv1",
        "audio_tower.conv2": "model.audio_tower.conv2",
        "audio_tower.embed_positions": "model.audio_tower.embed_positions",
        "audio_tower.layers.{e}.self_attn.q_proj": "model.audio_tower.layers.{e}.self_attn.q_proj",
        "audio_tower.layers.{e}.self_attn.k_proj": "model.audio_tower.layers.{e}.self_attn.k_proj",
        "audio_tower.layers.{e}.self_attn.v_proj": "model.audio_tower.layers.{e}.self_attn.v_proj",
        "audio_tower.layers.{e}.self_attn.out_proj": "model.audio_tower.layers.{e}.self_attn.out_proj",
        "audio_tower.layers.{e}.self_attn_layer_norm": "model.audio_tower.layers.{e}.self_attn_layer_norm",
        "audio_tower.layers.{e}.fc1": "model.audio_tower.layers.{e}.fc1",
        "audio_tower.layers.{e}.fc2": "model.audio_tower.layers.{e}.fc2",
        "audio_tower.layers.{e}.final_layer_norm": "model.audio_tower.layers.{e}.final_layer_norm",
        "audio_tower.layer_norm": "model.audio_tower.layer_norm",
        "multi_modal_projector.linear_1": "model.multi_modal_projector.linear_1",
        "multi_modal_projector.linear_2": "model.multi_modal_projector.linear_2",
        "language_model.embed_tokens": "model.language_model.embed_tokens",
        "language_model.layers.{d}.self_attn.q_proj": "model.language_model.layers.{d}.self_attn.q_proj",
        "language_model.layers.{d}.self_attn.k_proj": "model.language_model.layers.{d}.self_attn.k_proj",
        "language_model.layers.{d}.self_attn.v_proj": "model.language_model.layers.{d}.self_attn.v_proj",
        "language_model.layers.{d}.self_attn.o_proj": "model.language_model.layers.{d}.self_attn.o_proj",
        "language_model.layers.{d}.mlp.gate_proj": "model.language_model.layers.{d}.mlp.gate_proj",
        "language_model.layers.{d}.mlp.up_proj": "model.language_model.layers.{d}.mlp.up_proj",
        "language_model.layers.{d}.mlp.down_proj": "model.language_model.layers.{d}.mlp.down_proj",
        "language_model.layers.{d}.input_layernorm": "model.language_model.layers.{d}.input_layernorm",
        "language_model.layers.{d}.post_attention_layernorm": (
            "model.language_model.layers.{d}.post_attention_layernorm"
        ),
        "language_model.norm": "model.language_model.norm",
        "lm_head": "lm_head",
    },
)

NVIDIA = Layout(
    name="nvidia",
    folders=("llm", "sound_tower", "sound_mm_projector"),
    table={
        "audio_tower.conv1": "sound_tower/conv1",
        "audio_tower.conv2": "sound_tower/conv2",
        "audio_tower.embed_positions": "sound_tower/embed_positions",
        "audio_tower.layers.{e}.self_attn.q_proj": "sound_tower/layers.{e}.self_attn.q_proj",
        "audio_tower.layers.{e}.self_attn.k_proj": "sound_tower/layers.{e}.self_attn.k_proj",
        "audio_tower.layers.{e}.self_attn.v_proj": "sound_tower/layers.{e}.self_attn.v_proj",
        "audio_tower.layers.{e}.self_attn.out_proj": "sound_tower/layers.{e}.self_attn.out_proj",
        "audio_tower.layers.{e}.self_attn_layer_norm": "sound_tower/layers.{e}.self_attn_layer_norm",
        "audio_tower.layers.{e}.fc1": "sound_tower/layers.{e}.fc1",
        "audio_tower.layers.{e}.fc2": "sound_tower/layers.{e}.fc2",
        "audio_tower.layers.{e}.final_layer_norm": "sound_tower/layers.{e}.final_layer_norm",
        "audio_tower.layer_norm": "sound_tower/layer_norm",
        "multi_modal_projector.linear_1": "sound_mm_projector/layers.0",
        "multi_modal_projector.linear_2": "sound_mm_projector/layers.2",
        "language_model.embed_tokens": "llm/model.embed_tokens",
        "language_model.layers.{d}.self_attn.q_proj": "llm/model.layers.{d}.self_attn.q_proj",
        "language_model.layers.{d}.self_attn.k_proj": "llm/model.layers.{d}.self_attn.k_proj",
        "language_model.layers.{d}.self_attn.v_proj": "llm/model.layers.{d}.self_attn.v_proj",
        "language_model.layers.{d}.self_attn.o_proj": "llm/model.layers.{d}.self_attn.o_proj",
        "language_model.layers.{d}.mlp.gate_proj": "llm/model.layers.{d}.mlp.gate_proj",
        "language_model.layers.{d}.mlp.up_proj": "llm/model.layers.{d}.mlp.up_proj",
        "language_model.layers.{d}.mlp.down_proj": "llm/model.layers.{d}.mlp.down_proj",
        "language_model.layers.{d}.input_layernorm": "llm/model.layers.{d}.input_layernorm",
        "language_model.layers.{d}.post_attention_layernorm": "llm/model.layers.{d}.post_attention_layernorm",
        "language_model.norm": "llm/model.norm",
        "lm_head": "llm/lm_head",
    },
)

LAYOUTS = {layout.name: layout for layout in (HUB, TRANSFORMERS5, NVIDIA)}


def expand(table: dict[str, str], encoder_layers: int, decoder_layers: int) -> dict[str, str]:
    """The table with `{e}` and `{d}` filled in for every layer: concrete module name -> module name."""
    counts = {"e": encoder_layers, "d": decoder_layers}
    out = {}
    for ours, theirs in table.items():
        field = next((f for f in counts if f"{{{f}}}" in ours), None)
        if field is None:
            out[ours] = theirs
            continue
        for i in range(counts[field]):
            out[ours.format(**{field: i})] = theirs.format(**{field: i})
    return out


def count_layers(names: Iterable[str], templates: Iterable[str], field: str) -> int:
    """1 + the highest layer index among `names` for the `{field}` templates (0 if none).

    The highest index, not the number of distinct ones: a layer missing in the middle must show up as
    missing tensors rather than shift the others.
    """
    prefixes = {t.partition(f"{{{field}}}")[0] for t in templates if f"{{{field}}}" in t}
    indices = [
        int(index)
        for name in names
        for prefix in prefixes
        if name.startswith(prefix) and (index := name[len(prefix) :].partition(".")[0]).isdigit()
    ]
    return max(indices) + 1 if indices else 0


def _expand_for(layout: Layout, names: list[str], side: str) -> dict[str, str]:
    """The layout's table expanded for as many layers as `names` hold (our names or the checkpoint's)."""
    templates = list(layout.table.keys() if side == "ours" else layout.table.values())
    return expand(layout.table, count_layers(names, templates, "e"), count_layers(names, templates, "d"))


def checkpoint_names(layout: Layout, ours: Iterable[str]) -> dict[str, str]:
    """Our tensor name -> the checkpoint's tensor name in `layout`, for every name in `ours`."""
    ours = list(ours)
    table = _expand_for(layout, ours, side="ours")
    names, unknown = {}, []
    for name in ours:
        module, _, leaf = name.rpartition(".")
        if module in table:
            names[name] = f"{table[module]}.{leaf}"
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(
            f"the {layout.name} layout table has no entry for these model tensors:\n"
            + listing(unknown, "unmapped tensors")
        )
    return names


def our_names(layout: Layout, stored: Iterable[str]) -> dict[str, str]:
    """Checkpoint tensor name -> our tensor name, for the stored names the layout's table knows."""
    stored = list(stored)
    inverse = {theirs: ours for ours, theirs in _expand_for(layout, stored, side="theirs").items()}
    names = {}
    for name in stored:
        module, _, leaf = name.rpartition(".")
        if module in inverse:
            names[name] = f"{inverse[module]}.{leaf}"
    return names


def _raise_problems(folder: Path, problems: list[str]) -> None:
    if problems:
        raise CheckpointError(
            f"{folder}: damaged or incomplete checkpoint:\n" + listing(problems, "problems")
        )


def scan_checkpoint(folder: Path) -> tuple[Layout, dict[str, TensorInfo]]:
    """Detect the layout of `folder` and list its tensors (checkpoint name -> info), reading only headers.

    Weights in the folder itself are the hub or transformers5 layout, told apart by which table explains
    more of the names; otherwise the llm/ sound_tower/ sound_mm_projector/ folders are the nvidia layout.
    Every damaged, missing or inconsistent file is reported in one CheckpointError.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    if any(weight_files(folder, folder)):
        tensors, problems = scan_folder(folder, folder)
        _raise_problems(folder, problems)
        score, best = max((len(our_names(layout, tensors)), layout.name) for layout in (HUB, TRANSFORMERS5))
        if score == 0:
            raise CheckpointError(
                f"{folder}: its {len(tensors)} tensors match no known layout (expected names like "
                f"audio_tower.conv1.weight or model.audio_tower.conv1.weight); it holds:\n"
                + listing(sorted(tensors), "tensors")
            )
        return LAYOUTS[best], tensors
    if not any((folder / sub).is_dir() for sub in NVIDIA.folders):
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
        raise CheckpointError(
            f"{folder}: no checkpoint weights: expected model.safetensors, {INDEX_FILE}, or the folders "
            f"{', '.join(f + '/' for f in NVIDIA.folders)}; the folder holds:\n" + listing(found, "entries")
        )
    tensors, problems = {}, []
    for sub in NVIDIA.folders:
        if not (folder / sub).is_dir():
            problems.append(f"{sub}/: missing (the original NVIDIA layout has {', '.join(NVIDIA.folders)})")
            continue
        found, found_problems = scan_folder(folder / sub, folder)
        problems += found_problems
        tensors.update({f"{sub}/{key}": info for key, info in found.items()})
    _raise_problems(folder, problems)
    return NVIDIA, tensors


def write_layout(source: Path, destination: Path, layout: str, max_shard_bytes: int | None = None) -> Path:
    """Rewrite the checkpoint in `source` (any layout) as `layout` in `destination`, with its other files.

    Tensors keep their bytes and dtype; only names and files change. Shards hold at most `max_shard_bytes`
    (one file per folder when None). Files that are not weights (config, tokenizer) are copied as they are.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r}: expected one of {sorted(LAYOUTS)}")
    source, destination = Path(source), Path(destination)
    if destination.exists() and any(destination.iterdir()):
        # Old weights beside new ones would make the folder ambiguous (model.safetensors wins over shards).
        raise ConfigError(f"{destination}: not empty; write a new layout into a new folder")
    source_layout, stored = scan_checkpoint(source)
    ours = our_names(source_layout, stored)
    unknown = sorted(stored.keys() - ours.keys())
    if unknown:  # dropping them silently would make a smaller, different checkpoint
        raise CheckpointError(
            f"{source}: tensors the {source_layout.name} layout does not know:\n"
            + listing(unknown, "tensors")
        )
    target = LAYOUTS[layout]
    renamed = checkpoint_names(target, ours.values())
    by_folder: dict[str, dict[str, TensorInfo]] = {sub: {} for sub in target.folders}
    for theirs, info in ((renamed[name], stored[key]) for key, name in ours.items()):
        sub, _, key = theirs.rpartition("/")
        by_folder[sub][key] = info
    for sub, infos in by_folder.items():
        _write_shards(destination / sub, infos, max_shard_bytes)
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != INDEX_FILE:
            shutil.copy2(path, destination / path.name)
    return destination


def _write_shards(directory: Path, infos: dict[str, TensorInfo], max_shard_bytes: int | None) -> None:
    """Write the tensors `infos` point at (key -> where it is now) as model.safetensors or shards + index."""
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(infos):
        if max_shard_bytes and shards[-1] and size + infos[key].nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += infos[key].nbytes
    files = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file, keys in zip(files, shards, strict=True):
        tensors = {}
        for key in keys:
            # A view of the mapped source file: a shard is written without copying it into memory first.
            with safe_open(infos[key].file, framework="pt") as handle:
                tensors[key] = handle.get_tensor(infos[key].key)
        save_file(tensors, directory / file, metadata={"format": "pt"})
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(info.nbytes for info in infos.values())},
            "weight_map": {key: file for file, keys in zip(files, shards, strict=True) for key in keys},
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
