"""The Python API: the README's example runs as written, and it samples what run.py samples."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import lineareval
from lineareval.runner import run

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_example_runs_as_written(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    example = re.search(r"    import lineareval\n\n((?:    .+\n)+)", README.read_text()).group(1)
    namespace = {"lineareval": lineareval}
    lines = [line[4:].split("#")[0].rstrip() for line in example.splitlines()]
    exec("\n".join(lines[:-1]), namespace)  # the last line only shows values
    out = namespace["out"]
    assert out.images.shape == (3, 32, 32, 3) and out.images.dtype == np.uint8 and out.tokens.shape == (3, 256)
    assert out.record["kv_cache_capacity_bytes"] > 0 and out.record["cache"] == "linear"


def test_the_api_samples_what_a_run_samples(make_config, tmp_path):
    overrides = ["weights=random", "num_samples=3", "batch_size=3", "decode_images=false", "seed=4"]
    cfg = make_config("cache=h2o", "keep=1/4", *overrides)
    run(cfg)
    from_run = np.load(Path(cfg.run_dir) / "tokens.npz")
    pipe = lineareval.load("llamagen_tiny", *overrides, cache="h2o", keep="1/4", device="cpu",
                           weights_dir=str(tmp_path / "weights"))
    out = pipe.generate(labels=from_run["labels"], seed=4)
    assert np.array_equal(out.tokens, from_run["tokens"]) and out.images is None  # decode_images=false
    assert out.record["visual_budget"] == 64 and len(pipe.generate(labels=[1], decode=True).images) == 1


def test_the_api_says_which_conditions_a_model_takes():
    pipe = lineareval.load("llamagen_tiny", weights="random", device="cpu")
    with pytest.raises(ValueError, match="labels="):
        pipe.generate(prompts=["a red apple"])
