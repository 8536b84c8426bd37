"""Experiment trackers. `metrics.json` in the run folder is the record; a tracker only mirrors it.

`logger=none` (default) does nothing; `logger=wandb` mirrors the resolved config, the record (metrics,
memory, throughput) and the sample grid to Weights & Biases (`mode=offline` needs no network).
`finish()` always runs, also when the run fails (the runner calls it in a `finally`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class NoLogger:
    def start(self, config: dict, run_dir: Path) -> None:
        pass

    def log_record(self, record: dict, run_dir: Path) -> None:
        pass

    def finish(self, failed: bool) -> None:
        pass


@dataclass
class WandbLogger:
    """W&B mirror: config at start, the flat record as summary (and one logged step), the sample grid."""

    project: str = "lineareval"
    entity: str | None = None
    mode: str = "online"  # online | offline | disabled
    tags: list[str] = field(default_factory=list)
    dir: str | None = None
    run = None

    def start(self, config: dict, run_dir: Path) -> None:
        import wandb

        name = "/".join(Path(run_dir).parts[-5:])
        self.run = wandb.init(project=self.project, entity=self.entity, mode=self.mode, tags=list(self.tags),
                              dir=self.dir or str(run_dir), config=config, name=name, reinit="finish_previous")

    def log_record(self, record: dict, run_dir: Path) -> None:
        import wandb

        scalars = {key: value for key, value in record.items() if isinstance(value, (int, float, str, bool))}
        grid = Path(run_dir) / "samples.png"
        self.run.summary.update(scalars)
        self.run.log({**{k: v for k, v in scalars.items() if not isinstance(v, str)},
                      **({"samples": wandb.Image(str(grid))} if grid.exists() else {})})

    def finish(self, failed: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None
