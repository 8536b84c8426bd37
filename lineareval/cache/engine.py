"""The KV-cache engine: one preallocated store per layer, shared by every model and every policy.

`KVCache` is the façade models and decoders use: per-layer stores (store.py: `LayerKV`, whose `append`
and `attend` the models call inside a step) grouped by budget, each group with its schedule
(schedule.py: `LayerGroup`: reserve a chunk of k >= 1 tokens per sequence, commit a prefix of each, evict)
and its eviction strategy, chosen once (selection.py). Memory follows the budget, not N: a group's
capacity is what the policy declares (full: prefix + N; compressing: prefix + B + slack). What a policy
scores beyond positions and keys lives in the signals it declares (signals.py).
"""

from __future__ import annotations

import torch

from lineareval.cache.allocation import Budgets
from lineareval.cache.policy import CachePolicy, TokenLayout
from lineareval.cache.schedule import LayerGroup
from lineareval.cache.state import CacheState, StepInputs
from lineareval.memory import tensor_bytes


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
                                  max_chunk=max_chunk, packed_heads=budgets.packed_heads) for kind in kinds]
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
        return self.layers[0].positions.shape[0]

    def begin_prefix(self) -> None:
        for group in self.groups:
            group.begin_prefix()

    def begin_step(self, visual_index: int) -> torch.Tensor:
        """Reserve one slot per layer, sequence and head for visual token `visual_index` of every sequence (a chunk of
        one); returns its position (0-d). `commit()` then keeps it."""
        for group in self.groups:
            group.begin_step(visual_index)
        return self.step.position


    def next_eviction(self, visual_index: int) -> int | None:
        """The first visual index >= `visual_index` whose commit evicts in some layer, or None (never)."""
        indices = [index for group in self.groups if (index := group.next_eviction(visual_index)) is not None]
        return min(indices, default=None)

    def begin_chunk(self, visual_index: torch.Tensor, length: int) -> None:
        """See `LayerGroup.begin_chunk`: `length` tokens per sequence from visual_index[s] (S,)."""
        for group in self.groups:
            group.begin_chunk(visual_index, length)

    def commit(self, counts: torch.Tensor | list[int] | None = None) -> None:
        """See `LayerGroup.commit`: keep the first counts[s] tokens of sequence s's chunk, roll back the rest (None:
        every sequence keeps its one token); then evict as the policy's schedule says. Called once all layers ran."""
        for group in self.groups:
            group.commit(counts)

    def verify(self) -> None:
        """After a generation: a `PolicyContractError` naming the policy if its scores broke the contract."""
        for group in self.groups:
            group.verify()

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
