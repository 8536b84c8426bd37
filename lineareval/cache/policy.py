"""What a cache policy is: a declared schedule, declared signals, and a `score()` over a read-only view.

A policy never touches the store: it scores slots (higher keeps) and the engine evicts the lowest-
scoring ones. Protected slots (prefix, anchors, sinks, recent tokens) score `+inf`. What a score
needs beyond positions and keys (accumulated attention, a line's attention) is a signal the policy
declares (`signals()`, lineareval/cache/signals.py); the engine keeps it per layer.
Adding a policy is one file here plus one YAML under `conf/cache/`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

if TYPE_CHECKING:
    from lineareval.cache.store import LayerKV


class ScoreNeed(enum.Enum):
    """When a policy needs explicit attention probabilities (everything else uses fused SDPA); derived from
    its signals (reports and cost models read it)."""

    NEVER = "never"
    LINE_END = "line_end"  # the engine buffers each line's queries and scores once per line
    EVERY_STEP = "every_step"  # the engine computes every query's probabilities


class EvictAt(enum.Enum):
    """When a policy evicts once the visual cache exceeds its budget (`CachePolicy.eviction_period`)."""

    NEVER = "never"
    STEP = "step"
    LINE_END = "line_end"
    INTERVAL = "interval"  # every k visual tokens, k set by the policy (R-KV's fixed compression interval)


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
    """What a policy may look at when scoring: the layout, the budget and the token just committed.

    `visual_index` is an int in sequential decoding; in multi-token steps sequences reach their scoring
    points at different tokens, so it is a (S, 1, 1) tensor (policies' arithmetic broadcasts over slots)
    and `rows` (S,) marks the sequences at a scoring point (the others evict nothing).
    """

    layout: TokenLayout
    budget: int
    visual_index: int | torch.Tensor  # index (0..N-1) of the visual token whose step just finished
    rows: torch.Tensor | None = None

    def position(self, visual_index: int | torch.Tensor) -> int | torch.Tensor:
        """Absolute sequence position of a visual token (positions start with the prefix)."""
        return self.layout.prefix_len + visual_index


class CacheView:
    """A read-only view of one layer for scoring: slots [0, width) of the store and the declared signals."""

    def __init__(self, layer: LayerKV):
        self._layer = layer
        self.width = layer.state.high_water
        self.positions = layer.positions[:, :, : self.width]  # (S, H, W); -1 = free
        self.valid = layer.valid[:, :, : self.width]  # (S, H, W)

    @property
    def keys(self) -> torch.Tensor:
        """(S, H, W, D) post-RoPE keys."""
        return self._layer.stored_keys(self.width)

    def signal(self, name: str):
        """The state of a signal the policy declared (e.g. `ReceivedState`, `LineState`)."""
        return self._layer.signals[name]

    def received(self, name: str = "received") -> torch.Tensor:
        """(S, H, W) accumulated attention (an `AccumulatedAttention` signal)."""
        return self.signal(name).view(self.width)

    def line_probabilities(self, name: str = "line") -> torch.Tensor:
        """(S, H, n, W) attention of the just-finished line's queries (a `LineQueries` signal)."""
        return self.signal(name).probabilities(self._layer)

    def window_attention(self, name: str = "window") -> torch.Tensor:
        """(S, H, W) mean attention of the last queries over the slots before them (a `WindowQueries` signal)."""
        return self.signal(name).attention(self._layer)


@dataclass
class CachePolicy:
    """Base class: subclasses set the class variables, declare their signals and implement `score`."""

    evicts_at: ClassVar[EvictAt] = EvictAt.STEP
    # An optional speed-up: True declares that scores depend only on slot positions (not on keys, values or
    # attention). In sequential decoding every layer, head and sequence then evicts the same slots, so the
    # engine scores once, on its host copy of the slot layout, and frees those slots in place; `observe` is
    # not called. The engine checks the declaration (reading keys or signals stops the run) and is correct
    # without it. Which tokens a policy may evict is not declared: any (lineareval/cache/selection.py).
    selects_by_position: ClassVar[bool] = False

    @property
    def name(self) -> str:
        """The policy's Hydra choice (`conf/cache/<name>.yaml`, set by `named`); built in code, its class name."""
        return getattr(self, "_name", type(self).__name__.lower())

    def named(self, name: str) -> CachePolicy:
        """The policy labelled with its Hydra choice."""
        declared = getattr(type(self), "name")
        if isinstance(declared, str) and declared != name:
            raise ValueError(f"policy class {type(self).__name__} declares name {declared!r} but is configured as "
                             f"cache={name}: remove the class attribute (the name is the config's file name)")
        self._name = name
        return self

    def signals(self) -> dict:
        """Name -> signal spec (lineareval/cache/signals.py) the engine keeps per layer for `score`."""
        return {}

    @property
    def needs_scores(self) -> ScoreNeed:
        """What the declared signals ask of attention (derived; cost models and reports read it)."""
        specs = list(self.signals().values())
        if any(spec.every_step for spec in specs):
            return ScoreNeed.EVERY_STEP
        return ScoreNeed.LINE_END if any(spec.line_queries for spec in specs) else ScoreNeed.NEVER

    def minimum_budget(self, layout: TokenLayout) -> int:
        """Smallest visual budget for which the policy can keep what it protects."""
        return 1

    def eviction_period(self, layout: TokenLayout) -> int | None:
        """Visual tokens from one scoring point to the next: 1 (every step), the line length (line ends), None
        (never). A policy that evicts at `EvictAt.INTERVAL` returns its interval."""
        periods = {EvictAt.STEP: 1, EvictAt.LINE_END: layout.line_len, EvictAt.NEVER: None}
        if self.evicts_at not in periods:
            raise NotImplementedError(f"policy {self.name} evicts at {self.evicts_at.value}: define eviction_period")
        return periods[self.evicts_at]

    def is_scoring_point(self, layout: TokenLayout, visual_index: int | np.ndarray) -> bool | np.ndarray:
        """Whether the step of visual token `visual_index` (an int, or an array of them) ends at a scoring point."""
        period = self.eviction_period(layout)
        if period is None:
            return np.zeros_like(visual_index, dtype=bool) if isinstance(visual_index, np.ndarray) else False
        return (visual_index + 1) % period == 0

    def slack(self, layout: TokenLayout) -> int:
        """Visual slots needed beyond the budget between two evictions: one period."""
        period = self.eviction_period(layout)
        return layout.num_visual if period is None else period

    def capacity(self, layout: TokenLayout, budget: int) -> int:
        """Slots to preallocate per layer, head and sequence (prefix included)."""
        return layout.prefix_len + min(layout.num_visual, budget + self.slack(layout))

    def observe(self, view: CacheView, context: EvictionContext) -> None:
        """Called at every scoring point (line end or step) before any eviction; default: nothing."""

    def score(self, view: CacheView, context: EvictionContext) -> torch.Tensor:
        """Keep-scores of the occupied slot range, shape (S, H, W); higher keeps, `inf` protects."""
        raise NotImplementedError

    def describe(self) -> dict:
        """The policy's knobs, for the record."""
        return {key: value for key, value in vars(self).items() if not key.startswith("_")}


def protect(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Set `scores` to +inf where `mask` holds, so those slots are never evicted."""
    return scores.masked_fill(mask, float("inf"))
