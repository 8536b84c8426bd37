"""SSD: spatial-locality heads keep a recent window, semantic-sink heads keep their most attended tokens.

SSD, https://arxiv.org/abs/2510.18716 (evaluated on Janus-Pro; the paper was not available offline, so this
follows its published summary): heads split into spatial-locality heads, which attend
to their neighbourhood and keep a short recent window, and semantic-sink heads, which keep a compact set
of highly attended tokens, notably in the margin columns of the raster grid.

Here, per layer, head and sequence, at every line end:

- head types (lineareval/cache/heads.py): a head whose queries in the first `classify_lines` lines give
  at least `threshold` of their attention to their causal 2D neighbourhood (`radius` rows above,
  `radius` columns either side) is a locality head; every other head is a sink head; fixed afterwards;
- locality heads keep their most recent tokens;
- sink heads keep their highest accumulated attention (what every line's queries gave each token, summed,
  as H2O's heavy hitters but added at line ends), a token in the first or last `margin_columns` columns of
  its line counting `margin_boost` times; with `sink_recent` = r > 0 they first keep their r most recent
  visual tokens (those up to the scoring token), then the top B - r of the rest by that attention (r >= B:
  a sink head keeps what a locality head keeps). r = 0 (the default) is the paper's summary as we read it:
  sink heads keep no recent window.

Both kinds keep the same per-head budget `B` (the paper's fixed budget; SSD's head-specific budgets are
not ported). Scores are each head's priority ranks, so under `budget_allocation=adaptive_heads` every
head still keeps `B` (the ranks of different heads compare as equals): SSD is a uniform-budget policy.
Choices the paper's description leaves open, all YAML fields, defaults ours: eviction at line ends (the
line's attention is the only explicit attention computed, as LineAR's), classification over the first
two lines (the second is the first whose queries have a row above them), a neighbourhood of radius 1,
threshold 0.5, one margin column on each side counting twice, no recent window in sink heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lineareval.cache.heads import HeadTypes, candidates, classify, priority_ranks
from lineareval.cache.policy import CachePolicy, CacheView, EvictAt, EvictionContext
from lineareval.cache.signals import AccumulatedAttention, LineQueries


@dataclass
class SSD(CachePolicy):
    """Locality heads: the most recent B tokens; sink heads: the top B by (margin-boosted) accumulated attention,
    after their `sink_recent` most recent tokens when that is > 0."""

    evicts_at = EvictAt.LINE_END
    classify_lines: int = 2
    radius: int = 1
    threshold: float = 0.5
    margin_columns: int = 1
    margin_boost: float = 2.0
    sink_recent: int = 0  # the most recent visual tokens sink heads keep before their heavy hitters (0: none)

    def __post_init__(self) -> None:
        if self.classify_lines < 1 or self.radius < 0 or self.margin_columns < 0 or self.sink_recent < 0:
            raise ValueError(f"ssd classify_lines must be >= 1, radius, margin_columns and sink_recent >= 0, got "
                             f"{self.classify_lines}, {self.radius}, {self.margin_columns}, {self.sink_recent}")
        if not 0 <= self.threshold <= 1 or self.margin_boost <= 0:
            raise ValueError(f"ssd threshold must be in [0, 1] and margin_boost > 0, got {self.threshold}, "
                             f"{self.margin_boost}")

    def signals(self) -> dict:
        return {"line": LineQueries(), "received": AccumulatedAttention(every_step=False), "types": HeadTypes()}

    def observe(self, view: CacheView, context: EvictionContext) -> None:
        classify(view, context, self.classify_lines, self.radius)
        line = view.line_probabilities().sum(dim=2)  # (S, H, W)
        view.signal("received").add(line if context.rows is None else line * context.rows[:, None, None])

    def locality_heads(self, view: CacheView) -> torch.Tensor:
        """(S, H) True for the spatial-locality heads."""
        return view.signal("types").locality() >= self.threshold

    def score(self, view: CacheView, context: EvictionContext) -> torch.Tensor:
        layout = context.layout
        column = (view.positions - layout.prefix_len).remainder(layout.line_len)
        margin = (column < self.margin_columns) | (column >= layout.line_len - self.margin_columns)
        sink = view.received() * torch.where(margin, self.margin_boost, 1.0)
        value = torch.where(self.locality_heads(view)[..., None], view.positions.float(), sink)
        keys = [candidates(view, context), value]
        if self.sink_recent > 0:  # the newest r first in every head (locality heads rank them first anyway)
            newest = context.position(context.visual_index)
            keys.insert(1, view.positions > newest - self.sink_recent)
        return -priority_ranks(keys, view.positions).float()
