"""H2O: heavy hitters (accumulated attention received) plus a recent window.

Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", https://arxiv.org/abs/2306.14048. Per layer, head and sequence (the reference code is
batch-size 1 only); evicts one token per step once over budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lineareval.cache.policy import CachePolicy, CacheView, EvictionContext, TokenLayout, protect
from lineareval.cache.signals import AccumulatedAttention


@dataclass
class H2O(CachePolicy):
    """Keeps `floor(heavy_ratio * B)` heavy hitters and the most recent `B - heavy` tokens."""

    heavy_ratio: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.heavy_ratio < 1:
            raise ValueError(f"h2o heavy_ratio must be in [0, 1), got {self.heavy_ratio}")

    def signals(self) -> dict:
        return {"received": AccumulatedAttention(every_step=True)}

    def recent(self, budget: int) -> int:
        return budget - int(self.heavy_ratio * budget)

    def minimum_budget(self, layout: TokenLayout) -> int:
        return 2

    def score(self, view: CacheView, context: EvictionContext) -> torch.Tensor:
        first_recent = context.position(context.visual_index - self.recent(context.budget) + 1)
        return protect(view.received(), view.positions >= first_recent)
