"""LlamaGen (class-conditional): its family hooks and its loader.

CFG layout as in the official sampler: the batch is [conditional; unconditional] (the null class) in
one cache, both halves are fed the same sampled token, and each half keeps its own cache selection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from lineareval.cache import TokenLayout
from lineareval.decoding.decoder import Branch, DefaultHooks
from lineareval.generators.base import Generator, to_images
from lineareval.models.checkpoint import extract_model_state, load_into, load_state_dict_file
from lineareval.models.init import initialise_random
from lineareval.models.llamagen import LlamaGen, LlamaGenConfig
from lineareval.models.vq import VQConfig, VQModel, to_uint8
from lineareval.models.weights import WeightFile, resolve_weight_files
from lineareval.sampling import SamplingConfig

log = logging.getLogger(__name__)


@dataclass
class LlamaGenFamily(DefaultHooks):
    """Class labels in: one cache of [labels; null class] rows; images out through the VQ-16 decoder."""

    layout: TokenLayout
    num_classes: int
    vq: VQModel
    conditioning = "class"

    def branches(self, labels: torch.Tensor, guided: bool) -> list[Branch]:
        rows = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels  # null = last
        offsets = torch.full_like(rows, self.layout.prefix_len)  # visual token i at sequence position 1 + i
        return [Branch(rows, len(rows), self.layout, offsets)]

    def decode_images(self, tokens: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """(B, N) token ids -> (B, H, W, 3) uint8 images; `size` resizes first, bicubic on the [-1, 1]
        tensor, as LlamaGen's FID sampler does (384 -> 256)."""
        grid = (self.layout.rows, self.layout.line_len)
        return to_images(self.vq.decode_codes(tokens.to(self.vq.quant_conv.weight.device), grid), size, to_uint8)


def _initialise_random(gpt: LlamaGen, vq: VQModel, seed: int) -> None:
    """Random GPT and tokenizer for a speed benchmark; the codebook is L2-normalised as trained ones are."""
    initialise_random([gpt, vq], seed)
    for buffer in vq.buffers():
        buffer.zero_()  # codebook-usage statistics: unused at inference
    codebook = vq.quantize.embedding.weight.data
    codebook.copy_(torch.nn.functional.normalize(codebook, dim=-1))


def load_llamagen(*, name: str, hub_repo: str | None, gpt_file: str | None, vq_file: str | None,
                  gpt_ckpt: str | None, vq_ckpt: str | None, vq: dict, sampling: dict, weights: str,
                  weights_dir: str | Path, device: str | torch.device, dtype: torch.dtype,
                  download: bool = True, seed: int = 0, compile: bool = False, compile_backend: str = "inductor",
                  **gpt_fields) -> Generator:
    """Load from a `conf/model/llamagen*.yaml` block: official files unless `weights=random`.

    `compile` wraps the decode step and the sampler in torch.compile (CUDA graphs on GPU) with
    `compile_backend`; the first generation compiles (minutes on a CPU), so time a second one.
    """
    config = LlamaGenConfig(**gpt_fields)
    if weights not in ("checkpoint", "random"):
        raise ValueError(f"weights must be 'checkpoint' or 'random', got {weights!r}")
    paths: list[Path] = []
    if weights == "checkpoint":
        if not (gpt_file or gpt_ckpt) or not (vq_file or vq_ckpt):
            raise FileNotFoundError(f"model {name} has no released checkpoint; set model.gpt_ckpt=PATH and "
                                    "model.vq_ckpt=PATH, or choose weights=random (random weights, speed only)")
        wanted = [WeightFile(gpt_file or Path(gpt_ckpt).name, hub_repo, gpt_ckpt, "model.gpt_ckpt"),
                  WeightFile(vq_file or Path(vq_ckpt).name, hub_repo, vq_ckpt, "model.vq_ckpt")]
        paths = resolve_weight_files(wanted, weights_dir, download=download)  # fails before any allocation
    with torch.device("meta"):
        gpt, tokenizer = LlamaGen(config), VQModel(VQConfig(**vq))
    gpt.to_empty(device="cpu")  # no initialisation work: every tensor is loaded or initialised below
    tokenizer.to_empty(device="cpu")
    if weights == "random":
        log.warning("model %s uses RANDOM weights (weights=random): speed benchmarks only", name)
        _initialise_random(gpt, tokenizer, seed)
    for module, path in zip((gpt, tokenizer), paths):
        load_into(module, extract_model_state(load_state_dict_file(path), path), source=str(path))
    gpt.to(device=device, dtype=dtype).eval()
    tokenizer.to(device=device).eval()  # the tokenizer decodes in fp32, as the official sampler
    family = LlamaGenFamily(gpt.layout, config.num_classes, tokenizer)
    return Generator.assemble(name, gpt, family, SamplingConfig(**sampling), weights, [str(p) for p in paths],
                              compile=compile, backend=compile_backend)
