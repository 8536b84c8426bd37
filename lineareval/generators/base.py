"""A model family ready to generate (`Generator`, what `conf/model/*.yaml` builds) and shared text helpers."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lineareval.cache import CachePolicy, TokenLayout
from lineareval.decoding.decoder import Decoder, Family, Generation, StepObserver, StepTimer
from lineareval.decoding.method import DecodingMethod
from lineareval.sampling import SamplingConfig

log = logging.getLogger(__name__)


@dataclass
class Generator:
    """A network, its family's hooks and the decoder that drives them, plus where its weights came from.

    `generate` samples tokens under any cache policy (the decoder's loop); `decode_images` turns
    them into uint8 images (the family's tokenizer or VQ decoder).
    """

    name: str
    model: torch.nn.Module  # the cached model the decoder steps (lineareval/decoding/stepper.py: CachedModel)
    family: Family
    decoder: Decoder
    weights: str  # checkpoint | random
    weight_files: list[str] = field(default_factory=list)

    @classmethod
    def assemble(cls, name: str, model: torch.nn.Module, family: Family, sampling: SamplingConfig, weights: str,
                 weight_files: list[str] = (), *, compile: bool = False, backend: str = "inductor") -> Generator:
        """A generator for a built network and its family, decoding under `sampling`, compiled if asked. The
        decoding method is chosen per call of `generate`, not here."""
        decoder = Decoder(model, family, sampling, compile=compile, backend=backend)
        return cls(name, model, family, decoder, weights, list(weight_files))

    @property
    def conditioning(self) -> str:
        return self.family.conditioning

    @property
    def layout(self) -> TokenLayout:
        return self.family.layout

    @property
    def num_classes(self) -> int:
        return self.family.num_classes

    @property
    def compiled(self) -> bool:
        return self.decoder.compiled

    @property
    def can_decode(self) -> bool:
        return getattr(self.family, "can_decode", True)

    def sequences(self, batch: int) -> int:
        """Sequences in the caches for `batch` images: with guidance a conditional and an unconditional each."""
        return 2 * batch if self.decoder.sampling.guided else batch

    def generate(self, conditions, sample_ids: torch.Tensor, policy: CachePolicy, budget: int, seed: int,
                 method: DecodingMethod, observer: StepObserver | None = None,
                 timer: StepTimer | None = None) -> Generation:
        """Tokens (B, N) for class labels (B,) or B prompts with decoding `method`; see `Decoder.generate`."""
        return self.decoder.generate(conditions, sample_ids, policy, budget, seed, method, observer, timer)

    @torch.inference_mode()
    def decode_images(self, tokens: torch.Tensor | None, size: int | None = None) -> torch.Tensor:
        """(B, N) tokens -> (B, H, W, 3) uint8 images; `size` resizes first (bicubic on [-1, 1])."""
        return self.family.decode_images(tokens, size)


def to_images(pixels: torch.Tensor, size: int | None, to_uint8) -> torch.Tensor:
    """Decoded pixels (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 by the family's `to_uint8` (each official
    code rounds its own way); `size` resizes first, bicubic on the [-1, 1] tensor (LlamaGen's FID sampler)."""
    if size is not None and pixels.shape[-1] != size:
        pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bicubic")
    return to_uint8(pixels)


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> left-padded ids (S, P) and the mask of real tokens (S, P)."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    present = torch.zeros(len(rows), length, dtype=torch.bool)
    for index, row in enumerate(rows):
        ids[index, length - len(row):] = torch.tensor(row)
        present[index, length - len(row):] = True
    return ids.to(device), present.to(device)


class WordHashTokenizer:
    """Stand-in tokenizer for `weights=random` speed runs without tokenizer files: word -> crc32 id.

    Only the prompt lengths matter for speed; the record says the weights were random.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict:
        bos = [self.bos_token_id] if add_special_tokens else []
        return {"input_ids": [bos + [2 + zlib.crc32(word.encode()) % (self.vocab_size - 2) for word in text.split()]
                              for text in texts]}


def load_tokenizer(folder: Path | None, path: str, weights_dir: str, vocab_size: int):
    """The model's tokenizer from its folder; without one (random-weight runs only) a WordHashTokenizer."""
    from transformers import AutoTokenizer

    candidates = [folder] if folder else [Path(path).expanduser(), Path(weights_dir).expanduser() / path.split("/")[-1]]
    for candidate in candidates:
        if candidate is not None and any(candidate.glob("tokenizer*.json")):
            return AutoTokenizer.from_pretrained(candidate)
    log.warning("no tokenizer files for %s: prompts are hashed word by word (random-weight speed runs only)", path)
    return WordHashTokenizer(vocab_size)
