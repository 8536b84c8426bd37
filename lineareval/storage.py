"""Files that are either complete or absent: atomic writes (a temporary beside the target, fsync, rename) and
the storage errors (full, read-only) they report as one clear `StorageError` naming the path."""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

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
