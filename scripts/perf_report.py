"""Every measurement of the performance report on this machine, in one go, into `results/`.

    python scripts/perf_report.py --official PATH/TO/LlamaGen [--out results] [--runs outputs/perf]
        [--skip-official] [--batch 32] [--official-batch 16] [--repeats 3]

1. The CPU efficiency benchmark (conf/model/llamagen_cpu.yaml: 8 layers, dim 512, 384 px, random
   weights, fp32, `--batch` images with CFG), all five policies at keeps 1/4 and 1/6, compile off
   and on, each in its own process (`run.py benchmark=efficiency`, `--repeats` timed generations per
   policy, medians), into `--runs`.
2. `scripts/roofline.py` on both runs.
3. `scripts/official_speed.py`: the official LlamaGen loop vs ours, full cache, no compile, same
   config, `--official-batch` images.
4. The per-step latency figure and a table of the issue's targets.

Writes `cpu_efficiency.csv` (both runs' rows), `cpu_step_latency.csv` (per-step times, the columns of
scripts/collect.py's step_latency.csv), `cpu_step_latency.png`, `cpu_roofline.csv`,
`official_speed_cpu{.csv,_steps.csv,.png}` and `cpu_perf_targets.csv` (target, configuration, value,
threshold, met). About 55 minutes on two idle cores (repeats 3); the CPU must not be shared while it runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from collect import collect_step_latency  # noqa: E402



def run(*command: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print("+", " ".join(command), flush=True)
    subprocess.run([sys.executable, *command], check=True, cwd=ROOT, env=env)


def efficiency_run(run_dir: Path, batch: int, compile: bool, repeats: int) -> None:
    run("run.py", "benchmark=efficiency", "model=llamagen_cpu", "weights=random", "dtype=float32",
        "device=cpu", f"num_samples={batch}", f"batch_size={batch}", "decode_images=false", f"compile={compile}",
        f"benchmark.repeats={repeats}", f"run_dir={run_dir}", "force=true")


def latency_figure(steps: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(steps.run_dir))
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), sharey=True, squeeze=False)
    for axis, run_dir in zip(axes[0], runs):
        table = steps[steps.run_dir == run_dir]
        for (cache, keep), group in table.groupby(["cache", "keep"], sort=False):
            if keep not in ("1", "1/6"):
                continue
            smooth = group.seconds.rolling(9, center=True, min_periods=1).median()
            axis.plot(group.step, 1e3 * smooth, label=f"{cache} {keep}", linewidth=1.2 if cache != "full" else 2)
        axis.set_title(f"{Path(run_dir).name} ({table.device_name.iloc[0]})", fontsize=9)
        axis.set_xlabel("visual token (step)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("ms per step (rolling median of 9)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Per-token decode latency: full grows with the token index, bounded caches stay flat", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def targets(efficiency: pd.DataFrame, roofline: pd.DataFrame, official: pd.DataFrame | None) -> pd.DataFrame:
    """The issue's targets, each with the measured value and whether it is met."""
    rows = []

    def add(target: str, configuration: str, value: float, threshold: str, met: bool) -> None:
        rows.append({"target": target, "configuration": configuration, "value": value, "threshold": threshold,
                     "met": bool(met)})

    if official is not None:
        speedup = official.set_index("loop").speedup_vs_official.drop("official").iloc[0]
        add("full throughput vs official loop", f"batch {official.batch_size.iloc[0]}, no compile", speedup, ">= 3",
            speedup >= 3)
    for compile, table in efficiency.groupby("compile"):
        mode = "compile" if compile else "eager"
        rows_by = table.set_index(["cache", "keep"])
        full = rows_by.loc[("full", "1")]
        linear, window = rows_by.loc[("linear", "1/6")], rows_by.loc[("window", "1/6")]
        ratio = linear.generation_s / window.generation_s
        add("linear 1/6 time / window 1/6 time", mode, ratio, "<= 1.10", ratio <= 1.10)
        for (cache, keep), row in rows_by.iterrows():
            growth = row.step_s_last_line / row.step_s_line5
            if cache == "full":
                add("full: last-line / line-5 step time", mode, growth, "> 1.10 (grows)", growth > 1.10)
            elif keep == "1/6":
                add(f"{cache} {keep}: last-line / line-5 step time", mode, growth, "within 0.90..1.10",
                    0.9 <= growth <= 1.1)
        memory = linear.peak_memory_bytes / full.peak_memory_bytes
        add("linear 1/6 peak memory / full", mode, memory, "<= 0.40", memory <= 0.40)
        add("largest batch under 16 GiB: full", mode, full.max_batch_at_limit, "reported", True)
        add("largest batch under 16 GiB: linear 1/6", mode, linear.max_batch_at_limit, "reported", True)
        bound = roofline[roofline.compile == compile].set_index(["cache", "keep"])
        for key in (("full", "1"), ("linear", "1/6")):
            if key in bound.index:
                fraction = bound.loc[key].fraction_of_bound
                add(f"{key[0]} {key[1]}: roofline bound / measured", mode, fraction, ">= 0.50", fraction >= 0.5)
                for column, what in (("fraction_of_serial_bound", "serial bound"), ("fraction_of_floor", "floor")):
                    if column in bound.columns:
                        add(f"{key[0]} {key[1]}: {what} / measured", mode, bound.loc[key][column], "reported", True)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", help="path to a LlamaGen checkout (for the official-loop comparison)")
    parser.add_argument("--skip-official", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results"), help="relative to the repository root")
    parser.add_argument("--runs", type=Path, default=Path("outputs") / "perf", help="relative to the repository root")
    parser.add_argument("--batch", type=int, default=32, help="images of the efficiency runs (CFG doubles them)")
    parser.add_argument("--official-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed generations per policy; latencies are their medians (one VM's timings drift)")
    args = parser.parse_args()
    if not args.skip_official and not args.official:
        parser.error("give --official PATH (a LlamaGen checkout) or --skip-official")
    official_path = str(Path(args.official).resolve()) if args.official else None
    os.chdir(ROOT)  # relative run folders: the results name no path of this machine
    out, runs = args.out, args.runs
    out.mkdir(parents=True, exist_ok=True)
    run_dirs = {compile: runs / f"llamagen_cpu_{'compiled' if compile else 'eager'}" for compile in (False, True)}
    for compile, run_dir in run_dirs.items():
        efficiency_run(run_dir, args.batch, compile, args.repeats)
    run("scripts/roofline.py", *map(str, run_dirs.values()), "--out", str(out / "cpu_roofline.csv"))
    official = None
    if not args.skip_official:
        run("scripts/official_speed.py", "--official", official_path, "--batch",
            str(args.official_batch), "--out", str(out), "--name", "official_speed_cpu")
        official = pd.read_csv(out / "official_speed_cpu.csv")
    efficiency = pd.concat([pd.read_csv(run_dir / "efficiency.csv", dtype={"keep": str}).assign(run_dir=str(run_dir))
                            for run_dir in run_dirs.values()])
    efficiency.to_csv(out / "cpu_efficiency.csv", index=False)
    steps = collect_step_latency(list(run_dirs.values()))
    steps.to_csv(out / "cpu_step_latency.csv", index=False)
    latency_figure(steps, out / "cpu_step_latency.png")
    table = targets(efficiency, pd.read_csv(out / "cpu_roofline.csv", dtype={"keep": str}), official)
    table.to_csv(out / "cpu_perf_targets.csv", index=False)
    print(table.to_string(index=False, float_format=lambda value: f"{value:.3g}"))


if __name__ == "__main__":
    main()
