"""HeadKV (lineareval/cache/headkv.py): stratified selection and per-head targets on constructed inputs, its
order of a head's tokens on a constructed view, and on a tiny model under Ada-KV's joint selection each head
holding its target. The oracle and invariant tests of every policy run it too (conf/cache/headkv.yaml), under
every budget allocation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_llamagen
from lineareval.cache.headkv import HeadKV, head_targets, stratum_best
from lineareval.cache.heads import HeadTypes
from lineareval.cache.policy import EvictionContext, TokenLayout
from lineareval.cache.selection import lowest_scores
from lineareval.keep import parse_keep
from test_cache import run_policy

LAYOUT = TokenLayout(prefix_len=1, rows=4, line_len=4)


def test_stratum_best_keeps_the_top_tokens_of_every_stratum():
    positions = torch.arange(1, 13).view(1, 1, 12)  # visual tokens 0..11: three lines
    importance = torch.tensor([[[0.1, 0.4, 0.3, 0.2, 0.9, 0.8, 0.1, 0.0, 0.5, 0.6, 0.6, 0.1]]])
    eligible = torch.ones(1, 1, 12, dtype=torch.bool)
    one = stratum_best(importance, positions, eligible, LAYOUT, stratum_lines=1, per_stratum=1)
    assert one.nonzero()[:, 2].tolist() == [1, 4, 10]  # line 2's tie (0.6, 0.6): the newer
    two = stratum_best(importance, positions, eligible, LAYOUT, stratum_lines=1, per_stratum=2)
    assert two.nonzero()[:, 2].tolist() == [1, 2, 4, 5, 9, 10]
    wide = stratum_best(importance, positions, eligible, LAYOUT, stratum_lines=2, per_stratum=1)
    assert wide.nonzero()[:, 2].tolist() == [4, 10]  # strata: lines 0-1 and line 2
    eligible[..., 4] = False  # an ineligible token is neither picked nor counted
    assert stratum_best(importance, positions, eligible, LAYOUT, 1, 1).nonzero()[:, 2].tolist() == [1, 5, 10]


def test_head_targets_share_the_layer_total():
    locality = torch.tensor([[True, False, False], [True, True, True], [False, False, False], [True, True, False]])
    targets = head_targets(locality, 10, 0.5, TokenLayout(1, 8, 8))
    assert targets.tolist() == [[5, 13, 12], [10, 10, 10], [10, 10, 10], [5, 5, 20]]
    assert (targets.sum(-1) == 30).all()
    assert head_targets(locality, 10, 0.5, LAYOUT)[3].tolist() == [5, 5, 16]  # never above N


class ScoreView:
    """A layer's view for HeadKV's `score`: positions, the line's probabilities and set head types."""

    def __init__(self, positions: torch.Tensor, line: torch.Tensor, locality: list[float]):
        self.positions, self.valid, self._line = positions, positions >= 0, line
        self.types = HeadTypes().state(SimpleNamespace(valid=self.valid))
        self.types.add(torch.tensor([locality]), torch.ones(1, 1))

    def line_probabilities(self, name: str = "line") -> torch.Tensor:
        return self._line

    def signal(self, name: str):
        return self.types


def test_broad_heads_keep_recent_lines_then_strata_then_importance_and_locality_heads_the_newest():
    """Line end of line 2 (visual 11) with 12 visual tokens and a budget of 7: evict 5 per head."""
    positions = torch.arange(13).expand(1, 2, 13)  # the prefix and visual tokens 0..11, two heads
    importance = torch.tensor([0.0, 0.1, 0.4, 0.3, 0.2, 0.05, 0.06, 0.07, 0.01, 0.5, 0.6, 0.7, 0.8])
    line = importance.expand(1, 2, 4, 13)  # every query of the line attends alike
    policy = HeadKV()
    view = ScoreView(positions, line, [0.0, 1.0])  # head 0 broad, head 1 local
    scores = policy.score(view, EvictionContext(LAYOUT, 7, 11))
    candidates = view.valid & (positions >= 1)
    victims = lowest_scores(scores, candidates, 5).sort(-1).values - 1  # as visual indices
    # broad: line 2 (8..11) first, then line 0's best (visual 1: 0.4) and line 1's best (6: 0.07), then the most
    # important of the rest (2: 0.3, ahead of 3: 0.2, which beats line 1's best on importance alone)
    assert victims[0, 0].tolist() == [0, 3, 4, 5, 7]
    assert victims[0, 1].tolist() == [0, 1, 2, 3, 4]  # local: the newest 7 stay


@pytest.mark.parametrize("locality_share", [0.5, 0.25])
def test_heads_hold_their_targets_under_joint_selection(policy_factory, budgets_for, locality_share):
    """Under adaptive_heads the heads of a sequence hold H x B together, and each exactly its target after every
    eviction where the targets lie within the floor and cap (a target above the cap, or above the tokens there
    are, leaves its surplus to the other heads); locality heads hold their newest tokens. Uniform: B each."""
    model = tiny_llamagen(grid=8)
    labels = torch.tensor([3, 7, 10, 10])
    tokens = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    layout, prefix = model.layout, model.layout.prefix_len
    policy = policy_factory("headkv", "cache.threshold=0.4", f"cache.locality_share={locality_share}")
    budget = parse_keep("1/4").budget(layout.num_visual)
    locality = []
    original = policy.score

    def score(view, context):
        locality.append(policy.locality_heads(view).clone())
        return original(view, context)

    object.__setattr__(policy, "score", score)
    budgets = budgets_for(policy, budget, "adaptive_heads", model)
    trace = run_policy(model, policy, budgets, labels, tokens)
    heads_seen = torch.stack(locality)
    assert heads_seen.any() and not heads_seen.all(), "the test needs both head types"
    events = iter(locality)
    heads, capped_rows, exact_rows = model.config.n_head, 0, 0
    for step in range(layout.num_visual - 1):
        if not (layout.is_line_end(step) and step + 1 > budget):
            continue
        for layer in range(model.config.n_layer):
            types = next(events)
            targets = head_targets(types, budget, locality_share, layout)
            _, floor, cap = budgets.layer(layer)
            held = trace.after[step][layer][..., prefix: prefix + step + 1]  # (S, H, v)
            counts = held.sum(-1)
            assert (counts.sum(-1) == heads * budget).all() and (counts <= cap).all()
            # (S,): else a head's surplus above its cap (or the tokens it has) moves to the other heads
            within = ((targets >= floor) & (targets <= min(cap, step + 1))).all(-1)
            assert torch.equal(counts[within], targets[within]), (step, layer)
            capped_rows += int((~within).sum())
            exact_rows += int(within.sum())
            newest = torch.arange(step + 1) > step - counts[..., None]  # (S, H, v)
            assert torch.equal(held[types], newest[types])  # locality heads: their newest tokens
    assert exact_rows > 0
    uniform = run_policy(model, policy, budget, labels, tokens)
    last_line_end = layout.num_visual - layout.line_len - 1
    assert all((layer_map[..., prefix:].sum(-1) == budget).all() for layer_map in uniform.after[last_line_end])
