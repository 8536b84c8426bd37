"""The PIT goodness-of-fit test of a decoding method against the model's sequential conditionals
(lineareval/decoding/goodness.py):

- the randomized PIT of exact draws from random distributions is uniform, and draws from a sharpened p are not;
- on the trained demo model sequential decoding and MC-SJD (its defaults: window 32, init=above) pass it under
  the full cache and LineAR 1/4, and a sampler at temperature 0.95 scored at 1 fails it by far.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import lineareval
from lineareval.decoding.goodness import TeacherForced, pit_summary, randomized_pit, score_tokens

PASS_P = 1e-3  # fixed seeds: deterministic; an exact sampler falls below this one time in a thousand
COUNT = 64


def test_randomized_pit_of_exact_draws_is_uniform_and_of_sharpened_draws_is_not():
    generator = torch.Generator().manual_seed(0)
    p = torch.softmax(2 * torch.randn(20000, 12, generator=generator, dtype=torch.float64), -1)
    p[:, 3] = p[:, 5]  # ties are ranked by token id
    p = p / p.sum(1, keepdim=True)
    v = np.random.default_rng(1).random(len(p))
    exact = torch.multinomial(p, 1, generator=generator)[:, 0]
    sharp = torch.multinomial(p ** 1.1, 1, generator=generator)[:, 0]
    log_p, u = randomized_pit(p, exact, v)
    assert np.allclose(log_p, p.gather(1, exact[:, None])[:, 0].log().numpy())
    assert stats.kstest(u, "uniform").pvalue > PASS_P
    assert stats.kstest(randomized_pit(p, sharp, v)[1], "uniform").pvalue < 1e-6


def demo_summary(decoding: str, cache: str, keep: str, *overrides: str) -> dict:
    """The PIT summary of 64 demo samples drawn with `decoding` (and sampling `overrides`), scored under the
    demo's own sampling."""
    pipe = lineareval.load("demo", f"decoding={decoding}", *overrides, cache=cache, keep=keep)
    scorer = lineareval.load("demo", cache=cache, keep=keep) if overrides else pipe  # scoring reads no decoding
    labels, ids = torch.arange(COUNT) % 10, torch.arange(COUNT)
    tokens = torch.from_numpy(pipe.generate(labels=labels.tolist(), seed=11, decode=False).tokens)
    log_p, pit = score_tokens(scorer.generator, scorer.policy, scorer.budgets, labels, ids, tokens, seed=11, batch_size=32)
    assert np.isfinite(pit).all() and pit.shape == (COUNT, 256)
    return pit_summary(log_p, pit)


@pytest.mark.parametrize("decoding,cache,keep", [
    ("mc_sjd", "full", "1"),
    pytest.param("sequential", "full", "1", marks=pytest.mark.slow),
    pytest.param("sequential", "linear", "1/4", marks=pytest.mark.slow),
    pytest.param("mc_sjd", "linear", "1/4", marks=pytest.mark.slow)])
def test_distribution_preserving_decodings_pass_on_the_demo_model(decoding, cache, keep):
    summary = demo_summary(decoding, cache, keep)
    assert summary["mean_pit_p"] > PASS_P and summary["ks_p"] > PASS_P, summary


def test_a_colder_sampler_fails_on_the_demo_model():
    summary = demo_summary("sequential", "full", "1", "sampling.temperature=0.95")
    assert summary["mean_pit"] < 0.5 and summary["mean_pit_p"] < 1e-6 and summary["ks_p"] < 1e-6, summary


def test_teacher_forcing_refuses_tokens_of_the_wrong_shape():
    pipe = lineareval.load("demo")
    with pytest.raises(ValueError, match="tokens of shape"):
        pipe.generator.generate(torch.arange(2), torch.arange(2), pipe.policy, pipe.budgets, 0,
                                TeacherForced(tokens=torch.zeros(2, 5, dtype=torch.long)))
