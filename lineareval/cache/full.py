"""Full cache: no eviction (the baseline every policy is compared against)."""

from __future__ import annotations

from dataclasses import dataclass

from lineareval.cache.policy import CachePolicy, EvictAt, TokenLayout


@dataclass
class Full(CachePolicy):
    """Keeps every token; capacity prefix + N. Only `keep=1` is meaningful."""

    evicts_at = EvictAt.NEVER

    def minimum_budget(self, layout: TokenLayout) -> int:
        return layout.num_visual
