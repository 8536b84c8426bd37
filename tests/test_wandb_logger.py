"""logger=wandb in offline mode: config, record summary and grid mirrored; finish() also on failure."""

from __future__ import annotations

import json
import threading
import time
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


# --- W&B failing never blocks the run or loses its record ---

def test_unreachable_wandb_warns_and_the_run_finishes_with_its_record(make_config, tmp_path, monkeypatch, caplog):
    """logger.mode=online with a server that refuses connections: bounded waits, warnings, the local record."""
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_config(*SMALL, "logger.mode=online", "logger.init_timeout_s=3", f"logger.dir={tmp_path / 'wandb'}",
                      "decode_images=false")
    began = time.monotonic()
    record = run(cfg)
    # two bounded attempts (start, end), each cut off at 3 s by our own timer
    assert time.monotonic() - began < 2 * 3 + 60
    assert json.loads((Path(cfg.run_dir) / "metrics.json").read_text()) == json.loads(json.dumps(record))
    warnings = [entry.getMessage() for entry in caplog.records if entry.name == "lineareval.loggers"]
    assert any("W&B unavailable" in text and "at the start" in text for text in warnings), warnings
    assert any("W&B unavailable" in text and "metrics.json" in text for text in warnings), warnings


def test_a_wandb_start_that_hangs_is_cut_off_and_the_record_mirrored_at_the_end(make_config, tmp_path, monkeypatch,
                                                                               caplog, finishes):
    import wandb

    original, calls, released = wandb.init, [], threading.Event()

    def init(**kwargs):
        calls.append(time.monotonic())
        if len(calls) == 1:  # no answer, as with a network that drops packets; never a late run after the test
            released.wait(60)
            raise RuntimeError("released by the test")
        return original(**{**kwargs, "mode": "offline"})

    monkeypatch.setattr(wandb, "init", init)
    cfg = make_config(*SMALL, "logger.mode=online", "logger.init_timeout_s=1", f"logger.dir={tmp_path / 'wandb'}",
                      "decode_images=false")
    began = time.monotonic()
    try:
        record = run(cfg)
    finally:
        released.set()
    assert len(calls) == 2 and calls[1] - began < 1 + 30  # the first start given up after 1 s
    (call,) = finishes
    assert call["failed"] is False and call["summary"]["num_samples"] == record["num_samples"] == 2
    assert any("at the start" in entry.getMessage() for entry in caplog.records if entry.name == "lineareval.loggers")


def test_a_hanging_wandb_start_waits_init_timeout_s_as_the_readme_says(tmp_path, monkeypatch):
    """The README promises at most `logger.init_timeout_s` per attempt (30 s by default), not that plus a margin."""
    import re

    import wandb

    released = threading.Event()

    def init(**kwargs):
        released.wait(60)
        raise RuntimeError("released by the test")

    monkeypatch.setattr(wandb, "init", init)
    logger = WandbLogger(mode="online", init_timeout_s=2)
    logger.config = {}
    began = time.monotonic()
    try:
        assert logger._init(tmp_path, "and goes on") is None
    finally:
        released.set()
    assert 2 <= time.monotonic() - began < 2 + 2.5
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    stated = re.search(r"`logger.init_timeout_s` \((\d+) s", readme)
    assert stated and float(stated[1]) == WandbLogger.init_timeout_s
