"""An exclusive lock on a run folder for the whole run, so two processes never write one run.

The lock is `fcntl.flock` on `run_dir/.lock`, taken without waiting: a second process stops at once
with a `RunLockedError` naming the holder (host, pid, Slurm job, since when), which the holder writes
into the lock file. flock rather than the `filelock` package: `filelock` truncates its file when it
opens it, before locking, so a waiting process would erase the holder's name; and its fallback to a
marker file where flock is missing is a lock that a SIGKILL leaves behind. The lock file is never
deleted, so every process locks the same inode.

A lock belongs to the process: the kernel releases it when the process ends, however it ends (SIGKILL,
out of memory), so a crashed run leaves no stale lock on a local disk. Shared file systems that Slurm
clusters use support flock across nodes: NFSv4 (the client maps it to NFS byte-range locks), Lustre
mounted with `flock` (the usual default; `localflock` locks per node only, `noflock` refuses), IBM
Storage Scale (GPFS), BeeGFS with global file locks, CephFS. NFSv3 mounted `nolock` (or without lockd)
refuses it: the run stops and says so. When a whole node crashes, its locks are released once the
file system notices (NFSv4: the client's lease, 90 s by default; Lustre: client eviction; GPFS: node
expel); until then the error names the dead host and pid.

Ranks of one torchrun / Slurm job are one run: rank 0 takes the lock for all of them (the runner
shares its outcome with the other ranks), and they write only their shards under it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from lineareval.record import READ_ONLY_ERRNOS, StorageError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
CONTENDED_ERRNOS = frozenset({errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES})  # some NFS clients say EACCES
JOB_VARIABLES = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "TORCHELASTIC_RUN_ID")


class RunLockedError(RuntimeError):
    """Another process holds the run folder."""


def holder_info() -> dict[str, object]:
    """Who holds a lock: host, pid, since when (UTC), and the job it belongs to if any."""
    job = {name: os.environ[name] for name in JOB_VARIABLES if name in os.environ}
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), **job}


@dataclass
class RunLock:
    """`with RunLock(run_dir):` holds `run_dir/.lock` exclusively, creating the folder if needed."""

    run_dir: Path
    fd: int | None = None

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / LOCK_FILE

    def acquire(self) -> RunLock:
        """Lock, or raise RunLockedError (held) or StorageError (read-only storage, or no flock there)."""
        try:
            Path(self.run_dir).mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            if error.errno in READ_ONLY_ERRNOS:
                raise StorageError(f"cannot lock {self.path}: {error.strerror}: the run folder is read-only here",
                                   read_only=True) from error
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(fd)
            os.close(fd)
            if error.errno in CONTENDED_ERRNOS:
                raise RunLockedError(_locked_message(self.run_dir, holder)) from None
            raise StorageError(f"cannot lock {self.path}: {error.strerror}. Its file system does not support "
                               "flock (e.g. NFSv3 mounted nolock): put output_root on storage that does (local "
                               "disk, NFSv4, Lustre, GPFS)") from error
        try:  # who holds it, for the error of the next process; the lock holds without it (e.g. a full disk)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)
        except OSError as error:
            log.warning("holding %s without writing the holder's name into it (%s)", self.path, error.strerror)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # the next reader of an unheld lock finds no stale holder
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read_holder(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None


def _locked_message(run_dir: Path, holder: dict | None) -> str:
    if not holder:
        who = "another process (it has just started and not yet written its name)"
    else:
        job = ", ".join(f"{name}={holder[name]}" for name in JOB_VARIABLES if name in holder)
        who = f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}" + \
            (f" ({job})" if job else "")
    return (f"{run_dir} is being written by {who}. Two processes never write one run folder: wait for it to "
            "finish (a finished run is then skipped), or stop that process and run again (its finished shards "
            "are reused). A holder on a crashed node is released by the file system after its lock lease.")
