"""Janus-Pro image generation (Chen et al. 2025, https://arxiv.org/abs/2501.17811) on our cache.

Our own port of the generation path: the Llama language model runs on our cache engine (so every
policy applies and positions are explicit), image tokens enter through `generation_embeddings` +
`generation_aligner` and leave through `generation_head`. We port rather than wrap
`JanusForConditionalGeneration` because its attention goes through transformers' Cache API, which
sees neither the queries (LineAR scores from a line's queries) nor per-head eviction masks. The VQ
decoder is transformers' own `JanusVQVAE` (decoding is outside the cache). The SigLIP understanding
tower and the text head are not loaded.

Two checkpoint layouts load, told apart by config.json:
- transformers-native (`deepseek-community/Janus-Pro-1B` / `-7B`): `text_config` + `vq_config`, keys
  `model.language_model.*`, `model.generation_*`, `model.vqmodel.*`;
- DeepSeek's release (`deepseek-ai/Janus-Pro-1B` / `-7B`): `language_config`, `gen_vision_config`,
  `gen_aligner_config`, `gen_head_config`, keys `language_model.model.*`, `gen_embed.*`,
  `gen_aligner.layers.{0,2}.*`, `gen_head.*`, `gen_vision_model.*` (as `pytorch_model.bin`, shards with
  an index, or safetensors). Its keys are renamed onto ours at load time with the renaming of
  transformers' own converter (`convert_janus_weights_to_hf.py`). Its VQ model is the fixed class
  `VQ-16` (config.json names no sizes), so the VQ sizes are read from the weights' shapes, and the
  token grid (not in config.json; the official script's 384 px / 16) comes from `model.gen.num_patches`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lineareval.cache import KVCache
from lineareval.models.checkpoint import CheckpointError, load_into, load_state_dict_file
from lineareval.models.hub import checkpoint_files
from lineareval.models.init import initialise_random
from lineareval.models.layers import TextPrefix, inverse_frequencies, rotary
from lineareval.models.llama import LlamaConfig, LlamaDecoder, Rotary

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


class JanusImageLM(nn.Module):
    """Janus-Pro's image generation: text prefix in, image-token logits out, on our cache.
    Module names = checkpoint names without `model.`."""

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

    def cache_spec(self) -> dict:
        return self.language_model.cache_spec()

    def prefill(self, prefix: TextPrefix, cache: KVCache) -> torch.Tensor:
        """The formatted prompt (image-start last) into the cache; image-token logits for token 0 (S, V)."""
        hidden = self.language_model.prefill(self.embed_text(prefix.ids), prefix.positions, prefix.present, cache)
        return self.image_logits(hidden)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Image tokens (S, k) at RoPE positions (S, k) -> image-token logits (S, k, V)."""
        return self.image_logits(self.language_model.step(self.embed_image(tokens), positions, cache))


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: model.path must be a Hugging Face model folder or hub id")
    return json.loads(path.read_text())


# DeepSeek's config.json sections for the image-generation path (their presence identifies the layout).
OFFICIAL_CONFIGS = ("language_config", "gen_vision_config", "gen_aligner_config", "gen_head_config")
# transformers' LlamaConfig defaults, which DeepSeek's code fills in for fields language_config leaves out.
LLAMA_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0}
# Not needed to generate: the SigLIP understanding tower, its aligner and the text head (both layouts).
SKIPPED_PREFIXES = ("model.vision_model.", "model.aligner.", "lm_head.", "vision_model.", "aligner.",
                    "language_model.lm_head.")
# DeepSeek's names -> ours (transformers' converter renames the same way, with a `model.` prefix).
OFFICIAL_NETWORK_PREFIXES = (("language_model.model.", "language_model."), ("gen_embed.", "generation_embeddings."),
                             ("gen_head.output_mlp_projector.", "generation_head.proj_out."),
                             ("gen_head.vision_head.", "generation_head.vision_head."))
OFFICIAL_VQ_RENAMES = ((r"^encoder\.conv_blocks\.", "encoder.down."), (r"^decoder\.conv_blocks\.", "decoder.up."),
                       (r"\.res\.", ".block."), (r"\.mid\.0\.", ".mid.block_1."), (r"\.mid\.1\.", ".mid.attn_1."),
                       (r"\.mid\.2\.", ".mid.block_2."))
OFFICIAL_VQ_UNUSED = ("quantize.codebook_used",)  # a training statistic of VQ-16


