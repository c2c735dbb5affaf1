"""The audio encoder: Whisper's encoder, then average pooling over time and a LayerNorm.

    features (W, 128, F)  log-mel, one row per 30 s window (F = 3000 frames of 10 ms)
      conv1 (k3, p1) + GELU      -> (W, H, F)
      conv2 (k3, stride 2) + GELU -> (W, H, F/2)       20 ms per frame
      + embed_positions           learned, one row per frame
      32 pre-LN transformer layers, bidirectional, padded frames masked out as keys
      AvgPool1d(2, 2)             -> (W, F/4, H)       40 ms per frame: one audio token
      layer_norm

Only the first `pooled_frames(conv_frames(L))` outputs of a window with L real mel frames are audio tokens
(windows.py); the rest come from padding and are dropped by the model.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import EncoderConfig
from .dtypes import cpu_has_native_bf16
from .linear import Linear
from .windows import conv_frames


def sinusoids(length: int, channels: int, max_timescale: float = 10_000.0) -> torch.Tensor:
    """Whisper's positions (length, channels) float32: the sines, then the cosines, of position * r_i for
    C/2 rates r_i geometric from 1 down to 1 / max_timescale. The encoder's positions at init."""
    if channels % 2 or channels < 4:
        raise ValueError(f"sinusoidal positions need an even number of channels >= 4, got {channels}")
    inv_timescales = torch.exp(-math.log(max_timescale) / (channels // 2 - 1) * torch.arange(channels // 2))
    angles = torch.arange(length)[:, None] * inv_timescales[None, :]  # (length, C/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Conv1d(nn.Conv1d):
    """nn.Conv1d that, on a CPU without bf16 instructions, computes a bf16 layer in float32 and rounds back.

    There torch has no fast bf16 convolution and falls back to a plain loop, many times slower than the
    float32 convolution (the README's bf16 time to first token measures it).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and not cpu_has_native_bf16():
            bias = None if self.bias is None else self.bias.float()
            y = F.conv1d(x.float(), self.weight.float(), bias, self.stride, self.padding)
            return y.to(x.dtype)
        return super().forward(x)


class EncoderAttention(nn.Module):
    """Multi-head self-attention; as in Whisper, the key projection has no bias."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = Linear(hidden, hidden)
        self.k_proj = Linear(hidden, hidden, bias=False)
        self.v_proj = Linear(hidden, hidden)
        self.out_proj = Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.num_heads, -1).transpose(1, 2)  # (B, T, C) -> (B, H, T, C/H)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        y = attention(q, k, v, key_mask=key_mask)  # (B, H, T, C/H)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, H, T, C/H) -> (B, T, C)


class EncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + fc2(gelu(fc1(LN(x))))."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn_layer_norm = nn.LayerNorm(h, eps=eps)
        self.self_attn = EncoderAttention(h, config.num_heads)
        self.final_layer_norm = nn.LayerNorm(h, eps=eps)
        self.fc1 = Linear(h, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, h)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask)
        # GELU is the exact (erf) form, as in Whisper.
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    """Conv front end, learned positions, transformer stack, average pool and final LayerNorm."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        h = config.hidden_size
        self.conv1 = Conv1d(config.num_mel_bins, h, kernel_size=3, padding=1)
        self.conv2 = Conv1d(h, h, kernel_size=3, stride=2, padding=1)
        # Weights come from a checkpoint or init_weights: passing the storage skips nn.Embedding's random
        # init, which on the meta device costs about a second the first time (it imports torch._refs).
        # In training the positions stay Whisper's sinusoids (model.init_weights), as in Whisper.
        self.embed_positions = nn.Embedding(
            config.max_source_positions, h, _weight=torch.empty(config.max_source_positions, h)
        )
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.layer_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def forward(self, features: torch.Tensor, mel_lengths: torch.Tensor) -> torch.Tensor:
        """features (W, n_mels, F) and mel_lengths (W,) real frames per window -> (W, F // 4, H).

        F may be shorter than a full window (the model crops the padding it does not need); it must be even
        and at most 2 * max_source_positions.
        """
        x = F.gelu(self.conv1(features))  # (W, n_mels, F) -> (W, H, F)
        x = F.gelu(self.conv2(x))  # (W, H, F) -> (W, H, F/2)
        x = x.transpose(1, 2)  # (W, H, F/2) -> (W, F/2, H)
        T = x.shape[1]
        x = x + self.embed_positions.weight[:T]
        # A frame after conv2 holds real audio if it is one of the first conv_frames(L) of its window.
        conv_lengths = conv_frames(mel_lengths)  # (W,)
        key_mask = torch.arange(T, device=x.device)[None, :] < conv_lengths[:, None]  # (W, T)
        for layer in self.layers:
            x = layer(x, key_mask)
        x = F.avg_pool1d(x.transpose(1, 2), kernel_size=2, stride=2)  # (W, H, T) -> (W, H, T/2)
        return self.layer_norm(x.transpose(1, 2))  # (W, H, T/2) -> (W, T/2, H)
