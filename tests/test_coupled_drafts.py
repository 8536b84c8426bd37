"""MC-SJD (decoding=mc_sjd): coupled redraws keep sequential decoding's distribution and keep drafts put.

- the maximal coupling of (q, p') has marginal p' and keeps the old draft with probability 1 - TV(q, p')
  (many keyed draws of one pair of distributions);
- the token joint that coupling touches (tokens 2 and 3 of a 2 x 2-token model, redrawn after token 1's
  rejection) agrees with sequential sampling (chi-square) for both couplings, and a coupling whose
  residual ignores q fails the same test;
- greedy MC-SJD gives the sequential tokens and caches (full and LineAR);
- Gumbel coupling's noise is keyed without the iteration, maximal coupling's draws with it, in streams
  SJD never uses; an image's tokens do not depend on its batch;
- on the trained demo model coupling takes fewer forward passes than SJD on the same samples;
- windows draft past LineAR's line ends (fed, never committed past them): greedy SJD and MC-SJD still give the
  sequential tokens and caches, the joint of two tokens drafted past a line end agrees with sequential sampling
  (chi-square; stale proposals fail it), and on the demo model the drafts past line ends cut the passes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from conftest import WithMethod, tiny_llamagen
from lineareval.decoding import coupled
from lineareval.decoding.coupled import CoupledJacobiState, CoupledSpeculative
from lineareval.decoding.method import Sequential
from lineareval.decoding.speculative import DRAFT, JacobiState, Speculative
from lineareval.generators.base import Generator
from lineareval.generators.llamagen import LlamaGenFamily
from lineareval.sampling import SamplingConfig
from test_speculative import P_THRESHOLD, conditions, tiny_pair

SAMPLES = 6000
COUPLINGS = ("maximal", "gumbel")


class FakeRun:
    """The parts of a DecodeSession the coupling reads."""

    def __init__(self, count: int, vocab: int, seed: int = 0):
        self.sample_ids, self.seed, self.vocab = torch.arange(count), seed, vocab


def coupling_state(q: torch.Tensor, count: int, window: int = 4, point: bool = False) -> CoupledJacobiState:
    """A state of `count` images whose drafts at positions 1 .. window-1 all have proposal q (V,)."""
    state = object.__new__(CoupledJacobiState)
    state.method, state.run, state.iteration = CoupledSpeculative(window=window), FakeRun(count, len(q)), 3
    state.proposals = q.expand(count, window, -1).clone()
    state.point = torch.full((count, window), point)
    return state


def test_maximal_coupling_has_marginal_p_and_keeps_the_draft_at_one_minus_tv():
    q = torch.tensor([0.5, 0.3, 0.1, 0.1, 0.0])
    p = torch.tensor([0.2, 0.3, 0.3, 0.1, 0.1])
    count, window = 20000, 4
    state = coupling_state(q, count, window)
    targets = torch.arange(1, window)[None].expand(count, -1)
    drafts = torch.multinomial(q, count * (window - 1), replacement=True, generator=torch.Generator().manual_seed(0))
    drafts = drafts.view(count, window - 1)
    new = state.maximal(p.expand(count, window - 1, -1), drafts, targets)
    frequency = np.bincount(new.reshape(-1).numpy(), minlength=5) / new.numel()
    tolerance = 4 * np.sqrt(p.numpy() * (1 - p.numpy()) / new.numel()) + 1e-9
    assert (np.abs(frequency - p.numpy()) <= tolerance).all(), frequency
    same = (new == drafts).float().mean().item()
    assert abs(same - torch.minimum(p, q).sum().item()) < 0.01  # 1 - TV(q, p) = 0.7
    assert (new[drafts == 1] == 1).all()  # p(1) >= q(1): always kept


def test_maximal_coupling_of_a_point_mass_keeps_it_with_probability_p():
    p = torch.tensor([0.6, 0.2, 0.2])
    count = 20000
    state = coupling_state(torch.tensor([1 / 3] * 3), count, window=2, point=True)
    drafts = torch.zeros(count, 1, dtype=torch.long)
    new = state.maximal(p.expand(count, 1, -1), drafts, torch.ones(count, 1, dtype=torch.long))
    frequency = np.bincount(new.reshape(-1).numpy(), minlength=3) / count
    assert np.abs(frequency - p.numpy()).max() < 0.015, frequency


def test_gumbel_noise_is_keyed_without_the_iteration_and_maximal_draws_with_it():
    positions = torch.tensor([[1, 2, 3]])
    state = coupling_state(torch.ones(4) / 4, 1)
    state.method.coupling = "gumbel"
    first = state.keys(positions, DRAFT)[2]
    state.iteration = 7
    assert torch.equal(state.keys(positions, DRAFT)[2], first)
    maximal = state.coupled_keys(positions, DRAFT)[2]
    state.iteration = 8
    assert not torch.equal(state.coupled_keys(positions, DRAFT)[2], maximal)
    sjd = [JacobiState.keys(state, positions, DRAFT)[2] for state.iteration in range(64)]
    assert not any(torch.isin(keys, torch.cat([first, maximal])).any() for keys in sjd)


def tiny_coupled(coupling: str, window: int = 3, wrong: bool = False):
    """A 2 x 2-token LlamaGen with 6 tokens sampling at temperature 1, sequential and MC-SJD."""
    model = tiny_llamagen(grid=2, layers=1, heads=2, dim=16, vocab=6, std=0.8, seed=3)
    family = LlamaGenFamily(model.layout, 10, None)
    sampling = SamplingConfig(1.5, -1, 1.0, 0, 1.0)
    sequential = WithMethod(Generator.assemble("seq", model, family, sampling, "random"), Sequential())
    method = CoupledSpeculative(window=window, coupling=coupling)
    return sequential, WithMethod(Generator.assemble("mc", model, family, sampling, "random"), method)


def later_pairs(generator, count: int, seed: int, policy) -> np.ndarray:
    """Counts of the pair (token 2, token 3): drafted at iteration 0, redrawn (coupled) after token 1's rejection."""
    tokens = generator.generate(torch.arange(count) % 10, torch.arange(count), policy, 4, seed=seed).tokens
    return np.bincount((tokens[:, 2] * 6 + tokens[:, 3]).numpy(), minlength=36)


