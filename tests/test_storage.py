"""Storage errors say what limit was hit: a shell's file size limit (`ulimit -f`) is not a full disk, and a
forced rerun on read-only storage is refused before anything is removed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_file_size_limit_is_reported_as_such_not_as_free_space(tmp_path):
    script = ("import numpy as np\nfrom lineareval.record import write_npz_atomic, StorageError\n"
              f"try:\n    write_npz_atomic({str(tmp_path / 'big.npz')!r}, a=np.zeros(2**20))\n"
              "except StorageError as error:\n    print(error)\n")
    done = subprocess.run(["bash", "-c", f"ulimit -f 64 && exec {sys.executable} -c \"$0\"", script],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "file size limit of this process (ulimit -f: 64 KiB)" in done.stdout, done.stdout
    assert "free on that file system" not in done.stdout
    assert not list(tmp_path.iterdir())  # nothing half-written kept


def test_force_on_read_only_storage_says_force_needs_to_write_and_keeps_the_finished_run(make_config, monkeypatch):
    from lineareval import runfolder
    from lineareval.record import StorageError
    from lineareval.runner import run

    tiny = ("weights=random", "num_samples=2", "batch_size=2", "decode_images=false")
    cfg = make_config(*tiny)
    run(cfg)

    def read_only(self):
        raise StorageError(f"could not write {self.path}: Read-only file system. The run folder is read-only here",
                           read_only=True)

    monkeypatch.setattr(runfolder.RunLock, "acquire", read_only)
    with pytest.raises(StorageError) as info:
        run(make_config(*tiny, "force=true"))
    message = str(info.value)
    assert "force=true" in message and "holds a finished run" in message and "drop force=true" in message
    assert "holds no finished run" not in message
    assert (Path(cfg.run_dir) / "metrics.json").exists() and (Path(cfg.run_dir) / "tokens.npz").exists()
