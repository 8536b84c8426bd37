"""A test-only policy that keeps the *oldest* visual tokens: conf/cache/window.yaml's policy with its score negated.

It is what a policy author writes by copying window.py (keeping its `selects_by_position`) and changing one
line: it evicts the newest token at every step once over budget, which the engine once mishandled in
speculative decoding (greedy SJD differed from sequential in 43% of tokens). It runs through every
policy-parametrised test (tests/conf/cache/oldest.yaml; conftest.CACHE_CONFIGS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lineareval.cache.policy import CachePolicy, CacheView, EvictionContext


@dataclass
class Oldest(CachePolicy):
    """Evicts the newest visual token every step once over budget."""

    selects_by_position = True

    def score(self, view: CacheView, context: EvictionContext) -> torch.Tensor:
        return -view.positions.float()  # older keeps
