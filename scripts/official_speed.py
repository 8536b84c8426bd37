"""Time the official LlamaGen generation loop against ours: same weights, batch, resolution and dtype.

    python scripts/official_speed.py --official PATH [--dim 512 --n-layer 8 --n-head 8 --image-size 384]
        [--batch 16] [--out results] [--name official_speed_cpu]

PATH is a checkout of https://github.com/FoundationVision/LlamaGen; its `autoregressive/models/{gpt,generate}.py`
are imported from there, never copied (see scripts/check_official_parity.py, whose loading code this
reuses: the official c2i Transformer with a random init, loaded strictly into ours). Both loops run
eagerly (no compile) with a full cache and the FID protocol's sampling (CFG 1.75 on [cond; uncond]
rows, top-k 0, top-p 1, temperature 1): the official `generate` with its static cache, mask over all
slots and multinomial sampling; ours with `Full()` and counter-hash Gumbel sampling. Each loop runs
once after a one-image warm-up of both (kernel selection, allocator). Per-step times: ours from
`StepTimer`, the official loop's by wrapping its module-level `prefill` and `decode_one_token` (time
between the returns of consecutive calls; step i = sampling token i and feeding it, in both loops).

Writes `<name>.csv` (one row per loop: seconds, seconds per token, images/s, speed-up over the
official loop, device), `<name>_steps.csv` (loop, step, seconds) and `<name>.png` (total time and
per-step latency of both loops) under `--out`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from check_official_parity import (DOWNSAMPLE, NUM_CLASSES, build_models, describe_device, import_official,
                                   official_generate_shims, synchronize)
from lineareval.cache.full import Full
from lineareval.decoding.decoder import StepTimer
from lineareval.decoding.method import Sequential
from lineareval.generators.base import Generator
from lineareval.generators.llamagen import LlamaGenFamily
from lineareval.record import environment_info
from lineareval.sampling import SamplingConfig

CFG_SCALE = 1.75


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, help="path to a LlamaGen checkout (read-only)")
    parser.add_argument("--size", choices=["B", "L", "XL", "XXL", "3B"], help="named size (overrides --dim etc.)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--n-head", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=16, help="images; CFG doubles the sequences")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--name", default="official_speed_cpu")
    args = parser.parse_args()
    if args.size is not None:
        args.dim = args.n_layer = args.n_head = None
    if args.image_size % DOWNSAMPLE:
        parser.error(f"--image-size must be a multiple of {DOWNSAMPLE}")
    return args


class OfficialStepClock:
    """Wraps the official module's `prefill` and `decode_one_token` to record when each call returns."""

    def __init__(self, module, device: str):
        self.module, self.device = module, device
        self.originals = {name: getattr(module, name) for name in ("prefill", "decode_one_token")}
        self.marks: list[float] = []

    def __enter__(self) -> OfficialStepClock:
        for name, original in self.originals.items():
            setattr(self.module, name, self._timed(original))
        return self

    def _timed(self, function):
        def timed(*args, **kwargs):
            result = function(*args, **kwargs)
            synchronize(self.device)
            self.marks.append(time.perf_counter())
            return result

        return timed

    def __exit__(self, *exc) -> None:
        for name, original in self.originals.items():
            setattr(self.module, name, original)

    def seconds(self) -> list[float]:
        """Step i: from the return of the previous call (the prefill for i = 0) to the return of decode i."""
        return [end - start for start, end in zip(self.marks, self.marks[1:])]


def time_official(official, reference, labels: torch.Tensor, num_visual: int, device: str) -> tuple[float, list[float]]:
    module = sys.modules["autoregressive.models.generate"]  # imported by import_official
    with official_generate_shims(), OfficialStepClock(module, device) as clock:
        synchronize(device)
        began = time.perf_counter()
        official.generate(reference, labels, num_visual, cfg_scale=CFG_SCALE, cfg_interval=-1, temperature=1.0,
                          top_k=0, top_p=1.0, sample_logits=True)
        synchronize(device)
        seconds = time.perf_counter() - began
    for layer in reference.layers:
        layer.attention.kv_cache = None
    return seconds, clock.seconds()


