"""Speculative Jacobi decoding composed with every cache policy and model family.

- greedy SJD (top_k=1: Jacobi decoding) gives the sequential tokens, and leaves every cache holding exactly
  the positions sequential decoding's holds (per layer, head and sequence);
- sampling: the frequency of each value of the first token SJD verifies, over thousands of samples, agrees with
  sequential sampling (a chi-square test), and a wrong acceptance rule or residual fails the same test;
- an image's tokens do not depend on the batch it is generated in.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from conftest import CACHE_CONFIGS, WithMethod, tiny_llamagen
from lineareval.decoding.method import Sequential
from lineareval.decoding.speculative import JacobiState, Speculative
from lineareval.generators.base import Generator
from lineareval.generators.llamagen import LlamaGenFamily
from lineareval.factory import build_generator, build_policy
from lineareval.sampling import SamplingConfig
from test_compile_readiness import PROMPTS, TINY

P_THRESHOLD = 1e-3  # chi-square homogeneity: a correct sampler fails this once in a thousand seeds
SAMPLES = 6000  # per sampler: enough that a residual drawn from p instead of max(0, p - q) fails (p ~ 1e-6)


def keep_for(name: str) -> str:
    return "1" if name == "full" else "1/3"


def tiny_pair(make_config, family: str, policy: str, *extra: str):
    """The same tiny random model decoding sequentially and with SJD (greedy), and the policy and budget."""
    from lineareval.keep import parse_keep

    base = (*TINY[family], "weights=random", "decode_images=false", f"cache={policy}", "sampling.top_k=1", *extra)
    sequential = WithMethod(build_generator(make_config(*base), torch.device("cpu"), torch.float32), Sequential())
    speculative = WithMethod(Generator.assemble("sjd", sequential.model, sequential.family, sequential.decoder.sampling,
                                                "random"), Speculative(window=5))
    cfg = make_config(*base)
    budget = parse_keep(keep_for(policy)).budget(sequential.layout.num_visual)
    return sequential, speculative, build_policy(cfg.cache), budget


def conditions(generator):
    return PROMPTS if generator.conditioning == "text" else torch.tensor([3, 7])


def greedy_cases():
    """Every policy on LlamaGen; LineAR (line-end windows) on the text families in the default suite, the rest slow."""
    for family in ("llamagen", "janus", "lumina"):
        for policy in CACHE_CONFIGS:
            marks = () if family == "llamagen" or policy == "linear" else (pytest.mark.slow,)
            yield pytest.param(family, policy, id=f"{family}-{policy}", marks=marks)


@pytest.mark.parametrize("family, policy", list(greedy_cases()))
def test_greedy_sjd_equals_sequential_tokens_and_caches(make_config, family, policy):
    sequential, speculative, built, budget = tiny_pair(make_config, family, policy)
    ids = torch.arange(2)
    expected = sequential.generate(conditions(sequential), ids, built, budget, seed=0)
    got = speculative.generate(conditions(speculative), ids, built, budget, seed=0)
    assert torch.equal(got.tokens, expected.tokens)
    for cache, reference in zip(got.caches, expected.caches):  # every branch (Lumina: two caches)
        assert all(torch.equal(a, b) for a, b in zip(cache.visible_positions(), reference.visible_positions()))
    assert got.stats["decode_passes_batch"] <= expected.stats["decode_passes_batch"]


def test_lumina_forced_new_lines_are_drafted_and_accepted(make_config):
    sequential, speculative, built, budget = tiny_pair(make_config, "lumina", "linear")
    tokens = speculative.generate(PROMPTS, torch.arange(2), built, budget, seed=1).tokens
    rows = tokens.view(2, speculative.layout.rows, speculative.layout.line_len)
    assert (rows[:, :, -1] == speculative.family.tokens.new_line).all()


def tiny_sampler(window: int = 3, wrong: bool = False):
    """A 2 x 2-token LlamaGen with 6 tokens (sharp enough to differ from uniform), sampling at temperature 1."""
    model = tiny_llamagen(grid=2, layers=1, heads=2, dim=16, vocab=6, std=0.8, seed=3)
    family = LlamaGenFamily(model.layout, 10, None)
    sampling = SamplingConfig(1.5, -1, 1.0, 0, 1.0)
    sequential = WithMethod(Generator.assemble("seq", model, family, sampling, "random"), Sequential())
    speculative = WithMethod(Generator.assemble("sjd", model, family, sampling, "random"), Speculative(window=window))
    return sequential, speculative


def first_verified_counts(generator, count: int, seed: int, policy) -> np.ndarray:
    """Counts of token 1: the first one SJD verifies, always against a random (uniform) draft first."""
    labels = torch.arange(count) % 10
    tokens = generator.generate(labels, torch.arange(count), policy, 4, seed=seed).tokens
    return np.bincount(tokens[:, 1].numpy(), minlength=6)


def test_sjd_samples_the_sequential_distribution(policy_factory):
    sequential, speculative = tiny_sampler()
    full = policy_factory("full")
    table = np.stack([first_verified_counts(sequential, SAMPLES, 0, full), first_verified_counts(speculative, SAMPLES, 1, full)])
    assert chi2_contingency(table[:, table.sum(0) > 0])[1] > P_THRESHOLD, table


def test_a_wrong_acceptance_rule_fails_the_same_test(policy_factory, monkeypatch):
    """Accepting every draft (no rejection sampling) samples the drafts' distribution, not the model's."""
    original = JacobiState.verify

    def accept_all(self, p, drafts, targets, valid):
        original(self, p, drafts, targets, valid)
        return valid.long().sum(dim=1).cpu().numpy()

    monkeypatch.setattr(JacobiState, "verify", accept_all)
    sequential, speculative = tiny_sampler()
    full = policy_factory("full")
    table = np.stack([first_verified_counts(sequential, SAMPLES, 0, full), first_verified_counts(speculative, SAMPLES, 1, full)])
    assert chi2_contingency(table[:, table.sum(0) > 0])[1] < P_THRESHOLD, table


def test_a_wrong_residual_fails_the_same_test(policy_factory, monkeypatch):
    """Resampling a rejected draft from p instead of the residual max(0, p - q) over-weights what q proposed."""
    from lineareval.decoding import speculative

    def residual_from_p(self, p, positions, drafts):
        return self.draw(p[:, None], positions[:, None], speculative.RESIDUAL)[:, 0]

    monkeypatch.setattr(JacobiState, "residual", residual_from_p)
    sequential, sjd = tiny_sampler()
    full = policy_factory("full")
    table = np.stack([first_verified_counts(sequential, SAMPLES, 0, full), first_verified_counts(sjd, SAMPLES, 1, full)])
    assert chi2_contingency(table[:, table.sum(0) > 0])[1] < P_THRESHOLD, table


def test_an_images_tokens_do_not_depend_on_its_batch(policy_factory):
    _, speculative = tiny_sampler(window=3)
    linear = policy_factory("full")
    together = speculative.generate(torch.tensor([1, 4, 7]), torch.tensor([0, 1, 2]), linear, 4, seed=5).tokens
    alone = speculative.generate(torch.tensor([4]), torch.tensor([1]), linear, 4, seed=5).tokens
    assert torch.equal(together[1], alone[0])


def test_efficiency_rows_report_passes_and_tokens_per_pass_for_every_decoding(make_config):
    from lineareval.runner import run

    record = run(make_config("benchmark=efficiency", "weights=random", "batch_size=2", "model.image_size=128",
                             "benchmark.warmup=0", "benchmark.rows=[full,linear@1/4]",
                             "benchmark.decodings=[sequential,sjd]"))
    rows = {(row["decoding"], row["cache"]): row for row in record["rows"]}
    assert set(rows) == {(decoding, cache) for decoding in ("sequential", "sjd") for cache in ("full", "linear")}
    for (decoding, _), row in rows.items():
        if decoding == "sequential":
            assert (row["decode_passes_per_image"], row["tokens_per_pass"]) == (63.0, 1.0)
        else:
            assert row["decode_passes_per_image"] <= 63 and row["tokens_per_pass"] >= 1.0
        assert row["speedup_vs_first_full"] == rows["sequential", "full"]["generation_s"] / row["generation_s"]


def test_the_record_names_the_decoding_method_and_its_passes(make_config):
    from lineareval.runner import run

    record = run(make_config("weights=random", "num_samples=2", "batch_size=2", "decode_images=false",
                             "decoding=gsd", "decoding.window=4", "cache=linear", "keep=1/4"))
    assert record["decoding"]["name"] == "gsd" and record["distribution_preserving"] is False
    assert 1 <= record["tokens_per_pass"] and record["decode_passes_per_image"] <= 255
    assert "_gsd_" in make_config("decoding=gsd").run_dir


@pytest.mark.parametrize("policy", ["window", "streamingllm", "h2o"])
def test_per_step_policies_with_commit_eviction_follow_the_chunk_semantics(make_config, policy, monkeypatch):
    """`eviction: commit`: SJD's windows run past per-step evictions; every committed query's logits equal the
    forward that hides exactly what the engine showed it (the cache as the window began plus the window's
    earlier tokens), the engine's chunk semantics (tests/test_chunks.py), and evictions happen at commit."""
    from lineareval.cache.engine import KVCache
    from lineareval.decoding.stepper import Stepper
    from test_chunks import ChunkTrace, chunk_masks
    from conftest import llamagen_depth, roundoff_tolerance

    sequential, _, built, budget = tiny_pair(make_config, "llamagen", policy)
    model, layout = sequential.model, sequential.layout
    speculative = WithMethod(Generator.assemble("sjd", model, sequential.family, sequential.decoder.sampling, "random"),
                             Speculative(window=5, eviction="commit"))
    chunks, commit, decode_chunk = [], KVCache.commit, Stepper.decode_chunk

    def recording_chunk(self, tokens, first, cache, positions=None):
        before = cache.visible_positions()
        logits = decode_chunk(self, tokens, first, cache, positions)
        chunks.append([before, tokens.clone(), first.clone(), logits, None])
        return logits

    def recording_commit(self, counts):
        chunks[-1][-1] = np.asarray(counts).copy()
        return commit(self, counts)

    monkeypatch.setattr(Stepper, "decode_chunk", recording_chunk)
    monkeypatch.setattr(KVCache, "commit", recording_commit)
    labels = torch.tensor([3, 7])
    generation = speculative.generate(labels, torch.arange(2), built, budget, seed=0)
    sequences, steps, total = 4, layout.num_visual - 1, layout.prefix_len + layout.num_visual
    visible = torch.zeros(len(model.layers), sequences, model.config.n_head, steps, total, dtype=torch.bool)
    logits = torch.zeros(sequences, steps, model.config.vocab_size)
    for before, tokens, first, out, counts in chunks:  # before: the cache as the window began (attention time)
        for row in range(sequences):
            for order in range(int(counts[row])):
                index = int(first[row]) + order
                logits[row, index] = out[row, order]
                for layer, layer_map in enumerate(before):
                    seen = layer_map[row].clone()
                    seen[:, layout.prefix_len + int(first[row]): layout.prefix_len + index + 1] = True
                    visible[layer, row, :, index] = seen
    rows = torch.cat([labels, torch.full_like(labels, sequential.family.num_classes)])  # [cond; null]
    fed = torch.cat([generation.tokens, generation.tokens])[:, :-1]
    oracle = model(rows, fed, chunk_masks(ChunkTrace(logits, visible, len(chunks)), layout.prefix_len))
    oracle = oracle[:, layout.prefix_len:]
    torch.testing.assert_close(logits, oracle, **roundoff_tolerance(oracle, llamagen_depth(model)))
    # windows ran past per-step evictions: chunks begun with the budget full committed several tokens
    assert any(int(counts.max()) > 1 for _, _, first, _, counts in chunks if int(first.min()) >= budget)


