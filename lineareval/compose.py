"""Hydra composition outside a Hydra app: the run's config, a group's options, and the policy registry."""

from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lineareval.identity import register_resolvers

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
