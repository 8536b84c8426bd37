"""The runner end to end on the composed config: files, record, skip/force, conflicts, user errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CACHE_CONFIGS, MODEL_CONFIGS
from lineareval.keep import BudgetError
from lineareval.runner import RunConflictError, run

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("weights=random", "num_samples=3", "batch_size=2", "grid_images=3", "model.image_size=128")  # 8x8 tokens


def test_run_writes_the_run_folder(make_config, tmp_path):
    cfg = make_config(*SMALL, "cache=linear", "keep=1/4")
    record = run(cfg)
    run_dir = Path(cfg.run_dir)
    assert run_dir.parent == tmp_path / "outputs/samples/llamagen_tiny/linear/keep-1_4/random/seed-0"
    assert re.fullmatch(r"n-3_cfg-1\.75_sequential_[0-9a-f]{8}", run_dir.name)  # + a hash of what determines the samples
    tokens = np.load(run_dir / "tokens.npz")
    assert tokens["tokens"].shape == (3, 64) and tokens["tokens"].dtype == np.int64
    assert tokens["labels"].shape == (3,)
    samples = np.load(run_dir / "samples.npz")
    assert samples["arr_0"].shape == (3, 128, 128, 3) and samples["arr_0"].dtype == np.uint8
    assert Image.open(run_dir / "samples.png").size == (2 * 128 + 3 * 2, 2 * 128 + 3 * 2)
    stored = json.loads((run_dir / "metrics.json").read_text())
    assert stored == json.loads(json.dumps(record))
    assert stored["keep"] == "1/4" and stored["visual_budget"] == 16 and stored["weights"] == "random"
    assert stored["weights_files"] == [] and stored["cache"] == "linear" and stored["batch_size"] == 2
    assert 0 < stored["kv_cache_high_water_bytes"] <= stored["kv_cache_capacity_bytes"]
    assert stored["latency_s_per_batch"] > 0 and stored["tokens_per_s"] == pytest.approx(64 * stored["images_per_s"])
    assert stored["policy"] == {"anchors": "line", "recent_lines": 1, "score_source": "line"}
    assert stored["peak_memory_method"] == "cpu_rss_poll" and "torch" in stored["versions"]


def test_finished_run_is_skipped_and_force_reruns(make_config):
    cfg = make_config(*SMALL, "num_samples=2", "decode_images=false")
    first = run(cfg)
    metrics = Path(cfg.run_dir) / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    assert run(cfg) == first and metrics.stat().st_mtime_ns == stamp
    forced = run(make_config(*SMALL, "num_samples=2", "decode_images=false", "force=true"))
    assert forced["created_at"] >= first["created_at"] and metrics.stat().st_mtime_ns != stamp


def test_a_different_config_in_a_finished_run_dir_is_an_error(make_config):
    cfg = make_config(*SMALL, "num_samples=2", "decode_images=false")
    run(cfg)
    before = (Path(cfg.run_dir) / "metrics.json").read_bytes()
    other = make_config(*SMALL, "num_samples=1", "decode_images=false")
    assert other.run_dir != cfg.run_dir  # the default folders differ; an explicit run_dir must not mix them
    with pytest.raises(RunConflictError, match=r"num_samples: 2 \(stored\) -> 1 \(now\)"):
        run(make_config(*SMALL, "num_samples=1", "decode_images=false", f"run_dir={cfg.run_dir}"))
    assert (Path(cfg.run_dir) / "metrics.json").read_bytes() == before  # nothing lost


def test_paired_samples_full_and_compressed(make_config):
    """Same seed, same labels: a compressed run is paired sample by sample with the full run."""
    full = make_config(*SMALL, "decode_images=false")
    linear = make_config(*SMALL, "decode_images=false", "cache=linear", "keep=1/4")
    run(full), run(linear)
    tokens_full = np.load(Path(full.run_dir) / "tokens.npz")
    tokens_linear = np.load(Path(linear.run_dir) / "tokens.npz")
    assert np.array_equal(tokens_full["labels"], tokens_linear["labels"])
    # B = 16: the first eviction follows the line end after token 23, so earlier tokens are shared
    assert np.array_equal(tokens_full["tokens"][:, :24], tokens_linear["tokens"][:, :24])
    assert not np.array_equal(tokens_full["tokens"], tokens_linear["tokens"])


def test_budget_below_the_policy_minimum_stops_before_generating(make_config):
    cfg = make_config(*SMALL, "cache=linear", "keep=1/16")  # 4 tokens; LineAR needs 2 lines = 16
    with pytest.raises(BudgetError, match=r"needs at least 16.*keep >= 1/4"):
        run(cfg)
    assert [path.name for path in Path(cfg.run_dir).iterdir()] == [".lock"]  # only the lock: nothing of the run


def test_full_cache_rejects_a_budget(make_config):
    with pytest.raises(BudgetError, match="cache=full.*needs at least 64"):
        run(make_config(*SMALL, "keep=1/2"))


@pytest.mark.parametrize("model", MODEL_CONFIGS)
@pytest.mark.parametrize("cache", CACHE_CONFIGS)
def test_every_model_and_cache_config_composes(make_config, model, cache):
    cfg = make_config(f"model={model}", f"cache={cache}")
    assert cfg.model.name == model and cfg.cache.name == cache
    assert cfg.sampling.cfg_scale == cfg.model.sampling.cfg_scale


def cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), f"output_root={tmp_path}/outputs",
                           f"weights_dir={tmp_path}/weights", *(() if any(a.startswith("model=") for a in args)
                                                                else ("model=llamagen_tiny",)), *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_without_weights_offline_says_what_is_missing(tmp_path):
    result = cli("model=llamagen_xl", "cache=linear", "keep=1/6", tmp_path=tmp_path)
    assert result.returncode == 2
    for expected in ("MissingWeightsError", "c2i_XL_384.pt", "vq_ds16_c2i.pt", f"{tmp_path}/weights",
                     "hf download FoundationVision/LlamaGen"):
        assert expected in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("keep", ["0", "1/0", "abc", "1.5", "-1"])
def test_cli_rejects_bad_keep_with_the_accepted_range(tmp_path, keep):
    result = cli("weights=random", "cache=window", f"keep={keep}", "num_samples=1", "model.image_size=128",
                 tmp_path=tmp_path)
    assert result.returncode == 2 and "fraction in (0, 1]" in result.stderr + result.stdout
