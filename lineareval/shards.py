"""Sampling in shards: one shard per batch, written atomically, so runs resume and ranks split the work.

A run's samples 0..n-1 are cut into batches of `batch_size`; shard k holds batch k's tokens, its decoded
images (if any) and what it cost, in `run_dir/shards/shard-<start>-<stop>.npz`. A shard file exists only
once complete (temporary name, then rename), so an interrupted run restarts with the missing shards
alone. The batches are the same whether one process or many draw them, and sample i depends only on
(seed, i), so the merged run is identical to a one-process run. Each shard carries the fingerprint of the
run identity that made it (lineareval/identity.py): a shard of any other configuration (copied in, or
written by old code) is sampled again, never merged.
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


def save(folder: Path, shard: Shard, tokens: np.ndarray, images: np.ndarray | None, cost: dict,
         fingerprint: str) -> None:
    """Write one shard atomically, stamped with the `fingerprint` of the run identity that sampled it."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"tokens": tokens, "cost": np.array(json.dumps(cost)), "fingerprint": np.array(fingerprint)}
    if images is not None:
        arrays["images"] = images
    write_npz_atomic(shard.path(folder), **arrays)


def is_complete(folder: Path, shard: Shard, num_tokens: int, with_images: bool, fingerprint: str) -> bool:
    """Whether the shard's file holds what this run needs, made by this run's identity (`fingerprint`).

    An unreadable file, a mismatched one, or one of another configuration is removed (so it is sampled
    again and never merged); the caller holds the run's lock.
    """
    path = shard.path(folder)
    if not path.exists():
        return False
    try:
        with np.load(path) as data:
            wanted = {"tokens", "cost"} | ({"images"} if with_images else set())
            if not wanted <= set(data.files) or data["tokens"].shape != (shard.size, num_tokens):
                raise ValueError(f"holds {sorted(data.files)}, tokens {data['tokens'].shape}")
            made_by = str(data["fingerprint"]) if "fingerprint" in data.files else "none"
            if made_by != fingerprint:
                raise ValueError(f"made by another configuration (fingerprint {made_by}, this run {fingerprint})")
    except (OSError, ValueError, zipfile.BadZipFile, KeyError) as error:
        log.warning("%s is unusable (%s); sampling it again", path, error)
        path.unlink(missing_ok=True)
        return False
    return True


def load(folder: Path, shard: Shard, fingerprint: str | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(tokens, images or None, cost) of a complete shard; raise if it was not made under `fingerprint`."""
    with np.load(shard.path(folder)) as data:
        made_by = str(data["fingerprint"]) if "fingerprint" in data.files else "none"
        if fingerprint is not None and made_by != fingerprint:
            raise RuntimeError(f"{shard.path(folder)} was made by another configuration (fingerprint {made_by}, this "
                               f"run {fingerprint}) while this run held the folder; it is not merged")
        images = data["images"] if "images" in data.files else None
        return data["tokens"], images, json.loads(str(data["cost"]))
