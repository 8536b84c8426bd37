# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # LineAR: the paper's tables, ours beside the paper's
#
# This notebook only reads the tables that `scripts/collect.py` writes (`make collect`): `efficiency.csv`
# and `quality.csv` in `$LINEAREVAL_RESULTS` (default: the repository's `results/`). Every row says where
# it came from: `source` is `paper` (the numbers printed in the paper, kept in `results/paper/`) or `ours`
# (one run folder, with the device and the weights it ran with: `random` weights measure cost only).
# Before any run has been collected, the paper's rows are shown alone.
#
# Rows are sorted so that each of our rows sits right below the paper's row with the same model, method,
# keep and batch size.

# %%
import json
import os
from fractions import Fraction
from pathlib import Path

import pandas as pd
from IPython.display import display


def repository_root() -> Path:
    """The checkout this notebook belongs to (Jupyter starts a kernel in the notebook's folder)."""
    here = Path.cwd().resolve()
    return next((folder for folder in (here, *here.parents) if (folder / "pyproject.toml").exists()), here)


RESULTS = Path(os.environ.get("LINEAREVAL_RESULTS", repository_root() / "results"))
PAPER_MODELS = ["llamagen_xl", "llamagen_xxl", "janus_pro_1b", "janus_pro_7b", "lumina_mgpt_768", "lumina_mgpt_1024"]
QUALITY_METRICS = ["fid", "fid_adm_stats", "precision", "recall", "inception_score_mean", "clip_score", "dpg_score",
                   "dpg_entity", "dpg_attribute", "dpg_relation", "dpg_global", "dpg_other"]
pd.set_option("display.max_rows", 500, "display.max_columns", None, "display.width", 250,
              "display.expand_frame_repr", False, "display.precision", 3)
print(f"results: {RESULTS}")


# %%
def load_table(name: str) -> pd.DataFrame:
    """`<results>/<name>.csv`, else the paper's rows alone from `<results>/paper/`; empty when neither exists."""
    collected, paper = RESULTS / f"{name}.csv", RESULTS / "paper" / f"{name}.csv"
    if collected.exists():
        table = pd.read_csv(collected, dtype={"keep": str})
    elif paper.exists():
        print(f"NOTE: {collected} does not exist (no runs collected yet: run `make collect`); "
              "showing the paper's rows only.")
        table = pd.read_csv(paper, dtype={"keep": str})
    else:
        print(f"NOTE: neither {collected} nor {paper} exists; nothing to show.")
        return pd.DataFrame(columns=["model", "cache", "keep", "source"])
    if not table.source.eq("ours").any():
        print(f"NOTE: no rows of ours in {name} yet (only the paper's).")
    return table


def keep_order(keep: str) -> float:
    """Sort key: the full cache first, then smaller fractions; token-count keeps (e.g. `96`) last."""
    value = Fraction(keep)
    return -float(value) if value <= 1 else float(value)


