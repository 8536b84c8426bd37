"""The policy's schedule over the layers of one budget: reserve slots for new tokens, commit them, evict.

One schedule for every decoding method. A step writes a chunk of k >= 1 tokens per sequence and
`commit(counts)` keeps the first counts[s] of sequence s, rolling the rest back as if they had never
been written; then each committed token, in order, does what a sequential step does at that point:
its attention counts towards accumulated scores and, at a scoring point once the visual cache exceeds
the budget, the group evicts (`_evict_pass`, the one place that scores and evicts). Semantics: a
chunk's queries see the cache as it was when the chunk began plus the chunk's earlier tokens; a
line-end policy scores the line from its buffered queries against the cache at the line's end.

Sequential decoding is a chunk of one for every sequence (`begin_step`, `commit()`), with a fast path
that matters for speed and for compilation: while sequences hold the same slots (`aligned`), the step
writes one slot the host knows, the same in every layer, sequence and head, what changes per step
lives in preallocated tensors (`StepInputs`) or host numbers a compiled step reads (`width`, a dynamic
size; `masked`, a flag the compiler specialises on), and queries' signals update at once.
"""

from __future__ import annotations

import numpy as np
import torch

from lineareval.cache.packed import PackedLayerKV
from lineareval.cache.policy import CachePolicy, EvictionContext, TokenLayout
from lineareval.cache.selection import JointEviction, PositionEviction, choose_eviction
from lineareval.cache.state import CacheState, SlotTable, StepInputs, attended_width
from lineareval.cache.store import LayerKV


