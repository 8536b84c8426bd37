"""Gather every finished run under the output folders into the tables of `results/`, beside the paper's.

    python scripts/collect.py [outputs ...] [--out results]

Writes `efficiency.csv` (benchmark=efficiency rows plus the paper's efficiency table) and
`quality.csv` (one row per metric of imagenet_fid / coco_fid / dpg runs plus the paper's reported
numbers; `policy` holds the run's policy settings as JSON, which tells the ablation rows apart).
Every row says where it came from: `source` is `ours` or `paper`, and ours carry the device, the
weights (checkpoint or random) and the run folder. `step_latency.csv` gathers the per-step decode
times of every efficiency run (model, cache, keep, batch_size, step, seconds, plus the same origin).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from lineareval.record import load_record

QUALITY_METRICS = ("fid", "fid_adm_stats", "precision", "recall", "inception_score_mean", "clip_score", "dpg_score",
                   "dpg_entity", "dpg_attribute", "dpg_relation", "dpg_global", "dpg_other")
PAPER = Path(__file__).resolve().parents[1] / "results" / "paper"


def collect(roots: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    efficiency, quality = [], []
    for path in sorted(path for root in roots for path in root.rglob("metrics.json")):
        record, config = load_record(path), OmegaConf.load(path.parent / "config.yaml")
        origin = {"source": "ours", "device_name": record.get("device_name"), "weights": record.get("weights"),
                  "run_dir": str(path.parent)}
        if "rows" in record:
            efficiency += [{**row, "peak_memory_gb": row["peak_memory_bytes"] / 1e9, **origin} for row in record["rows"]]
            continue
        quality += [{"benchmark": config.benchmark.name, "model": record["model"], "cache": record["cache"],
                     "keep": record["keep"], "policy": json.dumps(record.get("policy"), sort_keys=True),
                     "metric": metric, "value": record[metric], "num_samples": record["num_samples"], **origin}
                    for metric in QUALITY_METRICS if record.get(metric) is not None]
    efficiency_table = pd.concat([pd.DataFrame(efficiency), pd.read_csv(PAPER / "efficiency.csv", dtype={"keep": str})])
    quality_table = pd.concat([pd.DataFrame(quality), pd.read_csv(PAPER / "quality.csv", dtype={"keep": str})])
    return efficiency_table, quality_table


STEP_COLUMNS = ["model", "cache", "keep", "batch_size", "step", "seconds", "source", "device_name", "weights",
                "run_dir"]


def collect_step_latency(roots: list[Path]) -> pd.DataFrame:
    """The `step_latency.csv` of every finished efficiency run, with where each row came from."""
    tables = []
    for path in sorted(path for root in roots for path in root.rglob("metrics.json")):
        steps = path.parent / "step_latency.csv"
        if not steps.exists():
            continue
        record = load_record(path)
        tables.append(pd.read_csv(steps, dtype={"keep": str}).assign(
            source="ours", device_name=record.get("device_name"), weights=record.get("weights"),
            run_dir=str(path.parent)))
    return pd.concat(tables, ignore_index=True)[STEP_COLUMNS] if tables else pd.DataFrame(columns=STEP_COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="*", type=Path, default=[Path("outputs")])
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    efficiency, quality = collect(args.roots)
    args.out.mkdir(parents=True, exist_ok=True)
    efficiency.to_csv(args.out / "efficiency.csv", index=False)
    quality.to_csv(args.out / "quality.csv", index=False)
    steps = collect_step_latency(args.roots)
    steps.to_csv(args.out / "step_latency.csv", index=False)
    print(f"{(efficiency.source == 'ours').sum()} efficiency rows and {(quality.source == 'ours').sum()} quality "
          f"rows of ours (plus the paper's), {len(steps)} step latencies -> {args.out}")


if __name__ == "__main__":
    main()
