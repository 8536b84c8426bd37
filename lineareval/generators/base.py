"""What every model adapter returns, the observer hook the tests use and the per-step timer."""

from __future__ import annotations

import logging
import time
import zlib
from itertools import pairwise
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lineareval.cache import KVCache
from lineareval.sampling import SamplingConfig, draw_tokens, stream_keys

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


class Sampler:
    """`sample_tokens` under the run's sampling config, compiled with the decode step when asked.

    Compiling matters on a CPU: the counter-hash Gumbel noise is about twenty elementwise integer
    operations over (B, V), which inductor fuses into one loop; the draws are identical. The
    (seed, token index) keys are hashed in Python first, so the compiled part is one graph that
    takes the step's key as a number (dynamic after the second step: no recompile per token).
    """

    def __init__(self, config: SamplingConfig, compile: bool = False, backend: str = "inductor"):
        self.config = config
        self.function = torch.compile(draw_tokens, backend=backend, fullgraph=True) if compile else draw_tokens

    def __call__(self, logits: torch.Tensor, seed: int, sample_ids: torch.Tensor, token_index: int) -> torch.Tensor:
        """logits (B, V) -> tokens (B,)."""
        return self.function(logits, self.config, sample_ids, *stream_keys(seed, token_index))


class StepTimer:
    """Wall time of every decode step, without slowing the loop down.

    The adapter calls `begin()` once the prefix is in the cache and `step()` after each decode step;
    step i is then the time to sample visual token i and feed it through the model (and evict).
    On CPU each call stores one `perf_counter` in a preallocated list; on GPU it records one
    preallocated CUDA event, and `seconds()` synchronises once, after the generation.
    """

    def __init__(self, steps: int, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list = ([torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if self.cuda
                            else [0.0] * (steps + 1))
        self.count = 0

    def begin(self) -> None:
        self.count = 0
        self.step()

    def step(self) -> None:
        if self.cuda:
            self.marks[self.count].record()
        else:
            self.marks[self.count] = time.perf_counter()
        self.count += 1

    def seconds(self) -> list[float]:
        """Seconds of each step recorded so far (one fewer than the marks)."""
        marks = self.marks[: self.count]
        if self.cuda:
            marks[-1].synchronize()
            return [start.elapsed_time(end) / 1e3 for start, end in pairwise(marks)]
        return [end - start for start, end in pairwise(marks)]


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
