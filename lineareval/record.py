"""The run record: one flat `metrics.json` per run folder, written atomically."""

from __future__ import annotations

import dataclasses
import errno
import importlib.metadata
import itertools
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
WEIGHTS_KINDS = ("checkpoint", "random")
# Distributions whose versions go into every record; those not installed are left out.
VERSIONED_DISTRIBUTIONS = (
    "torch", "numpy", "hydra-core", "omegaconf", "transformers", "safetensors", "pillow", "scipy",
)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(kw_only=True)
class RunRecord:
    """Everything one run measured and the setup that produced it, as flat snake_case fields.

    `keep` is the budget string exactly as the user gave it (`"1/6"`, `"256"`), so result rows group
    exactly; `visual_budget` is what it parsed to. Benchmark metrics go in `extra`; they become
    top-level keys of the JSON and may not reuse a field name.
    """

    # What ran.
    model: str
    cache: str
    keep: str
    visual_budget: int
    batch_size: int
    num_samples: int
    seed: int
    weights: str
    weights_files: list[str] = field(default_factory=list)
    dtype: str
    device: str
    # What it cost.
    peak_memory_bytes: int
    peak_memory_method: str
    kv_cache_capacity_bytes: int
    kv_cache_high_water_bytes: int
    latency_s_per_batch: float
    generation_time_s: float
    images_per_s: float
    tokens_per_s: float
    # Where it ran: fill from environment_info(device).
    device_name: str
    git_commit: str
    git_dirty: bool
    versions: dict[str, str]
    created_at: str = field(default_factory=_utc_now)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS_KINDS:
            raise ValueError(f"weights must be one of {WEIGHTS_KINDS}, got {self.weights!r}.")
        if self.weights == "random" and self.weights_files:
            raise ValueError(f"weights='random' takes no weights_files, got {self.weights_files}.")
        if not isinstance(self.keep, str):
            raise ValueError(f"keep must be the string the user gave (e.g. '1/6'), got {self.keep!r}.")
        self._check_extra()

    def _check_extra(self) -> None:
        not_str = [key for key in self.extra if not isinstance(key, str)]
        if not_str:
            raise ValueError(f"extra metric names must be strings, got {not_str}.")
        core = {f.name for f in dataclasses.fields(self)}
        collisions = sorted(core & set(self.extra))
        if collisions:
            raise ValueError(
                f"extra metrics {collisions} collide with RunRecord fields; rename them "
                "(e.g. prefix them with the benchmark name)."
            )

    def to_dict(self) -> dict[str, Any]:
        """The flat record: core fields plus `extra` lifted to the top level."""
        self._check_extra()  # extra is a mutable dict, so check again at write time
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**flat, **self.extra}


def _package_dir() -> Path:
    """Folder of the `lineareval` package, whose repository the git info describes."""
    return Path(__file__).resolve().parent


def _git(directory: Path, *args: str) -> str | None:
    """stdout of `git -C directory args`, or None where git is missing or the command fails."""
    try:
        done = subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _cpu_name() -> str:
    model_name = platform.processor() or platform.machine() or "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    # CPUs this process may run on (cgroup/affinity), not the whole host.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model_name} ({cores} cores)"


def _versions() -> dict[str, str]:
    import lineareval

    versions = {"python": platform.python_version()}
    for name in VERSIONED_DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        versions["lineareval"] = importlib.metadata.version("lineareval")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        versions["lineareval"] = lineareval.__version__
    versions["torch"] = torch.__version__  # keeps the local build tag (e.g. +cu130) metadata drops
    if torch.version.cuda is not None:
        versions["cuda"] = torch.version.cuda
    return versions


