"""One batch being decoded, as a decoding method sees it (lineareval/decoding/method.py).

The session owns the batch's branches and caches (one per CFG branch when unbatched), the next-token
logits, the keyed randomness (seed, sample ids) and the tokens so far (B, N); a method drives it only
through the methods below. Every branch is fed the same tokens at each sequence's own RoPE position
and commits together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from lineareval.cache import EvictAt, KVCache
from lineareval.sampling import target_probabilities

if TYPE_CHECKING:
    from lineareval.decoding.decoder import Branch, Decoder, StepObserver, StepTimer


class DecodeSession:
    """What a decoding method may use. B images, N visual tokens, V the vocabulary."""

    def __init__(self, decoder: Decoder, branches: list[Branch], caches: list[KVCache], logits: list[torch.Tensor],
                 sample_ids: torch.Tensor, seed: int, observer: StepObserver | None, timer: StepTimer | None):
        self._decoder, self._branches, self._caches, self._logits = decoder, branches, caches, logits
        self._observer, self._timer = observer, timer
        self.sample_ids, self.seed = sample_ids, seed
        layout = decoder.family.layout
        self.num_visual, self.line_len = layout.num_visual, layout.line_len
        self.vocab = logits[0].shape[-1]
        self.batch = len(sample_ids)
        self.device = sample_ids.device
        self.tokens = torch.empty(self.batch, self.num_visual, dtype=torch.long, device=self.device)

    # ---- the layout ----------------------------------------------------------------------------

    def forced(self, visual_index: int) -> int | None:
        """The token the layout forces at `visual_index` (never sampled; e.g. Lumina's new-line), or None."""
        return self._decoder.family.forced(visual_index)

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens the layout allows (e.g. Lumina-mGPT's image tokens)."""
        return torch.isfinite(self._decoder.family.constrain(torch.zeros(1, self.vocab, device=self.device)))[0]

    # ---- one token at a time -------------------------------------------------------------------

    def sample(self, visual_index: int) -> torch.Tensor:
        """Visual token `visual_index` of every image (B,), drawn from the current next-token logits (guided,
        constrained, keyed by (seed, sample id, index)), or the forced token."""
        forced = self.forced(visual_index)
        if forced is not None:
            return torch.full((self.batch,), forced, dtype=torch.long, device=self.device)
        return self._decoder.sample(self._guided(visual_index), self.seed, self.sample_ids, visual_index)

    def _guided(self, visual_index: int) -> torch.Tensor:
        """The current next-token logits (B, V), guided as `cfg_interval` says at `visual_index` and constrained."""
        decoder = self._decoder
        return decoder.family.constrain(decoder.guide(torch.cat(self._logits), visual_index))

    def distribution(self, visual_index: int) -> torch.Tensor:
        """The distribution `sample(visual_index)` draws from (B, V) float32: guided, constrained, tempered and
        filtered (a point mass where the layout forces the token)."""
        forced = self.forced(visual_index)
        if forced is not None:
            return torch.nn.functional.one_hot(torch.full((self.batch,), forced, device=self.device),
                                               self.vocab).float()
        return target_probabilities(self._guided(visual_index), self._decoder.sampling)

    def feed(self, tokens: torch.Tensor, visual_index: int) -> None:
        """Feed visual token `visual_index` of every image (B,) to every branch (and evict as the policy says)."""
        stepper = self._decoder.stepper
        self._logits = [stepper.decode(tokens.repeat(branch.rows // self.batch), visual_index, cache,
                                       branch.offsets + visual_index)
                        for branch, cache in zip(self._branches, self._caches)]

    def stepped(self, visual_index: int) -> None:
        """After each decode step (or iteration): the observer and the timer."""
        if self._observer is not None:
            self._observer(visual_index, self._caches[0])
        if self._timer is not None:
            self._timer.step()

    # ---- chunks --------------------------------------------------------------------------------

    def distributions(self, chunk: torch.Tensor, positions: torch.Tensor, starts: np.ndarray) -> torch.Tensor:
        """Feed each image's chunk (B, k) of visual tokens at `positions` (B, k) to every branch (image b's
        sequences start at visual token starts[b], their next uncommitted one); the target distribution of each
        next token (B, k, V): guided (per position, as `cfg_interval` says), constrained, tempered and filtered;
        a point mass where the layout forces the token. `commit` then keeps a prefix of each chunk."""
        decoder, batch = self._decoder, len(chunk)
        first = torch.from_numpy(np.minimum(starts, self.num_visual - 1)).to(chunk.device)
        logits = []
        for branch, cache in zip(self._branches, self._caches):
            repeat = branch.rows // batch
            logits.append(decoder.stepper.decode_chunk(chunk.repeat(repeat, 1), first.repeat(repeat), cache,
                                                       branch.offsets[:, None] + positions.repeat(repeat, 1)))
        logits = torch.cat(logits)  # (S, k, V): [conditional; unconditional] rows with guidance
        following = positions + 1
        sampling = decoder.sampling
        if sampling.guided:
            cond, uncond = logits.chunk(2)
            guidance = torch.tensor([[sampling.guidance_at(int(index)) for index in row]
                                     for row in following.tolist()], device=logits.device)
            logits = torch.where(guidance[..., None], uncond + (cond - uncond) * sampling.cfg_scale, cond)
        p = target_probabilities(decoder.family.constrain(logits.reshape(-1, self.vocab)).view(logits.shape), sampling)
        for index in following.unique().tolist():
            forced = self.forced(int(index))
            if forced is not None:
                where = following == index
                p[where] = torch.nn.functional.one_hot(torch.tensor(forced), self.vocab).float().to(p.device)
        return p

    def commit(self, counts: np.ndarray) -> None:
        """Keep counts[b] tokens of image b's chunk in every branch (its rows commit together)."""
        for branch, cache in zip(self._branches, self._caches):
            cache.commit(np.tile(counts, branch.rows // len(counts)))

    def next_eviction(self, visual_index: int, exact: bool) -> int:
        """The first visual index at or after `visual_index` whose commit evicts (all caches share policy and
        budget), N if none; with `exact=False` per-step policies' steps do not count (they evict at commit)."""
        cache = self._caches[0]
        if not exact and cache.policy.evicts_at is EvictAt.STEP:
            return self.num_visual
        index = cache.next_eviction(visual_index)
        return self.num_visual if index is None else index
