"""Head types from attention, and keep-scores from a priority order: what SSD and HeadKV share.

A head is a *spatial-locality* head when the queries of the first `lines` lines give at least `threshold`
of their attention to their causal 2D neighbourhood in the raster grid: the keys at most `radius` rows
above and `radius` columns to either side (the query itself included, the condition prefix excluded).
Every other head is non-local (SSD's semantic-sink heads, HeadKV's broad heads). The evidence is
accumulated at line ends from the line's attention (a `LineQueries` signal) and stops after `lines`
lines, so a head's type is then fixed for the rest of the image; before that (a budget smaller than
`lines` lines evicts earlier) the types are those of the lines seen so far. Types are per layer, head and
sequence: an image's type map never depends on the other images of its batch (the conditional and
unconditional CFG rows are classified apart).

Priorities: a policy that orders each head's tokens by a lexicographic key list turns the order into
keep-scores with `priority_ranks` (rank 0 = kept first), ties broken by position, never by slot, so
sequential and speculative decoding (whose slot orders differ) choose alike.

Shapes: S sequences, H heads, W the attended slots, n the line length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from lineareval.cache.policy import CacheView, EvictionContext, TokenLayout
from lineareval.cache.signals import SignalState

if TYPE_CHECKING:
    from lineareval.cache.store import LayerKV


@dataclass(frozen=True)
class HeadTypes:
    """Each head's attention mass on its 2D neighbourhood over the first lines (the policy feeds it in `observe`)."""

    every_step: ClassVar[bool] = False
    line_queries: ClassVar[bool] = False  # the policy's LineQueries signal buffers the queries

    def state(self, layer: LayerKV) -> HeadTypeState:
        return HeadTypeState(layer)


class HeadTypeState(SignalState):
    """local (S, H): attention mass the classifying queries gave their neighbourhoods; queries (S, 1): their count."""

    def __init__(self, layer: LayerKV):
        sequences, heads = layer.valid.shape[:2]
        self.local = torch.zeros(sequences, heads, dtype=torch.float32, device=layer.valid.device)
        self.queries = torch.zeros(sequences, 1, dtype=torch.float32, device=layer.valid.device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.local, self.queries]

    def add(self, local: torch.Tensor, queries: torch.Tensor) -> None:
        """local (S, H): summed neighbourhood mass of a line's queries; queries (S, 1): how many counted."""
        self.local += local
        self.queries += queries

    def locality(self) -> torch.Tensor:
        """(S, H) the mean share of a classifying query's attention on its neighbourhood (0 before any line)."""
        return self.local / self.queries.clamp(min=1.0)

    def reset(self) -> None:
        self.local.zero_()
        self.queries.zero_()


def neighbourhood_mass(probabilities: torch.Tensor, positions: torch.Tensor, layout: TokenLayout,
                       line_end: int | torch.Tensor, radius: int) -> torch.Tensor:
    """Attention of a line's queries on their causal 2D neighbourhoods, summed over the line's queries.

    probabilities (S, H, n, W): the line's queries (columns 0..n-1 of the line ending at visual index
    `line_end`: an int, or (S, 1, 1)) over the slots; positions (S, H, W), -1 = free. A key at (row r',
    column c') is in the neighbourhood of the query at (r, c) when r - radius <= r' <= r and
    |c' - c| <= radius (later keys of row r have probability 0: the line's attention is causal). -> (S, H)
    """
    n = layout.line_len
    visual = positions - layout.prefix_len  # (S, H, W): < 0 for the prefix and free slots
    key_row, key_col = torch.div(visual, n, rounding_mode="floor"), visual.remainder(n)
    query_row = line_end // n
    rows = (visual >= 0) & (key_row <= query_row) & (key_row >= query_row - radius)  # (S, H, W)
    query_col = torch.arange(n, device=positions.device)[:, None]  # (n, 1)
    near = rows[:, :, None] & ((key_col[:, :, None] - query_col).abs() <= radius)  # (S, H, n, W)
    return (probabilities * near).sum(dim=(-1, -2))


def classify(view: CacheView, context: EvictionContext, lines: int, radius: int, name: str = "types",
             line: str = "line") -> None:
    """At a line end of one of the first `lines` lines: add the line's neighbourhood mass to the head types."""
    n = context.layout.line_len
    index = context.visual_index
    if isinstance(index, int):
        if index // n >= lines:
            return
        counted = None
    else:  # (S, 1, 1) per sequence in a chunk: only those at a scoring point within their first lines
        counted = (index.reshape(-1) // n < lines)
        if context.rows is not None:
            counted &= context.rows
        if not bool(counted.any()):
            return
    mass = neighbourhood_mass(view.line_probabilities(line), view.positions, context.layout, index, radius)
    queries = torch.full_like(mass[:, :1], float(n))
    if counted is not None:
        mass, queries = mass * counted[:, None], queries * counted[:, None]
    view.signal(name).add(mass, queries)


def candidates(view: CacheView, context: EvictionContext) -> torch.Tensor:
    """(S, H, W) the slots the engine may evict here: visual tokens up to the scoring token (selection.py)."""
    return view.valid & (view.positions >= context.layout.prefix_len) & (
        view.positions <= context.position(context.visual_index))


def priority_order(keys: list[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """Slots sorted by `keys` (each (S, H, W), higher first, the first key most significant), ties broken by
    position (newer first). -> (S, H, W) slot indices, first = highest priority."""
    order = positions.argsort(dim=-1, descending=True, stable=True)
    for key in reversed(keys):
        key = key.to(torch.int8) if key.dtype == torch.bool else key
        order = order.gather(-1, key.gather(-1, order).argsort(dim=-1, descending=True, stable=True))
    return order


def priority_ranks(keys: list[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """Each slot's rank in `priority_order(keys, positions)`. -> (S, H, W) long, 0 = first."""
    order = priority_order(keys, positions)
    ranks = torch.empty_like(order)
    return ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
