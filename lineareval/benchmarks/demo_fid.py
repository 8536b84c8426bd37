"""FID of the demo model's samples against held-out real crops of its data set (`lineareval/demo`).

Labels are balanced (sample i has class i % classes), as is the reference: `reference_count`
crops from the held-out quadrant of each photograph, which training never saw. Features are
TF-Inception pool_3 from the offline `fid-helper-inception` extractor, through the feature, statistics
and precision/recall code of the ImageNet benchmark (`lineareval.metrics`). The one difference is
how FID's trace term is computed: `frechet_distance_low_rank` gives the same value as
`lineareval.metrics.fid.frechet_distance` but solves an N x N eigenproblem instead of the
D x D matrix square root, which takes 10-80 s per run on two CPU cores at D = 2048. The reference
batch is built once per image size into `cache_dir` (ADM layout, a few hundred KiB) and its
features are cached beside it, so every policy of a demo sweep is scored against the same set.
Its file name carries `DATA_VERSION`, so a change of the data code never reuses a stale batch.
With a few hundred samples FID is biased upward (the covariance is low-rank); compare policies at
the same `num_samples`, not with published FIDs.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lineareval.benchmarks.base import Benchmark
from lineareval.benchmarks.paired import PairedImageMetrics
from lineareval.benchmarks.samples import SampleSet
from lineareval.record import write_npz_atomic

log = logging.getLogger(__name__)


@dataclass
class DemoFID(PairedImageMetrics, Benchmark):
    """`reference_count` held-out crops (drawn with `reference_seed`) scored with `extractor`."""

    reference_count: int = 200
    reference_seed: int = 1
    extractor: str = "fid-helper-inception"
    cache_dir: str | None = None
    batch_size: int = 50

    def samples(self, cfg, generator) -> SampleSet:
        if generator.conditioning != "class":
            raise ValueError(f"benchmark=demo_fid needs a class-conditional model, not {cfg.model.name}")
        ids = torch.arange(cfg.num_samples)
        labels = ids % generator.num_classes  # balanced, like the reference
        return SampleSet(ids, labels, {"labels": labels.numpy()})

    def reference(self, image_size: int) -> Path:
        """The held-out reference batch (ADM `.npz`) for `image_size`, built on first use."""
        from lineareval.demo.data import DATA_VERSION, make_crops

        folder = Path(self.cache_dir) if self.cache_dir else Path(tempfile.gettempdir()) / "lineareval"
        name = f"demo_reference-v{DATA_VERSION}-{image_size}px-{self.reference_count}-seed{self.reference_seed}.npz"
        path = folder / name
        if not path.is_file():
            images, _ = make_crops(self.reference_count, image_size, "heldout", seed=self.reference_seed)
            folder.mkdir(parents=True, exist_ok=True)
            write_npz_atomic(path, arr_0=images)
            log.info("built %d held-out reference crops at %s", len(images), path)
        return path

    def reference_statistics_for(self, run_dir: Path, device: torch.device | str = "cpu"):
        """Statistics of the held-out crops at the run's image size (cached under `cache_dir`)."""
        from lineareval.metrics.fid import check_adm_npz, reference_statistics

        samples = Path(run_dir) / "samples.npz"
        if not samples.is_file():
            raise FileNotFoundError(f"{samples} does not exist: benchmark=demo_fid needs decode_images=true")
        image_size = int(check_adm_npz(samples).shape[1])
        return reference_statistics(self.reference(image_size), self.extractor, self.cache_dir,
                                    batch_size=self.batch_size, device=device, progress=False)

    def evaluate(self, run_dir: Path, device: torch.device | str = "cpu") -> dict:
        from lineareval.metrics.fid import precision_recall

        reference = self.reference_statistics_for(run_dir, device)
        features = self.pool_features(Path(run_dir), device)  # extracted once, cached in the run folder
        precision, recall = precision_recall(features, reference.features, device=device)
        return {"fid": frechet_distance_low_rank(features, reference.mu, reference.sigma), "precision": precision,
                "recall": recall, "num_reference": len(reference.features), "feature_extractor": self.extractor}


def frechet_distance_low_rank(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """FID of sample features (N, D) against a Gaussian (mu (D,), sigma (D, D)), exactly, for N <= D.

    With X the centred features divided by sqrt(N - 1), the sample covariance is X^T X, and the
    non-zero eigenvalues of X^T X sigma are those of X sigma X^T (N x N, symmetric, PSD), so
    tr sqrt(sigma_samples sigma) = sum sqrt(eig(X sigma X^T)): the value of
    `lineareval.metrics.fid.frechet_distance` (Heusel et al. 2017, https://arxiv.org/abs/1706.08500)
    up to float rounding, in O(N^2 D) instead of O(D^3). Falls back to it when N > D.
    """
    from lineareval.metrics.fid import feature_statistics, frechet_distance

    features = np.asarray(features, dtype=np.float64)
    if len(features) > features.shape[1]:
        return frechet_distance(*feature_statistics(features), mu, sigma)
    if len(features) < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {len(features)}")
    centred = (features - features.mean(axis=0)) / np.sqrt(len(features) - 1)  # (N, D)
    eigenvalues = np.linalg.eigvalsh(centred @ sigma @ centred.T)  # (N,)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()  # tiny negatives are rounding
    difference = features.mean(axis=0) - mu
    return float(difference @ difference + (centred * centred).sum() + np.trace(sigma) - 2 * trace_sqrt)
