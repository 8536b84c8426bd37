"""The run folder's log file (`run.log`, Hydra's job logging), written only where it can be.

Hydra's own file handler opens its file while Hydra configures logging, before the run starts, so a
run folder on read-only storage stopped every run with "Unable to configure handler 'file'", even one
that only had to find its finished record. This handler opens the file at the first message; if it
cannot, it says so once on stderr and the run goes on logging to the terminal.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class RunLogHandler(logging.FileHandler):
    """A FileHandler that opens lazily and turns itself off (one warning) where the file cannot be written."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None) -> None:
        super().__init__(filename, mode, encoding, delay=True)
        self.unwritable = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.unwritable:
            return
        if self.stream is None:
            try:
                self.stream = self._open()
            except OSError as error:
                self.unwritable = True
                sys.stderr.write(f"lineareval: cannot write the run log {self.baseFilename} ({error.strerror}); "
                                 "logging to the terminal only\n")
                return
        super().emit(record)


class RunDirCheck(Callback):
    """Hydra callback: the run folder Hydra is about to create (`hydra.run.dir`), checked before it does.

    Hydra makes that folder before the run starts, so on read-only storage (or a root without permission)
    it stopped with a bare PermissionError traceback. Here the same failure says where and what to do, and
    exits 2 as run.py's other user errors do. An existing folder (a finished run on read-only storage, which
    can still be skipped) passes: nothing is created.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        from lineareval.storage import storage_error

        HydraConfig.instance().set_config(config)  # as Hydra does next: run.dir names ${hydra:runtime.choices...}
        run_dir = Path(str(config.hydra.run.dir))
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            known = storage_error(run_dir, error)
            message = str(known) if known else (f"could not create the run folder {run_dir}: {error.strerror}; set "
                                                "output_root= (or run_dir=) to a folder this user can write")
            sys.stderr.write(f"StorageError: {message}\n")
            sys.exit(2)
