"""Which slots an eviction frees, and how the store is moved afterwards: one strategy per cache, chosen once.

A policy only scores (higher keeps); the engine picks the lowest scores among the *candidates*: the
visual tokens in the cache at the scoring token's position or before it (tokens a chunk committed
after its scoring token are kept and not counted). Nothing a policy returns can make the engine
wrong: any candidate may be a victim, the tokens written since the previous eviction included, and the
movers handle them (`LayerKV.evict`). What the engine cannot honour it refuses with a
`PolicyContractError` naming the policy: scores of the wrong shape, NaN scores, or victims it had to
take among slots the policy protected (+inf), which means the policy keeps more than its budget.

Strategies (`choose_eviction`):
- `PositionEviction`: the policy declares `selects_by_position` and every sequence holds the same slots
  (sequential decoding): it scores the host's `SlotTable` once and frees the same slots everywhere; the
  next tokens are written into them. The table view refuses keys and signals, so a wrong declaration
  stops the run instead of scoring garbage.
- `RowEviction`: every (sequence, head) evicts its own lowest-scoring candidates, and the newest tokens
  move into their slots (occupied slots stay [0, occupancy)).
- `JointEviction` (adaptive_heads with a per-head policy): Ada-KV's joint selection over heads; heads hold
  different counts and are compacted below P + head_cap.
"""

from __future__ import annotations

import numpy as np
import torch

from lineareval.cache.policy import CachePolicy, CacheView, EvictionContext


class PolicyContractError(RuntimeError):
    """A policy's scores the engine cannot honour (see the module docstring)."""


def lowest(keep_scores: torch.Tensor, candidates: torch.Tensor, count: int):
    """The `count` lowest keep-scores per row among `candidates` (others count as +inf): topk's (values, indices),
    (..., W) -> (..., count), lowest first. A non-finite value marks a victim the policy protected (or NaN)."""
    return keep_scores.float().masked_fill(~candidates, float("inf")).topk(count, dim=-1, largest=False)


