"""scripts/collect.py turns run folders into results tables, ours beside the paper's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lineareval.runner import run
from record_files import samples_record, write_record

ROOT = Path(__file__).resolve().parents[1]


def test_collect_puts_our_rows_beside_the_papers(make_config, tmp_path, reference_for_collect):
    run(make_config("benchmark=efficiency", "weights=random", "batch_size=2", "model.image_size=128",
                    "benchmark.keeps=[1/4]", "benchmark.warmup=0", "benchmark.policies=[full,linear]"))
    run(make_config("weights=random", "benchmark=imagenet_fid", f"benchmark.reference={reference_for_collect}",
                    "benchmark.extractor=tiny-collect", "benchmark.resolution=64", "num_samples=4", "batch_size=4",
                    "model.image_size=128", "cache=linear", "keep=1/2"))
    out = tmp_path / "results"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "collect.py"), str(tmp_path / "outputs"),
                             "--out", str(out)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 0, result.stderr
    efficiency = pd.read_csv(out / "efficiency.csv", dtype={"keep": str})
    ours = efficiency[efficiency.source == "ours"]
    assert sorted(zip(ours.cache, ours.keep)) == [("full", "1"), ("linear", "1/4")]
    assert (efficiency.source == "paper").sum() == 17 and ours.weights.eq("random").all()
    quality = pd.read_csv(out / "quality.csv", dtype={"keep": str})
    fid = quality[(quality.source == "ours") & (quality.metric == "fid")]
    assert len(fid) == 1 and fid.value.iloc[0] > 0 and fid.benchmark.iloc[0] == "imagenet_fid"
    record = json.loads(next((tmp_path / "outputs").glob("imagenet_fid/**/metrics.json")).read_text())
    assert json.loads(fid.policy.iloc[0]) == record["policy"]  # the LineAR settings: ablation rows differ here
    assert record["policy"] == {"anchors": "line", "recent_lines": 1, "score_source": "line"}
    assert set(quality[quality.source == "paper"].value) == {2.77, 2.68, 23.85, 22.86}
    steps = pd.read_csv(out / "step_latency.csv", dtype={"keep": str})
    assert list(steps.columns) == ["model", "cache", "keep", "batch_size", "step", "seconds", "source", "device_name",
                                   "weights", "run_dir"]
    assert sorted(set(zip(steps.cache, steps.keep))) == [("full", "1"), ("linear", "1/4")]
    assert len(steps) == 2 * 63 and steps.weights.eq("random").all() and steps.source.eq("ours").all()
    assert set(steps.run_dir) == set(ours.run_dir) and set(steps.device_name) == set(ours.device_name)


def load_collect():
    import importlib.util

    spec = importlib.util.spec_from_file_location("collect_script", ROOT / "scripts" / "collect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_collect_keeps_intervals_and_aggregates_seeds(tmp_path):
    """Paired metrics keep their interval; a seed=0,1,2 sweep becomes mean and spread per policy."""
    collect_script = load_collect()
    fids = {0: 10.0, 1: 12.0, 2: 17.0}
    for seed, fid in fids.items():
        folder = tmp_path / "outputs" / f"seed-{seed}"
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text("benchmark:\n  name: demo_fid\n")
        write_record(folder, samples_record(
            model="demo", cache="linear", keep="1/4", seed=seed, num_samples=400, weights="checkpoint",
            policy={"anchors": "line"}, fid=fid, kid=0.01 * seed, kid_se=0.002, fid_difference=fid - 9,
            fid_difference_ci_low=fid - 11, fid_difference_ci_high=fid - 7, bootstrap_confidence=0.95,
            psnr=float("inf")))
    _, quality = collect_script.collect([tmp_path / "outputs"])
    ours = quality[quality.source == "ours"]
    difference = ours[(ours.metric == "fid_difference") & (ours.seed == 1)].iloc[0]
    assert (difference.value, difference.ci_low, difference.ci_high, difference.confidence) == (3.0, 1.0, 5.0, 0.95)
    assert ours[(ours.metric == "kid") & (ours.seed == 2)].se.iloc[0] == 0.002
    spread = collect_script.seed_spread(quality).set_index("metric")
    assert spread.loc["fid", "seeds"] == 3 and spread.loc["fid", "mean"] == 13.0
    assert spread.loc["fid", "std"] == pytest.approx(np.std(list(fids.values()), ddof=1), rel=1e-12)
    assert spread.loc["psnr", "mean"] == np.inf and len(spread) == 4  # fid, kid, fid_difference, psnr


def test_seed_aggregates_never_mix_configurations(tmp_path):
    """Runs of one seed that differ in anything but the seed (an allocation, a decoding method, a sampling
    setting of identity.json) are separate rows of quality_seeds.csv, each over its own seeds."""
    collect_script = load_collect()
    variants = {"uniform": ({}, {}), "pyramid": ({"budget_allocation": "pyramid"}, {}),
                "sjd": ({"decoding": {"name": "sjd", "window": 16}}, {}),
                "cfg2": ({}, {"sampling": {"cfg_scale": 2.0}})}
    for name, (extra, identity_extra) in variants.items():
        for seed in (0, 1):
            folder = tmp_path / "outputs" / name / f"seed-{seed}"
            folder.mkdir(parents=True)
            (folder / "config.yaml").write_text("benchmark:\n  name: demo_fid\n")
            identity = {"config": {"seed": seed, "sampling": {"cfg_scale": 1.75}, **identity_extra}}
            (folder / "identity.json").write_text(json.dumps(identity))
            write_record(folder, samples_record(model="demo", cache="linear", keep="1/4", seed=seed, num_samples=400,
                                                weights="checkpoint", policy={"anchors": "line"},
                                                fid=10.0 + seed + len(name), **extra))
    _, quality = collect_script.collect([tmp_path / "outputs"])
    spread = collect_script.seed_spread(quality)
    assert len(spread) == 4 and set(spread.seeds) == {2}
    assert set(spread.budget_allocation) == {"uniform", "pyramid"} and set(spread.decoding) == {"sequential", "sjd"}
    assert sorted(spread["mean"]) == sorted(10.5 + len(name) for name in variants)
