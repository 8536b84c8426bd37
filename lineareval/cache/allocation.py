"""Budget allocation: how a run's visual budget B is spread over layers (and heads) (`budget_allocation=`).

`keep` gives B = floor(keep * N), the budget of every layer and head under the paper's uniform
allocation. An allocation is a function (the `_target_` of `conf/budget_allocation/<name>.yaml`)
mapping (B, layers, heads, layout, policy) to `Budgets`: a budget per layer whose sum is the uniform
total L * B, and, for head-adaptive allocations, a floor and a cap per head. The engine gives each
layer the store its budget needs (`KVCache`), so memory follows the total:

- `uniform`: B everywhere (the paper's). One store shape for every layer.
- `pyramid` (PyramidKV, Cai et al. 2024, https://arxiv.org/abs/2406.02069): the part of B above what the
  policy always protects (its `minimum_budget`, as PyramidKV spreads what lies above its observation
  window) falls in an arithmetic progression from the first layer to the last, steepness set by `beta`
  (last / first = 1 / (2 beta - 1) before capping at N), rounded so the total stays L * B. Every layer
  has its own store of P + B_l + slack slots: the total is the uniform total (less where a layer is
  capped at N); the compiled step sees one attention width per distinct budget (one graph still).
- `adaptive_heads` (Ada-KV, Feng et al. 2024, https://arxiv.org/abs/2407.11550): within a layer the heads
  share H * B_l; at each eviction every head keeps its top `floor` tokens (what the policy protects
  plus `floor_alpha` of the rest: Ada-KV's safeguard) and the remaining H * (B_l - floor) go to the
  highest scores over all heads jointly, no head above `cap` = `max_head_ratio` * B_l. Heads then hold
  different counts, so the schedule's slots span P + cap + slack per head, but keys and values live in a
  pool of H * (P + B_l + slack) rows per sequence (`store: packed`, lineareval/cache/packed.py): the
  uniform store's bytes, plus a few bytes of bookkeeping per slot; it keeps the slots the dense layout
  (`store: dense`, every head sized for the cap) keeps, with attention equal to round-off. Attention spans the cap's slots with
  the occupancy mask (static shapes, one graph). Policies that select by position keep the same tokens
  in every head: uniform for them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from lineareval.cache.policy import CachePolicy, TokenLayout
from lineareval.keep import BudgetError


@dataclass(frozen=True)
class Budgets:
    """What a cache is given: a visual budget per layer and, for per-head allocations, each head's floor and cap.

    `visual_budget` is B (the uniform per-layer, per-head budget `keep` gives); `layers` holds B_l with
    sum(layers) == len(layers) * B; `head_floor` / `head_cap` (per layer, None when heads are uniform):
    every head keeps between floor and cap visual tokens, the layer's heads H * B_l together.
    """

    visual_budget: int
    layers: tuple[int, ...]
    head_floor: tuple[int, ...] | None = None
    head_cap: tuple[int, ...] | None = None
    name: str = "uniform"
    packed_heads: bool = True  # per-head budgets in a pool of the uniform store's size (packed.py); False: dense

    @property
    def adaptive_heads(self) -> bool:
        return self.head_cap is not None

    def layer(self, index: int) -> tuple[int, int | None, int | None]:
        """(budget, head floor, head cap) of layer `index`."""
        if not self.adaptive_heads:
            return self.layers[index], None, None
        return self.layers[index], self.head_floor[index], self.head_cap[index]

    def describe(self) -> dict:
        """For the record: the allocation's name and what it gave each layer."""
        record = {"budget_allocation": self.name, "layer_budgets": list(self.layers)}
        if self.adaptive_heads:
            record.update(head_floors=list(self.head_floor), head_caps=list(self.head_cap))
        return record


def uniform(budget: int, layers: int, heads: int, layout: TokenLayout, policy: CachePolicy) -> Budgets:
    """B in every layer and head (the paper's allocation)."""
    return Budgets(budget, (budget,) * layers)


