"""Attention layers of the Infinity transformer (plain SDPA: runs on CPU and any GPU).

- SelfAttention: cosine attention (q, k L2-normalised, q scaled per head by a learned
  temperature, SDPA scale 1) with 2-D RoPE; optional preallocated KV cache for sampling.
- CrossAttention: image tokens attend to their own prompt's text rows (key padding mask).
- TextPool: attention pooling of the text into one vector (learned query).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lowrank import Linear
from .kv_cache import KVCache
from .rope import rotate, rotor

MAX_SCALE_MUL = float(torch.log(torch.tensor(100.0)))  # clamp of the cosine-attention temperature


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


def _bf16_round(*tensors):
    # The official code runs cross-attention through flash-attn, which has no fp32 kernel: its
    # inputs are rounded to bf16 even in fp32 runs. Reproduced only when asked (golden parity).
    return [t.to(torch.bfloat16).to(t.dtype) for t in tensors]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.mat_qkv = Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        self.proj = Linear(dim, dim)

    def forward(self, x, rope, attn_mask=None, kv_cache: KVCache | None = None):
        batch, length, dim = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = self.mat_qkv(x, bias).view(batch, length, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(2)                                        # (B, L, H, hd) views
        # Worked on token-major (B, L, H, hd): the attention output comes back in that layout, so
        # the heads merge without a copy. Cosine attention: q, k of unit length, q times its
        # head's temperature (one multiply); RoPE keeps lengths, so it comes after.
        temperature = self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp().to(q.dtype).view(1, 1, -1, 1)
        q = q * (temperature / _length(q))
        k = k / _length(k)
        turn = rotor(rope).unsqueeze(-2)                              # (L, 1, hd/2): every head
        q = rotate(q, turn).transpose(1, 2)                            # (B, H, L, hd) views
        if kv_cache is None:
            k, v = rotate(k, turn).transpose(1, 2), v.transpose(1, 2)
        else:                                                          # sampling: append this scale
            k_slot, v_slot = kv_cache.reserve(length)
            if k_slot.dtype == torch.float32:                          # rotated straight into the cache
                rotate(k, turn, out=k_slot.transpose(1, 2))
            else:
                k_slot.copy_(rotate(k, turn).transpose(1, 2))
            v_slot.copy_(v.transpose(1, 2))
            k, v = kv_cache.readable()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)
        if kv_cache is not None:
            kv_cache.commit(length, q)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


def _length(x: torch.Tensor) -> torch.Tensor:
    """L2 length over the head dim, floored as F.normalize floors it."""
    return x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, kv_dim: int, heads: int, bf16_rounding: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.bf16_rounding = bf16_rounding
        self.mat_q = Linear(dim, dim)
        self.mat_kv = Linear(kv_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = Linear(dim, dim)

    def project_kv(self, text: torch.Tensor, text_mask: torch.Tensor):
        """K, V (B, H, T, hd) and the key padding mask (B, 1, 1, T); once per image."""
        batch, length, _ = text.shape
        kv = self.mat_kv(text, torch.cat((self.zero_k_bias, self.v_bias)))
        k, v = kv.view(batch, length, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v, text_mask[:, None, None, :]

    def attend(self, q, k, v, mask):
        if self.bf16_rounding and q.dtype == torch.float32:
            q, k, v = _bf16_round(q, k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1 / math.sqrt(self.head_dim))
            return _bf16_round(out)[0]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1 / math.sqrt(self.head_dim))

    def forward(self, x, k, v, mask):
        batch, length, dim = x.shape
        q = self.mat_q(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        out = self.attend(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class PoolAttention(CrossAttention):
    """Cross-attention whose single query is a learned vector (no q projection)."""

    def __init__(self, dim: int, kv_dim: int, heads: int, bf16_rounding: bool = False):
        super().__init__(dim, kv_dim, heads, bf16_rounding)
        del self.mat_q
        self.mat_q = nn.Parameter(torch.randn(1, heads, dim // heads) * math.sqrt(1 / dim / 3))

    def forward(self, text, text_mask):
        k, v, mask = self.project_kv(text, text_mask)
        q = self.mat_q.to(k.dtype).unsqueeze(2).expand(k.shape[0], -1, -1, -1)   # (B, H, 1, hd)
        out = self.attend(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(k.shape[0], -1))


class TextPool(nn.Module):
    """Pooled text vector: AdaLN condition of every block and the start token."""

    def __init__(self, dim: int, text_channels: int, heads: int, bf16_rounding: bool = False):
        super().__init__()
        self.ca = PoolAttention(dim, text_channels, heads, bf16_rounding)

    def forward(self, text, text_mask):
        return self.ca(text, text_mask)
