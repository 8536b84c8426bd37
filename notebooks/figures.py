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
# # LineAR: figures
#
# Reads only the tables that `scripts/collect.py` writes (`efficiency.csv`, `quality.csv`,
# `step_latency.csv` in `$LINEAREVAL_RESULTS`, default `results/`) and the run folders under
# `$LINEAREVAL_OUTPUTS` (default `outputs/`) for sample images. Each figure is shown and saved as a PNG in
# `$LINEAREVAL_FIGURES` (default `<results>/figures/`); a figure whose data is absent is skipped with a note.
# `$LINEAREVAL_FIGURE_LABEL`, when set, is printed under every figure's title (e.g. "random weights").
#
# Colours name the cache policy; line styles name the origin (dashed: the paper's numbers; solid, dotted:
# our runs, one style per device and weights). The full cache is drawn as a horizontal reference line.

# %%
import os
import zipfile
from fractions import Fraction
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from lineareval.api import policy_colors
from lineareval.record import find_runs
from lineareval.tables import run_table


def repository_root() -> Path:
    """The checkout this notebook belongs to (Jupyter starts a kernel in the notebook's folder)."""
    here = Path.cwd().resolve()
    return next((folder for folder in (here, *here.parents) if (folder / "pyproject.toml").exists()), here)


RESULTS = Path(os.environ.get("LINEAREVAL_RESULTS", repository_root() / "results"))
OUTPUTS = Path(os.environ.get("LINEAREVAL_OUTPUTS", repository_root() / "outputs"))
FIGURES = Path(os.environ.get("LINEAREVAL_FIGURES", RESULTS / "figures"))
LABEL = os.environ.get("LINEAREVAL_FIGURE_LABEL", "")
GRID_IMAGES = int(os.environ.get("LINEAREVAL_GRID_IMAGES", "6"))
COLORS = policy_colors()  # one per policy of conf/cache/ (full in black): a new policy gets its own
print(f"results: {RESULTS}\noutputs: {OUTPUTS}\nfigures: {FIGURES}")


# %%
def read_result(name: str, paper_fallback: bool = True) -> pd.DataFrame | None:
    """`<results>/<name>.csv` (else the paper's rows alone) with an `origin` label per row; None if absent."""
    path, paper = RESULTS / f"{name}.csv", RESULTS / "paper" / f"{name}.csv"
    if not path.exists() and paper_fallback and paper.exists():
        print(f"NOTE: {path} does not exist (run `make collect`); using the paper's rows only.")
        path = paper
    if not path.exists():
        print(f"NOTE: {path} does not exist (run `make collect`); its figures are skipped.")
        return None
    table = pd.read_csv(path, dtype={"keep": str})
    for column in ("device_name", "weights"):
        table[column] = table[column].astype("string").fillna("") if column in table else ""
    ours = "ours (" + table.device_name + ", " + table.weights + " weights)"
    return table.assign(origin=ours.where(table.source == "ours", "paper"))


def keep_fraction(keep: str) -> float:
    """`1/6` -> 0.1667; token-count keeps (`96`) have no fraction without N: NaN."""
    value = Fraction(keep)
    return float(value) if value <= 1 else float("nan")


def color(cache: str) -> str:
    return COLORS.get(cache, f"C{5 + sum(map(ord, cache)) % 5}")


def line_styles(origins: pd.Series) -> dict[str, str]:
    """Dashed for the paper, then solid, dotted, dash-dotted for each origin of ours."""
    ours = sorted(set(origins) - {"paper"})
    return {"paper": "--", **{origin: ["-", ":", "-."][index % 3] for index, origin in enumerate(ours)}}


def axes_grid(count: int, columns: int, width: float = 5.2, height: float = 3.6) -> list[plt.Axes]:
    """`count` axes in rows of `columns` (unused ones hidden)."""
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False,
                                layout="constrained")
    for axis in axes.flat[count:]:
        axis.set_visible(False)
    return list(axes.flat[:count])


def finish(figure: plt.Figure, title: str, name: str) -> Path:
    """Title (plus the label), save as `<figures>/<name>`, show."""
    figure.suptitle(title + (f"\n{LABEL}" if LABEL else ""), fontsize=12)
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / name
    figure.savefig(path, dpi=100)
    print(f"saved {path}")
    plt.show()
    return path


