"""Print one table row per finished run under a folder: `python scripts/summarize.py outputs/...`."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from lineareval.record import find_runs
from lineareval.tables import run_table

COLUMNS = ["model", "cache", "keep", "visual_budget", "weights", "batch_size", "latency_s_per_batch",
           "tokens_per_s", "kv_cache_capacity_mib", "kv_cache_high_water_mib", "peak_memory_mib", "peak_memory_method"]


def summarize(root: Path) -> pd.DataFrame:
    runs = find_runs(root)
    if not runs:
        raise SystemExit(f"no finished runs (metrics.json) under {root}")
    table = run_table(runs)
    for column in ("kv_cache_capacity", "kv_cache_high_water", "peak_memory"):
        table[f"{column}_mib"] = table[f"{column}_bytes"] / 2**20
    return table[COLUMNS].sort_values(["model", "weights", "cache", "visual_budget"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    args = parser.parse_args()
    print(summarize(args.root).to_string(index=False, float_format=lambda value: f"{value:.3g}"))


if __name__ == "__main__":
    main()
