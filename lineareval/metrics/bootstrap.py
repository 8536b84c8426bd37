"""Paired bootstrap of distribution metrics: a run against its full-cache partner on the same samples.

Sample i of a compressed run and sample i of the full-cache run come from the same condition and the
same random draws (the keyed sampler), so the two runs are paired image by image. The paired
bootstrap (Efron & Tibshirani 1993, ch. 6 and 13) draws `replicates` resamples of the sample indices
with replacement, the same indices for both runs, and recomputes each metric of both runs on them
against fixed reference features; the difference run - partner of every replicate gives a percentile
interval (the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles, numpy's linear interpolation).
The resampling unit is the sample index (one condition and its random draws); the reference set is
held fixed, so the intervals are conditional on it, which is what a difference between two runs
scored against one reference needs. A replicate is a vector of counts c (how often each index was
drawn, sum n), and every statistic below is written as a function of c, computed from matrices built
once, so no replicate re-extracts features or rebuilds an n x n kernel.

- FID (Heusel et al. 2017, https://arxiv.org/abs/1706.08500) of the resample against the reference
  Gaussian (mu_r, sigma_r): for n <= D through the n x n Gram matrix X sigma_r X^T (the non-zero
  eigenvalues of sigma sigma_r are those of Z sigma_r Z^T with Z the weighted centred rows; duplicates
  are merged into weights, so only distinct indices enter the eigenproblem); for n > D through the
  D x D weighted covariance and sigma_r^(1/2), precomputed. Both equal `metrics.fid.frechet_distance`
  of the resampled features up to rounding. Cost per replicate and run: n <= D: an eigvalsh of at
  most n x n; n > D: the covariance (n D^2 multiply-adds), two D^3 products and a D x D eigvalsh. At
  D = 2048, measured on two shared CPU cores: 5.5 s per replicate at n = 5,000 (eigvalsh 3.7 s), so
  about 10-15 s at n = 50,000 and 6-8 h for 1,000 replicates of two runs; estimated 0.1 s on one
  H100/H200 in float64 (the statistics run on the evaluation device), a few minutes in all.
- KID (Binkowski et al. 2018, https://arxiv.org/abs/1801.01401): the unbiased MMD^2 with torch-fidelity's
  cubic polynomial kernel (x.y / D + 1)^3 over all n samples and all M reference images (one U-statistic,
  not torch-fidelity's average over random subsets, whose spread is that of the subset size, not of the
  estimate). In a replicate, pairs of copies of one index are excluded like the diagonal (a weighted
  U-statistic with weights c_i c_j over i != j), so duplicates do not bias it. `kid_se` is the standard
  deviation of the replicates: the bootstrap standard error, conditional on the reference. Needs the
  n x n kernel (8 n^2 bytes: 20 GB at 50,000), so above `kid_max_samples` KID is left out with a reason.
- Precision (Kynkaenniemi et al. 2019, https://arxiv.org/abs/1904.06991): the fraction of samples inside
  the reference manifold (k-NN balls of the fixed reference), a mean of per-sample indicators, so it
  resamples like any mean. Recall is a property of the sample set itself (its k-NN balls are built from
  the samples, and a resample's duplicates sit at distance 0, shrinking them): its difference is
  reported without an interval, with that reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BootstrapSettings:
    """How many replicates, at which confidence, from which seed (`paired.*` in conf/config.yaml)."""

    replicates: int = 1000
    confidence: float = 0.95
    seed: int = 0
    kid_max_samples: int = 20000

    def __post_init__(self) -> None:
        if self.replicates < 2:
            raise ValueError(f"paired.replicates must be at least 2, got {self.replicates}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"paired.confidence must be in (0, 1), got {self.confidence}")


def replicate_counts(n: int, settings: BootstrapSettings, entries: int = 2**22) -> Iterator[np.ndarray]:
    """Blocks (b, n) of int64 counts: row r says how often resample r drew each index (each row sums to n).

    The draws are `settings.replicates` resamples of n indices with replacement from one seeded generator,
    yielded in blocks of about `entries` counts so that 1,000 replicates of 50,000 samples fit in memory.
    """
    rng = np.random.default_rng(settings.seed)
    block = max(1, min(settings.replicates, entries // n))
    for start in range(0, settings.replicates, block):
        draws = rng.integers(0, n, (min(block, settings.replicates - start), n))  # (b, n)
        yield np.stack([np.bincount(row, minlength=n) for row in draws])


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates: their (1 -+ confidence) / 2 quantiles."""
    low, high = np.quantile(np.asarray(values, dtype=np.float64), [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


class FrechetReplicates:
    """FID of count-weighted resamples of features (n, D) against a fixed Gaussian (mu_r, sigma_r).

    Called with counts (b, n), returns (b,) FIDs; counts of ones give the FID of the features themselves.
    """

    def __init__(self, features: np.ndarray, mu: np.ndarray, sigma: np.ndarray, device: str | torch.device = "cpu"):
        x = torch.as_tensor(np.asarray(features), dtype=torch.float64, device=device)  # (n, D)
        self.mu = torch.as_tensor(mu, dtype=torch.float64, device=device)  # (D,)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device)  # (D, D)
        self.trace_reference = float(sigma.trace())
        self.low_rank = len(x) <= x.shape[1]
        self.centre = x.mean(0)  # (D,): the covariance is accumulated about it, then moved to the resample's mean
        self.x = x - self.centre
        if self.low_rank:
            self.gram = self.x @ self.x.T  # (n, n)
            self.gram_reference = self.x @ sigma @ self.x.T  # (n, n)
            self.x_mu = self.x @ (self.mu - self.centre)  # (n,)
        else:
            values, vectors = torch.linalg.eigh(sigma)
            self.root = (vectors * values.clamp(min=0).sqrt()) @ vectors.T  # sigma_r^(1/2), (D, D)
            self.chunk = max(1, 2**23 // x.shape[1] ** 2)  # replicates per batched (b, D, D) covariance

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        c = torch.as_tensor(np.atleast_2d(counts), dtype=torch.float64, device=self.x.device)  # (b, n)
        if self.low_rank:
            with one_thread(self.x.device):
                return np.array([self._low_rank(row) for row in c])
        return np.concatenate([self._covariance(part) for part in c.split(self.chunk)])

    def _covariance(self, c: torch.Tensor) -> np.ndarray:
        n = c.sum(1)  # (b,)
        shift = (c @ self.x) / n[:, None]  # (b, D): the resample's mean minus the centre
        scatter = torch.einsum("bn,nd,ne->bde", c, self.x, self.x) - n[:, None, None] * shift[:, :, None] * shift[:, None]
        sigma = scatter / (n - 1)[:, None, None]  # (b, D, D)
        eigenvalues = torch.linalg.eigvalsh(self.root @ sigma @ self.root)  # (b, D)
        difference = shift + self.centre - self.mu
        fid = ((difference * difference).sum(1) + sigma.diagonal(dim1=1, dim2=2).sum(1) + self.trace_reference
               - 2 * eigenvalues.clamp(min=0).sqrt().sum(1))
        return fid.cpu().numpy()

    def _low_rank(self, c: torch.Tensor) -> float:
        n = float(c.sum())
        kept = torch.nonzero(c).flatten()  # copies are merged into weights: only distinct rows enter the eigenproblem
        w = c / n
        g, k = self.gram_reference @ w, self.gram @ w  # (n,)
        centred_reference = self.gram_reference - g[:, None] - g[None, :] + w @ g  # (X - m) sigma_r (X - m)^T
        scale = (c[kept] / (n - 1)).sqrt()
        h = centred_reference.index_select(0, kept).index_select(1, kept) * scale[:, None] * scale[None, :]
        trace_sqrt = torch.linalg.eigvalsh(h).clamp(min=0).sqrt().sum()
        trace_sigma = (c * (self.gram.diagonal() - 2 * k + w @ k)).sum() / (n - 1)
        target = self.mu - self.centre
        mean_term = w @ k - 2 * (w @ self.x_mu) + target @ target  # |m - mu_r|^2
        return float(mean_term + trace_sigma + self.trace_reference - 2 * trace_sqrt)


@contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """Small eigenproblems on one CPU thread: LAPACK's threaded eigvalsh of a 253 x 253 matrix took 2.4 s
    with two threads on two busy cores and 4 ms with one (its threads wait for each other)."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """torch-fidelity's KID kernel (x.y / D + 1)^3: (n, D), (m, D) -> (n, m)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


class KernelReplicates:
    """KID (unbiased MMD^2, cubic kernel) of count-weighted resamples of features against fixed reference."""

    def __init__(self, features: np.ndarray, reference: np.ndarray, device: str | torch.device = "cpu"):
        x = torch.as_tensor(np.asarray(features), dtype=torch.float64, device=device)  # (n, D)
        r = torch.as_tensor(np.asarray(reference), dtype=torch.float64, device=device)  # (M, D)
        self.within = polynomial_kernel(x, x)  # (n, n)
        self.cross = torch.cat([polynomial_kernel(x, part).sum(1) for part in r.split(4096)]) / len(r)  # (n,)
        within_reference = sum(float(polynomial_kernel(part, r).sum()) for part in r.split(4096))
        trace_reference = float((((r * r).sum(1) / r.shape[1] + 1) ** 3).sum())  # the diagonal k(r, r)
        self.reference_term = (within_reference - trace_reference) / (len(r) * (len(r) - 1))

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        """Counts (b, n) -> (b,) KIDs."""
        c = torch.as_tensor(np.atleast_2d(counts), dtype=torch.float64, device=self.within.device)  # (b, n)
        n = c.sum(1)
        pairs = ((c @ self.within) * c).sum(1) - (c * c) @ self.within.diagonal()  # pairs of distinct indices
        kid = pairs / (n * n - (c * c).sum(1)) + self.reference_term - 2 * (c @ self.cross) / n
        return kid.cpu().numpy()


class MeanReplicates:
    """The count-weighted mean of per-sample values (n,): counts (b, n) -> (b,) means."""

    def __init__(self, values: np.ndarray):
        self.values = np.asarray(values, dtype=np.float64)

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        counts = np.atleast_2d(counts)
        return counts @ self.values / counts.sum(1)


def replicates(statistics: list[Callable[[np.ndarray], np.ndarray]], n: int,
               settings: BootstrapSettings) -> tuple[np.ndarray, np.ndarray]:
    """Each statistic on the n samples themselves (S,) and on the shared resamples (replicates, S)."""
    start = time.perf_counter()
    point = np.array([float(statistic(np.ones((1, n), dtype=np.int64))[0]) for statistic in statistics])
    values = [np.stack([statistic(block) for statistic in statistics], axis=1)
              for block in replicate_counts(n, settings)]
    log.debug("%d replicates of %d statistics over %d samples: %.2f s", settings.replicates, len(statistics), n,
              time.perf_counter() - start)
    return point, np.concatenate(values)
