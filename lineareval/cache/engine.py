"""The KV-cache engine: one preallocated store per layer, shared by every model and every policy.

Each layer holds post-RoPE keys, values, each slot's original position and an occupancy mask, all of
shape (S, H, C, ...) for S sequences (conditional and unconditional CFG rows are separate sequences),
H heads and C slots. C is what the policy declares (full: prefix + N; compressing: prefix + B + slack),
so memory follows the budget, not N. Softmax attention does not depend on slot order and positions
are already rotated into the keys, so a token may sit in any slot: nothing is ever re-indexed.
What a policy scores beyond positions and keys lives in the signals it declares (signals.py).

Two ways to step:

- **one token per sequence** (sequential decoding, the fast path). Static shapes, so the step can be
  compiled: every step writes its token into one slot that the host knows, the same in every layer,
  sequence and head, and attention spans slots [0, width) without a mask as long as they are all
  occupied. What changes from step to step lives in small preallocated tensors (`StepInputs`) or in
  host numbers a compiled step reads (`CacheState.width`, a dynamic size; `CacheState.masked`, a
  boolean the compiler specialises on). Two kinds of eviction keep that true:
  - by position (`window`, `streamingllm`: `selects_by_position`): every layer, sequence and head
    evicts the same slots, so the host scores its own copy of the slot layout (`SlotTable`), frees
    the victims everywhere with one indexed write per layer and writes the next token into them;
  - per head (H2O, LineAR): one top-k per layer at the scoring point picks each (sequence, head)'s
    victims, then the tokens written since the previous eviction (never victims themselves: both
    policies protect them) move into the victims' slots. The occupied slots stay [0, occupancy).
- **a chunk of k tokens per sequence, then a commit** (speculative and Jacobi decoding; `begin_chunk`,
  `commit`). The k tokens of each sequence are written at once after its own occupied slots and
  attend causally among themselves; `commit(counts)` keeps the first `counts[s]` of sequence s and
  rolls the rest back, leaving the store exactly as if only those had been written. Sequences commit
  different counts, so from the first chunk on each keeps its own occupancy (`ragged`) and every
  policy evicts per (sequence, head). Semantics: a chunk's queries see the cache as it was when the
  chunk began plus the chunk's earlier tokens; at commit the committed tokens are taken in order, and
  each one does what a sequential step would at that point: add its attention to accumulated scores,
  and evict at a line end or, for per-step policies, whenever the budget is exceeded. Rolled-back
  tokens leave no trace. A line-end policy (LineAR) scores the line from its buffered queries against
  the cache at the line's end, as sequential decoding does; the tokens of a chunk that crosses a line
  end attended before that line end's eviction (speculative decoding clips its windows at line ends,
  so none does). This path runs eagerly.
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from lineareval.cache.allocation import Budgets
from lineareval.cache.policy import CachePolicy, CacheView, EvictionContext, TokenLayout
from lineareval.memory import tensor_bytes

log = logging.getLogger(__name__)


@dataclass
class CacheState:
    """Counters shared by all layers: occupancy is identical for every layer and head (and, until the first
    multi-token chunk, every sequence; after it, `row_*` hold each sequence's own counts)."""

    capacity: int
    occupancy: int = 0  # slots in use per (sequence, head)
    high_water: int = 0  # occupied slots all lie in [0, high_water)
    visual_count: int = 0  # visual tokens in the cache
    visual_index: int = -1  # visual token being written in the current step
    padded: bool = False  # some prefix slots are padding (never attended, never reused)
    width: int = 0  # this step attends over slots [0, width)
    slot: int = 0  # the slot this step writes (also in `StepInputs.slot`, which compiled steps read)
    masked: bool = False  # ... and needs the occupancy mask (free or padding slots below width)
    width_multiple: int = 1  # round width up to a multiple (CUDA graphs: few distinct shapes)
    always_masked: bool = False  # attend with the occupancy mask at every step (bucketed widths: one graph)
    peak_occupancy: int = 0
    evictions: int = 0
    ragged: bool = False  # sequences keep their own counts (after a multi-token chunk)
    row_occupancy: np.ndarray | None = field(default=None, repr=False)  # (S,) slots in use per sequence
    row_visual: np.ndarray | None = field(default=None, repr=False)  # (S,) visual tokens in the cache
    row_next: np.ndarray | None = field(default=None, repr=False)  # (S,) next visual index to write
    chunk: int = 0  # tokens per sequence of the chunk being written
    head_holes: bool = False  # heads hold different numbers of tokens (adaptive_heads, after its first eviction)

    @property
    def has_holes(self) -> bool:
        return self.occupancy < self.high_water


class StepInputs:
    """Per-step values as preallocated device tensors, refilled in place by `KVCache.begin_step`."""

    def __init__(self, device: torch.device):
        self.position = torch.zeros((), dtype=torch.long, device=device)  # layout position of the new token
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # its slot (the same everywhere)
        self.line_slot = torch.zeros(1, dtype=torch.long, device=device)  # its index within its line
        self.released = torch.zeros(1, dtype=torch.long, device=device)  # a slot freed by position
        self.line_mask: torch.Tensor | None = None  # at a line end: (n, W) causal mask of the line's queries
        # a multi-token chunk: each sequence's slots, layout positions and visual indices (S, k); the
        # causal visibility of its slots (S, 1, k, W), True = a chunk query may attend
        self.chunk_slots: torch.Tensor | None = None
        self.chunk_positions: torch.Tensor | None = None
        self.chunk_visual: torch.Tensor | None = None
        self.chunk_causal: torch.Tensor | None = None


class SlotTable:
    """Host copy of the slot layout: which slots are free, and (for policies that select by position,
    whose layout is the same everywhere) which position each slot holds.

    `positions` and `valid` have shape (1, 1, C) so that such a policy scores this table exactly as
    it would score a layer.
    """

    def __init__(self, state: CacheState):
        self.state = state
        self.positions = torch.full((1, 1, state.capacity), -1, dtype=torch.long)
        self.valid = torch.zeros(1, 1, state.capacity, dtype=torch.bool)
        self._free: list[int] = []

    def reset(self, prefix_len: int) -> None:
        self.positions.fill_(-1)
        self.positions[0, 0, :prefix_len] = torch.arange(prefix_len)
        self.valid.zero_()
        self.valid[0, 0, :prefix_len] = True  # padding slots too: never reused
        self._free = list(range(prefix_len, self.state.capacity))  # a heap (sorted = valid heap)

    def take(self, position: int) -> int:
        """The lowest free slot, now holding `position`."""
        slot = heapq.heappop(self._free)
        self.positions[0, 0, slot], self.valid[0, 0, slot] = position, True
        return slot

    def reserve(self, top: int) -> None:
        """Slots [0, top) in use (as far as the host knows: heads fill them to their own counts), the rest free."""
        self.positions[0, 0, top:] = -1
        self.valid[0, 0, :top], self.valid[0, 0, top:] = True, False
        self._free = list(range(top, self.state.capacity))

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.positions[0, 0, slot], self.valid[0, 0, slot] = -1, False
            heapq.heappush(self._free, slot)


def lowest_scores(keep_scores: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, prefix_len: int,
                  count: int, kept_from: int | torch.Tensor | None = None) -> torch.Tensor:
    """Slots of the `count` lowest keep-scores per row, never a free or prefix slot, nor one at or above
    `kept_from` (an int, or (S, 1, 1) per sequence). (..., W) -> (..., count), lowest first."""
    protected = ~valid | (positions < prefix_len)
    if isinstance(kept_from, int):
        protected[..., kept_from:] = True
    elif kept_from is not None:
        protected |= torch.arange(protected.shape[-1], device=protected.device) >= kept_from
    scores = keep_scores.float().masked_fill(protected, float("inf"))
    return scores.topk(count, dim=-1, largest=False).indices


def lowest_mask(keep_scores: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, prefix_len: int,
                counts: int | np.ndarray) -> torch.Tensor:
    """(S, H, W) mask of the `counts` lowest keep-scores per row (an int, or (S,) per sequence), never a free
    or prefix slot (`lowest_scores`, with new tokens eligible)."""
    most = int(np.max(counts))
    victims = lowest_scores(keep_scores, positions, valid, prefix_len, most)  # (S, H, most)
    chosen = torch.arange(most, device=victims.device) < torch.as_tensor(
        np.asarray(counts), device=victims.device).reshape(-1, 1, 1)
    return torch.zeros_like(valid).scatter_(-1, victims, chosen.expand_as(victims))


def joint_victims(keep_scores: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, prefix_len: int,
                  budget: int, floor: int, cap: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Ada-KV's selection (https://arxiv.org/abs/2407.11550): (S, H, W) mask of the visual slots to evict so that
    each sequence's heads keep H * budget tokens together: every head its `floor` highest keep-scores, the
    rest the highest scores over all heads jointly, no head more than `cap`. `rows` (S,): only these evict."""
    sequences, heads, width = keep_scores.shape
    candidate = valid & (positions >= prefix_len)
    scores = keep_scores.float().masked_fill(~candidate, float("-inf"))
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(width, device=order.device).expand_as(order))
    guaranteed = candidate & (rank < floor)
    eligible = candidate & ~guaranteed & (rank < cap)
    joint = scores.masked_fill(~eligible, float("-inf")).view(sequences, heads * width)
    chosen = torch.zeros_like(eligible).view(sequences, heads * width)
    chosen.scatter_(1, joint.topk(heads * (budget - floor), dim=1).indices, True)
    evicted = candidate & ~(guaranteed | (chosen.view_as(eligible) & eligible))
    return evicted if rows is None else evicted & rows[:, None, None]


class LayerKV:
    """One layer's store. Tensors: keys/values (S, H, C + spare, D), positions/valid (S, H, C + spare).

    `spare` slots past the capacity are never written nor attended. A compiled step allocates one: the
    attended slice [0, width) is then never the whole store, whose contiguity the compiler would
    otherwise specialise on (width == C: a second graph, compiled again for the last steps).
    """

    def __init__(self, state: CacheState, step: StepInputs, layout: TokenLayout, signals: dict, *,
                 sequences: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, spare: int = 0):
        self.state, self.step, self.layout = state, step, layout
        shape = (sequences, heads, state.capacity + spare)
        self.keys = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        self.positions = torch.full(shape, -1, dtype=torch.long, device=device)
        self.valid = torch.zeros(shape, dtype=torch.bool, device=device)
        self.scale = 1.0 / math.sqrt(head_dim)
        self.signals = {name: spec.state(self) for name, spec in signals.items()}
        self.explicit = any(signal.every_step for signal in self.signals.values())  # probabilities every step
        self.buffers_queries = any(signal.line_queries for signal in self.signals.values())

    def tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values, self.positions, self.valid,
                *(t for signal in self.signals.values() for t in signal.tensors())]

    def slot_bytes(self) -> int:
        """Bytes of one slot across sequences and heads (the store and the per-slot signal state)."""
        per_slot = [t for t in self.tensors() if t.dim() >= 3 and t.shape[2] == self.keys.shape[2]]
        return sum(t.element_size() * t.numel() // t.shape[2] for t in per_slot)

    def scoring_index(self) -> int | torch.Tensor:
        """Visual index of the token whose scoring point this is: an int, or (S,) per sequence (ragged)."""
        return self.step.scoring if self.state.ragged else self.state.visual_index

    # ---- writing -------------------------------------------------------------------------------

    def write_prefix(self, keys: torch.Tensor, values: torch.Tensor, present: torch.Tensor | None = None) -> None:
        """Store the condition prefix in slots [0, P). keys/values: (S, H, P, D).

        `present` (S, P) marks real prefix tokens when prompts of different lengths are padded to P:
        padding slots are never attended and never reused, so every sequence keeps the same layout
        (visual token i at layout index P + i) and the policies' thresholds stay uniform.
        """
        length = keys.shape[2]
        self.keys[:, :, :length] = keys
        self.values[:, :, :length] = values
        self.positions[:, :, :length] = torch.arange(length, device=keys.device)
        self.valid[:, :, :length] = True
        if present is not None and not bool(present.all()):
            self.valid[:, :, :length] = present[:, None, :].to(self.valid.device)
            self.positions[:, :, :length].masked_fill_(~self.valid[:, :, :length], -1)
            self.state.padded = True  # the host never hands out prefix slots, so padding stays unused

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write this step's tokens. key/value: (S, H, k, D); one token per sequence into the step's slot, or a
        chunk into each sequence's chunk slots.

        A compiled step indexes with the slot tensor (one graph for every slot); eager code writes the
        host's slot directly, about three times cheaper than `index_copy_` on a CPU."""
        if self.state.ragged:
            return self._append_chunk(key, value)
        if torch.compiler.is_compiling():
            slot = self.step.slot
            self.keys.index_copy_(2, slot, key)
            self.values.index_copy_(2, slot, value)
            self.positions.index_fill_(2, slot, self.step.position)
            self.valid.index_fill_(2, slot, True)
            written = slot
        else:
            written = self.state.slot
            self.keys.narrow(2, written, 1).copy_(key)
            self.values.narrow(2, written, 1).copy_(value)
            self.positions.narrow(2, written, 1).fill_(self.step.position)
            self.valid.narrow(2, written, 1).fill_(True)
        for signal in self.signals.values():
            signal.written(self, written)

    def _append_chunk(self, key: torch.Tensor, value: torch.Tensor) -> None:
        slots = self.step.chunk_slots  # (S, k)
        heads, dim = key.shape[1], key.shape[3]
        index = slots[:, None, :].expand(-1, heads, -1)  # (S, H, k)
        self.keys.scatter_(2, index[..., None].expand(-1, -1, -1, dim), key)
        self.values.scatter_(2, index[..., None].expand(-1, -1, -1, dim), value)
        self.positions.scatter_(2, index, self.step.chunk_positions[:, None, :].expand(-1, heads, -1))
        self.valid.scatter_(2, index, True)
        for signal in self.signals.values():
            signal.written(self, slots)

    # ---- attention -----------------------------------------------------------------------------

    def attend(self, query: torch.Tensor) -> torch.Tensor:
        """Attention of the step's queries over the occupied slots. (S, H, k, D) -> (S, H, k, D)."""
        width = self.state.width
        keys, values = self.keys[:, :, :width], self.values[:, :, :width]
        if self.state.ragged:  # each sequence's chunk, causal among itself, after its own occupied slots
            mask = self.valid[:, :, None, :width] & self.step.chunk_causal[..., :width]
        else:
            mask = self.valid[:, :, None, :width] if self.state.masked else None
        if self.buffers_queries:
            for signal in self.signals.values():
                signal.queried(self, query)
        if not self.explicit:
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)
        # explicit probabilities from the same pass that produces the output (H2O)
        logits = torch.matmul(query, keys.transpose(-1, -2)).float() * self.scale  # (S, H, k, W)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        for signal in self.signals.values():
            if signal.every_step:
                signal.attended(self, probs)  # in a chunk: kept until the commit says which queries count
        return torch.matmul(probs.to(values.dtype), values)

    # ---- eviction ------------------------------------------------------------------------------

    def view(self) -> CacheView:
        return CacheView(self)

    def evict(self, keep_scores: torch.Tensor, count: int) -> None:
        """Evict the `count` lowest-scoring visual slots per (sequence, head) and move the tokens written
        since the previous eviction, slots [occupancy - count, occupancy), into them. keep_scores: (S, H, W)."""
        width, top = keep_scores.shape[-1], self.state.occupancy - count
        victims = lowest_scores(keep_scores, self.positions[:, :, :width], self.valid[:, :, :width],
                                self.layout.prefix_len, count, kept_from=top)  # (S, H, count), all below top
        moved = slice(top, top + count)
        sequences, heads, capacity, dim = self.keys.shape
        rows = torch.arange(sequences * heads, device=victims.device).view(sequences, heads, 1) * capacity
        rows = (rows + victims).view(-1)  # the victims as rows of the (S * H * C, D) stores
        for store in (self.keys, self.values):  # whole-row copies: about twice as fast as scatter_ on a CPU
            source = store[:, :, moved].reshape(-1, dim)  # a copy, unless S = H = 1 makes it a view
            store.view(-1, dim).index_copy_(0, rows, source.clone() if source._is_view() else source)
        self.positions.scatter_(2, victims, self.positions[:, :, moved].clone())
        sources = torch.arange(top, top + count, device=victims.device).expand_as(victims)
        for signal in self.signals.values():
            signal.moved(self, sources, victims, None)
        self.valid[:, :, moved] = False
        self.positions[:, :, moved] = -1

    def evict_rows(self, keep_scores: torch.Tensor, counts: torch.Tensor, occupancy: torch.Tensor) -> None:
        """`evict` with a count per sequence: the `counts[s]` lowest-scoring slots of sequence s take the tokens
        of its top slots [occupancy[s] - counts[s], occupancy[s]). keep_scores (S, H, W); counts, occupancy (S,)."""
        most = int(counts.max())
        width = keep_scores.shape[-1]
        top = (occupancy - counts)[:, None, None]  # (S, 1, 1)
        victims = lowest_scores(keep_scores, self.positions[:, :, :width], self.valid[:, :, :width],
                                self.layout.prefix_len, most, kept_from=top)  # (S, H, most)
        rank = torch.arange(most, device=victims.device)
        used = rank < counts[:, None, None]  # (S, 1, most): beyond a sequence's count, copy a slot onto itself
        sources = (top + rank).clamp(max=self.keys.shape[2] - 1).expand_as(victims)
        targets = torch.where(used, victims, sources)
        dim = self.keys.shape[-1]
        for store in (self.keys, self.values):
            moved = store.gather(2, sources[..., None].expand(-1, -1, -1, dim))
            store.scatter_(2, targets[..., None].expand(-1, -1, -1, dim), moved)
        self.positions.scatter_(2, targets, self.positions.gather(2, sources))
        for signal in self.signals.values():
            signal.moved(self, sources, targets, used)
        slot = torch.arange(self.keys.shape[2], device=victims.device)
        freed = (slot >= top) & (slot < occupancy[:, None, None])  # (S, 1, C)
        self.valid.masked_fill_(freed, False)
        self.positions.masked_fill_(freed, -1)

    def compact(self, evicted: torch.Tensor, target: int | np.ndarray) -> None:
        """Free the slots marked in `evicted` (S, H, W), then move every surviving token at or above `target` (an
        int, or (S,) per sequence) into the free slots below it, lowest first. Afterwards all occupied slots lie
        below the target. Unlike `evict`, victims may be anywhere, tokens written since the previous scoring
        point included, and each (sequence, head) may free its own number of slots."""
        width, capacity, prefix = evicted.shape[-1], self.keys.shape[2], self.layout.prefix_len
        self.valid[:, :, :width] &= ~evicted
        self.positions[:, :, :width].masked_fill_(evicted, -1)
        span = width - int(np.min(target))  # the most tokens that can sit at or above their sequence's target
        if span <= 0:
            return
        device = evicted.device
        first = torch.as_tensor(np.asarray(target), device=device).reshape(-1, 1, 1)  # (S or 1, 1, 1)
        above = first + torch.arange(span, device=device)  # slots at and above each target; past W: none
        sources = above.clamp(max=capacity - 1).expand(*evicted.shape[:2], span)  # (S, H, span)
        movers = self.valid.gather(2, sources) & (above < width)
        slot = torch.arange(width, device=device)
        free = ~self.valid[:, :, :width] & (slot >= prefix) & (slot < first)  # never a (padding) prefix slot
        holes = torch.where(free, slot, width + slot).topk(span, dim=-1, largest=False).values  # lowest first
        rank = (movers.cumsum(dim=-1) - 1).clamp(min=0)  # the k-th mover takes the k-th hole
        targets = torch.where(movers, holes.gather(2, rank), sources)  # non-movers copy a slot onto itself
        dim = self.keys.shape[-1]
        for store in (self.keys, self.values):
            store.scatter_(2, targets[..., None].expand(-1, -1, -1, dim),
                           store.gather(2, sources[..., None].expand(-1, -1, -1, dim)))
        for store in (self.positions, self.valid):
            store.scatter_(2, targets, store.gather(2, sources))
        moved_away = slot >= first  # every survivor up there now has a slot below the target
        self.valid[:, :, :width].masked_fill_(moved_away, False)
        self.positions[:, :, :width].masked_fill_(moved_away, -1)
        for signal in self.signals.values():
            signal.moved(self, sources, targets, movers)

    def release(self, slots: torch.Tensor) -> None:
        """Free the same slots (k,) in every sequence and head (eviction by position)."""
        self.valid.index_fill_(2, slots, False)
        self.positions.index_fill_(2, slots, -1)

    def end_step(self) -> None:
        """Release what is only valid at this scoring point (line probabilities: (S, H, n, W) fp32)."""
        for signal in self.signals.values():
            signal.end_step()

    def reset(self) -> None:
        self.valid.zero_()
        self.positions.fill_(-1)
        for signal in self.signals.values():
            signal.reset()


class LayerGroup:
    """Layers with one budget and their schedule: one set of counters (`CacheState`), step inputs and host slot
    table for all of them, as their occupancy is identical. `KVCache` holds one group per distinct layer budget.

    With `head_cap` (adaptive_heads, for policies that score per head) the group's heads share H * budget:
    each eviction keeps every head's `head_floor` best and the best of the rest over all heads jointly
    (`joint_victims`), heads hold different numbers of tokens, compacted below slot P + head_cap, and new
    tokens are written from there: the store has P + head_cap + slack slots per head and attention always
    uses the occupancy mask (one compiled graph).
    """

    def __init__(self, policy: CachePolicy, layout: TokenLayout, budget: int, head_floor: int | None = None,
                 head_cap: int | None = None, *, num_layers: int, sequences: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, spare_slot: bool = False, max_chunk: int = 1):
        self.policy, self.layout, self.budget = policy, layout, budget
        self.device = torch.device(device)
        self.max_chunk = max_chunk
        per_head = head_cap is not None and not policy.selects_by_position and policy.eviction_period(layout)
        self.head_floor, self.head_cap = (head_floor, head_cap) if per_head else (None, None)
        capacity = (layout.prefix_len + head_cap + policy.slack(layout) if per_head
                    else policy.capacity(layout, budget))
        # a chunk of k writes k slots past what the policy keeps (sequences that finished early included)
        self.state = CacheState(capacity=capacity + max_chunk - 1, always_masked=bool(per_head))
        self.step = StepInputs(self.device)
        self.layers = [LayerKV(self.state, self.step, layout, policy.signals(), sequences=sequences, heads=heads,
                               head_dim=head_dim, dtype=dtype, device=self.device, spare=int(spare_slot))
                       for _ in range(num_layers)]
        self.table = SlotTable(self.state)

    @property
    def sequences(self) -> int:
        return self.layers[0].keys.shape[0]

    # ---- schedule: one token per sequence ------------------------------------------------------

    def begin_prefix(self) -> None:
        prefix = self.layout.prefix_len
        self.state.occupancy = self.state.high_water = self.state.peak_occupancy = prefix
        self.table.reset(prefix)

    def begin_step(self, visual_index: int) -> torch.Tensor:
        """Reserve one slot per (sequence, head) for visual token `visual_index`; returns its position (0-d)."""
        state = self.state
        if state.ragged:
            raise RuntimeError("this cache has taken multi-token chunks: step it with begin_chunk/commit")
        if state.occupancy >= state.capacity:
            raise RuntimeError(f"cache overflow: {state.occupancy} slots in use of {state.capacity} "
                               f"(policy {self.policy.name} under-declared its slack)")
        position = self.layout.prefix_len + visual_index
        state.visual_index = visual_index
        state.occupancy += 1
        state.visual_count += 1
        slot = self.table.take(position)
        state.high_water = max(state.high_water, slot + 1)
        self.step.slot.fill_(slot)
        state.slot = slot
        state.peak_occupancy = max(state.peak_occupancy, state.occupancy)
        multiple = state.width_multiple
        state.width = min(state.capacity, -(-state.high_water // multiple) * multiple)
        state.masked = state.always_masked or state.padded or state.has_holes or state.width > state.high_water
        self.step.position.fill_(position)
        if self.layers[0].buffers_queries:
            self.step.line_slot.fill_(visual_index % self.layout.line_len)
        return self.step.position

    def end_step(self) -> None:
        """Evict down to the budget if the policy's schedule says so; called once all layers ran."""
        state, policy = self.state, self.policy
        if not policy.is_scoring_point(self.layout, state.visual_index):
            return
        excess = state.visual_count - self.budget
        context = EvictionContext(self.layout, self.budget, state.visual_index)
        if policy.selects_by_position:
            if excess > 0:
                self._evict_by_position(context, excess)
        else:
            top = self.layout.prefix_len + self.head_cap if self.head_cap else state.occupancy - excess
            self.step.line_mask = self._line_mask() if self.layers[0].buffers_queries else None
            for layer in self.layers:
                view = layer.view()
                policy.observe(view, context)
                if excess > 0:
                    self._evict(layer, policy.score(view, context), excess, top)
                layer.end_step()  # drop this layer's line probabilities before the next layer computes its own
            self.step.line_mask = None  # valid for this line end only
            if excess > 0:  # occupied slots lie below `top` again (dense, unless heads keep their own counts)
                self.table.reserve(top)
                state.high_water, state.head_holes = top, bool(self.head_cap)
        if excess > 0:
            state.visual_count -= excess
            state.occupancy = state.occupancy - excess if policy.selects_by_position else state.high_water
            state.evictions += 1

    def _evict(self, layer: LayerKV, scores: torch.Tensor, excess: int, top: int) -> None:
        """One layer's per-head eviction of `excess` tokens per (sequence, head) on average, down to slot `top`."""
        prefix = self.layout.prefix_len
        if self.head_cap:
            layer.compact(joint_victims(scores, layer.positions[:, :, :scores.shape[-1]], layer.valid[
                :, :, :scores.shape[-1]], prefix, self.budget, self.head_floor, self.head_cap), top)
        elif self.policy.evicts_new_tokens:
            layer.compact(lowest_mask(scores, layer.positions[:, :, :scores.shape[-1]],
                                      layer.valid[:, :, :scores.shape[-1]], prefix, excess), top)
        else:
            layer.evict(scores, excess)

    def _line_mask(self) -> torch.Tensor | None:
        """The (n, W) additive causal mask of the finished line's queries over slots [0, W = high_water), when
        the line sits in the last n slots in order and every slot below is a real token; otherwise None."""
        state, n = self.state, self.layout.line_len
        width = state.high_water
        if state.padded or state.has_holes or state.head_holes or width < self.layout.prefix_len + n:
            return None
        last = self.layout.prefix_len + state.visual_index
        if not torch.equal(self.table.positions[0, 0, width - n: width], torch.arange(last - n + 1, last + 1)):
            return None
        mask = torch.zeros(n, width, dtype=torch.float32)
        mask[:, width - n:] = torch.full((n, n), float("-inf")).triu(1)  # query i sees line tokens 0..i
        return mask.to(self.device)

    def _evict_by_position(self, context: EvictionContext, count: int) -> None:
        """Score once on the host table and free the same slots in every layer, sequence and head."""
        table, width = self.table, self.state.high_water
        scores = self.policy.score(CacheView(table), context)
        victims = lowest_scores(scores, table.positions[:, :, :width], table.valid[:, :, :width],
                                self.layout.prefix_len, count)[0, 0].tolist()
        table.release(victims)
        if count == 1:  # the per-step case: refill a preallocated index, no host-to-device copy
            slots = self.step.released.fill_(victims[0])
        else:
            slots = torch.tensor(victims, dtype=torch.long, device=self.device)
        for layer in self.layers:
            layer.release(slots)

    # ---- schedule: chunks of tokens, then a commit ---------------------------------------------

    def next_eviction(self, visual_index: int) -> int | None:
        """The first visual index >= `visual_index` whose commit evicts under this policy and budget, or None: a
        scoring point L evicts once the visual cache would exceed the budget there (L + 1 > B)."""
        period = self.policy.eviction_period(self.layout)
        if period is None:
            return None
        first = max(visual_index, self.budget)  # the first index whose commit leaves more than B visual tokens
        return -(-(first + 1) // period) * period - 1  # the first scoring point at or after it

    def begin_chunk(self, visual_index: torch.Tensor, length: int) -> None:
        """Reserve `length` slots per sequence for its visual tokens visual_index[s] .. + length - 1, written
        after its own occupied slots. visual_index (S,) must be each sequence's next token (the first
        uncommitted one). The step's queries then attend causally within the chunk (`LayerKV.attend`)."""
        state = self.state
        if not state.ragged:
            self._become_ragged()
        first = np.asarray(visual_index.cpu() if torch.is_tensor(visual_index) else visual_index, dtype=np.int64)
        if not np.array_equal(first, state.row_next):
            raise ValueError(f"chunk starts at visual tokens {first.tolist()} but the sequences' next tokens are "
                             f"{state.row_next.tolist()}: commit (or roll back) the previous chunk first")
        if not 1 <= length <= self.max_chunk or int(state.row_occupancy.max()) + length > state.capacity:
            raise RuntimeError(f"a chunk of {length} tokens does not fit: max_chunk {self.max_chunk}, "
                               f"{int(state.row_occupancy.max())} of {state.capacity} slots in use")
        offsets = np.arange(length)
        slots = state.row_occupancy[:, None] + offsets  # (S, k)
        device = self.device
        self.step.chunk_slots = torch.from_numpy(slots).to(device)
        self.step.chunk_visual = torch.from_numpy(first[:, None] + offsets).to(device)
        self.step.chunk_positions = self.step.chunk_visual + self.layout.prefix_len
        state.chunk = length
        state.high_water = max(state.high_water, int(slots.max()) + 1)
        state.width = min(state.capacity, -(-state.high_water // state.width_multiple) * state.width_multiple)
        state.peak_occupancy = max(state.peak_occupancy, int(slots.max()) + 1)
        slot = torch.arange(state.width, device=device)
        chunk_index = slot - self.step.chunk_slots[:, :1]  # (S, W): a slot's index within its sequence's chunk
        self.step.chunk_causal = (chunk_index[:, None, :] <= torch.arange(length, device=device)[:, None])[:, None]

    def commit(self, counts: torch.Tensor | list[int]) -> None:
        """Keep the first counts[s] tokens of sequence s's chunk and roll back the rest; then, for the committed
        tokens in order, the policy's schedule (accumulated attention, evictions) as sequential steps would."""
        state = self.state
        counts = np.asarray(counts.cpu() if torch.is_tensor(counts) else counts, dtype=np.int64)
        if counts.shape != (self.sequences,) or (counts < 0).any() or (counts > state.chunk).any():
            raise ValueError(f"commit counts {counts.tolist()} must be one per sequence in [0, {state.chunk}]")
        first_free = state.row_occupancy + counts
        slot = torch.arange(self.layers[0].keys.shape[2], device=self.device)
        rolled = (slot >= torch.from_numpy(first_free).to(self.device)[:, None]) & (
            slot < torch.from_numpy(state.row_occupancy + state.chunk).to(self.device)[:, None])  # (S, C)
        for layer in self.layers:
            layer.valid.masked_fill_(rolled[:, None], False)
            layer.positions.masked_fill_(rolled[:, None], -1)
        first_visual = state.row_next.copy()
        state.row_occupancy = first_free
        deferred = np.zeros(self.sequences, dtype=bool)
        for order in range(int(counts.max(initial=0))):
            deferred |= self._commit_token(first_visual + order, order, counts > order, counts)
        if deferred.any():  # scoring points that were each sequence's last committed token, in one pass
            self._score_rows(first_visual + counts - 1, deferred)
        state.row_next = first_visual + counts
        state.high_water = int(state.row_occupancy.max())
        for layer in self.layers:
            for signal in layer.signals.values():
                signal.end_chunk()
        state.chunk = 0

    def _commit_token(self, visual: np.ndarray, order: int, rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """The schedule for chunk token `order` of the sequences `rows` (S,) bool (visual indices `visual` (S,)).
        Sequences are independent, so a scoring point that is a sequence's last committed token is deferred
        to one pass after all orders (returned as a mask); one with tokens after it is scored now."""
        state, layout = self.state, self.layout
        state.row_visual = state.row_visual + rows
        rows_tensor = torch.from_numpy(rows).to(self.device)
        for layer in self.layers:
            for signal in layer.signals.values():
                signal.committed(layer, order, rows_tensor)
        at_point = rows & self.policy.is_scoring_point(layout, visual)
        last = at_point & (counts == order + 1)
        if (at_point & ~last).any():
            self._score_rows(visual, at_point & ~last, np.maximum(counts - order - 1, 0))
        return last

    def _score_rows(self, visual: np.ndarray, at_point: np.ndarray, later: np.ndarray | None = None) -> None:
        """Observe and evict (down to the budget) the sequences `at_point` (S,) at their visual indices (S,);
        `later` (S,): each sequence's committed tokens after that one (already in the store, kept, not counted)."""
        state, layout, policy = self.state, self.layout, self.policy
        later = np.zeros_like(visual) if later is None else later
        excess = np.where(at_point, np.maximum(state.row_visual - self.budget, 0), 0)
        self.step.scoring = torch.from_numpy(visual).to(self.device)
        context = EvictionContext(layout, self.budget, self.step.scoring[:, None, None], torch.from_numpy(
            at_point).to(self.device))
        counts, occupancy = (torch.from_numpy(array).to(self.device) for array in (excess, state.row_occupancy))
        top = (np.where(excess > 0, layout.prefix_len + self.head_cap + later, state.row_occupancy) if self.head_cap
               else state.row_occupancy - excess)
        for layer in self.layers:
            view = layer.view()
            policy.observe(view, context)
            if excess.any():
                self._evict_rows(layer, policy.score(view, context), excess, counts, occupancy, top, visual)
            layer.end_step()
        state.row_visual = state.row_visual - excess
        state.row_occupancy = top
        state.evictions += int(excess.any())
        state.head_holes |= bool(self.head_cap) and bool(excess.any())

    def _evict_rows(self, layer: LayerKV, scores: torch.Tensor, excess: np.ndarray, counts: torch.Tensor,
                    occupancy: torch.Tensor, top: np.ndarray, visual: np.ndarray) -> None:
        """`_evict` with each sequence's own count (S,): sequence s keeps its slots below top[s]; its tokens after
        visual[s] (committed in the same chunk) are neither victims nor counted."""
        width, prefix = scores.shape[-1], self.layout.prefix_len
        positions, valid = layer.positions[:, :, :width], layer.valid[:, :, :width]
        if self.head_cap:
            rows = torch.from_numpy(excess > 0).to(self.device)
            scored = valid & (positions <= torch.from_numpy(prefix + visual).to(self.device)[:, None, None])
            layer.compact(joint_victims(scores, positions, scored, prefix, self.budget, self.head_floor,
                                        self.head_cap, rows), top)
        elif self.policy.evicts_new_tokens:
            layer.compact(lowest_mask(scores, positions, valid, prefix, excess), top)
        else:
            layer.evict_rows(scores, counts, occupancy)

    def _become_ragged(self) -> None:
        """From here on every sequence keeps its own counts (they start equal)."""
        state, sequences = self.state, self.sequences
        if state.has_holes:  # position-based evictions leave free slots below the high-water mark
            raise RuntimeError("multi-token chunks need a cache without holes: start chunks right after the prefix")
        state.ragged = True
        state.row_occupancy = np.full(sequences, state.occupancy, dtype=np.int64)
        state.row_visual = np.full(sequences, state.visual_count, dtype=np.int64)
        state.row_next = np.full(sequences, state.visual_index + 1, dtype=np.int64)
        state.masked = True

    # ---- compilation ---------------------------------------------------------------------------

    def reset(self, policy: CachePolicy) -> None:
        """Empty the cache for a new generation under an equal `policy`, keeping every store in place."""
        self.policy = policy
        vars(self.state).update(vars(CacheState(self.state.capacity, width_multiple=self.state.width_multiple,
                                                always_masked=self.state.always_masked)))
        for layer in self.layers:
            layer.reset()

    def prepare_for_cuda_graphs(self, width_multiple: int = 64) -> None:
        """Mark the stores static (CUDA graphs keep their addresses) and bucket the attention width.

        With bucketed widths most steps attend past the high-water mark and need the occupancy mask;
        masking every step keeps one graph per cache, instead of a second one compiled for the few
        steps whose high-water mark falls on a bucket boundary."""
        self.state.width_multiple = width_multiple
        self.state.always_masked = True
        for tensor in [self.step.position, self.step.slot, self.step.line_slot, self.step.released,
                       *(t for layer in self.layers for t in layer.tensors())]:
            torch._dynamo.mark_static_address(tensor, guard=False)

    # ---- accounting ----------------------------------------------------------------------------

    def high_water_bytes(self) -> int:
        """Bytes of the group's slots ever in use at once (keys, values, positions, masks, per-slot signals)."""
        return sum(layer.slot_bytes() for layer in self.layers) * self.state.peak_occupancy


class KVCache:
    """Per-layer stores plus the policy's schedule. Models call `layers[i].append/attend` inside a step.

    `budget` is B (an int: every layer and head gets B, the paper's uniform allocation) or `Budgets`
    (lineareval/cache/allocation.py: a budget per layer, and per head for adaptive_heads). Layers with equal
    budgets share one `LayerGroup` (its counters, slot table and step inputs); a uniform cache is one group.
    `state` and `step` are the first group's: what all groups share (the visual index, a chunk's positions,
    raggedness, each sequence's next token) is the same in every group.
    """

    def __init__(self, policy: CachePolicy, layout: TokenLayout, budget: int | Budgets, *, num_layers: int,
                 sequences: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 spare_slot: bool = False, max_chunk: int = 1):
        """`spare_slot`: one never-used slot past the capacity per layer, for compiled steps (see LayerKV).
        `max_chunk`: the most tokens per sequence a chunk may hold (`begin_chunk`); a chunk of k needs k - 1
        slots beyond the policy's capacity."""
        budgets = budget if isinstance(budget, Budgets) else Budgets(int(budget), (int(budget),) * num_layers)
        if len(budgets.layers) != num_layers:
            raise ValueError(f"{len(budgets.layers)} layer budgets for a cache of {num_layers} layers")
        self.policy, self.layout, self.budgets, self.budget = policy, layout, budgets, budgets.visual_budget
        self.device = torch.device(device)
        self.max_chunk = max_chunk
        keys = [budgets.layer(index) for index in range(num_layers)]
        kinds = list(dict.fromkeys(keys))  # distinct (budget, head floor, head cap), first-seen order
        self.groups = [LayerGroup(policy, layout, *kind, num_layers=keys.count(kind), sequences=sequences, heads=heads,
                                  head_dim=head_dim, dtype=dtype, device=self.device, spare_slot=spare_slot,
                                  max_chunk=max_chunk) for kind in kinds]
        members = {kind: iter(group.layers) for kind, group in zip(kinds, self.groups)}
        self.layers = [next(members[key]) for key in keys]

    @property
    def state(self) -> CacheState:
        return self.groups[0].state

    @property
    def step(self) -> StepInputs:
        return self.groups[0].step

    @property
    def sequences(self) -> int:
        return self.layers[0].keys.shape[0]

    def begin_prefix(self) -> None:
        for group in self.groups:
            group.begin_prefix()

    def begin_step(self, visual_index: int) -> torch.Tensor:
        """Reserve one slot per layer, sequence and head for visual token `visual_index`; returns its position (0-d)."""
        for group in self.groups:
            group.begin_step(visual_index)
        return self.step.position

    def end_step(self) -> None:
        """Evict down to each layer's budget if the policy's schedule says so; called once all layers ran."""
        for group in self.groups:
            group.end_step()

    def next_eviction(self, visual_index: int) -> int | None:
        """The first visual index >= `visual_index` whose commit evicts in some layer, or None (never)."""
        indices = [index for group in self.groups if (index := group.next_eviction(visual_index)) is not None]
        return min(indices, default=None)

    def begin_chunk(self, visual_index: torch.Tensor, length: int) -> None:
        """See `LayerGroup.begin_chunk`: `length` tokens per sequence from visual_index[s] (S,)."""
        for group in self.groups:
            group.begin_chunk(visual_index, length)

    def commit(self, counts: torch.Tensor | list[int]) -> None:
        """See `LayerGroup.commit`: keep the first counts[s] tokens of sequence s's chunk, roll back the rest."""
        for group in self.groups:
            group.commit(counts)

    def reset(self, policy: CachePolicy) -> None:
        """Empty the cache for a new generation under an equal `policy`, keeping every store in place."""
        self.policy = policy
        for group in self.groups:
            group.reset(policy)

    def prepare_for_cuda_graphs(self, width_multiple: int = 64) -> None:
        for group in self.groups:
            group.prepare_for_cuda_graphs(width_multiple)

    def capacity_bytes(self) -> int:
        return tensor_bytes(*(t for layer in self.layers for t in layer.tensors()))

    def high_water_bytes(self) -> int:
        """Bytes of the slots ever in use at once (keys, values, positions, masks, per-slot signals; all layers)."""
        return sum(group.high_water_bytes() for group in self.groups)

    def visible_positions(self) -> list[torch.Tensor]:
        """Per layer, the (S, H, P + N) boolean map of positions currently in the cache (for tests)."""
        total = self.layout.prefix_len + self.layout.num_visual
        maps = []
        for layer in self.layers:
            visible = torch.zeros(*layer.valid.shape[:2], total + 1, dtype=torch.bool, device=layer.valid.device)
            index = torch.where(layer.valid, layer.positions, total)
            maps.append(visible.scatter_(2, index, True)[..., :total])
        return maps
