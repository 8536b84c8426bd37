"""The decoding loop, once for every model family: prefix, guidance, constraints, sampling, cache steps.

A model family is data and a few hooks (`Family`): how conditions become the prefixes of one or two
caches (`Branch`: LlamaGen and Janus-Pro batch the conditional and unconditional CFG rows in one cache,
Lumina-mGPT runs the unconditional context in a second cache), which tokens are forced (Lumina's
new-line at each line end) and which are allowed (Lumina's image tokens), and how tokens become
images. The loop samples visual token i of every image from the guided logits, feeds it to every
branch at each sequence's own RoPE position and lets the cache policy evict; it is the same for all
families, so guidance and its interval, timing and observation are written once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Protocol

import torch

from lineareval.cache import CachePolicy, KVCache, TokenLayout
from lineareval.decoding.method import DecodingMethod, Sequential
from lineareval.decoding.session import DecodeSession
from lineareval.decoding.stepper import Stepper
from lineareval.sampling import SamplingConfig, draw_tokens, stream_keys

StepObserver = Callable[[int, KVCache], None]


@dataclass
class Branch:
    """One cache's sequences: what the model's `prefill` takes, how many rows, the cache layout, and each
    row's RoPE position of visual token 0 (`offsets`, (rows,))."""

    prefix: object
    rows: int
    layout: TokenLayout
    offsets: torch.Tensor


class Family(Protocol):
    """What differs between model families, as data and small hooks."""

    conditioning: str  # "class" or "text"

    @property
    def layout(self) -> TokenLayout:
        """The visual layout (its prefix length is the family's, or 0 when it varies with the prompts)."""

    def branches(self, conditions, guided: bool) -> list[Branch]:
        """The caches of one batch; with guidance their rows are [conditional; unconditional] in order."""

    def forced(self, visual_index: int) -> int | None:
        """A token the layout forces at `visual_index` (never sampled), or None."""

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        """Mask tokens the layout forbids (B, V)."""


class DefaultHooks:
    """The hooks of a family whose layout forces and forbids nothing (LlamaGen, Janus-Pro); others override."""

    def forced(self, visual_index: int) -> int | None:
        return None

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


@dataclass
class Generation:
    """Sampled visual tokens (B, N), the caches that produced them (one per CFG branch if unbatched), the decoding
    method that ran (`describe()`: its name and settings) and its statistics (forward passes, tokens per pass)."""

    tokens: torch.Tensor
    caches: list[KVCache]
    method: dict
    stats: dict = field(default_factory=dict)

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

    The decoder calls `begin()` once the prefix is in the cache and `step()` after each decode step;
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


class Decoder:
    """Decoding of any `CachedModel` under any cache policy and any decoding method, for any `Family`."""

    def __init__(self, model: torch.nn.Module, family: Family, sampling: SamplingConfig, *, compile: bool = False,
                 backend: str = "inductor"):
        self.model, self.family, self.sampling = model, family, sampling
        self.stepper = Stepper(model)
        if compile:
            self.stepper.compile(next(model.parameters()).device, backend)
        self.sample = Sampler(sampling, compile=compile, backend=backend)

    @property
    def compiled(self) -> bool:
        return self.stepper.compiled

    def guide(self, logits: torch.Tensor, visual_index: int) -> torch.Tensor:
        """(S, V) -> (B, V): classifier-free guidance on [cond; uncond] rows, as every official sampler, while
        `cfg_interval` keeps it on."""
        if not self.sampling.guided:
            return logits
        cond, uncond = logits.chunk(2)
        if not self.sampling.guidance_at(visual_index):
            return cond
        return uncond + (cond - uncond) * self.sampling.cfg_scale

    @torch.inference_mode()
    def generate(self, conditions, sample_ids: torch.Tensor, policy: CachePolicy, budget: int, seed: int,
                 method: DecodingMethod, observer: StepObserver | None = None,
                 timer: StepTimer | None = None) -> Generation:
        """Sample the N visual tokens of each image with `method` (`conf/decoding/`). conditions: class labels (B,)
        or B prompts; sample_ids (B,) the randomness keys -> tokens (B, N) int64, with what ran and its statistics.

        `observer(visual_index, cache)` runs after each decode step (iteration) with the first cache (tests
        record its contents); `timer` records the wall time of each.
        """
        if not isinstance(method, DecodingMethod):
            raise TypeError(f"method must be a DecodingMethod (conf/decoding/), got {type(method).__name__}")
        branches = self.family.branches(conditions, self.sampling.guided)
        caches = [self.stepper.new_cache(policy, budget, branch.rows, branch.layout, max_chunk=method.max_chunk)
                  for branch in branches]
        logits = [self.stepper.prefill(branch.prefix, cache) for branch, cache in zip(branches, caches)]
        session = DecodeSession(self, branches, caches, logits, sample_ids, seed, observer, timer)
        if timer is not None:
            timer.begin()
        stats = method.run(session)
        for cache in caches:
            cache.verify()  # a policy whose scores broke the engine's contract stops the run, named
        return Generation(session.tokens, caches, method.describe(), {"decoding": method.name, **stats})


__all__ = ["Branch", "Decoder", "DefaultHooks", "DecodingMethod", "Family", "Generation", "Sampler", "Sequential", "StepTimer"]
