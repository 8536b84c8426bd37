"""The quality table of the budget allocations: every policy x allocation x keep against the full cache.

    python scripts/allocation_report.py outputs/demo_fid/demo [--out results] [--name demo_allocations]

Reads every finished run (metrics.json) under the folder, as `make allocations` writes them (conf/experiment/
allocations.yaml: the trained demo model, 400 samples, the same seeds under every policy), and writes
`<name>.csv` (one row per run: policy, allocation, keep, every quality metric the benchmark recorded, the
KV-cache bytes), `<name>.md` (the table, then the allocations' paired differences) and `<name>.png`.

Quality metrics are whatever the runs' records hold: FID, precision and recall from `benchmark=demo_fid`;
KID and the paired metrics against the full-cache partner (`token_agreement`, `psnr`, `fid_difference`, ...
with `_ci_low` / `_ci_high`) where the benchmark recorded them. Where a record has no paired fields this
script computes two itself from the run folders, against the full-cache run of the same seed and count:
`token_agreement` (mean fraction of tokens equal to the full cache's) and `psnr` (dB, from the mean squared
error to the full cache's images over all samples), each with a 95% percentile bootstrap interval over
samples (`--replicates`), and for every non-uniform allocation its paired difference from the uniform
allocation of the same policy and keep (the same resampled samples for both). A difference whose interval
excludes 0 is marked real (`*`). FID differences carry no interval here (that needs the Inception features
of every sample: the benchmark's paired metrics).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from lineareval.api import config_options, policy_names
from lineareval.record import load_record

IDENTITY = ("model", "seed", "num_samples")
QUALITY = ("fid", "precision", "recall", "kid", "token_agreement", "psnr", "ssim", "inception_cosine",
           "fid_difference", "kid_difference")
PAIRED = ("token_agreement", "psnr")


def finished_runs(root: Path) -> list[tuple[dict, Path]]:
    """(record, folder) of every finished single run under `root` (efficiency suites left out)."""
    runs = [(load_record(path.parent), path.parent) for path in sorted(root.rglob("metrics.json"))]
    return [(record, folder) for record, folder in runs if "rows" not in record]


def per_sample(folder: Path, partner: Path) -> dict[str, np.ndarray]:
    """Per sample against the partner's: the fraction of equal tokens and the images' mean squared error."""
    tokens, theirs = (np.load(path / "tokens.npz")["tokens"] for path in (folder, partner))
    images, reference = (np.load(path / "samples.npz")["arr_0"].astype(np.float64) for path in (folder, partner))
    return {"token_agreement": (tokens == theirs).mean(axis=1),
            "squared_error": ((images - reference) ** 2).reshape(len(images), -1).mean(axis=1)}


def psnr(squared_error: np.ndarray) -> np.ndarray:
    """dB from the mean squared error over samples (the last axis), 255 the peak."""
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0**2 / squared_error.mean(axis=-1))


def statistics(samples: dict[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
    """token_agreement and psnr over the resampled `indices` (R, n) (and the point estimate last)."""
    return {"token_agreement": samples["token_agreement"][indices].mean(axis=-1),
            "psnr": psnr(samples["squared_error"][indices])}


def interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    return tuple(float(value) for value in np.percentile(values, [tail, 100 - tail]))


def quality_table(runs: list[tuple[dict, Path]], replicates: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per run; and the paired differences of each non-uniform allocation from the uniform one."""
    full = {tuple(record[key] for key in IDENTITY): folder for record, folder in runs if record["cache"] == "full"}
    rng = np.random.default_rng(seed)
    rows, samples, resampled = [], {}, {}
    for record, folder in runs:
        row = {"policy": record["cache"], "allocation": record.get("budget_allocation", "uniform"),
               "keep": record["keep"], "budget": record["visual_budget"], "num_samples": record["num_samples"],
               "layer_budgets": record.get("layer_budgets"), "kv_cache_mib": record["kv_cache_capacity_bytes"] / 2**20,
               **{key: record[key] for key in record if key.startswith(QUALITY)}, "run_dir": str(folder)}
        partner = full.get(tuple(record[key] for key in IDENTITY))
        if record["cache"] != "full" and partner is not None and "token_agreement" not in record:
            count = record["num_samples"]
            if count not in resampled:
                resampled[count] = rng.integers(0, count, size=(replicates, count))
            samples[folder] = per_sample(folder, partner)
            point = statistics(samples[folder], np.arange(count))
            spread = statistics(samples[folder], resampled[count])
            for name in PAIRED:
                row[name] = float(point[name])
                row[f"{name}_ci_low"], row[f"{name}_ci_high"] = interval(spread[name])
            row["paired_by"] = "allocation_report"
        rows.append(row)
    table = pd.DataFrame(rows)
    return table, allocation_differences(table, samples, resampled)


