"""Paired metrics of an image benchmark's run against its full-cache partner: one piece for every image benchmark.

An image benchmark (demo_fid, imagenet_fid, coco_fid) mixes in `PairedImageMetrics` and says where
its features and reference come from (`extractor`, `batch_size`, `extractor_weights` fields and
`reference_statistics_for`); the runner then calls `evaluate_paired` after `evaluate`, with the
`paired:` settings of conf/config.yaml. What it adds to `metrics.json`:

- always: `partner_run_dir` (or None) and `partner_reason` (why there is none, or None), `kid` with its
  bootstrap standard error `kid_se`, and the bootstrap's settings and cost (`bootstrap_*`);
- with a partner: per-sample fidelity to it (`token_agreement`, `first_difference`, `identical_samples`,
  `psnr`, `ssim`, `inception_cosine`, each with `_ci_low` / `_ci_high`) and the paired differences run -
  partner of FID, KID and precision with intervals, and recall's without one (lineareval/metrics/paired.py).

Features come from each run folder's cache (lineareval/metrics/run_features.py). The partner's features
are cached in its folder only while this process can hold that folder's lock (a run writing it keeps
it); otherwise they are extracted and used without being stored.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from lineareval.metrics.bootstrap import BootstrapSettings
from lineareval.pairing import Partner, find_partner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairedRequest:
    """`paired:` of the config: which partner (`auto`, a run folder, or `none`), where to search, the bootstrap."""

    partner: str
    search_root: Path | None
    settings: BootstrapSettings

    @classmethod
    def from_config(cls, cfg) -> PairedRequest:
        node = cfg.paired
        return cls(str(node.partner), Path(cfg.output_root) / cfg.benchmark.name,
                   BootstrapSettings(int(node.replicates), float(node.confidence), int(node.seed),
                                     int(node.kid_max_samples)))

    def find(self, run_dir: Path) -> Partner:
        if self.partner == "none":
            return Partner(None, "paired.partner=none: pairing is switched off")
        return find_partner(run_dir, self.search_root, None if self.partner == "auto" else self.partner)


class PairedImageMetrics:
    """Mixin of image benchmarks: KID and the paired metrics against the full-cache partner."""

    pairs_images: ClassVar[bool] = True
    extractor: str
    batch_size: int
    extractor_weights: str | None = None

    def reference_statistics_for(self, run_dir: Path, device: torch.device | str):
        """The `metrics.fid.ReferenceStatistics` this benchmark scores `run_dir`'s samples against."""
        raise NotImplementedError

    def run_feature_layers(self, run_dir: Path, device: torch.device | str, write: bool = True) -> dict:
        from lineareval.metrics.run_features import run_feature_layers

        return run_feature_layers(run_dir, self.extractor, batch_size=self.batch_size, device=device,
                                  weights_path=self.extractor_weights, write=write)

    def pool_features(self, run_dir: Path, device: torch.device | str, write: bool = True) -> np.ndarray:
        from lineareval.metrics.run_features import run_features

        return run_features(run_dir, self.extractor, batch_size=self.batch_size, device=device,
                            weights_path=self.extractor_weights, write=write)

    def evaluate_paired(self, run_dir: Path, request: PairedRequest, device: torch.device | str = "cpu") -> dict:
        """KID of the run, and everything paired with its partner when it has one (see the module docstring)."""
        from lineareval.metrics.paired import distribution_summary, fidelity_summary

        start = time.perf_counter()
        partner = request.find(Path(run_dir))
        features = self.pool_features(run_dir, device)
        reference = self.reference_statistics_for(run_dir, device)
        partner_features = None if partner.run_dir is None else self._partner_features(partner.run_dir, device)
        record = {"partner_run_dir": None if partner.run_dir is None else str(partner.run_dir),
                  "partner_reason": partner.reason}
        record.update(distribution_summary(features, reference, request.settings, partner_features, device))
        if partner_features is not None:
            per_sample = sample_fidelity(Path(run_dir), partner.run_dir, features, partner_features)
            record.update(fidelity_summary(per_sample, request.settings))
        if partner.reason:
            log.info("%s: no paired metrics (%s)", run_dir, partner.reason)
        settings = request.settings
        record.update(bootstrap_replicates=settings.replicates, bootstrap_confidence=settings.confidence,
                      bootstrap_seed=settings.seed, bootstrap_interval="percentile",
                      bootstrap_seconds=time.perf_counter() - start)
        return record

    def _partner_features(self, partner_dir: Path, device: torch.device | str) -> np.ndarray:
        """The partner's pool features, cached in its folder when its lock can be taken now."""
        from lineareval.runlock import RunLock, RunLockedError
        from lineareval.record import StorageError

        lock = RunLock(partner_dir)
        try:
            lock.acquire()
        except (RunLockedError, StorageError) as error:
            log.info("%s is not writable now (%s): its features are used without caching them", partner_dir, error)
            return self.pool_features(partner_dir, device, write=False)
        try:
            return self.pool_features(partner_dir, device)
        finally:
            lock.release()


def sample_fidelity(run_dir: Path, partner_dir: Path, features: np.ndarray, partner_features: np.ndarray,
                    batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per-sample fidelity of a run to its partner: tokens, decoded images, Inception features."""
    from lineareval.metrics.features import image_source
    from lineareval.metrics.paired import cosine_similarity, image_fidelity, token_fidelity

    with np.load(run_dir / "tokens.npz") as own, np.load(partner_dir / "tokens.npz") as other:
        per_sample = token_fidelity(own["tokens"], other["tokens"])
    images, partner_images = (image_source(folder / "samples.npz") for folder in (run_dir, partner_dir))
    per_sample.update(image_fidelity(images.batches(batch_size), partner_images.batches(batch_size)))
    per_sample["inception_cosine"] = cosine_similarity(features, partner_features)
    return per_sample