def plot_against_keep(axis: plt.Axes, rows: pd.DataFrame, value: str, ylabel: str, title: str) -> None:
    """One line per (origin, policy) of `value` against keep; the full cache also as a horizontal line."""
    styles = line_styles(rows.origin)
    ours = sorted(set(rows.origin) - {"paper"})
    short = {"paper": "paper", **({ours[0]: "ours"} if len(ours) == 1 else {})}  # one origin of ours: in the title
    for (origin, cache), series in rows.groupby(["origin", "cache"]):
        points = series.groupby("x")[value].mean().sort_index()
        style = {"color": color(cache), "linestyle": styles[origin], "label": f"{cache}, {short.get(origin, origin)}"}
        axis.plot(points.index, points.values, marker="s" if cache == "full" else "o", **style)
        if cache == "full":  # the reference every budget is compared with
            axis.axhline(points.iloc[-1], linewidth=1, color=style["color"], linestyle=style["linestyle"])
    if rows[value].max() > 10 * rows[value].min():  # e.g. the paper's slow baseline beside ours
        axis.set_yscale("log")
    keeps = rows.drop_duplicates("x").sort_values("x")
    axis.set_title(title + (f"\n{ours[0]}" if len(ours) == 1 else ""), fontsize=9)
    axis.set_xscale("log", base=2)
    axis.set_xticks(keeps.x, keeps.keep)
    axis.minorticks_off()
    axis.set_xlabel("keep (fraction of visual tokens cached)")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)


def with_keep_fraction(rows: pd.DataFrame, what: str) -> pd.DataFrame:
    rows = rows.assign(x=rows.keep.map(keep_fraction))
    if rows.x.isna().any():
        print(f"NOTE: {what}: rows with a token-count keep ({sorted(set(rows.keep[rows.x.isna()]))}) are left out.")
    return rows.dropna(subset=["x"])


# %% [markdown]
# ## Memory and latency against keep, per policy
#
# One row of plots per model and batch size (a latency is that of one batch). Our runs are plotted
# where we have them, with the paper's rows of the same model and batch size beside them; with no runs of
# ours yet, the paper's rows alone.

# %% tags=["efficiency_vs_keep"]
efficiency = read_result("efficiency")
if efficiency is not None:
    efficiency = with_keep_fraction(efficiency, "efficiency")
    swept = {key: rows for key, rows in efficiency.groupby(["model", "batch_size"])
             if rows.keep[rows.cache != "full"].nunique() >= 2}  # two budgets or more: a curve
    groups = {key: rows for key, rows in swept.items() if rows.source.eq("ours").any()}
    if not groups:
        print("NOTE: no runs of ours with two or more keeps at one batch size; plotting the paper's numbers only.")
        groups = swept
    if not groups:
        print("NOTE: no model and batch size with two or more keeps; memory/latency against keep skipped.")
    else:
        axes = axes_grid(2 * len(groups), 2)
        for index, ((model, batch), rows) in enumerate(groups.items()):
            plot_against_keep(axes[2 * index], rows, "peak_memory_gb", "peak memory (GB)", f"{model}, batch {batch}")
            plot_against_keep(axes[2 * index + 1], rows, "generation_s", "latency of one batch (s)",
                              f"{model}, batch {batch}")
        finish(axes[0].figure, "Peak memory and latency against keep", "memory_latency_vs_keep.png")

# %% [markdown]
# ## Memory and latency against batch size, per policy
#
# Our runs only (the paper reports one batch size per model): one row per model and origin, one line per
# policy and keep.

# %%
def plot_against_batch(axis: plt.Axes, rows: pd.DataFrame, value: str, ylabel: str) -> None:
    """One line per (policy, keep) of `value` against batch size; colour by policy, marker by keep."""
    keeps = sorted(set(rows.keep), key=lambda keep: -float(Fraction(keep)))
    for (cache, keep), series in rows.groupby(["cache", "keep"]):
        points = series.groupby("batch_size")[value].mean().sort_index()
        axis.plot(points.index, points.values, color=color(cache), marker="osv^D<>"[keeps.index(keep) % 7],
                  label="full" if cache == "full" else f"{cache} {keep}")
    batches = sorted(set(rows.batch_size))
    axis.set_xscale("log", base=2)
    axis.set_xticks(batches, [str(batch) for batch in batches])
    axis.minorticks_off()
    axis.set(xlabel="batch size", ylabel=ylabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)


# %% tags=["efficiency_vs_batch"]
if efficiency is not None:
    ours = efficiency[efficiency.source == "ours"]
    groups = {key: rows for key, rows in ours.groupby(["model", "origin"]) if rows.batch_size.nunique() >= 2}
    if not groups:
        print("NOTE: no model with runs of ours at two or more batch sizes; memory/latency against batch skipped.")
    else:
        axes = axes_grid(2 * len(groups), 2)
        for index, ((model, origin), rows) in enumerate(groups.items()):
            plot_against_batch(axes[2 * index], rows, "peak_memory_gb", "peak memory (GB)")
            plot_against_batch(axes[2 * index + 1], rows, "generation_s", "latency of one batch (s)")
            for axis in axes[2 * index:2 * index + 2]:
                axis.set_title(f"{model}, {origin}", fontsize=9)
        finish(axes[0].figure, "Peak memory and latency against batch size", "memory_latency_vs_batch.png")

