"""The language model: a Qwen2 decoder (Qwen2.5-7B in AF3) with a static KV cache.

    inputs_embeds (B, T, D)   token embeddings, with audio embeddings already in the `<sound>` rows
      N x [ q, k, v = qkv_proj(input_layernorm(x));             x = x + o_proj(attention(rope(q), rope(k), v))
            gate, up = gate_up_proj(post_attention_layernorm(x));  x = x + down_proj(silu(gate) * up) ]
      norm                    -> hidden (B, T, D); the model applies lm_head

q/k/v and gate/up are each one layer whose rows stack the checkpoint's separate projections
(linear.fuse_rows): one product instead of three, resp. two. state_dict() speaks the checkpoint's names.

Position bookkeeping belongs to the caller (model.py, generate.py): `positions` are the RoPE positions of the
new tokens, `input_pos` the cache slots they are written to, and `key_mask` says which slots hold real tokens.
With left padding the two differ: a row padded by p tokens has RoPE position t - p in slot t. What every layer
shares (RoPE cos/sin, the attention mask, the attention backend) is computed once per forward pass
(`StepInputs`), not once per layer.

Where the element-wise steps run: the torch code below is their definition, and runs for autograd, inside
torch.compile (inductor fuses it into its own loops) and on devices without kernels. On CUDA RMSNorm and RoPE
run as Triton kernels (`on_triton`). On the CPU outside autograd and torch.compile (`cpu_fused`: eager
inference, the CPU default for generation) RMSNorm, RoPE with the cache write, and SiLU-and-multiply each run
as one C++ operator (kernels/decode_ops.cpp): at batch 1 a torch op's dispatch costs more than its
arithmetic, and these steps were about forty ops per layer.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention, attention_mask, default_backend, plain_causal
from .config import DecoderConfig
from .kernels import decode_ops
from .kernels.registry import available
from .linear import Linear, fuse_rows

# dtypes decode_ops.cpp computes in
FUSED_DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class StepInputs:
    """What every layer needs besides the hidden states, built once per forward pass.

    cos, sin (B, 1, T, head_dim); key_mask (B, S) bool or None; query_pos (T,) cache slot of each query;
    input_pos (T,) slots to write, None without a cache; mask: attention_mask(...) for the sdpa and eager
    backends (None for triton and cpp, whose kernels read key_mask and query_pos, and for a plain causal
    prompt); backend: the attention backend; causal: attention.plain_causal(key_mask, query_pos) holds.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    key_mask: torch.Tensor | None
    query_pos: torch.Tensor
    input_pos: torch.Tensor | None
    mask: torch.Tensor | None
    backend: str
    causal: bool


def on_triton(x: torch.Tensor) -> bool:
    """Whether element-wise work on x runs as Triton kernels: on CUDA, where fusing saves memory passes."""
    return x.is_cuda and available().triton


