"""Sliding window: the prefix plus the most recent `B` visual tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lineareval.cache.policy import CachePolicy, CacheView, EvictionContext


@dataclass
class Window(CachePolicy):
    """Evicts the oldest visual token every step once over budget (the no-scoring reference cost)."""

    selects_by_position = True

    def score(self, view: CacheView, context: EvictionContext) -> torch.Tensor:
        return view.positions.float()  # newer keeps
