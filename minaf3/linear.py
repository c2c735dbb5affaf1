"""Linear layers that pick their own product, and layers fused by rows.

    Linear                      nn.Linear whose forward chooses the fastest product for the input (below)
    product_sum(x, w, ...)      x @ w.T as one multiply-and-sum, which inductor streams in a compiled step
    fuse_rows(module, name, parts)   module.<name> is the checkpoint's layers `parts` stacked by rows; its
                                     state_dict speaks the parts' names
    fused_groups(model)         every fused layer of a model: {fused prefix: {part prefix: rows}}
    join_parts(tensors, groups) the parts' tensors of a state dict concatenated into the fused ones

Where a Linear's product runs, on the CPU without autograd (the C++ kernels are kernels/*.cpp, and
kernels/registry.py says which of them run here):
  - a few rows (decoding), float32 or bf16 weights: the streaming matrix-vector kernel (int8_gemv.cpp),
    which reads the weights faster than BLAS's matrix-vector products;
  - in a torch.compile'd one-row step, a layer too small for the kernel's call to pay: a multiply-and-sum
    that inductor generates as one loop;
  - more rows (prefill, the audio encoder, the projector) on CPUs whose best vector unit is AVX2: the
    blocked matrix product of gemm.cpp; elsewhere oneDNN for large float32 layers, whose fixed cost per
    call is higher than MKL's but whose rate is higher on big ones;
  - anything else (CUDA, autograd, small layers): F.linear.
The README's benchmark tables, made by tools/bench.py and tools/bench_int8.py, measure these choices.

Fused layers: q/k/v read the same input, and so do gate/up. One product for each group is one pass over
the input and one call instead of three or two; the decoder holds them fused from the moment it is loaded.
The checkpoint, the adapters and any saved model keep the architecture's names (q_proj, k_proj, ...):
`fuse_rows` registers state_dict hooks that split and join the rows at that boundary.
"""

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import gemm, gemv
from .kernels.registry import available
from .weights.buffers import release_file_pages, streamed_empty

# Rows up to which a bf16 or float32 layer streams its weights through the matrix-vector kernel: beyond 8
# the kernel's per-row cost overtakes a blocked product.
STREAM_MAX_ROWS = 8
STREAM_DTYPES = (torch.bfloat16, torch.float32)
# Weights from which a compiled one-row step calls the kernel rather than inductor's loop: below this the
# call costs more than the faster stream saves (they break even near 1024 x 1024).
STREAM_KERNEL_MIN_WEIGHTS = 1 << 20
# gemm.cpp's operand dtypes: float32, and bf16 widened to float32 as it is packed.
GEMM_DTYPES = (torch.float32, torch.bfloat16)
# Weights from which oneDNN beats MKL: its fixed cost per call is higher, its rate on large layers too.
ONEDNN_MIN_WEIGHTS = 1 << 20
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def product_sum(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., 1, in) @ (weight (out, in) * scales (out,)).T + bias, as a multiply and a sum in float32.

    In a compiled step inductor fuses the two into one loop over the weight, with nothing materialised.
    """
    y = (x.unsqueeze(-2).float() * weight.float()).sum(-1)  # (..., 1, in) * (out, in) -> (..., out)
    if scales is not None:
        y = y * scales
    return (y if bias is None else y + bias).to(x.dtype)


class Linear(nn.Linear):
    """y = x W^T + b, computed on the fastest path for the input's device, dtype and rows (see above)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Eager decoding calls this for every layer of every token, and at small widths the Python here
        # costs as much as the product: the cheapest checks first, eager decoding's case first, and the
        # parameters read from their dictionary (`self.weight` goes through nn.Module's Python __getattr__,
        # half a microsecond a read).
        params = self._parameters
        weight, bias = params["weight"], params["bias"]
        if not x.is_cpu or torch.is_grad_enabled():
            return F.linear(x, weight, bias)
        rows = x.numel() // x.shape[-1]
        streams = weight.dtype in STREAM_DTYPES and available().gemv
        compiling = torch.compiler.is_compiling()
        if rows <= STREAM_MAX_ROWS and streams and not compiling:
            return gemv.gemv_linear(x, weight, bias)
        if compiling and rows == 1:
            if streams and weight.numel() >= STREAM_KERNEL_MIN_WEIGHTS:
                return gemv.gemv_linear(x, weight, bias)
            return product_sum(x, weight, None, bias)
        if rows <= STREAM_MAX_ROWS and streams:
            return gemv.gemv_linear(x, weight, bias)
        if available().gemm and x.dtype == weight.dtype and x.dtype in GEMM_DTYPES:
            return gemm.gemm_linear(x, weight, bias)
        if ONEDNN and weight.numel() >= ONEDNN_MIN_WEIGHTS and x.dtype == weight.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return F.linear(x, weight, bias)


