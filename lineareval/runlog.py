"""The run folder's log file (`run.log`, Hydra's job logging), written only where it can be.

Hydra's own file handler opens its file while Hydra configures logging, before the run starts, so a
run folder on read-only storage stopped every run with "Unable to configure handler 'file'", even one
that only had to find its finished record. This handler opens the file at the first message; if it
cannot, it says so once on stderr and the run goes on logging to the terminal.
"""

from __future__ import annotations

import logging
import sys


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
