"""What every model adapter returns, and the observer hook the tests use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lineareval.cache import KVCache

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
