"""One layer's store: keys, values, each slot's original position and occupancy, and the policy's signals.

Shapes (S, H, C, ...) for S sequences (conditional and unconditional CFG rows are separate sequences),
H heads and C slots. Softmax attention does not depend on slot order and positions are already rotated
into the keys, so a token may sit in any slot: nothing is ever re-indexed. The schedule
(schedule.py) decides what is written where and what is evicted; the store writes, attends and moves.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lineareval.cache.policy import CacheView, TokenLayout
from lineareval.cache.state import CacheState, StepInputs


class LayerKV:
    """One layer's store. Tensors: keys/values (S, H, C + spare, D), positions/valid (S, H, C + spare).

    `spare` slots past the capacity are never written nor attended. A compiled step allocates one: the
    attended slice [0, width) is then never the whole store, whose contiguity the compiler would
    otherwise specialise on (width == C: a second graph, compiled again for the last steps).
    """

    def __init__(self, state: CacheState, step: StepInputs, layout: TokenLayout, signals: dict, *,
                 sequences: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, spare: int = 0):
        self.state, self.step, self.layout = state, step, layout
        self.head_dim, self.dtype = head_dim, dtype
        shape = (sequences, heads, state.capacity + spare)
        self._allocate(shape, head_dim, dtype, device)
        self.positions = torch.full(shape, -1, dtype=torch.long, device=device)
        self.valid = torch.zeros(shape, dtype=torch.bool, device=device)
        self.scale = 1.0 / math.sqrt(head_dim)
        self.signals = {name: spec.state(self) for name, spec in signals.items()}
        self.explicit = any(signal.every_step for signal in self.signals.values())  # probabilities every step
        self.buffers_queries = any(signal.line_queries for signal in self.signals.values())

    def _allocate(self, shape: tuple[int, int, int], head_dim: int, dtype: torch.dtype, device) -> None:
        """Keys and values: dense (S, H, C, D), one row per (sequence, head, slot)."""
        self.keys = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(*shape, head_dim, dtype=dtype, device=device)

    def kv_tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values]

    def tensors(self) -> list[torch.Tensor]:
        return [*self.kv_tensors(), self.positions, self.valid,
                *(t for signal in self.signals.values() for t in signal.tensors())]

    def slot_bytes(self) -> int:
        """Bytes of one slot across sequences and heads (the store and the per-slot signal state)."""
        per_slot = [t for t in self.tensors() if t.dim() >= 3 and t.shape[2] == self.positions.shape[2]]
        return sum(t.element_size() * t.numel() // t.shape[2] for t in per_slot)

    def high_water_bytes(self, peak_occupancy: int) -> int:
        """Bytes of the slots ever in use at once, given the peak occupancy per (sequence, head)."""
        return self.slot_bytes() * peak_occupancy

    def stored(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (S, H, W, D) of slots [0, width) (free slots hold anything: callers mask them)."""
        return self.keys[:, :, :width], self.values[:, :, :width]

    def stored_keys(self, width: int) -> torch.Tensor:
        """Keys (S, H, W, D) of slots [0, width)."""
        return self.keys[:, :, :width]

    def key_logits(self, queries: torch.Tensor, width: int) -> torch.Tensor:
        """Unscaled fp32 logits (S, H, q, W) of queries (S, H, q, D) against the keys of slots [0, width)."""
        return torch.matmul(queries, self.keys[:, :, :width].transpose(-1, -2)).float()

    def scoring_index(self) -> int | torch.Tensor:
        """Visual index of the token whose scoring point this is: an int, or (S,) per sequence (chunks)."""
        return self.step.scoring if self.state.chunked else self.state.visual_index

    # ---- writing -------------------------------------------------------------------------------

    def write_prefix(self, keys: torch.Tensor, values: torch.Tensor, present: torch.Tensor | None = None) -> None:
        """Store the condition prefix in slots [0, P). keys/values: (S, H, P, D).

        `present` (S, P) marks real prefix tokens when prompts of different lengths are padded to P:
        padding slots are never attended and never reused, so every sequence keeps the same layout
        (visual token i at layout index P + i) and the policies' thresholds stay uniform.
        """
        length = keys.shape[2]
        self._write_chunk(torch.arange(length, device=keys.device).expand(*keys.shape[:2], -1), keys, values)
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
        if self.state.chunked:
            return self._append_chunk(key, value)
        if torch.compiler.is_compiling():
            slot = self.step.slot
            self._write_index(slot, key, value)
            self.positions.index_fill_(2, slot, self.step.position)
            self.valid.index_fill_(2, slot, True)
            written = slot
        else:
            written = self.state.slot
            self._write_slot(written, key, value)
            self.positions.narrow(2, written, 1).fill_(self.step.position)
            self.valid.narrow(2, written, 1).fill_(True)
        for signal in self.signals.values():
            signal.written(self, written)

    def _append_chunk(self, key: torch.Tensor, value: torch.Tensor) -> None:
        slots = self.step.chunk_slots  # (S, k)
        heads, dim = key.shape[1], key.shape[3]
        index = slots[:, None, :].expand(-1, heads, -1)  # (S, H, k)
        self._write_chunk(index, key, value)
        self.positions.scatter_(2, index, self.step.chunk_positions[:, None, :].expand(-1, heads, -1))
        self.valid.scatter_(2, index, True)
        for signal in self.signals.values():
            signal.written(self, slots)

    def _write_slot(self, slot: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """key/value (S, H, 1, D) into the host's `slot` of every sequence and head (eager, aligned)."""
        self.keys.narrow(2, slot, 1).copy_(key)
        self.values.narrow(2, slot, 1).copy_(value)

    def _write_index(self, slot: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """key/value (S, H, 1, D) into slot (1,) of every sequence and head (compiled, aligned)."""
        self.keys.index_copy_(2, slot, key)
        self.values.index_copy_(2, slot, value)

    def _write_chunk(self, index: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """key/value (S, H, k, D) into the slots index (S, H, k)."""
        dim = key.shape[-1]
        self.keys.scatter_(2, index[..., None].expand(-1, -1, -1, dim), key)
        self.values.scatter_(2, index[..., None].expand(-1, -1, -1, dim), value)

    def _move(self, sources: torch.Tensor, targets: torch.Tensor) -> None:
        """Copy the keys and values of slots `sources` (S, H, c) into `targets` (S, H, c)."""
        dim = self.head_dim
        for store in self.kv_tensors():
            store.scatter_(2, targets[..., None].expand(-1, -1, -1, dim),
                           store.gather(2, sources[..., None].expand(-1, -1, -1, dim)))

    # ---- attention -----------------------------------------------------------------------------

    def attend(self, query: torch.Tensor) -> torch.Tensor:
        """Attention of the step's queries over the occupied slots. (S, H, k, D) -> (S, H, k, D)."""
        width = self.state.width
        keys, values = self.stored(width)
        if self.state.chunked:  # each sequence's chunk, causal among itself, after its own occupied slots
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

    def evict(self, victims: torch.Tensor, used: torch.Tensor, top: np.ndarray, occupancy: np.ndarray) -> None:
        """Free `victims` (S, H, c) (only where `used` (S, H, c)) and move the survivors among each sequence's
        newest slots [top[s], occupancy[s]) into the freed slots below top[s]; afterwards sequence s occupies
        [0, top[s]). Its region holds occupancy[s] - top[s] = the used victims' count slots, so survivors and
        victims below top pair one to one: the i-th survivor (in slot order) takes the i-th victim below top (in
        rank order, lowest score first); other pairs copy a slot onto itself. Victims may be anywhere, the
        newest tokens included."""
        sequences, heads, capacity, dim = self.keys.shape
        count, device = victims.shape[-1], victims.device
        first = torch.from_numpy(top).to(device)[:, None, None]  # (S, 1, 1)
        region = first + torch.arange(count, device=device)  # (S, 1, c): each sequence's newest slots
        in_region = (victims[..., :, None] == region[..., None, :]) & used[..., :, None]  # (S, H, c, c)
        survivor = used & ~in_region.any(dim=-2)  # region slot j survives (used: j < the sequence's count)
        below = used & (victims < first)
        rank = torch.arange(count, device=device)
        sources = region.expand_as(victims).gather(-1, torch.where(survivor, rank, count + rank).argsort(dim=-1))
        targets = victims.gather(-1, torch.where(below, rank, capacity + rank).argsort(dim=-1))
        pairs = rank < below.sum(dim=-1, keepdim=True)
        sources = sources.clamp(max=capacity - 1)
        targets = torch.where(pairs, targets, sources)
        rows = (torch.arange(sequences * heads, device=device).view(sequences, heads, 1) * capacity + targets).view(-1)
        for store in (self.keys, self.values):  # whole-row copies: about twice as fast as scatter_ on a CPU
            store.view(-1, dim).index_copy_(0, rows, store.gather(2, sources[..., None].expand(-1, -1, -1, dim))
                                            .view(-1, dim))
        self.positions.scatter_(2, targets, self.positions.gather(2, sources))
        for signal in self.signals.values():
            signal.moved(self, sources, targets, pairs)
        self.free_rows_from(top, occupancy)

    def free_rows_from(self, top: np.ndarray, occupancy: np.ndarray) -> None:
        """Mark slots [top[s], occupancy[s]) of every sequence free."""
        if (top == top[0]).all() and (occupancy == occupancy[0]).all():
            freed = slice(int(top[0]), int(occupancy[0]))
            self.valid[:, :, freed] = False
            self.positions[:, :, freed] = -1
            return
        slot = torch.arange(self.positions.shape[2], device=self.positions.device)
        freed = (slot >= torch.from_numpy(top).to(slot.device)[:, None]) & (
            slot < torch.from_numpy(occupancy).to(slot.device)[:, None])  # (S, C)
        self.valid.masked_fill_(freed[:, None], False)
        self.positions.masked_fill_(freed[:, None], -1)

    def compact(self, evicted: torch.Tensor, target: int | np.ndarray) -> None:
        """Free the slots marked in `evicted` (S, H, W), then move every surviving token at or above `target` (an
        int, or (S,) per sequence) into the free slots below it, lowest first. Afterwards all occupied slots lie
        below the target. Unlike `evict`, victims may be anywhere, tokens written since the previous scoring
        point included, and each (sequence, head) may free its own number of slots."""
        width, capacity, prefix = evicted.shape[-1], self.positions.shape[2], self.layout.prefix_len
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
        self._move(sources, targets)
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

    def check(self) -> None:
        """After a generation: raise if the store saw a write it could not hold (the packed store's rows)."""

    def end_scoring(self) -> None:
        """Release what is only valid at this scoring point (line probabilities: (S, H, n, W) fp32)."""
        for signal in self.signals.values():
            signal.end_step()

    def reset(self) -> None:
        self.valid.zero_()
        self.positions.fill_(-1)
        for signal in self.signals.values():
            signal.reset()
