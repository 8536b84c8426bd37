"""Experiment trackers. `metrics.json` in the run folder is the record; a tracker only mirrors it.

`logger=none` (default) does nothing; `logger=wandb` mirrors the resolved config, the record (metrics,
memory, throughput) and the sample grid to Weights & Biases (`mode=offline` needs no network).
`finish()` always runs, also when the run fails (the runner calls it in a `finally`).

A tracker never stops or delays a run for long: W&B is started with a bounded wait (`init_timeout_s`);
if it fails (no API key, no network, a server error) the run warns and goes on without it, and the
record is mirrored at the end (a second bounded attempt). Every later W&B failure is a warning too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class NoLogger:
    def start(self, config: dict, run_dir: Path) -> None:
        pass

    def log_record(self, record: dict, run_dir: Path) -> None:
        pass

    def finish(self, failed: bool) -> None:
        pass


INIT_MARGIN_S = 5.0  # W&B's own init timeout is this much shorter than the run's wait (`init_timeout_s`)


def call_with_timeout(call: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """`call()` in a daemon thread; TimeoutError after `timeout_s` (the thread is left to end on its own:
    a daemon thread never keeps the process alive), its own exception otherwise."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name=what, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not answer within {timeout_s:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@dataclass
class WandbLogger:
    """W&B mirror: config at start, the flat record as summary (and one logged step), the sample grid."""

    project: str = "lineareval"
    entity: str | None = None
    mode: str = "online"  # online | offline | disabled
    tags: list[str] = field(default_factory=list)
    dir: str | None = None
    init_timeout_s: float = 30.0  # the longest a run waits for W&B to start, at the start and at the end
    run = None
    config: dict | None = field(default=None, init=False, repr=False)  # the resolved config, kept for a late start

    def start(self, config: dict, run_dir: Path) -> None:
        self.config = config
        self.run = self._init(run_dir, "at the start; the run goes on without it and mirrors its record at the end")

    def log_record(self, record: dict, run_dir: Path) -> None:
        if self.run is None:  # W&B did not start with the run: mirror the finished record now
            self.run = self._init(run_dir, f"at the end; the record stays in {Path(run_dir) / 'metrics.json'}")
        if self.run is None:
            return
        try:
            self._mirror(record, Path(run_dir))
        except Exception as error:  # the record on disk is what counts
            log.warning("W&B: mirroring the record failed (%s); the record stays in %s", error,
                        Path(run_dir) / "metrics.json")

    def finish(self, failed: bool) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            call_with_timeout(lambda: run.finish(exit_code=1 if failed else 0), self.init_timeout_s, "W&B finish")
        except Exception as error:
            log.warning("W&B: finishing the run failed (%s)", error)

    def _init(self, run_dir: Path, consequence: str):
        """A started W&B run, or None (warned) when W&B fails or does not answer within init_timeout_s."""
        import wandb

        name = "/".join(Path(run_dir).parts[-6:])
        # W&B's own timeout ends its attempt a little before ours, which ends the wait at init_timeout_s exactly
        settings = wandb.Settings(init_timeout=max(1.0, self.init_timeout_s - INIT_MARGIN_S))
        try:
            return call_with_timeout(
                lambda: wandb.init(project=self.project, entity=self.entity, mode=self.mode, tags=list(self.tags),
                                   dir=self.dir or str(run_dir), config=self.config, name=name,
                                   reinit="finish_previous", settings=settings),
                self.init_timeout_s, "W&B start")  # W&B's own init_timeout first, ours as the backstop
        except Exception as error:
            log.warning("W&B unavailable (%s: %s) %s", type(error).__name__, str(error).splitlines()[0] if str(error)
                        else "", consequence)
            return None

    def _mirror(self, record: dict, run_dir: Path) -> None:
        import wandb

        scalars = {key: value for key, value in record.items() if isinstance(value, (int, float, str, bool))}
        grid = run_dir / "samples.png"
        self.run.summary.update(scalars)
        self.run.log({**{k: v for k, v in scalars.items() if not isinstance(v, str)},
                      **({"samples": wandb.Image(str(grid))} if grid.exists() else {})})
