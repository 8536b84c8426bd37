"""A Llama decoder on our cache (the language model of Janus-Pro).

Parameter names follow transformers' `LlamaModel` (`embed_tokens`, `layers.{i}.self_attn.{q,k,v,o}_proj`,
`layers.{i}.mlp.{gate,up,down}_proj`, `layers.{i}.{input,post_attention}_layernorm`, `norm`), so a
transformers checkpoint's `language_model.*` block loads one to one. RoPE is 1D with the
rotate-half convention; positions are passed per sequence, never derived from the cache length
(which stops being the position once the cache is compressed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lineareval.cache import KVCache, LayerKV


@dataclass
class LlamaConfig:
    """transformers' LlamaConfig field names (the subset that shapes the network)."""

    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    vocab_size: int = 102400
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    head_dim: int | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads not in (None, self.num_attention_heads):
            raise ValueError("grouped-query attention is not supported: our cache keeps one head per query head")
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, config: dict) -> LlamaConfig:
        rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        fields = {name: config[name] for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "num_attention_heads", "vocab_size", "rms_norm_eps")}
        return cls(**fields, num_key_value_heads=config.get("num_key_value_heads"), rope_theta=rope_theta,
                   head_dim=config.get("head_dim"))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Rotary(nn.Module):
    """cos/sin for explicit positions, computed in fp32 (as transformers does)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (S, T) -> cos, sin each (S, 1, T, D) float32."""
        inverse = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=positions.device).float() / self.head_dim))
        angles = positions.float()[..., None] * inverse  # (S, T, D/2)
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (S, H, T, D) in its dtype; rotation in fp32 as transformers' Llama (cos/sin cast to x's dtype)."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        inner = self.heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)

    def project(self, x, rotary) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(S, T, hidden) -> q, k, v each (S, H, T, D); q and k rotated."""
        batch, length, _ = x.shape
        shape = (batch, length, self.heads, self.head_dim)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return apply_rotary(q, *rotary), apply_rotary(k, *rotary), v

    def forward(self, x, rotary, mask: torch.Tensor | None, cache: LayerKV | None = None,
                present: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project(x, rotary)
        if cache is not None:
            cache.write_prefix(k, v, present)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).flatten(2))

    def step(self, x, rotary, cache: LayerKV, position: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x, rotary)
        cache.append(k, v, position)
        return self.o_proj(cache.attend(q).transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rotary, mask=None, cache=None, present=None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), rotary, mask, cache, present)
        return h + self.mlp(self.post_attention_layernorm(h))

    def step(self, x, rotary, cache: LayerKV, position: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn.step(self.input_layernorm(x), rotary, cache, position)
        return h + self.mlp(self.post_attention_layernorm(h))


def prefix_mask(present: torch.Tensor, heads: int = 1) -> torch.Tensor:
    """Causal mask that also hides padding keys. present (S, P) -> (S, 1, P, P), True = attend.

    A padding query attends to itself so its softmax is defined; its output is never used.
    """
    length = present.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=present.device))
    mask = causal & present[:, None, None, :]
    return mask | torch.eye(length, dtype=torch.bool, device=present.device)


class LlamaDecoder(nn.Module):
    """Embeddings in, final hidden states out; the caller owns input embeddings and output heads."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config.head_dim, config.rope_theta)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor,
                masks: list[torch.Tensor] | torch.Tensor | None = None) -> torch.Tensor:
        """Whole sequence. embeds (S, T, hidden), positions (S, T); masks per layer or shared. -> (S, T, hidden)."""
        rotary, h = self.rotary(positions), embeds
        for index, layer in enumerate(self.layers):
            h = layer(h, rotary, masks[index] if isinstance(masks, list) else masks)
        return self.norm(h)

    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor, present: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
        """Prefix into the cache. embeds (S, P, hidden), positions/present (S, P) -> last hidden (S, hidden)."""
        cache.begin_prefix()
        rotary, mask, h = self.rotary(positions), prefix_mask(present), embeds
        for layer, layer_cache in zip(self.layers, cache.layers):
            h = layer(h, rotary, mask, layer_cache, present)
        return self.norm(h[:, -1])

    def decode(self, embeds: torch.Tensor, positions: torch.Tensor, visual_index: int,
               cache: KVCache) -> torch.Tensor:
        """One token per sequence. embeds (S, hidden), positions (S,) RoPE positions -> hidden (S, hidden)."""
        slot_position = cache.begin_step(visual_index)
        rotary, h = self.rotary(positions[:, None]), embeds[:, None]
        for layer, layer_cache in zip(self.layers, cache.layers):
            h = layer.step(h, rotary, layer_cache, slot_position)
        cache.end_step()
        return self.norm(h[:, 0])

    def new_cache(self, policy, budget: int, sequences: int, layout) -> KVCache:
        weight = self.embed_tokens.weight
        return KVCache(policy, layout, budget, num_layers=self.config.num_hidden_layers, sequences=sequences,
                       heads=self.config.num_attention_heads, head_dim=self.config.head_dim, dtype=weight.dtype,
                       device=weight.device)
