"""Do a run's tokens follow the model's sequential conditionals? The PIT test of lineareval/decoding/goodness.py.

    python scripts/decoding_exactness.py RUN_FOLDER [RUN_FOLDER ...] [--out results/NAME.csv]

Each run folder (a finished class-conditional run: config.yaml, tokens.npz) is re-read under its own model,
sampling, cache policy and budget, one token at a time; one row per run: its decoding, seed, the mean PIT (1/2
for an exact sampler, z and p), Kolmogorov-Smirnov against U(0, 1), the 10-bin chi-square and the mean log p
per token. A distribution-preserving method should look like sequential decoding here; GSD, a lower
temperature or a biased coupling do not.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from lineareval.config import resolve_device, resolve_dtype
from lineareval.decoding.goodness import pit_summary, score_tokens
from lineareval.factory import build_budgets, build_generator, build_policy


def score_run(folder: Path) -> dict:
    for name in ("config.yaml", "tokens.npz"):
        if not (folder / name).is_file():
            raise SystemExit(f"{folder / name} is missing: pass a finished run's folder (run.py writes both)")
    cfg = OmegaConf.load(folder / "config.yaml")
    saved = np.load(folder / "tokens.npz")
    if "labels" not in saved:
        raise SystemExit(f"{folder / 'tokens.npz'} has no class labels: only class-conditional runs are scored")
    device = resolve_device(cfg.device)
    policy = build_policy(cfg.cache)
    generator = build_generator(cfg, device, resolve_dtype(cfg.dtype, device))
    budgets = build_budgets(cfg, policy, generator)
    tokens, labels = torch.from_numpy(saved["tokens"]), torch.from_numpy(saved["labels"])
    log_p, pit = score_tokens(generator, policy, budgets, labels.to(device), torch.arange(len(tokens), device=device),
                              tokens, int(cfg.seed))
    return {"run": folder.name, "model": cfg.model.name, "cache": cfg.cache.name, "keep": str(cfg.keep),
            "decoding": cfg.decoding.name, "seed": int(cfg.seed), **pit_summary(log_p, pit)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=None, help="a CSV to write (default: print only)")
    args = parser.parse_args()
    table = pd.DataFrame([score_run(folder) for folder in args.runs])
    print(table.to_string(index=False))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
