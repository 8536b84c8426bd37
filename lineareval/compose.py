"""Hydra composition outside a Hydra app: the run's config, a group's options, and the policy registry."""

from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from lineareval.identity import register_resolvers

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
BASELINE = "full"  # the cache every policy is compared with: listed first


NAMED_GROUPS = ("cache", "decoding", "budget_allocation")  # each option's `name` is its Hydra choice


def name_choices(cfg: DictConfig, choices) -> DictConfig:
    """Set `cfg.<group>.name` to the group's Hydra choice (the option's file name) for the named groups.

    conf/config.yaml declares them as `${hydra:runtime.choices.<group>}`, which a Hydra app resolves
    itself; composed outside an app, the literal choice stands in for the interpolation. A name is
    written nowhere else: not in the option's YAML, not in its class."""
    for group in NAMED_GROUPS:
        if group in cfg and cfg[group] is not None and choices.get(group) is not None:
            with open_dict(cfg[group]):
                cfg[group].name = str(choices[group])
    return cfg


def compose_config(*overrides: str, return_hydra_config: bool = False) -> DictConfig:
    """`conf/config.yaml` composed by Hydra with `overrides` (inside a running Hydra app, with its search path),
    each named group's `name` set to its choice (`name_choices`)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()

    def composed() -> DictConfig:
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        name_choices(cfg, cfg.hydra.runtime.choices)
        if not return_hydra_config:
            with open_dict(cfg):
                del cfg["hydra"]
        return cfg

    if GlobalHydra.instance().is_initialized():
        return composed()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return composed()


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
