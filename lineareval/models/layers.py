"""Llama-family building blocks shared by our Janus-Pro (Llama) and Lumina-mGPT (Chameleon) ports.

Names follow transformers' modules (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`,
`{input,post_attention}_layernorm`, Chameleon's `self_attn.{q,k}_norm`), so Hugging Face checkpoints
load one to one. RoPE uses the rotate-half layout of those checkpoints with explicit positions;
keys enter the cache after q/k norm and RoPE, exactly as attention uses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lineareval.cache import LayerKV
from lineareval.models.packed import Linear

QK_NORM_EPS = 1e-5  # fixed in Chameleon's q/k LayerNorm, independent of rms_norm_eps


@dataclass
class TextPrefix:
    """The token prefix of S sequences, left-padded to a common length P: ids, RoPE positions and the mask of
    real tokens, each (S, P) (`present` None: no padding)."""

    ids: torch.Tensor
    positions: torch.Tensor
    present: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.ids.shape[0]


class RMSNorm(nn.Module):
    """Normalise in fp32, cast back, then scale (LlamaGen, Llama and Chameleon agree on this order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def inverse_frequencies(head_dim: int, theta: float, device: torch.device | None = None,
                        linear_factor: float = 1.0) -> torch.Tensor:
    """(head_dim / 2,) fp32 RoPE frequencies (divided by a linear scaling factor if any)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exponents) / linear_factor


def rotary(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (S, 1, T, D) for position_ids (S, T): angles in fp32, then cast to the activations' dtype
    (as transformers does, so bf16 runs match it)."""
    angles = position_ids[..., None].float() * inv_freq.float()  # (S, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # rotate-half layout: both halves share angles
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the halves (x1, x2) of the last dim: x * cos + (-x2, x1) * sin. x: (S, H, T, D)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class QKNorm(nn.Module):
    """Chameleon's q/k LayerNorm: statistics over head_dim only, then each head's own gain and bias."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H, D)
        return F.layer_norm(x, x.shape[-1:], eps=QK_NORM_EPS) * self.weight + self.bias


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=bias)
        self.up_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Multi-head attention writing into our cache; optional per-head q/k norm (Chameleon)."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool = False, qk_norm: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.q_proj = Linear(dim, inner, bias=bias)
        self.k_proj = Linear(dim, inner, bias=bias)
        self.v_proj = Linear(dim, inner, bias=bias)
        self.o_proj = Linear(inner, dim, bias=bias)
        if qk_norm:
            self.q_norm = QKNorm(heads, head_dim)
            self.k_norm = QKNorm(heads, head_dim)
        self.qk_norm = qk_norm

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(S, T, dim) -> q, k, v each (S, H, T, D); q and k normed per head (if enabled), then rotated."""
        batch, length, _ = x.shape
        shape = (batch, length, self.heads, self.head_dim)
        q, k = self.q_proj(x).view(shape), self.k_proj(x).view(shape)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        return apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin), v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        return self.o_proj(out.transpose(1, 2).flatten(2))  # (S, H, T, D) -> (S, T, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: LayerKV | None = None, present: torch.Tensor | None = None) -> torch.Tensor:
        """Whole-sequence attention (causal, or `mask` (S, H|1, T, T) True = attend); fills `cache` if given."""
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            cache.write_prefix(k, v, present)
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None))

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerKV) -> torch.Tensor:
        """k new tokens per sequence against the cache, into the slots it reserved. x: (S, k, dim)."""
        q, k, v = self.project(x, cos, sin)
        cache.append(k, v)
        return self.merge(cache.attend(q))


class DecoderLayer(nn.Module):
    """Pre-norm Llama block, or with `swin_norm` the norms applied to each branch's output instead."""

    def __init__(self, dim: int, hidden: int, heads: int, head_dim: int, eps: float, *, bias: bool = False,
                 mlp_bias: bool = False, qk_norm: bool = False, swin_norm: bool = False):
        super().__init__()
        self.swin_norm = swin_norm
        self.self_attn = Attention(dim, heads, head_dim, bias, qk_norm)
        self.mlp = MLP(dim, hidden, mlp_bias)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)

    def _residuals(self, x: torch.Tensor, attend) -> torch.Tensor:
        if self.swin_norm:
            h = x + self.input_layernorm(attend(x))
            return h + self.post_attention_layernorm(self.mlp(h))
        h = x + attend(self.input_layernorm(x))
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: LayerKV | None = None, present: torch.Tensor | None = None) -> torch.Tensor:
        return self._residuals(x, lambda h: self.self_attn(h, cos, sin, mask, cache, present))

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerKV) -> torch.Tensor:
        return self._residuals(x, lambda h: self.self_attn.step(h, cos, sin, cache))
