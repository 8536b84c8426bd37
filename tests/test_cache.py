"""Every policy in conf/cache/ under every budget allocation in conf/budget_allocation/ against an oracle, plus
the invariants each policy and allocation promise.

The oracle: a policy's logits at every step must equal those of a cache-free forward over the whole
sequence whose attention hides exactly the tokens the policy had evicted at that step, in that layer,
head and sequence. Scores are checked against attention probabilities computed from that forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from conftest import ALLOCATION_CONFIGS, CACHE_CONFIGS, llamagen_depth, roundoff_tolerance
from lineareval.cache import CachePolicy, EvictAt
from lineareval.cache.allocation import Budgets
from lineareval.decoding.stepper import Stepper
from lineareval.keep import parse_keep

KEEPS = ["1/4", 21]  # a whole number of lines (16 of 64 tokens) and a budget that is not


@dataclass
class Trace:
    """What a policy run did: logits per step, visibility per step and layer, scores per eviction."""

    logits: torch.Tensor  # (S, N, V)
    visible: list[list[torch.Tensor]]  # [step][layer] (S, H, P + N) at attention time
    after: list[list[torch.Tensor]]  # [step][layer] after the step's eviction
    scored: list[dict] = field(default_factory=list)  # one per (eviction, layer)
    capacity: list[int] = field(default_factory=list)  # per layer
    occupancy: list[int] = field(default_factory=list)


def record_scores(policy: CachePolicy, scored: list[dict], layer_index: dict) -> None:
    """Wrap `policy.score` to capture the scores it returned, the slots' positions and the layer (`layer_index`:
    id of a layer's store -> its index, filled once the cache exists)."""
    original = policy.score

    def score(view, context):
        scores = original(view, context)
        scored.append({"scores": scores.clone(), "positions": view.positions[:, :, : scores.shape[-1]].clone(),
                       "valid": view.valid[:, :, : scores.shape[-1]].clone(), "step": context.visual_index,
                       "layer": layer_index.get(id(view._layer))})
        return scores

    object.__setattr__(policy, "score", score)


@torch.inference_mode()
def run_policy(model, policy: CachePolicy, budget: int | Budgets, labels: torch.Tensor, tokens: torch.Tensor,
               stepper: Stepper | None = None) -> Trace:
    """Teacher-forced sequential decoding of `tokens` (S, N) through the decoder's stepper (eager by default)."""
    layout = model.layout
    stepper = stepper or Stepper(model)
    scored, layer_index = [], {}
    record_scores(policy, scored, layer_index)
    cache = stepper.new_cache(policy, budget, len(labels), layout)
    layer_index.update({id(layer): index for index, layer in enumerate(cache.layers)})
    logits, visible, after, occupancy = [stepper.prefill(labels, cache)], [], [], []
    for index in range(layout.num_visual - 1):
        before = cache.visible_positions()
        logits.append(stepper.decode(tokens[:, index], index, cache))
        for layer_map in before:
            layer_map[..., layout.prefix_len + index] = True
        visible.append(before)
        after.append(cache.visible_positions())
        occupancy.append([int(layer.valid.sum(-1).max()) for layer in cache.layers])
        for layer in cache.layers:  # a layer's tokens fill its slots below its own occupancy
            held = layer.valid.sum(-1)
            assert int(held.max()) <= int(layer.state.occupancy.max())
            assert layer.state.head_holes or int(held.min()) == int(layer.state.occupancy.min())
    return Trace(torch.stack(logits, 1), visible, after, scored, [layer.state.capacity for layer in cache.layers],
                 occupancy)


def oracle_masks(trace: Trace, prefix: int) -> list[torch.Tensor]:
    """Per layer (S, H, T, T) masks for the teacher-forced forward over T = P + N - 1 positions."""
    steps, layers = len(trace.visible), len(trace.visible[0])
    length = prefix + steps
    masks = []
    for layer in range(layers):
        first = trace.visible[0][0]
        rows = [torch.tril(torch.ones(prefix, length, dtype=torch.bool, device=first.device)).expand(
            *first.shape[:2], -1, -1)]
        rows += [trace.visible[step][layer][..., None, :length] for step in range(steps)]
        masks.append(torch.cat(rows, dim=2))
    return masks


