"""Read a PEFT LoRA adapter folder (AF-Think ships one as `think/`) into our names; check it all before use.

    adapter_config.json         PEFT's LoraConfig: r, lora_alpha, target_modules, use_rslora, patterns, ...
    adapter_model.safetensors   <wrapper><module>.lora_A.weight (r, in) and .lora_B.weight (out, r); full
                                tensors of `modules_to_save` and trained biases
    non_lora_trainables.bin     a torch.save'd {name: tensor} of full tensors that replace base weights

The names are a model's own names behind a wrapper prefix: PEFT's (`base_model.model.`) or the `model.` that
AF3's own think-mode loader strips. The model's own names are those of one of the three layouts (layouts.py),
mapped through the same tables as the checkpoints; the nvidia layout appears in its in-memory form
(`llm.model.layers.0...`) rather than as folders. Each file is read with the prefix and layout that explain
most of its names, and any name left unexplained is an error, as are a LoRA pair the config does not target,
a target without its pair, a target that names no module of the model, and any wrong shape.

Target matching follows PEFT's rules (`check_target_module_exists`): a string is a regex that must match a
whole module name, a list entry matches a name equal to it or ending in `.entry` (PEFT writes "all-linear"
out as such a list when it saves). Names are matched in the adapter's own layout, as PEFT saw them.
"""

import json
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from minaf3.errors import CheckpointError

from .layouts import LAYOUTS, NVIDIA, Layout, checkpoint_names, our_names
from .shards import listing

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # .bin: PEFT with safe_serialization=False
NON_LORA_FILE = "non_lora_trainables.bin"
# In order of preference when two explain the same number of names: PEFT's PeftModel -> LoraModel wrapper,
# the `model.` that AF3's think-mode loader strips from non_lora_trainables, and no wrapper.
WRAPPER_PREFIXES = ("base_model.model.", "model.", "")
# nvidia layout in memory (VILA's LlavaLlamaModel attributes) -> the folder its weights are saved in. The
# sound tower wrapper holds the encoder as its own `.sound_tower`, so in memory the encoder's names carry the
# prefix twice; the first prefix of each folder is the one used to name our modules when matching targets.
NVIDIA_IN_MEMORY = (
    ("llm.", "llm/"),
    ("sound_tower.sound_tower.", "sound_tower/"),
    ("sound_tower.", "sound_tower/"),
    ("sound_mm_projector.", "sound_mm_projector/"),
)
LORA_LEAVES = {"lora_A.weight": "A", "lora_B.weight": "B"}
# LoraConfig fields that change what the tensors mean in ways this loader does not implement; any truthy
# value is refused rather than half-applied.
UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "layers_to_transform",
    "layers_pattern",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "alora_invocation_tokens",
)
# PEFT's LoRA layer holds the layer it wraps as `base_layer`, so trained biases are saved as
# `q_proj.base_layer.bias`; the segment is dropped to get the model's own name.
BASE_LAYER = ".base_layer."


@dataclass(frozen=True)
class LoraSettings:
    """What adapter_config.json says. `fan_in_fan_out` is ignored as PEFT ignores it for nn.Linear layers."""

    r: int
    alpha: float
    use_rslora: bool
    target_modules: str | tuple[str, ...]
    exclude_modules: str | tuple[str, ...] | None
    modules_to_save: tuple[str, ...]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    bias: str

    def rank_and_scaling(self, key: str) -> tuple[int, float]:
        """Rank and scale of the module named `key` (adapter layout): alpha / r, or alpha / sqrt(r) (rsLoRA).

        A pattern applies when it matches the end of the name at a dot boundary (PEFT's get_pattern_key).
        """
        r = next((v for p, v in self.rank_pattern.items() if re.match(rf"(.*\.)?({p})$", key)), self.r)
        alpha = next(
            (v for p, v in self.alpha_pattern.items() if re.match(rf"(.*\.)?({p})$", key)), self.alpha
        )
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)


