"""Paired metrics of a run against its full-cache partner: exact self-comparison, partner search, the runner.

The demo model's runs use its real benchmark (offline TF-Inception, held-out crops) at tiny counts.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from lineareval.benchmarks.paired import sample_fidelity
from lineareval.metrics.bootstrap import BootstrapSettings
from lineareval.metrics.paired import fidelity_summary
from lineareval.pairing import find_partner, mismatch
from lineareval.runner import run

TINY_DEMO = ("model=demo", "benchmark=demo_fid", "num_samples=6", "batch_size=6", "benchmark.reference_count=10",
             "paired.replicates=200")


def fake_run(folder: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    np.savez(folder / "tokens.npz", tokens=rng.integers(0, 512, (5, 64)), labels=np.arange(5))
    np.savez(folder / "samples.npz", arr_0=rng.integers(0, 256, (5, 24, 24, 3), np.uint8))
    return folder


def test_a_run_against_itself_is_exact(tmp_path):
    """PSNR inf, SSIM 1, every token equal (first difference: none, i.e. the token count), and features
    with cosine 1 up to the rounding of a dot product over a norm product (a few float64 ulps)."""
    folder = fake_run(tmp_path / "run")
    features = np.random.default_rng(1).gamma(2.0, size=(5, 32))
    per_sample = sample_fidelity(folder, folder, features, features.copy())
    assert "psnr" not in per_sample, "PSNR is pooled from the squared error, not averaged per sample"
    assert np.all(per_sample["squared_error"] == 0) and np.all(per_sample["ssim"] == 1.0)
    assert np.all(per_sample["token_agreement"] == 1.0) and np.all(per_sample["first_difference"] == 64)
    np.testing.assert_allclose(per_sample["inception_cosine"], 1.0, rtol=0, atol=8 * np.finfo(float).eps)
    summary = fidelity_summary(per_sample, BootstrapSettings(replicates=20))
    assert summary["psnr"] == summary["psnr_ci_low"] == summary["psnr_ci_high"] == math.inf
    assert summary["ssim"] == summary["ssim_ci_low"] == summary["ssim_ci_high"] == 1.0
    assert summary["token_agreement"] == summary["identical_samples"] == 1.0
    other = sample_fidelity(folder, fake_run(tmp_path / "other", seed=2), features, features[::-1])
    assert np.all(other["squared_error"] > 255**2 / 10**2) and np.all(other["ssim"] < 0.5)  # PSNR < 20 dB each
    assert np.all(other["token_agreement"] < 0.1)


def write_identity(folder: Path, cache: str, keep: str = "1", seed: int = 0, count: int = 8,
                   finished: bool = True) -> Path:
    folder.mkdir(parents=True)
    identity = {"config": {"cache": {"name": cache}, "keep": keep, "seed": seed, "num_samples": count,
                           "model": {"name": "demo"}},
                "content": {"num_samples": count, "conditions_sha256": f"labels-{count}", "weight_files": [],
                            "resolution": None}}
    (folder / "identity.json").write_text(json.dumps(identity))
    (folder / "samples.npz").write_bytes(b"")
    if finished:
        (folder / "metrics.json").write_text("{}")
    return folder


def test_the_partner_is_the_finished_full_run_of_the_same_samples(tmp_path):
    root = tmp_path / "outputs"
    run_dir = write_identity(root / "linear", "linear", "1/4")
    assert "no finished full-cache run" in find_partner(run_dir, root).reason
    write_identity(root / "a_unfinished", "full", finished=False)
    write_identity(root / "b_other_seed", "full", seed=1)
    write_identity(root / "c_more_samples", "full", count=16)
    write_identity(root / "d_window", "window", "1/4")
    assert find_partner(run_dir, root).run_dir is None
    assert "seed: 1 (stored) -> 0 (now)" in mismatch(json.loads((run_dir / "identity.json").read_text()),
                                                     root / "b_other_seed")
    partner = write_identity(root / "e_full", "full")
    assert find_partner(run_dir, root) == find_partner(run_dir, root, str(partner))
    assert find_partner(run_dir, root).run_dir == partner and find_partner(run_dir, root).reason is None
    assert "the full-cache run" in find_partner(partner, root).reason
    named = find_partner(run_dir, root, str(root / "c_more_samples"))
    assert named.run_dir is None and "num_samples: 16 (stored) -> 8 (now)" in named.reason


def test_runs_record_why_they_have_no_partner_then_pair_with_the_full_run(make_config, tmp_path, monkeypatch):
    """linear first (no partner yet: a reason, KID alone), then full, then stage=evaluate on linear: paired
    fields, consistent with both records, from cached features only (no Inception network is built). A
    named folder that does not pair, and paired.partner=none, are recorded with their reason, not fatal."""
    compressed = run(make_config(*TINY_DEMO, "cache=linear", "keep=1/4"))
    assert compressed["partner_run_dir"] is None and "cache=full keep=1" in compressed["partner_reason"]
    assert compressed["kid_se"] > 0 and "fid_difference" not in compressed and "token_agreement" not in compressed
    full = run(make_config(*TINY_DEMO, "cache=full", "keep=1"))
    assert "full-cache run" in full["partner_reason"]

    def no_network(*args, **kwargs):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr("lineareval.metrics.run_features.build_extractor", no_network)
    monkeypatch.setattr("lineareval.metrics.fid.build_extractor", no_network)
    cfg = make_config(*TINY_DEMO, "cache=linear", "keep=1/4", "stage=evaluate")
    paired = run(cfg)
    assert Path(paired["partner_run_dir"]) == Path(make_config(*TINY_DEMO, "cache=full", "keep=1").run_dir)
    assert paired["partner_reason"] is None and paired["fid"] == compressed["fid"]
    # the record's FID (demo_fid's low-rank formula) and the bootstrap's (its Gram route) differ by rounding,
    # dominated by the square root of the eigenvalue that centring leaves at zero: sqrt(n * eps * FID) each
    rounding = 4 * math.sqrt(6 * np.finfo(float).eps * max(paired["fid"], full["fid"]))
    assert paired["fid_difference"] == pytest.approx(paired["fid"] - full["fid"], rel=0, abs=rounding)
    assert paired["kid_difference"] == pytest.approx(paired["kid"] - full["kid"], rel=1e-9, abs=1e-12)
    for name in ("fid_difference", "kid_difference", "precision_difference", "token_agreement", "psnr", "ssim",
                 "inception_cosine", "first_difference"):
        assert paired[f"{name}_ci_low"] <= paired[name] <= paired[f"{name}_ci_high"], name
    assert 0 < paired["token_agreement"] < 1 and paired["first_difference"] < 256 and paired["ssim"] < 1
    assert paired["bootstrap_replicates"] == 200 and paired["recall_difference_reason"]
    assert json.loads((Path(cfg.run_dir) / "metrics.json").read_text())["evaluated_fields"] == sorted(
        set(paired) - set(compressed) | set(compressed["evaluated_fields"]))
    run_dir = Path(cfg.run_dir)
    elsewhere = tmp_path / "copied_run"
    shutil.copytree(run_dir, elsewhere)
    named = run(make_config(*TINY_DEMO, "cache=linear", "keep=1/4", "stage=evaluate", f"paired.partner={elsewhere}"))
    assert named["partner_run_dir"] is None and "is not a full-cache run (cache=linear)" in named["partner_reason"]
    assert "fid_difference" not in named and named["fid"] == paired["fid"]  # the earlier paired fields are gone
    off = run(make_config(*TINY_DEMO, "cache=linear", "keep=1/4", "stage=evaluate", "paired.partner=none"))
    assert off["partner_reason"].startswith("paired.partner=none") and off["kid"] == paired["kid"]
    with pytest.raises(ValueError, match="paired.replicates"):
        run(make_config(*TINY_DEMO, "cache=linear", "keep=1/4", "paired.replicates=1"))


def test_a_budget_allocation_is_paired_with_the_uniform_full_run(make_config, tmp_path):
    """`budget_allocation` spreads a policy's budget like `keep` sizes it: a pyramid run of the same
    samples pairs with the (uniform) full-cache run; a decoding method changes the samples, so it does not."""
    from lineareval.identity import config_identity

    def folder(name: str, *overrides: str) -> Path:
        cfg = make_config(*TINY_DEMO, *overrides)
        path = tmp_path / name
        path.mkdir()
        identity = {"config": config_identity(cfg), "content": {"num_samples": 6, "conditions_sha256": "x"}}
        (path / "identity.json").write_text(json.dumps(identity))
        (path / "metrics.json").write_text("{}")
        (path / "samples.npz").write_bytes(b"")
        return path

    full = folder("full", "cache=full", "keep=1")
    pyramid = json.loads((folder("pyramid", "cache=linear", "keep=1/4", "budget_allocation=pyramid")
                          / "identity.json").read_text())
    assert mismatch(pyramid, full) is None
    sjd = json.loads((folder("sjd", "cache=linear", "keep=1/4", "decoding=sjd") / "identity.json").read_text())
    assert "decoding" in mismatch(sjd, full)
