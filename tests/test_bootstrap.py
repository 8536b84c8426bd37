"""The paired bootstrap (lineareval/metrics/bootstrap.py, paired.py): exact replicates, coverage, zero self-difference.

Coverage: features of a "partner" run A_i ~ N(0, I_D) and of a "run" B_i = A_i + delta (a known shift
of every sample, so the runs are paired as a compressed run and its full-cache partner are), scored
against one fixed reference set. The population differences conditional on that reference are known
in closed form (FID: 2 delta.(0 - mu_r) + |delta|^2, since B's covariance is A's; KID: Gaussian moment
tensors below), and the 95% paired interval must cover them at about 95% of the seeded repetitions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

from lineareval.metrics.bootstrap import (BootstrapSettings, FrechetReplicates, KernelReplicates, percentile_interval,
                                          replicate_counts)
from lineareval.metrics.fid import ReferenceStatistics, feature_statistics, frechet_distance
from lineareval.metrics.paired import distribution_summary

D = 4  # feature dimension of the synthetic runs
DELTA = np.array([0.25, -0.15, 0.1, 0.0])


def reference_set(count: int = 300, seed: int = 100) -> ReferenceStatistics:
    features = np.random.default_rng(seed).normal(size=(count, D)) * 1.1 + 0.05
    mu, sigma = feature_statistics(features)
    return ReferenceStatistics(features, mu, sigma, None, None, "synthetic", (0, 0))


def gaussian_moments(mean: np.ndarray) -> list[np.ndarray]:
    """E x^(tensor p) for p = 0..3 of x ~ N(mean, I)."""
    eye = np.eye(len(mean))
    third = (np.einsum("i,j,k->ijk", mean, mean, mean) + np.einsum("ij,k->ijk", eye, mean)
             + np.einsum("ik,j->ijk", eye, mean) + np.einsum("jk,i->ijk", eye, mean))
    return [np.ones(()), mean, eye + np.outer(mean, mean), third]


def expected_kernel(moments_x: list[np.ndarray], moments_y: list[np.ndarray]) -> float:
    """E (x.y / D + 1)^3 for independent x, y: sum_p C(3, p) D^-p <E x^(p), E y^(p)>."""
    return sum(math.comb(3, p) * D**-p * float((moments_x[p] * moments_y[p]).sum()) for p in range(4))


def kid_population(mean: np.ndarray, reference: np.ndarray) -> float:
    """KID of N(mean, I) against the fixed reference set, without the reference's own term (it cancels)."""
    moments = gaussian_moments(mean)
    cross = np.mean([expected_kernel(moments, [np.ones(()), r, np.outer(r, r), np.einsum("i,j,k->ijk", r, r, r)])
                     for r in reference])
    return expected_kernel(moments, moments) - 2 * cross


def test_frechet_replicates_equal_the_frechet_distance_of_the_resampled_features():
    rng = np.random.default_rng(0)
    reference = reference_set()
    for n in (3 * D, 60):  # n <= D would be the Gram route in the real D = 2048; here both routes run
        features = rng.gamma(2.0, size=(n, D))
        counts = next(replicate_counts(n, BootstrapSettings(replicates=2, seed=n)))[0]
        resampled = np.repeat(features, counts, axis=0)
        expected = frechet_distance(*feature_statistics(resampled), reference.mu, reference.sigma)
        assert FrechetReplicates(features, reference.mu, reference.sigma)(counts)[0] == pytest.approx(expected, rel=1e-9)
    wide = rng.gamma(2.0, size=(12, 40))  # n <= D: the n x n Gram route
    mu, sigma = feature_statistics(rng.gamma(3.0, size=(80, 40)))
    counts = np.bincount(rng.integers(0, 12, 12), minlength=12)
    expected = frechet_distance(*feature_statistics(np.repeat(wide, counts, axis=0)), mu, sigma)
    replicate = FrechetReplicates(wide, mu, sigma)
    assert replicate.low_rank and replicate(counts)[0] == pytest.approx(expected, rel=1e-6)  # sqrtm: ~1e-8


