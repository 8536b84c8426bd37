"""Where each decoding method wins: latency per image over batch size x decoding x cache, and the crossover.

    python scripts/decoding_sweep.py [--models demo,llamagen_b] [--batches 1,2,4,8,16]
        [--decodings sequential,sjd,sjd_pp,gsd,mc_sjd] [--rows full,linear@1/4,linear@1/6]
        [--out results] [--name cpu_decoding_sweep] [--runs outputs/decoding_sweep] [--dry-run] [--tiny]

Speculative methods trade more work per forward pass (a window of drafts) for fewer passes: at batch 1 a
decode step is latency-bound and a window is almost free, so they win; as the batch grows the step becomes
compute-bound and the window's extra work costs what the saved passes gained. Every (model, batch) is one
`run.py benchmark=efficiency` process (lineareval/benchmarks/efficiency.py: warm-up excluded, every
decoding x row measured interleaved in that process on the same inputs, `repeats` medians) into
`--runs`; this script only gathers their `efficiency.csv` rows and writes

- `<name>.csv`: one row per (model, batch, decoding, cache, keep): latency per image, images/s, forward
  passes per image, tokens per pass, peak memory, the device, `cores_busy` (below the core count: the
  machine was shared and the timing is noisy);
- `<name>_crossover.csv`: per (model, cache, keep, decoding) the largest batch at which it beats sequential
  decoding in wall time and the first batch from which it no longer does (`crossover_batch`; empty if it
  never stopped winning in the range, `never` if it never won);
- `<name>.png`: latency per image vs batch, one line per decoding, a panel per (model, cache).

`--passes` instead measures forward passes per token (no timing) of every speculative variant below on
`--passes-samples` samples of the demo model, full cache and LineAR 1/4: `<name>_passes.csv` (with the tokens
fed per pass: a window that drafts past a line end feeds more than it commits).

`--tiny` is the test's mode (demo model, batches 1 and 2, sequential and mc_sjd, full cache, no warm-up);
`--dry-run` prints the commands and writes nothing. `make decoding-sweep` reproduces the committed files.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["model", "weights", "batch_size", "decoding", "cache", "keep", "latency_per_image_s", "images_per_s",
           "generation_s", "decode_passes_per_image", "tokens_per_pass", "draft_acceptance", "peak_memory_bytes",
           "kv_cache_capacity_bytes", "speedup_vs_sequential", "cores_busy", "repeats", "device_name"]
RANDOM_WEIGHTS = {"llamagen_b"}  # models swept with weights=random (no checkpoint needed: cost only)
# --passes: label -> decoding overrides (the forward passes per token of each variant, full cache unless the label
# names LineAR 1/4: a line end, where a window may not commit past, every 16 tokens on the demo model)
LINEAR = ["cache=linear", "keep=1/4"]
MC_SJD = ["decoding=mc_sjd", "decoding.window=16", "decoding.init=random"]  # SJD's setting (the default is 32, above)
PASS_VARIANTS = {
    "sjd": ["decoding=sjd"], "sjd_pp": ["decoding=sjd_pp"], "gsd": ["decoding=gsd"],
    "mc_sjd maximal": MC_SJD, "mc_sjd gumbel": [*MC_SJD, "decoding.coupling=gumbel"],
    "sjd init=above": ["decoding=sjd", "decoding.init=above"],
    "mc_sjd maximal init=above": [*MC_SJD, "decoding.init=above"],
    "sjd window=32": ["decoding=sjd", "decoding.window=32"],
    "mc_sjd maximal window=32": [*MC_SJD, "decoding.window=32"],
    "mc_sjd gumbel window=32": [*MC_SJD, "decoding.coupling=gumbel", "decoding.window=32"],
    "mc_sjd maximal window=32 init=above": [*MC_SJD, "decoding.window=32", "decoding.init=above"],
    "linear 1/4 sjd": ["decoding=sjd", *LINEAR],
    "linear 1/4 mc_sjd maximal": [*MC_SJD, *LINEAR],
    "linear 1/4 mc_sjd maximal draft_past_evictions=false": [*MC_SJD, "decoding.draft_past_evictions=false", *LINEAR],
    "linear 1/4 mc_sjd maximal init=above": [*MC_SJD, "decoding.init=above", *LINEAR],
    "linear 1/4 mc_sjd maximal window=32": [*MC_SJD, "decoding.window=32", *LINEAR],
    "linear 1/4 mc_sjd maximal window=32 init=above": [*MC_SJD, "decoding.window=32", "decoding.init=above", *LINEAR],
}
TINY = dict(models=["demo"], batches=[1, 2], decodings=["sequential", "mc_sjd"], rows=["full"], warmup=0, repeats=1)


def sweep_commands(args) -> list[tuple[Path, list[str]]]:
    """(run folder, run.py arguments) of every (model, batch) efficiency run."""
    commands = []
    for model in args.models:
        weights = "random" if model in RANDOM_WEIGHTS else "checkpoint"
        for batch in args.batches:
            run_dir = args.runs / model / f"batch-{batch}"
            commands.append((run_dir, [
                "run.py", "benchmark=efficiency", f"model={model}", f"weights={weights}", f"device={args.device}",
                f"num_samples={batch}", f"batch_size={batch}", "decode_images=false",
                f"benchmark.rows=[{','.join(args.rows)}]", f"benchmark.decodings=[{','.join(args.decodings)}]",
                f"benchmark.warmup={args.warmup}", f"benchmark.repeats={args.repeats}",
                f"run_dir={run_dir}", "force=true", *args.overrides]))
    return commands


def run(command: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print("+", " ".join(command), flush=True)
    subprocess.run([sys.executable, *command], check=True, cwd=ROOT, env=env)


def gather(run_dirs: list[Path]) -> pd.DataFrame:
    """Every run's efficiency rows, with latency per image and the speedup over sequential of the same row."""
    table = pd.concat([pd.read_csv(run_dir / "efficiency.csv", dtype={"keep": str}) for run_dir in run_dirs],
                      ignore_index=True)
    table["latency_per_image_s"] = table.generation_s / table.batch_size
    sequential = table[table.decoding == "sequential"].set_index(["model", "batch_size", "cache", "keep"]).generation_s
    key = pd.MultiIndex.from_frame(table[["model", "batch_size", "cache", "keep"]])
    table["speedup_vs_sequential"] = sequential.reindex(key).to_numpy() / table.generation_s.to_numpy()
    return table.reindex(columns=COLUMNS)


