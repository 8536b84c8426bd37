"""LlamaGen class-conditional GPT (Sun et al. 2024, https://arxiv.org/abs/2406.06525), on our cache.

Parameter names and numerics follow the official `autoregressive/models/gpt.py`, so official
checkpoints load one to one: Llama blocks (RMSNorm in fp32, SwiGLU, no biases), a fused `wqkv`, and
2D RoPE where half the rotary pairs encode the row and half the column. The class token's rotation
table is all zeros (its q and k vanish; its value still counts), exactly as in the official model.

Sizes (layers / heads / dim): B 12/12/768, L 24/16/1024, XL 36/20/1280, XXL 48/24/1536, 3B 24/32/3200.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lineareval.cache import KVCache, LayerKV, TokenLayout
from lineareval.models.layers import RMSNorm
from lineareval.models.packed import Linear

SIZES = {"B": (12, 12, 768), "L": (24, 16, 1024), "XL": (36, 20, 1280), "XXL": (48, 24, 1536), "3B": (24, 32, 3200)}


@dataclass
class LlamaGenConfig:
    """Field names are the official `ModelArgs` names, so any official checkpoint maps one to one."""

    dim: int = 1280
    n_layer: int = 36
    n_head: int = 20
    n_kv_head: int | None = None
    vocab_size: int = 16384
    num_classes: int = 1000
    cls_token_num: int = 1
    image_size: int = 384
    downsample_size: int = 16
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None

    def __post_init__(self) -> None:
        if self.n_kv_head not in (None, self.n_head):
            raise ValueError("grouped-query attention is not used by any LlamaGen checkpoint and is not supported")
        if self.cls_token_num != 1:
            raise ValueError("class-conditional LlamaGen uses exactly one class token (cls_token_num=1)")
        if self.dim % self.n_head or self.image_size % self.downsample_size:
            raise ValueError(f"dim {self.dim} must divide by n_head {self.n_head} and image_size "
                             f"{self.image_size} by downsample_size {self.downsample_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample_size

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return -(-hidden // self.multiple_of) * self.multiple_of

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(prefix_len=self.cls_token_num, rows=self.grid, line_len=self.grid)


def rope_table_2d(grid: int, head_dim: int, base: float, prefix_len: int) -> torch.Tensor:
    """(prefix_len + grid**2, head_dim // 2, 2) cos/sin table; zero rows for the prefix."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles = torch.outer(torch.arange(grid).float(), freqs)  # (grid, head_dim // 4)
    grid_angles = torch.cat([angles[:, None].expand(-1, grid, -1), angles[None].expand(grid, -1, -1)], dim=-1)
    table = torch.stack([grid_angles.cos(), grid_angles.sin()], dim=-1).flatten(0, 1)  # (grid**2, half, 2)
    return torch.cat([torch.zeros(prefix_len, half, 2), table])


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs in fp32. x: (S, T, H, D); table: (S or 1, T, D/2, 2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[:, :, None, :, 0], table[:, :, None, :, 1]
    rotated = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1)
    return rotated.flatten(3).type_as(x)


class FeedForward(nn.Module):
    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.w1 = Linear(config.dim, config.ffn_hidden, bias=False)
        self.w3 = Linear(config.dim, config.ffn_hidden, bias=False)
        self.w2 = Linear(config.ffn_hidden, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.wqkv = Linear(config.dim, 3 * config.dim, bias=False)
        self.wo = Linear(config.dim, config.dim, bias=False)

    def project(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(S, T, dim), rope (S or 1, T, D/2, 2) -> q, k, v each (S, H, T, D), q and k rotated."""
        batch, length, _ = x.shape
        q, k, v = self.wqkv(x).view(batch, length, 3, self.n_head, self.head_dim).unbind(2)
        return apply_rope(q, rope).transpose(1, 2), apply_rope(k, rope).transpose(1, 2), v.transpose(1, 2)

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        return self.wo(out.transpose(1, 2).flatten(2))  # (S, H, T, D) -> (S, T, dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None = None,
                cache: LayerKV | None = None) -> torch.Tensor:
        """Whole-sequence attention (causal, or `mask` (S, H, T, T) True = attend); fills `cache` if given."""
        q, k, v = self.project(x, rope)
        if cache is not None:
            cache.write_prefix(k, v)
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None))

    def step(self, x: torch.Tensor, rope: torch.Tensor, cache: LayerKV) -> torch.Tensor:
        """k new tokens per sequence against the cache, into the slots it reserved. x: (S, k, dim)."""
        q, k, v = self.project(x, rope)
        cache.append(k, v)
        return self.merge(cache.attend(q))


class Block(nn.Module):
    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None = None,
                cache: LayerKV | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))

    def step(self, x: torch.Tensor, rope: torch.Tensor, cache: LayerKV) -> torch.Tensor:
        h = x + self.attention.step(self.attention_norm(x), rope, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """`num_classes + 1` rows: the last is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)


class LlamaGen(nn.Module):
    """Class-conditional LlamaGen GPT. Sequence: [class token, visual tokens 0..N-1]."""

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.config = config
        self.layout = config.layout
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer("rope", self._rope_table(), persistent=False)

    def _rope_table(self, device: torch.device | None = None) -> torch.Tensor:
        config = self.config
        return rope_table_2d(config.grid, config.head_dim, config.rope_base, config.cls_token_num).to(device)

    def reset_rope(self) -> None:
        """Recompute the rotation table in fp32 on its current device (it is never stored in a checkpoint)."""
        self.rope = self._rope_table(self.rope.device)

    def _apply(self, fn, recurse=True):
        # keep the table in fp32 under .to(bfloat16), as the official model does
        super()._apply(fn, recurse)
        self.reset_rope()
        return self

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def cache_spec(self) -> dict:
        weight = self.tok_embeddings.weight
        return {"num_layers": self.config.n_layer, "heads": self.config.n_head, "head_dim": self.config.head_dim,
                "dtype": weight.dtype, "device": weight.device}

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h)).float()

    def forward(self, labels: torch.Tensor, tokens: torch.Tensor,
                masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Teacher-forced logits for every position. labels (S,), tokens (S, T) -> (S, 1 + T, V).

        `masks[i]` (S, H, 1+T, 1+T), True = attend, replaces the causal mask in layer i (oracle tests).
        """
        h = torch.cat([self.cls_embedding.embedding_table(labels)[:, None], self.tok_embeddings(tokens)], dim=1)
        rope = self.rope[None, : h.shape[1]]
        for index, layer in enumerate(self.layers):
            h = layer(h, rope, None if masks is None else masks[index])
        return self._logits(h)

    def prefill(self, labels: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run the class token, store its keys/values; logits for visual token 0. (S,) -> (S, V)."""
        h = self.cls_embedding.embedding_table(labels)[:, None]  # (S, 1, dim)
        rope = self.rope[None, : self.layout.prefix_len]
        for layer, layer_cache in zip(self.layers, cache.layers):
            h = layer(h, rope, cache=layer_cache)
        return self._logits(h[:, -1])

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed visual tokens (S, k) at sequence positions (S, k) (the class token is position 0); logits
        (S, k, V). Static shapes for k = 1: the decode step the decoder compiles."""
        rope = self.rope.index_select(0, positions.reshape(-1)).view(*positions.shape, *self.rope.shape[1:])
        h = self.tok_embeddings(tokens)  # (S, k, dim)
        for layer, layer_cache in zip(self.layers, cache.layers):
            h = layer.step(h, rope, layer_cache)
        return self._logits(h)


def build_llamagen(size: str | None = None, **fields) -> LlamaGen:
    """A LlamaGen GPT from a named size (B, L, XL, XXL, 3B) and/or explicit official fields."""
    if size is not None:
        if size not in SIZES:
            raise ValueError(f"unknown LlamaGen size {size!r}; known: {sorted(SIZES)}")
        n_layer, n_head, dim = SIZES[size]
        fields = {"n_layer": n_layer, "n_head": n_head, "dim": dim, **fields}
    return LlamaGen(LlamaGenConfig(**fields))
