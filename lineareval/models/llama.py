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

from lineareval.cache import KVCache
from lineareval.models.layers import DecoderLayer, RMSNorm, inverse_frequencies, rotary


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


class Rotary(nn.Module):
    """cos/sin for explicit positions; frequencies computed in fp32 on every call (never stored in bf16)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (S, T) -> cos, sin each (S, 1, T, D) in `dtype`."""
        return rotary(positions, inverse_frequencies(self.head_dim, self.theta, positions.device), dtype)


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
        self.layers = nn.ModuleList(
            DecoderLayer(config.hidden_size, config.intermediate_size, config.num_attention_heads, config.head_dim,
                         config.rms_norm_eps) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config.head_dim, config.rope_theta)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor,
                masks: list[torch.Tensor] | torch.Tensor | None = None) -> torch.Tensor:
        """Whole sequence. embeds (S, T, hidden), positions (S, T); masks per layer or shared. -> (S, T, hidden)."""
        (cos, sin), h = self.rotary(positions, embeds.dtype), embeds
        for index, layer in enumerate(self.layers):
            h = layer(h, cos, sin, masks[index] if isinstance(masks, list) else masks)
        return self.norm(h)

    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor, present: torch.Tensor | None,
                cache: KVCache) -> torch.Tensor:
        """Prefix into the cache. embeds (S, P, hidden), positions/present (S, P) -> last hidden (S, hidden)."""
        mask = None if present is None else prefix_mask(present)
        (cos, sin), h = self.rotary(positions, embeds.dtype), embeds
        for layer, layer_cache in zip(self.layers, cache.layers):
            h = layer(h, cos, sin, mask, layer_cache, present)
        return self.norm(h[:, -1])

    def step(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """k tokens per sequence into the cache's reserved slots. embeds (S, k, hidden), RoPE positions (S, k)
        -> hidden (S, k, hidden)."""
        (cos, sin), h = self.rotary(positions, embeds.dtype), embeds
        for layer, layer_cache in zip(self.layers, cache.layers):
            h = layer.step(h, cos, sin, layer_cache)
        return self.norm(h)

    def cache_spec(self) -> dict:
        weight = self.embed_tokens.weight
        return {"num_layers": self.config.num_hidden_layers, "heads": self.config.num_attention_heads,
                "head_dim": self.config.head_dim, "dtype": weight.dtype, "device": weight.device}