def homogeneity(sequential, speculative, policy) -> float:
    table = np.stack([later_pairs(sequential, SAMPLES, 0, policy), later_pairs(speculative, SAMPLES, 1, policy)])
    return chi2_contingency(table[:, table.sum(0) > 0])[1]


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_mc_sjd_samples_the_sequential_distribution(policy_factory, coupling):
    sequential, speculative = tiny_coupled(coupling)
    assert homogeneity(sequential, speculative, policy_factory("full")) > P_THRESHOLD


def test_a_coupling_that_ignores_the_old_proposal_fails_the_same_test(policy_factory, monkeypatch):
    """Keeping the old draft whenever p' gives it weight (no min(1, p'/q) test) biases the drafts towards q."""

    def keep_if_possible(self, p, drafts, targets):
        return torch.where(p.gather(-1, drafts[..., None])[..., 0] > 0, drafts, self.draw(p, targets, DRAFT))

    monkeypatch.setattr(CoupledJacobiState, "maximal", keep_if_possible)
    sequential, speculative = tiny_coupled("maximal")
    assert homogeneity(sequential, speculative, policy_factory("full")) < P_THRESHOLD


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("policy", ["full", "linear"])
def test_greedy_mc_sjd_equals_sequential_tokens_and_caches(make_config, policy, coupling):
    sequential, sjd, built, budget = tiny_pair(make_config, "llamagen", policy)
    speculative = WithMethod(sjd.generator, CoupledSpeculative(window=5, coupling=coupling))
    ids = torch.arange(2)
    expected = sequential.generate(conditions(sequential), ids, built, budget, seed=0)
    got = speculative.generate(conditions(speculative), ids, built, budget, seed=0)
    assert torch.equal(got.tokens, expected.tokens)
    for cache, reference in zip(got.caches, expected.caches):
        assert all(torch.equal(a, b) for a, b in zip(cache.visible_positions(), reference.visible_positions()))
    assert got.stats["decode_passes_batch"] <= expected.stats["decode_passes_batch"]


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_an_images_tokens_do_not_depend_on_its_batch(policy_factory, coupling):
    _, speculative = tiny_coupled(coupling)
    full = policy_factory("full")
    together = speculative.generate(torch.tensor([1, 4, 7]), torch.tensor([0, 1, 2]), full, 4, seed=5).tokens
    alone = speculative.generate(torch.tensor([4]), torch.tensor([1]), full, 4, seed=5).tokens
    assert torch.equal(together[1], alone[0])


