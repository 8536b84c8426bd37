"""Gather every finished run under the output folders into the tables of `results/`, beside the paper's.

    python scripts/collect.py [outputs ...] [--out results]

Writes `efficiency.csv` (benchmark=efficiency rows plus the paper's efficiency table) and
`quality.csv` (one row per metric of imagenet_fid / coco_fid / dpg / demo_fid runs plus the paper's
reported numbers; `policy` holds the run's policy settings as JSON, which tells the ablation rows apart).
Quality rows carry the run's `seed`, and for the metrics that have them the bootstrap interval
(`ci_low`, `ci_high`: percentile, `confidence`) or standard error (`se`, KID's): the paired metrics
against the full-cache partner (`*_difference`, `token_agreement`, `psnr`, ...; lineareval/benchmarks/paired.py).
`quality_seeds.csv` aggregates our rows over seeds (a `seed=0,1,2` sweep): per benchmark, model, policy,
keep, settings, sample count, weights and metric, the mean, the standard deviation over seeds (ddof=1;
empty for one seed), min, max and the number of seeds.
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

from lineareval.identity import digest
from lineareval.record import find_runs
from lineareval.runfolder import IDENTITY_FILE
from lineareval.tables import run_row

QUALITY_METRICS = ("fid", "fid_adm_stats", "precision", "recall", "inception_score_mean", "clip_score", "dpg_score",
                   "dpg_entity", "dpg_attribute", "dpg_relation", "dpg_global", "dpg_other", "kid")
# Against the full-cache partner of the same samples (lineareval/benchmarks/paired.py)
PAIRED_METRICS = ("fid_difference", "kid_difference", "precision_difference", "recall_difference", "token_agreement",
                  "first_difference", "identical_samples", "psnr", "ssim", "inception_cosine")
# A seed aggregate is over runs equal in everything but the seed: the readable keys and `setting`, a digest of
# the run's identity.json config without its seed (sampling, decoding, allocation, model, benchmark, ...)
SEED_KEYS = ["benchmark", "model", "cache", "keep", "policy", "budget_allocation", "decoding", "num_samples",
             "weights", "setting", "metric"]
PAPER = Path(__file__).resolve().parents[1] / "results" / "paper"


def collect(roots: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    efficiency, quality = [], []
    for record, folder in find_runs(*roots, kinds=("samples", "suite", "external")):
        if record.kind == "suite":
            origin = {"source": "ours", "device_name": record.device_name, "weights": record.weights,
                      "run_dir": str(folder)}
            efficiency += [{**row, "peak_memory_gb": row["peak_memory_bytes"] / 1e9, **origin} for row in record.rows]
            continue
        benchmark = OmegaConf.load(folder / "config.yaml").benchmark.name
        quality += quality_rows(run_row(record, folder), benchmark, setting(folder))
    efficiency_table = pd.concat([pd.DataFrame(efficiency), pd.read_csv(PAPER / "efficiency.csv", dtype={"keep": str})])
    quality_table = pd.concat([pd.DataFrame(quality), pd.read_csv(PAPER / "quality.csv", dtype={"keep": str})])
    return efficiency_table, quality_table


def quality_rows(run: dict, benchmark: str, setting: str) -> list[dict]:
    """One row per quality metric of a run (`run`: its row of lineareval.tables.run_table), with the metric's
    interval or standard error where it has one."""
    keys = {"benchmark": benchmark, "model": run["model"], "cache": run["cache"], "keep": run["keep"],
            "policy": json.dumps(run["policy"], sort_keys=True),
            **{key: run[key] for key in ("seed", "budget_allocation", "decoding", "num_samples")}}
    origin = {"source": "ours", "device_name": run["device_name"], "weights": run["weights"], "run_dir": run["run_dir"],
              "setting": setting}
    return [{**keys, "metric": metric, "value": run[metric], "ci_low": run.get(f"{metric}_ci_low"),
             "ci_high": run.get(f"{metric}_ci_high"), "se": run.get(f"{metric}_se"),
             "confidence": run.get("bootstrap_confidence") if f"{metric}_ci_low" in run else None, **origin}
            for metric in QUALITY_METRICS + PAIRED_METRICS if run.get(metric) is not None]


def setting(run_dir: Path) -> str:
    """A digest of what sampled the run but its seed (identity.json's config); "" for runs without one."""
    path = run_dir / IDENTITY_FILE
    if not path.is_file():
        return ""
    config = {key: value for key, value in json.loads(path.read_text())["config"].items() if key != "seed"}
    return digest(config, 8)


def seed_spread(quality: pd.DataFrame) -> pd.DataFrame:
    """Our quality rows aggregated over seeds: mean, standard deviation over seeds, min, max, count."""
    ours = quality[quality.source == "ours"] if "source" in quality else quality.iloc[:0]
    if ours.empty:
        return pd.DataFrame(columns=[*SEED_KEYS, "mean", "std", "min", "max", "seeds"])
    ours = ours.assign(**{key: ours[key].fillna("") for key in ("weights", "policy", "setting")})
    grouped = ours.groupby(SEED_KEYS, sort=False, dropna=False)
    table = grouped.value.agg(["mean", "std", "min", "max"]).join(grouped.seed.nunique().rename("seeds"))
    return table.reset_index()


STEP_COLUMNS = ["model", "cache", "keep", "batch_size", "step", "seconds", "source", "device_name", "weights",
                "run_dir"]


def collect_step_latency(roots: list[Path]) -> pd.DataFrame:
    """The `step_latency.csv` of every finished efficiency run, with where each row came from."""
    tables = []
    for record, folder in find_runs(*roots, kinds=("suite",)):
        steps = folder / "step_latency.csv"
        if not steps.exists():
            continue
        tables.append(pd.read_csv(steps, dtype={"keep": str}).assign(
            source="ours", device_name=record.device_name, weights=record.weights, run_dir=str(folder)))
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
    seed_spread(quality).to_csv(args.out / "quality_seeds.csv", index=False)
    steps = collect_step_latency(args.roots)
    steps.to_csv(args.out / "step_latency.csv", index=False)
    print(f"{(efficiency.source == 'ours').sum()} efficiency rows and {(quality.source == 'ours').sum()} quality "
          f"rows of ours (plus the paper's), {len(steps)} step latencies -> {args.out}")


if __name__ == "__main__":
    main()
