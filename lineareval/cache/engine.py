"""The KV-cache engine: one preallocated store per layer, shared by every model and every policy.

Each layer holds post-RoPE keys, values, each slot's original position and an occupancy mask, all of
shape (S, H, C, ...) for S sequences (conditional and unconditional CFG rows are separate sequences),
H heads and C slots. C is what the policy declares (full: prefix + N; compressing: prefix + B + slack),
so memory follows the budget, not N.

Eviction only clears slots; the next tokens are written into the lowest free slots. Softmax attention
does not depend on slot order and positions are already rotated into the keys, so nothing is ever
copied or re-indexed. With lowest-free-first allocation the occupied slots always lie in
[0, high_water), and when no slot below high_water is free attention runs without a mask.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lineareval.cache.policy import CachePolicy, EvictAt, EvictionContext, ScoreNeed, TokenLayout

log = logging.getLogger(__name__)


@dataclass
class CacheState:
    """Counters shared by all layers: occupancy is identical for every layer, head and sequence."""

    capacity: int
    occupancy: int = 0  # slots in use per (sequence, head)
    high_water: int = 0  # occupied slots all lie in [0, high_water)
    visual_count: int = 0  # visual tokens in the cache
    visual_index: int = -1  # visual token being written in the current step
    fill_holes: bool = False  # this step writes into a freed slot rather than at high_water
    padded: bool = False  # some prefix slots are padding (never attended, never reused)
    peak_occupancy: int = 0
    evictions: int = 0

    @property
    def has_holes(self) -> bool:
        return self.occupancy < self.high_water


class LayerKV:
    """One layer's store. Tensors: keys/values (S, H, C, D), positions/valid (S, H, C)."""

    def __init__(self, state: CacheState, layout: TokenLayout, needs: ScoreNeed, *, sequences: int, heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.state, self.layout, self.needs = state, layout, needs
        shape = (sequences, heads, state.capacity)
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
        self.blocked: torch.Tensor | None = None  # (S, 1, C) padding slots of shorter prompts

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values, self.positions, self.valid, self.received, self.line_queries,
                            self.blocked) if t is not None]

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
            self.blocked = torch.zeros_like(self.valid[:, :1])  # (S, 1, C)
            self.blocked[:, :, :length] = ~present[:, None, :].to(self.valid.device)
            self.state.padded = True

    def append(self, key: torch.Tensor, value: torch.Tensor, position: torch.Tensor) -> None:
        """Write one token per (sequence, head). key/value: (S, H, 1, D); position: 0-d long tensor."""
        if not self.state.fill_holes:
            slot = self.state.high_water - 1  # the state already counts this token
            self.keys[:, :, slot] = key[:, :, 0]
            self.values[:, :, slot] = value[:, :, 0]
            self.positions[:, :, slot] = position
            self.valid[:, :, slot] = True
            if self.received is not None:
                self.received[:, :, slot] = 0
            return
        # lowest free slot per (sequence, head); the free sets differ after per-head eviction
        taken = self.valid if self.blocked is None else self.valid | self.blocked
        slot = (~taken).to(torch.uint8).argmax(dim=-1, keepdim=True)  # (S, H, 1)
        self.keys.scatter_(2, slot.unsqueeze(-1).expand_as(key), key)
        self.values.scatter_(2, slot.unsqueeze(-1).expand_as(value), value)
        self.positions.scatter_(2, slot, position.expand_as(slot))
        self.valid.scatter_(2, slot, True)
        if self.received is not None:
            self.received.scatter_(2, slot, 0.0)

    # ---- attention -----------------------------------------------------------------------------

    def attend(self, query: torch.Tensor) -> torch.Tensor:
        """Attention of one new query per sequence over the occupied slots. (S, H, 1, D) -> (S, H, 1, D)."""
        width = self.state.high_water
        keys, values = self.keys[:, :, :width], self.values[:, :, :width]
        mask = self.valid[:, :, None, :width] if self.state.has_holes or self.state.padded else None
        if self.line_queries is not None:
            self.line_queries[:, :, self.state.visual_index % self.layout.line_len] = query[:, :, 0]
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
        the causal mask hides).
        """
        if self._line_probs is None:
            width, n = self.state.high_water, self.layout.line_len
            last = self.layout.prefix_len + self.state.visual_index
            query_positions = torch.arange(last - n + 1, last + 1, device=self.keys.device)  # (n,)
            logits = torch.matmul(self.line_queries, self.keys[:, :, :width].transpose(-1, -2)).float() * self.scale
            visible = self.valid[:, :, None, :width] & (self.positions[:, :, None, :width] <= query_positions[:, None])
            self._line_probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        return self._line_probs

    # ---- eviction ------------------------------------------------------------------------------

    def evict(self, keep_scores: torch.Tensor, count: int) -> None:
        """Free the `count` lowest-scoring occupied visual slots per (sequence, head). keep_scores: (S, H, W)."""
        width = self.state.high_water
        protected = ~self.valid[:, :, :width] | (self.positions[:, :, :width] < self.layout.prefix_len)
        scores = keep_scores.float().masked_fill(protected, float("inf"))
        victims = scores.topk(count, dim=-1, largest=False).indices  # (S, H, count)
        self.valid.scatter_(2, victims, False)
        self.positions.scatter_(2, victims, -1)

    def end_step(self) -> None:
        """Release the step's cached line probabilities ((S, H, n, W) fp32: large at big batches)."""
        self._line_probs = None


