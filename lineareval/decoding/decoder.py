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

import numpy as np
import torch

from lineareval.cache import CachePolicy, EvictAt, KVCache, TokenLayout
from lineareval.decoding.stepper import Stepper
from lineareval.sampling import SamplingConfig, draw_tokens, stream_keys, target_probabilities

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


@dataclass
class Generation:
    """Sampled visual tokens (B, N), the caches that produced them (one per CFG branch if unbatched), and the
    decoding method's statistics (forward passes per image, tokens per pass)."""

    tokens: torch.Tensor
    caches: list[KVCache]
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


class DecodeRun:
    """One batch being decoded: its branches and caches, the tokens so far (B, N), its keys and statistics.
    A decoding method (`Sequential`, `Speculative`) fills `tokens` through it."""

    def __init__(self, decoder: Decoder, branches: list[Branch], caches: list[KVCache], logits: list[torch.Tensor],
                 sample_ids: torch.Tensor, seed: int, observer: StepObserver | None, timer: StepTimer | None):
        self.branches, self.caches, self.logits = branches, caches, logits
        self.sample_ids, self.seed, self.observer, self.timer = sample_ids, seed, observer, timer
        layout = decoder.family.layout
        self.num_visual, self.line_len = layout.num_visual, layout.line_len
        self.vocab = logits[0].shape[-1]
        self.tokens = torch.empty(len(sample_ids), self.num_visual, dtype=torch.long, device=sample_ids.device)
        self.stats: dict = {}
        self.family = decoder.family

    def forced_column(self, visual_index: int) -> torch.Tensor:
        forced = self.family.forced(visual_index)
        return torch.full((len(self.sample_ids),), forced, dtype=torch.long, device=self.sample_ids.device)

    def stepped(self, visual_index: int) -> None:
        """After each decode step (or iteration): the observer and the timer."""
        if self.observer is not None:
            self.observer(visual_index, self.caches[0])
        if self.timer is not None:
            self.timer.step()

    def probabilities(self, decoder: Decoder, chunk: torch.Tensor, positions: torch.Tensor,
                      starts: np.ndarray) -> torch.Tensor:
        """Feed each image's chunk (B, k) of visual tokens at `positions` (B, k) to every branch (sequence s
        of a branch starts at starts[image]); the target distribution of each next token (B, k, V): guided
        (per position, as `cfg_interval` says), constrained, tempered and filtered; a point mass where the
        layout forces the token."""
        batch = len(chunk)
        first = torch.from_numpy(np.minimum(starts, self.num_visual - 1)).to(chunk.device)
        logits = []
        for branch, cache in zip(self.branches, self.caches):
            repeat = branch.rows // batch
            logits.append(decoder.stepper.decode_chunk(chunk.repeat(repeat, 1), first.repeat(repeat), cache,
                                                       branch.offsets[:, None] + positions.repeat(repeat, 1)))
        logits = torch.cat(logits)  # (S, k, V): [conditional; unconditional] rows with guidance
        following = positions + 1
        if decoder.sampling.guided:
            cond, uncond = logits.chunk(2)
            guidance = torch.tensor([[decoder.sampling.guidance_at(int(index)) for index in row]
                                     for row in following.tolist()], device=logits.device)
            logits = torch.where(guidance[..., None], uncond + (cond - uncond) * decoder.sampling.cfg_scale, cond)
        p = target_probabilities(decoder.family.constrain(logits.reshape(-1, self.vocab)).view(logits.shape),
                                 decoder.sampling)
        for index in following.unique().tolist():
            forced = self.family.forced(int(index))
            if forced is not None:
                where = following == index
                p[where] = torch.nn.functional.one_hot(torch.tensor(forced), self.vocab).float().to(p.device)
        return p

    def commit(self, counts: np.ndarray) -> None:
        """Keep counts[image] tokens of each image's chunk in every branch (its rows commit together)."""
        for branch, cache in zip(self.branches, self.caches):
            cache.commit(np.tile(counts, branch.rows // len(counts)))

    def next_eviction(self, visual_index: int, exact: bool) -> int:
        """The first visual index at or after `visual_index` whose commit evicts (all caches share policy and
        budget); with `exact=False` per-step policies' steps do not count (they evict at commit)."""
        cache = self.caches[0]
        if not exact and cache.policy.evicts_at is EvictAt.STEP:
            return self.num_visual
        index = cache.next_eviction(visual_index)
        return self.num_visual if index is None else index


@dataclass
class Sequential:
    """`decoding=sequential`: one token per step (the default and the reference)."""

    name: str = "sequential"
    max_chunk = 1
    distribution_preserving = True

    def describe(self) -> dict:
        return {"name": self.name}

    def run(self, decoder: Decoder, run: DecodeRun) -> None:
        batch = len(run.sample_ids)
        logits = run.logits
        for index in range(run.num_visual):
            forced = decoder.family.forced(index)
            if forced is None:
                guided = decoder.family.constrain(decoder.guide(torch.cat(logits), index))
                token = decoder.sample(guided, run.seed, run.sample_ids, index)
            else:
                token = run.forced_column(index)
            run.tokens[:, index] = token
            if index == run.num_visual - 1:
                break
            logits = [decoder.stepper.decode(token.repeat(branch.rows // batch), index, cache, branch.offsets + index)
                      for branch, cache in zip(run.branches, run.caches)]
            run.stepped(index)
        run.stats.update({"decode_passes_per_image": float(run.num_visual - 1), "tokens_per_pass": 1.0,
                          "decode_passes_batch": run.num_visual - 1})


class Decoder:
    """Sequential decoding of any `CachedModel` under any cache policy, for any `Family`."""

    def __init__(self, model: torch.nn.Module, family: Family, sampling: SamplingConfig, *, compile: bool = False,
                 backend: str = "inductor", method=None):
        self.model, self.family, self.sampling = model, family, sampling
        self.method = method or Sequential()  # decoding=... (lineareval/decoding/speculative.py for the others)
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
                 observer: StepObserver | None = None, timer: StepTimer | None = None, method=None) -> Generation:
        """Sample the N visual tokens of each image. conditions: class labels (B,) or B prompts; sample_ids (B,)
        the randomness keys -> tokens (B, N) int64, with the decoding method's statistics.

        `observer(visual_index, cache)` runs after each decode step (iteration) with the first cache (tests
        record its contents); `timer` records the wall time of each; `method` overrides the decoding method.
        """
        method = method or self.method
        branches = self.family.branches(conditions, self.sampling.guided)
        caches = [self.stepper.new_cache(policy, budget, branch.rows, branch.layout, max_chunk=method.max_chunk)
                  for branch in branches]
        logits = [self.stepper.prefill(branch.prefix, cache) for branch, cache in zip(branches, caches)]
        run = DecodeRun(self, branches, caches, logits, sample_ids, seed, observer, timer)
        if timer is not None:
            timer.begin()
        method.run(self, run)
        return Generation(run.tokens, caches, {"decoding": method.name, **run.stats})