def test_unknown_coupling_is_refused():
    with pytest.raises(ValueError, match="decoding.coupling"):
        CoupledSpeculative(coupling="independent")


def test_coupling_takes_fewer_passes_than_sjd_on_the_demo_model(make_config):
    from lineareval.runner import run

    def passes(*decoding: str) -> dict:
        return run(make_config("model=demo", "num_samples=8", "batch_size=8", "decode_images=false",
                               "benchmark=samples", *decoding))

    sjd, mc_sjd = passes("decoding=sjd"), passes("decoding=mc_sjd")
    assert mc_sjd["decoding"]["coupling"] == coupled.COUPLINGS[0]
    assert mc_sjd["decode_passes_per_image"] < 0.85 * sjd["decode_passes_per_image"]
    assert mc_sjd["draft_acceptance"] > sjd["draft_acceptance"]


def line_end_chunks(monkeypatch) -> list[tuple[np.ndarray, int, np.ndarray, np.ndarray]]:
    """Record every verify chunk of the conditional cache: (first visual index per sequence, tokens fed, the next
    eviction per sequence as the chunk began, counts committed)."""
    from lineareval.cache.engine import KVCache
    from lineareval.decoding.stepper import Stepper

    chunks, decode_chunk, commit = [], Stepper.decode_chunk, KVCache.commit

    def recording_chunk(self, tokens, first, cache, positions=None):
        starts = first.cpu().numpy().copy()
        ends = np.array([cache.next_eviction(int(index)) or 10**9 for index in starts])
        chunks.append([starts, tokens.shape[1], ends, None])
        return decode_chunk(self, tokens, first, cache, positions)

    def recording_commit(self, counts=None):  # None: a sequential step's
        if chunks and chunks[-1][-1] is None:
            chunks[-1][-1] = np.asarray(counts).copy()
        return commit(self, counts)

    monkeypatch.setattr(Stepper, "decode_chunk", recording_chunk)
    monkeypatch.setattr(KVCache, "commit", recording_commit)
    return chunks


@pytest.mark.parametrize("name", ["sjd", "mc_sjd"])
def test_greedy_windows_draft_past_line_ends_and_keep_the_sequential_tokens_and_caches(make_config, monkeypatch, name):
    """LineAR 1/3 on an 8 x 8 grid, an 11-token window (longer than a line): chunks are fed past the line end
    they may not commit past, commit nothing past it, and still give the sequential tokens and caches, as do
    windows that stop at the line end (`draft_past_evictions=false`, the earlier behaviour), which feed fewer."""
    sequential, sjd, built, budget = tiny_pair(make_config, "llamagen", "linear")
    method = Speculative if name == "sjd" else CoupledSpeculative
    ids = torch.arange(2)
    expected = sequential.generate(conditions(sequential), ids, built, budget, seed=0)
    stopping = WithMethod(sjd.generator, method(window=11, draft_past_evictions=False))
    stopped = stopping.generate(conditions(stopping), ids, built, budget, seed=0)
    chunks = line_end_chunks(monkeypatch)
    speculative = WithMethod(sjd.generator, method(window=11))
    got = speculative.generate(conditions(speculative), ids, built, budget, seed=0)
    assert torch.equal(got.tokens, expected.tokens) and torch.equal(stopped.tokens, expected.tokens)
    for cache, reference in zip(got.caches, expected.caches):
        assert all(torch.equal(a, b) for a, b in zip(cache.visible_positions(), reference.visible_positions()))
    fed_past = [(starts + length - 1 > ends).any() for starts, length, ends, _ in chunks]
    assert sum(fed_past) >= 2  # windows did run past line ends
    assert all((starts + counts - 1 <= ends).all() for starts, _, ends, counts in chunks)  # never committed past
    assert got.stats["decode_passes_batch"] <= stopped.stats["decode_passes_batch"] <= expected.stats["decode_passes_batch"]
    assert got.stats["tokens_fed_per_pass"] > stopped.stats["tokens_fed_per_pass"]


