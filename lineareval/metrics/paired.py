"""How far a run is from its full-cache partner: per-sample fidelity and paired distribution differences.

Both runs hold the same samples (same condition and random draws per index, `lineareval/pairing.py`),
so sample i of one is compared with sample i of the other:

- `sample_fidelity`: per sample, the fraction of equal tokens, the index of the first differing token
  (the number of tokens when none differs), the squared error and SSIM of the decoded images
  (torchmetrics; uint8 values as floats, data range 255, SSIM with its default 11x11 Gaussian window,
  sigma 1.5) and the cosine similarity of their Inception pool features.
- `fidelity_summary`: means over samples with percentile bootstrap intervals (resampling sample
  indices; `metrics.bootstrap`). PSNR is torchmetrics' pooled PSNR, 10 log10(255^2 / mean squared
  error over every pixel of every sample), which is finite unless every image is identical (a mean
  of per-sample PSNRs would be infinite as soon as one image is); its interval is that of the pooled
  error, mapped to dB.
- `distribution_summary`: KID with its bootstrap standard error, and the differences run - partner
  of FID, KID and precision with paired intervals, recall's difference without one (see
  `metrics.bootstrap` for each estimator and what a replicate costs).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from lineareval.metrics.bootstrap import (BootstrapSettings, FrechetReplicates, KernelReplicates, MeanReplicates,
                                          percentile_interval, replicates)

DATA_RANGE = 255.0
RECALL_REASON = ("no interval: recall depends on the sample set through k-NN balls built from the samples, "
                 "which resampling with replacement shrinks (a duplicate is at distance 0)")


def token_fidelity(tokens: np.ndarray, partner: np.ndarray) -> dict[str, np.ndarray]:
    """(n, N) tokens of both runs -> per sample the fraction of equal tokens and the first differing index."""
    if tokens.shape != partner.shape:
        raise ValueError(f"tokens {tokens.shape} and the partner's {partner.shape} do not pair up")
    different = tokens != partner  # (n, N)
    differs = different.any(axis=1)
    first = np.where(differs, different.argmax(axis=1), tokens.shape[1])
    return {"token_agreement": 1.0 - different.mean(axis=1), "first_difference": first.astype(np.float64),
            "identical_samples": (~differs).astype(np.float64)}


def image_fidelity(images: Iterator[np.ndarray], partner: Iterator[np.ndarray]) -> dict[str, np.ndarray]:
    """Batches of uint8 (b, H, W, 3) images of both runs, in step -> per sample squared error and SSIM (PSNR is
    pooled from the squared error: `fidelity_summary`)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    parts: dict[str, list[np.ndarray]] = {"squared_error": [], "ssim": []}
    for batch, partner_batch in zip(images, partner, strict=True):
        x, y = (torch.from_numpy(np.ascontiguousarray(b)).permute(0, 3, 1, 2).to(torch.float64)
                for b in (batch, partner_batch))  # (b, 3, H, W)
        parts["squared_error"].append(((x - y) ** 2).mean(dim=(1, 2, 3)).numpy())
        parts["ssim"].append(structural_similarity_index_measure(x, y, data_range=DATA_RANGE,
                                                                 reduction="none").numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def cosine_similarity(features: np.ndarray, partner: np.ndarray) -> np.ndarray:
    """(n, D) features of both runs -> (n,) cosine similarity of each pair."""
    x, y = np.asarray(features, np.float64), np.asarray(partner, np.float64)
    return (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


def psnr_from_error(mean_squared_error: float | np.ndarray) -> float | np.ndarray:
    """10 log10(255^2 / MSE), infinite for a zero error."""
    with np.errstate(divide="ignore"):
        return 10 * np.log10(DATA_RANGE**2 / np.asarray(mean_squared_error, dtype=np.float64))


def fidelity_summary(per_sample: dict[str, np.ndarray], settings: BootstrapSettings) -> dict:
    """Means (pooled PSNR) with percentile bootstrap intervals: `<name>`, `<name>_ci_low`, `<name>_ci_high`."""
    names = list(per_sample)  # squared_error gives the pooled PSNR
    n = len(per_sample[names[0]])
    point, values = replicates([MeanReplicates(per_sample[name]) for name in names], n, settings)
    record = {}
    for index, name in enumerate(names):
        low, high = percentile_interval(values[:, index], settings.confidence)
        if name == "squared_error":  # PSNR decreases with the error: the interval's ends swap
            name, point[index], low, high = "psnr", psnr_from_error(point[index]), psnr_from_error(high), \
                psnr_from_error(low)
        record.update({name: float(point[index]), f"{name}_ci_low": float(low), f"{name}_ci_high": float(high)})
    return record


def reference_membership(features: np.ndarray, reference: np.ndarray, k: int = 3,
                         batch_size: int = 10000) -> np.ndarray:
    """(n,) bool: each sample inside the reference manifold (some reference k-NN ball), as torch-fidelity's
    precision computes it (`calculate_precision_recall_part`), so its mean is that precision."""
    from torch_fidelity.metric_prc import calc_cdist_part

    samples = torch.as_tensor(features, dtype=torch.float32)
    ref = torch.as_tensor(reference, dtype=torch.float32)
    radii = torch.cat([calc_cdist_part(part, ref, batch_size).kthvalue(k + 1).values for part in ref.split(batch_size)])
    inside = [(calc_cdist_part(part, ref, batch_size) <= radii).any(dim=1) for part in samples.split(batch_size)]
    return torch.cat(inside).numpy()


def distribution_summary(features: np.ndarray, reference, settings: BootstrapSettings,
                         partner: np.ndarray | None = None, device: str | torch.device = "cpu", k: int = 3) -> dict:
    """KID and its bootstrap standard error; with `partner` (its features, same samples) the differences
    run - partner of FID, KID, precision (paired percentile intervals) and recall (no interval).

    `reference`: a `metrics.fid.ReferenceStatistics` (features, mu, sigma), held fixed. Without a
    partner only KID is resampled (FID replicates are the expensive ones at 50,000 samples).
    """
    if partner is not None and np.shape(partner) != np.shape(features):
        raise ValueError(f"features {np.shape(features)} and the partner's {np.shape(partner)} do not pair up")
    n, with_kid = len(features), len(features) <= settings.kid_max_samples
    same = partner is not None and np.array_equal(features, partner)  # one computation: a zero difference exactly
    runs = [features] if partner is None or same else [features, partner]
    statistics: dict[str, list] = {}  # name -> [run's statistic, partner's statistic]
    if with_kid:
        statistics["kid"] = [KernelReplicates(x, reference.features, device) for x in runs]
    if partner is not None:
        statistics["fid"] = [FrechetReplicates(x, reference.mu, reference.sigma, device) for x in runs]
        statistics["precision"] = [MeanReplicates(reference_membership(x, reference.features, k)) for x in runs]
    if same:
        statistics = {name: pair * 2 for name, pair in statistics.items()}
    if not statistics:
        return _kid_record(None, None, settings)
    point, values = replicates([f for pair in statistics.values() for f in pair], n, settings)  # (S,), (R, S)
    columns = {name: 2 * index if partner is not None else index for index, name in enumerate(statistics)}
    record = _kid_record(point[columns["kid"]] if with_kid else None,
                         values[:, columns["kid"]] if with_kid else None, settings)
    if partner is None:
        return record
    for name, column in columns.items():
        low, high = percentile_interval(values[:, column] - values[:, column + 1], settings.confidence)
        record.update({f"{name}_difference": float(point[column] - point[column + 1]),
                       f"{name}_difference_ci_low": low, f"{name}_difference_ci_high": high})
    record.update(_recall_difference(features, partner, reference.features, k))
    return record


def _kid_record(point: float | None, values: np.ndarray | None, settings: BootstrapSettings) -> dict:
    if point is None:
        reason = (f"KID needs the n x n kernel of the samples; n is above paired.kid_max_samples = "
                  f"{settings.kid_max_samples}")
        return {"kid": None, "kid_se": None, "kid_reason": reason}
    return {"kid": float(point), "kid_se": float(values.std(ddof=1)), "kid_reason": None}


def _recall_difference(features: np.ndarray, partner: np.ndarray, reference: np.ndarray, k: int) -> dict:
    from lineareval.metrics.fid import precision_recall

    recall = precision_recall(features, reference, k=k)[1] - precision_recall(partner, reference, k=k)[1]
    return {"recall_difference": recall, "recall_difference_ci_low": None, "recall_difference_ci_high": None,
            "recall_difference_reason": RECALL_REASON}
