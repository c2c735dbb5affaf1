"""int8 weight-only quantization of the language model's linear layers and lm_head.

    quantize_model(model, "int8")  replaces, in place, every nn.Linear under model.language_model
                                   (q/k/v/o_proj, gate/up/down_proj) and model.lm_head by an
                                   Int8Linear, then fuses q/k/v and gate/up; returns the model
    quantize_layers(model, names)  the same for the named layers only
    quantize_weight(w)             -> (w_int8 (N, K) int8, scales (N,) float32)
    Int8Linear                     weight int8 (out, in), scales float32 (out,), bias (out,) or None

Symmetric, one scale per output row: scales[n] = max_k |w[n, k]| / 127 and w_int8 = round(w / scales[n]),
so every row uses the full [-127, 127] range and dequantizes as w_int8 * scales[n]. Activations stay in
the model's dtype; products accumulate in float32 (kernels/int8_linear.py).

Why the row's absmax and not an MSE-optimal (clipping) scale: measured on tools/bench.py's official-width
model (2 layers + lm_head, N(0, 0.02) weights, its 16-token prompt), relative L2 against fp32 of
                                                            weights   last-position logits   all 16 positions
    absmax (this module)                                     0.87%          4.6%                  3.6%
    Gaussian noise of that variance instead of rounding      0.87%          4.3%                  3.7%
    least-squares refit of each row's scale (3 rounds)       0.87%          4.5%                  3.6%
    per-row MSE-optimal clip (0.90-1.00 x absmax, 0.005)     0.86%          4.2%                  3.6%
    per-group absmax over 128 columns (not per channel)      0.65%          3.2%                  2.7%
The int8 model on the C++ kernel gives exactly the absmax row (the kernel adds no error of its own). This
random model amplifies the weight error 4-5x (noise of the same size does the same), and for Gaussian rows
of 3584 the absmax's weight error is within 2% of the MSE-optimal one: 8 bits per row cannot reach issue
5's 2% here (that needs ~0.4% weight error, about 9 bits), and clipping buys ~1% of the error for an extra
pass over every weight at load time. The last-position figure moves by +-0.3 points with the rounding
pattern alone (compare the noise row), so the all-position column is the one that ranks the variants.
Where the 4.6% comes from (tools/bench.py prints it): with only the lm_head int8 the last-position logits
are off by 0.86% (its weight error), with only decoder layer 0 by 4.3%, with only layer 1 by 1.2%: the
same ~0.87% weight error reaches the logits 5x larger from the first layer, 1.4x from the second.
For scale, on the same model and prompt transformers' own bf16 run (weights rounded to 8 significant
bits, activations in bf16) is already 1.96% from its fp32 logits.
Weight errors per layer: tools/bench_int8.py --weight-error.

Why these layers: batch-1 decode reads every decoder weight and the lm_head once per token, so its time is
their bytes over the memory bandwidth; they are 7.1 of AF3's 8.3 billion parameters. The audio encoder and
projector run once per clip over many frames (compute-bound), and embed_tokens is only indexed.

Memory: layers are converted one at a time, in row chunks of QUANT_CHUNK_BYTES, and each full-precision
weight is released as soon as its Int8Linear replaces it. The transient is one chunk plus one layer's int8
copy, never a second copy of the decoder; afterwards the quantized weights take 1/4 of their fp32 bytes
(plus 4 bytes of scale per row). A weight still referenced elsewhere (a state_dict the caller keeps) stays
alive, so drop such references before calling.
"""

import itertools

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .kernels.int8_linear import run_int8_linear
from .linear import streamed_empty
from .lora import LoRALinear

QUANTIZE_MODES = ("int8",)
INT8_MAX = 127  # symmetric range [-127, 127]: -128 is left unused so that w -> -w stays representable
# fp32 bytes of one conversion chunk: 64 MiB bounds the transient of the 2.2 GB fp32 lm_head (151672 x 3584)
# at 4681 rows, while staying large enough that the per-chunk overhead is negligible.
QUANT_CHUNK_BYTES = 64 * 2**20


