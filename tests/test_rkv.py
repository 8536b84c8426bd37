"""R-KV (lineareval/cache/rkv.py): its scores against an independent computation from the oracle forward,
its redundancy term, its choice of victims among the tokens written since the previous scoring point, and
the reference's fixed compression interval. The oracle and invariant tests of every policy (test_cache,
test_chunks, test_compile*) run it as well: it is discovered from conf/cache/rkv.yaml."""

from __future__ import annotations

import pytest
import torch

from conftest import llamagen_depth, roundoff_tolerance
from lineareval.cache.rkv import key_redundancy
from lineareval.keep import parse_keep
from test_cache import oracle_masks, projections, run_policy


def with_keys(policy) -> list[torch.Tensor]:
    """Record the keys each `score` call saw (S, H, W, D), in call order."""
    keys, original = [], policy.score

    def score(view, context):
        keys.append(view.keys.clone())
        return original(view, context)

    object.__setattr__(policy, "score", score)
    return keys


def expected_importance(q: torch.Tensor, k: torch.Tensor, cached: list[int], first: int, kernel: int) -> dict:
    """position -> the window's mean softmax over the cached positions before `first`, max-pooled over the
    cached positions within kernel // 2 (q, k: (T, D) of one sequence and head)."""
    before = [p for p in cached if p < first]
    window = q[first:]  # the window's queries: the last rows given
    probabilities = torch.softmax(window @ k[before].T / k.shape[-1] ** 0.5, dim=-1).mean(0)
    attention = dict(zip(before, probabilities.tolist()))
    return {p: max(attention[o] for o in before if abs(o - p) <= kernel // 2) for p in before}


def expected_redundancy(keys: torch.Tensor, positions: list[int], threshold: float) -> dict:
    """position -> R-KV's redundancy, written as loops over the cached tokens (keys (n, D) in that order)."""
    count = len(positions)
    unit = [key / (key.norm() + 1e-8) for key in keys.double()]
    similarity = [[float(unit[i] @ unit[j]) if i != j else 0.0 for j in range(count)] for i in range(count)]
    for i in range(count):
        duplicates = [j for j in range(count) if j != i and similarity[i][j] > threshold]
        if duplicates:
            similarity[i][max(duplicates, key=lambda j: positions[j])] = 0.0
    means = torch.tensor([sum(similarity[i][j] for i in range(count)) / count for j in range(count)])
    return dict(zip(positions, torch.softmax(means, 0).tolist()))


@pytest.mark.parametrize("mix_lambda", [1.0, 0.0, 0.07])
def test_rkv_scores_are_pooled_window_attention_minus_key_redundancy(setup, policy_factory, mix_lambda):
    """Every score equals mix_lambda * importance - (1 - mix_lambda) * redundancy computed from the oracle
    forward's queries and keys (importance) and the cached keys (redundancy); the window scores +inf.

    Tolerance: the importance is a softmax of logits computed two ways (relative error e of the logits'
    round-off, `score_tolerance`), which means and maxima keep; the redundancy's cosines (D terms), their
    mean (W terms) and its softmax differ by at most 2 (D + W + 2) u relatively, twice for two evaluations."""
    from test_cache import score_tolerance

    model, labels, tokens = setup
    layout, prefix = model.layout, model.layout.prefix_len
    policy = policy_factory("rkv", f"cache.mix_lambda={mix_lambda}")
    keys = with_keys(policy)
    trace = run_policy(model, policy, parse_keep("1/4").budget(layout.num_visual), labels, tokens)
    masks = oracle_masks(trace, prefix)
    qk = projections(model, labels, tokens[:, :-1], masks)
    unit = torch.finfo(torch.float32).eps / 2
    assert trace.scored
    for number, event in enumerate(trace.scored):
        layer, step = event["layer"], event["step"]
        first = prefix + step + 1 - policy.window
        q, k = qk[layer]
        logits = torch.tensor([float((q[..., : prefix + step + 1, :] @ k[..., : prefix + step + 1, :].transpose(
            -1, -2)).abs().max() / k.shape[-1] ** 0.5)])
        probabilities = logits.new_zeros(1)
        probabilities.max_logit = float(logits)
        importance_error = score_tolerance(model, layer, probabilities)["rtol"]
        for row in range(q.shape[0]):
            for head in range(q.shape[1]):
                slots = event["valid"][row, head].nonzero().flatten().tolist()
                positions = event["positions"][row, head, slots].tolist()
                importance = expected_importance(q[row, head, : first + policy.window], k[row, head], positions,
                                                 first, policy.kernel_size)
                redundancy = expected_redundancy(keys[number][row, head, slots], positions, policy.threshold)
                scores = dict(zip(positions, event["scores"][row, head, slots].tolist()))
                width = len(slots)
                tolerance = (mix_lambda * importance_error * max(importance.values())
                             + (1 - mix_lambda) * 4 * (k.shape[-1] + width + 2) * unit * max(redundancy.values()))
                for position in positions:
                    if position >= first:
                        assert scores[position] == float("inf"), "the window is always kept"
                    elif position >= prefix:
                        want = mix_lambda * importance[position] - (1 - mix_lambda) * redundancy[position]
                        assert scores[position] == pytest.approx(want, rel=0, abs=tolerance)


def test_redundancy_is_per_sequence_and_spares_the_newest_duplicate():
    """Three copies of one key (positions 0, 1, 2) among orthogonal ones: each copy's similarity to its newest
    other copy is not counted, so column sums are 2, 1, 0 (oldest most redundant) -> softmax of sums / 6.
    A second sequence with other keys gets its own scores (the reference scores every sequence with the
    first one's), the same as when scored alone."""
    basis = torch.eye(6)
    first = torch.stack([basis[0], basis[0], basis[0], basis[1], basis[2], basis[3]])
    second = torch.stack([basis[4], basis[5], basis[4], basis[1], basis[2], basis[3]])
    keys = torch.stack([first, second])[:, None]  # (S=2, H=1, W=6, D=6)
    valid = torch.ones(2, 1, 6, dtype=torch.bool)
    positions = torch.arange(6).expand(2, 1, 6)
    redundancy = key_redundancy(keys, valid, positions, threshold=0.5)
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0, 0.0]) / 6, 0)
    tolerance = roundoff_tolerance(expected, 6 + 6 + 2)
    torch.testing.assert_close(redundancy[0, 0], expected, **tolerance)
    torch.testing.assert_close(redundancy[1:], key_redundancy(keys[1:], valid[1:], positions[1:], 0.5), rtol=0,
                               atol=0)
    assert not torch.allclose(redundancy[1, 0], redundancy[0, 0])


