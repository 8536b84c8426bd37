"""Signals: per-layer state a policy's scores need, declared by the policy, kept up to date by the engine.

A policy lists its signals (`CachePolicy.signals()`: name -> spec); the engine makes one state per
layer and calls its hooks: tokens written into slots, explicit attention probabilities (only for
signals that ask for them every step), the step's queries (for signals that buffer lines), tokens
moved into evicted slots. The engine itself knows no signal by name: a new score source is a new
signal here, not a branch in the engine. In a multi-token chunk a signal keeps what the chunk's
queries produced until `committed` says which of them count (rolled-back tokens leave no trace).

Shapes: S sequences, H heads, C slots (the store), W the attended width, n the line length, D head
dim, k the tokens per sequence of a chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from lineareval.cache.store import LayerKV


class SignalState:
    """One layer's state of a signal. Hooks default to nothing."""

    every_step: bool = False  # wants explicit probabilities of every query (not only fused attention)
    line_queries: bool = False  # wants each line's queries buffered for line-end scoring

    def tensors(self) -> list[torch.Tensor]:
        """Preallocated state (memory accounting; CUDA graphs keep their addresses)."""
        return []

    def written(self, layer: LayerKV, slots: torch.Tensor | int) -> None:
        """New tokens now occupy `slots`: an int or a (1,) tensor (that slot everywhere), or (S, k) per sequence."""

    def attended(self, layer: LayerKV, probabilities: torch.Tensor) -> None:
        """Attention probabilities (S, H, q, W) of the step's queries (`every_step` signals only)."""

    def queried(self, layer: LayerKV, query: torch.Tensor) -> None:
        """The step's queries (S, H, q, D), before attention (`line_queries` signals only)."""

    def committed(self, layer: LayerKV, order: int, rows: torch.Tensor) -> None:
        """Chunk token `order` is committed for the sequences `rows` (S,) bool: what it produced now counts."""

    def moved(self, layer: LayerKV, sources: torch.Tensor, targets: torch.Tensor, used: torch.Tensor | None) -> None:
        """Tokens in `sources` (S, H, c) moved into the evicted `targets` (S, H, c); `used` (S, 1, c) marks real
        moves (the others copy a slot onto itself), None: all are."""

    def end_step(self) -> None:
        """The scoring point is over: drop what is only valid there."""

    def end_chunk(self) -> None:
        """The chunk is committed: drop what its uncommitted queries produced."""

    def reset(self) -> None:
        """Empty, for a new generation in the same store."""


@dataclass(frozen=True)
class AccumulatedAttention:
    """Attention probability each slot received, summed over queries (H2O; LineAR's cumulative score).

    `every_step=True`: the engine computes every query's probabilities and adds them; False: the
    policy adds what it wants itself at its scoring points (`ReceivedState.add`).
    """

    every_step: bool = True
    line_queries: ClassVar[bool] = False

    def state(self, layer: LayerKV) -> ReceivedState:
        return ReceivedState(layer, self.every_step)


class ReceivedState(SignalState):
    def __init__(self, layer: LayerKV, every_step: bool):
        self.every_step = every_step
        self.received = torch.zeros(layer.valid.shape, dtype=torch.float32, device=layer.valid.device)  # (S, H, C)
        self.pending: torch.Tensor | None = None  # a chunk's probabilities (S, H, k, W) until its commit

    def tensors(self) -> list[torch.Tensor]:
        return [self.received]

    def written(self, layer: LayerKV, slots: torch.Tensor | int) -> None:
        if isinstance(slots, int):
            self.received.narrow(2, slots, 1).fill_(0.0)
        elif slots.dim() == 1:  # the same slot tensor everywhere (compiled steps)
            self.received.index_fill_(2, slots, 0.0)
        else:  # (S, k) slots per sequence
            self.received.scatter_(2, slots[:, None].expand(-1, self.received.shape[1], -1), 0.0)

    def attended(self, layer: LayerKV, probabilities: torch.Tensor) -> None:
        if layer.state.chunked:
            self.pending = probabilities
        else:
            self.add(probabilities.sum(dim=2))

    def committed(self, layer: LayerKV, order: int, rows: torch.Tensor) -> None:
        if self.pending is not None:
            self.add(self.pending[:, :, order] * rows[:, None, None])

    def add(self, scores: torch.Tensor) -> None:
        """received[..., :W] += scores (S, H, W)."""
        self.received[:, :, : scores.shape[-1]] += scores

    def moved(self, layer: LayerKV, sources: torch.Tensor, targets: torch.Tensor, used: torch.Tensor | None) -> None:
        self.received.scatter_(2, targets, self.received.gather(2, sources))
        if self.pending is not None:  # later chunk queries' probabilities follow their tokens (sources lie below W)
            queries, width = self.pending.shape[2], self.pending.shape[-1]
            source, target = (index.clamp(max=width - 1)[:, :, None].expand(-1, -1, queries, -1)
                              for index in (sources, targets))
            kept = self.pending.gather(3, source if used is None else torch.where(
                used[:, :, None], source, target))
            self.pending.scatter_(3, target, kept)

    def view(self, width: int) -> torch.Tensor:
        """(S, H, W) what the slots below `width` received."""
        return self.received[:, :, :width]

    def end_chunk(self) -> None:
        self.pending = None

    def reset(self) -> None:
        self.received.zero_()
        self.pending = None


