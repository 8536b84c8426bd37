"""Side-by-side cost of cache policies: one process, one model, the same batch and the same labels.

    python scripts/compare_policies.py model=llamagen_b weights=random batch_size=4 keep=1/6 \
        --policies full,window,streamingllm,h2o,linear --out results/cpu_llamagen_b_keep1_6.csv

Arguments without dashes are Hydra overrides of conf/config.yaml. `full` always runs at keep=1; every
other policy at the given keep. Reports generation time (warm-up excluded when --warmup > 0), KV-cache
bytes (allocated and high-water) and peak memory (CUDA allocator peak, or CPU RSS increase over the
loaded model), and ratios against `full`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir

from lineareval.benchmarks.samples import Samples
from lineareval.config import register_resolvers, resolve_device, resolve_dtype
from lineareval.keep import check_budget, parse_keep
from lineareval.record import environment_info
from lineareval.runner import build_generator, build_policy, timed_generation

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", default="full,window,streamingllm,h2o,linear")
    parser.add_argument("--warmup", type=int, default=0, help="untimed generations before the timed ones")
    parser.add_argument("--out", type=Path, help="CSV to write (a JSON with the environment goes beside it)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=args.overrides)
        policies = {name: compose("config", overrides=[*args.overrides, f"cache={name}"]).cache
                    for name in args.policies.split(",")}
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    generator = build_generator(cfg, device, dtype)
    layout = generator.layout
    if generator.conditioning == "text" and not (cfg.prompt or cfg.prompts_file):
        cfg.prompt, cfg.images_per_prompt = DEFAULT_PROMPT, cfg.batch_size  # one prompt, a batch of images
    samples = Samples().samples(cfg, generator)
    if len(samples) < cfg.batch_size:
        raise SystemExit(f"only {len(samples)} samples for batch_size={cfg.batch_size}: add prompts or images_per_prompt")
    ids, labels = samples.batch(0, cfg.batch_size, device)
    rows = []
    for name, cache_cfg in policies.items():
        keep = parse_keep(1 if name == "full" else cfg.keep)
        budget = keep.budget(layout.num_visual)
        policy = build_policy(cache_cfg)
        check_budget(keep, budget, policy.minimum_budget(layout), layout.num_visual, policy=name, model=cfg.model.name)
        for _ in range(args.warmup):
            timed_generation(generator, policy, budget, labels, ids, cfg.seed, device)
        _, cost = timed_generation(generator, policy, budget, labels, ids, cfg.seed, device)
        row = {"model": cfg.model.name, "cache": name, "keep": keep.text, "visual_budget": budget,
               "batch_size": cfg.batch_size, **cost}
        logging.info("%-13s %.2f s", name, row["generation_s"])
        rows.append(row)
    table = pd.DataFrame(rows)
    full = table[table.cache == "full"].iloc[0] if (table.cache == "full").any() else None
    if full is not None:
        table["speedup"] = full.generation_s / table.generation_s
        table["kv_saving"] = 1 - table.kv_cache_capacity_bytes / full.kv_cache_capacity_bytes
        table["peak_saving"] = 1 - table.peak_memory_bytes / full.peak_memory_bytes
    table["images_per_s"] = table.batch_size / table.generation_s
    table["tokens_per_s"] = table.images_per_s * layout.num_visual
    environment = environment_info(device)
    print(f"# {cfg.model.name}, weights={cfg.weights}, dtype={str(dtype).removeprefix('torch.')}, "
          f"device: {environment['device_name']}, batch {cfg.batch_size} images "
          f"({generator.sequences(cfg.batch_size)} sequences with CFG)")
    print(table.drop(columns=["model", "peak_memory_method"]).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.assign(device_name=environment["device_name"], weights=cfg.weights,
                     dtype=str(dtype).removeprefix("torch."), git_commit=environment["git_commit"]).to_csv(
            args.out, index=False)


if __name__ == "__main__":
    main()