@dataclass(frozen=True)
class LoRAPair:
    """One layer's update W + scaling * B @ A: A (r, in_features), B (out_features, r), as stored."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float


@dataclass(frozen=True)
class Adapter:
    settings: LoraSettings
    lora: dict[str, LoRAPair]  # our module name -> its pair
    replacements: dict[str, torch.Tensor]  # our parameter name -> the full tensor that replaces it


def _patterns(value, field: str, label: str) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise CheckpointError(f"{label}: {field} must be a string or a list of strings, not {value!r}")


def _is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_settings(folder: Path) -> LoraSettings:
    """The settings in `folder`/adapter_config.json; CheckpointError if absent, unreadable or unusable."""
    path = folder / CONFIG_FILE
    label = f"{folder.name}/{CONFIG_FILE}"
    if not path.is_file():
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
        hint = (
            " (the adapter is in its think/ subfolder)" if (folder / "think" / CONFIG_FILE).is_file() else ""
        )
        raise CheckpointError(
            f"{folder}: no {CONFIG_FILE}{hint}; the folder holds:\n" + listing(found, "entries")
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{label}: not valid JSON: {e}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{label}: peft_type {config['peft_type']!r}; only LORA adapters are supported")
    for field in ("r", "lora_alpha", "target_modules"):
        if config.get(field) is None:
            raise CheckpointError(f"{label}: {field} is missing")
    r, alpha = config["r"], config["lora_alpha"]
    if not _is_rank(r) or not _is_number(alpha):
        raise CheckpointError(
            f"{label}: r={r!r}, lora_alpha={alpha!r}; expected a positive integer and a number"
        )
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if not isinstance(ranks, dict) or not all(_is_rank(v) for v in ranks.values()):
        raise CheckpointError(f"{label}: rank_pattern={ranks!r}; expected pattern -> positive integer")
    if not isinstance(alphas, dict) or not all(_is_number(v) for v in alphas.values()):
        raise CheckpointError(f"{label}: alpha_pattern={alphas!r}; expected pattern -> number")
    used = [field for field in UNSUPPORTED if config.get(field)]
    if used:
        raise CheckpointError(f"{label}: uses {', '.join(used)}, which this loader does not implement")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise CheckpointError(f"{label}: bias={config['bias']!r}; expected 'none', 'all' or 'lora_only'")
    targets = _patterns(config["target_modules"], "target_modules", label)
    excluded = _patterns(config.get("exclude_modules"), "exclude_modules", label)
    saved = tuple(_patterns(config.get("modules_to_save"), "modules_to_save", label) or ())
    # Strings are regular expressions to PEFT, and so are the entries of modules_to_save and pattern keys.
    for pattern in [p for p in (targets, excluded) if isinstance(p, str)] + [*saved, *ranks, *alphas]:
        try:
            re.compile(pattern)
        except re.error as e:
            raise CheckpointError(f"{label}: {pattern!r} is not a valid regular expression: {e}") from None
    return LoraSettings(
        r=r,
        alpha=float(alpha),
        use_rslora=bool(config.get("use_rslora", False)),
        target_modules=targets,
        exclude_modules=excluded,
        modules_to_save=saved,
        rank_pattern=ranks,
        alpha_pattern={p: float(v) for p, v in alphas.items()},
        bias=config.get("bias", "none"),
    )


def check_adapter_folder(folder: str | Path) -> LoraSettings:
    """The settings of the adapter in `folder` once its config is read and its weights file found: what can be
    checked before a model exists. CheckpointError for a missing folder, config or weights file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: adapter folder not found")
    settings = read_settings(folder)
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise CheckpointError(f"{folder}: no adapter weights ({' or '.join(WEIGHT_FILES)})")
    return settings


def _load(path: Path, label: str) -> dict[str, torch.Tensor]:
    """All tensors of one file, on the CPU as stored; CheckpointError if the file is damaged or not a dict."""
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{label}: could not be read: {e}") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CheckpointError(
            f"{label}: expected a dict of tensor name -> tensor, found {type(tensors).__name__}"
        )
    return tensors


def _stored_form(layout: Layout, name: str) -> str | None:
    """A model's own tensor name as `layout`'s table spells it (nvidia: in-memory prefix -> folder)."""
    if layout is not NVIDIA:
        return name
    return next((folder + name[len(p) :] for p, folder in NVIDIA_IN_MEMORY if name.startswith(p)), None)


