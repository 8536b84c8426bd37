"""LlamaGen adapter: class labels in, uint8 images out, under any cache policy.

CFG layout as in the official sampler: the batch is [conditional; unconditional] (the null class),
both halves are fed the same sampled token, and each half keeps its own cache selection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lineareval.cache import CachePolicy, KVCache, TokenLayout
from lineareval.generators.base import Generation, Sampler, StepObserver, StepTimer
from lineareval.models.init import initialise_random
from lineareval.models.checkpoint import extract_model_state, load_into, load_state_dict_file
from lineareval.models.llamagen import LlamaGen, LlamaGenConfig
from lineareval.models.vq import VQConfig, VQModel, to_uint8
from lineareval.models.weights import WeightFile, resolve_weight_files
from lineareval.sampling import SamplingConfig

log = logging.getLogger(__name__)


@dataclass
class LlamaGenGenerator:
    """A LlamaGen GPT, its VQ decoder and sampling defaults."""

    name: str
    gpt: LlamaGen
    vq: VQModel
    sampling: SamplingConfig
    weights: str
    weight_files: list[str] = field(default_factory=list)
    compiled: bool = False  # the GPT's decode step and the sampler run through torch.compile
    compile_backend: str = "inductor"
    sample: Sampler = field(init=False, repr=False)
    conditioning = "class"

    def __post_init__(self) -> None:
        self.sample = Sampler(self.sampling, compile=self.compiled, backend=self.compile_backend)

    @property
    def layout(self) -> TokenLayout:
        return self.gpt.layout

    @property
    def num_classes(self) -> int:
        return self.gpt.config.num_classes

    @property
    def device(self) -> torch.device:
        return self.gpt.output.weight.device

    def sequences(self, batch: int) -> int:
        return 2 * batch if self.sampling.guided else batch

    def new_cache(self, policy: CachePolicy, budget: int, batch: int) -> KVCache:
        return self.gpt.new_cache(policy, budget, self.sequences(batch))

    @torch.inference_mode()
    def generate(self, labels: torch.Tensor, sample_ids: torch.Tensor, policy: CachePolicy, budget: int, seed: int,
                 observer: StepObserver | None = None, timer: StepTimer | None = None) -> Generation:
        """Sample the N visual tokens of each image. labels, sample_ids: (B,) -> tokens (B, N) int64.

        `observer(visual_index, cache)` runs after each decode step (tests record cache contents);
        `timer` records the wall time of each step.
        """
        cache = self.new_cache(policy, budget, len(labels))
        guided, num_visual = self.sampling.guided, self.layout.num_visual
        conditions = torch.cat([labels, torch.full_like(labels, self.gpt.null_class)]) if guided else labels
        logits = self.gpt.prefill(conditions, cache)
        tokens = torch.empty(len(labels), num_visual, dtype=torch.long, device=labels.device)
        if timer is not None:
            timer.begin()
        for index in range(num_visual):
            token = self.sample(self._guide(logits, index), seed, sample_ids, index)
            tokens[:, index] = token
            if index == num_visual - 1:
                break
            logits = self.gpt.decode(torch.cat([token, token]) if guided else token, index, cache)
            if observer is not None:
                observer(index, cache)
            if timer is not None:
                timer.step()
        return Generation(tokens, [cache])

    def _guide(self, logits: torch.Tensor, index: int) -> torch.Tensor:
        """(S, V) -> (B, V): classifier-free guidance on [cond; uncond] rows, as the official sampler."""
        if not self.sampling.guided:
            return logits
        cond, uncond = logits.chunk(2)
        if not self.sampling.guidance_at(index):
            return cond
        return uncond + (cond - uncond) * self.sampling.cfg_scale

    @torch.inference_mode()
    def decode_images(self, tokens: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """(B, N) token ids -> (B, H, W, 3) uint8 images; `size` resizes first, bicubic on the [-1, 1]
        tensor, as LlamaGen's FID sampler does (384 -> 256)."""
        grid = (self.layout.rows, self.layout.line_len)
        images = self.vq.decode_codes(tokens.to(self.vq.quant_conv.weight.device), grid)
        if size is not None and images.shape[-1] != size:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bicubic")
        return to_uint8(images)


def _initialise_random(gpt: LlamaGen, vq: VQModel, seed: int) -> None:
    """Random GPT and tokenizer for a speed benchmark; the codebook is L2-normalised as trained ones are."""
    initialise_random([gpt, vq], seed)
    for buffer in vq.buffers():
        buffer.zero_()  # codebook-usage statistics: unused at inference
    codebook = vq.quantize.embedding.weight.data
    codebook.copy_(torch.nn.functional.normalize(codebook, dim=-1))


def build_generator(*, name: str, hub_repo: str | None, gpt_file: str | None, vq_file: str | None,
                    gpt_ckpt: str | None, vq_ckpt: str | None, vq: dict, sampling: dict, weights: str,
                    weights_dir: str | Path, device: str | torch.device, dtype: torch.dtype,
                    download: bool = True, seed: int = 0, compile: bool = False, compile_backend: str = "inductor",
                    **gpt_fields) -> LlamaGenGenerator:
    """Build from a `conf/model/llamagen*.yaml` block; load official files unless `weights=random`.

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
    if compile:
        gpt.compile_decode(compile_backend)
    return LlamaGenGenerator(name, gpt, tokenizer, SamplingConfig(**sampling), weights, [str(p) for p in paths],
                             compiled=compile, compile_backend=compile_backend)
