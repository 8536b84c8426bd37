"""benchmark=imagenet_fid through the runner: resize, ADM samples, metrics, stages, and bad references."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lineareval.metrics.features import ExtractorSpec, register_extractor
from lineareval.metrics.fid import compute_metrics
from lineareval.runner import run
from test_fid import TinyExtractor

TINY_RUN = ("weights=random", "benchmark=imagenet_fid", "benchmark.extractor=tiny-imagenet",
            "benchmark.resolution=64", "num_samples=6", "batch_size=3", "model.image_size=128")


@pytest.fixture
def reference(tmp_path) -> Path:
    register_extractor(ExtractorSpec("tiny-imagenet", TinyExtractor, "pool", "logits", protocol="tiny v1"))
    path = tmp_path / "reference.npz"
    images = np.random.default_rng(0).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
    np.savez(path, arr_0=images)
    return path


def test_all_stage_generates_resized_samples_and_scores_them(make_config, reference):
    cfg = make_config(*TINY_RUN, f"benchmark.reference={reference}")
    record = run(cfg)
    samples = Path(cfg.run_dir) / "samples.npz"
    assert np.load(samples)["arr_0"].shape == (6, 64, 64, 3)  # 128 px generated, resized to 64
    stored = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())
    assert stored["evaluated"] is True and stored == json.loads(json.dumps(record))
    expected = compute_metrics(samples, reference, "tiny-imagenet", progress=False)
    assert stored["fid"] == pytest.approx(expected["fid"]) and stored["fid"] > 0
    assert 0 <= stored["precision"] <= 1 and stored["inception_score_mean"] > 0
    assert stored["num_samples"] == 6 and stored["feature_extractor"] == "tiny-imagenet"


def test_generate_then_evaluate_keeps_the_samples(make_config, reference):
    generated = run(make_config(*TINY_RUN, f"benchmark.reference={reference}", "stage=generate"))
    cfg = make_config(*TINY_RUN, f"benchmark.reference={reference}", "stage=evaluate")
    samples = Path(cfg.run_dir) / "samples.npz"
    before = samples.read_bytes()
    assert generated["evaluated"] is False and "fid" not in generated
    evaluated = run(cfg)
    assert evaluated["evaluated"] is True and evaluated["fid"] > 0 and samples.read_bytes() == before
    assert evaluated["latency_s_per_batch"] == generated["latency_s_per_batch"]  # the cost record is kept


def test_evaluate_without_a_generation_says_what_to_run(make_config, reference):
    with pytest.raises(FileNotFoundError, match="stage=generate"):
        run(make_config(*TINY_RUN, f"benchmark.reference={reference}", "stage=evaluate"))


def test_missing_or_mismatched_reference_stops_before_generating(make_config, tmp_path, reference):
    missing = make_config(*TINY_RUN, f"benchmark.reference={tmp_path / 'nope.npz'}")
    with pytest.raises(FileNotFoundError, match="VIRTUAL_imagenet256_labeled.npz"):
        run(missing)
    assert not (Path(missing.run_dir) / "samples.npz").exists()
    wrong = make_config(*TINY_RUN, f"benchmark.reference={reference}", "benchmark.resolution=32")
    with pytest.raises(ValueError, match="32"):
        run(wrong)
    assert not (Path(wrong.run_dir) / "tokens.npz").exists()


def test_a_compressed_run_is_paired_with_the_full_run_and_features_are_extracted_once(make_config, reference):
    """The same paired piece as the demo's: FID difference consistent with both records, one extraction per run."""
    TinyExtractor.calls = 0
    full = run(make_config(*TINY_RUN, f"benchmark.reference={reference}", "cache=full", "keep=1"))
    calls_full = TinyExtractor.calls
    window = run(make_config(*TINY_RUN, f"benchmark.reference={reference}", "cache=window", "keep=1/2",
                             "paired.replicates=50"))
    # full: the reference's batch and its samples' batch; window: its samples' only (the rest is cached)
    assert (calls_full, TinyExtractor.calls - calls_full) == (2, 1)
    assert window["partner_run_dir"] is not None and window["partner_reason"] is None
    # the record's FID (scipy's sqrtm) and the bootstrap's (n <= D: its Gram route) differ by rounding, dominated
    # by the square root of eigenvalues that are zero in exact arithmetic: sqrt(n * eps * FID) each
    rounding = 4 * math.sqrt(6 * np.finfo(float).eps * max(window["fid"], full["fid"]))
    assert window["fid_difference"] == pytest.approx(window["fid"] - full["fid"], rel=0, abs=rounding)
    assert window["token_agreement"] < 1 and window["kid"] is not None and full["kid_se"] > 0
    assert window["fid_difference_ci_low"] <= window["fid_difference"] <= window["fid_difference_ci_high"]
    cached = np.load(Path(window["partner_run_dir"]) / "features-tiny-imagenet.npz")
    assert cached["layer_pool"].shape == (6, 16) and cached["layer_logits"].shape == (6, 10)
