"""SSD (lineareval/cache/ssd.py) and the head types it shares with HeadKV (lineareval/cache/heads.py): the
classification on constructed attention patterns, and on a tiny model against an independent computation from
the oracle forward (locality heads keep the newest B, sink heads the top B by margin-boosted accumulated
attention). The oracle and invariant tests of every policy run it as well (conf/cache/ssd.yaml)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lineareval.cache.heads import HeadTypes, classify, neighbourhood_mass, priority_ranks
from lineareval.cache.policy import EvictionContext, TokenLayout
from test_cache import attention_probabilities, oracle_masks, run_policy

LAYOUT = TokenLayout(prefix_len=1, rows=4, line_len=4)


class LineView:
    """What `classify` reads of a layer: positions, the line's probabilities and the head-type state."""

    def __init__(self, positions: torch.Tensor, probabilities: torch.Tensor):
        self.positions, self.valid, self._probabilities = positions, positions >= 0, probabilities
        self.types = HeadTypes().state(SimpleNamespace(valid=self.valid))

    def line_probabilities(self, name: str = "line") -> torch.Tensor:
        return self._probabilities

    def signal(self, name: str):
        return self.types


def constructed_line(line: int) -> LineView:
    """One sequence, four heads, the queries of line `line` of LAYOUT over the prefix and every earlier token:
    head 0 attends to the token above, head 1 to the prefix, head 2 to visual token 3 (row 0, last column:
    within radius 1 of the queries in columns 2 and 3 only when the row above is row 0), head 3 to itself."""
    n, prefix = LAYOUT.line_len, LAYOUT.prefix_len
    width = prefix + (line + 1) * n
    positions = torch.arange(width).expand(1, 4, width)
    probabilities = torch.zeros(1, 4, n, width)
    for column in range(n):
        query = prefix + line * n + column
        probabilities[0, 0, column, query - n] = 1.0
        probabilities[0, 1, column, 0] = 1.0
        probabilities[0, 2, column, prefix + 3] = 1.0
        probabilities[0, 3, column, query] = 1.0
    return LineView(positions, probabilities)


def test_neighbourhood_mass_on_constructed_patterns():
    view = constructed_line(1)
    mass = neighbourhood_mass(view._probabilities, view.positions, LAYOUT, line_end=7, radius=1)
    assert mass.tolist() == [[4.0, 0.0, 2.0, 4.0]]  # head 2: columns 2, 3 are within one column of column 3
    wide = neighbourhood_mass(view._probabilities, view.positions, LAYOUT, line_end=7, radius=3)
    assert wide.tolist() == [[4.0, 0.0, 4.0, 4.0]]
    below = neighbourhood_mass(view._probabilities, view.positions, LAYOUT, line_end=7, radius=0)
    assert below.tolist() == [[0.0, 0.0, 0.0, 4.0]]  # radius 0: the query itself only


def test_classification_accumulates_over_the_first_lines_then_stays():
    first, second, third = constructed_line(1), constructed_line(1), constructed_line(2)
    state = first.types
    for view, line_end in ((first, 7), (second, 7), (third, 11)):
        view.types = state
        classify(view, EvictionContext(LAYOUT, 8, line_end), lines=2, radius=1)
    # two lines counted (8 queries), the third (line index 2 >= lines) left out
    assert state.queries.tolist() == [[8.0]]
    assert state.locality().tolist() == [[1.0, 0.0, 0.5, 1.0]]


def test_classification_in_a_chunk_counts_only_the_sequences_at_their_point():
    view = constructed_line(1)
    view.positions = view.positions.expand(2, -1, -1)
    view._probabilities = view._probabilities.expand(2, -1, -1, -1)
    view.types = HeadTypes().state(SimpleNamespace(valid=view.positions >= 0))
    context = EvictionContext(LAYOUT, 8, torch.tensor([7, 7]).view(2, 1, 1), torch.tensor([True, False]))
    classify(view, context, lines=2, radius=1)
    assert view.types.queries.tolist() == [[4.0], [0.0]]
    assert view.types.locality()[1].tolist() == [0.0] * 4


def test_priority_ranks_are_lexicographic_with_position_ties():
    positions = torch.tensor([[[5, 3, 4, 2]]])
    first = torch.tensor([[[True, True, False, True]]])
    second = torch.tensor([[[0.5, 0.5, 9.0, 0.7]]])
    # first key: slots 0, 1, 3 ahead of 2; second: slot 3 (0.7) ahead of 0, 1 (0.5, tied: newer position first)
    assert priority_ranks([first, second], positions).tolist() == [[[1, 2, 3, 0]]]