# %% [markdown]
# ## FID against keep, per policy
#
# One plot per benchmark and model. Our values are means over runs with the same settings; our FID is
# comparable with the paper's only at the same sample count and with `checkpoint` weights.

# %% tags=["fid_vs_keep"]
quality = read_result("quality")
fid = None if quality is None else quality[quality.metric == "fid"]
if fid is None or fid.empty:
    print("NOTE: no FID rows; FID against keep skipped.")
else:
    fid = with_keep_fraction(fid, "FID")
    counts = fid.num_samples if "num_samples" in fid else pd.Series(np.nan, index=fid.index)
    samples = counts.map(lambda count: "" if pd.isna(count) else f"{int(count)} samples, ")
    fid = fid.assign(origin=fid.origin.where(fid.source == "paper", "ours (" + samples + fid.weights + " weights)"))
    groups = dict(list(fid.groupby(["benchmark", "model"])))
    axes = axes_grid(len(groups), min(3, len(groups)))
    for axis, ((benchmark, model), rows) in zip(axes, groups.items()):
        plot_against_keep(axis, rows, "value", "FID (lower is better)", f"{benchmark}, {model}")
    finish(axes[0].figure, "FID against keep", "fid_vs_keep.png")


# %% [markdown]
# ## Fidelity to the full cache against keep, per policy
#
# Each compressed run against the full-cache run of the same samples (`lineareval/benchmarks/paired.py`):
# the fraction of tokens equal to the full cache's, PSNR and SSIM of the decoded images, the cosine of
# their Inception features, and the FID difference from the full cache. Bars: the 95% bootstrap
# interval over sample indices (averaged over seeds when there are several). One row per benchmark and
# model.

# %%
FIDELITY = {"token_agreement": "token agreement with full", "psnr": "PSNR to full (dB)", "ssim": "SSIM to full",
            "inception_cosine": "Inception cosine to full", "fid_difference": "FID - FID(full)"}


def plot_fidelity(axis: plt.Axes, rows: pd.DataFrame, ylabel: str) -> None:
    """One line per policy of the metric against keep, with its interval as error bars."""
    for cache, series in rows.groupby("cache"):
        points = series.groupby("x")[["value", "ci_low", "ci_high"]].mean().sort_index()
        errors = [points.value - points.ci_low, points.ci_high - points.value]
        axis.errorbar(points.index, points.value, yerr=np.abs(errors), color=color(cache), marker="o", capsize=3,
                      label=cache)
    if ylabel.startswith("FID -"):
        axis.axhline(0, color=color("full"), linewidth=1)  # the full cache itself
    keeps = rows.drop_duplicates("x").sort_values("x")
    axis.set_xscale("log", base=2)
    axis.set_xticks(keeps.x, keeps.keep)
    axis.minorticks_off()
    axis.set(xlabel="keep", ylabel=ylabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)


# %% tags=["fidelity_vs_keep"]
paired = None if quality is None else quality[quality.metric.isin(list(FIDELITY)) & (quality.source == "ours")]
if paired is None or paired.empty:
    print("NOTE: no paired metrics (runs of an image benchmark with a full-cache partner); fidelity figure skipped.")
else:
    paired = with_keep_fraction(paired.reindex(columns=list(dict.fromkeys([*paired.columns, "ci_low", "ci_high"]))),
                                "fidelity")
    panels = [(key, metric) for key, rows in paired.groupby(["benchmark", "model"])
              for metric in FIDELITY if metric in set(rows.metric)]
    axes = axes_grid(len(panels), min(len(FIDELITY), len(panels)), width=4.2)
    for axis, ((benchmark, model), metric) in zip(axes, panels):
        rows = paired[(paired.benchmark == benchmark) & (paired.model == model) & (paired.metric == metric)]
        plot_fidelity(axis, rows, FIDELITY[metric])
        axis.set_title(f"{benchmark}, {model}", fontsize=9)
    finish(axes[0].figure, "Fidelity to the full cache against keep (bars: 95% bootstrap interval)",
           "fidelity_vs_keep.png")


# %% [markdown]
# ## Samples: policies side by side on the same seeds
#
# Run folders with the same benchmark, model, weights and seed but different cache or keep generate
# sample `i` from the same condition and the same random draws, so their images pair up column by column.
# The first `$LINEAREVAL_GRID_IMAGES` images (default 6) of each run are shown, one row per policy.

# %%
def first_images(path: Path, count: int) -> np.ndarray:
    """The first `count` images of an ADM `.npz` (`arr_0` uint8 [n, H, W, 3]), without reading the rest."""
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as member:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(member)
        if fortran_order or len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
            raise ValueError(f"{path}: arr_0 is {dtype} {shape}, expected uint8 [n, H, W, 3] (the ADM layout)")
        count = min(count, shape[0])
        data = member.read(count * int(np.prod(shape[1:])))
    return np.frombuffer(data, dtype=np.uint8).reshape(count, *shape[1:])


