"""scripts/decoding_sweep.py: the commands it runs, the crossover it reads off, and its tiny mode end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import decoding_sweep  # noqa: E402


def test_dry_run_prints_one_efficiency_run_per_model_and_batch(capsys, tmp_path):
    assert decoding_sweep.main(["--dry-run", "--models", "demo,llamagen_b", "--batches", "1,4", "--runs",
                                str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()
    assert "benchmark.decodings=[sequential,sjd,sjd_pp,gsd,mc_sjd]" in lines[0]
    assert "benchmark.rows=[full,linear@1/4,linear@1/6]" in lines[0]
    assert "model=llamagen_b weights=random" in lines[3] and "batch_size=4" in lines[3]
    assert "model=demo weights=checkpoint" in lines[0] and "batch_size=1" in lines[0]


def test_a_sweep_without_sequential_is_refused():
    with pytest.raises(SystemExit):
        decoding_sweep.parse(["--decodings", "sjd,mc_sjd"])


def synthetic(seconds: dict[str, list[float]], batches=(1, 2, 4, 8)) -> pd.DataFrame:
    rows = [{"model": "demo", "batch_size": batch, "decoding": decoding, "cache": "full", "keep": "1",
             "generation_s": value, "device_name": "cpu"}
            for decoding, values in seconds.items() for batch, value in zip(batches, values)]
    return pd.DataFrame(rows)


def test_the_crossover_is_the_first_batch_after_the_last_win(tmp_path):
    run_dirs = []
    table = synthetic({"sequential": [1.0, 1.2, 1.6, 2.4], "sjd": [0.5, 1.1, 1.7, 3.0], "gsd": [2.0, 3.0, 4.0, 5.0],
                       "mc_sjd": [0.4, 0.5, 0.8, 1.2]})
    for batch, group in table.groupby("batch_size"):
        run_dir = tmp_path / f"batch-{batch}"
        run_dir.mkdir()
        group.to_csv(run_dir / "efficiency.csv", index=False)
        run_dirs.append(run_dir)
    gathered = decoding_sweep.gather(run_dirs)
    assert gathered.latency_per_image_s.tolist()[:2] == [1.0, 0.5]  # batch 1: sequential, then sjd
    crossover = decoding_sweep.crossovers(gathered).set_index("decoding")
    assert crossover.loc["sjd", "crossover_batch"] == "4" and crossover.loc["sjd", "largest_winning_batch"] == 2
    assert crossover.loc["gsd", "crossover_batch"] == "never"
    assert crossover.loc["mc_sjd", "crossover_batch"] == "" and crossover.loc["mc_sjd", "best_speedup"] == 2.5


def test_tiny_mode_writes_the_table_crossover_and_figure(tmp_path):
    out = tmp_path / "out"
    table = decoding_sweep.main(["--tiny", "--runs", str(tmp_path / "runs"), "--out", str(out), "--name", "sweep"])
    assert sorted(zip(table.batch_size, table.decoding)) == [(1, "mc_sjd"), (1, "sequential"), (2, "mc_sjd"),
                                                            (2, "sequential")]
    sequential = table[table.decoding == "sequential"]
    assert (sequential.decode_passes_per_image == 255).all() and (sequential.speedup_vs_sequential == 1).all()
    assert (table[table.decoding == "mc_sjd"].decode_passes_per_image < 200).all()
    assert (table.latency_per_image_s * table.batch_size == table.generation_s).all()
    assert table.device_name.notna().all() and (table.peak_memory_bytes > 0).all()
    written = pd.read_csv(out / "sweep.csv", dtype={"keep": str})
    assert len(written) == 4 and (out / "sweep.png").stat().st_size > 0
    assert len(pd.read_csv(out / "sweep_crossover.csv")) == 1


def test_passes_dry_run_lists_every_variant_on_the_full_cache_and_linear(capsys, tmp_path):
    assert decoding_sweep.main(["--passes", "--dry-run", "--runs", str(tmp_path)]) is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(decoding_sweep.PASS_VARIANTS) and all("benchmark=samples" in line for line in lines)
    assert any("decoding=mc_sjd" in line and "decoding.coupling=gumbel" in line for line in lines)
    linear = [line for line in lines if "cache=linear keep=1/4" in line]
    assert len(linear) == sum(label.startswith("linear") for label in decoding_sweep.PASS_VARIANTS) >= 2
    assert sum("cache=" in line for line in lines) == len(linear) and not any(tmp_path.iterdir())
    assert all(line.split("run_dir=")[1].count("/") == str(tmp_path).count("/") + 2 for line in lines)  # one folder
