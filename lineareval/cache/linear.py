"""LineAR: line-level KV-cache eviction scored by inter-line attention.

"Autoregressive Image Generation Needs Only a Few Lines of Cached Tokens", arXiv 2512.04857.
The cache is viewed as lines of the 2D token grid. The prefix, the anchor tokens and the most recent
line(s) are always kept; at every line end, once the visual cache exceeds `B`, the middle-region
tokens that the just-finished line attended to least are evicted, so the cache returns to `B`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lineareval.cache.policy import CachePolicy, CacheView, EvictAt, EvictionContext, TokenLayout, protect
from lineareval.cache.signals import AccumulatedAttention, LineQueries

SCORE_SOURCES = ("line", "last_token", "cumulative")


@dataclass
class LineAR(CachePolicy):
    """Anchors + top-scoring middle tokens + `recent_lines` most recent lines.

    anchors: "line" (the first line, default), or a number of first visual tokens (0 = none).
    score: "line" = mean attention of the just-finished line's queries (paper);
           "last_token" = attention of the line's last query only;
           "cumulative" = attention received from all lines so far (H2O-like, computed at line ends).
    """

    evicts_at = EvictAt.LINE_END
    anchors: int | str = "line"
    recent_lines: int = 1
    score_source: str = "line"

    def __post_init__(self) -> None:
        if self.score_source not in SCORE_SOURCES:
            raise ValueError(f"linear score_source must be one of {SCORE_SOURCES}, got {self.score_source!r}")
        if self.recent_lines < 1:
            raise ValueError(f"linear recent_lines must be >= 1, got {self.recent_lines}")
        if self.anchors != "line" and (not isinstance(self.anchors, int) or self.anchors < 0):
            raise ValueError(f"linear anchors must be 'line' or a token count >= 0, got {self.anchors!r}")

    def anchor_tokens(self, layout: TokenLayout) -> int:
        return layout.line_len if self.anchors == "line" else int(self.anchors)

    def minimum_budget(self, layout: TokenLayout) -> int:
        return self.anchor_tokens(layout) + self.recent_lines * layout.line_len

    def signals(self) -> dict:
        signals = {"line": LineQueries()}
        if self.score_source == "cumulative":  # added up at line ends, from the line's probabilities
            signals["received"] = AccumulatedAttention(every_step=False)
        return signals

    def observe(self, view: CacheView, context: EvictionContext) -> None:
        if self.score_source == "cumulative":
            line = view.line_probabilities().sum(dim=2)  # (S, H, W)
            view.signal("received").add(line if context.rows is None else line * context.rows[:, None, None])

    def score(self, view: CacheView, context: EvictionContext) -> torch.Tensor:
        if self.score_source == "line":
            scores = view.line_probabilities().mean(dim=2)  # (S, H, W)
        elif self.score_source == "last_token":
            scores = view.line_probabilities()[:, :, -1]
        else:
            scores = view.received()
        first_recent = context.position(context.visual_index + 1 - self.recent_lines * context.layout.line_len)
        anchors = view.positions < context.position(self.anchor_tokens(context.layout))
        return protect(scores, anchors | (view.positions >= first_recent))