def ordered(table: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """The paper's model order, then keep, method, `columns`, and the paper's row before ours."""
    model_rank = {model: rank for rank, model in enumerate(PAPER_MODELS)}
    keys = {"_model": table.model.map(lambda model: model_rank.get(model, len(model_rank))),
            "_keep": table.keep.map(keep_order), "_source": table.source.map({"paper": 0}).fillna(1)}
    return (table.assign(**keys).sort_values(["_model", "model", "_keep", "cache", *columns, "_source"], kind="stable")
            .drop(columns=list(keys)).reset_index(drop=True))


def text(column: pd.Series) -> pd.Series:
    """Labels with blanks for missing ones (the paper's rows have no device or weights)."""
    return column.astype("string").fillna("")


def settings(policy: str) -> str:
    """A policy's settings as collect writes them (JSON) -> `anchors=line,recent_lines=1,...`; blank if none."""
    values = json.loads(policy) if policy else None
    return ",".join(f"{key}={value}" for key, value in values.items()) if values else ""


def percent(value: float) -> str:
    return "-" if pd.isna(value) else f"{100 * value:.2f}%"


def times(value: float) -> str:
    return "-" if pd.isna(value) else f"{value:.2f}x"


# %% [markdown]
# ## Efficiency (the paper's efficiency table)
#
# Peak memory and the latency of one batch, with the memory saving and the speedup against the full cache
# of the same run (same batch, same inputs). The paper does not name its GPU, and its full-cache baseline
# is slow, so also compare `images_per_s`: a faster baseline lowers every speedup.

# %% tags=["efficiency"]
def efficiency_table(rows: pd.DataFrame) -> pd.DataFrame:
    """model | method | keep | B | batch | memory | saving | latency | speedup, plus throughput and origin."""
    rows = ordered(rows.reindex(columns=list(dict.fromkeys(
        ["model", "cache", "keep", "visual_budget", "batch_size", "peak_memory_gb", "memory_saving", "generation_s",
         "speedup", "source", "device_name", "weights", *rows.columns]))), "batch_size")
    return pd.DataFrame({
        "model": rows.model, "method": rows.cache, "keep": rows.keep, "B": rows.visual_budget.astype("Int64"),
        "batch": rows.batch_size.astype("Int64"), "memory_GB": rows.peak_memory_gb.map("{:.2f}".format),
        "saving": rows.memory_saving.map(percent), "latency_s": rows.generation_s.map("{:.2f}".format),
        "speedup": rows.speedup.map(times), "images_per_s": (rows.batch_size / rows.generation_s).map("{:.3g}".format),
        "source": rows.source, "device": text(rows.device_name), "weights": text(rows.weights)})


efficiency = load_table("efficiency")
if efficiency.empty:
    print("NOTE: no efficiency rows at all.")
else:
    display(efficiency_table(efficiency))


# %% [markdown]
# ## Quality
#
# One row per model, method, keep, policy settings (blank for the paper's rows) and origin; metric
# columns as `scripts/collect.py` names them. Several runs of ours with the same settings (e.g. different
# seeds) are averaged, and `runs` counts them.

# %%
def quality_table(rows: pd.DataFrame, benchmark: str) -> pd.DataFrame:
    """Metrics of one benchmark as columns, one row per (model, method, keep, policy settings, source, weights,
    samples): ablation runs differ from the default LineAR run only in their settings."""
    rows = rows[rows.benchmark == benchmark].reindex(columns=list(dict.fromkeys(
        ["model", "cache", "keep", "policy", "source", "weights", "num_samples", "metric", "value", "run_dir",
         *rows.columns])))
    rows = rows.assign(weights=text(rows.weights), policy=text(rows.policy).map(settings),
                       num_samples=rows.num_samples.map(lambda count: "" if pd.isna(count) else str(int(count))))
    keys = ["model", "cache", "keep", "policy", "source", "weights", "num_samples"]
    table = rows.pivot_table(index=keys, columns="metric", values="value", aggfunc="mean", sort=False)
    metrics = [metric for metric in QUALITY_METRICS if metric in table] + sorted(set(table) - set(QUALITY_METRICS))
    table = table[metrics].join(rows.groupby(keys, sort=False).run_dir.nunique().rename("runs")).reset_index()
    return ordered(table).rename(columns={"cache": "method", "num_samples": "samples"})


def show_quality(benchmark: str, quality: pd.DataFrame) -> None:
    rows = quality[quality.benchmark == benchmark] if "benchmark" in quality else quality.iloc[:0]
    if rows.empty:
        print(f"NOTE: no {benchmark} rows (neither ours nor the paper's). Run it, e.g. "
              f"`python run.py benchmark={benchmark} ...`, then `make collect`.")
        return
    for source, label in (("paper", "the paper's"), ("ours", "ours")):
        if not rows.source.eq(source).any():
            print(f"NOTE: no {benchmark} rows of {label} in quality.csv.")
    display(quality_table(rows, benchmark))


quality = load_table("quality")

# %% [markdown]
# ### ImageNet 256 FID (LlamaGen, class-conditional)
#
# The paper: LlamaGen-XL, 50,000 samples, FID 2.77 with the full cache and 2.68 at keep 1/6. Our FID is
# comparable only at the same sample count (`samples`) and with `checkpoint` weights.

# %% tags=["imagenet_fid"]
show_quality("imagenet_fid", quality)

# %% [markdown]
# ### COCO FID (Janus-Pro, text-to-image)
#
# The paper: Janus-Pro-1B, FID 23.85 with the full cache and 22.86 at keep 1/6; it does not state the
# COCO split or the number of captions, so compare our `samples` count before comparing values.

# %% tags=["coco_fid"]
show_quality("coco_fid", quality)

# %% [markdown]
# ### DPG-Bench (Lumina-mGPT)
#
# The paper reports that DPG-Bench on Lumina-mGPT-768 improves at keep 1/8; `results/paper/quality.csv`
# holds no DPG number of the paper's.

# %% tags=["dpg"]
show_quality("dpg", quality)

# %% [markdown]
# ### Against the full cache (ours, paired on the same samples)
#
# Each compressed run of an image benchmark against the full-cache run of the same samples: the
# differences run - full of FID, KID and precision, and fidelity to the full cache's samples (tokens,
# PSNR, SSIM, Inception cosine), each with its 95% percentile bootstrap interval over sample indices in
# brackets; `*` marks a difference whose interval excludes zero. KID is shown with its bootstrap standard
# error. One row per run (seed).

# %% tags=["paired"]
PAIRED = ["fid_difference", "kid_difference", "precision_difference", "token_agreement", "first_difference", "psnr",
          "ssim", "inception_cosine"]


def with_interval(row: pd.Series) -> str:
    difference = row.metric.endswith("_difference")
    if pd.isna(row.get("ci_low")):
        return f"{row.value:.3g}" + (f" +- {row.se:.2g}" if pd.notna(row.get("se")) else "")
    mark = "*" if difference and (row.ci_low > 0 or row.ci_high < 0) else ""
    return f"{row.value:.3g} [{row.ci_low:.3g}, {row.ci_high:.3g}]{mark}"


def paired_table(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.reindex(columns=list(dict.fromkeys([*rows.columns, "ci_low", "ci_high", "se", "seed"])))
    rows = rows[(rows.source == "ours") & rows.metric.isin(["kid", *PAIRED])]
    rows = rows.assign(cell=rows.apply(with_interval, axis=1), policy=text(rows.policy).map(settings),
                       seed=rows.seed.map(lambda seed: "" if pd.isna(seed) else str(int(seed))))
    keys = ["benchmark", "model", "cache", "keep", "policy", "num_samples", "seed"]
    table = rows.pivot_table(index=keys, columns="metric", values="cell", aggfunc="first", sort=False)
    table = table[[metric for metric in ["kid", *PAIRED] if metric in table]].reset_index()
    return ordered(table.assign(source="ours")).drop(columns="source").rename(columns={"cache": "method"})


has_paired = "metric" in quality and quality.metric.isin(PAIRED).any()
if not has_paired:
    print("NOTE: no paired metrics in quality.csv (image benchmark runs with a full-cache partner).")
else:
    display(paired_table(quality))

# %% [markdown]
# ### Seeds: mean and spread per policy
#
# `quality_seeds.csv` (`make collect`): our quality rows averaged over seeds (a `seed=0,1,2` sweep), with the
# standard deviation over seeds (blank for a single seed) and the number of seeds.

# %% tags=["seeds"]
seeds_path = RESULTS / "quality_seeds.csv"
if not seeds_path.exists():
    print(f"NOTE: {seeds_path} does not exist (run `make collect`).")
else:
    seeds = pd.read_csv(seeds_path, dtype={"keep": str})
    several = seeds[seeds.seeds > 1]
    if several.empty:
        print("NOTE: no setting was run with more than one seed.")
    else:
        display(ordered(several.assign(source="ours")).drop(columns="source"))

# %% [markdown]
# ### Other benchmarks found in `quality.csv`

# %% tags=["other_quality"]
others = sorted(set(quality.get("benchmark", pd.Series(dtype=str)).dropna()) - {"imagenet_fid", "coco_fid", "dpg"})
if not others:
    print("NOTE: no other benchmarks in quality.csv.")
for benchmark in others:
    print(benchmark)
    show_quality(benchmark, quality)
