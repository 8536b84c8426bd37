"""scripts/collect.py turns run folders into results tables, ours beside the paper's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from lineareval.runner import run

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