def cpu_fused(x: torch.Tensor) -> bool:
    """Whether element-wise work on x runs as decode_ops.cpp's operators: on the CPU, outside autograd (whose
    backward needs the torch ops) and torch.compile (which fuses the torch ops itself)."""
    return (
        x.is_cpu
        and not torch.is_grad_enabled()
        and x.dtype in FUSED_DTYPES
        and available().decode_ops
        and not torch.compiler.is_compiling()
    )


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back before the weight, as Qwen2 does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_fused(x):
            return decode_ops.rms_norm(x, self.weight, self.eps)
        if on_triton(x):
            from .kernels.rmsnorm_rope import rms_norm

            return rms_norm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """theta ** (-2i / head_dim) for i < head_dim / 2: the angular speed of each rotated pair."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) -> cos, sin (B, 1, T, head_dim), computed in float32 then cast."""
    angles = positions[..., None].float() * inv_freq  # (B, T, head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)  # rotate-half layout: the two halves share angles
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (x1, x2) halves of the head dimension: x * cos + (-x2, x1) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rope to q (B, Hq, T, D) and k (B, Hkv, T, D); one Triton kernel for both on CUDA."""
    if on_triton(q):
        from .kernels.rmsnorm_rope import apply_rotary

        return apply_rotary(q, k, cos[:, 0], sin[:, 0])  # cos (B, 1, T, D) -> (B, T, D)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


class KVCache(nn.Module):
    """Keys and values of every layer's past tokens, allocated once and written in place at `input_pos`."""

    def __init__(self, batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at slots input_pos (T,); return the whole caches (B, Hkv, S, D)."""
        # Indexed assignment rather than index_copy_: torch.compile turns it into an in-place write, where
        # index_copy_ made it copy the whole cache of every layer at every step.
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


class DecoderAttention(nn.Module):
    """Grouped-query attention with RoPE; q, k and v projections have a bias, o_proj has none."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        d, q_size, kv_size = (
            config.hidden_size,
            config.num_heads * config.head_dim,
            config.num_kv_heads * config.head_dim,
        )
        self.sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = Linear(d, sum(self.sizes))  # q, k, v stacked by rows
        self.o_proj = Linear(q_size, d, bias=False)
        fuse_rows(self, "qkv_proj", {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size})
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, step: StepInputs) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv_proj(x)  # (B, T, (Hq + 2 * Hkv) * Dh)
        if step.input_pos is not None and cpu_fused(qkv):  # the else branch's steps as one operator
            cache = self.kv_cache
            q = decode_ops.rope_cache(
                qkv, step.cos, step.sin, cache.k_cache, cache.v_cache, step.input_pos, self.num_heads
            )  # (B, Hq, T, Dh)
            k, v = cache.k_cache, cache.v_cache  # (B, Hkv, S, Dh)
        else:
            q, k, v = qkv.split(self.sizes, dim=-1)
            q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, T, Hq*Dh) -> (B, Hq, T, Dh)
            k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # -> (B, Hkv, T, Dh)
            v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # -> (B, Hkv, T, Dh)
            q, k = rotate(q, k, step.cos, step.sin)
            if step.input_pos is not None:
                k, v = self.kv_cache.update(step.input_pos, k, v)  # (B, Hkv, S, Dh)
        y = attention(
            q, k, v, step.key_mask, step.query_pos, step.backend, step.mask, step.causal
        )  # (B, Hq, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, Hq, T, Dh) -> (B, T, Hq * Dh)


class MLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_up_proj = Linear(d, 2 * i, bias=False)  # gate and up stacked by rows
        self.down_proj = Linear(i, d, bias=False)
        fuse_rows(self, "gate_up_proj", {"gate_proj": i, "up_proj": i})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (..., 2 * I): gate, then up
        if cpu_fused(gate_up):
            return self.down_proj(decode_ops.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)  # (..., 2 * I) -> 2 x (..., I)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DecoderAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, step: StepInputs) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), step)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Decoder(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        # No random init here: from_pretrained assigns the checkpoint's tensors (a model to train calls
        # init_weights), and nn.Embedding's init on the meta device costs a second the first time (it
        # imports torch._refs).
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # On the CPU even inside a meta-device build: arange on meta costs a second (it imports torch._refs).
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, torch.device("cpu"))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self, device: torch.device) -> None:
        """Recompute the non-persistent RoPE table on `device` (the loader assigns checkpoint tensors)."""
        self.inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta, device)

    def setup_cache(
        self, batch_size: int, max_seq_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        """Allocate each layer's static KV cache: k and v of (batch_size, Hkv, max_seq_len, head_dim)."""
        c = self.config
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(
                batch_size, c.num_kv_heads, max_seq_len, c.head_dim, dtype, device
            )

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    @property
    def cache_shape(self) -> tuple[int, ...] | None:
        cache = self.layers[0].self_attn.kv_cache if len(self.layers) else None
        return None if cache is None else tuple(cache.k_cache.shape)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        key_mask: torch.Tensor | None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """inputs_embeds (B, T, D), positions (B, T), key_mask (B, S), input_pos (T,) or None -> (B, T, D).

        Without `input_pos` no cache is used and S = T. With it, the new keys are written to those slots of
        the cache set up by `setup_cache` and attention spans all S cache slots.
        """
        T = inputs_embeds.shape[1]
        backend = default_backend(inputs_embeds.device, T)
        cos, sin = rope_cos_sin(positions, self.inv_freq, inputs_embeds.dtype)
        # no cache: the keys are exactly these T tokens, in order
        query_pos = torch.arange(T, device=inputs_embeds.device) if input_pos is None else input_pos
        # A prompt from slot 0 without padding is plain causal attention, which sdpa runs without a mask.
        causal = backend == "sdpa" and T > 1 and not torch.compiler.is_compiling()
        causal = causal and plain_causal(key_mask, query_pos)
        mask = None  # triton and cpp read key_mask and query_pos, and only the slots up to the query's own
        if backend == "eager" or (backend == "sdpa" and not causal):
            mask = attention_mask(key_mask, query_pos, T if input_pos is None else self.cache_shape[2])
        step = StepInputs(cos, sin, key_mask, query_pos, input_pos, mask, backend, causal)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, step)
        return self.norm(x)
