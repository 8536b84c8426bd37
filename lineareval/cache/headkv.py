"""HeadKV: head types found early, small budgets for locality heads, stratified eviction for broad heads.

HeadKV, https://arxiv.org/abs/2605.20600 (the paper was not available offline; this follows its published
summary): head types are identified early in generation and reused, locality-biased heads get smaller
budgets and broad heads larger ones (against LineAR's fixed per-head budget), and "stratified token
eviction" keeps some long-range tokens in every older stratum of lines.

Here, per layer, head and sequence, at every line end:

- head types as SSD's (lineareval/cache/heads.py): locality heads put at least `threshold` of the
  attention of their first `classify_lines` lines' queries on the causal 2D neighbourhood (`radius`);
- importance of a token: the mean attention the just-finished line's queries gave it (LineAR's score);
- locality heads order their tokens newest first;
- broad heads order theirs: the `recent_lines` most recent lines first, then the `per_stratum` most
  important tokens of every older stratum of `stratum_lines` lines (the first line included: no fixed
  anchors), then the rest by importance;
- per-head budgets: a locality head's target is `locality_share * B`, the broad heads of the layer share
  the rest of H * B (all heads local: B each). The score is target - rank, so Ada-KV's joint selection over
  heads (`budget_allocation=adaptive_heads`) gives each head its target, within the allocation's floor
  and cap (a target above the cap, or above the tokens a head has, leaves its surplus to the other heads'
  next tokens).

Under the default `budget_allocation=uniform` the engine keeps B in every head: the targets have no effect
and HeadKV is its stratified, type-specific selection at LineAR's fixed per-head budget (an approximation
of the paper, recorded as budget_allocation=uniform). Run `budget_allocation=adaptive_heads` for its
per-head budgets; the store is then sized for the cap (max_head_ratio x B per head), the tokens kept are
H x B per layer. Choices the summary leaves open, all YAML fields, defaults ours: those of SSD's
classification, locality heads at half the budget, one recent line, strata of one line keeping one token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lineareval.cache.heads import HeadTypes, candidates, classify, priority_order, priority_ranks
from lineareval.cache.policy import CachePolicy, CacheView, EvictAt, EvictionContext, TokenLayout
from lineareval.cache.signals import LineQueries


@dataclass
class HeadKV(CachePolicy):
    """Locality heads: newest first, `locality_share * B` tokens; broad heads: recent lines, each older stratum's
    best, then importance, the rest of the layer's H x B."""

    evicts_at = EvictAt.LINE_END
    classify_lines: int = 2
    radius: int = 1
    threshold: float = 0.5
    locality_share: float = 0.5
    recent_lines: int = 1
    stratum_lines: int = 1
    per_stratum: int = 1

    def __post_init__(self) -> None:
        if self.classify_lines < 1 or self.radius < 0 or self.recent_lines < 0:
            raise ValueError(f"headkv classify_lines must be >= 1, radius and recent_lines >= 0, got "
                             f"{self.classify_lines}, {self.radius}, {self.recent_lines}")
        if self.stratum_lines < 1 or self.per_stratum < 0:
            raise ValueError(f"headkv stratum_lines must be >= 1 and per_stratum >= 0, got {self.stratum_lines}, "
                             f"{self.per_stratum}")
        if not 0 <= self.threshold <= 1 or not 0 < self.locality_share <= 1:
            raise ValueError(f"headkv threshold must be in [0, 1] and locality_share in (0, 1], got "
                             f"{self.threshold}, {self.locality_share}")

    def signals(self) -> dict:
        return {"line": LineQueries(), "types": HeadTypes()}

    def observe(self, view: CacheView, context: EvictionContext) -> None:
        classify(view, context, self.classify_lines, self.radius)

    def locality_heads(self, view: CacheView) -> torch.Tensor:
        """(S, H) True for the locality heads."""
        return view.signal("types").locality() >= self.threshold

    def score(self, view: CacheView, context: EvictionContext) -> torch.Tensor:
        layout, positions = context.layout, view.positions
        evictable = candidates(view, context)
        importance = view.line_probabilities().mean(dim=2)  # (S, H, W)
        recent = positions >= context.position(context.visual_index + 1 - self.recent_lines * layout.line_len)
        best = stratum_best(importance, positions, evictable & ~recent, layout, self.stratum_lines, self.per_stratum)
        broad = priority_ranks([evictable, recent, best, importance], positions)
        newest = priority_ranks([evictable], positions)
        locality = self.locality_heads(view)
        rank = torch.where(locality[..., None], newest, broad)
        targets = head_targets(locality, context.budget, self.locality_share, layout)
        heads = locality.shape[1]  # distinct fractions: heads never tie in Ada-KV's joint top-k
        order = torch.arange(1, heads + 1, device=rank.device, dtype=torch.float32) / (heads + 1)
        return (targets[..., None] - rank).float() - order[:, None]


def stratum_best(importance: torch.Tensor, positions: torch.Tensor, eligible: torch.Tensor, layout: TokenLayout,
                 stratum_lines: int, per_stratum: int) -> torch.Tensor:
    """(S, H, W) the `per_stratum` most important `eligible` tokens of every stratum of `stratum_lines` lines
    (ties: the newer), from importance, positions, eligible (S, H, W)."""
    stratum = torch.div(positions - layout.prefix_len, stratum_lines * layout.line_len, rounding_mode="floor")
    stratum = torch.where(eligible, stratum, -1)  # the ineligible form one group of their own
    order = priority_order([stratum, importance], positions)  # grouped by stratum, best first within one
    grouped = stratum.gather(-1, order)
    index = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    starts = torch.ones_like(grouped, dtype=torch.bool)
    starts[..., 1:] = grouped[..., 1:] != grouped[..., :-1]
    within = index - torch.where(starts, index, 0).cummax(dim=-1).values  # rank inside the slot's stratum
    return eligible & torch.empty_like(within).scatter_(-1, order, within).lt(per_stratum)


def head_targets(locality: torch.Tensor, budget: int, locality_share: float, layout: TokenLayout) -> torch.Tensor:
    """(S, H) each head's target: locality heads round(locality_share * budget) (at least 1), the broad heads
    the rest of H * budget in equal parts (the first ones one more where it does not divide), at most N; every
    head `budget` when all are local."""
    heads = locality.shape[-1]
    small = min(budget, max(1, round(locality_share * budget)))
    local_count = locality.sum(dim=-1, keepdim=True)  # (S, 1)
    broad_count = (heads - local_count).clamp(min=1)
    spare = heads * budget - local_count * small
    broad_index = (~locality).cumsum(dim=-1) - 1  # a broad head's index among the broad heads
    broad = spare // broad_count + (broad_index < spare % broad_count)
    targets = torch.where(locality, small, broad)
    return torch.where(local_count == heads, budget, targets).clamp(max=layout.num_visual)