def load_janus_networks(folder: str | Path, dtype: torch.dtype = torch.float32, num_patches: int = 24):
    """Our JanusImageLM and transformers' JanusVQVAE from a Janus folder in either layout (module docstring).

    `num_patches` (tokens per side) is used for DeepSeek's layout only, whose config.json does not hold it.
    """
    folder = Path(folder)
    config = read_hf_config(folder)
    native = "text_config" in config and "vq_config" in config
    if not native and not all(key in config for key in OFFICIAL_CONFIGS):
        raise CheckpointError(f"{folder / 'config.json'} is not a Janus config: expected transformers' layout "
                              "(text_config, vq_config: deepseek-community/Janus-Pro-*) or DeepSeek's "
                              f"({', '.join(OFFICIAL_CONFIGS)}: deepseek-ai/Janus-Pro-*); it has {sorted(config)}.")
    state = {key: value for file in checkpoint_files(folder) for key, value in load_state_dict_file(file).items()
             if not key.startswith(SKIPPED_PREFIXES)}  # the understanding tower is dropped file by file
    text, gen, network_state, vq_state, vq_fields = (_native_parts(config, state) if native
                                                     else _official_parts(config, state, folder, num_patches))
    from transformers.models.janus.configuration_janus import JanusVQVAEConfig
    from transformers.models.janus.modeling_janus import JanusVQVAE

    network = JanusImageLM(text, gen)
    load_into(network, network_state, source=str(folder))
    vqmodel = JanusVQVAE(JanusVQVAEConfig(**vq_fields))
    load_into(vqmodel, vq_state, source=f"{folder} (VQ model)")
    return network.to(dtype).eval(), vqmodel.eval()


def _native_parts(config: dict, state: dict[str, torch.Tensor]) -> tuple:
    """Sizes and state dicts of a transformers-native folder: (text, gen, network state, VQ state, VQ config)."""
    gen = JanusGenConfig(**{key: value for key, value in config["vq_config"].items()
                            if key in JanusGenConfig.__dataclass_fields__})
    network_state = {key.removeprefix("model."): value for key, value in state.items()
                     if key.startswith(("model.language_model.", "model.generation_"))}
    vq_state = {key.removeprefix("model.vqmodel."): value for key, value in state.items()
                if key.startswith("model.vqmodel.")}
    return LlamaConfig.from_hf(config["text_config"]), gen, network_state, vq_state, config["vq_config"]


def _official_parts(config: dict, state: dict[str, torch.Tensor], folder: Path, num_patches: int) -> tuple:
    """The same from DeepSeek's release: its keys renamed onto ours, the VQ-16 sizes read from its weights."""
    text, gen = _official_configs(config, folder, num_patches)
    network_state, vq_state = _rename_official(state)
    return text, gen, network_state, vq_state, _vq_sizes_from_weights(vq_state, gen, folder)


def _official_configs(config: dict, folder: Path, num_patches: int) -> tuple[LlamaConfig, JanusGenConfig]:
    """The language model's and generation modules' sizes from DeepSeek's config.json."""
    if config["gen_vision_config"].get("cls") != "VQ-16":
        raise CheckpointError(f"{folder / 'config.json'}: gen_vision_config.cls is "
                              f"{config['gen_vision_config'].get('cls')!r}; DeepSeek's code (and ours) knows only "
                              "VQ-16")
    try:
        vision, aligner, head = (config[name]["params"] for name in OFFICIAL_CONFIGS[1:])
        gen = JanusGenConfig(num_embeddings=vision["image_token_size"], embed_dim=vision["n_embed"],
                             projection_dim=aligner["n_embed"], image_token_embed_dim=head["image_token_embed"],
                             num_hidden_layers=aligner.get("depth", 2), num_patches=num_patches)
        text = LlamaConfig.from_hf({**LLAMA_DEFAULTS, **config["language_config"]})
    except KeyError as error:
        raise CheckpointError(f"{folder / 'config.json'} lacks {error}, which DeepSeek's Janus-Pro config.json "
                              "holds; is the file complete?") from error
    return text, gen


