"""R-KV: redundancy-aware KV-cache compression, the fourth baseline of the LineAR paper.

Cai et al. 2025, "R-KV: Redundancy-aware KV Cache Compression",
https://arxiv.org/abs/2505.24133 (reference code: github Zefan-Cai/R-KV, `rkv/compression/r1_kv.py`).
At each scoring point, per layer, head and sequence:

- importance: the attention the last `window` queries gave each earlier token (softmax over the keys
  before the window, mean over the window's queries), max-pooled over `kernel_size` neighbouring
  positions;
- redundancy: the cosine similarity between keys, averaged over the cached tokens, with each
  token's most recent near-duplicate (similarity above `threshold`) not counted against it, then a
  softmax over the cache (older copies of a repeated pattern score as redundant, the newest does not);
- score = mix_lambda * importance - (1 - mix_lambda) * redundancy; the last `window` tokens are kept, and
  the engine keeps the top B - window of the rest, so the cache returns to B.

Defaults are the reference code's (`R1KV.__init__`): window 8, kernel 7, mix_lambda 0.07 (its README and
paper quote 0.1: `cache.mix_lambda=0.1`), cosine threshold 0.5, the most recent near-duplicate retained
(`retain_direction="last"`; its `retain_ratio` only acts for the `*_percent` directions, not ported).
Where we differ from the reference, and why:

- it computes redundancy from batch element 0 for every sequence (its code serves batch 1); here every
  sequence and head scores its own keys (the conditional and unconditional CFG rows choose apart);
- it evicts every 128 decoded tokens (`divide_length`) or at newline tokens; here at line ends by
  default (an image's newline), with `interval: k` for its fixed interval;
- it pools and finds "the most recent" duplicate in cache order, which its top-k gather scrambles after
  the first compression; here both go by original position (neighbours in raster order);
- a token with no near-duplicate zeroes nothing (the reference's `torch.where(..., 0)` then zeroes the
  similarity to cache slot 0, an artefact);
- the condition prefix is never evicted and not counted in B (the project's rule; the reference
  compresses the prompt too), but its keys take part in the softmaxes as the reference's prompt does.

Cost at a scoring point: the window's attention (S, H, window, W) and the keys' similarity (S, H, W, W)
in fp32, W = P + B + one period of slots: the similarity is the larger, e.g. 512 sequences x 20 heads x
121^2 slots = 0.6 GB transient per layer for LlamaGen-XL at keep 1/6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lineareval.cache.policy import CachePolicy, CacheView, EvictAt, EvictionContext, TokenLayout, protect
from lineareval.cache.signals import WindowQueries


@dataclass
class RKV(CachePolicy):
    """The last `window` tokens + the top B - window by mix_lambda * importance - (1 - mix_lambda) * redundancy."""

    window: int = 8
    kernel_size: int = 7
    mix_lambda: float = 0.07
    threshold: float = 0.5
    interval: int | None = None  # None: evict at line ends; k: every k visual tokens (the reference: 128)

    def __post_init__(self) -> None:
        if self.window < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"rkv window must be >= 1 and kernel_size odd and >= 1, got {self.window}, "
                             f"{self.kernel_size}")
        if not 0 <= self.mix_lambda <= 1 or not -1 <= self.threshold <= 1:
            raise ValueError(f"rkv mix_lambda must be in [0, 1] and threshold in [-1, 1], got {self.mix_lambda}, "
                             f"{self.threshold}")
        if self.interval is not None and (not isinstance(self.interval, int) or self.interval < 1):
            raise ValueError(f"rkv interval must be null (line ends) or a token count >= 1, got {self.interval!r}")

    @property
    def evicts_at(self) -> EvictAt:
        return EvictAt.LINE_END if self.interval is None else EvictAt.INTERVAL

    def eviction_period(self, layout: TokenLayout) -> int:
        return layout.line_len if self.interval is None else self.interval

    def minimum_budget(self, layout: TokenLayout) -> int:
        return self.window + 1  # the window plus at least one selected token (the reference asserts it)

    def signals(self) -> dict:
        return {"window": WindowQueries(self.window)}

    def score(self, view: CacheView, context: EvictionContext) -> torch.Tensor:
        first_window = context.position(context.visual_index + 1 - self.window)  # int, or (S, 1, 1)
        attended = view.valid & (view.positions < first_window)  # what the window's queries attended to
        importance = pool_by_position(view.window_attention(), view.positions, attended, self.kernel_size,
                                      context.layout.prefix_len + context.layout.num_visual)
        redundancy = key_redundancy(view.keys, view.valid, view.positions, self.threshold)
        scores = self.mix_lambda * importance - (1 - self.mix_lambda) * redundancy
        return protect(scores, view.positions >= first_window)


def pool_by_position(scores: torch.Tensor, positions: torch.Tensor, present: torch.Tensor, kernel_size: int,
                     length: int) -> torch.Tensor:
    """Max of `scores` over the `present` slots within kernel_size // 2 positions of each slot (itself included).

    scores, positions, present: (S, H, W); positions index a sequence of `length`. Slots not present neither
    give nor (meaningfully) receive a value. -> (S, H, W)
    """
    sequences, heads, width = scores.shape
    dense = scores.new_full((sequences, heads, length + 1), float("-inf"))  # by position; index `length`: a sink
    index = torch.where(present, positions, length)
    dense.scatter_(2, index, scores.float())
    pooled = F.max_pool1d(dense[..., :length].reshape(sequences * heads, 1, length), kernel_size, stride=1,
                          padding=kernel_size // 2).view(sequences, heads, length)
    return pooled.gather(2, positions.clamp(0, length - 1))


def key_redundancy(keys: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, threshold: float) -> torch.Tensor:
    """R-KV's redundancy of each cached token: softmax over the cache of its mean cosine similarity to the others.

    keys (S, H, W, D), valid and positions (S, H, W) -> (S, H, W), 0 at free slots. For each token i, the
    similarity to its most recent (largest position) near-duplicate j (cos > threshold, j != i) is not
    counted, so the newest copy of a repeated pattern looks less redundant than older ones.
    """
    unit = keys.float()
    unit = unit / (unit.norm(dim=-1, keepdim=True) + 1e-8)
    similarity = unit @ unit.transpose(-1, -2)  # (S, H, W, W): row i, column j
    width = similarity.shape[-1]
    pair = valid[..., :, None] & valid[..., None, :] & ~torch.eye(width, dtype=torch.bool, device=keys.device)
    similarity.masked_fill_(~pair, 0.0)
    duplicate = pair & (similarity > threshold)
    newest = torch.where(duplicate, positions[..., None, :], -1).argmax(dim=-1, keepdim=True)  # (S, H, W, 1)
    has_duplicate = duplicate.any(dim=-1, keepdim=True)
    similarity.scatter_(-1, newest, torch.where(has_duplicate, 0.0, similarity.gather(-1, newest)))
    mean = similarity.sum(dim=-2) / valid.sum(dim=-1, keepdim=True).clamp(min=1)  # over the cached tokens i
    return torch.softmax(mean.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num_(0.0)
