"""Run integrity: one writer per run folder, identity by what determines the samples, clean interruptions,
leftovers removed, every sampling field checked, and storage errors that say where and what to do."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import lineareval.runner as runner
from lineareval import shards
from lineareval.runner import RunConflictError, run

ROOT = Path(__file__).resolve().parents[1]
# 8x8 tokens, no decoding: a batch samples in well under a second on one core
SMALL = ("model=llamagen_tiny", "weights=random", "num_samples=4", "batch_size=2", "model.image_size=128",
         "decode_images=false")


def tokens_of(run_dir: Path) -> np.ndarray:
    return np.load(Path(run_dir) / "tokens.npz")["tokens"]


def environment() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def cli(tmp_path: Path, *overrides: str, **popen) -> subprocess.Popen:
    """`python run.py` on the tiny model, outputs under tmp_path; stdout and stderr merged."""
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), f"output_root={tmp_path / 'outputs'}",
                             f"weights_dir={tmp_path / 'weights'}", "device=cpu", *overrides], cwd=tmp_path,
                            env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s"
        time.sleep(0.05)


# --- 2. the default run folder names every setting that changes a sample ---

SAMPLE_SETTINGS = [("sampling.cfg_scale=1.5", "sampling.cfg_scale=2.0"), ("sampling.top_k=0", "sampling.top_k=1"),
                   ("sampling.temperature=1.0", "sampling.temperature=0.9"),
                   ("sampling.top_p=1.0", "sampling.top_p=0.9"), ("sampling.cfg_interval=-1", "sampling.cfg_interval=3"),
                   ("num_samples=4", "num_samples=8"), ("seed=0", "seed=1"), ("cache.anchors=line", "cache.anchors=4"),
                   ("cache.recent_lines=1", "cache.recent_lines=2"), ("cache.score_source=line", "cache.score_source=last_token"),
                   ("model.image_size=128", "model.image_size=256"), ("decode_images=true", "decode_images=false"),
                   ("dtype=float32", "dtype=bfloat16")]
EXECUTION_SETTINGS = [("batch_size=2", "batch_size=4"), ("device=auto", "device=cpu"), ("logger=none", "logger=wandb"),
                      ("force=false", "force=true"), ("stage=all", "stage=generate"), ("grid_images=4", "grid_images=9"),
                      ("compile=false", "compile=true"), ("weights_dir=/a/weights", "weights_dir=/b/weights/"),
                      ("dtype=auto", "dtype=float32")]


@pytest.mark.parametrize(("first", "second"), SAMPLE_SETTINGS)
def test_default_run_folders_differ_for_every_setting_that_changes_a_sample(make_config, first, second):
    assert make_config("cache=linear", "keep=1/2", first).run_dir != make_config("cache=linear", "keep=1/2", second).run_dir


@pytest.mark.parametrize(("first", "second"), EXECUTION_SETTINGS)
def test_default_run_folder_is_shared_by_spellings_of_the_same_samples(make_config, first, second):
    if "device=auto" in first and torch.cuda.is_available():
        pytest.skip("device=auto is cuda here")
    assert make_config("cache=linear", "keep=1/2", first).run_dir == make_config("cache=linear", "keep=1/2", second).run_dir


def test_benchmark_sample_settings_name_the_run_folder_but_data_locations_do_not(make_config, monkeypatch):
    def folder(*overrides: str) -> str:
        return make_config("benchmark=imagenet_fid", *overrides).run_dir

    assert folder("benchmark.balanced=false") != folder("benchmark.balanced=true")
    assert folder("benchmark.resolution=256") != folder("benchmark.resolution=128")
    default = folder()
    monkeypatch.setenv("LINEAREVAL_DATA", "/elsewhere/data")  # the same reference batch, another mount point
    assert folder() == default
