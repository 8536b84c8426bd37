"""scripts/gpu_report.py: its dry run goes through every section of the real report on CPU, so the
prepared GPU command cannot break unnoticed; the budget skips what it cannot cover; targets are judged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_report.py"
SECTIONS = {"xl_compiled": [("full", "1"), ("linear", "1/4"), ("linear", "1/6"), ("window", "1/6")],
            "xl_eager": [("full", "1"), ("linear", "1/6")], "xl_max_batch_full": [("full", "1")],
            "xl_max_batch_linear": [("linear", "1/6")], "janus_compiled": [("full", "1"), ("linear", "1/6")],
            "lumina_compiled": [("full", "1"), ("linear", "1/8")]}


def report(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out"), "--runs",
                           str(tmp_path / "runs"), *args], cwd=ROOT, capture_output=True, text=True, timeout=1200)


def test_dry_run_measures_every_section_with_its_floor(tmp_path):
    done = report(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(tmp_path / "out" / "gpu_dry_run_cpu_efficiency.csv", dtype={"keep": str})
    rows = {section: list(zip(group.cache, group.keep)) for section, group in table.groupby("section", sort=False)}
    assert rows == SECTIONS
    compiled = table.set_index("section").compile
    assert compiled.drop(["xl_eager"]).all() and not compiled.loc["xl_eager"].any()
    assert (table.floor_s > 0).all() and (table.measured_decode_s > 0).all() and (table.generation_s > 0).all()
    assert (table.measured_decode_s < table.generation_s).all()
    assert set(table.model) == {"llamagen_tiny", "janus_pro_1b", "lumina_mgpt_768"}
    summary = (tmp_path / "out" / "gpu_dry_run_cpu_efficiency.md").read_text()
    assert "DRY RUN" in summary and "## Targets" in summary and "LineAR 1/6 vs compiled full" in summary
    assert summary.count("| done |") == len(SECTIONS)
    assert "measured / floor" in summary and "max-batch throughput" in summary


def test_a_budget_too_small_skips_every_section_and_says_so(tmp_path):
    done = report(tmp_path, "--budget-s", "0.01")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (tmp_path / "out" / "gpu_dry_run_cpu_efficiency.md").read_text()
    assert summary.count("| skipped |") == 4  # XL compiled and eager, Janus, Lumina (max batch needs section 1)
    assert "left of the budget" in summary and not (tmp_path / "out" / "gpu_dry_run_cpu_efficiency.csv").exists()


def test_without_a_gpu_the_real_report_refuses_to_start(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "no CUDA device" in done.stderr


def test_targets_are_judged_from_the_rows():
    sys.path.insert(0, str(ROOT / "scripts"))
    from gpu_report import targets

    def row(section, cache, keep, seconds, batch=256, peak=10e9, images=None):
        return {"section": section, "cache": cache, "keep": keep, "generation_s": seconds, "batch_size": batch,
                "peak_memory_bytes": peak, "images_per_s": images or batch / seconds,
                "measured_decode_s": seconds * 0.9, "floor_s": seconds * 0.5}

    table = pd.DataFrame([row("xl_compiled", "full", "1", 9.0), row("xl_compiled", "linear", "1/6", 4.0, peak=15e9),
                          row("xl_eager", "full", "1", 20.0), row("xl_eager", "linear", "1/6", 3.0),
                          row("xl_max_batch_full", "full", "1", 12.0, batch=360),
                          row("xl_max_batch_linear", "linear", "1/6", 20.0, batch=1500)])
    found = {name: (value, met) for name, value, _, met in targets(table)}
    assert found["LineAR 1/6 vs compiled full, XL batch 256"] == ("2.25x", "yes")
    assert found["full compiled: measured / floor"] == ("1.80", "yes")
    assert found["LineAR 1/6 peak memory, XL batch 256"] == ("15.00 GB", "yes")
    assert found["max-batch throughput: LineAR 1/6 (batch 1500) / full (batch 360)"] == ("2.50x", "**no**")
    assert found["full 1: eager / compiled time"] == ("2.22", "yes")
    assert found["linear 1/6: eager / compiled time"] == ("0.75", "**no**")  # compiled slower than eager: flagged