def _rename_official(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """DeepSeek's keys -> (our network's keys, transformers' JanusVQVAE keys). Unknown keys pass unchanged (and are
    then reported as unexpected)."""
    network, vq = {}, {}
    for key, value in state.items():
        if key.startswith("gen_vision_model."):
            name = key.removeprefix("gen_vision_model.")
            if name not in OFFICIAL_VQ_UNUSED:
                for pattern, replacement in OFFICIAL_VQ_RENAMES:
                    name = re.sub(pattern, replacement, name)
                vq[name] = value
            continue
        aligner = re.fullmatch(r"gen_aligner\.layers\.(\d+)\.(.+)", key)
        if aligner:  # MlpProjector: Linear, GELU, Linear, ... -> fc1, hidden_layers.0, ...
            index = int(aligner.group(1)) // 2
            key = f"generation_aligner.{'fc1' if index == 0 else f'hidden_layers.{index - 1}'}.{aligner.group(2)}"
        for old, new in OFFICIAL_NETWORK_PREFIXES:
            if key.startswith(old):
                key = new + key.removeprefix(old)
        network[key] = value
    return network, vq


def _vq_sizes_from_weights(vq: dict[str, torch.Tensor], gen: JanusGenConfig, folder: Path) -> dict:
    """JanusVQVAEConfig fields of a VQ-16 read from its weights (DeepSeek's config.json names only the class)."""
    try:
        base = vq["encoder.conv_in.weight"].shape[0]
        levels = 1 + max(int(key.split(".")[2]) for key in vq if key.startswith("encoder.down."))
        blocks = 1 + max(int(key.split(".")[4]) for key in vq if key.startswith("encoder.down.0.block."))
        return dict(base_channels=base, num_res_blocks=blocks,
                    channel_multiplier=[vq[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // base
                                        for i in range(levels)],
                    in_channels=vq["encoder.conv_in.weight"].shape[1],
                    out_channels=vq["decoder.conv_out.weight"].shape[0],
                    latent_channels=vq["quant_conv.weight"].shape[1], embed_dim=vq["quant_conv.weight"].shape[0],
                    num_embeddings=vq["quantize.embedding.weight"].shape[0], num_patches=gen.num_patches,
                    projection_dim=gen.projection_dim, image_token_embed_dim=gen.image_token_embed_dim,
                    num_hidden_layers=gen.num_hidden_layers)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{folder}: gen_vision_model.* is not a VQ-16 image tokenizer ({error!r} is missing); "
                              "is the download complete?") from error


# ---- RoPE frequencies in bf16 ------------------------------------------------------------------

ROPE_INV_FREQ = ("official", "float32")


class RoundedRotary(Rotary):
    """RoPE from inverse frequencies rounded to the weights' dtype, angles then computed in fp32.

    DeepSeek's generation script runs `vl_gpt.to(torch.bfloat16)`, which also casts transformers'
    `LlamaRotaryEmbedding.inv_freq` buffer (transformers >= 4.38, as Janus requires, then computes
    `position.float() * inv_freq.float()`); transformers' `from_pretrained(dtype=torch.bfloat16)` keeps
    the buffer in fp32. In fp32 both are the same.
    """

    def __init__(self, head_dim: int, theta: float, frequency_dtype: torch.dtype):
        super().__init__(head_dim, theta)
        self.frequency_dtype = frequency_dtype

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = inverse_frequencies(self.head_dim, self.theta, positions.device).to(self.frequency_dtype)
        return rotary(positions, inv_freq, dtype)


def set_rope_inv_freq(network: JanusImageLM, choice: str) -> None:
    """`official`: frequencies rounded to the weights' dtype (DeepSeek's code); `float32`: exact (transformers')."""
    if choice not in ROPE_INV_FREQ:
        raise ValueError(f"model.rope_inv_freq must be one of {ROPE_INV_FREQ}, got {choice!r}")
    model = network.language_model
    config = model.config
    model.rotary = (RoundedRotary(config.head_dim, config.rope_theta, model.embed_tokens.weight.dtype)
                    if choice == "official" else Rotary(config.head_dim, config.rope_theta))


def random_janus(text: dict, gen: dict, vq: dict, seed: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
    """A randomly initialised Janus of the given sizes (speed benchmarks: `weights=random`), built on `device`."""
    from transformers.models.janus.configuration_janus import JanusVQVAEConfig
    from transformers.models.janus.modeling_janus import JanusVQVAE

    torch.manual_seed(seed)
    with torch.device("meta"):
        network = JanusImageLM(LlamaConfig(**text), JanusGenConfig(**gen))
    network.to_empty(device=device)
    initialise_random([network], seed, device)
    vqmodel = JanusVQVAE(JanusVQVAEConfig(**vq))
    return network.to(dtype).eval(), vqmodel.eval()