def environment_info(device: torch.device) -> dict[str, Any]:
    """device_name, git_commit, git_dirty and versions, ready to pass to RunRecord."""
    device = torch.device(device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        device_name = _cpu_name()
    else:
        device_name = device.type
    repo = _package_dir()
    commit = _git(repo, "rev-parse", "HEAD")
    status = _git(repo, "status", "--porcelain")
    return {
        "device_name": device_name,
        "git_commit": commit.strip() if commit else "unknown",
        "git_dirty": bool(status and status.strip()),
        "versions": _versions(),
    }


# Errors of the storage rather than of the program: reported as a StorageError that says where and what to do.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
TEMPORARY_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # what _atomic_file writes before its rename


class StorageError(RuntimeError):
    """A file could not be written: the disk is full, over quota, or read-only."""

    def __init__(self, message: str, read_only: bool = False):
        super().__init__(message)
        self.read_only = read_only


def storage_error(path: Path, error: OSError) -> StorageError | None:
    """A StorageError saying what failed, where, and what to do; None for an error that is not about storage."""
    limit = _file_size_limit()
    if error.errno == errno.EFBIG and limit is not None:  # the process's limit, not the disk's
        return StorageError(f"could not write {path}: {error.strerror}: it would exceed the file size limit of this "
                            f"process (ulimit -f: {limit // 1024} KiB). Nothing half-written is kept and the run is "
                            "not marked finished: raise the limit (`ulimit -f unlimited`) and run the same command "
                            "again; finished shards are reused.")
    if error.errno in FULL_ERRNOS:
        free = _free_bytes(path)
        shown = f"{free / 2**30:.2f} GiB" if free >= 2**30 else f"{free / 2**20:.1f} MiB"
        return StorageError(f"could not write {path}: {error.strerror} ({shown} free on that file "
                            "system). Nothing half-written is kept and the run is not marked finished: free space "
                            "(or set output_root= elsewhere) and run the same command again; finished shards are "
                            "reused.")
    if error.errno in READ_ONLY_ERRNOS:
        return StorageError(f"could not write {path}: {error.strerror}. The run folder is read-only here: a "
                            "finished run can still be skipped, but this run needs to write; set output_root= (or "
                            "run_dir=) to writable storage.", read_only=True)
    return None


def _file_size_limit() -> int | None:
    """The soft RLIMIT_FSIZE in bytes (`ulimit -f`), None when unlimited or unknown."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _free_bytes(path: Path) -> int:
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return 0


@contextmanager
def _atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """Binary file that appears under `path` only once the block finishes without raising.

    A full or read-only disk raises a StorageError naming `path`; the temporary file is removed in
    every case (a SIGKILL leaves it: remove_temporaries clears those under the run's lock).
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # os.open with 0o666 lets the umask decide permissions, as a plain open() would.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as error:
        reported = storage_error(path, error)
        if reported is None:
            raise
        raise reported from error


def remove_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files of interrupted atomic writes in `folder`; returns what was removed.

    Only for a folder whose writers are all gone (the caller holds the run's lock).
    """
    removed = [path for path in folder.glob(".*.tmp") if TEMPORARY_NAME.match(path.name)] if folder.is_dir() else []
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable: {obj!r}")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as JSON (indent 2, sorted keys) so `path` holds either the old or the new file."""
    with _atomic_file(Path(path)) as f:
        text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
        f.write(text.encode())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) so `path` holds either the old or the new file."""
    with _atomic_file(Path(path)) as f:
        f.write(text.encode())


def write_csv_atomic(path: str | os.PathLike, table) -> None:
    """A pandas DataFrame as CSV (no index column) at `path`, atomically."""
    with _atomic_file(Path(path)) as f:
        table.to_csv(f, index=False)


def write_npz_atomic(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """np.savez to exactly `path` (no `.npz` appended), atomically."""
    with _atomic_file(Path(path)) as f:
        np.savez(f, **arrays)  # a file object, unlike a name, gets no suffix added


def write_npz_stacked_atomic(path: str | os.PathLike, key: str, parts: Iterable[np.ndarray], count: int) -> None:
    """An .npz holding one array `key`, the concatenation of `parts` along axis 0 (`count` rows in all),
    written part by part: memory holds one part, not the whole array (50,000 samples are ~10 GB)."""
    parts = iter(parts)
    first = np.ascontiguousarray(next(parts))
    header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
              "shape": (count, *first.shape[1:])}
    written = 0
    with _atomic_file(Path(path)) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, header)
            for part in itertools.chain([first], parts):
                part = np.ascontiguousarray(part)
                if part.dtype != first.dtype or part.shape[1:] != first.shape[1:]:
                    raise ValueError(f"part of shape {part.shape} {part.dtype} does not stack onto {first.shape} "
                                     f"{first.dtype}")
                member.write(part.tobytes())
                written += len(part)
        if written != count:
            raise ValueError(f"{written} rows written to {path}, {count} announced")


def save_record(record: RunRecord, run_dir: str | os.PathLike) -> Path:
    """Write `record` to `run_dir/metrics.json` atomically; returns that path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / METRICS_FILE
    write_json_atomic(path, record.to_dict())
    log.info("wrote %s", path)
    return path


def load_record(path: str | os.PathLike) -> dict[str, Any]:
    """Read a record from a `metrics.json` (or the run folder holding one) as a flat dict."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it and rerun that run.") from err
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds a {type(record).__name__}, not a record; delete it and rerun.")
    return record


def is_finished(run_dir: str | os.PathLike) -> bool:
    """Whether `run_dir` holds a readable metrics.json, i.e. the run can be skipped."""
    try:
        load_record(Path(run_dir) / METRICS_FILE)
    except (OSError, ValueError):
        return False
    return True
