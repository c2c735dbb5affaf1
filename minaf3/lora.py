"""LoRA adapters on the model's linear layers: AF-Think's reasoning adapter, or any PEFT LoRA folder.

    load_adapter(model, path, merge=True)   read and check `path` (weights/adapter.py), copy its replacement
                                            tensors into the model, then put a LoRA update on every target
    merge(model)                            fold every LoRA update into its weight: W += scaling * B @ A
    unmerge(model)                          take the adapter out again: the base model, as it was loaded

An adapter names its targets by the checkpoint's layers (q_proj, k_proj, ...). Where the model holds such a
layer fused with others (qkv_proj stacks q, k and v by rows; linear.fuse_rows), the update applies to that
part's rows of the fused layer. Merged (the default), a target's rows hold W + scaling * B @ A and the
forward pass costs what the base model's does. Unmerged, the layer adds scaling * (x @ A^T) @ B^T to those
rows of its output on every call: slower, but the base weights stay untouched. Either way the layer is a
LoRALinear that keeps A and B (r * (in + out) values per target), so `unmerge` can restore the base weights.
The old values of the tensors the adapter replaces outright (non_lora_trainables.bin, modules_to_save,
trained biases) are kept on the CPU for `unmerge` as well: switching reasoning off gives back the model's
own projector and norms, not the adapter's.

An adapter is applied to the model's current weights: load it before quantizing them.
"""

import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .linear import Linear, fused_groups, row_ranges
from .weights.adapter import Adapter, LoraSettings, read_adapter

# model -> {tensor name: its value before the adapter replaced it}, on the CPU. Kept beside the model rather
# than in it so that its state_dict stays the base model's; a model without an adapter has no entry.
_REPLACED: "weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


