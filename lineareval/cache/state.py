"""The engine's bookkeeping: per-sequence counters (`CacheState`), the step's device inputs (`StepInputs`) and
the host copy of a position-selecting policy's slot layout (`SlotTable`).

Counts are per sequence (S rows) always. Sequential decoding keeps them equal (`aligned`): every
sequence writes its token into the same slot, a number the host knows, which is what lets a one-token
step compile to one static graph. A multi-token chunk writes each sequence after its own occupied
slots; sequences then commit different counts and stay unaligned.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np
import torch


def attended_width(high_water: int, multiple: int, capacity: int) -> int:
    """Slots a step attends: the high-water mark rounded up to a multiple (CUDA graphs: few shapes), capped."""
    return min(capacity, -(-high_water // multiple) * multiple)


@dataclass
class CacheState:
    """Counters shared by the layers of one budget group (their occupancy is identical)."""

    capacity: int
    sequences: int = 1
    width_multiple: int = 1  # round the attended width up to a multiple
    always_masked: bool = False  # attend with the occupancy mask at every step (bucketed widths: one graph)
    occupancy: np.ndarray = field(default=None, repr=False)  # (S,) slots in use per sequence (and head)
    visual: np.ndarray = field(default=None, repr=False)  # (S,) visual tokens in the cache
    next: np.ndarray = field(default=None, repr=False)  # (S,) next visual index to write
    high_water: int = 0  # occupied slots all lie in [0, high_water)
    visual_index: int = -1  # the token of the open one-token aligned step (signals' ring index)
    padded: bool = False  # some prefix slots are padding (never attended, never reused)
    width: int = 0  # this step attends over slots [0, width)
    slot: int = 0  # the slot an aligned step writes (also `StepInputs.slot`, which compiled steps read)
    masked: bool = False  # ... and needs the occupancy mask (free or padding slots below width)
    chunk: int = 0  # tokens per sequence of the open chunk; 0: none open, or an aligned one-token step
    aligned: bool = True  # every sequence holds the same slots (sequential decoding)
    head_holes: bool = False  # heads hold different numbers of tokens (adaptive_heads, after an eviction)
    peak_occupancy: int = 0
    evictions: int = 0

    def __post_init__(self) -> None:
        for name in ("occupancy", "visual", "next"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.sequences, dtype=np.int64))

    @property
    def holes(self) -> bool:
        """Aligned sequences with free slots below the high-water mark (position-based evictions free in place)."""
        return self.aligned and int(self.occupancy[0]) < self.high_water

    @property
    def chunked(self) -> bool:
        """A multi-token (or unaligned) chunk is open: what its queries produce waits for the commit."""
        return self.chunk > 0

    def set_width(self) -> None:
        self.width = attended_width(self.high_water, self.width_multiple, self.capacity)


class StepInputs:
    """Per-step values as preallocated device tensors, refilled in place by the schedule."""

    def __init__(self, device: torch.device):
        self.position = torch.zeros((), dtype=torch.long, device=device)  # layout position of the new token
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # its slot (the same everywhere)
        self.line_slot = torch.zeros(1, dtype=torch.long, device=device)  # its index within its line
        self.released = torch.zeros(1, dtype=torch.long, device=device)  # a slot freed by position
        self.line_mask: torch.Tensor | None = None  # at a line end: (n, W) causal mask of the line's queries
        self.scoring: torch.Tensor | None = None  # (S,) visual index of each sequence's scoring token (chunks)
        # a chunk: each sequence's slots, layout positions and visual indices (S, k); the causal visibility
        # of its slots (S, 1, k, W), True = a chunk query may attend
        self.chunk_slots: torch.Tensor | None = None
        self.chunk_positions: torch.Tensor | None = None
        self.chunk_visual: torch.Tensor | None = None
        self.chunk_causal: torch.Tensor | None = None

    def static_tensors(self) -> list[torch.Tensor]:
        return [self.position, self.slot, self.line_slot, self.released]


class SlotTable:
    """Host copy of the slot layout of a cache whose policy selects by position (the same everywhere): which
    slots are free and which position each holds. `positions` and `valid` have shape (1, 1, C) so that such a
    policy scores this table exactly as it would score a layer."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.positions = torch.full((1, 1, capacity), -1, dtype=torch.long)
        self.valid = torch.zeros(1, 1, capacity, dtype=torch.bool)
        self._free: list[int] = []

    def reset(self, prefix_len: int) -> None:
        self.positions.fill_(-1)
        self.positions[0, 0, :prefix_len] = torch.arange(prefix_len)
        self.valid.zero_()
        self.valid[0, 0, :prefix_len] = True  # padding slots too: never reused
        self._free = list(range(prefix_len, self.capacity))  # a heap (sorted = valid heap)

    def take(self, position: int) -> int:
        """The lowest free slot, now holding `position`."""
        slot = heapq.heappop(self._free)
        self.positions[0, 0, slot], self.valid[0, 0, slot] = position, True
        return slot

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.positions[0, 0, slot], self.valid[0, 0, slot] = -1, False
            heapq.heappush(self._free, slot)