class KVCache:
    """Per-layer stores plus the policy's schedule. Models call `layers[i].append/attend` inside a step."""

    def __init__(self, policy: CachePolicy, layout: TokenLayout, budget: int, *, num_layers: int, sequences: int,
                 heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str):
        self.policy, self.layout, self.budget = policy, layout, budget
        self.device = torch.device(device)
        self.state = CacheState(capacity=policy.capacity(layout, budget))
        self.layers = [LayerKV(self.state, layout, policy.needs_scores, sequences=sequences, heads=heads,
                               head_dim=head_dim, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self._position = torch.zeros((), dtype=torch.long, device=self.device)

    # ---- schedule ------------------------------------------------------------------------------

    def begin_prefix(self) -> None:
        prefix = self.layout.prefix_len
        self.state.occupancy = self.state.high_water = self.state.peak_occupancy = prefix

    def begin_step(self, visual_index: int) -> torch.Tensor:
        """Reserve one slot per (sequence, head) for visual token `visual_index`; returns its position."""
        state = self.state
        if state.occupancy >= state.capacity:
            raise RuntimeError(f"cache overflow: {state.occupancy} slots in use of {state.capacity} "
                               f"(policy {self.policy.name} under-declared its slack)")
        state.visual_index = visual_index
        state.fill_holes = state.has_holes
        state.occupancy += 1
        state.visual_count += 1
        state.high_water = max(state.high_water, state.occupancy)
        state.peak_occupancy = max(state.peak_occupancy, state.occupancy)
        self._position.fill_(self.layout.prefix_len + visual_index)
        return self._position

    def end_step(self) -> None:
        """Evict down to the budget if the policy's schedule says so; called once all layers ran."""
        state, policy = self.state, self.policy
        scoring_point = self.layout.is_line_end(state.visual_index)
        if policy.evicts_at is EvictAt.STEP:
            scoring_point = True
        elif policy.evicts_at is EvictAt.NEVER:
            scoring_point = False
        excess = state.visual_count - self.budget
        if not scoring_point:
            return
        context = EvictionContext(self.layout, self.budget, state.visual_index)
        for layer in self.layers:
            policy.observe(layer, context)
            if excess > 0:
                layer.evict(policy.score(layer, context), excess)
            layer.end_step()  # drop this layer's line probabilities before the next layer computes its own
        if excess > 0:
            state.visual_count -= excess
            state.occupancy -= excess
            state.evictions += 1

    # ---- accounting ----------------------------------------------------------------------------

    def capacity_bytes(self) -> int:
        return sum(t.element_size() * t.numel() for layer in self.layers for t in layer.tensors())

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
