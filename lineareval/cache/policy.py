"""What a cache policy is: a declared schedule, declared score needs, and a `score()`.

A policy never touches tensors of the store directly; it scores slots (higher keeps) and the engine
evicts the lowest-scoring ones. Protected slots (prefix, anchors, sinks, recent tokens) score `+inf`.
Adding a policy is one file here plus one YAML under `conf/cache/`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from lineareval.cache.engine import LayerKV


class ScoreNeed(enum.Enum):
    """When a policy needs explicit attention probabilities (everything else uses fused SDPA)."""

    NEVER = "never"
    LINE_END = "line_end"  # the engine buffers each line's queries and scores once per line
    EVERY_STEP = "every_step"  # the engine accumulates probabilities received per slot, every step


class EvictAt(enum.Enum):
    """When a policy evicts once the visual cache exceeds its budget."""

    NEVER = "never"
    STEP = "step"
    LINE_END = "line_end"


@dataclass(frozen=True)
class TokenLayout:
    """Where the visual tokens sit: `prefix_len` condition tokens, then `rows` lines of `line_len`."""

    prefix_len: int
    rows: int
    line_len: int

    @property
    def num_visual(self) -> int:
        return self.rows * self.line_len

    def is_line_end(self, visual_index: int) -> bool:
        return (visual_index + 1) % self.line_len == 0


@dataclass(frozen=True)
class EvictionContext:
    """What a policy may look at when scoring: the layout, the budget and the token just written."""

    layout: TokenLayout
    budget: int
    visual_index: int  # index (0..N-1) of the visual token whose step just finished

    def position(self, visual_index: int) -> int:
        """Absolute sequence position of a visual token (positions start with the prefix)."""
        return self.layout.prefix_len + visual_index


@dataclass
class CachePolicy:
    """Base class: subclasses set the class variables and implement `score`."""

    name: ClassVar[str] = "base"
    needs_scores: ClassVar[ScoreNeed] = ScoreNeed.NEVER
    evicts_at: ClassVar[EvictAt] = EvictAt.STEP
    # True when scores depend only on slot positions (not on keys, values or attention): every layer,
    # head and sequence then evicts the same slots, so the engine scores once, on its host copy of the
    # slot layout (`SlotTable`, shaped like a layer with S = H = 1), and `observe` is not called.
    selects_by_position: ClassVar[bool] = False

    def minimum_budget(self, layout: TokenLayout) -> int:
        """Smallest visual budget for which the policy can keep what it protects."""
        return 1

    def slack(self, layout: TokenLayout) -> int:
        """Visual slots needed beyond the budget between two evictions."""
        return {EvictAt.STEP: 1, EvictAt.LINE_END: layout.line_len, EvictAt.NEVER: layout.num_visual}[self.evicts_at]

    def capacity(self, layout: TokenLayout, budget: int) -> int:
        """Slots to preallocate per layer, head and sequence (prefix included)."""
        return layout.prefix_len + min(layout.num_visual, budget + self.slack(layout))

    def observe(self, layer: LayerKV, context: EvictionContext) -> None:
        """Called at every scoring point (line end or step) before any eviction; default: nothing."""

    def score(self, layer: LayerKV, context: EvictionContext) -> torch.Tensor:
        """Keep-scores of the occupied slot range, shape (S, H, W); higher keeps, `inf` protects."""
        raise NotImplementedError

    def describe(self) -> dict:
        """The policy's knobs, for the record."""
        return {key: value for key, value in vars(self).items() if not key.startswith("_")}


def protect(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Set `scores` to +inf where `mask` holds, so those slots are never evicted."""
    return scores.masked_fill(mask, float("inf"))