def allocation_differences(table: pd.DataFrame, samples: dict, resampled: dict) -> pd.DataFrame:
    """Each non-uniform allocation minus the uniform one (same policy and keep), paired over samples."""
    rows = []
    for (policy, keep), group in table[table.policy != "full"].groupby(["policy", "keep"]):
        uniform = group[group.allocation == "uniform"]
        for _, other in group[group.allocation != "uniform"].iterrows():
            if uniform.empty or Path(other.run_dir) not in samples or Path(uniform.run_dir.iloc[0]) not in samples:
                continue
            ours, base = samples[Path(other.run_dir)], samples[Path(uniform.run_dir.iloc[0])]
            count = len(ours["token_agreement"])
            row = {"policy": policy, "keep": keep, "allocation": other.allocation,
                   "fid_difference": other.get("fid", np.nan) - uniform.fid.iloc[0]}
            for name in PAIRED:
                whole = np.arange(count)
                row[name + "_difference"] = float(statistics(ours, whole)[name] - statistics(base, whole)[name])
                spread = statistics(ours, resampled[count])[name] - statistics(base, resampled[count])[name]
                low, high = interval(spread)
                row[f"{name}_difference_ci_low"], row[f"{name}_difference_ci_high"] = low, high
                row[f"{name}_difference_real"] = bool(low > 0 or high < 0)
            rows.append(row)
    return pd.DataFrame(rows)


def ordered(table: pd.DataFrame) -> pd.DataFrame:
    """Rows by keep (largest first), policy (conf/cache/ order) and allocation (conf/budget_allocation/ order)."""
    policies = {name: index for index, name in enumerate(policy_names())}
    allocations = {name: index for index, name in enumerate(
        sorted(config_options("budget_allocation"), key=lambda name: (name != "uniform", name)))}
    keys = table.assign(_keep=-table.budget, _policy=table.policy.map(policies), _allocation=table.allocation.map(
        allocations))
    return keys.sort_values(["_keep", "_policy", "_allocation"]).drop(columns=["_keep", "_policy", "_allocation"])