def lowest_scores(keep_scores: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """Slots of the `count` lowest keep-scores per row among `candidates`. (..., W) -> (..., count), lowest first."""
    return lowest(keep_scores, candidates, count).indices


def joint_victims(keep_scores: torch.Tensor, candidates: torch.Tensor, budget: int, floor: int, cap: int,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """Ada-KV's selection (https://arxiv.org/abs/2407.11550): (S, H, W) mask of the `candidates` to evict so that
    each sequence's heads keep H * budget tokens together: every head its `floor` highest keep-scores, the
    rest the highest scores over all heads jointly, no head more than `cap`. `rows` (S,): only these evict."""
    sequences, heads, width = keep_scores.shape
    scores = keep_scores.float().masked_fill(~candidates, float("-inf"))
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(width, device=order.device).expand_as(order))
    guaranteed = candidates & (rank < floor)
    eligible = candidates & ~guaranteed & (rank < cap)
    joint = scores.masked_fill(~eligible, float("-inf")).view(sequences, heads * width)
    chosen = torch.zeros_like(eligible).view(sequences, heads * width)
    chosen.scatter_(1, joint.topk(heads * (budget - floor), dim=1).indices, True)
    evicted = candidates & ~(guaranteed | (chosen.view_as(eligible) & eligible))
    return evicted if rows is None else evicted & rows[:, None, None]


class PositionView(CacheView):
    """The host slot table as a layer view for position-selecting policies: positions only."""

    def __init__(self, table, width: int, policy: CachePolicy):
        self._layer, self._policy, self.width = table, policy, width
        self.positions, self.valid = table.positions[:, :, :width], table.valid[:, :, :width]

    @property
    def keys(self) -> torch.Tensor:
        raise PolicyContractError(f"policy {self._policy.name!r} declares selects_by_position but reads keys: "
                                  "remove the declaration (every policy is correct without it)")

    def signal(self, name: str):
        raise PolicyContractError(f"policy {self._policy.name!r} declares selects_by_position but reads signal "
                                  f"{name!r}: remove the declaration (every policy is correct without it)")


class Eviction:
    """How one cache group evicts. `violations` accumulates, on the device, whether a victim had a non-finite
    score (checked once per generation by `verify`, not per eviction: no host sync in the loop)."""

    def __init__(self, policy: CachePolicy):
        self.policy = policy
        self.violations: torch.Tensor | None = None

    def checked(self, scores: torch.Tensor, view: CacheView) -> torch.Tensor:
        expected = view.positions.shape
        if not torch.is_tensor(scores) or scores.shape != expected or not scores.is_floating_point():
            got = tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__
            raise PolicyContractError(f"policy {self.policy.name!r} scored {got}; score() must return floating "
                                      f"keep-scores of the view's shape {tuple(expected)}")
        return scores

    def note(self, victim_scores: torch.Tensor, used: torch.Tensor | bool = True) -> None:
        bad = (~torch.isfinite(victim_scores) & used).any()
        self.violations = bad if self.violations is None else self.violations | bad

    def verify(self) -> None:
        if self.violations is not None and bool(self.violations):
            raise PolicyContractError(
                f"policy {self.policy.name!r} left fewer evictable tokens than its budget requires (victims were "
                "taken among slots it scored +inf or NaN): raise minimum_budget() or protect fewer tokens")

    def reset(self) -> None:
        self.violations = None


class PositionEviction(Eviction):
    """Score the host table once; free the same slots in every layer, sequence and head."""

    def victims(self, table, width: int, context: EvictionContext, count: int, prefix_len: int) -> list[int]:
        view = PositionView(table, width, self.policy)
        scores = self.checked(self.policy.score(view, context), view)
        candidates = view.valid & (view.positions >= prefix_len)
        picked, victims = lowest(scores, candidates, count)
        if not bool(torch.isfinite(picked).all()):
            self.violations = torch.tensor(True)
            self.verify()
        return victims[0, 0].tolist()


class RowEviction(Eviction):
    """Each (sequence, head) evicts its `counts[s]` lowest-scoring candidates (see `LayerKV.evict`)."""

    def apply(self, layer, scores: torch.Tensor, candidates: torch.Tensor, counts: np.ndarray, top: np.ndarray,
              occupancy: np.ndarray) -> None:
        most = int(counts.max())
        picked, victims = lowest(scores, candidates, most)  # (S, H, most): their scores, no second pass over W
        device = victims.device
        used = torch.arange(most, device=device) < torch.from_numpy(counts).to(device)[:, None, None]
        self.note(picked, used)
        layer.evict(victims, used, top, occupancy)


class JointEviction(Eviction):
    """Ada-KV's joint selection over heads, then compaction below each sequence's `top`."""

    def __init__(self, policy: CachePolicy, budget: int, floor: int, cap: int):
        super().__init__(policy)
        self.budget, self.floor, self.cap = budget, floor, cap

    def apply(self, layer, scores: torch.Tensor, candidates: torch.Tensor, counts: np.ndarray, top: np.ndarray,
              occupancy: np.ndarray) -> None:
        rows = torch.from_numpy(counts > 0).to(scores.device)
        evicted = joint_victims(scores, candidates, self.budget, self.floor, self.cap, rows)
        self.note(scores.float().masked_fill(~evicted, 0.0))
        layer.compact(evicted, top)


def choose_eviction(policy: CachePolicy, layout, budget: int, head_floor: int | None, head_cap: int | None,
                    max_chunk: int) -> Eviction:
    """The cache's strategy, once: joint over heads (adaptive_heads, per-head policies), by position (declared,
    and sequences stay aligned: one-token steps only), or per row."""
    if head_cap is not None and not policy.selects_by_position and policy.eviction_period(layout):
        return JointEviction(policy, budget, head_floor, head_cap)
    if policy.selects_by_position and max_chunk == 1:
        return PositionEviction(policy)
    return RowEviction(policy)
