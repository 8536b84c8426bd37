"""A store whose memory follows per-head budgets: keys and values in one pool of rows per sequence.

Under `budget_allocation=adaptive_heads` the heads of a layer share H * B_l visual tokens: one head may
hold up to `cap` (2 B_l by default) while another holds its floor. A dense (S, H, C, D) store must give
every head the largest head's slots; this one does not. Each sequence has a pool of
T = H * U rows of keys and values, U being the uniform store's slots per head (P + B_l + slack, plus a
chunk's extra): exactly the uniform store's bytes. What the schedule sees is unchanged: a logical slot
space (S, H, C) sized for the cap, holding positions, occupancy and the policy's signals (a few bytes a
slot), and `rows` (S, H, C) maps each logical slot to its pool row. So:

- writes go to the rows of the logical slots the schedule reserves;
- moves (compaction after a joint eviction) move row numbers, not keys and values;
- after each compaction every logical slot at or above the new top (where the next tokens will be
  written, the same slots in every head) gets a free row: the pool then holds H * (P + B_l + later) rows
  in use and H * m free, m per head, exactly what the heads write before the next scoring point;
- attention is one product per sequence of its H * k queries with its pool rows, each head's queries
  masked to the rows of its own occupied slots (keys and values are read once, as a uniform store's;
  no per-step copy), and line or window scores likewise (`key_logits`); only a policy that reads keys
  (`CacheView.keys`) gets a (S, H, W, D) copy of its slots, at its scoring points. The sums run over the
  pool's order, so logits equal the dense store's to round-off and slot layouts exactly (the tests
  check); on the demo model the sampled tokens were identical (HeadKV at keep 1/4, 400 samples).

A write into a logical slot without a row (which would mean the schedule wrote more tokens than the
pool holds: an engine bug) is recorded on the device and stops the run at `verify`.
"""

from __future__ import annotations

import numpy as np
import torch

from lineareval.cache.store import LayerKV


