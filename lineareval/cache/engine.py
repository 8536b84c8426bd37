"""The KV-cache engine: one preallocated store per layer, shared by every model and every policy.

Each layer holds post-RoPE keys, values, each slot's original position and an occupancy mask, all of
shape (S, H, C, ...) for S sequences (conditional and unconditional CFG rows are separate sequences),
H heads and C slots. C is what the policy declares (full: prefix + N; compressing: prefix + B + slack),
so memory follows the budget, not N. Softmax attention does not depend on slot order and positions
are already rotated into the keys, so a token may sit in any slot: nothing is ever re-indexed.

Static shapes, so the decode step can be compiled: nothing is allocated or resized while decoding.
Every step writes its token into one slot that the host knows, the same in every layer, sequence
and head, and attention spans slots [0, width) without a mask as long as they are all occupied.
What changes from step to step lives in small preallocated tensors (`StepInputs`: position, write
slot, index within the line) or in host numbers that a compiled step reads (`CacheState.width`, a
dynamic size; `CacheState.masked`, a boolean the compiler specialises on).

Two kinds of eviction keep that true:

- by position (`window`, `streamingllm`: `selects_by_position`): every layer, sequence and head
  evicts the same slots, so the host scores its own copy of the slot layout (`SlotTable`), frees
  the victims everywhere with one indexed write per layer and writes the next token into them: no
  top-k on the device, no device-to-host synchronisation;
- per head (H2O, LineAR): one top-k per layer at the scoring point picks each (sequence, head)'s
  victims, then the tokens written since the previous eviction (never victims themselves: both
  policies protect them) move into the victims' slots. The occupied slots stay [0, occupancy), so the
  next tokens are appended after them and attention needs no mask; the move copies at most one
  line's slots per layer and line (one slot per step for H2O).
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lineareval.cache.policy import CachePolicy, EvictAt, EvictionContext, ScoreNeed, TokenLayout
from lineareval.memory import tensor_bytes

log = logging.getLogger(__name__)


@dataclass
class CacheState:
    """Counters shared by all layers: occupancy is identical for every layer, head and sequence."""

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

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.positions[0, 0, slot], self.valid[0, 0, slot] = -1, False
            heapq.heappush(self._free, slot)


def lowest_scores(keep_scores: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, prefix_len: int,
                  count: int, kept_from: int | None = None) -> torch.Tensor:
    """Slots of the `count` lowest keep-scores per row, never a free or prefix slot, nor one at or above
    `kept_from`. (..., W) -> (..., count)."""
    protected = ~valid | (positions < prefix_len)
    if kept_from is not None:
        protected[..., kept_from:] = True
    scores = keep_scores.float().masked_fill(protected, float("inf"))
    return scores.topk(count, dim=-1, largest=False).indices


class LayerKV:
    """One layer's store. Tensors: keys/values (S, H, C + spare, D), positions/valid (S, H, C + spare).

    `spare` slots past the capacity are never written nor attended. A compiled step allocates one: the
    attended slice [0, width) is then never the whole store, whose contiguity the compiler would
    otherwise specialise on (width == C: a second graph, compiled again for the last steps).
    """

    def __init__(self, state: CacheState, step: StepInputs, layout: TokenLayout, needs: ScoreNeed, *,
                 sequences: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, spare: int = 0):
        self.state, self.step, self.layout, self.needs = state, step, layout, needs
        shape = (sequences, heads, state.capacity + spare)
        self.keys = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        self.positions = torch.full(shape, -1, dtype=torch.long, device=device)
        self.valid = torch.zeros(shape, dtype=torch.bool, device=device)
        self.scale = 1.0 / math.sqrt(head_dim)
        # attention probability each slot received, accumulated (H2O; LineAR's cumulative score)
        self.received = torch.zeros(shape, dtype=torch.float32, device=device) if needs is not ScoreNeed.NEVER else None
        # queries of the current line, for LineAR's line-end scoring: (S, H, n, D)
        self.line_queries = (torch.zeros(sequences, heads, layout.line_len, head_dim, dtype=dtype, device=device)
                             if needs is ScoreNeed.LINE_END else None)
        self._line_probs: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values, self.positions, self.valid, self.received, self.line_queries)
                if t is not None]

    def slot_bytes(self) -> int:
        """Bytes of one slot across sequences and heads (keys, values, position, mask)."""
        return sum(t.element_size() * t.numel() // t.shape[2] for t in self.tensors() if t is not self.line_queries)

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
        """Write this step's token into its slot in every sequence and head. key/value: (S, H, 1, D).

        A compiled step indexes with the slot tensor (one graph for every slot); eager code writes the
        host's slot directly, about three times cheaper than `index_copy_` on a CPU."""
        if torch.compiler.is_compiling():
            slot = self.step.slot
            self.keys.index_copy_(2, slot, key)
            self.values.index_copy_(2, slot, value)
            self.positions.index_fill_(2, slot, self.step.position)
            self.valid.index_fill_(2, slot, True)
            if self.received is not None:
                self.received.index_fill_(2, slot, 0.0)
            return
        slot = self.state.slot
        self.keys.narrow(2, slot, 1).copy_(key)
        self.values.narrow(2, slot, 1).copy_(value)
        self.positions.narrow(2, slot, 1).fill_(self.step.position)
        self.valid.narrow(2, slot, 1).fill_(True)
        if self.received is not None:
            self.received.narrow(2, slot, 1).fill_(0.0)

    # ---- attention -----------------------------------------------------------------------------

    def attend(self, query: torch.Tensor) -> torch.Tensor:
        """Attention of one new query per sequence over the occupied slots. (S, H, 1, D) -> (S, H, 1, D)."""
        width = self.state.width
        keys, values = self.keys[:, :, :width], self.values[:, :, :width]
        mask = self.valid[:, :, None, :width] if self.state.masked else None
        if self.line_queries is not None:
            if torch.compiler.is_compiling():
                self.line_queries.index_copy_(2, self.step.line_slot, query)
            else:
                self.line_queries.narrow(2, self.state.visual_index % self.layout.line_len, 1).copy_(query)
        if self.needs is not ScoreNeed.EVERY_STEP:
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)
        # explicit probabilities from the same pass that produces the output (H2O)
        logits = torch.matmul(query, keys.transpose(-1, -2)).float() * self.scale  # (S, H, 1, W)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        self.received[:, :, :width] += probs[:, :, 0]
        return torch.matmul(probs.to(values.dtype), values)

    def line_probabilities(self) -> torch.Tensor:
        """Attention probabilities of the just-finished line's queries, causal inside the line.

        Returns (S, H, n, W) over slots [0, high_water). Computed once per line end, from buffered
        queries, against the cache as it was while the line was generated (nothing is evicted
        inside a line, so the cache holds exactly what each query saw, plus later line tokens that
        the causal mask hides). When the line fills the last n slots in order below a hole-free,
        unpadded store (always, under the engine's LineAR schedule) the mask is the engine's shared
        (n, W) additive `StepInputs.line_mask`; otherwise it is built from the slots' positions.
        """
        if self._line_probs is None:
            width, n = self.state.high_water, self.layout.line_len
            logits = torch.matmul(self.line_queries, self.keys[:, :, :width].transpose(-1, -2)).float()
            logits.mul_(self.scale)  # in place: no second (S, H, n, W) block
            mask = self.step.line_mask
            if mask is not None and mask.shape[-1] == width:
                logits += mask
            else:
                last = self.layout.prefix_len + self.state.visual_index
                query_positions = torch.arange(last - n + 1, last + 1, device=self.keys.device)  # (n,)
                visible = self.valid[:, :, None, :width] & (self.positions[:, :, None, :width] <= query_positions[:, None])
                logits.masked_fill_(~visible, float("-inf"))
            self._line_probs = torch.softmax(logits, dim=-1)
        return self._line_probs

    # ---- eviction ------------------------------------------------------------------------------

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
        if self.received is not None:
            self.received.scatter_(2, victims, self.received[:, :, moved].clone())
        self.valid[:, :, moved] = False
        self.positions[:, :, moved] = -1

    def release(self, slots: torch.Tensor) -> None:
        """Free the same slots (k,) in every sequence and head (eviction by position)."""
        self.valid.index_fill_(2, slots, False)
        self.positions.index_fill_(2, slots, -1)

    def end_step(self) -> None:
        """Release the step's cached line probabilities ((S, H, n, W) fp32: large at big batches)."""
        self._line_probs = None


