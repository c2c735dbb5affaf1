"""Weight-only quantization of the language model's linear layers and lm_head: int8 and int4.

    quantize_model(model, mode)        swaps every Linear under model.language_model (qkv_proj, o_proj,
                                       gate_up_proj, down_proj) and model.lm_head for an Int8Linear or an
                                       Int4Linear, in place: quantized from a loaded model's weights, or empty
                                       on a model built on the meta device, for load_state_dict to fill
    quantize_state_dict(tensors, names, mode)  the same for a checkpoint's tensors before loading: each
                                       weight `name.weight` becomes quantized `name.weight` and `name.scales`
    quantize_weight(w)                 int8: -> (w_int8 (N, K) int8, scales (N,) float32)
    quantize_weight_int4(w)            int4: -> (packed (N, Kp / 2) uint8, scales (N, Kp / 32) bfloat16)
    Int8Linear                         weight int8 (out, in), scales float32 (out,), bias (out,) or None
    Int4Linear                         weight uint8 (out, Kp / 2), scales bfloat16 (out, Kp / 32), bias
    quantized_bytes(out, in, mode)     the bytes of one quantized weight and its scales

int4 (kernels/int4_linear.py holds the layout and why): symmetric, a bf16 scale per group of 32 input
columns, two 4-bit values per byte, W = scales * (q - 8); the scale maps each group's largest-magnitude
weight to -8, and rows are padded with zero weights to a multiple of 128 columns. Its error and its speed
against int8 and fp32: tools/bench_int4.py. Both formats split a fused layer's rows exactly as the
checkpoint's separate layers quantized one by one: every scale belongs to one output row (int4's tiles of
rows, when each part but the last is a whole number of them: check_tiled_parts).

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
from .kernels.int4_linear import (
    GROUP_SIZE,
    TILE_ROWS,
    ZERO_POINT,
    int4_product_sum,
    pack_int4,
    pack_scales,
    padded_width,
    run_int4_linear,
)
from .kernels.int8_linear import run_int8_linear
from .kernels.registry import available
from .linear import fused_groups, product_sum
from .lora import LoRALayer, LoRALinear, LoRAUpdate
from .weights.buffers import release_file_pages, streamed_empty

QUANTIZE_MODES = ("int8", "int4")
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
        if x.requires_grad and torch.is_grad_enabled():  # fine-tuning over frozen int8 weights
            y = Int8Product.apply(x, self.weight, self.scales)
            return y if self.bias is None else y + self.bias
        if torch.compiler.is_compiling() and x.numel() == x.shape[-1] and not available().gemv:
            # A compiled one-row step without the C++ kernel: a multiply-and-sum inductor streams.
            return product_sum(x, self.weight, self.scales, self.bias)
        return run_int8_linear(x, self.weight, self.scales, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class Int8Product(torch.autograd.Function):
    """x @ (weight * scales[:, None]).T with a backward pass to x alone: the int8 weight is frozen, and its
    widened rows exist only a chunk at a time, in the backward pass (never a float copy of the layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, scales)
        # A copy: the kernel may return a view, which autograd forbids updating in place (LoRA adds its rows)
        return run_int8_linear(x, weight, scales, None).clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, scales = ctx.saved_tensors
        rows = max(1, QUANT_CHUNK_BYTES // (4 * weight.shape[1]))
        grad_x = None
        for start in range(0, weight.shape[0], rows):  # grad_x = grad @ W, summed over chunks of W's rows
            chunk = slice(start, start + rows)
            part = weight[chunk].to(grad.dtype) * scales[chunk, None].to(grad.dtype)
            term = grad[..., chunk] @ part
            grad_x = term if grad_x is None else grad_x + term
        return grad_x, None, None


class LoRAInt8Linear(Int8Linear, LoRALayer):
    """An Int8Linear with LoRA updates on ranges of its output rows, for fine-tuning over int8 weights
    (QLoRA's idea at int8): y = x (W * scales)^T + b + sum of the updates. It shares the wrapped layer's
    buffers and bias; the updates stay unmerged (an int8 weight cannot hold them)."""

    def __init__(self, base: Int8Linear, updates: list[LoRAUpdate]):
        nn.Module.__init__(self)  # not Int8Linear.__init__: it would allocate a second weight
        self.in_features, self.out_features, self.backend = base.in_features, base.out_features, base.backend
        self.register_buffer("weight", base.weight)
        self.register_buffer("scales", base.scales)
        self.register_parameter("bias", base.bias)
        self.updates = nn.ModuleList(updates)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        for update in self.updates:
            y[..., update.rows] += update(x)
        return y

    def merge(self) -> None:
        raise ConfigError("an int8 layer cannot hold LoRA updates merged: load the adapter before quantizing")

    def unmerge(self) -> None:
        pass  # never merged

    def plain(self) -> Int8Linear:
        """An Int8Linear holding this layer's buffers and bias, without the updates."""
        layer = Int8Linear(self.in_features, self.out_features, bias=False, device="meta")
        layer.weight, layer.scales, layer.backend = self.weight, self.scales, self.backend
        layer.register_parameter("bias", self.bias)
        return layer


class Int4Linear(nn.Module):
    """y = x @ W.T + bias with W an int4 weight (kernels/int4_linear.py's layout): a drop-in for nn.Linear.

    weight (out_features, Kp / 2) uint8 and scales (out_features, Kp / group_size) bfloat16 are buffers,
    Kp = in_features rounded up to a multiple of 128; bias keeps the original layer's dtype. Moving the
    layer (.to, .float()) never re-types the buffers: the kernels read this format only. `backend`
    overrides kernels/int4_linear.py's choice for this layer (None: the default choice).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, GROUP_SIZE
        Kp = padded_width(in_features)
        self.register_buffer(
            "weight", torch.full((out_features, Kp // 2), 0x88, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "scales", torch.zeros(out_features, Kp // GROUP_SIZE, dtype=torch.bfloat16, device=device)
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self.backend: str | None = None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, name: str = "linear") -> "Int4Linear":
        """Quantize `linear`'s weight (see quantize_weight_int4); the bias is shared, not copied."""
        out = cls(linear.in_features, linear.out_features, bias=False, device="meta")  # allocates nothing
        out.weight, out.scales = quantize_weight_int4(linear.weight, name)
        out.register_parameter("bias", linear.bias)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in x.dtype."""
        if torch.compiler.is_compiling() and x.numel() == x.shape[-1] and not available().int4:
            # A compiled one-row step without the C++ kernel: unpack, multiply and sum, one inductor loop.
            return int4_product_sum(x, self.weight, self.scales, self.bias)
        return run_int4_linear(x, self.weight, self.scales, self.bias, backend=self.backend)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.bfloat16:  # a dtype cast (model.float()): the format stays bf16
            self.scales = self.scales.to(torch.bfloat16)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}"
        )


QUANTIZED_LAYERS = (Int8Linear, Int4Linear)


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


@torch.no_grad()
def quantize_weight_int4(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) float -> (packed (N, Kp / 2) uint8, scales (N, Kp / GROUP_SIZE) bfloat16) on weight's
    device, in kernels/int4_linear.py's layout.

    Each group's scale is its largest-magnitude weight divided by -8, rounded to bf16; each weight then
    rounds to the nearest of the 16 levels of that (rounded) scale, the extreme to -8 exactly. An all-zero
    group gets scale 0 (its values are 8: zero weights), as do the padding columns. Converted in row chunks
    of QUANT_CHUNK_BYTES of float32, so the transient is a chunk. Raises CheckpointError naming `name` and
    the first bad rows if the weight holds NaN or Inf.
    """
    N, K = weight.shape
    Kp, G = padded_width(K), GROUP_SIZE
    packed = streamed_empty((N, Kp // 2), torch.uint8, weight.device)
    scales = streamed_empty((N, Kp // G), torch.bfloat16, weight.device)  # read beside the weights
    rows = max(1, QUANT_CHUNK_BYTES // (4 * Kp) // TILE_ROWS) * TILE_ROWS  # whole tiles of the layout
    for n0 in range(0, N, rows):
        # (rows, Kp), a copy even for float32 input: the in-place ops below must not touch the weight.
        chunk = torch.nn.functional.pad(weight[n0 : n0 + rows].to(torch.float32), (0, Kp - K))
        finite = torch.isfinite(chunk).all(1)
        if not finite.all():
            bad = (n0 + (~finite).nonzero().flatten()[:5]).tolist()
            raise CheckpointError(f"{name}: weight holds NaN or Inf (rows {bad}...); cannot quantize it")
        groups = chunk.view(chunk.shape[0], Kp // G, G)
        extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))  # (rows, Kp / G, 1), signed
        scale = (extreme / -ZERO_POINT).to(torch.bfloat16)
        step = scale.float()
        q = groups.div_(torch.where(step == 0, 1.0, step)).round_().add_(ZERO_POINT).clamp_(0, 15)
        packed[n0 : n0 + rows] = pack_int4(q.view(-1, Kp))
        scales[n0 : n0 + rows] = pack_scales(scale.squeeze(-1))
    return packed, scales


def quantized_bytes(out_features: int, in_features: int, mode: str) -> int:
    """Bytes of one weight (out_features, in_features) quantized in `mode`, its scales included."""
    if mode == "int4":
        Kp = padded_width(in_features)
        return out_features * (Kp // 2 + Kp // GROUP_SIZE * 2)  # two values per byte + a bf16 scale per group
    return out_features * (in_features + 4)  # int8 values + a float32 scale per row


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the layers quantize_model replaces: nn.Linear under language_model, and lm_head."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (name.startswith("language_model.") or name == "lm_head")
    ]


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Replace the language model's linear layers and lm_head by Int8Linear ("int8") or Int4Linear ("int4"),
    in place; returns `model`.

    Layers already quantized are left as they are, so calling twice is harmless. Raises ConfigError for an
    unknown mode, a model without such layers, layers already quantized in the other mode, or an unmerged LoRA
    adapter (merge it first: the quantized weight must hold the update).
    """
    check_mode(mode)
    names = quantizable_linears(model)
    done = {type(m) for m in model.modules() if isinstance(m, QUANTIZED_LAYERS)}
    if done - {LAYERS[mode]}:
        raise ConfigError(
            f"{type(model).__name__} is already quantized ({done.pop().__name__}); quantize={mode!r} needs "
            "the full-precision weights: load it again"
        )
    if not names and not done:
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
    quantize_layers(model, names, mode)
    return model


def check_mode(mode: str | None) -> None:
    """Raise ConfigError unless `mode` is None or one of QUANTIZE_MODES."""
    if mode is not None and mode not in QUANTIZE_MODES:
        raise ConfigError(f"quantize={mode!r}: expected None or one of {list(QUANTIZE_MODES)}")


def quantize_layers(model: nn.Module, names: list[str], mode: str = "int8") -> None:
    """Replace the Linear layers `names` of `model` by quantized layers of `mode`, in place (quantize_model's
    loop; also tools/bench.py's, which quantizes one part of a model at a time to see where the error comes
    from). On the meta device the quantized layer is empty, shaped for load_state_dict(..., assign=True)."""
    layer_class = LAYERS[mode]
    if mode == "int4":
        check_tiled_parts(model, names)
    # By name, one at a time: holding the modules in a list would keep every fp32 weight alive to the end.
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if layer.weight.is_meta:
            bias = layer.bias is not None
            dtype = layer.bias.dtype if bias else None
            quantized = layer_class(layer.in_features, layer.out_features, bias, device="meta", dtype=dtype)
        else:
            quantized = layer_class.from_linear(layer, name)
        setattr(parent, child, quantized)


def check_tiled_parts(model: nn.Module, names: list[str]) -> None:
    """Raise ConfigError unless every fused layer among `names` can hold int4 parts: its parts are joined and
    split as rows (minaf3/linear.py), and int4 stores rows in tiles of TILE_ROWS, so each part but the last
    must be a whole number of tiles."""
    groups = fused_groups(model)
    for name in names:
        parts = list(groups.get(name, {}).items())
        for part, rows in parts[:-1]:
            if rows % TILE_ROWS:
                raise ConfigError(
                    f"{name}: int4 stores rows in tiles of {TILE_ROWS}, so each fused part but the last "
                    f"needs a multiple of {TILE_ROWS} rows; {part} has {rows}"
                )


@torch.no_grad()
def quantize_state_dict(tensors: dict[str, torch.Tensor], names: list[str], mode: str = "int8") -> None:
    """Quantize the weights `<name>.weight` of a checkpoint's tensors just read, in place: each becomes the
    quantized `<name>.weight` and `<name>.scales` of `mode` (quantize_weight, quantize_weight_int4), its
    full-precision tensor released as soon as it is done (a view of the mapped file: its pages too,
    release_file_pages)."""
    quantize = quantize_weight_int4 if mode == "int4" else quantize_weight
    for name in names:
        weight = tensors.pop(f"{name}.weight")
        tensors[f"{name}.weight"], tensors[f"{name}.scales"] = quantize(weight, name)
        release_file_pages(weight)
        del weight


@torch.no_grad()
def widen_unquantized_(model: nn.Module, dtype: torch.dtype) -> None:
    """Convert every floating-point parameter of `model` to `dtype` in place, one tensor at a time (so the
    transient memory is one tensor); the quantized layers' weights and scales are buffers, untouched.
    A parameter shared by several modules (tied weights) stays shared."""
    widened: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                if id(param) not in widened:
                    widened[id(param)] = nn.Parameter(param.to(dtype), requires_grad=param.requires_grad)
                setattr(module, name, widened[id(param)])


LAYERS = {"int8": Int8Linear, "int4": Int4Linear}  # the layer each mode swaps in