class PackedLayerKV(LayerKV):
    """`LayerKV` with keys/values in a pool of `rows_per_head * H` rows per sequence (see the module docstring).

    Pool tensors are (S, T + 1, D): row T (`unmapped`) is the row of logical slots that have none; it stays
    zero and is never attended (its slots are free, hence masked)."""

    def __init__(self, *args, rows_per_head: int, **kwargs):
        self.rows_per_head = rows_per_head
        super().__init__(*args, **kwargs)

    def _allocate(self, shape: tuple[int, int, int], head_dim: int, dtype: torch.dtype, device) -> None:
        sequences, heads, slots = shape
        self.unmapped = heads * self.rows_per_head
        self.pool_keys = torch.zeros(sequences, self.unmapped + 1, head_dim, dtype=dtype, device=device)
        self.pool_values = torch.zeros_like(self.pool_keys)
        self.rows = torch.empty(shape, dtype=torch.int32, device=device)  # int32: 4 bytes a logical slot
        self.row_base = (torch.arange(sequences, device=device) * (self.unmapped + 1)).view(sequences, 1, 1)
        self.unmapped_writes = torch.zeros((), dtype=torch.bool, device=device)
        self._initial_rows()

    def _initial_rows(self) -> None:
        """Head h's logical slot c < U holds pool row h * U + c: enough for every token before the first eviction."""
        heads, slots = self.rows.shape[1:]
        slot = torch.arange(slots, device=self.rows.device)
        head = torch.arange(heads, device=self.rows.device)[:, None]
        self.rows.copy_(torch.where(slot < self.rows_per_head, head * self.rows_per_head + slot, self.unmapped)
                        .expand_as(self.rows))

    def kv_tensors(self) -> list[torch.Tensor]:
        return [self.pool_keys, self.pool_values]

    def tensors(self) -> list[torch.Tensor]:
        return [*super().tensors(), self.rows, self.unmapped_writes]

    def slot_bytes(self) -> int:
        """Bytes of one logical slot across sequences and heads: positions, occupancy, row, per-slot signals."""
        per_slot = [self.positions, self.valid, self.rows,
                    *(t for signal in self.signals.values() for t in signal.tensors()
                      if t.dim() >= 3 and t.shape[2] == self.positions.shape[2])]
        return sum(t.element_size() * t.numel() // t.shape[2] for t in per_slot)

    def high_water_bytes(self, peak_occupancy: int) -> int:
        """Logical slots up to the peak, and the pool rows they can hold (at most the pool)."""
        sequences, heads = self.rows.shape[:2]
        row_bytes = sum(t.element_size() * t[0, 0].numel() for t in self.kv_tensors())
        rows = min(self.unmapped, heads * peak_occupancy)
        return self.slot_bytes() * peak_occupancy + row_bytes * sequences * rows

    # ---- reading and writing through the rows ----------------------------------------------------

    def stored_keys(self, width: int) -> torch.Tensor:
        """Keys (S, H, W, D) of slots [0, width), gathered from their rows (free slots: whatever row they name)."""
        dim, rows = self.pool_keys.shape[-1], self.rows[:, :, :width]
        flat = (self.row_base + rows).reshape(-1)
        return self.pool_keys.view(-1, dim).index_select(0, flat).view(*rows.shape, dim)

    def attend(self, query: torch.Tensor) -> torch.Tensor:
        """Attention of the step's queries (S, H, k, D) over the pool, each head's queries masked to its own occupied
        rows: one product per sequence of its H * k queries with its T rows (the keys and values are read once, as
        a uniform store's; no (S, H, W, D) copy), then the same mask rules as `LayerKV.attend`; it replaces
        `LayerKV.attend` and its `stored` keys and values."""
        sequences, heads, k, dim = query.shape
        width, pool = self.state.width, self.unmapped
        visible = self.valid[:, :, None, :width]  # adaptive_heads always attends with the occupancy mask
        if self.state.chunked:
            visible = visible & self.step.chunk_causal[..., :width]
        visible = visible.expand(-1, -1, k, -1)
        rows = self.rows[:, :, None, :width].long().expand(-1, -1, k, -1)  # (S, H, k, W)
        # each visible slot's row, marked for its head's queries (an occupied row belongs to one slot of one head)
        mask = torch.zeros(sequences, heads, k, pool + 1, dtype=torch.bool, device=query.device)
        mask.scatter_(3, torch.where(visible, rows, pool), True)
        mask[..., pool] = False
        if self.buffers_queries:
            for signal in self.signals.values():
                signal.queried(self, query)
        # explicit products, not SDPA: with a boolean mask over the pool CPU SDPA took 20x the two matmuls
        # (scripts/packed_attention_speed.py); softmax in fp32 as the dense store's explicit path
        flat = query.reshape(sequences, heads * k, dim)
        logits = torch.matmul(flat, self.pool_keys.transpose(-1, -2)).float() * self.scale  # (S, H * k, T + 1)
        probs = torch.softmax(logits.masked_fill(~mask.view_as(logits), float("-inf")), dim=-1)
        if self.explicit:
            slots = probs.view(sequences, heads, k, pool + 1).gather(3, rows).masked_fill(~visible, 0.0)
            for signal in self.signals.values():
                if signal.every_step:
                    signal.attended(self, slots)  # (S, H, k, W) in slot order, as the dense store gives them
        return torch.matmul(probs.to(self.pool_values.dtype), self.pool_values).view(sequences, heads, k, dim)

    def key_logits(self, queries: torch.Tensor, width: int) -> torch.Tensor:
        """As `LayerKV.key_logits`, from one product of each sequence's H * q queries with its pool (no key copy),
        then each slot's row."""
        sequences, heads, count, dim = queries.shape
        pool = torch.matmul(queries.reshape(sequences, heads * count, dim), self.pool_keys.transpose(-1, -2)).float()
        rows = self.rows[:, :, None, :width].long().expand(-1, -1, count, -1)
        return pool.view(sequences, heads, count, -1).gather(3, rows)

    def _write_rows(self, rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """key/value (S, H, k, D) into pool rows (S, H, k)."""
        flat = (self.row_base + rows).reshape(-1)
        dim = key.shape[-1]
        self.pool_keys.view(-1, dim).index_copy_(0, flat, key.reshape(-1, dim))
        self.pool_values.view(-1, dim).index_copy_(0, flat, value.reshape(-1, dim))
        self.unmapped_writes |= (rows == self.unmapped).any()

    def _write_slot(self, slot: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self._write_rows(self.rows.narrow(2, slot, 1), key, value)

    def _write_index(self, slot: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        self._write_rows(self.rows.index_select(2, slot), key, value)

    def _write_chunk(self, index: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        self._write_rows(self.rows.gather(2, index), key, value)

    def _move(self, sources: torch.Tensor, targets: torch.Tensor) -> None:
        self.rows.scatter_(2, targets, self.rows.gather(2, sources))

    # ---- eviction ---------------------------------------------------------------------------------

    def evict(self, victims, used, top, occupancy) -> None:
        raise RuntimeError("the packed store moves by compaction (joint eviction over heads) only")

    def compact(self, evicted: torch.Tensor, target: int | np.ndarray) -> None:
        super().compact(evicted, target)
        self._assign_free_rows(target)

    def _assign_free_rows(self, target: int | np.ndarray) -> None:
        """Give every logical slot at or above each sequence's `target` a free pool row: the rows not held by the
        prefix or by an occupied slot (all of which lie below the target), m = free // H to each head, lowest
        first; slots beyond a head's m get none (no token reaches them before the next eviction)."""
        sequences, heads, slots = self.rows.shape
        device, pool = self.rows.device, self.unmapped
        slot = torch.arange(slots, device=device)
        first = torch.as_tensor(np.asarray(target), device=device).reshape(-1, 1, 1)  # (S or 1, 1, 1)
        held = (self.valid | (slot < self.layout.prefix_len)) & (slot < first)
        used = torch.zeros(sequences, pool + 1, dtype=torch.bool, device=device)
        used.scatter_(1, torch.where(held, self.rows, pool).long().view(sequences, -1), True)  # unmapped: used
        free_first = torch.argsort(used.to(torch.int8), dim=1, stable=True)  # free rows first, in row order
        share = ((pool + 1 - used.sum(dim=1)) // heads).view(sequences, 1, 1)  # m per head
        offset = (slot - first).expand(sequences, heads, slots)  # a slot's index in its sequence's new region
        pick = (torch.arange(heads, device=device).view(1, heads, 1) * share + offset.clamp(min=0)).clamp(max=pool)
        fresh = free_first.gather(1, pick.reshape(sequences, -1)).view(sequences, heads, slots)
        fresh = torch.where(offset < share, fresh, pool).to(self.rows.dtype)
        self.rows.copy_(torch.where(offset >= 0, fresh, self.rows))

    def check(self) -> None:
        if bool(self.unmapped_writes):
            raise RuntimeError("packed KV store: a token was written into a slot without a pool row (the schedule "
                               "wrote more tokens between evictions than the store holds); please report this")

    def reset(self) -> None:
        super().reset()
        self._initial_rows()
        self.unmapped_writes.zero_()