class QueryRing(SignalState):
    """The last `length` queries of a layer, query of visual token i at index i % length (a ring buffer).

    `line_queries` signals: the engine calls `queried` with every step's queries. In a multi-token chunk
    the queries wait in `pending` until `committed` says which of them count.
    """

    line_queries = True

    def __init__(self, layer: LayerKV, length: int):
        sequences, heads = layer.positions.shape[:2]
        self.length = length
        self.queries = torch.zeros(sequences, heads, length, layer.head_dim, dtype=layer.dtype,
                                   device=layer.positions.device)
        self.pending: torch.Tensor | None = None  # a chunk's queries (S, H, k, D) until its commit

    def tensors(self) -> list[torch.Tensor]:
        return [self.queries]

    def compiled_index(self, layer: LayerKV) -> torch.Tensor:
        """(1,) the ring index of this step's query, as a tensor a compiled step reads (no host number)."""
        return torch.remainder(layer.step.position - layer.layout.prefix_len, self.length).reshape(1)

    def queried(self, layer: LayerKV, query: torch.Tensor) -> None:
        """Buffer each query at its ring index."""
        if layer.state.chunked:
            self.pending = query  # a chunk's rolled-back queries must not overwrite the committed ones
        elif torch.compiler.is_compiling():
            self.queries.index_copy_(2, self.compiled_index(layer), query)
        else:
            self.queries.narrow(2, layer.state.visual_index % self.length, 1).copy_(query)

    def committed(self, layer: LayerKV, order: int, rows: torch.Tensor) -> None:
        heads, dim = self.queries.shape[1], self.queries.shape[3]
        index = (layer.step.chunk_visual[:, order] % self.length)[:, None, None, None].expand(-1, heads, 1, dim)
        current = self.queries.gather(2, index)
        self.queries.scatter_(2, index, torch.where(rows[:, None, None, None], self.pending[:, :, order: order + 1],
                                                    current))

    def end_chunk(self) -> None:
        self.pending = None

    def reset(self) -> None:
        self.pending = None


@dataclass(frozen=True)
class LineQueries:
    """The just-finished line's queries, scored at its end against the cache (LineAR's inter-line attention)."""

    every_step: ClassVar[bool] = False
    line_queries: ClassVar[bool] = True

    def state(self, layer: LayerKV) -> LineState:
        return LineState(layer)


class LineState(QueryRing):
    """A ring of one line: at a line end it holds that line's queries in order."""

    def __init__(self, layer: LayerKV):
        super().__init__(layer, layer.layout.line_len)
        self._probabilities: torch.Tensor | None = None

    def compiled_index(self, layer: LayerKV) -> torch.Tensor:
        return layer.step.line_slot  # the host fills it at every step of a cache whose signals buffer queries

    def probabilities(self, layer: LayerKV) -> torch.Tensor:
        """(S, H, n, W) attention of the finished line's queries over slots [0, high_water), causal in the line.

        Computed once per line end against the cache as it was while the line was generated (nothing
        is evicted inside a line, so the cache holds what each query saw, plus later tokens that the
        causal mask hides). When the line fills the last n slots in order below a hole-free, unpadded
        store (always, in sequential decoding) the mask is the engine's shared (n, W) additive
        `StepInputs.line_mask`; otherwise it is built from each slot's position and the line's end.
        """
        if self._probabilities is None:
            width, n = layer.state.high_water, layer.layout.line_len
            logits = layer.key_logits(self.queries, width)
            logits.mul_(layer.scale)  # in place: no second (S, H, n, W) block
            mask = layer.step.line_mask
            if mask is not None and mask.shape[-1] == width:
                logits += mask
            else:
                ends = layer.layout.prefix_len + layer.scoring_index()  # the line end's position: int or (S,)
                offsets = torch.arange(1 - n, 1, device=logits.device)  # the line's queries, oldest first
                query_positions = (torch.as_tensor(ends, device=logits.device).reshape(-1, 1) + offsets)
                visible = layer.valid[:, :, None, :width] & (
                    layer.positions[:, :, None, :width] <= query_positions[:, None, :, None])
                logits.masked_fill_(~visible, float("-inf"))
            self._probabilities = torch.softmax(logits, dim=-1)
        return self._probabilities

    def end_step(self) -> None:
        self._probabilities = None  # (S, H, n, W) fp32: large at big batches

    def reset(self) -> None:
        super().reset()
        self._probabilities = None


@dataclass(frozen=True)
class WindowQueries:
    """The last `window` queries, scored against the keys written before them (R-KV's observation window).

    At a scoring point of visual token v the ring holds the queries of tokens v - window + 1 .. v (the
    policy only evicts once more than `window` tokens were written, so the ring is full then).
    """

    window: int
    every_step: ClassVar[bool] = False
    line_queries: ClassVar[bool] = True

    def state(self, layer: LayerKV) -> WindowState:
        return WindowState(layer, self.window)


class WindowState(QueryRing):
    def attention(self, layer: LayerKV) -> torch.Tensor:
        """(S, H, W) mean over the window's queries of their softmax over the slots written before the window.

        As R-KV's reference: the window's own keys are outside each softmax (so no causal mask is needed),
        the prefix's keys inside it. A sequence with nothing before its window scores 0.
        """
        width = layer.state.high_water
        logits = layer.key_logits(self.queries, width)  # (S, H, w, W)
        logits.mul_(layer.scale)
        first = layer.layout.prefix_len + layer.scoring_index() + 1 - self.length  # int, or (S,) per sequence
        before = layer.positions[:, :, :width] < torch.as_tensor(first, device=logits.device).reshape(-1, 1, 1)
        logits.masked_fill_(~(layer.valid[:, :, :width] & before)[:, :, None], float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num_(0.0).mean(dim=2)
