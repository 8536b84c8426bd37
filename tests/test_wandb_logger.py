"""logger=wandb in offline mode: config, record summary and grid mirrored; finish() also on failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from lineareval.keep import BudgetError
from lineareval.loggers import WandbLogger
from lineareval.runner import run

SMALL = ("weights=random", "num_samples=2", "batch_size=2", "model.image_size=128", "logger=wandb",
         "logger.mode=offline")


@pytest.fixture
def finishes(monkeypatch):
    """Record each finish(failed) call with the run's summary and config at that moment."""
    calls = []
    original = WandbLogger.finish

    def finish(self, failed):
        if self.run is not None:
            calls.append({"failed": failed, "summary": dict(self.run.summary), "config": dict(self.run.config)})
        original(self, failed)

    monkeypatch.setattr(WandbLogger, "finish", finish)
    monkeypatch.setenv("WANDB_SILENT", "true")
    return calls


def test_offline_run_mirrors_the_record(make_config, tmp_path, finishes):
    cfg = make_config(*SMALL, f"logger.dir={tmp_path / 'wandb'}", "cache=linear", "keep=1/2")
    record = run(cfg)
    (call,) = finishes
    assert call["failed"] is False
    assert call["summary"]["tokens_per_s"] == pytest.approx(record["tokens_per_s"])
    assert call["summary"]["cache"] == "linear" and call["summary"]["weights"] == "random"
    assert call["config"]["keep"] == "1/2" and call["config"]["cache"]["name"] == "linear"
    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("files/media/images/samples_*.png"))  # the sample grid
    assert Path(cfg.run_dir, "metrics.json").exists()  # the record stays on disk


def test_finish_runs_when_the_run_fails(make_config, tmp_path, finishes):
    with pytest.raises(BudgetError):
        run(make_config(*SMALL, f"logger.dir={tmp_path / 'wandb'}", "cache=linear", "keep=1/32"))
    assert [call["failed"] for call in finishes] == [True]
