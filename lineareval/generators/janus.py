"""Janus-Pro (text-to-image): its family hooks and its loader.

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
from dataclasses import dataclass

import torch

from lineareval.cache import TokenLayout
from lineareval.decoding.decoder import Branch, DefaultHooks
from lineareval.generators.base import Generator, left_pad, load_tokenizer, to_images
from lineareval.generators.text import bos_id, check_round_trip, is_real_tokenizer, vocabulary_id
from lineareval.models.layers import TextPrefix
from lineareval.sampling import SamplingConfig

log = logging.getLogger(__name__)

PROMPT_TEMPLATE = "<|User|>: {prompt}\n\n<|Assistant|>:"
IMAGE_START = "<begin_of_image>"


@dataclass
class JanusFamily(DefaultHooks):
    """Prompts in: one cache of [conditional; unconditional] prompt rows; images out through the VQ decoder."""

    tokenizer: object
    vqmodel: torch.nn.Module
    side: int  # image tokens per row and per column (24)
    device: torch.device
    prompt_template: str = PROMPT_TEMPLATE
    image_start: str = IMAGE_START
    pad_id: int | None = None  # unconditional rows' filler; load_janus gives the id of <｜▁pad▁｜>
    bos_id: int | None = None  # None: the tokenizer's BOS
    conditioning = "text"

    def __post_init__(self) -> None:
        if self.pad_id is None:
            self.pad_id = self.tokenizer.pad_token_id
        if self.bos_id is None:
            self.bos_id = bos_id(self.tokenizer, "Janus-Pro")

    @property
    def layout(self) -> TokenLayout:
        """The visual layout (24 x 24, no end-of-line token); the prompt prefix varies per batch."""
        return TokenLayout(prefix_len=0, rows=self.side, line_len=self.side)

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each formatted, stripped prompt: BOS, then the text up to image-start."""
        texts = [self.prompt_template.format(prompt=prompt.strip()) + self.image_start for prompt in prompts]
        return [[self.bos_id, *ids] for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def unconditional(self, ids: list[int]) -> list[int]:
        """BOS, then `<｜▁pad▁｜>` in place of every prompt token, then image-start (the official layout)."""
        return [ids[0]] + [self.pad_id] * (len(ids) - 2) + [ids[-1]]

    def prefix_batch(self, prompts: list[str], guided: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and presence mask, each (S, P): S = 2B rows [cond; uncond] with guidance."""
        rows = self.encode(prompts)
        if guided:
            rows = rows + [self.unconditional(ids) for ids in rows]
        return left_pad(rows, self.tokenizer.pad_token_id, self.device)

    def branches(self, prompts: list[str], guided: bool) -> list[Branch]:
        ids, present = self.prefix_batch(prompts, guided)
        positions = (present.cumsum(1) - 1).clamp(min=0)  # prompt tokens 0..P_s-1
        layout = TokenLayout(ids.shape[1], self.side, self.side)
        return [Branch(TextPrefix(ids, positions, present), len(ids), layout, present.sum(1))]

    def decode_images(self, tokens: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """(B, N) -> (B, H, W, 3) uint8, as the official `(x + 1) / 2 * 255` clipped and truncated;
        `size` resizes first (bicubic on the [-1, 1] tensor)."""
        pixels = self.vqmodel.decode(tokens.to(self.vqmodel.post_quant_conv.weight.device)).float()
        return to_images(pixels, size, to_uint8)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 as Janus's official `(x + 1) / 2 * 255`, clipped and truncated."""
    return torch.clamp((pixels + 1) / 2 * 255, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)


def load_janus(*, name: str, path: str, text: dict, gen: dict, vq: dict, sampling: dict, weights: str,
                weights_dir: str, device: str | torch.device, dtype: torch.dtype, download: bool = True, seed: int = 0,
                compile: bool = False, compile_backend: str = "inductor",
                rope_inv_freq: str = "official", pad_token: str = "<｜▁pad▁｜>",
                prompt_template: str = PROMPT_TEMPLATE, image_start: str = IMAGE_START) -> Generator:
    """Load from `conf/model/janus_pro_*.yaml`: `path` is a hub id or a local folder in transformers' layout
    (deepseek-community/Janus-Pro-*) or DeepSeek's (deepseek-ai/Janus-Pro-*, `.bin` or safetensors)."""
    from lineareval.models.hub import PATTERNS, checkpoint_files, resolve_model_folder
    from lineareval.models.janus import load_janus_networks, random_janus, set_rope_inv_freq

    if weights == "checkpoint":
        weight_files = ("*.safetensors", "pytorch_model*.bin")  # transformers' layout, or DeepSeek's release
        folder = resolve_model_folder(path, weights_dir, download=download,
                                      required=("config.json", weight_files, "tokenizer.json"),
                                      patterns=(*PATTERNS, "pytorch_model*.bin"))
        network, vqmodel = load_janus_networks(folder, dtype, num_patches=gen.get("num_patches", 24))
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
    family = JanusFamily(tokenizer, vqmodel, network.gen_config.num_patches, torch.device(device), prompt_template,
                         image_start, pad_id)
    return Generator.assemble(name, network, family, SamplingConfig(**sampling), weights, files, compile=compile,
                              backend=compile_backend)
