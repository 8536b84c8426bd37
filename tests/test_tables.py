"""lineareval/tables.py: one table of finished runs, the one every report reads its runs through."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pandas as pd
import pytest

from lineareval import record as record_module
from lineareval.record import find_runs
from lineareval.tables import RUN_COLUMNS, run_table
from record_files import SAMPLES_RECORD, samples_record, write_record

ROOT = Path(__file__).resolve().parents[1]
# What reads run records: each goes through find_runs and the run table
READERS = ("scripts/collect.py", "scripts/demo_report.py", "scripts/allocation_report.py", "scripts/summarize.py",
           "notebooks/figures.py")


def load_script(name: str, monkeypatch):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def write_runs(root: Path) -> None:
    """An old record (before decoding and allocation were recorded), a pyramid SJD one, an efficiency suite
    and an external evaluation, each with the config.yaml collect reads."""
    runs = {"old": samples_record(legacy=True, cache="full", keep="1", visual_budget=64, fid=20.0),
            "new": samples_record(decoding={"name": "sjd", "window": 16}, budget_allocation="pyramid",
                                  layer_budgets=[20, 12], fid=21.5, token_agreement=0.5,
                                  token_agreement_ci_low=0.4, token_agreement_ci_high=0.6),
            "suite": {key: SAMPLES_RECORD[key] for key in ("model", "weights", "dtype", "device", "device_name",
                                                           "git_commit", "git_dirty", "versions")}
            | {"benchmark": "efficiency", "rows": [{"model": "llamagen_tiny", "cache": "full", "keep": "1",
                                                    "peak_memory_bytes": 10**9}]},
            "external": {"benchmark": "dpg", "model": "external", "cache": None, "keep": None, "num_samples": None,
                         "seed": 0, "device_name": "cpu", "git_commit": "abc", "git_dirty": False, "versions": {},
                         "dpg_score": 0.75}}
    benchmarks = {"old": "demo_fid", "new": "demo_fid", "suite": "efficiency", "external": "dpg"}
    for name, record in runs.items():
        write_record(root / name, record)
        (root / name / "config.yaml").write_text(f"benchmark:\n  name: {benchmarks[name]}\n")


def test_one_row_per_run_with_the_standard_columns_first(tmp_path):
    write_runs(tmp_path)
    table = run_table(find_runs(tmp_path))
    assert tuple(table.columns[:len(RUN_COLUMNS)]) == RUN_COLUMNS and table.columns[-1] == "run_dir"
    old, new = table.set_index("run_dir").loc[[str(tmp_path / "old"), str(tmp_path / "new")]].to_dict("records")
    assert (old["cache"], old["keep"], old["decoding"], old["budget_allocation"]) == ("full", "1", "sequential",
                                                                                     "uniform")
    assert old["layer_budgets"] is None and old["decoding_parameters"] == {} and old["fid"] == 20.0
    assert (new["decoding"], new["decoding_parameters"], new["budget_allocation"]) == ("sjd", {"window": 16}, "pyramid")
    assert new["layer_budgets"] == [20, 12] and new["token_agreement_ci_high"] == 0.6
    assert new["policy"] == SAMPLES_RECORD["policy"] and new["visual_budget"] == 16 and new["seed"] == 0
    assert pd.isna(old["token_agreement"])  # a metric one run has and the other not
    assert len(table) == 2  # one run's samples only: find_runs leaves the suite and the external evaluation out
    assert list(run_table([]).columns) == [*RUN_COLUMNS, "run_dir"]


def test_an_external_evaluation_has_no_policy_budget_or_decoding(tmp_path):
    write_runs(tmp_path)
    (row,) = run_table(find_runs(tmp_path, kinds=("external",))).to_dict("records")
    assert (row["model"], row["dpg_score"], row["seed"]) == ("external", 0.75, 0)
    assert all(row[column] is None for column in ("cache", "keep", "budget_allocation", "decoding", "num_samples"))


def test_every_report_takes_the_decoding_and_allocation_of_an_old_record_from_the_one_default(tmp_path, monkeypatch):
    """With LEGACY_DEFAULTS changed, every report shows the changed names for the old record (and the recorded
    ones for the new): none of them re-derives a default itself."""
    write_runs(tmp_path)
    monkeypatch.setattr(record_module, "LEGACY_DEFAULTS", {"decoding": {"name": "D0"}, "budget_allocation": "A0"})
    _, quality = load_script("collect", monkeypatch).collect([tmp_path])
    ours = quality[quality.source == "ours"].astype({"decoding": object, "budget_allocation": object})
    names = {Path(run_dir).name: set(zip(rows.metric, rows.decoding.fillna("-"), rows.budget_allocation.fillna("-")))
             for run_dir, rows in ours.groupby("run_dir")}
    assert names == {"old": {("fid", "D0", "A0")},
                     "new": {("fid", "sjd", "pyramid"), ("token_agreement", "sjd", "pyramid")},
                     "external": {("dpg_score", "-", "-")}}  # no model ran: no decoding or allocation to claim
    report = load_script("allocation_report", monkeypatch)
    table = report.quality_table(report.finished_runs(tmp_path))
    assert list(zip(table.policy, table.allocation, table.decoding)) == [("linear", "pyramid", "sjd"),
                                                                        ("full", "A0", "D0")]
    demo = load_script("demo_report", monkeypatch)
    assert list(demo.table(demo.finished_runs(tmp_path, seed=0)).policy) == ["full", "linear"]


def test_suites_reach_the_efficiency_table_and_no_report_of_runs(tmp_path, monkeypatch):
    write_runs(tmp_path)
    efficiency, _ = load_script("collect", monkeypatch).collect([tmp_path])
    ours = efficiency[efficiency.source == "ours"]
    assert list(ours.run_dir) == [str(tmp_path / "suite")] and list(ours.peak_memory_gb) == [1.0]
    report = load_script("allocation_report", monkeypatch)
    assert sorted(folder.name for _, folder in report.finished_runs(tmp_path)) == ["new", "old"]
    summary = load_script("summarize", monkeypatch).summarize(tmp_path)
    assert list(summary.cache) == ["full", "linear"] and list(summary.kv_cache_capacity_mib) == [4096 / 2**20] * 2


@pytest.mark.parametrize("path", READERS)
def test_readers_of_records_go_through_the_typed_record_and_the_run_table(path):
    """No reader opens metrics.json itself, tells a suite by a `rows` key or supplies a default decoding or
    allocation: those live in lineareval/record.py alone."""
    source = (ROOT / path).read_text()
    assert "find_runs" in source and re.search(r"\brun_(table|row)\(", source)
    forbidden = [r'"rows" (not )?in', r'\.get\("decoding"', r'\.get\("budget_allocation"', r'"name", "sequential"',
                 r'rglob\("metrics\.json"\)', r'"metrics\.json"\)\.read_text', r"load_record\("]
    assert [pattern for pattern in forbidden if re.search(pattern, source)] == []


def test_the_allocation_report_names_a_run_by_the_policy_settings_it_changed(monkeypatch):
    """An ablation (`cache.sink_recent=16`) is its own row and comparison base, `ssd[sink_recent=16]`; the defaults,
    and a record written before a setting existed, read as the policy's plain name."""
    report = load_script("allocation_report", monkeypatch)
    assert report.policy_label("ssd", {"margin_boost": 2.0, "sink_recent": 0}) == "ssd"
    assert report.policy_label("ssd", {"margin_boost": 2.0}) == "ssd"
    assert report.policy_label("ssd", {"margin_boost": 2.0, "sink_recent": 16}) == "ssd[sink_recent=16]"
    assert report.policy_label("ssd", {"margin_boost": 1.0, "sink_recent": 16}) == "ssd[margin_boost=1.0 sink_recent=16]"
    assert report.policy_label("linear", None) == "linear"