@torch.inference_mode()
def projections(model, labels, tokens, masks) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer the rotated (q, k), each (S, H, T, D), of the cache-free forward under `masks`."""
    inputs = []
    hooks = [layer.attention.register_forward_pre_hook(lambda module, args: inputs.append((module, args[0], args[1])))
             for layer in model.layers]
    model(labels, tokens, masks)
    for hook in hooks:
        hook.remove()
    return [attention.project(x, rope)[:2] for attention, x, rope in inputs]


@torch.inference_mode()
def attention_probabilities(model, labels, tokens, masks) -> list[torch.Tensor]:
    """Explicit softmax(q k^T / sqrt(d)) per layer under `masks`, from the cache-free forward."""
    probabilities = []
    for (q, k), mask in zip(projections(model, labels, tokens, masks), masks):
        logits = (q @ k.transpose(-1, -2)) / q.shape[-1]**0.5
        probabilities.append(torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1))
        probabilities[-1].max_logit = float(logits.masked_fill(~mask, 0).abs().max())
    return probabilities


def score_tolerance(model, layer: int, probabilities: torch.Tensor) -> dict:
    """Tolerances for attention probabilities of `layer` (and their means and sums over queries) computed
    two ways. A logit error e moves a probability p by about p * e, so the bound is relative: e is the
    round-off of the logits (`roundoff_tolerance` over the layers below, the q/k projection, q.k, the
    softmax's sum over the keys and a sum over up to N queries), at the largest logit's magnitude."""
    config = model.config
    width = config.cls_token_num + model.layout.num_visual
    depth = layer * (llamagen_depth(model) - config.dim) // config.n_layer + config.dim + config.head_dim + 2 * width
    logit_error = roundoff_tolerance(torch.tensor([probabilities.max_logit]), depth)["atol"]
    return {"rtol": logit_error, "atol": 0.0}


def cases():
    """Every policy at both keeps under the uniform allocation; under the others at the keep that is not a whole
    number of lines (at 1/4 the tiny model's budget is what LineAR protects: nothing to spread)."""
    for allocation in ALLOCATION_CONFIGS:
        for name in CACHE_CONFIGS:
            for keep in (["1"] if name == "full" else KEEPS if allocation == "uniform" else KEEPS[1:]):
                yield pytest.param(name, keep, allocation, id=f"{name}-{keep}-{allocation}")


@pytest.mark.parametrize("name, keep, allocation", list(cases()))
def test_policy_equals_full_cache_with_evicted_tokens_masked(setup, policy_factory, budgets_for, name, keep,
                                                             allocation):
    model, labels, tokens = setup
    layout = model.layout
    policy = policy_factory(name)
    budgets = budgets_for(policy, parse_keep(keep).budget(layout.num_visual), allocation, model)
    trace = run_policy(model, policy, budgets, labels, tokens)
    oracle = model(labels, tokens[:, :-1], oracle_masks(trace, layout.prefix_len))
    tolerance = roundoff_tolerance(oracle, llamagen_depth(model))
    torch.testing.assert_close(trace.logits, oracle, **tolerance)
    unmasked = model(labels, tokens[:, :-1])
    if policy.evicts_at is EvictAt.NEVER:
        torch.testing.assert_close(trace.logits, unmasked, **tolerance)
    else:  # the comparison is not vacuous: eviction changed the logits far beyond round-off
        assert (trace.logits - unmasked).abs().max() > 10 * tolerance["atol"]


@pytest.mark.parametrize("name, keep, allocation", list(cases()))
def test_invariants(setup, policy_factory, budgets_for, name, keep, allocation):
    """Per layer, its own budget B_l: the prefix stays, the visual tokens never exceed B_l plus one period and
    return to B_l at each scoring point, nothing is evicted in between. Heads hold B_l each, or with a
    head-adaptive allocation H * B_l together, each between its floor and its cap."""
    model, labels, tokens = setup
    layout, heads = model.layout, model.config.n_head
    prefix = layout.prefix_len
    policy = policy_factory(name)
    budgets = budgets_for(policy, parse_keep(keep).budget(layout.num_visual), allocation, model)
    trace = run_policy(model, policy, budgets, labels, tokens)
    period = policy.eviction_period(layout)  # 1: every step, n: line ends, None: never
    per_head = budgets.adaptive_heads and not policy.selects_by_position and period is not None
    for layer, capacity in enumerate(trace.capacity):
        budget, floor, cap = budgets.layer(layer)
        assert max(step[layer] for step in trace.occupancy) <= capacity
        visual_slots = cap + period if per_head else min(layout.num_visual, budget + policy.slack(layout))
        assert capacity == prefix + visual_slots
    for step, (during, after) in enumerate(zip(trace.visible, trace.after)):
        for layer, (layer_during, layer_after) in enumerate(zip(during, after)):
            budget, floor, cap = budgets.layer(layer)
            visual = layer_after[..., prefix:].sum(-1)  # (S, H)
            assert layer_after[..., :prefix].all(), "prefix evicted"
            if period is None:
                assert (visual == step + 1).all()
                continue
            if per_head:  # the layer's heads share H * B_l
                total = visual.sum(-1)
                assert (visual <= cap + period - 1).all() and (visual >= min(floor, step + 1)).all()
                assert (total <= heads * (budget + period - 1)).all()
                kept = total
                budget_here = heads * min(budget, step + 1)
            else:
                assert (visual == visual.flatten()[0]).all(), "budgets are uniform over sequences and heads"
                assert (visual <= budget + period - 1).all()
                kept, budget_here = visual, min(budget, step + 1)
            if policy.is_scoring_point(layout, step):
                assert (kept == budget_here).all()
            else:
                assert torch.equal(layer_during, layer_after), "evicted away from a scoring point"
    check_policy_specifics(policy, trace, layout, budgets)


def check_policy_specifics(policy, trace: Trace, layout, budgets: Budgets) -> None:
    prefix, n = layout.prefix_len, layout.line_len
    for step, maps in enumerate(trace.after):
        seen = prefix + step + 1  # positions written so far
        for layer, layer_map in enumerate(maps):
            budget = budgets.layers[layer]
            if policy.name == "window":
                expected = torch.zeros_like(layer_map[0, 0])
                expected[:prefix] = True
                expected[max(prefix, seen - budget):seen] = True
                assert (layer_map == expected).all()
            if policy.name == "streamingllm":
                assert layer_map[..., prefix:prefix + min(policy.sinks, step + 1)].all(), "sink evicted"
            if policy.name == "linear":
                anchors = policy.anchor_tokens(layout)
                assert layer_map[..., prefix:prefix + min(anchors, step + 1)].all(), "anchor evicted"
                if layout.is_line_end(step):
                    recent = policy.recent_lines * n
                    assert layer_map[..., max(prefix, seen - recent):seen].all(), "recent line evicted"
            if policy.name == "h2o":
                recent = policy.recent(budget)
                assert layer_map[..., max(prefix, seen - recent):seen].all(), "h2o recent window evicted"


@pytest.mark.parametrize("name", [name for name in CACHE_CONFIGS if name != "full"])
def test_evicts_the_lowest_scores(setup, policy_factory, name):
    """At every eviction, each evicted slot scored no higher than any slot the policy kept."""
    model, labels, tokens = setup
    budget = 16
    trace = run_policy(model, policy_factory(name), budget, labels, tokens)
    assert trace.scored, "the policy never evicted"
    for event in trace.scored:
        step, layer = event["step"], event["layer"] or 0  # None: scored on the slot table, the same in every layer
        kept_map = trace.after[step][layer]
        kept = torch.gather(kept_map, 2, event["positions"].clamp(min=0)) & event["valid"]
        evicted = event["valid"] & ~kept
        candidates = event["scores"].masked_fill(~event["valid"] | (event["positions"] < model.layout.prefix_len),
                                                 float("inf"))
        highest_evicted = candidates.masked_fill(~evicted, float("-inf")).amax(-1)
        lowest_kept = candidates.masked_fill(~kept, float("inf")).amin(-1)
        assert (highest_evicted <= lowest_kept).all()
        assert not torch.isinf(event["scores"][evicted]).any(), "a slot the policy protected (+inf) was evicted"
        assert torch.isinf(candidates.masked_fill(~evicted, float("inf"))).logical_not().any(-1).all(), \
            "every eviction removed at least one unprotected slot"


@pytest.mark.parametrize("score_source", ["line", "last_token", "cumulative"])
def test_linear_scores_are_inter_line_attention(setup, policy_factory, score_source):
    """LineAR's line-end scores equal the attention the line's queries gave each token (oracle forward)."""
    model, labels, tokens = setup
    prefix, n = model.layout.prefix_len, model.layout.line_len
    trace = run_policy(model, policy_factory("linear", f"cache.score_source={score_source}"), 16, labels, tokens)
    masks = oracle_masks(trace, prefix)
    probabilities = attention_probabilities(model, labels, tokens[:, :-1], masks)
    for event in trace.scored:
        step, layer = event["step"], event["layer"]
        rows = probabilities[layer][:, :, prefix + step - n + 1: prefix + step + 1]  # (S, H, n, T)
        if score_source == "line":
            expected_by_position = rows.mean(2)
        elif score_source == "last_token":
            expected_by_position = rows[:, :, -1]
        else:  # every query so far, while the token was in the cache
            expected_by_position = probabilities[layer][:, :, prefix: prefix + step + 1].sum(2)
        positions = event["positions"].clamp(min=0)
        expected = torch.gather(expected_by_position, 2, positions)
        first_recent = prefix + step + 1 - n
        middle = event["valid"] & (positions >= prefix + n) & (positions < first_recent)
        assert middle.any()
        torch.testing.assert_close(event["scores"][middle], expected[middle],
                                   **score_tolerance(model, layer, probabilities[layer]))


def test_linear_line_ends_use_the_shared_causal_mask(setup, policy_factory, monkeypatch):
    """Under the engine's schedule every line end masks with the shared (n, W) causal mask, and it gives
    exactly the probabilities of the mask built from each slot's position."""
    from lineareval.cache.signals import LineState

    model, labels, tokens = setup
    original, used = LineState.probabilities, []

    def probabilities(self, layer):
        mask = layer.step.line_mask
        used.append(mask is not None and mask.shape == (model.layout.line_len, layer.state.high_water))
        shared = original(self, layer)
        layer.step.line_mask, self._probabilities = None, None
        assert torch.equal(shared, original(self, layer))  # the per-slot path
        layer.step.line_mask = mask
        return shared

    monkeypatch.setattr(LineState, "probabilities", probabilities)
    run_policy(model, policy_factory("linear"), 16, labels, tokens)
    assert len(used) > 0 and all(used)


def test_h2o_scores_are_accumulated_attention(setup, policy_factory):
    model, labels, tokens = setup
    prefix = model.layout.prefix_len
    trace = run_policy(model, policy_factory("h2o"), 16, labels, tokens)
    probabilities = attention_probabilities(model, labels, tokens[:, :-1], oracle_masks(trace, prefix))
    for event in trace.scored:
        step, layer = event["step"], event["layer"]
        received = probabilities[layer][:, :, prefix: prefix + step + 1].sum(2)  # decode queries only
        positions = event["positions"].clamp(min=0)
        visual = event["valid"] & (positions >= prefix) & torch.isfinite(event["scores"])
        torch.testing.assert_close(event["scores"][visual], torch.gather(received, 2, positions)[visual],
                                   **score_tolerance(model, layer, probabilities[layer]))


def test_selection_is_independent_per_sequence_and_head(setup, policy_factory):
    model, labels, tokens = setup
    trace = run_policy(model, policy_factory("linear"), 24, labels, tokens)  # 8 middle tokens to choose
    final = trace.after[-1][0]  # (S, H, P + N)
    assert not torch.equal(final[0], final[2]), "cond and uncond rows kept the same tokens"
    assert not torch.equal(final[0, 0], final[0, 1]), "two heads kept the same tokens"


def test_window_with_keep_1_equals_full(setup, policy_factory):
    model, labels, tokens = setup
    full = run_policy(model, policy_factory("full"), 64, labels, tokens)
    window = run_policy(model, policy_factory("window"), 64, labels, tokens)
    assert torch.equal(full.logits, window.logits)
    assert window.capacity == full.capacity == [65, 65]


def test_compressed_capacity_follows_the_budget(setup, policy_factory):
    model, _, _ = setup
    layout = model.layout
    full = Stepper(model).new_cache(policy_factory("full"), 64, 2, layout)
    linear = Stepper(model).new_cache(policy_factory("linear"), 16, 2, layout)
    assert full.state.capacity == 1 + 64 and linear.state.capacity == 1 + 16 + layout.line_len
    assert linear.capacity_bytes() < 0.5 * full.capacity_bytes()