def test_rkv_evicts_tokens_of_the_finished_line_outside_its_window(setup, policy_factory):
    """R-KV's candidates are every token but its window, so some line end evicts a token of the line that just
    ended (an engine that only moves the new tokens into older victims' slots never can)."""
    model, labels, tokens = setup
    prefix, n = model.layout.prefix_len, model.layout.line_len
    policy = policy_factory("rkv", "cache.window=3")
    trace = run_policy(model, policy, 16, labels, tokens)
    hits = 0
    for step, (during, after) in enumerate(zip(trace.visible, trace.after)):
        line = slice(prefix + step + 1 - n, prefix + step + 1 - policy.window)  # the line's tokens before the window
        for layer_during, layer_after in zip(during, after):
            evicted = layer_during & ~layer_after
            assert not evicted[..., prefix + step + 1 - policy.window: prefix + step + 1].any(), "window evicted"
            hits += int(evicted[..., line].sum())
    assert hits > 0


@pytest.mark.parametrize("interval", [5, 16])
def test_rkv_fixed_interval_equals_the_masked_full_cache(setup, policy_factory, interval):
    """`interval: k` (the reference's fixed compression interval, 128 there): evictions happen only at every k-th
    token, back to B, and the logits equal the masked full cache's."""
    model, labels, tokens = setup
    layout, prefix = model.layout, model.layout.prefix_len
    policy = policy_factory("rkv", f"cache.interval={interval}")
    assert policy.eviction_period(layout) == interval and policy.slack(layout) == interval
    budget = 20
    trace = run_policy(model, policy, budget, labels, tokens)
    oracle = model(labels, tokens[:, :-1], oracle_masks(trace, prefix))
    torch.testing.assert_close(trace.logits, oracle, **roundoff_tolerance(oracle, llamagen_depth(model)))
    assert trace.capacity == [prefix + budget + interval] * len(trace.capacity)
    evicted_at = []
    for step, (during, after) in enumerate(zip(trace.visible, trace.after)):
        visual = after[0][..., prefix:].sum(-1)
        if not all(torch.equal(a, b) for a, b in zip(during, after)):
            evicted_at.append(step)
        if (step + 1) % interval == 0:
            assert (visual == min(budget, step + 1)).all()
        assert (visual <= budget + interval - 1).all()
    assert evicted_at and all((step + 1) % interval == 0 for step in evicted_at)


def test_rkv_rejects_bad_fields(policy_factory):
    for override in ("cache.kernel_size=4", "cache.mix_lambda=1.5", "cache.interval=0", "cache.window=0"):
        with pytest.raises(ValueError, match="rkv"):
            policy_factory("rkv", override)


@pytest.mark.parametrize("seed", [0, 1])
def test_rkv_with_a_window_shorter_than_a_line_passes_the_chunk_oracle(setup, policy_factory, seed):
    """Random chunks and per-sequence commits with victims among each sequence's newest tokens (window 3 of a
    line of 8): the committed queries' logits equal the masked full cache's (tests/test_chunks.py's oracle)."""
    import numpy as np

    from lineareval.decoding.stepper import Stepper
    from test_chunks import chunk_masks, run_chunked

    model, labels, tokens = setup
    layout = model.layout
    stepper = Stepper(model)
    cache = stepper.new_cache(policy_factory("rkv", "cache.window=3"), 21, len(labels), layout, max_chunk=5)
    positions = layout.prefix_len + torch.arange(layout.num_visual).expand(len(labels), -1)
    trace = run_chunked(stepper, cache, labels, tokens, positions, np.random.default_rng(seed), max_chunk=5)
    oracle = model(labels, tokens[:, :-1], chunk_masks(trace, layout.prefix_len))[:, layout.prefix_len:]
    torch.testing.assert_close(trace.logits, oracle, **roundoff_tolerance(oracle, llamagen_depth(model)))
    for layer_map in cache.visible_positions():  # every layer, sequence and head holds what its counts say
        kept = layer_map[..., layout.prefix_len:].sum(-1)  # (S, H)
        assert (kept == torch.from_numpy(cache.state.visual)[:, None]).all()
    assert cache.state.evictions > 0 and (cache.state.visual <= 21 + layout.line_len).all()