class LoRAUpdate(nn.Module):
    """scaling * B @ A for the rows `rows` of a layer's output: A (r, in_features), B (len(rows), r).

    `target` is the checkpoint's name of the layer it adapts (a fused layer's part: `...self_attn.k_proj`).
    """

    def __init__(
        self,
        target: str,
        rows: slice,
        A: torch.Tensor,
        B: torch.Tensor,
        scaling: float,
        like: torch.Tensor,
        trainable: bool = False,
    ):
        super().__init__()
        self.target, self.rows, self.scaling = target, rows, scaling
        if trainable:  # fine-tuning (finetune.py): float32 factors for the optimizer, whatever W's dtype
            self.lora_A = nn.Parameter(A.to(dtype=torch.float32, device=like.device))
            self.lora_B = nn.Parameter(B.to(dtype=torch.float32, device=like.device))
        else:  # a loaded adapter: factors in the layer's dtype
            self.register_buffer("lora_A", A.to(dtype=like.dtype, device=like.device), persistent=False)
            self.register_buffer("lora_B", B.to(dtype=like.dtype, device=like.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., len(rows)) in x's dtype: two thin products rather than materialising B @ A."""
        y = self.scaling * F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y.to(x.dtype)

    # A and B never enter the model's state_dict, which stays the base model's (checkpoint names, fused rows
    # split back into parts): an adapter is saved on its own (finetune.save_adapter).
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        pass

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        pass

    def delta(self, dtype: torch.dtype) -> torch.Tensor:
        """scaling * B @ A, (len(rows), in_features), in float32 or `dtype` if wider."""
        wide = torch.promote_types(dtype, torch.float32)
        return self.scaling * (self.lora_B.to(wide) @ self.lora_A.to(wide))

    def extra_repr(self) -> str:
        rows, r = f"{self.rows.start}:{self.rows.stop}", self.lora_A.shape[0]
        return f"{self.target.rpartition('.')[2]}, rows={rows}, r={r}, scaling={self.scaling:g}"


class LoRALayer:
    """A layer with LoRA updates (`updates`, a ModuleList of LoRAUpdate) on ranges of its output rows:
    LoRALinear here, quantize.LoRAInt8Linear for fine-tuning over int8 weights."""


class LoRALinear(Linear, LoRALayer):
    """A Linear with LoRA updates on ranges of its output rows: y = x W^T + b + sum of the updates.

    It shares `weight` and `bias` with the layer it wraps, so the model's state_dict keeps its names; the
    updates' A and B are non-persistent buffers. `merged` says whether W already holds the updates.
    """

    def __init__(self, base: nn.Linear, updates: list[LoRAUpdate]):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.updates = nn.ModuleList(updates)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if not self.merged:
            for update in self.updates:
                y[..., update.rows] += update(x)
        return y

    @torch.no_grad()
    def _fold(self, sign: int) -> None:
        for update in self.updates:
            rows = self.weight[update.rows]
            # Computed wide and rounded once: adding a bf16 product to a bf16 weight would round twice.
            delta = update.delta(rows.dtype)
            rows.copy_((rows.to(delta.dtype) + sign * delta).to(rows.dtype))

    def merge(self) -> None:
        if not self.merged:
            self._fold(+1)
            self.merged = True

    def unmerge(self) -> None:
        """Subtract the updates again. In float32 this restores W up to float32 rounding; in bf16 or fp16
        the merged weight was rounded to W + delta's precision, so W comes back within that rounding step,
        not bit for bit (an adapter loaded with merge=False never touches W)."""
        if self.merged:
            self._fold(-1)
            self.merged = False

    def plain(self) -> Linear:
        """A Linear holding this layer's weight and bias (without the updates when unmerged)."""
        with torch.device("meta"):  # no memory for weights that are replaced at once
            linear = Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, merged={self.merged}"


def _lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def lora_updates(model: nn.Module) -> dict[str, LoRAUpdate]:
    """{the checkpoint's name of an adapted layer: its update}, over the whole model."""
    return {update.target: update for layer in _lora_layers(model).values() for update in layer.updates}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def checkpoint_linears(
    model: nn.Module, kinds: tuple[type, ...] = (nn.Linear,)
) -> dict[str, tuple[str, slice, tuple[int, int]]]:
    """The model's linear layers (modules of `kinds`) under the checkpoint's names: name -> (the module
    holding it, its rows there, its (out_features, in_features)). A fused layer's parts each get their
    rows."""
    fused = fused_groups(model)
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        parts = fused.get(name, {name: module.out_features})
        for part, rows in row_ranges(parts).items():
            layers[part] = (name, rows, (rows.stop - rows.start, module.in_features))
    return layers


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | Path, merge: bool = True) -> LoraSettings:
    """Apply the LoRA adapter in the folder `path` (AF-Think: `<checkpoint>/think`) to `model`.

    Every file is read and checked against the model before anything changes; a CheckpointError lists
    what does not fit. Then the replacement tensors are copied in (the old values kept for `unmerge`), and
    each target layer becomes a LoRALinear, merged into its weight unless `merge=False`. Returns the
    adapter's settings (r, alpha, ...).
    """
    if model in _REPLACED or _lora_layers(model):
        raise ConfigError(
            "the model already holds an adapter; call minaf3.lora.unmerge(model) before loading another"
        )
    layers = checkpoint_linears(model)
    tensors = model.state_dict()  # the checkpoint's names; views of the model's own tensors
    params = {name: tensor.shape for name, tensor in tensors.items()}
    adapter: Adapter = read_adapter(path, {name: shape for name, (_, _, shape) in layers.items()}, params)
    _REPLACED[model] = {name: tensors[name].to("cpu", copy=True) for name in adapter.replacements}
    for name, tensor in adapter.replacements.items():
        tensors[name].copy_(tensor)
    # Replacements first: a target's base weight may itself be replaced (PEFT loads those before the LoRA).
    updates: dict[str, list[LoRAUpdate]] = {}
    for target, pair in adapter.lora.items():
        module, rows, _ = layers[target]
        like = model.get_submodule(module).weight
        updates.setdefault(module, []).append(LoRAUpdate(target, rows, pair.A, pair.B, pair.scaling, like))
    for module, its_updates in updates.items():
        layer = LoRALinear(model.get_submodule(module), its_updates)
        _replace(model, module, layer)
        if merge:
            layer.merge()
    return adapter.settings


def merge(model: nn.Module) -> int:
    """Fold every unmerged LoRA update of `model` into its weight; returns the number of LoRA layers (a
    fused layer with updates on several parts counts once)."""
    layers = _lora_layers(model)
    for layer in layers.values():
        layer.merge()
    return len(layers)


@torch.no_grad()
def unmerge(model: nn.Module) -> int:
    """Take the adapter out of `model`: subtract every LoRA update, put plain Linear layers back and
    restore the tensors it replaced. Returns the number of LoRA layers removed."""
    layers = _lora_layers(model)
    for name, layer in layers.items():
        layer.unmerge()
        _replace(model, name, layer.plain())
    replaced = _REPLACED.pop(model, {})
    if replaced:
        tensors = model.state_dict()
        for name, tensor in replaced.items():
            tensors[name].copy_(tensor)
    return len(layers)