def expected_locality(probabilities: torch.Tensor, layout: TokenLayout, lines: int, radius: int) -> torch.Tensor:
    """(S, H) mean neighbourhood share of the first `lines` lines' queries, by loops over grid coordinates."""
    prefix, n = layout.prefix_len, layout.line_len
    total = torch.zeros(probabilities.shape[:2], dtype=torch.float64)
    for visual in range(lines * n):
        row, column = divmod(visual, n)
        for key in range(visual + 1):
            key_row, key_column = divmod(key, n)
            if row - radius <= key_row <= row and abs(key_column - column) <= radius:
                total += probabilities[:, :, prefix + visual, prefix + key].double()
    return total / (lines * n)


@pytest.mark.parametrize("sink_recent", [0, 5])
def test_ssd_keeps_the_newest_in_locality_heads_and_the_most_attended_in_sink_heads(setup, policy_factory,
                                                                                     sink_recent):
    """From the oracle forward: the head types, and after every eviction each head's kept visual tokens (locality
    heads: the newest B; sink heads: their newest `sink_recent` (none by default), then the top B - sink_recent
    of the rest by accumulated attention, margin columns counted twice)."""
    model, labels, tokens = setup
    layout, prefix, n = model.layout, model.layout.prefix_len, model.layout.line_len
    budget = 16  # two lines: the classification is over before the first eviction (line end 2)
    # the random model's shares straddle 0.4; 5 recent tokens: the line's 8 do not cover them (nor they the line)
    policy = policy_factory("ssd", "cache.threshold=0.4", f"cache.sink_recent={sink_recent}")
    assert policy.sink_recent == sink_recent
    trace = run_policy(model, policy, budget, labels, tokens)
    probabilities = attention_probabilities(model, labels, tokens[:, :-1], oracle_masks(trace, prefix))
    kinds = set()
    for step in range(layout.num_visual - 1):
        if not (layout.is_line_end(step) and step + 1 > budget):
            continue
        for layer, probability in enumerate(probabilities):
            locality = expected_locality(probability, layout, policy.classify_lines, policy.radius) >= 0.4
            kinds |= set(locality.flatten().tolist())
            received = probability[:, :, prefix: prefix + step + 1, prefix: prefix + step + 1].sum(2)  # (S, H, v)
            margin = torch.tensor([(v % n) in (0, n - 1) for v in range(step + 1)])
            boosted = torch.where(margin, 2.0 * received, received)
            kept = trace.after[step][layer][..., prefix: prefix + step + 1]  # (S, H, v)
            for sequence, head in torch.cartesian_prod(torch.arange(4), torch.arange(4)).tolist():
                held = kept[sequence, head].nonzero().flatten().tolist()
                if locality[sequence, head]:
                    expected = list(range(step + 1 - budget, step + 1))
                else:
                    present = trace.visible[step][layer][sequence, head, prefix: prefix + step + 1].clone()
                    recent = list(range(step + 1 - sink_recent, step + 1))
                    assert present[recent].all(), (step, layer, sequence, head)
                    present[recent] = False
                    values = boosted[sequence, head].masked_fill(~present, float("-inf"))
                    expected = sorted(recent + values.topk(budget - sink_recent).indices.tolist())
                assert held == expected, (step, layer, sequence, head)
    assert kinds == {True, False}, "the test needs both head types"


def test_sink_heads_keep_their_recent_window_only_when_asked(setup, policy_factory):
    """sink_recent changes what the sink heads keep: with a line's worth, every head keeps the last line (the
    default's sink heads drop some of it for older heavy hitters)."""
    model, labels, tokens = setup
    layout, prefix, n, budget = model.layout, model.layout.prefix_len, model.layout.line_len, 16
    step = max(step for step in range(layout.num_visual - 1) if layout.is_line_end(step))  # the last eviction
    kept = {}
    for recent in (0, n):
        trace = run_policy(model, policy_factory("ssd", "cache.threshold=0.4", f"cache.sink_recent={recent}"),
                           budget, labels, tokens)
        kept[recent] = torch.stack([layer[..., prefix: prefix + step + 1] for layer in trace.after[step]])
    assert kept[n][..., -n:].all(), "with sink_recent = a line every head keeps the last line"
    assert not kept[0][..., -n:].all(), "by default some sink head keeps older heavy hitters instead"
    assert (kept[0].sum(-1) == budget).all() and (kept[n].sum(-1) == budget).all()


def test_sink_recent_0_keeps_the_identity_and_folder_of_the_runs_made_before_the_field(make_config):
    from omegaconf import open_dict

    from lineareval.identity import config_identity

    cfg = make_config("cache=ssd")
    before = cfg.copy()
    with open_dict(before):
        del before.cache["sink_recent"]  # conf/cache/ssd.yaml as it was
    assert cfg.cache.sink_recent == 0
    assert config_identity(cfg, for_folder=True) == config_identity(before, for_folder=True)
    assert config_identity(cfg) == config_identity(before)
    ablation = make_config("cache=ssd", "cache.sink_recent=16")
    assert config_identity(ablation)["cache"]["sink_recent"] == 16
    assert config_identity(ablation, for_folder=True) != config_identity(cfg, for_folder=True)
