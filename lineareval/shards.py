"""Sampling in shards: one shard per batch, written atomically, so runs resume and ranks split the work.

A run's samples 0..n-1 are cut into batches of `batch_size`; shard k holds batch k's tokens, its decoded
images (if any) and what it cost, in `run_dir/shards/shard-<start>-<stop>.npz`. A shard file exists only
once complete (temporary name, then rename), so an interrupted run restarts with the missing shards
alone. The batches are the same whether one process or many draw them, and sample i depends only on
(seed, i), so the merged run is identical to a one-process run.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lineareval.record import write_npz_atomic

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"


@dataclass(frozen=True)
class Shard:
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def path(self, folder: Path) -> Path:
        return folder / f"shard-{self.start:08d}-{self.stop:08d}.npz"


def plan(num_samples: int, batch_size: int) -> list[Shard]:
    return [Shard(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]


def save(folder: Path, shard: Shard, tokens: np.ndarray, images: np.ndarray | None, cost: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"tokens": tokens, "cost": np.array(json.dumps(cost))}
    if images is not None:
        arrays["images"] = images
    write_npz_atomic(shard.path(folder), **arrays)


def is_complete(folder: Path, shard: Shard, num_tokens: int, with_images: bool) -> bool:
    """Whether the shard's file holds what this run needs; an unreadable or mismatched file is removed."""
    path = shard.path(folder)
    if not path.exists():
        return False
    try:
        with np.load(path) as data:
            wanted = {"tokens", "cost"} | ({"images"} if with_images else set())
            if not wanted <= set(data.files) or data["tokens"].shape != (shard.size, num_tokens):
                raise ValueError(f"holds {sorted(data.files)}, tokens {data['tokens'].shape}")
    except (OSError, ValueError, zipfile.BadZipFile, KeyError) as error:
        log.warning("%s is unusable (%s); sampling it again", path, error)
        path.unlink(missing_ok=True)
        return False
    return True


def load(folder: Path, shard: Shard) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(tokens, images or None, cost) of a complete shard."""
    with np.load(shard.path(folder)) as data:
        images = data["images"] if "images" in data.files else None
        return data["tokens"], images, json.loads(str(data["cost"]))
