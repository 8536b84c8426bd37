"""One run folder, one run: who may write it, which run it holds, and what interrupted runs left.

- Lock: rank 0 holds `run_dir/.lock` (lineareval/runlock.py) from before the first read of the folder
  to the end of the run; a folder on read-only storage is only read, and only a finished run of the
  same identity can be used from it.
- Identity: `identity.json` stores what determines the samples (lineareval/identity.py); a finished run
  is reused when the config part matches, shards when the content part (weights, conditions) matches
  too. A difference is reported field by field with both values.
- Leftovers: under the lock nothing else writes the folder, so the temporary files of interrupted
  atomic writes and the shards of an already merged run are removed.
- Interruptions: SIGTERM (Slurm's time limit, scancel) unwinds the run like Ctrl-C, so the finished
  shards stay, the temporary file being written goes, and the log says how to resume.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

from lineareval import shards
from lineareval.finished import DamagedRunError, check_finished
from lineareval.identity import config_identity, differences
from lineareval.record import (METRICS_FILE, StorageError, is_finished, load_record, remove_temporaries,
                               write_json_atomic, write_text_atomic)
from lineareval.runlock import RunLock

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"


class RunConflictError(RuntimeError):
    """run_dir holds a run (finished, or its shards) of another identity."""


class RunInterrupted(BaseException):
    """SIGTERM: unwinds like KeyboardInterrupt (not an Exception, so no `except Exception` swallows it)."""


def lock(run_dir: Path, force: bool) -> RunLock | None:
    """Rank 0: hold the run folder; None where it is read-only but holds a finished run, which is only read."""
    try:
        return RunLock(run_dir).acquire()
    except StorageError as error:
        if error.read_only and not force and is_finished(run_dir):
            log.warning("%s; it holds a finished run, which is only read", error)
            return None
        if error.read_only and is_finished(run_dir):  # force=true
            raise StorageError(f"{error}. It holds a finished run, but force=true reruns it, which needs to write: "
                               "drop force=true to use the finished run as it is, or set output_root= (or run_dir=) "
                               "to writable storage to rerun it there.", read_only=True) from error
        raise StorageError(f"{error}, and it holds no finished run to skip: this run needs to write. Set "
                           "output_root= (or run_dir=) to writable storage.", read_only=True) from error


def stored_identity(run_dir: Path) -> dict | None:
    """The identity a run folder was made with: `identity.json`, or for folders written before it existed,
    the config part computed from their `config.yaml`; None when neither is there."""
    if (run_dir / IDENTITY_FILE).exists():
        return load_record(run_dir / IDENTITY_FILE)
    if (run_dir / "config.yaml").exists():
        return {"config": config_identity(OmegaConf.load(run_dir / "config.yaml"))}
    return None


def check_same(what: str, stored: dict | None, identity: dict, parts: tuple[str, ...], remedy: str) -> None:
    """Raise a RunConflictError listing each field that differs, unless the `parts` of both identities agree."""
    if stored is None:
        changed = ["no identity.json or config.yaml: its configuration is unknown"]
    else:  # config fields by their own names (sampling.top_k), the rest as content.<field>
        changed = [line for part in parts if part in stored
                   for line in differences(stored[part], identity[part], "" if part == "config" else part)]
    if changed:
        raise RunConflictError(f"{what} of another configuration; what determines the samples differs:\n  " +
                               "\n  ".join(changed) + f"\n{remedy}")


def existing_result(run_dir: Path, identity: dict, unpinned: tuple[str, ...] = ()) -> dict | None:
    """The finished record if run_dir holds one of this identity's config part; raise if of another.

    `unpinned`: config fields this run leaves to the machine (`device=auto`, `dtype=auto`): a finished
    run is used whatever they resolved to where it was made (e.g. evaluating GPU samples on a CPU).
    """
    if not is_finished(run_dir):
        return None
    stored = stored_identity(run_dir)
    if stored is not None:
        stored = {"config": {key: value for key, value in stored["config"].items() if key not in unpinned}}
    current = {"config": {key: value for key, value in identity["config"].items() if key not in unpinned}}
    check_same(f"{run_dir} holds a finished run", stored, current, ("config",),
               "Leave run_dir at its default (one folder per configuration) or set run_dir=... to keep both; pass "
               "force=true to replace it (this samples everything again).")
    return load_record(run_dir)


def usable_result(run_dir: Path, existing: dict | None, decode_images: bool, writable: bool) -> dict | None:
    """`existing` if its files are whole; else None after removing its metrics.json (so it is sampled again),
    or, where the folder cannot be written (`writable` false), a DamagedRunError naming the file."""
    if existing is None:
        return None
    try:
        check_finished(run_dir, existing, decode_images)
    except DamagedRunError as error:
        if not writable:
            raise DamagedRunError(f"{error}: this finished run is damaged and its folder cannot be written to redo "
                                  "it. Set output_root= (or run_dir=) to writable storage.") from error
        log.warning("%s; the finished run is damaged: sampling it again", error)
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
        return None
    return existing


def remove_leftovers(run_dir: Path, finished: bool) -> None:
    """Rank 0 under the lock: temporary files of interrupted atomic writes (a merge's is as large as
    samples.npz), and the shards of a finished run killed before it removed them."""
    folder = run_dir / shards.SHARDS_DIR
    removed = remove_temporaries(run_dir) + remove_temporaries(folder)
    if finished and folder.exists():
        shutil.rmtree(folder)
        removed.append(folder)
    if removed:
        log.info("removed what an interrupted run left in %s: %s", run_dir, ", ".join(path.name for path in removed))


def prepare(run_dir: Path, resolved: dict, identity: dict, force: bool) -> None:
    """Rank 0 under the lock, before sampling: clear a forced run's old files, refuse shards of another
    identity, and store the resolved config and the identity."""
    folder = run_dir / shards.SHARDS_DIR
    if force:  # the old record goes first, so an interrupted forced rerun is not mistaken for finished
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
    elif folder.exists():
        check_same(f"{folder} holds shards of an unfinished run", stored_identity(run_dir), identity,
                   ("config", "content"), "Pass force=true to discard them, or set run_dir=... to keep both.")
        log.info("resuming %s from its finished shards", run_dir)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
    write_json_atomic(run_dir / IDENTITY_FILE, identity)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises RunInterrupted (once: a second SIGTERM acts as before)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.getsignal(signal.SIGTERM)

    def interrupt(signum: int, frame) -> None:
        signal.signal(signal.SIGTERM, previous)
        raise RunInterrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_message(run_dir: Path, reason: str) -> str:
    folder = run_dir / shards.SHARDS_DIR
    count = len(list(folder.glob("shard-*.npz"))) if folder.is_dir() else 0
    return (f"interrupted by {reason}: {run_dir} keeps its finished work ({count} finished shards); run the "
            "same command again to resume (nothing finished is sampled again)")