# ---- layers fused by rows -----------------------------------------------------------------------------


def fuse_rows(module: nn.Module, name: str, parts: dict[str, int]) -> None:
    """Declare that `module.<name>` stacks the rows of the checkpoint's layers `parts` ({name: rows}).

    Its every tensor (weight, bias, an int8 layer's scales) is the parts' tensors concatenated along dim 0,
    in the order of `parts`. state_dict() splits them back into views named after the parts;
    load_state_dict() accepts either form.
    """
    groups = dict(getattr(module, "fused_parts", {}))
    groups[name] = dict(parts)
    module.fused_parts = groups
    if len(groups) == 1:  # the hooks serve every group of the module
        module.register_state_dict_post_hook(_split_hook)
        module.register_load_state_dict_pre_hook(_join_hook)


def _split_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for name, parts in module.fused_parts.items():
        split_fused(state_dict, prefix + name, {prefix + part: rows for part, rows in parts.items()})


def _join_hook(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for name, parts in module.fused_parts.items():
        join_fused(state_dict, prefix + name, {prefix + part: rows for part, rows in parts.items()})


def _leaves(state_dict: dict, prefix: str) -> list[str]:
    """The tensor names directly under module `prefix` (weight, bias, scales)."""
    return [key[len(prefix) + 1 :] for key in state_dict if key.startswith(prefix + ".")]


def split_fused(state_dict: dict, fused: str, parts: dict[str, int]) -> None:
    """Replace each tensor `fused.<leaf>` of `state_dict` by row views `<part>.<leaf>`, in place."""
    for leaf in _leaves(state_dict, fused):
        tensor = state_dict.pop(f"{fused}.{leaf}")
        for part, rows in zip(parts, tensor.split(list(parts.values())), strict=True):
            state_dict[f"{part}.{leaf}"] = rows


def join_fused(state_dict: dict, fused: str, parts: dict[str, int], from_file: bool = False) -> None:
    """Replace the parts' tensors `<part>.<leaf>` of `state_dict` by their concatenation `fused.<leaf>`.

    A weight is written into memory allocated for streaming (see streamed_empty); each part is popped as
    it is copied, so the transient memory is one group. Nothing happens when the parts are absent.
    from_file: the parts were just read from a checkpoint (views of its mapped file, never written), whose
    pages are then released from this process (release_file_pages).
    """
    first = next(iter(parts))
    for leaf in _leaves(state_dict, first):
        pieces = [state_dict.pop(f"{part}.{leaf}") for part in parts]
        rows = sum(piece.shape[0] for piece in pieces)
        out = streamed_empty((rows, *pieces[0].shape[1:]), pieces[0].dtype, pieces[0].device)
        state_dict[f"{fused}.{leaf}"] = torch.cat(pieces, out=out)
        if from_file:
            for piece in pieces:
                release_file_pages(piece)


def fused_groups(model: nn.Module) -> dict[str, dict[str, int]]:
    """{fused layer's name: {part's name: rows}} over the whole model, names from its root."""
    groups = {}
    for prefix, module in model.named_modules():
        for name, parts in getattr(module, "fused_parts", {}).items():
            at = f"{prefix}." if prefix else ""
            groups[at + name] = {at + part: rows for part, rows in parts.items()}
    return groups


def join_parts(tensors: dict[str, torch.Tensor], groups: dict[str, dict[str, int]]) -> None:
    """join_fused for every group, in place: a checkpoint's tensors just read (weights/loader.py), ready for
    the model's load_state_dict, the parts' file pages released.

    Done before load_state_dict rather than in its hook: that method copies the dict it is given, so the
    caller's references would keep every part alive until the whole model is loaded.
    """
    for fused, parts in groups.items():
        join_fused(tensors, fused, parts, from_file=True)


def row_ranges(parts: dict[str, int]) -> dict[str, slice]:
    """{part: its rows in the fused tensor}."""
    starts = itertools.accumulate(parts.values(), initial=0)
    return {
        part: slice(start, start + rows) for (part, rows), start in zip(parts.items(), starts, strict=False)
    }
