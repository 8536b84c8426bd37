"""Factories from a composed config: the policy, the decoding method, the budgets, the generator, and one timed
generation. The runner, the benchmarks and the Python API (api.py) build through these."""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig, OmegaConf

from lineareval.cache import CachePolicy
from lineareval.cache.allocation import Budgets, allocate
from lineareval.config import call_target
from lineareval.decoding.method import DecodingMethod
from lineareval.keep import check_budget, parse_keep
from lineareval.memory import PeakMemory, keep_freed_heap

def build_policy(cache_cfg: DictConfig) -> CachePolicy:
    """Instantiate `conf/cache/<name>.yaml`, named by its Hydra choice (`name` is not a policy field)."""
    return call_target(cache_cfg, exclude=("name",)).named(cache_cfg.name)


def build_decoding(decoding_cfg: DictConfig) -> DecodingMethod:
    """Instantiate `conf/decoding/<name>.yaml`: a `DecodingMethod` (sequential, or a speculative one)."""
    method = call_target(decoding_cfg, exclude=("name",))
    if not isinstance(method, DecodingMethod):
        raise TypeError(f"decoding={decoding_cfg.get('name')}: _target_ {decoding_cfg.get('_target_')} is not a "
                        "lineareval.decoding.method.DecodingMethod")
    return method.named(decoding_cfg.name)


def build_budgets(cfg: DictConfig, policy: CachePolicy, generator, keep: str | int | None = None,
                  allocation: DictConfig | None = None) -> Budgets:
    """B = floor(keep * N) (the run's `keep` unless given), checked against what `policy` protects, spread over the
    model's layers (and heads) by `allocation` (a conf/budget_allocation/ config; the run's unless given)."""
    parsed = parse_keep(cfg.keep if keep is None else keep)
    layout, name = generator.layout, policy.name
    budget = parsed.budget(layout.num_visual)
    check_budget(parsed, budget, policy.minimum_budget(layout), layout.num_visual, policy=name, model=cfg.model.name,
                 fields=policy.describe())
    spec = generator.model.cache_spec()
    node = cfg.get("budget_allocation") if allocation is None else allocation
    return allocate(node, budget, layers=spec["num_layers"], heads=spec["heads"], layout=layout, policy=policy,
                    model=cfg.model.name)


def build_generator(cfg: DictConfig, device: torch.device, dtype: torch.dtype):
    """The model of `conf/model/<name>.yaml` (a `Generator`), with the run's sampling, weights and compile choices
    (the decoding method is chosen per generation: `build_decoding`)."""
    if device.type == "cpu":
        keep_freed_heap()  # decode steps' large temporaries reuse heap pages instead of faulting fresh ones
    return call_target(cfg.model, sampling=OmegaConf.to_container(cfg.sampling, resolve=True), weights=cfg.weights,
                       weights_dir=cfg.weights_dir, download=cfg.download, device=device, dtype=dtype, seed=cfg.seed,
                       compile=cfg.compile, compile_backend=cfg.compile_backend)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generation(generator, policy: CachePolicy, budget: int | Budgets, conditions, sample_ids: torch.Tensor,
                     seed: int, device: torch.device, method: DecodingMethod) -> tuple[torch.Tensor, dict]:
    """Generate one batch (fresh caches) with decoding `method`; returns tokens (B, N) and its cost, with what ran
    (`decoding`: the method's name, `decoding_method`: its description) and its statistics (forward passes per
    image, tokens per pass).

    `conditions` are what the generator takes: class labels (B,) or prompts. Peak memory covers the
    cache allocation and the whole generation: the CUDA allocator's peak
    (weights included), or on CPU the RSS increase over the loaded model.
    """
    with PeakMemory(device) as memory:
        _synchronize(device)
        began = time.perf_counter()
        generation = generator.generate(conditions, sample_ids, policy, budget, seed, method)
        _synchronize(device)
        seconds = time.perf_counter() - began
    return generation.tokens, {**generation.stats, "decoding_method": generation.method, "generation_s": seconds,
                               "kv_cache_capacity_bytes": generation.capacity_bytes(),
                               "prefix_len": max(cache.layout.prefix_len for cache in generation.caches),
                               "kv_cache_high_water_bytes": generation.high_water_bytes(),
                               "peak_memory_bytes": memory.peak_bytes if device.type == "cuda"
                               else memory.peak_increase_bytes, "peak_memory_method": memory.method}
