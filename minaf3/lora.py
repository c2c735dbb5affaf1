"""LoRA adapters on the model's linear layers: AF-Think's reasoning adapter, or any PEFT LoRA folder.

    load_adapter(model, path, merge=True)   read and check `path` (weights/adapter.py), copy its replacement
                                            tensors into the model, then put a LoRA update on every target
    merge(model)                            fold every LoRA update into its weight: W += scaling * B @ A
    unmerge(model)                          take the adapter out again: the base model, as it was loaded

Merged (the default), a target's weight holds W + scaling * B @ A and the forward pass costs what the base
model's does. Unmerged, the layer computes base(x) + scaling * (x @ A^T) @ B^T on every call: slower, but the
base weights stay untouched. Either way the layer is a LoRALinear that keeps A and B (r * (in + out) values
per target), so `unmerge` can restore the base weights. The old values of the tensors the adapter replaces
outright (non_lora_trainables.bin, modules_to_save, trained biases) are kept on the CPU for `unmerge` as well:
switching reasoning off gives back the model's own projector and norms, not the adapter's.

An adapter is applied to the model's current weights: load it before quantizing them.
"""

import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .weights.adapter import Adapter, LoraSettings, read_adapter

# model -> {parameter name: its value before the adapter replaced it}, on the CPU. Kept beside the model
# rather than in it so that its state_dict stays the base model's; a model without an adapter has no entry.
_REPLACED: "weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


class LoRALinear(nn.Linear):
    """A linear layer with a LoRA update: y = x W^T + b + scaling * (x A^T) B^T.

    It shares `weight` and `bias` with the layer it wraps, so the model's state_dict keeps its names; A and
    B are non-persistent buffers. `merged` says whether W already holds the update.
    """

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scaling: float):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.register_buffer("lora_A", A.to(**like), persistent=False)  # (r, in_features)
        self.register_buffer("lora_B", B.to(**like), persistent=False)  # (out_features, r)
        self.scaling = scaling
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        # Two thin products, (.., in) -> (.., r) -> (.., out), rather than materialising B @ A.
        return y + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def delta(self) -> torch.Tensor:
        """scaling * B @ A, (out_features, in_features), in float32 or the weight's dtype if wider."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    @torch.no_grad()
    def _fold(self, sign: int) -> None:
        # Computed wide and rounded once: adding a bf16 product to a bf16 weight would round twice.
        delta = self.delta()
        self.weight.copy_((self.weight.to(delta.dtype) + sign * delta).to(self.weight.dtype))

    def merge(self) -> None:
        if not self.merged:
            self._fold(+1)
            self.merged = True

    def unmerge(self) -> None:
        """Subtract the update again. In float32 this restores W up to float32 rounding; in bf16 or fp16 the
        merged weight was rounded to W + delta's precision, so W comes back within that rounding step, not
        bit for bit (an adapter loaded with merge=False never touches W)."""
        if self.merged:
            self._fold(-1)
            self.merged = False

    def plain(self) -> nn.Linear:
        """An nn.Linear holding this layer's weight and bias (without the update when unmerged)."""
        with torch.device("meta"):  # no memory for weights that are replaced at once
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        r = self.lora_A.shape[0]
        return f"{super().extra_repr()}, r={r}, scaling={self.scaling:g}, merged={self.merged}"


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


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
    linears = {
        n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    params = {name: p.shape for name, p in model.named_parameters()}
    adapter: Adapter = read_adapter(path, linears, params)
    _REPLACED[model] = {
        name: model.get_parameter(name).detach().to("cpu", copy=True) for name in adapter.replacements
    }
    for name, tensor in adapter.replacements.items():
        model.get_parameter(name).copy_(tensor)
    # Replacements first: a target's base weight may itself be replaced (PEFT loads those before the LoRA).
    for name, pair in adapter.lora.items():
        layer = LoRALinear(model.get_submodule(name), pair.A, pair.B, pair.scaling)
        _replace(model, name, layer)
        if merge:
            layer.merge()
    return adapter.settings


def merge(model: nn.Module) -> int:
    """Fold every unmerged LoRA update of `model` into its weight; returns the number of LoRA layers."""
    layers = _lora_layers(model)
    for layer in layers.values():
        layer.merge()
    return len(layers)


@torch.no_grad()
def unmerge(model: nn.Module) -> int:
    """Take the adapter out of `model`: subtract every LoRA update, put plain nn.Linear layers back and
    restore the tensors it replaced. Returns the number of LoRA layers removed."""
    layers = _lora_layers(model)
    for name, layer in layers.items():
        layer.unmerge()
        _replace(model, name, layer.plain())
    for name, tensor in _REPLACED.pop(model, {}).items():
        model.get_parameter(name).copy_(tensor)
    return len(layers)
