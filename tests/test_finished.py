"""A finished run is skipped only when its files are whole: a truncated tokens.npz, an empty metrics.json or a
samples.npz of the wrong shape makes the run be redone (with a warning naming the file), or, where the folder
cannot be written, refused naming the file; never skipped as finished."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

import lineareval.runner as runner
from lineareval.runner import run

SMALL = ("model=llamagen_tiny", "weights=random", "num_samples=3", "batch_size=2", "model.image_size=128",
         "cache=linear", "keep=1/2")


def sampled_batches(monkeypatch) -> list[int]:
    calls, original = [], runner.timed_generation

    def counted(generator, policy, budget, conditions, sample_ids, seed, device, method):
        calls.append(int(sample_ids[0]))
        return original(generator, policy, budget, conditions, sample_ids, seed, device, method)

    monkeypatch.setattr(runner, "timed_generation", counted)
    return calls


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def wrong_rows(path: Path) -> None:
    with np.load(path) as data:
        arrays = dict(data)
    key = "tokens" if "tokens" in arrays else "arr_0"
    np.savez(path, **{**arrays, key: arrays[key][:2]})  # a finished run of 3 samples holding 2


DAMAGES = {
    "tokens.npz truncated": ("tokens.npz", truncate, "tokens.npz"),
    "metrics.json empty": ("metrics.json", lambda path: path.write_text("{}"), "metrics.json"),
    "metrics.json without its fields": ("metrics.json", lambda path: path.write_text('{"model": "x"}'),
                                        "metrics.json"),
    "samples.npz truncated": ("samples.npz", truncate, "samples.npz"),
    "samples.npz short": ("samples.npz", wrong_rows, "samples.npz"),
    "tokens.npz short": ("tokens.npz", wrong_rows, "tokens.npz"),
    "tokens.npz missing": ("tokens.npz", lambda path: path.unlink(), "tokens.npz"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_finished_run_is_redone_not_skipped(make_config, monkeypatch, caplog, damage):
    cfg = make_config(*SMALL)
    run(cfg)
    run_dir = Path(cfg.run_dir)
    expected = np.load(run_dir / "tokens.npz")["tokens"]
    name, spoil, named = DAMAGES[damage]
    spoil(run_dir / name)
    calls = sampled_batches(monkeypatch)
    with caplog.at_level(logging.WARNING):
        record = run(make_config(*SMALL))
    assert calls == [0, 2]  # sampled again
    assert named in caplog.text and "sampling it again" in caplog.text
    np.testing.assert_array_equal(np.load(run_dir / "tokens.npz")["tokens"], expected)
    assert record["num_samples"] == 3 and json.loads((run_dir / "metrics.json").read_text())["num_samples"] == 3


def test_a_whole_finished_run_is_still_skipped(make_config, monkeypatch):
    run(make_config(*SMALL))
    calls = sampled_batches(monkeypatch)
    run(make_config(*SMALL))
    assert calls == []


def test_a_damaged_finished_run_that_cannot_be_rewritten_is_refused_naming_the_file(make_config, monkeypatch):
    cfg = make_config(*SMALL)
    run(cfg)
    truncate(Path(cfg.run_dir) / "tokens.npz")
    monkeypatch.setattr(runner.runfolder, "lock", lambda run_dir, force: None)  # a read-only folder: only read
    with pytest.raises(ValueError, match=r"tokens\.npz.*(?s:.*)writable storage"):
        run(make_config(*SMALL))


def test_a_finished_run_whose_files_disagree_on_the_fingerprint_is_redone(make_config, monkeypatch, caplog):
    cfg = make_config(*SMALL)
    run(cfg)
    path = Path(cfg.run_dir) / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "run_fingerprint": "0123abcd"}))
    calls = sampled_batches(monkeypatch)
    with caplog.at_level(logging.WARNING):
        run(make_config(*SMALL))
    assert calls == [0, 2] and "fingerprint" in caplog.text
