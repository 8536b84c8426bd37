"""The Python API: the same Hydra configs as `run.py`, a model under a cache policy, images and their cost.

    import lineareval

    pipe = lineareval.load("demo", cache="linear", keep="1/4")    # conf/model/demo.yaml, conf/cache/linear.yaml
    out = pipe.generate(labels=[0, 3, 7], seed=0)                 # or prompts=[...] for a text model
    out.images.shape, out.tokens.shape                            # (3, 32, 32, 3) uint8, (3, 256)
    out.record["kv_cache_capacity_bytes"], out.record["generation_s"]

`load` composes `conf/config.yaml` with the given choices and any Hydra override
(`lineareval.load("llamagen_xl", "sampling.top_k=1", weights="random", cache="h2o", keep="1/6")`);
sample i of a call still depends only on (seed, its sample id), so the same seed gives the same
images as `run.py`. The runner, the benchmarks and this API build through `lineareval.factory`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from lineareval.cache import CachePolicy
from lineareval.cache.allocation import Budgets
from lineareval.compose import compose_config, config_options, policy_colors, policy_names
from lineareval.config import resolve_device, resolve_dtype
from lineareval.decoding.method import DecodingMethod
from lineareval.factory import build_budgets, build_decoding, build_generator, build_policy, timed_generation
from lineareval.threads import cpu_info
from lineareval.validation import generation_inputs

__all__ = ["Output", "Pipeline", "compose_config", "config_options", "load", "policy_colors", "policy_names"]


@dataclass
class Output:
    """What `Pipeline.generate` returns: tokens (B, N) int64, images (B, H, W, 3) uint8 (None without a decoder
    or with `decode=False`), and the record of its cost (time, KV-cache bytes, peak memory)."""

    tokens: np.ndarray
    images: np.ndarray | None
    record: dict


@dataclass
class Pipeline:
    """A loaded model under one cache policy and budget (what `load` returns)."""

    cfg: DictConfig
    generator: object
    policy: CachePolicy
    budget: int
    device: torch.device
    budgets: Budgets | None = None  # how `budget_allocation` spread B over layers and heads (None: uniform)
    decoding: DecodingMethod | None = None  # `decoding=...` (None: the config's)

    def __post_init__(self) -> None:
        if self.decoding is None:
            self.decoding = build_decoding(self.cfg.decoding)

    def generate(self, labels=None, prompts: list[str] | None = None, seed: int | None = None,
                 sample_ids=None, decode: bool | None = None) -> Output:
        """Class labels (class-conditional models) or prompts (text models) -> tokens, images and cost. Sample k
        draws its randomness from (seed, sample_ids[k]) (default 0..B-1), as sample k of a run does; `decode`
        (default: the config's `decode_images`) turns the tokens into images."""
        conditions, ids, seed = generation_inputs(self.generator, self.cfg.model.name, labels, prompts, sample_ids,
                                                  self.cfg.seed if seed is None else seed, self.device)
        count = len(conditions)
        tokens, cost = timed_generation(self.generator, self.policy, self.budgets or self.budget, conditions, ids,
                                        seed, self.device, self.decoding)
        images = None
        if self.cfg.decode_images if decode is None else decode:
            images = self.generator.decode_images(tokens).cpu().numpy()
        record = {"model": self.cfg.model.name, "cache": self.cfg.cache.name, "keep": str(self.cfg.keep),
                  "visual_budget": self.budget, "batch_size": count, "policy": self.policy.describe(),
                  **(self.budgets.describe() if self.budgets else {"budget_allocation": "uniform"}),
                  **{key: value for key, value in cost.items() if key != "decoding_method"},
                  "decoding": cost["decoding_method"], **cpu_info()}
        return Output(tokens.cpu().numpy(), images, record)


def load(model: str = "demo", *overrides: str, cache: str = "full", keep: str | int = 1, **fields) -> Pipeline:
    """Load `conf/model/<model>.yaml` under `conf/cache/<cache>.yaml` at budget `keep`; further Hydra overrides as
    strings ("sampling.top_k=1") or keywords for top-level fields (weights="random", device="cpu")."""
    cfg = compose_config(f"model={model}", f"cache={cache}", f"keep={keep}", *overrides,
                         *(f"{key}={value}" for key, value in fields.items()))
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    policy = build_policy(cfg.cache)
    generator = build_generator(cfg, device, dtype)
    budgets = build_budgets(cfg, policy, generator)
    return Pipeline(cfg, generator, policy, budgets.visual_budget, device, budgets, build_decoding(cfg.decoding))