def test_kid_replicate_is_the_unbiased_mmd_without_pairs_of_copies():
    rng = np.random.default_rng(1)
    features, reference = rng.normal(size=(15, D)), rng.normal(size=(20, D)) + 0.3
    kernel = KernelReplicates(features, reference)
    k = lambda x, y: (x @ y.T / D + 1) ** 3  # noqa: E731
    within_reference = (k(reference, reference).sum() - np.trace(k(reference, reference))) / (20 * 19)
    unbiased = (k(features, features).sum() - np.trace(k(features, features))) / (15 * 14) + within_reference \
        - 2 * k(features, reference).mean()
    assert kernel(np.ones(15, dtype=np.int64))[0] == pytest.approx(unbiased, rel=1e-12)
    counts = np.array([3, 0, 2] + [1] * 10 + [0, 0])  # sum 15: index 0 three times, index 2 twice
    drawn = np.repeat(np.arange(15), counts)
    same = drawn[:, None] == drawn[None, :]  # copies of one index, the diagonal included
    expected = k(features[drawn], features[drawn])[~same].mean() + within_reference \
        - 2 * k(features[drawn], reference).mean()
    assert kernel(counts)[0] == pytest.approx(expected, rel=1e-12)


def coverage_draw(seed: int, n: int, reference: ReferenceStatistics, settings: BootstrapSettings,
                  paired: bool = True) -> dict:
    """One repetition; `paired=False` shuffles the partner's rows, so index i no longer pairs two samples."""
    rng = np.random.default_rng(seed)
    partner = rng.normal(size=(n, D))
    run = partner + DELTA
    return distribution_summary(run, reference, settings, partner=partner if paired else partner[rng.permutation(n)])


def test_paired_intervals_cover_the_true_difference_at_the_nominal_rate():
    """200 seeded repetitions of 150 pairs, 300 replicates each: the 95% intervals of the FID and KID
    differences cover the closed-form truth at a rate inside the binomial 99.9% band around 0.95
    (179 to 198 of 200; measured: 191 and 192). With the pairing broken (the partner's rows shuffled, so
    a resample no longer draws pairs) the FID interval is 1.7 times wider and covers all 200."""
    reference, settings = reference_set(), BootstrapSettings(replicates=300, confidence=0.95, seed=7)
    true_fid = 2 * DELTA @ (0 - reference.mu) + DELTA @ DELTA  # covariances are equal: they cancel
    true_kid = kid_population(DELTA, reference.features) - kid_population(np.zeros(D), reference.features)
    repetitions = 200
    covered, widths = {"fid": 0, "kid": 0}, {True: [], False: []}
    for seed in range(repetitions):
        record = coverage_draw(seed, 150, reference, settings)
        for name, truth in (("fid", true_fid), ("kid", true_kid)):
            covered[name] += record[f"{name}_difference_ci_low"] <= truth <= record[f"{name}_difference_ci_high"]
        for paired in (True, False) if seed < 20 else ():
            shuffled = coverage_draw(seed, 150, reference, settings, paired) if not paired else record
            widths[paired].append(shuffled["fid_difference_ci_high"] - shuffled["fid_difference_ci_low"])
    low, high = binom.ppf([0.0005, 0.9995], repetitions, settings.confidence)
    assert all(low <= count <= high for count in covered.values()), (covered, low, high)
    assert np.mean(widths[False]) > 1.4 * np.mean(widths[True]), widths  # measured: 1.7 times


def test_a_run_against_itself_differs_by_exactly_zero_with_a_zero_width_interval():
    reference = reference_set()
    features = np.random.default_rng(3).normal(size=(50, D))
    record = distribution_summary(features, reference, BootstrapSettings(replicates=50), partner=features.copy())
    for name in ("fid", "kid", "precision"):
        assert record[f"{name}_difference"] == 0.0
        assert record[f"{name}_difference_ci_low"] == record[f"{name}_difference_ci_high"] == 0.0
    assert record["recall_difference"] == 0.0 and record["recall_difference_ci_low"] is None
    assert record["kid_se"] > 0  # KID itself still varies over resamples


def test_percentile_interval_and_counts_are_seeded():
    settings = BootstrapSettings(replicates=5, seed=11)
    first, second = np.concatenate(list(replicate_counts(9, settings))), np.concatenate(list(replicate_counts(9, settings, 20)))
    assert first.shape == (5, 9) and np.array_equal(first, second) and (first.sum(1) == 9).all()
    assert percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0), abs=1e-12)
    with pytest.raises(ValueError, match="confidence"):
        BootstrapSettings(confidence=95)
    assert torch.get_default_dtype() == torch.float32  # the replicates never change global state