def markdown(table: pd.DataFrame, differences: pd.DataFrame) -> str:
    """The runs' table, then the allocations' differences from uniform (a * marks an interval excluding 0)."""
    def with_interval(row, name: str, digits: int) -> str:
        if pd.isna(row.get(name, np.nan)):
            return "-"
        low, high = row.get(f"{name}_ci_low", np.nan), row.get(f"{name}_ci_high", np.nan)
        span = "" if pd.isna(low) else f" [{low:.{digits}f}, {high:.{digits}f}]"
        return f"{row[name]:.{digits}f}{span}"

    lines = ["| keep | policy | allocation | FID | precision | recall | token agreement | PSNR to full (dB) | KV MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, row in table.iterrows():
        lines.append(f"| {row.keep} | {row.policy} | {row.allocation} | {row.get('fid', np.nan):.1f} | "
                     f"{row.get('precision', np.nan):.3f} | {row.get('recall', np.nan):.3f} | "
                     f"{with_interval(row, 'token_agreement', 3)} | {with_interval(row, 'psnr', 2)} | "
                     f"{row.kv_cache_mib:.1f} |")
    if differences.empty:
        return "\n".join(lines) + "\n"
    lines += ["", "Allocation minus uniform, same policy and keep (paired over samples, 95% bootstrap; * = interval "
              "excludes 0):", "", "| keep | policy | allocation | FID diff | token agreement diff | PSNR diff (dB) |",
              "|---|---|---|---|---|---|"]
    for _, row in differences.iterrows():
        cells = []
        for name, digits in (("token_agreement", 3), ("psnr", 2)):
            mark = "*" if row[f"{name}_difference_real"] else ""
            cells.append(f"{row[name + '_difference']:+.{digits}f}{mark} [{row[name + '_difference_ci_low']:+.{digits}f}, "
                         f"{row[name + '_difference_ci_high']:+.{digits}f}]")
        lines.append(f"| {row.keep} | {row.policy} | {row.allocation} | {row.fid_difference:+.1f} | {cells[0]} | "
                     f"{cells[1]} |")
    return "\n".join(lines) + "\n"


def figure(table: pd.DataFrame, path: Path) -> None:
    """Per keep: FID (left) and PSNR to the full cache's samples with 95% intervals (right), by policy and
    allocation; the full cache's FID as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compressed = table[table.policy != "full"]
    keeps = list(dict.fromkeys(compressed.keep))
    allocations = list(dict.fromkeys(compressed.allocation))
    fig, axes = plt.subplots(len(keeps), 2, figsize=(12, 3.6 * len(keeps)), squeeze=False)
    width = 0.8 / max(len(allocations), 1)
    for row_axes, keep in zip(axes, keeps):
        at_keep = compressed[compressed.keep == keep]
        policies = list(dict.fromkeys(at_keep.policy))
        for offset, allocation in enumerate(allocations):
            runs = at_keep[at_keep.allocation == allocation].set_index("policy").reindex(policies)
            x = np.arange(len(policies)) + (offset - (len(allocations) - 1) / 2) * width
            row_axes[0].bar(x, runs.get("fid", pd.Series(np.nan, index=runs.index)), width, label=allocation)
            if "psnr" in runs:
                errors = np.vstack([runs.psnr - runs.get("psnr_ci_low", runs.psnr),
                                    runs.get("psnr_ci_high", runs.psnr) - runs.psnr])
                row_axes[1].bar(x, runs.psnr, width, yerr=errors, capsize=2, label=allocation)
        full = table[table.policy == "full"]
        if not full.empty and "fid" in full:
            row_axes[0].axhline(float(full.fid.iloc[0]), color="black", linestyle="--", label="full")
        for axis, title in zip(row_axes, ("FID (lower is better)", "PSNR to the full cache's samples, dB")):
            axis.set_xticks(np.arange(len(policies)), policies)
            axis.set_title(f"keep {keep}: {title}")
        row_axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the runs' folder, e.g. outputs/demo_fid/demo")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--name", default="demo_allocations")
    parser.add_argument("--replicates", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    runs = finished_runs(args.root)
    if not runs:
        raise SystemExit(f"no finished runs (metrics.json) under {args.root}")
    table, differences = quality_table(runs, args.replicates, args.seed)
    table = ordered(table)
    args.out.mkdir(parents=True, exist_ok=True)
    table.drop(columns=["run_dir"]).to_csv(args.out / f"{args.name}.csv", index=False)
    if not differences.empty:
        differences.to_csv(args.out / f"{args.name}_differences.csv", index=False)
    text = markdown(table, differences)
    (args.out / f"{args.name}.md").write_text(text)
    figure(table, args.out / f"{args.name}.png")
    print(text)


if __name__ == "__main__":
    main()
