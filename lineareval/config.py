"""Config helpers: the `path_safe` resolver, run field checks, and device/dtype resolution."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def path_safe(value) -> str:
    """A config value as a folder name: `1/6` -> `1_6`."""
    return str(value).replace("/", "_").replace(" ", "")


STAGES = ("generate", "evaluate", "all")


def check_run_fields(cfg) -> None:
    """Raise a ValueError naming the field and its accepted values for a bad stage, seed, count or sampling field.

    Cheap and first, so a typo fails before the run folder is locked or a model is loaded.
    """
    from lineareval.sampling import check_sampling_field
    from lineareval.validation import check_seed

    if cfg.stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {cfg.stage!r}")
    check_seed(cfg.seed)  # the API's rule too
    for field in ("num_samples", "batch_size"):
        if not _is_int(cfg[field]) or cfg[field] < 1:
            raise ValueError(f"{field} must be a positive integer, got {cfg[field]!r}")
    for name, value in cfg.sampling.items():
        check_sampling_field(str(name), value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} was asked for but CUDA is not available; use device=cpu or device=auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on GPU and fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype={name} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def call_target(node, exclude: tuple[str, ...] = (), **kwargs):
    """Call a config node's `_target_` with its fields (minus `exclude`) and `kwargs`.

    Unlike `hydra.utils.instantiate`, errors reach the caller unwrapped, so a missing checkpoint or a
    bad budget surfaces as its own exception with its own message.
    """
    from hydra.utils import get_object

    fields = OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else dict(node)
    target = get_object(fields.pop("_target_"))
    for key in exclude:
        fields.pop(key, None)
    return target(**{**fields, **kwargs})  # run-level values (e.g. sampling) override the node's defaults
