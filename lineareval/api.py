"""The Python API: the same Hydra configs as `run.py`, a model under a cache policy, images and their cost.

    import lineareval

    pipe = lineareval.load("demo", cache="linear", keep="1/4")    # conf/model/demo.yaml, conf/cache/linear.yaml
    out = pipe.generate(labels=[0, 3, 7], seed=0)                 # or prompts=[...] for a text model
    out.images.shape, out.tokens.shape                            # (3, 32, 32, 3) uint8, (3, 256)
    out.record["kv_cache_capacity_bytes"], out.record["generation_s"]

`load` composes `conf/config.yaml` with the given choices and any Hydra override
(`lineareval.load("llamagen_xl", "sampling.top_k=1", weights="random", cache="h2o", keep="1/6")`);
sample i of a call still depends only on (seed, its sample id), so the same seed gives the same
images as `run.py`. The runner and the benchmarks build their policies and models here too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lineareval.cache import CachePolicy
from lineareval.cache.allocation import Budgets, allocate
from lineareval.config import call_target, resolve_device, resolve_dtype
from lineareval.identity import register_resolvers
from lineareval.keep import check_budget, parse_keep
from lineareval.memory import PeakMemory, keep_freed_heap
from lineareval.threads import cpu_info
from lineareval.validation import generation_inputs

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
BASELINE = "full"  # the cache every policy is compared with: listed first


def compose_config(*overrides: str, return_hydra_config: bool = False) -> DictConfig:
    """`conf/config.yaml` composed by Hydra with `overrides` (inside a running Hydra app, with its search path)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def config_options(group: str) -> list[str]:
    """The options of a config group, as Hydra sees them (the group's folder is the registry)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    if GlobalHydra.instance().is_initialized():
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group, ObjectType.CONFIG))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group, ObjectType.CONFIG))


def policy_names() -> list[str]:
    """Every cache policy in `conf/cache/`: the full-cache baseline first, then the others by name. Sweeps,
    tables, reports and figures take their policies from here (or from Hydra's `glob(*)` over the group)."""
    names = config_options("cache")
    return [name for name in names if name == BASELINE] + [name for name in names if name != BASELINE]


def policy_colors() -> dict[str, str]:
    """A matplotlib colour per policy of `conf/cache/` (full in black), for the notebooks' figures."""
    others = [name for name in policy_names() if name != BASELINE]
    return {BASELINE: "black", **{name: f"C{index % 10}" for index, name in enumerate(others)}}


def group_config(cfg: DictConfig, group: str, name: str) -> DictConfig:
    """`conf/<group>/<name>.yaml` composed by Hydra into a copy of the run's config `cfg`, so its
    interpolations (`${seed}`, `${model...}`) resolve against the run as they would with `<group>=<name>`."""
    node = compose_config(f"{group}={name}")[group]
    run = copy.deepcopy(cfg)
    OmegaConf.set_struct(run, False)
    run[group] = node
    return run[group]


def policy_config(cfg: DictConfig, name: str) -> DictConfig:
    """`group_config(cfg, "cache", name)`: a policy's config as `cache=<name>` would compose it in this run."""
    return group_config(cfg, "cache", name)


def build_policy(cache_cfg: DictConfig) -> CachePolicy:
    """Instantiate `conf/cache/<name>.yaml`; `name` labels the record and is not a policy field."""
    return call_target(cache_cfg, exclude=("name",))


def build_decoding(decoding_cfg: DictConfig):
    """Instantiate `conf/decoding/<name>.yaml`: sequential, or a speculative method."""
    return call_target(decoding_cfg)


def build_budgets(cfg: DictConfig, policy: CachePolicy, generator, keep: str | int | None = None,
                  policy_name: str | None = None, allocation: DictConfig | None = None) -> Budgets:
    """B = floor(keep * N) (the run's `keep` unless given), checked against what `policy` protects, spread over the
    model's layers (and heads) by `allocation` (a conf/budget_allocation/ config; the run's unless given)."""
    parsed = parse_keep(cfg.keep if keep is None else keep)
    layout, name = generator.layout, policy_name or cfg.cache.name
    budget = parsed.budget(layout.num_visual)
    check_budget(parsed, budget, policy.minimum_budget(layout), layout.num_visual, policy=name, model=cfg.model.name,
                 fields=policy.describe())
    spec = generator.model.cache_spec()
    node = cfg.get("budget_allocation") if allocation is None else allocation
    return allocate(node, budget, layers=spec["num_layers"], heads=spec["heads"], layout=layout, policy=policy,
                    policy_name=name, model=cfg.model.name)


def build_generator(cfg: DictConfig, device: torch.device, dtype: torch.dtype):
    """The model of `conf/model/<name>.yaml` (a `Generator`), with the run's sampling, weights, decoding method
    and compile choices."""
    if device.type == "cpu":
        keep_freed_heap()  # decode steps' large temporaries reuse heap pages instead of faulting fresh ones
    return call_target(cfg.model, sampling=OmegaConf.to_container(cfg.sampling, resolve=True), weights=cfg.weights,
                       weights_dir=cfg.weights_dir, download=cfg.download, device=device, dtype=dtype, seed=cfg.seed,
                       compile=cfg.compile, compile_backend=cfg.compile_backend,
                       decoding=build_decoding(cfg.decoding))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generation(generator, policy: CachePolicy, budget: int | Budgets, conditions, sample_ids: torch.Tensor,
                     seed: int, device: torch.device, method=None) -> tuple[torch.Tensor, dict]:
    """Generate one batch (fresh caches) with the generator's decoding method (or `method`); returns tokens
    (B, N) and its cost, with the method's statistics (forward passes per image, tokens per pass).

    `conditions` are what the generator takes: class labels (B,) or prompts. Peak memory covers the
    cache allocation and the whole generation: the CUDA allocator's peak
    (weights included), or on CPU the RSS increase over the loaded model.
    """
    import time

    with PeakMemory(device) as memory:
        _synchronize(device)
        began = time.perf_counter()
        generation = generator.generate(conditions, sample_ids, policy, budget, seed, method=method)
        _synchronize(device)
        seconds = time.perf_counter() - began
    return generation.tokens, {**generation.stats, "generation_s": seconds,
                               "kv_cache_capacity_bytes": generation.capacity_bytes(),
                               "prefix_len": max(cache.layout.prefix_len for cache in generation.caches),
                               "kv_cache_high_water_bytes": generation.high_water_bytes(),
                               "peak_memory_bytes": memory.peak_bytes if device.type == "cuda"
                               else memory.peak_increase_bytes, "peak_memory_method": memory.method}


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

    def generate(self, labels=None, prompts: list[str] | None = None, seed: int | None = None,
                 sample_ids=None, decode: bool | None = None) -> Output:
        """Class labels (class-conditional models) or prompts (text models) -> tokens, images and cost. Sample k
        draws its randomness from (seed, sample_ids[k]) (default 0..B-1), as sample k of a run does; `decode`
        (default: the config's `decode_images`) turns the tokens into images."""
        conditions, ids, seed = generation_inputs(self.generator, self.cfg.model.name, labels, prompts, sample_ids,
                                                  self.cfg.seed if seed is None else seed, self.device)
        count = len(conditions)
        tokens, cost = timed_generation(self.generator, self.policy, self.budgets or self.budget, conditions, ids,
                                        seed, self.device)
        images = None
        if self.cfg.decode_images if decode is None else decode:
            images = self.generator.decode_images(tokens).cpu().numpy()
        record = {"model": self.cfg.model.name, "cache": self.cfg.cache.name, "keep": str(self.cfg.keep),
                  "visual_budget": self.budget, "batch_size": count, "policy": self.policy.describe(),
                  **(self.budgets.describe() if self.budgets else {"budget_allocation": "uniform"}), **cost,
                  **cpu_info()}
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
    return Pipeline(cfg, generator, policy, budgets.visual_budget, device, budgets)