class LayerGroup:
    """Layers with one budget: one set of counters (`CacheState`), step inputs and eviction strategy for all of
    them, as their occupancy is identical. `KVCache` holds one group per distinct layer budget.

    With `head_cap` (adaptive_heads, for policies that score per head) the group's heads share H * budget
    (`JointEviction`): heads hold different numbers of tokens, compacted below slot P + head_cap, and new
    tokens are written from there; attention always uses the occupancy mask (one compiled graph).
    """

    def __init__(self, policy: CachePolicy, layout: TokenLayout, budget: int, head_floor: int | None = None,
                 head_cap: int | None = None, *, num_layers: int, sequences: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, spare_slot: bool = False, max_chunk: int = 1,
                 packed_heads: bool = True):
        self.policy, self.layout, self.budget = policy, layout, budget
        self.device = torch.device(device)
        self.max_chunk = max_chunk
        self.eviction = choose_eviction(policy, layout, budget, head_floor, head_cap, max_chunk)
        joint = isinstance(self.eviction, JointEviction)
        self.head_cap = head_cap if joint else None
        capacity = layout.prefix_len + head_cap + policy.slack(layout) if joint else policy.capacity(layout, budget)
        # a chunk of k writes k slots past what the policy keeps (sequences that finished early included)
        self.state = CacheState(capacity=capacity + max_chunk - 1, sequences=sequences, always_masked=joint)
        self.step = StepInputs(self.device)
        store, rows = LayerKV, {}
        if joint and packed_heads:  # keys and values in a pool of the uniform store's size (packed.py)
            store, rows = PackedLayerKV, {"rows_per_head": policy.capacity(layout, budget) + max_chunk - 1}
        self.layers = [store(self.state, self.step, layout, policy.signals(), sequences=sequences, heads=heads,
                             head_dim=head_dim, dtype=dtype, device=self.device, spare=int(spare_slot), **rows)
                       for _ in range(num_layers)]
        self.table = SlotTable(self.state.capacity) if isinstance(self.eviction, PositionEviction) else None
        self.in_order_from = 0  # aligned: visual tokens from here on sit in order in the newest slots

    @property
    def sequences(self) -> int:
        return self.state.sequences

    # ---- one token per sequence ----------------------------------------------------------------

    def begin_prefix(self) -> None:
        state, prefix = self.state, self.layout.prefix_len
        state.occupancy[:] = prefix
        state.high_water = state.peak_occupancy = prefix
        if self.table is not None:
            self.table.reset(prefix)

    def begin_step(self, visual_index: int) -> torch.Tensor:
        """Reserve one slot per (sequence, head) for visual token `visual_index` of every sequence (a chunk of
        one); returns its layout position (0-d). Commit with `commit()`."""
        state = self.state
        if not state.aligned:  # sequences hold their own slots: the general chunk path
            self.begin_chunk(np.full(self.sequences, visual_index), 1)
            return self.step.position.fill_(self.layout.prefix_len + visual_index)
        self._check_next(np.full(self.sequences, visual_index))
        occupancy = int(state.occupancy[0])
        if occupancy >= state.capacity:
            raise RuntimeError(f"cache overflow: {occupancy} slots in use of {state.capacity} "
                               f"(policy {self.policy.name} under-declared its slack)")
        position = self.layout.prefix_len + visual_index
        slot = self.table.take(position) if self.table is not None else occupancy
        state.visual_index, state.slot = visual_index, slot
        state.occupancy += 1
        state.high_water = max(state.high_water, slot + 1)
        state.peak_occupancy = max(state.peak_occupancy, occupancy + 1)
        state.set_width()
        state.masked = state.always_masked or state.padded or state.holes or state.width > state.high_water
        self.step.slot.fill_(slot)
        self.step.position.fill_(position)
        if self.layers[0].buffers_queries:
            self.step.line_slot.fill_(visual_index % self.layout.line_len)
        return self.step.position

    # ---- chunks --------------------------------------------------------------------------------

    def begin_chunk(self, visual_index, length: int) -> None:
        """Reserve `length` slots per sequence for its visual tokens visual_index[s] .. + length - 1, written
        after its own occupied slots. visual_index (S,) must be each sequence's next token (the first
        uncommitted one). The step's queries then attend causally within the chunk (`LayerKV.attend`)."""
        state = self.state
        first = np.asarray(visual_index.cpu() if torch.is_tensor(visual_index) else visual_index, dtype=np.int64)
        self._check_next(first)
        if state.holes or self.table is not None:
            raise RuntimeError(f"policy {self.policy.name} frees slots in place (selects_by_position) in this "
                               "cache: multi-token chunks need a cache built with max_chunk > 1")
        if not 1 <= length <= self.max_chunk or int(state.occupancy.max()) + length > state.capacity:
            raise RuntimeError(f"a chunk of {length} tokens does not fit: max_chunk {self.max_chunk}, "
                               f"{int(state.occupancy.max())} of {state.capacity} slots in use")
        offsets = np.arange(length)
        slots = state.occupancy[:, None] + offsets  # (S, k)
        device = self.device
        self.step.chunk_slots = torch.from_numpy(slots).to(device)
        self.step.chunk_visual = torch.from_numpy(first[:, None] + offsets).to(device)
        self.step.chunk_positions = self.step.chunk_visual + self.layout.prefix_len
        state.chunk, state.aligned, state.masked = length, False, True
        state.high_water = max(state.high_water, int(slots.max()) + 1)
        state.peak_occupancy = max(state.peak_occupancy, int(slots.max()) + 1)
        state.set_width()
        slot = torch.arange(state.width, device=device)
        chunk_index = slot - self.step.chunk_slots[:, :1]  # (S, W): a slot's index within its sequence's chunk
        self.step.chunk_causal = (chunk_index[:, None, :] <= torch.arange(length, device=device)[:, None])[:, None]

    def _check_next(self, first: np.ndarray) -> None:
        if not np.array_equal(first, self.state.next):
            raise ValueError(f"a step starts at visual tokens {first.tolist()} but the sequences' next tokens are "
                             f"{self.state.next.tolist()}: commit (or roll back) the previous chunk first")

    def commit(self, counts=None) -> None:
        """Keep the first counts[s] tokens of sequence s's open step and roll back the rest (None: all of an
        aligned one-token step); then, for the committed tokens in order, the schedule as sequential steps."""
        state = self.state
        if not state.chunked:  # an aligned one-token step: every sequence commits its token
            state.visual += 1
            state.next += 1
            visual = state.visual_index
            if self.policy.is_scoring_point(self.layout, visual):
                self._evict_pass(np.full(self.sequences, visual), np.ones(self.sequences, dtype=bool))
            return
        counts = np.asarray(counts.cpu() if torch.is_tensor(counts) else
                            np.ones(self.sequences) if counts is None else counts, dtype=np.int64)
        if counts.shape != (self.sequences,) or (counts < 0).any() or (counts > state.chunk).any():
            raise ValueError(f"commit counts {counts.tolist()} must be one per sequence in [0, {state.chunk}]")
        for layer in self.layers:
            layer.free_rows_from(state.occupancy + counts, state.occupancy + state.chunk)
        first_visual = state.next.copy()
        state.occupancy = state.occupancy + counts
        deferred = np.zeros(self.sequences, dtype=bool)
        for order in range(int(counts.max(initial=0))):
            rows = counts > order
            visual = first_visual + order
            state.visual = state.visual + rows
            rows_tensor = torch.from_numpy(rows).to(self.device)
            for layer in self.layers:
                for signal in layer.signals.values():
                    signal.committed(layer, order, rows_tensor)
            at_point = rows & self.policy.is_scoring_point(self.layout, visual)
            last = at_point & (counts == order + 1)  # a sequence's last committed token: one pass after the loop
            if (at_point & ~last).any():
                self._evict_pass(visual, at_point & ~last, np.maximum(counts - order - 1, 0))
            deferred |= last
        if deferred.any():
            self._evict_pass(first_visual + counts - 1, deferred)
        state.next = first_visual + counts
        state.high_water = int(state.occupancy.max())
        for layer in self.layers:
            for signal in layer.signals.values():
                signal.end_chunk()
        state.chunk = 0

    # ---- eviction ------------------------------------------------------------------------------

    def _evict_pass(self, visual: np.ndarray, at_point: np.ndarray, later: np.ndarray | None = None) -> None:
        """The scoring point of the sequences `at_point` (S,) at their visual indices (S,): observe, and evict down
        to the budget. `later` (S,): each sequence's committed tokens after that one (already in the store, kept,
        not counted)."""
        state, layout, policy = self.state, self.layout, self.policy
        later = np.zeros_like(visual) if later is None else later
        excess = np.where(at_point, np.maximum(state.visual - self.budget, 0), 0)  # `later` not yet counted
        if isinstance(self.eviction, PositionEviction):  # aligned: one count, the host's table
            if excess[0] > 0:
                self._evict_by_position(EvictionContext(layout, self.budget, int(visual[0])), int(excess[0]))
                state.visual -= excess
                state.occupancy -= excess
                state.evictions += 1
            return
        if state.chunked:
            self.step.scoring = torch.from_numpy(visual).to(self.device)
            context = EvictionContext(layout, self.budget, self.step.scoring[:, None, None],
                                      torch.from_numpy(at_point).to(self.device))
            limit = torch.from_numpy(layout.prefix_len + visual).to(self.device)[:, None, None]
        else:
            context, limit = EvictionContext(layout, self.budget, int(visual[0])), None
            self.step.line_mask = self._line_mask() if self.layers[0].buffers_queries else None
        evicting = bool(excess.any())
        top = (np.where(excess > 0, layout.prefix_len + self.head_cap + later, state.occupancy) if self.head_cap
               else state.occupancy - excess)
        for layer in self.layers:
            view = layer.view()
            policy.observe(view, context)
            if evicting:
                scores = self.eviction.checked(policy.score(view, context), view)
                candidates = view.valid & (view.positions >= layout.prefix_len)
                if limit is not None:
                    candidates &= view.positions <= limit
                self.eviction.apply(layer, scores, candidates, excess, top, state.occupancy)
            layer.end_scoring()  # drop this layer's line probabilities before the next layer computes its own
        self.step.line_mask = None  # valid for this scoring point only
        if evicting:
            state.visual = state.visual - excess
            state.occupancy = top
            state.high_water = int(top.max()) if not state.chunked else state.high_water
            state.evictions += 1
            state.head_holes |= self.head_cap is not None
            self.in_order_from = int(visual[0]) + 1

    def _evict_by_position(self, context: EvictionContext, count: int) -> None:
        """Score once on the host table and free the same slots in every layer, sequence and head."""
        victims = self.eviction.victims(self.table, self.state.high_water, context, count, self.layout.prefix_len)
        self.table.release(victims)
        if count == 1:  # the per-step case: refill a preallocated index, no host-to-device copy
            slots = self.step.released.fill_(victims[0])
        else:
            slots = torch.tensor(victims, dtype=torch.long, device=self.device)
        for layer in self.layers:
            layer.release(slots)

    def _line_mask(self) -> torch.Tensor | None:
        """The (n, W) additive causal mask of the finished line's queries over slots [0, W = high_water), when
        the line sits in the last n slots in order and every slot below is a real token; otherwise None."""
        state, n = self.state, self.layout.line_len
        width = state.high_water
        line_start = state.visual_index + 1 - n
        if (state.padded or state.holes or state.head_holes or width < self.layout.prefix_len + n
                or line_start < self.in_order_from or width != int(state.occupancy[0])):
            return None
        mask = torch.zeros(n, width, dtype=torch.float32)
        mask[:, width - n:] = torch.full((n, n), float("-inf")).triu(1)  # query i sees line tokens 0..i
        return mask.to(self.device)

    def next_eviction(self, visual_index: int) -> int | None:
        """The first visual index >= `visual_index` whose commit evicts under this policy and budget, or None: a
        scoring point L evicts once the visual cache would exceed the budget there (L + 1 > B)."""
        period = self.policy.eviction_period(self.layout)
        if period is None:
            return None
        first = max(visual_index, self.budget)  # the first index whose commit leaves more than B visual tokens
        return -(-(first + 1) // period) * period - 1  # the first scoring point at or after it

    def verify(self) -> None:
        """After a generation: stop with the policy's name if its scores broke the contract (selection.py)."""
        self.eviction.verify()
        for layer in self.layers:
            layer.check()

    # ---- reuse and compilation -----------------------------------------------------------------

    def reset(self, policy: CachePolicy) -> None:
        """Empty the group for a new generation under an equal `policy`, keeping every store in place."""
        self.policy = self.eviction.policy = policy
        self.eviction.reset()
        old = self.state
        fresh = CacheState(old.capacity, old.sequences, width_multiple=old.width_multiple,
                           always_masked=old.always_masked)
        vars(old).update(vars(fresh))
        self.in_order_from = 0
        for layer in self.layers:
            layer.reset()

    def prepare_for_cuda_graphs(self, width_multiple: int = 64) -> None:
        """Mark the stores static (CUDA graphs keep their addresses) and bucket the attention width.

        With bucketed widths most steps attend past the high-water mark and need the occupancy mask;
        masking every step keeps one graph per cache, instead of a second one compiled for the few
        steps whose high-water mark falls on a bucket boundary."""
        self.state.width_multiple = width_multiple
        self.state.always_masked = True
        for tensor in [*self.step.static_tensors(), *(t for layer in self.layers for t in layer.tensors())]:
            torch._dynamo.mark_static_address(tensor, guard=False)

    def high_water_bytes(self) -> int:
        """Bytes of the group's slots ever in use at once (keys, values, positions, masks, per-slot signals)."""
        return sum(layer.high_water_bytes(self.state.peak_occupancy) for layer in self.layers)


__all__ = ["LayerGroup", "attended_width"]
