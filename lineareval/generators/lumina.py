"""Lumina-mGPT (Liu et al. 2024, https://arxiv.org/abs/2408.02657): its family hooks and its loader.

As the official `FlexARInferenceSolver`: the prompt is `[bos] + encode("Generate an image of {W}x{H}
according to the following prompt:\\n{prompt}<reserved08706>", add_special_tokens=False)`; the image is
image-start, height and width tokens, then rows of image tokens each followed by the new-line token,
then image-end. The official processors do not force the image header: the model samples image-start
and the two size tokens freely (they only constrain what follows, reading the size from whatever was
sampled). We write the header the prompt asks for into the prefix instead, so every sample has the
requested size; after it we force the new-line token after every row and restrict all other positions
to image tokens with image top-k, as the official processors do. CFG is unbatched as officially: the
unconditional context starts at image-start, runs in its own cache, and both caches are compressed
by the policy. The line length is the row plus its new-line token (49 at 768 px, 65 at 1024 px).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lineareval.cache import TokenLayout
from lineareval.decoding.decoder import Branch
from lineareval.generators.base import Generator, left_pad, load_tokenizer, to_images
from lineareval.generators.text import bos_id, check_round_trip, is_real_tokenizer
from lineareval.models.chameleon import ChameleonLM
from lineareval.models.layers import TextPrefix
from lineareval.models.chameleon_vqgan import VQGAN_WEIGHTS, ImageVocabulary, find_vqgan_weights, load_chameleon_vqgan
from lineareval.sampling import SamplingConfig

log = logging.getLogger(__name__)


@dataclass
class LuminaTokens:
    """Token ids of the image layout (defaults: the released Chameleon vocabulary)."""

    image_start: int = 8197  # <racm3:break>
    image_end: int = 8196  # <eoss>
    new_line: int = 8803  # <reserved08799>
    end_of_turn: str = "<reserved08706>"
    size_offset: int = 8804  # size token = offset + latent tokens / 2 (Lumina counts 32-px grids)
    image_first: int = 4  # image tokens are ids [image_first, image_last]
    image_last: int = 8195

    def check(self, vocabulary: ImageVocabulary, side: int, source: Path) -> None:
        """Stop if these ids disagree with the Chameleon vocabulary (`text_tokenizer.json`) they are meant to name."""
        image_ids = vocabulary.image_token_ids.tolist()
        expected = {"image_start": vocabulary.image_start_id, "image_end": vocabulary.image_end_id,
                    "new_line": vocabulary.new_line_id,
                    "size_offset": vocabulary.size_token_ids(side, side)[0] - side // 2,
                    "image_first": image_ids[0], "image_last": image_ids[-1]}
        wrong = [f"{name}={getattr(self, name)} but the vocabulary says {value} (set model.tokens.{name}={value})"
                 for name, value in expected.items() if getattr(self, name) != value]
        if image_ids != list(range(image_ids[0], image_ids[-1] + 1)):
            wrong.append(f"the {len(image_ids)} image tokens are not one contiguous id range, which sampling assumes")
        vocabulary.token_id(self.end_of_turn)  # names the file's lack of it, if any
        if wrong:
            raise ValueError(f"Lumina-mGPT's layout token ids do not match {source}:\n  " + "\n  ".join(wrong))


PROMPT_TEMPLATE = "Generate an image of {width}x{height} according to the following prompt:\n{prompt}"


@dataclass
class LuminaFamily:
    """Prompts in: a conditional cache (prompt, image header) and, with guidance, an unconditional one (the image
    header alone); new-line tokens forced at line ends, image tokens only elsewhere; images out through
    the vocabulary and the Chameleon VQGAN (when its files are there)."""

    tokenizer: object
    resolution: int
    device: torch.device
    tokens: LuminaTokens = field(default_factory=LuminaTokens)
    vqgan: torch.nn.Module | None = None
    vocabulary: ImageVocabulary | None = None
    prompt_template: str = PROMPT_TEMPLATE
    bos_id: int | None = None  # None: the tokenizer's BOS (its EOS if it has none, as the official Tokenizer)
    conditioning = "text"

    def __post_init__(self) -> None:
        if self.bos_id is None and self.tokenizer is not None:
            self.bos_id = bos_id(self.tokenizer, "Lumina-mGPT")

    @property
    def side(self) -> int:
        return self.resolution // 16

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(prefix_len=0, rows=self.side, line_len=self.side + 1)

    @property
    def can_decode(self) -> bool:
        return self.vqgan is not None and self.vocabulary is not None

    def image_header(self) -> list[int]:
        size = self.tokens.size_offset + self.side // 2
        return [self.tokens.image_start, size, size]

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """Official prompt ids: `[bos] + encode(text + end_of_turn, add_special_tokens=False)`, whatever the
        tokenizer's own special-token handling would add."""
        texts = [self.prompt_template.format(width=self.resolution, height=self.resolution, prompt=prompt)
                 + self.tokens.end_of_turn for prompt in prompts]
        return [[self.bos_id, *ids] for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def prefix_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded conditional prefixes (B, P) and presence mask: BOS, turn, image header."""
        return left_pad([ids + self.image_header() for ids in self.encode(prompts)], 0, self.device)

    def branches(self, prompts: list[str], guided: bool) -> list[Branch]:
        ids, present = self.prefix_batch(prompts)
        batch, rows, line = len(prompts), self.layout.rows, self.layout.line_len
        positions = (present.cumsum(1) - 1).clamp(min=0)
        branches = [Branch(TextPrefix(ids, positions, present), batch, TokenLayout(ids.shape[1], rows, line),
                           present.sum(1))]
        if guided:  # the unconditional context starts at image-start
            header = torch.tensor(self.image_header(), device=ids.device).expand(batch, -1)
            header_positions = torch.arange(header.shape[1], device=ids.device).expand(batch, -1)
            branches.append(Branch(TextPrefix(header, header_positions), batch, TokenLayout(header.shape[1], rows,
                                                                                               line),
                                   torch.full((batch,), header.shape[1], device=ids.device)))
        return branches

    def forced(self, visual_index: int) -> int | None:
        return self.tokens.new_line if self.layout.is_line_end(visual_index) else None

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        """Only image tokens may be sampled inside a row (the official MultiModalLogitsProcessor)."""
        vocab = torch.arange(logits.shape[-1], device=logits.device)
        allowed = (vocab >= self.tokens.image_first) & (vocab <= self.tokens.image_last)
        return logits.masked_fill(~allowed, float("-inf"))

    def decode_images(self, tokens: torch.Tensor | None, size: int | None = None) -> torch.Tensor:
        """(B, rows * (side + 1)) -> (B, H, W, 3) uint8 through the vocabulary and the Chameleon VQGAN;
        `size` resizes first (bicubic on the [-1, 1] tensor)."""
        from lineareval.models.chameleon_vqgan import to_uint8

        if not self.can_decode:
            raise FileNotFoundError("decoding Lumina-mGPT images needs Meta's Chameleon tokenizer files "
                                    "(model.chameleon_dir); or run with decode_images=false")
        rows = tokens.view(len(tokens), self.side, self.side + 1)
        if not bool((rows[:, :, -1] == self.tokens.new_line).all()):
            raise ValueError("token rows do not end with the new-line token: not a Lumina image layout")
        codes = self.vocabulary.bpe_to_code(rows[:, :, :-1].reshape(len(tokens), -1).cpu())
        device = next(self.vqgan.parameters()).device
        return to_images(self.vqgan.decode_codes(codes.to(device), (self.side, self.side)), size, to_uint8)


# Meta's Chameleon image tokenizer, in model.chameleon_dir; the VQGAN weights are vqgan.safetensors (made by
# `python -m lineareval.models.convert convert-vqgan`) or Meta's vqgan.ckpt.
CHAMELEON_FILES = ("vqgan.yaml", VQGAN_WEIGHTS, "text_tokenizer.json")


def missing_chameleon_files(folder: Path) -> list[str]:
    """The Chameleon files `folder` lacks (a tuple entry is satisfied by any one of its names)."""
    wanted = [names if isinstance(names, tuple) else (names,) for names in CHAMELEON_FILES]
    return [" or ".join(names) for names in wanted if not any((folder / name).is_file() for name in names)]


def load_lumina(*, name: str, path: str, resolution: int, lm: dict, sampling: dict, weights: str, weights_dir: str,
                 device: str | torch.device, dtype: torch.dtype, chameleon_dir: str | None = None,
                 tokens: dict | None = None, download: bool = True, seed: int = 0, compile: bool = False,
                 compile_backend: str = "inductor", decode_images: bool = True,
                 prompt_template: str = PROMPT_TEMPLATE) -> Generator:
    """Load from `conf/model/lumina_mgpt_*.yaml`: `path` is a hub id or a local folder.

    With `decode_images=false` the VQGAN is neither required nor loaded; `text_tokenizer.json`, when
    present, still checks the layout token ids.
    """
    chameleon = Path(chameleon_dir or Path(weights_dir) / "chameleon" / "tokenizer").expanduser().resolve()
    missing = missing_chameleon_files(chameleon)
    if weights == "checkpoint":
        network, folder, files = _checkpoint_network(path, weights_dir, download, dtype, device,
                                                     chameleon, missing if decode_images else [])
    elif weights == "random":
        log.warning("model %s uses RANDOM weights (weights=random): speed benchmarks only", name)
        network, folder, files = _random_network(lm, dtype, device, seed), None, []
    else:
        raise ValueError(f"weights must be 'checkpoint' or 'random', got {weights!r}")
    layout_tokens = LuminaTokens(**(tokens or {}))
    vocabulary = None
    if (chameleon / "text_tokenizer.json").is_file():
        vocabulary = ImageVocabulary.from_json(chameleon / "text_tokenizer.json")
        layout_tokens.check(vocabulary, resolution // 16, chameleon / "text_tokenizer.json")
    else:
        log.warning("no %s: Lumina's layout token ids are not checked", chameleon / "text_tokenizer.json")
    vqgan = None
    if decode_images and not missing:
        vqgan = load_chameleon_vqgan(chameleon / "vqgan.yaml", find_vqgan_weights(chameleon)).to(device)
    tokenizer = load_tokenizer(folder, path, weights_dir, lm["vocab_size"])
    if is_real_tokenizer(tokenizer):
        check_round_trip(tokenizer, folder or path)
    family = LuminaFamily(tokenizer, resolution, torch.device(device), layout_tokens, vqgan, vocabulary,
                          prompt_template)
    return Generator.assemble(name, network.eval(), family, SamplingConfig(**sampling), weights, files,
                              compile=compile, backend=compile_backend)


def _checkpoint_network(path: str, weights_dir: str, download: bool, dtype: torch.dtype, device,
                        chameleon: Path, missing: list[str]) -> tuple[ChameleonLM, Path, list[str]]:
    """The LM from its folder; missing Chameleon files (when decoding) are reported with the model's in one error."""
    from lineareval.models.chameleon import load_chameleon_lm
    from lineareval.models.hub import resolve_model_folder
    from lineareval.models.weights import MissingWeightsError

    problems = []
    if missing:  # checked first and reported together with the model files, so one message lists all
        problems.append(
            f"Lumina-mGPT decodes images with Meta's Chameleon image tokenizer, which is not on the Hugging "
            f"Face hub. Missing in {chameleon}: {', '.join(missing)}.\nRequest the Chameleon release from Meta "
            "(https://ai.meta.com/resources/models-and-libraries/chameleon-downloads/) and copy its "
            "tokenizer/ folder there, or set model.chameleon_dir=PATH (or run with decode_images=false).")
    try:
        folder = resolve_model_folder(path, weights_dir, download=download and not missing,
                                      required=("config.json", "*.safetensors", "tokenizer*.json"))
    except MissingWeightsError as error:
        problems.append(str(error))
    if problems:
        raise MissingWeightsError("\n".join(problems))
    network = load_chameleon_lm(folder, dtype=dtype, device=device)
    return network, folder, [str(file) for file in sorted(folder.glob("*.safetensors"))]


def _random_network(lm: dict, dtype: torch.dtype, device, seed: int) -> ChameleonLM:
    from lineareval.models.chameleon import ChameleonLMConfig
    from lineareval.models.init import initialise_random

    with torch.device("meta"):
        network = ChameleonLM(ChameleonLMConfig(**lm))
    network = network.to(dtype).to_empty(device=device)
    initialise_random([network], seed, device)  # 1-D parameters: RMSNorm gains 1, biases 0
    return network
