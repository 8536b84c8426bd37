"""Chameleon-7B decoder (Chameleon Team 2024, https://arxiv.org/abs/2405.09818) on our cache.

It is the language model of Lumina-mGPT (Liu et al. 2024, https://arxiv.org/abs/2408.02657). Parameter
names are the Hugging Face `ChameleonForConditionalGeneration` names, so the `Alpha-VLLM/Lumina-mGPT-7B-*`
safetensors load one to one (their `model.vqmodel.*` image encoder is skipped: generation never encodes
images). Llama blocks (RMSNorm in fp32, SwiGLU, 1D RoPE in the rotate-half layout of HF checkpoints)
plus Chameleon's per-head q/k LayerNorm: statistics over head_dim, then a (heads, head_dim) gain and
bias. Lumina's own checkpoints store that gain and bias as (model_parallel_size, head_dim) (one row per
training shard, 1 for 7B); the loader expands them to one row per head as transformers does.

Unlike transformers' `ChameleonForConditionalGeneration`, image-token logits are never masked: Lumina
generates image tokens. Keys and values enter the cache after q/k norm and RoPE, as attention uses them.

Lumina-mGPT-7B (config.json): 32 layers, hidden 4096, 32 heads (MHA), intermediate 11008, vocab 65536,
rope_theta 10000 without scaling, rms_norm_eps 1e-5, swin_norm false, model_parallel_size 1.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn

from lineareval.cache import KVCache
from lineareval.models.hub import checkpoint_files
from lineareval.models.checkpoint import load_into, load_state_dict_file
from lineareval.models.layers import DecoderLayer, RMSNorm, TextPrefix, inverse_frequencies, rotary
from lineareval.models.packed import Linear
from lineareval.models.weights import MissingWeightsError

log = logging.getLogger(__name__)

SKIPPED_PREFIXES = ("model.vqmodel.",)  # the VQ image encoder: not needed to generate


@dataclass
class ChameleonLMConfig:
    """Field names are the HF `ChameleonConfig` names; `from_hf_config` reads a config.json dict."""

    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: one per query head (MHA)
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, or {"rope_type": "linear", "factor": f}
    attention_bias: bool = False
    mlp_bias: bool = False
    model_parallel_size: int = 1
    swin_norm: bool = False

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(f"grouped-query attention (num_key_value_heads={self.num_key_value_heads}, "
                             f"num_attention_heads={self.num_attention_heads}) is not supported: our cache stores "
                             "one key/value head per query head, and no Chameleon/Lumina-mGPT checkpoint uses GQA")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must divide by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (Chameleon uses 'silu')")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ("default", "linear"):
            raise ValueError(f"rope scaling {self.rope_scaling} is not supported; only none or linear")

    @classmethod
    def from_hf_config(cls, config: Mapping) -> ChameleonLMConfig:
        """From a config.json dict: transformers 4.x (`rope_theta`, `rope_scaling`, as in Lumina's files) or
        5.x (`rope_parameters`). Fields of the image tokenizer and the vocabulary map are ignored."""
        known = {field.name for field in fields(cls)} - {"rope_theta", "rope_scaling"}
        values = {key: value for key, value in config.items() if key in known}
        rope = dict(config.get("rope_parameters") or {})
        scaling = dict(config.get("rope_scaling") or {})
        values["rope_theta"] = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            values["rope_scaling"] = {"rope_type": rope_type, "factor": rope.get("factor", scaling.get("factor"))}
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def inverse_frequencies(self, device: torch.device | None = None) -> torch.Tensor:
        """(head_dim / 2,) fp32 RoPE frequencies, divided by the linear scaling factor if any."""
        factor = self.rope_scaling["factor"] if self.rope_scaling and self.rope_scaling["rope_type"] == "linear" else 1.0
        return inverse_frequencies(self.head_dim, self.rope_theta, device, factor)


class ChameleonDecoder(nn.Module):
    """The `model.*` part of the HF checkpoint (without `model.vqmodel`)."""

    def __init__(self, config: ChameleonLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config.hidden_size, config.intermediate_size, config.num_attention_heads, config.head_dim,
                         config.rms_norm_eps, bias=config.attention_bias, mlp_bias=config.mlp_bias, qk_norm=True,
                         swin_norm=config.swin_norm)
            for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class ChameleonLM(nn.Module):
    """Chameleon decoder-only LM with explicit positions. Sequences: [prefix (left-padded), visual tokens]."""

    def __init__(self, config: ChameleonLMConfig):
        super().__init__()
        self.config = config
        self.model = ChameleonDecoder(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", config.inverse_frequencies(), persistent=False)

    def reset_rope(self) -> None:
        """Recompute the RoPE frequencies in fp32 on their current device (never stored in a checkpoint)."""
        self.inv_freq = self.config.inverse_frequencies(self.inv_freq.device)

    def _apply(self, fn, recurse=True):
        # keep the frequencies in fp32 under .to(bfloat16): bf16 angles are wrong by whole turns at long positions
        super()._apply(fn, recurse)
        self.reset_rope()
        return self

    def cache_spec(self) -> dict:
        weight = self.lm_head.weight
        return {"num_layers": self.config.num_hidden_layers, "heads": self.config.num_attention_heads,
                "head_dim": self.config.head_dim, "dtype": weight.dtype, "device": weight.device}

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(h)).float()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attn_mask: list[torch.Tensor] | torch.Tensor | None = None) -> torch.Tensor:
        """Logits for every position, fp32. input_ids, position_ids (S, T) -> (S, T, V).

        `attn_mask` (S, H|1, T, T), True = attend, replaces the causal mask in every layer; a list gives
        one mask per layer (oracle tests). Every query must see at least one key.
        """
        layers = self.model.layers
        masks = attn_mask if isinstance(attn_mask, (list, tuple)) else [attn_mask] * len(layers)
        if len(masks) != len(layers):
            raise ValueError(f"got {len(masks)} attention masks for {len(layers)} layers")
        h = self.model.embed_tokens(input_ids)  # (S, T, dim)
        cos, sin = rotary(position_ids, self.inv_freq, h.dtype)
        for layer, mask in zip(layers, masks):
            h = layer(h, cos, sin, mask)
        return self._logits(h)

    def prefill(self, prefix: TextPrefix, cache: KVCache) -> torch.Tensor:
        """Run the (left-padded) prefix, store its keys/values; logits at the last position. (S, P) -> (S, V).

        `prefix.present` (S, P) marks real tokens; padding slots are never attended, and each padding
        query attends to itself only so that no softmax row is empty.
        """
        input_ids, present = prefix.ids, prefix.present
        length = input_ids.shape[1]
        if length != cache.layout.prefix_len:
            raise ValueError(f"prefix of {length} tokens for a cache laid out for {cache.layout.prefix_len}")
        mask = None
        if present is not None and not bool(present.all()):
            causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
            eye = torch.eye(length, dtype=torch.bool, device=input_ids.device)
            mask = causal & (present[:, None, None, :].to(causal.device) | eye)  # (S, 1, P, P)
        h = self.model.embed_tokens(input_ids)
        cos, sin = rotary(prefix.positions, self.inv_freq, h.dtype)
        for layer, layer_cache in zip(self.model.layers, cache.layers):
            h = layer(h, cos, sin, mask, cache=layer_cache, present=present)
        return self._logits(h[:, -1])

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Tokens (S, k) at RoPE positions (S, k) into the cache's reserved slots; logits (S, k, V). The cache
        is addressed by layout index, RoPE by each sequence's own position, so left-padded prompts of
        different lengths share one layout."""
        h = self.model.embed_tokens(tokens)  # (S, k, dim)
        cos, sin = rotary(positions, self.inv_freq, h.dtype)
        for layer, layer_cache in zip(self.model.layers, cache.layers):
            h = layer.step(h, cos, sin, layer_cache)
        return self._logits(h)


# ---- checkpoints --------------------------------------------------------------------------------

def expand_qk_norms(state: dict[str, torch.Tensor], heads: int) -> dict[str, torch.Tensor]:
    """Give q/k norm gains and biases one row per head.

    Lumina's checkpoints hold (model_parallel_size, head_dim): one row per training shard, shared by
    that shard's consecutive heads. transformers' layout (heads, head_dim) passes through unchanged.
    """
    out = dict(state)
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] in ("q_norm", "k_norm") and value.dim() == 2:
            groups = value.shape[0]
            if groups != heads and heads % groups == 0:
                out[key] = value.repeat_interleave(heads // groups, dim=0)
    return out


def load_chameleon_lm(path: str | Path, config: ChameleonLMConfig | None = None, *,
                      dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> ChameleonLM:
    """Build a ChameleonLM and strictly load a HF checkpoint (folder, shard index, or one file) into it.

    `config` defaults to the folder's config.json. `model.vqmodel.*` keys are skipped on purpose; any
    other missing, unexpected or misshapen key raises `CheckpointError`.
    """
    files = checkpoint_files(path)
    if config is None:
        config_file = files[0].parent / "config.json"
        if not config_file.exists():
            raise MissingWeightsError(f"No config.json next to {files[0]}; pass a ChameleonLMConfig explicitly.")
        config = ChameleonLMConfig.from_hf_config(json.loads(config_file.read_text()))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_state_dict_file(file))
    skipped = [key for key in state if key.startswith(SKIPPED_PREFIXES)]
    for key in skipped:
        del state[key]
    log.info("Skipping %d image-tokenizer tensors (%s*)", len(skipped), "*, ".join(SKIPPED_PREFIXES))
    state = expand_qk_norms(state, config.num_attention_heads)
    with torch.device("meta"):
        model = ChameleonLM(config)
    model = model.to(dtype).to_empty(device=device)  # allocate once, in the target dtype
    load_into(model, state, source=str(path), ignore=())
    return model.eval()