def time_ours(ours, labels: torch.Tensor, device: str, seed: int) -> tuple[float, list[float]]:
    family = LlamaGenFamily(ours.layout, ours.config.num_classes, None)
    generator = Generator.assemble("official-speed", ours, family, SamplingConfig(CFG_SCALE, -1, 1.0, 0, 1.0),
                                   "random")
    num_visual = ours.layout.num_visual
    timer = StepTimer(num_visual - 1, torch.device(device))
    synchronize(device)
    began = time.perf_counter()
    generator.generate(labels, torch.arange(len(labels), device=labels.device), Full(), num_visual, seed, Sequential(), timer=timer)
    synchronize(device)
    return time.perf_counter() - began, timer.seconds()


def figure(table: pd.DataFrame, steps: pd.DataFrame, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 2]})
    bars.bar(table.loop, table.seconds, color=["#999999", "#1f77b4"])
    for x, row in enumerate(table.itertuples()):
        bars.text(x, row.seconds, f"{row.seconds:.1f} s\n{row.speedup_vs_official:.2f}x", ha="center", va="bottom")
    bars.set_ylabel("seconds per batch")
    bars.set_ylim(0, table.seconds.max() * 1.25)
    for loop, group in steps.groupby("loop", sort=False):
        curves.plot(group.step, 1e3 * group.seconds, label=loop, linewidth=0.8)
    curves.set_xlabel("visual token (step)")
    curves.set_ylabel("ms per step")
    curves.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    official = import_official(args.official)
    reference, ours = build_models(official, args)
    torch.manual_seed(args.seed)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,)).to(args.device)
    num_visual = ours.layout.num_visual
    device_name = environment_info(torch.device(args.device))["device_name"]
    print(f"model dim {ours.config.dim}, {ours.config.n_layer} layers, {ours.config.image_size} px ({num_visual} "
          f"tokens), {args.dtype}, batch {args.batch} images ({2 * args.batch} sequences), "
          f"{describe_device(args.device)}")
    with torch.inference_mode():
        time_official(official, reference, labels[:1], num_visual, args.device)  # warm-up, untimed
        time_ours(ours, labels[:1], args.device, args.seed)
        official_seconds, official_steps = time_official(official, reference, labels, num_visual, args.device)
        ours_seconds, our_steps = time_ours(ours, labels, args.device, args.seed)
    rows = []
    for loop, seconds in (("official", official_seconds), ("ours (full cache)", ours_seconds)):
        rows.append({"loop": loop, "batch_size": args.batch, "sequences": 2 * args.batch, "dim": ours.config.dim,
                     "n_layer": ours.config.n_layer, "image_size": ours.config.image_size, "dtype": args.dtype,
                     "compile": False, "seconds": seconds, "seconds_per_token": seconds / num_visual,
                     "images_per_s": args.batch / seconds, "speedup_vs_official": official_seconds / seconds,
                     "device_name": device_name})
    table = pd.DataFrame(rows)
    steps = pd.concat([pd.DataFrame({"loop": loop, "step": range(len(seconds)), "seconds": seconds})
                       for loop, seconds in (("official", official_steps), ("ours (full cache)", our_steps))])
    steps["device_name"] = device_name
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / f"{args.name}.csv", index=False)
    steps.to_csv(args.out / f"{args.name}_steps.csv", index=False)
    title = (f"LlamaGen dim {ours.config.dim} x {ours.config.n_layer} layers, {ours.config.image_size} px, batch "
             f"{args.batch} (+CFG), {args.dtype}, no compile; {device_name}")
    figure(table, steps, title, args.out / f"{args.name}.png")
    print(table[["loop", "seconds", "seconds_per_token", "images_per_s", "speedup_vs_official"]].to_string(index=False))
    print(f"-> {args.out / args.name}.csv, _steps.csv, .png")


if __name__ == "__main__":
    main()