def pyramid(budget: int, layers: int, heads: int, layout: TokenLayout, policy: CachePolicy,
            beta: float = 20) -> Budgets:
    """PyramidKV's arithmetic schedule, largest in the first layer; `beta` as PyramidKV's (default 20)."""
    if beta < 1:
        raise ValueError(f"budget_allocation pyramid: beta must be >= 1, got {beta}")
    protected = min(policy.minimum_budget(layout), budget)
    spread, room = budget - protected, layout.num_visual - protected  # per layer, on average; at most
    smallest = spread / beta
    largest = 2 * spread - smallest
    if largest > room:  # as PyramidKV: cap the first layer, keep the mean
        largest, smallest = room, 2 * spread - room
    if layers == 1:
        shares = [float(spread)]
    else:
        shares = [largest - (largest - smallest) * index / (layers - 1) for index in range(layers)]
    return Budgets(budget, tuple(protected + share for share in round_preserving_sum(shares, spread * layers)))


def adaptive_heads(budget: int, layers: int, heads: int, layout: TokenLayout, policy: CachePolicy,
                   floor_alpha: float = 0.2, max_head_ratio: float = 2.0, store: str = "packed") -> Budgets:
    """Ada-KV's head-adaptive split of each layer's H * B: floor = protected + floor_alpha of the rest (its
    scripts' 0.2), cap = max_head_ratio * B (Ada-KV has no cap). `store`: `packed` (keys and values in a pool
    of the uniform store's size, lineareval/cache/packed.py) or `dense` (every head sized for the cap)."""
    if not 0 <= floor_alpha <= 1 or max_head_ratio < 1:
        raise ValueError(f"budget_allocation adaptive_heads: floor_alpha must be in [0, 1] and max_head_ratio >= 1, "
                         f"got {floor_alpha}, {max_head_ratio}")
    if store not in ("packed", "dense"):
        raise ValueError(f"budget_allocation adaptive_heads: store must be packed or dense, got {store!r}")
    protected = min(policy.minimum_budget(layout), budget)
    floor = protected + int(floor_alpha * (budget - protected))
    cap = min(layout.num_visual, max(budget, math.ceil(max_head_ratio * budget)))
    return Budgets(budget, (budget,) * layers, (floor,) * layers, (cap,) * layers, packed_heads=store == "packed")


def round_preserving_sum(values: list[float], total: int) -> list[int]:
    """Integers within 1 of `values` summing to `total` (largest remainders round up; ties to the first)."""
    floors = [math.floor(value) for value in values]
    order = sorted(range(len(values)), key=lambda index: (floors[index] - values[index], index))
    for index in order[: total - sum(floors)]:
        floors[index] += 1
    return floors


def allocate(node, budget: int, *, layers: int, heads: int, layout: TokenLayout, policy: CachePolicy,
             model: str) -> Budgets:
    """Call `conf/budget_allocation/<name>.yaml` (`node`: its config, or None for uniform) and check the result:
    the uniform total, every layer at or above what the policy protects, heads' floors and caps around B_l."""
    from lineareval.config import call_target

    if node is None:
        return uniform(budget, layers, heads, layout, policy)
    budgets = call_target(node, exclude=("name",), budget=budget, layers=layers, heads=heads, layout=layout,
                          policy=policy)
    name = node.get("name", budgets.name)
    budgets = dataclasses.replace(budgets, name=name)
    check_budgets(budgets, budget, layers, layout, policy.minimum_budget(layout), policy=policy.name, model=model)
    return budgets


def check_budgets(budgets: Budgets, budget: int, layers: int, layout: TokenLayout, minimum: int, *, policy: str,
                  model: str) -> None:
    """Raise BudgetError naming the allocation when its budgets break a rule (see `allocate`)."""
    where = f"budget_allocation={budgets.name} with cache={policy} on model={model}"
    if len(budgets.layers) != layers or sum(budgets.layers) != layers * budget or budgets.visual_budget != budget:
        raise BudgetError(f"{where} gave layer budgets {list(budgets.layers)}: they must be {layers} numbers summing "
                          f"to {layers} x {budget} (the uniform total)")
    low = [value for value in budgets.layers if not min(minimum, budget) <= value <= layout.num_visual]
    if low:
        raise BudgetError(f"{where} gave layer budgets {low} outside [{minimum}, {layout.num_visual}]: each layer must "
                          f"keep what the policy protects ({minimum}) and at most N; raise keep")
    if budgets.adaptive_heads:
        wrong = [index for index, (budget_l, floor, cap) in enumerate(zip(budgets.layers, budgets.head_floor,
                                                                           budgets.head_cap))
                 if not floor <= budget_l <= cap <= layout.num_visual]
        if wrong:
            raise BudgetError(f"{where}: layers {wrong} need head floor <= layer budget <= head cap <= N")
