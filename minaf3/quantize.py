"""int8 weight-only quantization of the language model's linear layers and lm_head.

    quantize_model(model, "int8")      swaps every Linear under model.language_model (qkv_proj, o_proj,
                                       gate_up_proj, down_proj) and model.lm_head for an Int8Linear, in
                                       place: quantized from a loaded model's weights, or empty on a model
                                       built on the meta device, for load_state_dict to fill
    quantize_state_dict(tensors, names)  the same for a checkpoint's tensors before loading: each weight
                                       `name.weight` becomes int8 `name.weight` and float32 `name.scales`
    quantize_weight(w)                 -> (w_int8 (N, K) int8, scales (N,) float32)
    Int8Linear                         weight int8 (out, in), scales float32 (out,), bias (out,) or None

Symmetric, one scale per output row: scales[n] = max_k |w[n, k]| / 127 and w_int8 = round(w / scales[n]),
so every row uses the full [-127, 127] range and dequantizes as w_int8 * scales[n]. Activations stay in
the model's dtype; products accumulate in float32 (kernels/int8_linear.py). With one scale per row,
quantizing q, k and v apart and stacking their rows is exactly quantizing the fused qkv_proj.

Why the row's absmax and not an error-minimising (clipping) scale: for Gaussian rows of AF3's width the
absmax's weight error is within 2% of the optimal clip's, and clipping costs an extra pass over every
weight at load time. tools/bench.py reports the logits' error against float32 (the README's table, beside
transformers' own bf16 error on the same model), and tools/bench_int8.py --weight-error each layer's.

Why these layers: batch-1 decode reads every decoder weight and the lm_head once per token, so its time is
their bytes over the memory bandwidth; they are 7.1 of AF3's 8.3 billion parameters. The audio encoder and
projector run once per clip over many frames (compute-bound), and embed_tokens is only indexed.

Memory: weights are converted one at a time, in row chunks of QUANT_CHUNK_BYTES, and each full-precision
weight is released as soon as its int8 form replaces it: the transient is one chunk plus one weight's int8
copy. A weight still referenced elsewhere (a state_dict the caller keeps) stays alive, so drop such
references before calling.
"""

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .kernels.int8_linear import run_int8_linear
from .kernels.registry import available
from .linear import product_sum
from .lora import LoRALinear
from .weights.buffers import release_file_pages, streamed_empty

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in x.dtype."""
        if torch.compiler.is_compiling() and x.numel() == x.shape[-1] and not available().gemv:
            # A compiled one-row step without the C++ kernel: a multiply-and-sum inductor streams.
            return product_sum(x, self.weight, self.scales, self.bias)
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
    check_mode(mode)
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
    return model


def check_mode(mode: str | None) -> None:
    """Raise ConfigError unless `mode` is None or one of QUANTIZE_MODES."""
    if mode is not None and mode not in QUANTIZE_MODES:
        raise ConfigError(f"quantize={mode!r}: expected None or one of {list(QUANTIZE_MODES)}")


def quantize_layers(model: nn.Module, names: list[str]) -> None:
    """Replace the Linear layers `names` of `model` by Int8Linear, in place (quantize_model's loop; also
    tools/bench.py's, which quantizes one part of a model at a time to see where the error comes from).
    On the meta device the Int8Linear is empty, shaped for load_state_dict(..., assign=True)."""
    # By name, one at a time: holding the modules in a list would keep every fp32 weight alive to the end.
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if layer.weight.is_meta:
            bias = layer.bias is not None
            dtype = layer.bias.dtype if bias else None
            quantized = Int8Linear(layer.in_features, layer.out_features, bias, device="meta", dtype=dtype)
        else:
            quantized = Int8Linear.from_linear(layer, name)
        setattr(parent, child, quantized)


@torch.no_grad()
def quantize_state_dict(tensors: dict[str, torch.Tensor], names: list[str]) -> None:
    """Quantize the weights `<name>.weight` of a checkpoint's tensors just read, in place: each becomes int8
    `<name>.weight` and float32 `<name>.scales` (quantize_weight), its full-precision tensor released as
    soon as it is done (a view of the mapped file: its pages too, release_file_pages)."""
    for name in names:
        weight = tensors.pop(f"{name}.weight")
        tensors[f"{name}.weight"], tensors[f"{name}.scales"] = quantize_weight(weight, name)
        release_file_pages(weight)
        del weight


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
