"""StreamingLLM: attention sinks plus a recent window.

Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks", https://arxiv.org/abs/2309.17453.
The original re-rotates pre-RoPE keys into a contiguous position range; image models cache
post-RoPE keys, so here sinks and recent tokens keep their original positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lineareval.cache.policy import CachePolicy, CacheView, EvictionContext, TokenLayout, protect


@dataclass
class StreamingLLM(CachePolicy):
    """Prefix + the first `sinks` visual tokens + the most recent `B - sinks`."""

    selects_by_position = True
    sinks: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.sinks, int) or isinstance(self.sinks, bool) or self.sinks < 0:
            raise ValueError(f"streamingllm sinks must be an integer >= 0, got {self.sinks!r}")

    def minimum_budget(self, layout: TokenLayout) -> int:
        return self.sinks + 1

    def score(self, view: CacheView, context: EvictionContext) -> torch.Tensor:
        return protect(view.positions.float(), view.positions < context.position(self.sinks))
