"""The quality table of the budget allocations: every policy x allocation x keep against the full cache.

    python scripts/allocation_report.py outputs/demo_fid/demo [--out results] [--name demo_allocations]
    python scripts/allocation_report.py ROOT --compare decoding   # each decoding method against sequential
    python scripts/allocation_report.py ROOT --compare policy     # each policy against LineAR, same keep
    python scripts/allocation_report.py ROOT --compare policy --base ssd --where "policy=ssd,ssd[sink_recent=16]"

Reads every finished run (metrics.json) under the folder, as `make allocations` writes them (conf/experiment/
allocations.yaml: the trained demo model, 400 samples, the same seeds under every policy), and writes
`<name>.csv` (one row per run: policy, allocation, keep, FID, KID, the paired metrics against the full-cache
partner that the benchmark recorded, the KV-cache bytes), `<name>_differences.csv` (each non-uniform
allocation against the uniform one of the same policy and keep), `<name>.md` and `<name>.png`. With
`--compare decoding` the differences are each decoding method's (SJD, SJD++, GSD) against sequential decoding
of the same policy, keep and allocation, and the table adds forward passes per image, tokens per pass, the
drafts' acceptance rate and images/s. Sample i of two decoding methods has the same class but independent
draws; pairs (i) are still independent across i, so resampling indices jointly remains a valid bootstrap of
the difference (the pairing then only removes the class-mix noise).

Every number comes from the library: the runs' records (lineareval/benchmarks/paired.py) and, for the
allocation-minus-uniform differences, `metrics.paired.distribution_summary` on the two runs' cached
Inception features (same samples, so the bootstrap resamples sample indices jointly, exactly as against
full). A `*` marks a difference whose 95% interval excludes 0.

A run whose policy settings differ from its conf/cache/<name>.yaml (an ablation: `cache.sink_recent=16`) is its
own policy, `ssd[sink_recent=16]`; `--base` compares every run with another base value than the default one
(the ablation against the SSD defaults: `--compare policy --base ssd`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from lineareval.api import config_options
from lineareval.record import RunRecord, find_runs
from lineareval.tables import run_table

CACHE_CONF = Path(__file__).resolve().parents[1] / "conf" / "cache"

# Against the full-cache partner (recorded by the benchmark), each with `_ci_low` / `_ci_high`
AGAINST_FULL = ("fid_difference", "kid_difference", "token_agreement", "psnr", "ssim", "inception_cosine")
DIFFERENCES = ("fid", "kid", "precision")  # variant minus base, paired over samples
# --compare: column -> its base value (policy: every policy against LineAR at the same keep)
COMPARED = {"allocation": "uniform", "decoding": "sequential", "policy": "linear"}
# The table's columns: run_table's column -> its name here
RUN_FIELDS = {"cache": "policy", "budget_allocation": "allocation", "decoding": "decoding", "keep": "keep",
              "seed": "seed", "visual_budget": "budget", "num_samples": "num_samples", "layer_budgets": "layer_budgets",
              "fid": "fid", "kid": "kid", "kid_se": "kid_se",
              **{f"{name}{end}": f"{name}{end}" for name in AGAINST_FULL for end in ("", "_ci_low", "_ci_high")},
              **{name: name for name in ("partner_reason", "decode_passes_per_image", "tokens_per_pass",
                                         "draft_acceptance", "images_per_s")}}


def finished_runs(root: Path) -> list[tuple[RunRecord, Path]]:
    """(record, folder) of every finished single run under `root` (efficiency suites left out)."""
    return find_runs(root)


def policy_label(cache: str, settings) -> str:
    """`cache`, with the settings its run changed from conf/cache/<cache>.yaml: `ssd[sink_recent=16]` (a
    setting the YAML lacks, or a record without settings, reads as the default)."""
    path = CACHE_CONF / f"{cache}.yaml"
    if not isinstance(settings, dict) or not path.is_file():
        return cache
    defaults = OmegaConf.to_container(OmegaConf.load(path))
    changed = [f"{key}={value}" for key, value in sorted(settings.items())
               if key in defaults and value != defaults[key]]
    return f"{cache}[{' '.join(changed)}]" if changed else cache


def quality_table(runs: list[tuple[RunRecord, Path]]) -> pd.DataFrame:
    """One row per run: what its record says, with the allocation and the KV-cache size."""
    runs = run_table(runs)
    runs = runs.assign(cache=[policy_label(cache, settings) for cache, settings in zip(runs.cache, runs.policy)])
    table = runs.reindex(columns=list(RUN_FIELDS)).rename(columns=RUN_FIELDS)
    return table.assign(kv_cache_mib=runs.kv_cache_capacity_bytes / 2**20, run_dir=runs.run_dir)


def benchmark_of(run_dir: Path):
    """The image benchmark that scored `run_dir`, rebuilt from its resolved config.yaml."""
    from lineareval.config import call_target

    return call_target(OmegaConf.load(run_dir / "config.yaml").benchmark, exclude=("name",))


def variant_differences(table: pd.DataFrame, replicates: int, seed: int, compare: str = "allocation",
                        base_value: str | None = None) -> pd.DataFrame:
    """Each run minus the run of the base value of `compare` (uniform allocation, sequential decoding, linear;
    or `base_value`) of the same policy, keep, seed, sample count and the other compared column."""
    from lineareval.metrics.bootstrap import BootstrapSettings
    from lineareval.metrics.paired import distribution_summary

    settings = BootstrapSettings(replicates=replicates, seed=seed)
    base_value, rows = base_value or COMPARED[compare], []
    key = [column for column in ("policy", "keep", "seed", "num_samples", "allocation", "decoding") if column != compare]
    for values, group in table.groupby(key):
        base = group[group[compare] == base_value]
        if base.empty or len(group) == 1:
            continue
        base_dir = Path(base.run_dir.iloc[0])
        benchmark = benchmark_of(base_dir)
        reference = benchmark.reference_statistics_for(base_dir)
        base_features = benchmark.pool_features(base_dir, "cpu")
        for _, other in group[group[compare] != base_value].iterrows():
            features = benchmark.pool_features(Path(other.run_dir), "cpu")
            summary = distribution_summary(features, reference, settings, base_features)
            rows.append({**dict(zip(key, values)), compare: other[compare],
                         **{f"{name}_difference{end}": summary[f"{name}_difference{end}"] for name in DIFFERENCES
                            for end in ("", "_ci_low", "_ci_high")}})
    return pd.DataFrame(rows)


def select(table: pd.DataFrame, where: list[str]) -> pd.DataFrame:
    """The rows whose columns equal every `column=value` of `where` (`column=a,b`: either value)."""
    for condition in where:
        column, _, value = condition.partition("=")
        if column not in table:
            raise SystemExit(f"--where {condition}: no column {column!r}; columns: {', '.join(table.columns)}")
        table = table[table[column].astype(str).isin(value.split(","))]
    return table


def ordered(table: pd.DataFrame) -> pd.DataFrame:
    """Rows by keep (largest first), policy (conf/cache/ order), allocation and decoding (their config
    groups' order, the base first)."""
    def rank(group: str, base: str) -> dict[str, int]:
        return {name: index for index, name in enumerate(sorted(config_options(group),
                                                                 key=lambda name: (name != base, name)))}

    keys = table.assign(_keep=-table.budget, _policy=table.policy.str.partition("[")[0].map(rank("cache", "full")),
                        _variant=table.policy,
                        _allocation=table.allocation.map(rank("budget_allocation", "uniform")),
                        _decoding=table.decoding.map(rank("decoding", "sequential")))
    columns = ["_keep", "_policy", "_variant", "_allocation", "_decoding"]
    return keys.sort_values(columns).drop(columns=columns)


def cell(row, name: str, digits: int, difference: bool = False) -> str:
    """`value [low, high]`, a difference signed with `*` when its interval excludes 0; `-` when absent."""
    value = row.get(name)
    if value is None or pd.isna(value):
        return "-"
    low, high = row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
    sign = "+" if difference else ""
    if low is None or pd.isna(low):
        return f"{value:{sign}.{digits}f}"
    mark = "*" if difference and (low > 0 or high < 0) else ""
    return f"{value:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]{mark}"


def markdown(table: pd.DataFrame, differences: pd.DataFrame, compare: str = "allocation",
             base_value: str | None = None) -> str:
    """The runs' table (against their full-cache partner), then each variant's differences from its base."""
    decoding = compare == "decoding" or table.decoding.nunique() > 1
    header = ["keep", "policy", "allocation", *(["decoding", "passes / image", "tokens / pass", "acceptance",
                                                 "images/s"] if decoding else []),
              "FID", "KID (se)", "FID - full", "KID - full", "token agreement", "PSNR to full (dB)", "SSIM",
              "Inception cosine", "KV MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        kid = "-" if pd.isna(row.kid) else f"{row.kid:.4f} ({row.kid_se:.4f})"
        method = [row.decoding, cell(row, "decode_passes_per_image", 1), cell(row, "tokens_per_pass", 2),
                  cell(row, "draft_acceptance", 3), cell(row, "images_per_s", 2)] if decoding else []
        cells = [row.keep, row.policy, row.allocation, *method, f"{row.fid:.2f}", kid,
                 cell(row, "fid_difference", 2, True), cell(row, "kid_difference", 4, True),
                 cell(row, "token_agreement", 3), cell(row, "psnr", 2), cell(row, "ssim", 3),
                 cell(row, "inception_cosine", 3), f"{row.kv_cache_mib:.1f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if differences.empty:
        return "\n".join(lines) + "\n"
    same = [column for column in ("keep", "policy", "allocation", "decoding") if column != compare]
    lines += ["", f"Each {compare} minus {base_value or COMPARED[compare]}, same {', '.join(same)} (paired over sample indices, "
              "95% percentile bootstrap; * = interval excludes 0):", "",
              "| " + " | ".join([*same, compare, "FID diff", "KID diff", "precision diff"]) + " |",
              "|" + "---|" * (len(same) + 4)]
    for _, row in differences.iterrows():
        cells = [*(row[column] for column in same), row[compare], cell(row, "fid_difference", 2, True),
                 cell(row, "kid_difference", 4, True), cell(row, "precision_difference", 3, True)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def figure(table: pd.DataFrame, path: Path, compare: str = "allocation") -> None:
    """Per keep: FID minus full (left) and PSNR to the full cache's samples (right) with their 95%
    intervals, by policy and allocation (or decoding)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compressed = table[table.policy != "full"]
    keeps = list(dict.fromkeys(compressed.keep))
    compare = "allocation" if compare == "policy" else compare  # policies are the x axis already
    allocations = list(dict.fromkeys(compressed[compare]))
    fig, axes = plt.subplots(len(keeps), 2, figsize=(12, 3.6 * len(keeps)), squeeze=False)
    width = 0.8 / max(len(allocations), 1)
    for row_axes, keep in zip(axes, keeps):
        at_keep = compressed[compressed.keep == keep]
        policies = list(dict.fromkeys(at_keep.policy))
        for offset, allocation in enumerate(allocations):
            runs = at_keep[at_keep[compare] == allocation].set_index("policy").reindex(policies)
            x = np.arange(len(policies)) + (offset - (len(allocations) - 1) / 2) * width
            for axis, name in zip(row_axes, ("fid_difference", "psnr")):
                value = runs[name].astype(float)
                errors = np.vstack([value - runs[f"{name}_ci_low"].astype(float),
                                    runs[f"{name}_ci_high"].astype(float) - value])
                axis.bar(x, value, width, yerr=np.nan_to_num(errors), capsize=2, label=allocation)
        row_axes[0].axhline(0.0, color="black", linewidth=0.8)
        for axis, title in zip(row_axes, ("FID minus full (lower is better)", "PSNR to the full cache's samples, dB")):
            axis.set_xticks(np.arange(len(policies)), policies, rotation=20, ha="right")  # ablation labels are long
            axis.set_title(f"keep {keep}: {title}")
        row_axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the runs' folder, e.g. outputs/demo_fid/demo")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--compare", choices=sorted(COMPARED), default="allocation",
                        help="the column whose values are compared with its base (uniform, sequential)")
    parser.add_argument("--base", help="the value of the --compare column the others are compared with "
                                       "(default: uniform, sequential, linear)")
    parser.add_argument("--name", help="of the files written (default: demo_<compare>_differences)")
    parser.add_argument("--where", nargs="*", default=[], metavar="COLUMN=VALUE",
                        help="only the runs with these values, e.g. allocation=uniform keep=1,1/4")
    parser.add_argument("--replicates", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    runs = finished_runs(args.root)
    if not runs:
        raise SystemExit(f"no finished runs (metrics.json) under {args.root}")
    table = ordered(select(quality_table(runs), args.where))
    differences = variant_differences(table, args.replicates, args.seed, args.compare, args.base)
    args.name = args.name or f"demo_{args.compare}_differences"
    args.out.mkdir(parents=True, exist_ok=True)
    table.drop(columns=["run_dir"]).to_csv(args.out / f"{args.name}.csv", index=False)
    if not differences.empty:
        differences.to_csv(args.out / f"{args.name}_differences.csv", index=False)
    text = markdown(table, differences, args.compare, args.base)
    (args.out / f"{args.name}.md").write_text(text)
    figure(table, args.out / f"{args.name}.png", args.compare)
    print(text)


if __name__ == "__main__":
    main()
