"""A run's Inception features, extracted once and cached in its run folder (`features-<extractor>.npz`).

Every metric of a run's images (FID, precision/recall, KID, the paired bootstrap, and the partner's
side of every compressed run paired with it) reads the features from here, so a run's samples go
through the network once. The cache holds every layer the extractor's spec lists (float32, as the
network outputs them, so storing them loses nothing) and is keyed by the extractor's name, its
protocol and layers, and the SHA-256 of `samples.npz`: regenerated samples or another preprocessing
never reuse stale features. Hashing reads the file once (about 20 s for 50,000 images at 256 px,
against minutes of Inception).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from lineareval.metrics.features import build_extractor, extract_feature_layers, get_extractor_spec
from lineareval.record import write_npz_atomic

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.npz"


def features_path(run_dir: str | Path, extractor: str) -> Path:
    return Path(run_dir) / f"features-{extractor}.npz"


def features_key(samples: Path, extractor: str) -> str:
    """What the cached features depend on: the extractor, its protocol and layers, the samples' bytes."""
    from lineareval.metrics.fid import file_sha256

    spec = get_extractor_spec(extractor)
    return hashlib.sha256(f"{extractor}|{spec.protocol}|{','.join(spec.layers)}|{file_sha256(samples)}".encode()
                          ).hexdigest()


def run_feature_layers(run_dir: str | Path, extractor: str, *, batch_size: int = 64,
                       device: str | torch.device = "cpu", weights_path: str | Path | None = None,
                       network: Callable[[], FeatureExtractorBase] | None = None,
                       write: bool = True) -> dict[str, np.ndarray]:
    """{layer: (n, D) float64} of the run's `samples.npz`, from the cache when its key matches.

    `network`: returns the extractor when one is needed (built lazily: a cache hit builds nothing).
    `write=False` extracts without caching (a folder this process may not write).
    """
    run_dir = Path(run_dir)
    samples = run_dir / SAMPLES_FILE
    if not samples.is_file():
        raise FileNotFoundError(f"{samples} does not exist: image metrics need decode_images=true")
    key, path = features_key(samples, extractor), features_path(run_dir, extractor)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as cached:
                if str(cached["key"]) == key:
                    return {name.removeprefix("layer_"): cached[name].astype(np.float64)
                            for name in cached.files if name.startswith("layer_")}
            log.info("%s belongs to other samples or another extractor protocol; extracting again", path)
        except (OSError, KeyError, ValueError) as error:
            log.warning("ignoring unreadable feature cache %s (%s)", path, error)
    built = network() if network is not None else build_extractor(extractor, device, weights_path)
    layers = extract_feature_layers(samples, built, batch_size, device, progress=False, desc=f"features {run_dir}")
    layers = {name: values.astype(np.float32) for name, values in layers.items()}  # what the network computed
    if write:
        write_npz_atomic(path, key=np.array(key), **{f"layer_{name}": values for name, values in layers.items()})
    return {name: values.astype(np.float64) for name, values in layers.items()}


def run_features(run_dir: str | Path, extractor: str, **options) -> np.ndarray:
    """The pool features (n, D) of a run's samples (see `run_feature_layers`)."""
    return run_feature_layers(run_dir, extractor, **options)[get_extractor_spec(extractor).pool_layer]
