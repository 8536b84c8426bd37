"""Sampling in shards: one shard per batch, written atomically, so runs resume and ranks split the work.

A run's samples 0..n-1 are cut into batches of `batch_size`; shard k holds batch k's tokens, its decoded
images (if any) and what it cost, in `run_dir/shards/shard-<start>-<stop>.npz`. A shard file exists only
once complete (temporary name, then rename), so an interrupted run restarts with the missing shards
alone. The batches are the same whether one process or many draw them, and sample i depends only on
(seed, i), so the merged run is identical to a one-process run. Each shard carries the fingerprint of the
run identity that made it (lineareval/identity.py): a shard of any other configuration (copied in, or
written by old code) is sampled again, never merged. Each shard also carries its own sample range,
checked against its name, so a shard copied over another's name is never merged as those samples.

Because sample i depends only on (seed, i), finished shards are reused whatever batch size made them:
a resumed run covers 0..n-1 with the finished shards (`cover`) and samples only the gaps, in batches
of its own `batch_size` (`missing`).
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lineareval.record import write_npz_atomic

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
SHARD_NAME = re.compile(r"^shard-(\d{8})-(\d{8})\.npz$")


@dataclass(frozen=True, order=True)
class Shard:
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def path(self, folder: Path) -> Path:
        return folder / f"shard-{self.start:08d}-{self.stop:08d}.npz"

    @classmethod
    def named(cls, path: Path) -> Shard | None:
        """The shard a file's name says it holds; None for a name that is not a shard's."""
        match = SHARD_NAME.match(path.name)
        return cls(int(match[1]), int(match[2])) if match and int(match[1]) < int(match[2]) else None


@dataclass(frozen=True)
class Piece:
    """Rows start..stop-1 of the run, read from `shard` (which may hold more: an overlapping shard)."""

    shard: Shard
    start: int
    stop: int

    @property
    def rows(self) -> slice:
        return slice(self.start - self.shard.start, self.stop - self.shard.start)


def plan(num_samples: int, batch_size: int) -> list[Shard]:
    return [Shard(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]


def save(folder: Path, shard: Shard, tokens: np.ndarray, images: np.ndarray | None, cost: dict,
         fingerprint: str) -> None:
    """Write one shard atomically, stamped with the `fingerprint` of the run identity that sampled it."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(tokens) != shard.size:
        raise ValueError(f"{shard.path(folder).name} takes {shard.size} samples, got {len(tokens)}")
    arrays = {"tokens": tokens, "cost": np.array(json.dumps(cost)), "fingerprint": np.array(fingerprint),
              "start": np.array(shard.start), "stop": np.array(shard.stop)}
    if images is not None:
        arrays["images"] = images
    write_npz_atomic(shard.path(folder), **arrays)


def _check(data, shard: Shard, fingerprint: str | None) -> None:
    """Raise a ValueError unless an open shard file carries `shard`'s own range and this run's fingerprint."""
    made_by = str(data["fingerprint"]) if "fingerprint" in data.files else "none"
    if fingerprint is not None and made_by != fingerprint:
        raise ValueError(f"made by another configuration (fingerprint {made_by}, this run {fingerprint})")
    if not {"start", "stop"} <= set(data.files):
        raise ValueError("carries no sample range (written by older code)")
    carried = Shard(int(data["start"]), int(data["stop"]))
    if carried != shard:
        raise ValueError(f"holds samples {carried.start}..{carried.stop - 1}, not the {shard.start}..{shard.stop - 1} "
                         "of its name (a shard copied or renamed)")


def is_complete(folder: Path, shard: Shard, num_tokens: int, with_images: bool, fingerprint: str) -> bool:
    """Whether the shard's file holds what this run needs, made by this run's identity (`fingerprint`)
    for the samples its name says.

    An unreadable file, a mismatched one, or one of another configuration or range is removed (so it is
    sampled again and never merged); the caller holds the run's lock.
    """
    path = shard.path(folder)
    if not path.exists():
        return False
    try:
        with np.load(path) as data:
            wanted = {"tokens", "cost"} | ({"images"} if with_images else set())
            if not wanted <= set(data.files) or data["tokens"].shape != (shard.size, num_tokens):
                raise ValueError(f"holds {sorted(data.files)}, tokens {data['tokens'].shape}")
            if with_images and len(data["images"]) != shard.size:
                raise ValueError(f"holds {len(data['images'])} images for {shard.size} samples")
            _check(data, shard, fingerprint)
    except (OSError, ValueError, zipfile.BadZipFile, KeyError) as error:
        log.warning("%s is unusable (%s); sampling it again", path, error)
        path.unlink(missing_ok=True)
        return False
    return True


def listed(folder: Path, num_samples: int) -> list[Shard]:
    """The shards `folder`'s file names announce within samples 0..num_samples-1, in order (unchecked)."""
    found = sorted(filter(None, map(Shard.named, folder.glob("shard-*.npz")))) if folder.is_dir() else []
    return [shard for shard in found if shard.stop <= num_samples]


def finished(folder: Path, num_samples: int, num_tokens: int, with_images: bool, fingerprint: str) -> list[Shard]:
    """The complete shards in `folder` (of any batch size) within 0..num_samples-1; unusable ones are removed
    (rank 0, under the run's lock)."""
    return [shard for shard in listed(folder, num_samples)
            if is_complete(folder, shard, num_tokens, with_images, fingerprint)]


def cover(done: list[Shard], num_samples: int) -> tuple[list[Piece], list[Shard]]:
    """Samples 0..num_samples-1 as pieces of the finished shards `done` (at each sample, the shard reaching
    furthest) and the gaps no shard covers."""
    pieces, gaps, position = [], [], 0
    while position < num_samples:
        covering = [shard for shard in done if shard.start <= position < shard.stop]
        if covering:
            shard = max(covering, key=lambda shard: shard.stop)
            pieces.append(Piece(shard, position, shard.stop))
            position = shard.stop
            continue
        following = [shard.start for shard in done if shard.start > position]
        gap_end = min(following, default=num_samples)
        gaps.append(Shard(position, gap_end))
        position = gap_end
    return pieces, gaps


def missing(gaps: list[Shard], batch_size: int) -> list[Shard]:
    """The gaps cut into batches of `batch_size` (the last of each gap shorter): the shards to sample."""
    return [Shard(start, min(start + batch_size, gap.stop)) for gap in gaps
            for start in range(gap.start, gap.stop, batch_size)]


def load(folder: Path, shard: Shard, fingerprint: str | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(tokens, images or None, cost) of a complete shard; raise if it was not made under `fingerprint` for the
    samples its name says."""
    path = shard.path(folder)
    with np.load(path) as data:
        try:
            _check(data, shard, fingerprint)
        except ValueError as error:
            raise RuntimeError(f"{path} {error} while this run held the folder; it is not merged") from error
        images = data["images"] if "images" in data.files else None
        return data["tokens"], images, json.loads(str(data["cost"]))
