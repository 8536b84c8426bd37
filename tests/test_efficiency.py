"""benchmark=efficiency: every policy on the same batch in one process, ratios against full."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from conftest import CACHE_CONFIGS
from lineareval.runner import run


def test_efficiency_table_has_every_policy_and_ratios(make_config):
    cfg = make_config("benchmark=efficiency", "weights=random", "batch_size=2", "model.image_size=128",
                      "benchmark.keeps=[1/4,1/2]", "benchmark.warmup=0")
    record = run(cfg)
    rows = {(row["cache"], row["keep"]): row for row in record["rows"]}
    expected = {("full", "1")} | {(name, keep) for name in CACHE_CONFIGS if name != "full" for keep in ("1/4", "1/2")}
    assert set(rows) == expected
    assert rows["full", "1"]["speedup"] == 1.0 and rows["full", "1"]["visual_budget"] == 64
    for (name, keep), row in rows.items():
        assert row["batch_size"] == 2 and row["sequences"] == 4 and row["generation_s"] > 0
        assert row["speedup"] == rows["full", "1"]["generation_s"] / row["generation_s"]
        if name != "full":
            assert row["kv_cache_capacity_bytes"] < rows["full", "1"]["kv_cache_capacity_bytes"]
            assert row["visual_budget"] == {"1/4": 16, "1/2": 32}[keep]
    table = pd.read_csv(Path(cfg.run_dir) / "efficiency.csv")
    assert len(table) == len(expected) and set(table.device_name) == {record["device_name"]}
    assert json.loads((Path(cfg.run_dir) / "metrics.json").read_text())["rows"] == json.loads(json.dumps(record["rows"]))
    assert run(cfg) == json.loads(json.dumps(record))  # finished: skipped on rerun