class Int8Linear(nn.Module):
    """y = x @ (weight * scales[:, None]).T + bias with an int8 weight: a drop-in for nn.Linear.

    weight (out_features, in_features) int8 and scales (out_features,) float32 are buffers, so they move
    with .to(device) and appear in the state_dict; bias keeps the original layer's dtype.
    `backend` overrides kernels/int8_linear.py's choice for this layer (None: the default choice).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self.backend: str | None = None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, name: str = "linear") -> "Int8Linear":
        """Quantize `linear`'s weight (see quantize_weight); the bias is shared, not copied."""
        out = cls(linear.in_features, linear.out_features, bias=False, device="meta")  # allocates nothing
        out.weight, out.scales = quantize_weight(linear.weight, name)
        out.register_parameter("bias", linear.bias)
        return out

    @classmethod
    @torch.no_grad()
    def stack(cls, layers: list["Int8Linear"]) -> "Int8Linear":
        """One Int8Linear computing the concatenation of `layers`' outputs (decoder.py's qkv_proj and
        gate_up_proj): with one scale per output row, stacking the rows is exact."""
        has_bias = [layer.bias is not None for layer in layers]
        out = cls(
            layers[0].in_features, sum(layer.out_features for layer in layers), bias=False, device="meta"
        )
        weight = streamed_empty((out.out_features, out.in_features), torch.int8, layers[0].weight.device)
        out.weight = torch.cat([layer.weight for layer in layers], out=weight)  # (sum out_i, in)
        out.scales = torch.cat([layer.scales for layer in layers])
        if any(has_bias):  # a layer without a bias contributes zeros
            bias = [b.bias if b.bias is not None else b.scales.new_zeros(b.out_features) for b in layers]
            out.bias = nn.Parameter(torch.cat([b.to(bias[0].dtype) for b in bias]), requires_grad=False)
        else:
            out.register_parameter("bias", None)
        out.backend = layers[0].backend
        return out

    @torch.no_grad()
    def split(self, sizes: list[int], biases: list[bool]) -> list["Int8Linear"]:
        """Undo `stack`: the row blocks of this layer (sizes[i] rows each) as separate layers."""
        parts = []
        for rows, has_bias, start in zip(sizes, biases, [0, *itertools.accumulate(sizes)], strict=False):
            part = type(self)(self.in_features, rows, bias=False, device="meta")
            part.weight = self.weight[start : start + rows].clone()
            part.scales = self.scales[start : start + rows].clone()
            if has_bias:
                part.bias = nn.Parameter(self.bias[start : start + rows].clone(), requires_grad=False)
            else:
                part.register_parameter("bias", None)
            part.backend = self.backend
            parts.append(part)
        return parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in x.dtype."""
        return run_int8_linear(x, self.weight, self.scales, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) float -> (w_int8 (N, K) int8, scales (N,) float32) on weight's device.

    An all-zero row gets scale 1 (its int8 values are 0 either way). Raises CheckpointError naming `name`
    and the first bad rows if the weight holds NaN or Inf: such a row has no meaningful scale.
    """
    N, K = weight.shape
    w_int8 = streamed_empty((N, K), torch.int8, weight.device)
    scales = torch.empty(N, dtype=torch.float32, device=weight.device)
    rows = max(1, QUANT_CHUNK_BYTES // (4 * K))
    for n0 in range(0, N, rows):
        # (rows, K), a copy even for float32 input: the in-place ops below must not touch the weight.
        chunk = weight[n0 : n0 + rows].to(torch.float32, copy=True)
        amax = chunk.abs().amax(dim=1)  # (rows,)
        if not torch.isfinite(amax).all():
            bad = (n0 + (~torch.isfinite(amax)).nonzero().flatten()[:5]).tolist()
            raise CheckpointError(f"{name}: weight holds NaN or Inf (rows {bad}...); cannot quantize it")
        scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
        w_int8[n0 : n0 + rows] = chunk.div_(scale[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX)
        scales[n0 : n0 + rows] = scale
    return w_int8, scales


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the layers quantize_model replaces: nn.Linear under language_model, and lm_head."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (name.startswith("language_model.") or name == "lm_head")
    ]


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Replace the language model's linear layers and lm_head by Int8Linear, in place; returns `model`.

    Layers already quantized are left as they are, so calling twice is harmless. Raises ConfigError for an
    unknown mode, a model without such layers, or an unmerged LoRA adapter (merge it first: the int8 weight
    must hold the update).
    """
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"quantize={mode!r}: expected one of {list(QUANTIZE_MODES)}")
    names = quantizable_linears(model)
    if not names and not any(isinstance(m, Int8Linear) for m in model.modules()):
        raise ConfigError(
            f"{type(model).__name__}: no linear layers under language_model and no lm_head to quantize"
        )
    unmerged = [n for n in names if isinstance(model.get_submodule(n), LoRALinear)]
    unmerged = [n for n in unmerged if not model.get_submodule(n).merged]
    if unmerged:
        raise ConfigError(
            f"{unmerged[0]} (and {len(unmerged) - 1} more) holds an unmerged LoRA update; "
            "call minaf3.lora.merge(model) before quantizing"
        )
    quantize_layers(model, names)
    if hasattr(model, "fuse_projections"):
        # q/k/v and gate/up as one int8 product each (issue 5); stacked after quantizing, so the transient
        # memory is one group's int8 rows, and the numbers are those of the separate layers.
        model.fuse_projections()
    return model


@torch.no_grad()
def widen_unquantized_(model: nn.Module, dtype: torch.dtype) -> None:
    """Convert every floating-point parameter of `model` to `dtype` in place, one tensor at a time (so the
    transient memory is one tensor); Int8Linear's int8 weights and float32 scales are buffers, untouched.
    A parameter shared by several modules (tied weights) stays shared."""
    widened: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                if id(param) not in widened:
                    widened[id(param)] = nn.Parameter(param.to(dtype), requires_grad=param.requires_grad)
                setattr(module, name, widened[id(param)])


def quantize_layers(model: nn.Module, names: list[str]) -> None:
    """Replace the nn.Linear layers `names` of `model` by Int8Linear, in place (quantize_model's loop; also
    tools/bench.py's, which quantizes one part of a model at a time to see where the error comes from)."""
    # By name, one at a time: holding the modules in a list would keep every fp32 weight alive to the end.
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(getattr(parent, child), name))
