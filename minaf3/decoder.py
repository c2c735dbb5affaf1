"""The language model: a Qwen2 decoder (Qwen2.5-7B in AF3) with a static KV cache.

    inputs_embeds (B, T, D)   token embeddings, with audio embeddings already in the `<sound>` rows
      N x [ x + o_proj(attn(rope(q), rope(k), v))   on input_layernorm(x), grouped-query attention
            x + down_proj(silu(gate_proj(h)) * up_proj(h))   on h = post_attention_layernorm(x) ]
      norm                    -> hidden (B, T, D); the model applies lm_head

Position bookkeeping belongs to the caller (model.py, generate.py): `positions` are the RoPE positions of the
new tokens, `input_pos` the cache slots they are written to, and `key_mask` says which slots hold real tokens.
With left padding the two differ: a row padded by p tokens has RoPE position t - p in slot t.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import DecoderConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back before the weight, as Qwen2 does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """theta ** (-2i / head_dim) for i < head_dim / 2: the angular speed of each rotated pair."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions (B, T) -> cos, sin (B, 1, T, head_dim), computed in float32 then cast."""
    angles = positions[..., None].float() * inv_freq  # (B, T, head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)  # rotate-half layout: the two halves share angles
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (x1, x2) halves of the head dimension: x * cos + (-x2, x1) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    """Keys and values of every layer's past tokens, allocated once and written in place at `input_pos`."""

    def __init__(self, batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, T, D) at slots input_pos (T,); return the whole caches (B, Hkv, S, D)."""
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
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
        d, q_dim, kv_dim = (
            config.hidden_size,
            config.num_heads * config.head_dim,
            config.num_kv_heads * config.head_dim,
        )
        self.q_proj = nn.Linear(d, q_dim)
        self.k_proj = nn.Linear(d, kv_dim)
        self.v_proj = nn.Linear(d, kv_dim)
        self.o_proj = nn.Linear(q_dim, d, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, key_mask, input_pos):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, Dh)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is None:  # no cache: the keys are exactly these T tokens, in order
            query_pos = torch.arange(T, device=x.device)
        else:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, Hkv, S, Dh)
            query_pos = input_pos
        y = attention(q, k, v, key_mask=key_mask, query_pos=query_pos)  # (B, Hq, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, Hq, T, Dh) -> (B, T, Hq * Dh)


class MLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DecoderAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, key_mask, input_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Decoder(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self, device: torch.device) -> None:
        """Recompute the non-persistent RoPE table (after a meta-device build it holds no data)."""
        self.inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta, device)

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype, device) -> None:
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
        cos, sin = rope_cos_sin(positions, self.inv_freq, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, key_mask, input_pos)
        return self.norm(x)