class KVCache:
    """Per-layer stores plus the policy's schedule. Models call `layers[i].append/attend` inside a step."""

    def __init__(self, policy: CachePolicy, layout: TokenLayout, budget: int, *, num_layers: int, sequences: int,
                 heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str, spare_slot: bool = False):
        """`spare_slot`: one never-used slot past the capacity per layer, for compiled steps (see LayerKV)."""
        self.policy, self.layout, self.budget = policy, layout, budget
        self.device = torch.device(device)
        self.state = CacheState(capacity=policy.capacity(layout, budget))
        self.step = StepInputs(self.device)
        self.layers = [LayerKV(self.state, self.step, layout, policy.needs_scores, sequences=sequences, heads=heads,
                               head_dim=head_dim, dtype=dtype, device=self.device, spare=int(spare_slot))
                       for _ in range(num_layers)]
        self.table = SlotTable(self.state)

    # ---- schedule ------------------------------------------------------------------------------

    def begin_prefix(self) -> None:
        prefix = self.layout.prefix_len
        self.state.occupancy = self.state.high_water = self.state.peak_occupancy = prefix
        self.table.reset(prefix)

    def begin_step(self, visual_index: int) -> torch.Tensor:
        """Reserve one slot per (sequence, head) for visual token `visual_index`; returns its position (0-d)."""
        state = self.state
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
        if self.policy.needs_scores is ScoreNeed.LINE_END:
            self.step.line_slot.fill_(visual_index % self.layout.line_len)
        return self.step.position

    def end_step(self) -> None:
        """Evict down to the budget if the policy's schedule says so; called once all layers ran."""
        state, policy = self.state, self.policy
        scoring_point = {EvictAt.STEP: True, EvictAt.NEVER: False,
                         EvictAt.LINE_END: self.layout.is_line_end(state.visual_index)}[policy.evicts_at]
        if not scoring_point:
            return
        excess = state.visual_count - self.budget
        context = EvictionContext(self.layout, self.budget, state.visual_index)
        if policy.selects_by_position:
            if excess > 0:
                self._evict_by_position(context, excess)
        else:
            if policy.needs_scores is ScoreNeed.LINE_END:
                self.step.line_mask = self._line_mask()
            for layer in self.layers:
                policy.observe(layer, context)
                if excess > 0:
                    layer.evict(policy.score(layer, context), excess)
                layer.end_step()  # drop this layer's line probabilities before the next layer computes its own
            self.step.line_mask = None  # valid for this line end only
            if excess > 0:  # the moved tokens' old slots are free: occupied slots are [0, occupancy) again
                top = state.occupancy - excess
                self.table.release(list(range(top, state.occupancy)))
                state.high_water = top
        if excess > 0:
            state.visual_count -= excess
            state.occupancy -= excess
            state.evictions += 1

    def _line_mask(self) -> torch.Tensor | None:
        """The (n, W) additive causal mask of the finished line's queries over slots [0, W = high_water), when
        the line sits in the last n slots in order and every slot below is a real token; otherwise None."""
        state, n = self.state, self.layout.line_len
        width = state.high_water
        if state.padded or state.has_holes or width < self.layout.prefix_len + n:
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
        scores = self.policy.score(table, context)
        victims = lowest_scores(scores, table.positions[:, :, :width], table.valid[:, :, :width],
                                self.layout.prefix_len, count)[0, 0].tolist()
        table.release(victims)
        if count == 1:  # the per-step case: refill a preallocated index, no host-to-device copy
            slots = self.step.released.fill_(victims[0])
        else:
            slots = torch.tensor(victims, dtype=torch.long, device=self.device)
        for layer in self.layers:
            layer.release(slots)

    # ---- compilation ---------------------------------------------------------------------------

    def reset(self, policy: CachePolicy) -> None:
        """Empty the cache for a new generation under an equal `policy`, keeping every store in place."""
        self.policy = policy
        vars(self.state).update(vars(CacheState(self.state.capacity, width_multiple=self.state.width_multiple,
                                                always_masked=self.state.always_masked)))
        for layer in self.layers:
            layer.valid.zero_()
            layer.positions.fill_(-1)
            if layer.received is not None:
                layer.received.zero_()
            layer._line_probs = None

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

    def capacity_bytes(self) -> int:
        return tensor_bytes(*(t for layer in self.layers for t in layer.tensors()))

    def high_water_bytes(self) -> int:
        """Bytes of the slots ever in use at once (keys, values, positions, masks; all layers)."""
        return sum(layer.slot_bytes() for layer in self.layers) * self.state.peak_occupancy

    def visible_positions(self) -> list[torch.Tensor]:
        """Per layer, the (S, H, P + N) boolean map of positions currently in the cache (for tests)."""
        total = self.layout.prefix_len + self.layout.num_visual
        maps = []
        for layer in self.layers:
            visible = torch.zeros(*layer.valid.shape[:2], total + 1, dtype=torch.bool, device=layer.valid.device)
            index = torch.where(layer.valid, layer.positions, total)
            maps.append(visible.scatter_(2, index, True)[..., :total])
        return maps