def test_drafts_from_the_target_distribution_are_all_accepted(make_config):
    """At a huge temperature p is uniform over the vocabulary, as the random drafts' q is: every draft is
    accepted (p / q = 1 up to rounding), so each pass commits a whole window and the record says so; at the
    model's temperature some are rejected. Sequential decoding records no acceptance."""
    from lineareval.runner import run

    base = ("weights=random", "num_samples=2", "batch_size=2", "decode_images=false", "cache=full", "keep=1",
            "sampling.top_k=0", "sampling.top_p=1.0", "decoding=sjd", "decoding.window=8")
    uniform = run(make_config(*base, "sampling.temperature=1e6"))
    assert uniform["draft_acceptance"] > 0.99 and uniform["tokens_per_pass"] > 7
    model = run(make_config(*base))
    assert 0 < model["draft_acceptance"] < 1
    sequential = run(make_config(*base[:-2]))
    assert "draft_acceptance" not in sequential
    # each of the N - 1 decoded tokens was a judged draft and a pass ends at most one with a rejection
    decoded = sequential["decode_passes_per_image"]
    assert model["decode_passes_per_image"] >= (1 - model["draft_acceptance"]) * decoded - 1e-9


def test_above_drafts_of_a_window_longer_than_a_line_copy_through_the_drafts_drawn_with_them():
    """init=above with a window of 8 over lines of 3: a new draft two lines ahead copies the new draft one line
    up, drawn in the same fill, which copies the committed line (it used to read that draft's stale ring slot)."""
    from types import SimpleNamespace

    run = SimpleNamespace(num_visual=12, line_len=3, tokens=torch.zeros(1, 12, dtype=torch.long),
                          sample_ids=torch.arange(1), seed=0, vocab=5)
    run.tokens[0, :3] = torch.tensor([1, 2, 3])
    state = object.__new__(JacobiState)
    state.method, state.run, state.iteration = Speculative(window=8, init="above"), run, 0
    state.committed, state.drafted = np.array([3]), np.array([3])
    state.drafts, state.point = torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.bool)
    state.proposals, state.uniform = torch.zeros(1, 8, 5), torch.ones(5) / 5
    state.forced = torch.full((12,), -1)
    state.fill_drafts(np.array([8]))
    positions = torch.arange(3, 11)[None]
    assert state.ring(state.drafts, positions).tolist() == [[1, 2, 3, 1, 2, 3, 1, 2]]
    assert state.ring(state.point, positions).all()  # point masses: accepted with probability p(draft)
