"""Janus-Pro image generation (Chen et al. 2025, https://arxiv.org/abs/2501.17811) on our cache.

Our own port of the generation path, loading transformers-native checkpoints
(`deepseek-community/Janus-Pro-1B` / `-7B`): the Llama language model runs on our cache engine (so
every policy applies and positions are explicit), image tokens enter through
`generation_embeddings` + `generation_aligner` and leave through `generation_head`. We port rather
than wrap `JanusForConditionalGeneration` because its attention goes through transformers' Cache API,
which sees neither the queries (LineAR scores from a line's queries) nor per-head eviction masks.
The VQ decoder is transformers' own `JanusVQVAE` (decoding is outside the cache), loaded from the
same checkpoint's `model.vqmodel.*` weights. The SigLIP understanding tower is not loaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lineareval.models.checkpoint import CheckpointError, load_into, load_state_dict_file
from lineareval.models.hub import checkpoint_files
from lineareval.models.init import initialise_random
from lineareval.models.llama import LlamaConfig, LlamaDecoder

log = logging.getLogger(__name__)


@dataclass
class JanusGenConfig:
    """The image-generation modules' sizes (transformers' JanusVQVAEConfig names)."""

    num_embeddings: int = 16384
    embed_dim: int = 8
    projection_dim: int = 2048
    image_token_embed_dim: int = 2048
    num_hidden_layers: int = 2
    num_patches: int = 24


class GenerationAligner(nn.Module):
    def __init__(self, config: JanusGenConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.projection_dim)
        self.hidden_layers = nn.ModuleList(nn.Linear(config.projection_dim, config.projection_dim)
                                           for _ in range(1, config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        for layer in self.hidden_layers:
            x = layer(nn.functional.gelu(x))
        return x


class GenerationHead(nn.Module):
    def __init__(self, config: JanusGenConfig):
        super().__init__()
        self.proj_out = nn.Linear(config.image_token_embed_dim, config.projection_dim)
        self.vision_head = nn.Linear(config.projection_dim, config.num_embeddings)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vision_head(nn.functional.gelu(self.proj_out(hidden)))


class JanusGenerator(nn.Module):
    """Text embeddings in, image-token logits out. Module names = checkpoint names without `model.`."""

    def __init__(self, text: LlamaConfig, gen: JanusGenConfig):
        super().__init__()
        self.gen_config = gen
        self.language_model = LlamaDecoder(text)
        self.generation_embeddings = nn.Embedding(gen.num_embeddings, gen.embed_dim)
        self.generation_aligner = GenerationAligner(gen)
        self.generation_head = GenerationHead(gen)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(ids)

    def embed_image(self, codes: torch.Tensor) -> torch.Tensor:
        return self.generation_aligner(self.generation_embeddings(codes))

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.generation_head(hidden).float()


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: model.path must be a Hugging Face model folder or hub id")
    return json.loads(path.read_text())


def load_janus(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Our JanusGenerator and transformers' JanusVQVAE from a transformers-native Janus folder."""
    from transformers.models.janus.configuration_janus import JanusVQVAEConfig
    from transformers.models.janus.modeling_janus import JanusVQVAE

    folder = Path(folder)
    config = read_hf_config(folder)
    if "text_config" not in config or "vq_config" not in config:
        raise CheckpointError(f"{folder / 'config.json'} is not a transformers-native Janus config (no text_config/"
                              "vq_config); use deepseek-community/Janus-Pro-1B or -7B, not deepseek-ai/Janus-Pro-*")
    vq_fields = {k: v for k, v in config["vq_config"].items() if k in JanusGenConfig.__dataclass_fields__}
    network = JanusGenerator(LlamaConfig.from_hf(config["text_config"]), JanusGenConfig(**vq_fields))
    state = {}
    for file in checkpoint_files(folder):  # the SigLIP understanding tower is dropped right away
        state.update({key: value for key, value in load_state_dict_file(file).items()
                      if key.startswith(("model.language_model.", "model.generation_", "model.vqmodel."))})
    ours = {key.removeprefix("model."): value for key, value in state.items() if not key.startswith("model.vqmodel.")}
    load_into(network, ours, source=str(folder))
    vqmodel = JanusVQVAE(JanusVQVAEConfig(**config["vq_config"]))
    vq_state = {key.removeprefix("model.vqmodel."): value for key, value in state.items()
                if key.startswith("model.vqmodel.")}
    load_into(vqmodel, vq_state, source=f"{folder} (model.vqmodel)")
    return network.to(dtype).eval(), vqmodel.eval()


def random_janus(text: dict, gen: dict, vq: dict, seed: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
    """A randomly initialised Janus of the given sizes (speed benchmarks: `weights=random`), built on `device`."""
    from transformers.models.janus.configuration_janus import JanusVQVAEConfig
    from transformers.models.janus.modeling_janus import JanusVQVAE

    torch.manual_seed(seed)
    with torch.device("meta"):
        network = JanusGenerator(LlamaConfig(**text), JanusGenConfig(**gen))
    network.to_empty(device=device)
    initialise_random([network], seed, device)
    vqmodel = JanusVQVAE(JanusVQVAEConfig(**vq))
    return network.to(dtype).eval(), vqmodel.eval()
