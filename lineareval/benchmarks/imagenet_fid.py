"""ImageNet FID (the LlamaGen/ADM protocol): class-conditional samples scored against an ADM reference batch.

Labels are uniform from (seed, i) (or `balanced`: an equal number per class, in class order, as the
ADM sampling scripts do); images are generated at the model's resolution and resized to
`resolution` (256) with bicubic interpolation on the [-1, 1] tensor before the uint8 conversion, as
LlamaGen's sampler does; samples are stored as `samples.npz` (`arr_0`, ADM layout), so the official
ADM evaluator can score the same file. In-process metrics come from `lineareval.metrics.fid` (FID,
precision, recall, Inception Score where the extractor has logits; see its docstring for how they
relate to the ADM evaluator's numbers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lineareval.benchmarks.base import Benchmark
from lineareval.benchmarks.paired import PairedImageMetrics
from lineareval.benchmarks.samples import SampleSet
from lineareval.sampling import class_labels

log = logging.getLogger(__name__)

RECORDED = ("fid", "fid_adm_stats", "sfid", "sfid_reason", "inception_score_mean", "inception_score_std",
            "inception_score_reason", "precision", "recall", "num_reference", "feature_extractor",
            "reference_sha256")


@dataclass
class ImageNetFID(PairedImageMetrics, Benchmark):
    """`reference`: path of VIRTUAL_imagenet256_labeled.npz; `extractor`: a name from lineareval.metrics."""

    reference: str
    extractor: str = "inception-v3-compat"
    extractor_weights: str | None = None
    resolution: int = 256
    cache_dir: str | None = None
    balanced: bool = False
    batch_size: int = 64

    def check(self) -> None:
        """Fail before generating anything if the reference batch is missing or malformed."""
        from lineareval.metrics.fid import check_adm_npz

        if not Path(self.reference).is_file():
            raise FileNotFoundError(
                f"reference batch {self.reference} does not exist: download VIRTUAL_imagenet256_labeled.npz (see "
                "the README) and set benchmark.reference=PATH")
        check_adm_npz(self.reference, expected_resolution=(self.resolution, self.resolution))

    def samples(self, cfg, generator) -> SampleSet:
        if generator.conditioning != "class":
            raise ValueError(f"benchmark=imagenet_fid needs a class-conditional model, not {cfg.model.name}")
        ids = torch.arange(cfg.num_samples)
        classes = generator.num_classes
        labels = ids % classes if self.balanced else class_labels(cfg.seed, ids, classes)
        return SampleSet(ids, labels, {"labels": labels.numpy()})

    def evaluate(self, run_dir: Path, device: torch.device | str = "cpu") -> dict:
        from lineareval.metrics.fid import compute_metrics

        samples = Path(run_dir) / "samples.npz"
        count = len(np.load(samples, mmap_mode="r")["arr_0"]) if samples.exists() else 0
        layers = self.run_feature_layers(Path(run_dir), device) if count else None  # cached for the paired metrics
        metrics = compute_metrics(samples, self.reference, self.extractor, num_samples=count or None,
                                  cache_dir=self.cache_dir, batch_size=self.batch_size, device=device,
                                  weights_path=self.extractor_weights, sample_layers=layers)
        return {key: metrics[key] for key in RECORDED if key in metrics}

    def reference_statistics_for(self, run_dir: Path, device: torch.device | str = "cpu"):
        from lineareval.metrics.fid import reference_statistics

        return reference_statistics(self.reference, self.extractor, self.cache_dir, batch_size=self.batch_size,
                                    device=device, weights_path=self.extractor_weights, progress=False)
