"""Attention cost of adaptive_heads' store layouts, side by side: packed pool (lineareval/cache/packed.py) vs dense.

    python scripts/packed_attention_speed.py [--sequences 100] [--steps 200] [--calls 50] [--out results]

Builds the demo model's shape (random weights: 4 layers, 3 heads of 64 dims, 16 x 16 tokens, fp32), decodes
`--steps` random tokens for `--sequences` sequences under each layout at keep 1/4 (LineAR and H2O: the
fused and the explicit-probability attention), then times `--calls` calls of one layer's `attend` on the
same query, layouts alternated call by call, and writes `<out>/packed_attention_cpu.csv` (median seconds a
call, and the ratio packed / dense, measured in one process).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from lineareval.cache.allocation import adaptive_heads, uniform
from lineareval.compose import compose_config
from lineareval.decoding.stepper import Stepper
from lineareval.factory import build_policy
from lineareval.models.llamagen import LlamaGen, LlamaGenConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=100)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LlamaGen(LlamaGenConfig(dim=192, n_layer=4, n_head=3, vocab_size=512, num_classes=10, image_size=32,
                                    downsample_size=2)).eval()
    layout, stepper = model.layout, Stepper(model)
    labels = torch.arange(args.sequences) % 10
    tokens = torch.randint(0, 512, (args.sequences, layout.num_visual))
    rows = []
    for name in ("linear", "h2o"):
        policy = build_policy(compose_config(f"cache={name}").cache)
        budget = layout.num_visual // 4
        packed_budgets = adaptive_heads(budget, 4, 3, layout, policy)
        layouts = {"uniform": uniform(budget, 4, 3, layout, policy), "packed": packed_budgets,
                   "dense": dataclasses.replace(packed_budgets, packed_heads=False)}
        caches = {}
        with torch.inference_mode():
            for label, budgets in layouts.items():
                cache = stepper.new_cache(policy, budgets, args.sequences, layout)
                stepper.prefill(labels, cache)
                for index in range(args.steps):
                    stepper.decode(tokens[:, index], index, cache)
                cache.begin_step(args.steps)  # an open step, as attention sees it
                caches[label] = cache
            query = torch.randn(args.sequences, 3, 1, 64)
            times = {label: [] for label in caches}
            for _ in range(args.calls):
                for label, cache in caches.items():
                    began = time.perf_counter()
                    cache.layers[0].attend(query)
                    times[label].append(time.perf_counter() - began)
        medians = {label: statistics.median(values) for label, values in times.items()}
        for label, cache in caches.items():
            rows.append({"cache": name, "layout": label, "sequences": args.sequences, "step": args.steps,
                         "attended_width": cache.state.width, "attend_s": medians[label],
                         "vs_dense": medians[label] / medians["dense"], "vs_uniform": medians[label] / medians["uniform"],
                         "calls": args.calls, "threads": torch.get_num_threads()})
    args.out.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    table = pd.DataFrame(rows)
    table.to_csv(args.out / "packed_attention_cpu.csv", index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
