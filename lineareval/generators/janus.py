"""Janus-Pro adapter: prompts in, uint8 images out, under any cache policy.

As the official generator: the stripped prompt goes through the DeepSeek chat format with an empty
system prompt and ends with the image-start tag,
`<|User|>: {prompt.strip()}\\n\\n<|Assistant|>:<begin_of_image>`, encoded as BOS + the text (what
LlamaTokenizerFast's `encode` gives; we add BOS ourselves, since a tokenizer.json loaded under
transformers 5 may not). CFG rows are [cond; uncond] where the unconditional prompt keeps the first
(BOS) and last (image-start) tokens and replaces the rest by the id of `<｜▁pad▁｜>`, looked up by name
as the official `VLChatProcessor.pad_id` does (not the tokenizer's pad_token, which may differ), and
not masked: the official code attends to them. Prompts of different lengths in one batch are
left-padded with masked padding (the official code batches one prompt at a time). Positions are
passed explicitly: prompt tokens 0..P_s-1, visual token i at P_s + i.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from lineareval.cache import CachePolicy, TokenLayout
from lineareval.generators.base import Generation, Sampler, StepObserver, StepTimer, left_pad, load_tokenizer
from lineareval.generators.text import bos_id, check_round_trip, is_real_tokenizer, vocabulary_id
from lineareval.models.janus import JanusGenerator
from lineareval.sampling import SamplingConfig

log = logging.getLogger(__name__)


@dataclass
class JanusAdapter:
    """Janus-Pro network, its VQ decoder, tokenizer and prompt format."""

    name: str
    network: JanusGenerator
    vqmodel: torch.nn.Module
    tokenizer: object
    sampling: SamplingConfig
    weights: str
    prompt_template: str = "<|User|>: {prompt}\n\n<|Assistant|>:"
    image_start: str = "<begin_of_image>"
    weight_files: list[str] = field(default_factory=list)
    compiled: bool = False  # the decode step and the sampler run through torch.compile
    compile_backend: str = "inductor"
    pad_id: int | None = None  # unconditional rows' filler; build_janus gives the id of <｜▁pad▁｜>
    bos_id: int | None = None  # None: the tokenizer's BOS
    sample: Sampler = field(init=False, repr=False)
    conditioning = "text"

    def __post_init__(self) -> None:
        self.sample = Sampler(self.sampling, compile=self.compiled, backend=self.compile_backend)
        if self.pad_id is None:
            self.pad_id = self.tokenizer.pad_token_id
        if self.bos_id is None:
            self.bos_id = bos_id(self.tokenizer, self.name)

    @property
    def layout(self) -> TokenLayout:
        """The visual layout (24 x 24, no end-of-line token); the prompt prefix varies per batch."""
        side = self.network.gen_config.num_patches
        return TokenLayout(prefix_len=0, rows=side, line_len=side)

    @property
    def device(self) -> torch.device:
        return self.network.language_model.embed_tokens.weight.device

    def sequences(self, batch: int) -> int:
        return 2 * batch if self.sampling.guided else batch

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each formatted, stripped prompt: BOS, then the text up to image-start."""
        texts = [self.prompt_template.format(prompt=prompt.strip()) + self.image_start for prompt in prompts]
        return [[self.bos_id, *ids] for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def unconditional(self, ids: list[int]) -> list[int]:
        """BOS, then `<｜▁pad▁｜>` in place of every prompt token, then image-start (the official layout)."""
        return [ids[0]] + [self.pad_id] * (len(ids) - 2) + [ids[-1]]

    def prefix_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and presence mask, each (S, P): S = 2B rows [cond; uncond] with guidance."""
        rows = self.encode(prompts)
        if self.sampling.guided:
            rows = rows + [self.unconditional(ids) for ids in rows]
        return left_pad(rows, self.tokenizer.pad_token_id, self.device)

    @torch.inference_mode()
    def generate(self, prompts: list[str], sample_ids: torch.Tensor, policy: CachePolicy, budget: int, seed: int,
                 observer: StepObserver | None = None, timer: StepTimer | None = None) -> Generation:
        """Sample the 576 image tokens of each prompt's image. -> tokens (B, N)."""
        ids, present = self.prefix_batch(prompts)
        layout = TokenLayout(ids.shape[1], self.layout.rows, self.layout.line_len)
        model = self.network.language_model
        cache = model.new_cache(policy, budget, len(ids), layout)
        lengths = present.sum(1)  # (S,) real prompt tokens
        positions = (present.cumsum(1) - 1).clamp(min=0)
        hidden = model.prefill(self.network.embed_text(ids), positions, present, cache)
        logits = self.network.image_logits(hidden)
        tokens = torch.empty(len(prompts), layout.num_visual, dtype=torch.long, device=ids.device)
        if timer is not None:
            timer.begin()
        for index in range(layout.num_visual):
            token = self.sample(self._guide(logits), seed, sample_ids, index)
            tokens[:, index] = token
            if index == layout.num_visual - 1:
                break
            feed = torch.cat([token, token]) if self.sampling.guided else token
            hidden = model.decode(self.network.embed_image(feed), lengths + index, index, cache)
            logits = self.network.image_logits(hidden)
            if observer is not None:
                observer(index, cache)
            if timer is not None:
                timer.step()
        return Generation(tokens, [cache])

    def _guide(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.sampling.guided:
            return logits
        cond, uncond = logits.chunk(2)
        return uncond + (cond - uncond) * self.sampling.cfg_scale

    @torch.inference_mode()
    def decode_images(self, tokens: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """(B, N) -> (B, H, W, 3) uint8, as the official `(x + 1) / 2 * 255` clipped and truncated;
        `size` resizes first (bicubic on the [-1, 1] tensor)."""
        pixels = self.vqmodel.decode(tokens.to(self.vqmodel.post_quant_conv.weight.device)).float()
        if size is not None and pixels.shape[-1] != size:
            pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bicubic")
        return torch.clamp((pixels + 1) / 2 * 255, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)


def build_janus(*, name: str, path: str, text: dict, gen: dict, vq: dict, sampling: dict, weights: str,
                weights_dir: str, device: str | torch.device, dtype: torch.dtype, download: bool = True, seed: int = 0,
                compile: bool = False, compile_backend: str = "inductor", rope_inv_freq: str = "official",
                pad_token: str = "<｜▁pad▁｜>",
                prompt_template: str = JanusAdapter.prompt_template,
                image_start: str = JanusAdapter.image_start) -> JanusAdapter:
    """Build from `conf/model/janus_pro_*.yaml`: `path` is a hub id or a local folder in transformers' layout
    (deepseek-community/Janus-Pro-*) or DeepSeek's (deepseek-ai/Janus-Pro-*, `.bin` or safetensors)."""
    from lineareval.models.hub import PATTERNS, checkpoint_files, resolve_model_folder
    from lineareval.models.janus import load_janus, random_janus, set_rope_inv_freq

    if weights == "checkpoint":
        weight_files = ("*.safetensors", "pytorch_model*.bin")  # transformers' layout, or DeepSeek's release
        folder = resolve_model_folder(path, weights_dir, download=download,
                                      required=("config.json", weight_files, "tokenizer.json"),
                                      patterns=(*PATTERNS, "pytorch_model*.bin"))
        network, vqmodel = load_janus(folder, dtype, num_patches=gen.get("num_patches", 24))
        files = [str(file) for file in checkpoint_files(folder)]
    elif weights == "random":
        log.warning("model %s uses RANDOM weights (weights=random): speed benchmarks only", name)
        network, vqmodel = random_janus(text, gen, vq, seed, dtype, device)
        folder, files = None, []
    else:
        raise ValueError(f"weights must be 'checkpoint' or 'random', got {weights!r}")
    set_rope_inv_freq(network, rope_inv_freq)
    tokenizer = load_tokenizer(folder, path, weights_dir, text["vocab_size"])
    pad_id = None
    if is_real_tokenizer(tokenizer):
        check_round_trip(tokenizer, folder or path)
        pad_id = vocabulary_id(tokenizer, pad_token, folder or path)
    network.to(device)
    vqmodel.to(device)
    if compile:
        network.language_model.compile_decode(compile_backend)
    return JanusAdapter(name, network, vqmodel, tokenizer, SamplingConfig(**sampling), weights, prompt_template,
                        image_start, files, compiled=compile, compile_backend=compile_backend, pad_id=pad_id)