def _in_memory_form(layout: Layout, name: str) -> str:
    """The inverse of _stored_form, with the first in-memory prefix of each nvidia folder."""
    if layout is not NVIDIA:
        return name
    folder, _, rest = name.partition("/")
    return next(p for p, f in NVIDIA_IN_MEMORY if f == folder + "/") + rest


def _own_name(name: str, prefix: str) -> str:
    """The model's own name inside a stored name: without the wrapper prefix and PEFT's base_layer."""
    return name.removeprefix(prefix).replace(BASE_LAYER, ".")


def map_names(names: list[str]) -> tuple[dict[str, str], Layout, str]:
    """Stored tensor name (module.leaf) -> our tensor name, under the wrapper prefix and layout that explain
    the most names; names they do not explain are left out. Also returns that layout and prefix."""
    best: tuple[dict[str, str], Layout, str] = ({}, LAYOUTS["hub"], "")
    for prefix in WRAPPER_PREFIXES:
        for layout in LAYOUTS.values():
            forms = {n: _stored_form(layout, _own_name(n, prefix)) for n in names if n.startswith(prefix)}
            ours = our_names(layout, [f for f in forms.values() if f is not None])
            mapped = {n: ours[f] for n, f in forms.items() if f in ours}
            if len(mapped) > len(best[0]):
                best = (mapped, layout, prefix)
    return best


def _matches(patterns: str | tuple[str, ...], key: str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, key) is not None
    return any(key == p or key.endswith(f".{p}") for p in patterns)


