"""The paper's efficiency table: full and the chosen policies, one process, the same batch and inputs.

    python run.py benchmark=efficiency model=llamagen_xl weights=random batch_size=256

For each policy (and each keep, `full` at keep=1), one untimed warm-up generation, then one timed
generation of the same batch: peak memory (CUDA allocator peak, or CPU RSS increase), KV-cache bytes,
latency of the batch, throughput, and speedup / memory saving against `full`. Rows go to
`efficiency.csv` and `metrics.json` in the run folder, and the table is printed in the paper's layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from lineareval.benchmarks.samples import Samples
from lineareval.keep import check_budget, parse_keep

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"


@dataclass
class Efficiency:
    """`policies`: names of conf/cache/*.yaml; `keeps`: budgets for every policy but `full`."""

    policies: list[str] = field(default_factory=lambda: ["full", "window", "streamingllm", "h2o", "linear"])
    keeps: list[str] = field(default_factory=lambda: ["1/4", "1/6"])
    warmup: int = 1
    prompt: str = DEFAULT_PROMPT

    def run_suite(self, cfg, generator, device) -> list[dict]:
        from lineareval.runner import build_policy, timed_generation

        if generator.conditioning == "text" and not (cfg.prompt or cfg.prompts_file):
            cfg.prompt, cfg.images_per_prompt = self.prompt, cfg.batch_size  # one prompt, a batch of images
        samples = Samples().samples(cfg, generator)
        if len(samples) < cfg.batch_size:
            raise ValueError(f"only {len(samples)} samples for batch_size={cfg.batch_size}: raise num_samples, "
                             "add prompts or images_per_prompt")
        ids, conditions = samples.batch(0, cfg.batch_size, device)
        layout, rows = generator.layout, []
        for name in self.policies:
            path = CONF_DIR / "cache" / f"{name}.yaml"
            if not path.exists():
                raise FileNotFoundError(f"benchmark.policies names {name!r} but {path} does not exist")
            policy = build_policy(OmegaConf.load(path))
            for text in (["1"] if name == "full" else self.keeps):
                keep = parse_keep(text)
                budget = keep.budget(layout.num_visual)
                check_budget(keep, budget, policy.minimum_budget(layout), layout.num_visual, policy=name,
                             model=cfg.model.name)
                for _ in range(self.warmup):
                    timed_generation(generator, policy, budget, conditions, ids, cfg.seed, device)
                _, cost = timed_generation(generator, policy, budget, conditions, ids, cfg.seed, device)
                log.info("%s keep=%s: %.2f s, peak %.2f GB", name, keep.text, cost["generation_s"],
                         cost["peak_memory_bytes"] / 1e9)
                rows.append({"model": cfg.model.name, "cache": name, "keep": keep.text, "visual_budget": budget,
                             "batch_size": cfg.batch_size, "sequences": generator.sequences(cfg.batch_size),
                             **cost, "images_per_s": cfg.batch_size / cost["generation_s"],
                             "tokens_per_s": cfg.batch_size * layout.num_visual / cost["generation_s"]})
        return add_ratios(rows)


def add_ratios(rows: list[dict]) -> list[dict]:
    """Speedup and memory saving against the `full` row (when present)."""
    full = next((row for row in rows if row["cache"] == "full"), None)
    for row in rows:
        if full is not None:
            row["speedup"] = full["generation_s"] / row["generation_s"]
            row["memory_saving"] = 1 - row["peak_memory_bytes"] / full["peak_memory_bytes"]
            row["kv_saving"] = 1 - row["kv_cache_capacity_bytes"] / full["kv_cache_capacity_bytes"]
    return rows


def paper_table(rows: list[dict]) -> str:
    """model | method | keep | B | batch | memory | saving | latency | speedup (+ throughput)."""
    table = pd.DataFrame([{
        "model": row["model"], "method": row["cache"], "keep": row["keep"], "B": row["visual_budget"],
        "batch": row["batch_size"], "memory_GB": row["peak_memory_bytes"] / 1e9,
        "saving": f"{100 * row.get('memory_saving', 0):.2f}%", "latency_s": row["generation_s"],
        "speedup": f"{row.get('speedup', 1):.2f}x", "images_per_s": row["images_per_s"]} for row in rows])
    return table.to_string(index=False, float_format=lambda value: f"{value:.3g}")