def conditions(run_dir: Path, count: int) -> tuple[str, ...]:
    """Captions of the first `count` samples: `class 207`, or the prompt; empty without tokens.npz."""
    if not (run_dir / "tokens.npz").exists():
        return ()
    with np.load(run_dir / "tokens.npz") as tokens:
        if "labels" in tokens:
            return tuple(f"class {label}" for label in tokens["labels"][:count])
        if "prompts" in tokens:
            return tuple(str(tokens["prompts"][index]) for index in tokens["prompt_index"][:count])
    return ()


def sample_runs(root: Path) -> pd.DataFrame:
    """One row per finished run folder under `root` that holds samples (one policy's: suites are left out)."""
    runs = [(record, folder) for record, folder in (find_runs(root) if root.exists() else [])
            if (folder / "samples.npz").exists() and (folder / "config.yaml").exists()]
    table = run_table(runs)
    columns = ["benchmark", "model", "weights", "seed", "cache", "keep", "run_dir", "conditions"]
    if table.empty:
        return pd.DataFrame(columns=columns)
    folders = [folder for _, folder in runs]
    return table.assign(benchmark=[OmegaConf.load(folder / "config.yaml").benchmark.name for folder in folders],
                        run_dir=folders, conditions=[conditions(folder, GRID_IMAGES) for folder in folders])[columns]


def plot_samples(runs: pd.DataFrame) -> plt.Figure:
    """Rows: policies (full first, then larger keeps); columns: the first images, captioned by condition."""
    runs = runs.assign(order=runs.keep.map(lambda keep: -float(Fraction(keep)))).sort_values(["order", "cache"])
    images = [first_images(run_dir / "samples.npz", GRID_IMAGES) for run_dir in runs.run_dir]
    count = min(len(batch) for batch in images)
    figure, axes = plt.subplots(len(runs), count, figsize=(1.6 * count + 0.6, 1.7 * len(runs) + 0.5), squeeze=False,
                                layout="constrained")
    for row, (run, batch) in enumerate(zip(runs.itertuples(), images)):
        for column in range(count):
            axis = axes[row, column]
            axis.imshow(batch[column], interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                caption = run.conditions[column] if column < len(run.conditions) else f"sample {column}"
                axis.set_title(caption[:24], fontsize=7)
        axes[row, 0].set_ylabel("full" if run.cache == "full" else f"{run.cache}\nkeep {run.keep}", fontsize=9)
    return figure


# %% tags=["samples"]
runs = sample_runs(OUTPUTS)
groups = {key: rows.drop_duplicates(["cache", "keep"])
          for key, rows in runs.groupby(["benchmark", "model", "weights", "seed", "conditions"])
          if rows[["cache", "keep"]].drop_duplicates().shape[0] >= 2}
if not groups:
    print(f"NOTE: no two run folders under {OUTPUTS} share benchmark, model, weights and seed with different "
          "policies; sample grids skipped.")
for (benchmark, model, weights, seed, _), rows in groups.items():
    finish(plot_samples(rows), f"{benchmark}, {model} ({weights} weights), seed {seed}: the same samples per policy",
           f"samples_{benchmark}_{model}_{weights}_seed-{seed}.png")

# %% [markdown]
# ## Per-step decode latency against token index
#
# `step_latency.csv`: the wall time of each decode step (step = index of the generated visual token) for
# the full cache and the compressed ones. With a full cache a step attends to a growing context; with a
# budget it levels off once the cache is full (LineAR evicts at each line end).

# %% tags=["step_latency"]
steps = read_result("step_latency", paper_fallback=False)
if steps is not None and steps.empty:
    print("NOTE: step_latency.csv has no rows; per-step latency skipped.")
elif steps is not None:
    groups = dict(list(steps.groupby(["model", "batch_size", "origin"])))
    axes = axes_grid(len(groups), 1, width=9, height=3.8)
    for axis, ((model, batch, origin), rows) in zip(axes, groups.items()):
        for (cache, keep), series in rows.groupby(["cache", "keep"]):
            milliseconds = 1000 * series.groupby("step").seconds.mean().sort_index()
            style = "-" if cache in ("full", "linear") else "--"
            label = ("full" if cache == "full" else f"{cache} {keep}") + f" (mean {milliseconds.mean():.3g} ms)"
            axis.plot(milliseconds.index, milliseconds.values, linewidth=1, linestyle=style, color=color(cache),
                      label=label)
        axis.set(xlabel="visual token index (decode step)", ylabel="step latency (ms)")
        axis.set_title(f"{model}, batch {batch}, {origin}", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    finish(axes[0].figure, "Per-step decode latency", "step_latency.png")
