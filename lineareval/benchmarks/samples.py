"""The plain sampling benchmark: class labels uniform from (seed, i), cost metrics only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lineareval.sampling import class_labels


@dataclass
class ClassSamples:
    """Conditions for class-conditional models; scores nothing beyond the runner's cost record."""

    def conditions(self, sample_ids: torch.Tensor, seed: int, num_classes: int) -> torch.Tensor:
        """Class label of each sample. (n,) -> (n,) int64."""
        return class_labels(seed, sample_ids, num_classes)

    def evaluate(self, run_dir: Path) -> dict:
        return {}