def _saved_module(settings: LoraSettings, key: str) -> bool:
    """Whether `key` is (inside) a module of modules_to_save: PEFT never puts LoRA on those."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in settings.modules_to_save)


def targeted_modules(
    settings: LoraSettings, keys: dict[str, str], linears: set[str]
) -> tuple[dict[str, str], list[str]]:
    """Our modules the config targets (our name -> name in the adapter's layout), and the problems found.

    `keys` maps each of our parameter-holding modules to its name in the adapter's layout.
    """
    targets, problems = settings.target_modules, []
    chosen = {m: k for m, k in keys.items() if _matches(targets, k)}
    entries = {targets: targets} if isinstance(targets, str) else {t: (t,) for t in targets}
    for entry, pattern in entries.items():
        if not any(_matches(pattern, k) for k in keys.values()):
            problems.append(f"target {entry!r} names no module of the model")
    excluded = settings.exclude_modules
    chosen = {
        m: k
        for m, k in chosen.items()
        if not (excluded and _matches(excluded, k)) and not _saved_module(settings, k)
    }
    problems += [
        f"target {k} is not a linear layer (LoRA applies to linear layers)"
        for m, k in chosen.items()
        if m not in linears
    ]
    return {m: k for m, k in chosen.items() if m in linears}, problems


# Kinds of problem, in the order an error lists them: the config's first, as they explain the rest.
PROBLEMS = {
    "target": "target_modules problems",
    "unknown": "tensors that name no module of the model",
    "unsupported": "tensors of unsupported LoRA variants (only lora_A.weight and lora_B.weight are read)",
    "unexpected": "unexpected tensors",
    "missing": "targeted modules without their LoRA pair",
    "shape": "tensors with the wrong shape or dtype",
}


def read_adapter(
    folder: str | Path, linears: dict[str, tuple[int, int]], params: dict[str, torch.Size]
) -> Adapter:
    """The LoRA pairs and replacement tensors of the adapter in `folder`, under our names.

    linears: our name -> (out_features, in_features) of every linear layer of the model; params: our name ->
    shape of every parameter. Everything is checked first; one CheckpointError lists every problem.
    """
    folder = Path(folder)
    settings = check_adapter_folder(folder)
    weights = next(folder / f for f in WEIGHT_FILES if (folder / f).is_file())
    stored = _load(weights, f"{folder.name}/{weights.name}")
    problems: dict[str, list[str]] = {kind: [] for kind in PROBLEMS}

    # name in the file -> (its module, "A" | "B"); a LoRA tensor is looked up as its module's weight
    halves = {
        n: (n.removesuffix("." + leaf), kind)
        for n in stored
        for leaf, kind in LORA_LEAVES.items()
        if n.endswith("." + leaf)
    }
    problems["unsupported"] = sorted(n for n in stored if n not in halves and "lora_" in n)
    full = [n for n in stored if n not in halves and n not in problems["unsupported"]]
    mapped, layout, prefix = map_names([f"{module}.weight" for module, _ in halves.values()] + full)

    # Our modules under the names PEFT matched targets against: the adapter's layout, in memory.
    modules = sorted({name.rpartition(".")[0] for name in params})
    stored_names = checkpoint_names(layout, [f"{m}.weight" for m in modules])
    keys = {m: _in_memory_form(layout, stored_names[f"{m}.weight"].rpartition(".")[0]) for m in modules}
    targets, problems["target"] = targeted_modules(settings, keys, set(linears))
    lora = _pairs(settings, stored, halves, mapped, targets, linears, problems)

    replacements: dict[str, torch.Tensor] = {}
    for name in full:
        ours, key = mapped.get(name), _own_name(name, prefix).rpartition(".")[0]
        trained_bias = name.endswith(".bias") and settings.bias != "none"
        if ours is not None and not (_saved_module(settings, key) or trained_bias):
            problems["unexpected"].append(f"{name}: a full tensor outside modules_to_save")
        _replacement(name, ours, stored[name], params, replacements, problems)
    if (folder / NON_LORA_FILE).is_file():
        extra = _load(folder / NON_LORA_FILE, f"{folder.name}/{NON_LORA_FILE}")
        extra_mapped, _, _ = map_names(list(extra))
        for name, tensor in extra.items():
            _replacement(name, extra_mapped.get(name), tensor, params, replacements, problems)

    found = [listing(items, PROBLEMS[kind]) for kind, items in problems.items() if items]
    if found:
        raise CheckpointError(f"{folder} ({layout.name} names) does not fit the model:\n" + "\n".join(found))
    return Adapter(settings=settings, lora=lora, replacements=replacements)


def _pairs(
    settings: LoraSettings,
    stored: dict[str, torch.Tensor],
    halves: dict[str, tuple[str, str]],
    mapped: dict[str, str],
    targets: dict[str, str],
    linears: dict[str, tuple[int, int]],
    problems: dict[str, list[str]],
) -> dict[str, LoRAPair]:
    """Our module -> its LoRA pair, for every target whose two tensors are present and of the right shape."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, (module, kind) in halves.items():
        ours = mapped.get(f"{module}.weight", "").removesuffix(".weight")
        if not ours:
            problems["unknown"].append(name)
        elif ours not in targets:
            problems["unexpected"].append(f"{name}: LoRA on {ours}, not a target")
        else:
            found.setdefault(ours, {})[kind] = stored[name]
    pairs = {}
    for module, key in targets.items():
        pair = found.get(module, {})
        if len(pair) < 2:
            absent = " and ".join(f"lora_{k}" for k in "AB" if k not in pair)
            problems["missing"].append(f"{key} (our {module}): {absent}")
            continue
        r, scaling = settings.rank_and_scaling(key)
        out_features, in_features = linears[module]
        for kind, want in (("A", (r, in_features)), ("B", (out_features, r))):
            if tuple(pair[kind].shape) != want or not pair[kind].is_floating_point():
                problems["shape"].append(
                    f"{key}.lora_{kind}.weight: expected {want} floating point (r={r}), "
                    f"found {tuple(pair[kind].shape)} {pair[kind].dtype}"
                )
        pairs[module] = LoRAPair(pair["A"], pair["B"], scaling)
    return pairs


def _replacement(
    name: str,
    ours: str | None,
    tensor: torch.Tensor,
    params: dict[str, torch.Size],
    replacements: dict[str, torch.Tensor],
    problems: dict[str, list[str]],
) -> None:
    """Check one full tensor against the parameter it replaces and record it, or record why it cannot."""
    if ours is None or ours not in params:
        problems["unknown"].append(name)
    elif tuple(tensor.shape) != tuple(params[ours]) or not tensor.is_floating_point():
        problems["shape"].append(
            f"{name} (our {ours}): expected {tuple(params[ours])} floating point, "
            f"found {tuple(tensor.shape)} {tensor.dtype}"
        )
    elif ours in replacements:
        problems["unexpected"].append(f"{name}: a second tensor for {ours}")
    else:
        replacements[ours] = tensor
