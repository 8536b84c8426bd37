"""Sampling in shards: resume after an interruption, torchrun ranks, and a merge equal to one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lineareval.runner as runner
from lineareval import shards
from lineareval.runner import RunConflictError, run

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("model=llamagen_tiny", "weights=random", "num_samples=5", "batch_size=2", "model.image_size=128", "cache=linear", "keep=1/2")


TIMED_GENERATION = runner.timed_generation


class Interrupted(Exception):
    pass


def count_batches(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Record the first sample id of every generated batch; raise at call `fail_at` (a kill mid-run)."""
    calls, original = [], TIMED_GENERATION

    def counted(generator, policy, budget, conditions, sample_ids, seed, device, method):
        if fail_at is not None and len(calls) == fail_at:
            raise Interrupted
        calls.append(int(sample_ids[0]))
        return original(generator, policy, budget, conditions, sample_ids, seed, device, method)

    monkeypatch.setattr(runner, "timed_generation", counted)
    return calls


def run_files(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(run_dir / "tokens.npz")["tokens"], np.load(run_dir / "samples.npz")["arr_0"]


def test_plan_covers_every_sample_once():
    plan = shards.plan(7, 3)
    assert [(shard.start, shard.stop) for shard in plan] == [(0, 3), (3, 6), (6, 7)]
    assert shards.plan(6, 3)[-1].size == 3


def test_interrupted_run_resumes_with_the_missing_shards_only(make_config, tmp_path, monkeypatch):
    reference = run(make_config(*SMALL, f"run_dir={tmp_path / 'reference'}"))
    calls = count_batches(monkeypatch, fail_at=2)
    cfg = make_config(*SMALL)
    run_dir = Path(cfg.run_dir)
    with pytest.raises(Interrupted):
        run(cfg)
    assert calls == [0, 2]
    assert not (run_dir / "metrics.json").exists()
    assert sorted(path.name for path in (run_dir / "shards").iterdir()) == [
        "shard-00000000-00000002.npz", "shard-00000002-00000004.npz"]

    calls = count_batches(monkeypatch)
    record = run(make_config(*SMALL))
    assert calls == [4]  # the two finished shards were not sampled again
    assert not (run_dir / "shards").exists()  # merged, then removed
    tokens, images = run_files(run_dir)
    expected_tokens, expected_images = run_files(tmp_path / "reference")
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_array_equal(images, expected_images)
    assert record["num_samples"] == reference["num_samples"] == 5 and record["world_size"] == 1


def test_unusable_shard_is_sampled_again(make_config, monkeypatch):
    cfg = make_config(*SMALL)
    count_batches(monkeypatch, fail_at=2)
    with pytest.raises(Interrupted):
        run(cfg)
    folder = Path(cfg.run_dir) / "shards"
    broken = folder / "shard-00000002-00000004.npz"
    broken.write_bytes(broken.read_bytes()[:100])  # e.g. a copy cut short outside our atomic writes
    (folder / ".shard-00000004-00000005.npz.1234abcd.tmp").write_bytes(b"half")  # a kill mid-write
    calls = count_batches(monkeypatch)
    run(make_config(*SMALL))
    assert calls == [2, 4]


def test_shards_of_another_config_are_refused_then_discarded_with_force(make_config, monkeypatch):
    count_batches(monkeypatch, fail_at=1)
    with pytest.raises(Interrupted):
        run(make_config(*SMALL))
    changed = (*SMALL, "sampling.top_k=5", f"run_dir={make_config(*SMALL).run_dir}")
    with pytest.raises(RunConflictError, match=r"(?s)unfinished run.*sampling.top_k: 0 \(stored\) -> 5 \(now\)"):
        run(make_config(*changed))
    calls = count_batches(monkeypatch)
    run(make_config(*changed, "force=true"))
    assert calls == [0, 2, 4]


def test_forced_rerun_that_is_interrupted_is_not_taken_for_finished(make_config, monkeypatch):
    run(make_config(*SMALL))
    count_batches(monkeypatch, fail_at=1)
    with pytest.raises(Interrupted):
        run(make_config(*SMALL, "force=true"))
    calls = count_batches(monkeypatch)
    run(make_config(*SMALL))
    assert calls == [2, 4]


def test_efficiency_refuses_several_ranks(make_config):
    cfg = make_config("benchmark=efficiency", "weights=random", "batch_size=1")
    with pytest.raises(ValueError, match="one process"):
        runner._run(cfg, runner.distributed.Ranks(rank=0, world_size=2))


def test_torchrun_two_ranks_merge_to_the_one_process_result(make_config, tmp_path):
    """Two gloo ranks on CPU: each samples its round-robin shards; rank 0 merges an identical run."""
    overrides = [*SMALL, "device=cpu", f"output_root={tmp_path / 'outputs'}", "hydra.job.chdir=false"]
    single = run(make_config(*SMALL, f"run_dir={tmp_path / 'single'}"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "run.py"), *overrides, "logger=none"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = Path(make_config(*SMALL).run_dir)  # the default folder, as the torchrun job composed it
    assert run_dir.parent == tmp_path / "outputs/samples/llamagen_tiny/linear/keep-1_2/random/seed-0"
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["world_size"] == 2 and record["num_samples"] == 5
    assert not (run_dir / "shards").exists()
    tokens, images = run_files(run_dir)
    expected_tokens, expected_images = run_files(tmp_path / "single")
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_array_equal(images, expected_images)
    assert np.array_equal(np.load(run_dir / "tokens.npz")["labels"], np.load(tmp_path / "single/tokens.npz")["labels"])
    assert single["visual_budget"] == record["visual_budget"]


def test_torchrun_resumes_a_run_started_by_one_process(make_config, tmp_path, monkeypatch):
    """Shards are shards: a run interrupted in one process finishes under two ranks without redoing any."""
    cfg = make_config(*SMALL, "num_samples=8")
    count_batches(monkeypatch, fail_at=3)
    with pytest.raises(Interrupted):
        run(cfg)
    run_dir = Path(cfg.run_dir)
    finished = {path.name: path.stat().st_mtime_ns for path in (run_dir / "shards").iterdir()}
    assert len(finished) == 3
    kept = tmp_path / "kept"
    shutil.copytree(run_dir / "shards", kept)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "run.py"), *SMALL, "num_samples=8", "device=cpu", f"output_root={tmp_path / 'outputs'}",
                           f"weights_dir={tmp_path / 'weights'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    tokens = np.load(run_dir / "tokens.npz")["tokens"]
    for name in finished:  # the merged run holds the shards sampled before the interruption, unchanged
        shard = shards.Shard(int(name[6:14]), int(name[15:23]))
        np.testing.assert_array_equal(tokens[shard.start:shard.stop], np.load(kept / name)["tokens"])
    output = done.stdout + done.stderr
    # 4 shards, 0..2 finished: the one missing shard goes to rank 0 (the missing ones are dealt round-robin)
    assert "rank 0 of 2: 1 of the run's 1 shards to sample (6 of 8 samples finished)" in output
    assert "rank 1 of 2: 0 of the run's 1 shards to sample (6 of 8 samples finished)" in output


def test_a_shard_copied_over_another_ones_name_is_sampled_again_never_merged(make_config, tmp_path, monkeypatch):
    """shard-0-2 copied to shard-2-4's name: its rows are samples 0-1, which must not become samples 2-3."""
    SIX = (*SMALL, "num_samples=6")
    run(make_config(*SIX, f"run_dir={tmp_path / 'reference'}"))
    count_batches(monkeypatch, fail_at=2)
    with pytest.raises(Interrupted):
        run(make_config(*SIX))
    folder = Path(make_config(*SIX).run_dir) / "shards"
    shutil.copy(shards.Shard(0, 2).path(folder), shards.Shard(2, 4).path(folder))
    calls = count_batches(monkeypatch)
    run(make_config(*SIX))
    assert calls == [2, 4]  # the misnamed copy was sampled again
    np.testing.assert_array_equal(run_files(folder.parent)[0], run_files(tmp_path / "reference")[0])


@pytest.mark.parametrize("first, second, interrupted_after, sampled", [
    (2, 3, 2, [4]),     # shards 0-2, 2-4 finished; with batches of 3 only samples 4-5 are missing
    (3, 2, 1, [3, 5]),  # shard 0-3 finished; samples 3..5 in batches of 2
])
def test_resuming_with_another_batch_size_reuses_every_finished_sample(make_config, tmp_path, monkeypatch, first,
                                                                        second, interrupted_after, sampled):
    """Sample i depends only on (seed, i): finished shards of any batch size are kept, only missing samples drawn."""
    SIX = (*SMALL, "num_samples=6")
    run(make_config(*SIX, f"run_dir={tmp_path / 'reference'}"))
    count_batches(monkeypatch, fail_at=interrupted_after)
    with pytest.raises(Interrupted):
        run(make_config(*SIX, f"batch_size={first}"))
    calls = count_batches(monkeypatch)
    record = run(make_config(*SIX, f"batch_size={second}"))
    assert calls == sampled
    (tokens, images), (expected_tokens, expected_images) = run_files(Path(make_config(*SIX).run_dir)), run_files(
        tmp_path / "reference")
    np.testing.assert_array_equal(tokens, expected_tokens)
    # the VQ decoder's convolutions pick kernels by batch size: a float within roundoff of a rounding boundary
    # may land one uint8 level away (the tokens, what sampling made, are equal)
    np.testing.assert_allclose(images.astype(int), expected_images.astype(int), rtol=0, atol=1)
    assert record["num_samples"] == 6 and record["batch_size"] == second
