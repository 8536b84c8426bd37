"""What every model adapter returns, and the observer hook the tests use."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lineareval.cache import KVCache

log = logging.getLogger(__name__)

StepObserver = Callable[[int, KVCache], None]


@dataclass
class Generation:
    """Sampled visual tokens (B, N) and the caches that produced them (one per CFG branch if unbatched)."""

    tokens: torch.Tensor
    caches: list[KVCache]

    def capacity_bytes(self) -> int:
        return sum(cache.capacity_bytes() for cache in self.caches)

    def high_water_bytes(self) -> int:
        return sum(cache.high_water_bytes() for cache in self.caches)


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

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict:
        return {"input_ids": [[1] + [2 + zlib.crc32(word.encode()) % (self.vocab_size - 2) for word in text.split()]
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