def crossovers(table: pd.DataFrame) -> pd.DataFrame:
    """Per (model, cache, keep, decoding): the largest batch where it beats sequential in wall time and the
    first larger batch from which it never does again (the crossover)."""
    rows = []
    speculative = table[(table.decoding != "sequential") & table.speedup_vs_sequential.notna()]
    for (model, cache, keep, decoding), group in speculative.groupby(["model", "cache", "keep", "decoding"], sort=False):
        group = group.sort_values("batch_size")
        wins = group[group.speedup_vs_sequential > 1]
        if wins.empty:
            last_win, crossover = None, "never"
        else:
            last_win = int(wins.batch_size.max())
            later = group[group.batch_size > last_win]
            crossover = str(int(later.batch_size.min())) if len(later) else ""
        rows.append({"model": model, "cache": cache, "keep": keep, "decoding": decoding,
                     "best_speedup": float(group.speedup_vs_sequential.max()),
                     "best_batch": int(group.loc[group.speedup_vs_sequential.idxmax(), "batch_size"]),
                     "largest_winning_batch": last_win, "crossover_batch": crossover,
                     "batches": ",".join(str(int(b)) for b in group.batch_size)})
    return pd.DataFrame(rows)


def figure(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(zip(table.model, table.cache, table.keep)))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharey=False)
    for axis, (model, cache, keep) in zip(axes[0], panels):
        panel = table[(table.model == model) & (table.cache == cache) & (table.keep == keep)]
        for decoding, group in panel.groupby("decoding", sort=False):
            group = group.sort_values("batch_size")
            axis.plot(group.batch_size, 1e3 * group.latency_per_image_s, marker="o", label=decoding,
                      linewidth=2.2 if decoding == "sequential" else 1.3)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_title(f"{model}, {cache} keep={keep}", fontsize=9)
        axis.set_xlabel("batch size")
        axis.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("latency per image (ms)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"Decoding methods vs batch size ({table.device_name.iloc[0]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def passes(args) -> pd.DataFrame:
    """Forward passes per visual token of every PASS_VARIANTS entry (one `benchmark=samples` run each)."""
    import json

    import numpy as np

    rows = []
    for label, overrides in PASS_VARIANTS.items():
        run_dir = args.runs / "passes" / label.replace(" ", "_").replace("=", "-").replace("/", "_")
        command = ["run.py", "benchmark=samples", "model=demo", f"num_samples={args.passes_samples}",
                   f"batch_size={args.passes_samples}", "decode_images=false", f"device={args.device}",
                   *overrides, f"run_dir={run_dir}", *args.overrides]
        if args.dry_run:
            print(" ".join(command))
            continue
        if not args.skip_runs:
            run(command)
        record = json.loads((run_dir / "metrics.json").read_text())
        num_visual = np.load(run_dir / "tokens.npz")["tokens"].shape[1]
        rows.append({"variant": label, "cache": record["cache"], "keep": record["keep"],
                     "num_samples": args.passes_samples,
                     "decode_passes_per_image": record["decode_passes_per_image"],
                     "passes_per_token": record["decode_passes_per_image"] / (num_visual - 1),
                     "fewer_passes_than_sequential": (num_visual - 1) / record["decode_passes_per_image"],
                     "draft_acceptance": record.get("draft_acceptance"),
                     "tokens_fed_per_pass": record.get("tokens_fed_per_pass")})
    return pd.DataFrame(rows)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    split = lambda text: [item for item in text.split(",") if item]  # noqa: E731
    parser.add_argument("--models", type=split, default=["demo"])
    parser.add_argument("--batches", type=lambda text: [int(b) for b in split(text)], default=[1, 2, 4, 8, 16])
    parser.add_argument("--decodings", type=split, default=["sequential", "sjd", "sjd_pp", "gsd", "mc_sjd"])
    parser.add_argument("--rows", type=split, default=["full", "linear@1/4", "linear@1/6"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="timed generations per entry (medians)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("results"), help="relative to the repository root")
    parser.add_argument("--name", default="cpu_decoding_sweep")
    parser.add_argument("--runs", type=Path, default=Path("outputs") / "decoding_sweep")
    parser.add_argument("--skip-runs", action="store_true", help="only gather finished runs under --runs")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run and write nothing")
    parser.add_argument("--passes", action="store_true", help="forward passes per token of every variant instead")
    parser.add_argument("--passes-samples", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="the test's mode: " + str(TINY))
    parser.add_argument("overrides", nargs="*", help="extra run.py overrides, e.g. model.n_layer=2")
    args = parser.parse_args(argv)
    if args.tiny:
        vars(args).update(TINY)
    if 1 != len({"sequential"} & set(args.decodings)):
        parser.error("--decodings must include sequential (the reference each method is compared with)")
    return args


def main(argv: list[str] | None = None) -> pd.DataFrame | None:
    args = parse(argv)
    os.chdir(ROOT)  # relative run folders: the results name no path of this machine
    if args.passes:
        table = passes(args)
        if not args.dry_run:
            args.out.mkdir(parents=True, exist_ok=True)
            table.to_csv(args.out / f"{args.name}_passes.csv", index=False)
            print(table.to_string(index=False))
        return None if args.dry_run else table
    commands = sweep_commands(args)
    if args.dry_run:
        for _, command in commands:
            print(" ".join(command))
        return None
    if not args.skip_runs:
        for _, command in commands:
            run(command)
    table = gather([run_dir for run_dir, _ in commands])
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / f"{args.name}.csv", index=False)
    crossover = crossovers(table)
    crossover.to_csv(args.out / f"{args.name}_crossover.csv", index=False)
    figure(table, args.out / f"{args.name}.png")
    print(crossover.to_string(index=False))
    return table


if __name__ == "__main__":
    main()