def tiny_lines(coupling: str | None, window: int = 6):
    """A 4 x 4-token LlamaGen with 6 tokens sampling at temperature 1, sequential and SJD (None) or MC-SJD."""
    model = tiny_llamagen(grid=4, layers=1, heads=2, dim=16, vocab=6, std=0.8, seed=3)
    family = LlamaGenFamily(model.layout, 10, None)
    sampling = SamplingConfig(1.5, -1, 1.0, 0, 1.0)
    sequential = WithMethod(Generator.assemble("seq", model, family, sampling, "random"), Sequential())
    method = Speculative(window=window) if coupling is None else CoupledSpeculative(window=window, coupling=coupling)
    return sequential, WithMethod(Generator.assemble("spec", model, family, sampling, "random"), method)


def past_line_end_homogeneity(sequential, speculative, linear) -> float:
    """Chi-square p-value of the joint of tokens (13, 14), sequential vs speculative, LineAR budget 10 of 16."""

    def pairs(generator, seed: int) -> np.ndarray:
        tokens = generator.generate(torch.arange(SAMPLES) % 10, torch.arange(SAMPLES), linear, 10, seed=seed).tokens
        return np.bincount((tokens[:, 13] * 6 + tokens[:, 14]).numpy(), minlength=36)

    table = np.stack([pairs(sequential, 0), pairs(speculative, 1)])
    return chi2_contingency(table[:, table.sum(0) > 0])[1]


@pytest.mark.parametrize("coupling", [None, "maximal"])
def test_drafts_past_a_line_end_keep_the_sequential_distribution(policy_factory, monkeypatch, coupling):
    """LineAR, budget 10 of 16 on a 4 x 4 grid: the first eviction is at token 11's commit; windows verify up to
    token 12 and draft 13 onwards past it, judged next iteration against the evicted cache. The joint of tokens
    (13, 14) agrees with sequential sampling (chi-square), and windows did run past the line end."""
    sequential, speculative = tiny_lines(coupling)
    chunks = line_end_chunks(monkeypatch)
    assert past_line_end_homogeneity(sequential, speculative, policy_factory("linear")) > P_THRESHOLD
    assert any((starts + length - 1 > ends).any() for starts, length, ends, _ in chunks)


def test_drafts_past_a_line_end_that_keep_their_old_proposal_fail_the_same_test(policy_factory, monkeypatch):
    """Redrawing the drafts fed past a line end from this iteration's p but judging them next iteration against
    their old proposal (the uniform initialisation) biases them: the same test fails (p ~ 1e-46 here)."""
    lengths, refresh = JacobiState.lengths, JacobiState.refresh

    def remember(self):
        self.verified = lengths(self)[0]
        return self.verified, lengths(self)[1]

    def stale_proposals(self, p, drafts, targets, first_new, drafting):
        before = self.proposals.clone()
        refresh(self, p, drafts, targets, first_new, drafting)
        unverified = (torch.arange(p.shape[1]) >= torch.from_numpy(self.verified)[:, None]) & drafting
        images, columns = unverified.nonzero(as_tuple=True)
        slots = targets[images, columns] % self.method.window
        self.proposals[images, slots] = before[images, slots]

    monkeypatch.setattr(JacobiState, "lengths", remember)
    monkeypatch.setattr(JacobiState, "refresh", stale_proposals)
    sequential, speculative = tiny_lines("maximal")
    assert past_line_end_homogeneity(sequential, speculative, policy_factory("linear")) < P_THRESHOLD

@pytest.mark.slow  # about two minutes on two cores
def test_drafts_past_line_ends_take_fewer_passes_under_linear_on_the_demo_model(make_config):
    """The trained demo model, LineAR 1/4 (a line end every 16 tokens): drafts fed past a line end survive into
    the next iteration as proposals, so MC-SJD (its default window) takes fewer passes than with windows that
    stop at the line end, on the same samples, and feeds more tokens per pass."""
    from lineareval.runner import run

    def record(*decoding: str) -> dict:
        return run(make_config("model=demo", "num_samples=8", "batch_size=8", "decode_images=false",
                               "benchmark=samples", "cache=linear", "keep=1/4", "decoding=mc_sjd", *decoding))

    stopping, past = record("decoding.draft_past_evictions=false"), record()
    assert past["decoding"]["draft_past_evictions"] is True
    assert past["decode_passes_per_image"] < 0.9 * stopping["decode_passes_per_image"]
    assert past["tokens_fed_per_pass"] > stopping["tokens_fed_per_pass"]
