"""What a benchmark declares to the runner (capabilities are declared here, never discovered with hasattr)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar


class Benchmark:
    """Base of every benchmark: which samples to draw (`samples`), how to score a run folder (`evaluate`).

    `suite`: the benchmark runs several policies itself in one process (`run_suite`; efficiency);
    `scores_external_images`: with its current settings it scores images made elsewhere, so
    `stage=evaluate` needs no generation; `resolution`: generated images are resized to it before
    they are stored (None: as generated); `pairs_images`: it scores images with Inception features,
    so the runner adds KID and the paired metrics against the full-cache partner (`evaluate_paired`,
    lineareval/benchmarks/paired.py).
    """

    suite: ClassVar[bool] = False
    pairs_images: ClassVar[bool] = False
    scores_external_images: bool = False
    resolution: int | None = None

    def check(self) -> None:
        """Stop before sampling if the benchmark's own inputs are missing (reference batches, data)."""

    def samples(self, cfg, generator):
        raise NotImplementedError

    def evaluate(self, run_dir: Path, device="cpu") -> dict:
        return {}

    def evaluate_paired(self, run_dir: Path, request, device="cpu") -> dict:
        raise NotImplementedError(f"{type(self).__name__} does not pair images (pairs_images is False)")
