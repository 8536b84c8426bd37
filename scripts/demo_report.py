"""The demo's table and sample grid: `python scripts/demo_report.py outputs/demo_fid/demo`.

Reads every finished run (metrics.json) under the folder for one seed, prints one row per policy
and budget (FID, KID with its bootstrap standard error, the paired differences from the full cache
with their 95% intervals, fidelity to the full cache's samples, peak memory, KV cache, images/s),
writes that table as `demo_table.csv` (numbers, intervals as `_low` / `_high` columns), and writes
`demo_grid.png`: one row per policy, the same samples (same seeds, same classes) in the columns,
under a first row of held-out real crops of the same classes. In the printed table a `*` marks a
difference from the full cache whose interval excludes zero (distinguishable from full).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from lineareval.api import policy_names
from lineareval.record import RunRecord, find_runs
from lineareval.tables import run_table

COLUMNS = {"cache": "policy", "keep": "keep", "visual_budget": "budget", "fid": "FID", "kid": "KID", "kid_se": "KID se",
           "peak_memory_mib": "peak memory MiB", "kv_cache_mib": "KV cache MiB", "images_per_s": "images/s"}
# Against the full-cache run of the same samples, each with its percentile interval (`_low`, `_high`)
INTERVALS = {"fid_difference": "FID diff", "kid_difference": "KID diff", "precision_difference": "precision diff",
             "token_agreement": "token agreement", "first_difference": "first diff token", "psnr": "PSNR dB",
             "ssim": "SSIM", "inception_cosine": "Inception cosine"}
LABEL_WIDTH = 140


def finished_runs(root: Path, seed: int) -> list[tuple[RunRecord, Path]]:
    """(record, run folder) of every finished run of `seed` under `root`, in policy order."""
    runs = [(record, folder) for record, folder in find_runs(root) if record.seed == seed]
    if not runs:
        raise SystemExit(f"no finished runs of seed {seed} (metrics.json) under {root}")
    rank = {name: index for index, name in enumerate(policy_names())}  # conf/cache/: full first
    return sorted(runs, key=lambda run: (run[0].model, rank.get(run[0].cache, len(rank)), run[0].cache,
                                         -run[0].visual_budget))


def table(runs: list[tuple[RunRecord, Path]]) -> pd.DataFrame:
    """One row per run: policy, keep, budget, FID, peak memory and KV-cache high water in MiB, images/s."""
    frame = run_table(runs)
    frame["peak_memory_mib"] = frame["peak_memory_bytes"] / 2**20
    frame["kv_cache_mib"] = frame["kv_cache_high_water_bytes"] / 2**20
    columns = dict(COLUMNS)
    for name, label in INTERVALS.items():
        columns.update({name: label, f"{name}_ci_low": f"{label} low", f"{name}_ci_high": f"{label} high"})
    frame = frame.reindex(columns=list(columns)).astype({name: float for name in columns if name not in
                                                         ("cache", "keep", "visual_budget")})
    return frame.rename(columns=columns)


def interval(value: float, low: float, high: float, difference: bool = False) -> str:
    """`+3.5 [-1.2, +8.0]*` (a difference: signed, `*` when the interval excludes zero); `-` when absent."""
    if pd.isna(value):
        return "-"
    sign = "+" if difference else ""
    mark = "*" if difference and (low > 0 or high < 0) else ""
    return f"{value:{sign}.3g} [{low:{sign}.3g}, {high:{sign}.3g}]{mark}"


def printed(frame: pd.DataFrame) -> pd.DataFrame:
    """The table for the terminal and the README: intervals in brackets, KID as mean +- standard error."""
    shown = frame[["policy", "keep", "budget"]].copy()
    shown["FID"] = frame["FID"].map(lambda value: f"{value:.3g}")
    shown["KID +- se"] = [f"{kid:.3f} +- {se:.3f}" if pd.notna(kid) else "-" for kid, se in
                          zip(frame["KID"], frame["KID se"])]
    for label in INTERVALS.values():
        shown[label] = [interval(value, low, high, label.endswith("diff")) for value, low, high in
                        zip(frame[label], frame[f"{label} low"], frame[f"{label} high"])]
    shown["KV cache MiB"] = frame["KV cache MiB"].map(lambda value: f"{value:.3g}")
    shown["images/s"] = frame["images/s"].map(lambda value: f"{value:.3g}")
    return shown


def markdown(frame: pd.DataFrame) -> str:
    """A Markdown table of string cells (pandas' to_markdown needs the tabulate package)."""
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)])


def label_row(images: np.ndarray, label: str, scale: int, pad: int = 2) -> Image.Image:
    """uint8 (n, H, W, 3) -> one labelled strip, each image scaled by `scale` (nearest)."""
    count, height, width = images.shape[:3]
    size = (height * scale, width * scale)
    strip = Image.new("RGB", (LABEL_WIDTH + count * (size[1] + pad), size[0] + pad), "white")
    for index, image in enumerate(images):
        tile = Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.NEAREST)
        strip.paste(tile, (LABEL_WIDTH + index * (size[1] + pad), pad // 2))
    ImageDraw.Draw(strip).text((4, size[0] // 2 - 6), label, fill="black")
    return strip


def sample_grid(runs: list[tuple[RunRecord, Path]], columns: int, scale: int) -> Image.Image:
    """Rows: held-out real crops of the columns' classes, then each run's first `columns` samples."""
    from lineareval.demo.data import make_crops

    rows = []
    first = np.load(runs[0][1] / "tokens.npz")["labels"][:columns]
    image_size = int(np.load(runs[0][1] / "samples.npz", mmap_mode="r")["arr_0"].shape[1])
    real, real_labels = make_crops(10 * columns, image_size, "heldout", seed=1)
    picks = [int(np.flatnonzero(real_labels == label)[0]) for label in first]
    rows.append(label_row(real[picks], "real (held-out)", scale))
    for record, folder in runs:
        labels = np.load(folder / "tokens.npz")["labels"][:columns]
        if not np.array_equal(labels, first):
            raise SystemExit(f"{folder} drew other classes than {runs[0][1]}: not the same seeds")
        images = np.load(folder / "samples.npz")["arr_0"][:columns]
        rows.append(label_row(images, f"{record.cache} keep={record.keep}", scale))
    grid = Image.new("RGB", (max(row.width for row in rows), sum(row.height for row in rows)), "white")
    for index, row in enumerate(rows):
        grid.paste(row, (0, sum(previous.height for previous in rows[:index])))
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="a folder of demo_fid runs, e.g. outputs/demo_fid/demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--columns", type=int, default=10, help="samples per row of the grid")
    parser.add_argument("--scale", type=int, default=3, help="pixel magnification in the grid")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown (for a README)")
    args = parser.parse_args()
    runs = finished_runs(args.root, args.seed)
    frame = table(runs)
    frame.to_csv(args.root / "demo_table.csv", index=False)
    shown = printed(frame)
    print(shown.to_string(index=False))
    print("\n[95% percentile bootstrap interval over sample indices, paired with the full cache's samples]; "
          "* = interval excludes 0\n")
    if args.markdown:
        print(markdown(shown))
    sample_grid(runs, args.columns, args.scale).save(args.root / "demo_grid.png")
    print(f"\ntable: {args.root / 'demo_table.csv'}\ngrid:  {args.root / 'demo_grid.png'}")


if __name__ == "__main__":
    main()
