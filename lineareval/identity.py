"""Run identity: what determines a run's samples, so runs are matched on that and never on paths.

A run folder is reused (skipped when finished, resumed from its shards) only by a run with the same
identity, and every shard carries the fingerprint of the identity that made it. The identity has two
parts:

- `config`: the resolved config minus the fields that say where and how a run executes
  (`EXECUTION_FIELDS`: paths, the tracker, control flags, and `batch_size` / `compile`(`_backend`), which the
  keyed sampler makes irrelevant to the samples), with `device` and `dtype` as they resolve on this
  machine (`auto` and `cpu` match on a CPU machine; a finished run is reused whatever device and
  precision made it when they were left at `auto`, but shards are continued only on the same ones).
  A `LOCATION_FIELDS` value (a checkpoint, a prompts file, a data folder) enters by what it names: a
  file by its name, size and the SHA-256 of its first and last MiB (the same file in another folder
  matches, a changed file does not), a folder or a missing file by its last path component; a file
  that one run could read and the other could not is compared by name (so `stage=generate` without
  the reference batch and `stage=evaluate` with it are one run). A config group added later enters
  only away from its default (`NEUTRAL_DEFAULTS`: `budget_allocation=uniform` samples as runs made
  before the group existed, so they keep their folders), and so does a policy field added later
  (`NEUTRAL_FIELDS`: `cache=ssd` with `sink_recent: 0` is the SSD of the runs made before the field).
  Cheap: a finished run is skipped on it.
- `content`: what the config only points at, read when sampling: each weight file's name, size and
  SHA-256 of its first and last MiB, and a SHA-256 of every sample's condition (class labels, or the
  prompts themselves, wherever the prompts file lives), plus the images' resolution.

A benchmark that runs a suite of timed generations itself (`run_suite`: `benchmark=efficiency`)
measures the execution, so for it `batch_size`, `compile` and the resolved device and dtype are part of
the identity and of the folder name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

# Top-level fields that never change what a run samples: where things are, what mirrors the record,
# what the command asks to do, execution choices the keyed sampler is invariant to, and how a finished run
# is compared with its full-cache partner (`paired`).
EXECUTION_FIELDS = frozenset({"output_root", "run_dir", "weights_dir", "download", "logger", "force", "stage",
                              "grid_images", "batch_size", "compile", "compile_backend", "device", "dtype",
                              "hydra", "paired"})
# Execution fields that a suite benchmark (one that times generations itself) measures.
SUITE_FIELDS = ("batch_size", "compile", "compile_backend")
# Fields (at any depth) whose value names a file or folder: compared by the file's fingerprint, or by name.
LOCATION_FIELDS = frozenset({"gpt_ckpt", "vq_ckpt", "path", "chameleon_dir", "prompts_file", "reference",
                             "annotations", "images_dir", "questions", "prompts_dir", "extractor_weights",
                             "cache_dir"})
# Config groups added after runs were made, left out of the identity at their default, which samples what
# runs made before they existed sampled (those runs keep their identity and folder): group -> default name.
NEUTRAL_DEFAULTS = {"budget_allocation": "uniform"}
# Fields added to a config group's options after runs were made, left out of the identity at the value that
# behaves as before they existed: (group, the option's _target_) -> {field: that value}.
NEUTRAL_FIELDS = {("cache", "lineareval.cache.ssd.SSD"): {"sink_recent": 0}}
EDGE_BYTES = 2**20  # a weight file is fingerprinted by its size and its first and last MiB
HASH_CHARS = 8  # of the run folder name's hash: 32 bits, and the identity check catches a collision


def resolved_device_type(name: Any) -> str:
    """`auto` -> `cuda` or `cpu` as on this machine; `cuda:1` -> `cuda`; an invalid name stays as given."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(str(name)).type
    except RuntimeError:
        return str(name)


def resolved_dtype_name(name: Any, device_type: str) -> str:
    from lineareval.config import DTYPES, resolve_dtype

    if name != "auto" and name not in DTYPES:
        return str(name)
    return str(resolve_dtype(name, _device(device_type))).removeprefix("torch.")


def _device(device_type: str) -> torch.device:
    return torch.device(device_type if device_type in ("cpu", "cuda") else "cpu")


def is_suite(benchmark: Mapping) -> bool:
    """Whether the benchmark's class times generations itself (has `run_suite`)."""
    from hydra.utils import get_object

    try:
        return bool(getattr(get_object(str(benchmark.get("_target_"))), "suite", False))
    except Exception:  # an unimportable target fails later with its own message; here it names a folder
        return False


def _located(value: Any, read_files: bool, key: str | None = None) -> Any:
    """`value` with every LOCATION_FIELDS leaf replaced by what it names (see the module docstring)."""
    if isinstance(value, Mapping):
        return {name: _located(item, read_files, str(name)) for name, item in value.items()}
    if isinstance(value, list):
        return [_located(item, read_files) for item in value]
    if key not in LOCATION_FIELDS or not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    if read_files and path.is_file():
        return file_fingerprint(path)
    return Path(value.rstrip("/")).name


def config_identity(cfg: DictConfig | Mapping, read_files: bool = True, for_folder: bool = False) -> dict[str, Any]:
    """The config part of the identity (see the module docstring), from a config or a stored one.

    Each top-level field is resolved on its own, so this also runs inside the resolver of `run_dir`
    (resolving the whole config would resolve `run_dir` itself). For the folder name (`for_folder`)
    no file is read (a name never depends on which files exist yet) and the device is left out, as is
    `dtype=auto`: the same command finds the same folder on a GPU node and on a CPU login node (to
    evaluate there what the GPUs generated); an explicit dtype names its own folder.
    """
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    benchmark = _resolved(node, "benchmark") or {}
    kept = set(SUITE_FIELDS) if is_suite(benchmark) else set()
    identity = {key: _resolved(node, key) for key in node if key not in EXECUTION_FIELDS or key in kept}
    for group, default in NEUTRAL_DEFAULTS.items():
        if isinstance(identity.get(group), Mapping) and identity[group].get("name") == default:
            del identity[group]
    for (group, target), fields in NEUTRAL_FIELDS.items():
        options = identity.get(group)
        if isinstance(options, Mapping) and options.get("_target_") == target:
            identity[group] = {key: value for key, value in options.items()
                               if not (key in fields and value == fields[key])}
    device, dtype = _resolved(node, "device", "auto"), _resolved(node, "dtype", "auto")
    if not for_folder or kept:  # a suite measures the device: its folder names it
        identity["device"] = resolved_device_type(device)
        identity["dtype"] = resolved_dtype_name(dtype, identity["device"])
    elif dtype != "auto":
        identity["dtype"] = str(dtype)
    return _located(identity, read_files and not for_folder)


def _resolved(node: DictConfig, key: str, default: Any = None) -> Any:
    if key not in node:
        return default
    value = node[key]
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Name, size and SHA-256 of the first and last MiB: cheap on 10 GB checkpoints, and a copy matches."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as file:
        digest.update(file.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            file.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            digest.update(file.read(EDGE_BYTES))
    return {"name": path.name, "size": size, "sha256_edges": digest.hexdigest()}


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over named arrays (name, dtype, shape and bytes), in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        if array.dtype.kind in "OU":  # prompts: hash the text, not object pointers or padding
            array = np.array([str(item).encode() for item in array.ravel()], dtype=object)
            digest.update(f"{name}|text|{arrays[name].shape}".encode())
            for item in array:
                digest.update(len(item).to_bytes(8, "little") + item)
            continue
        digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def content_identity(weight_files: Iterable[str | Path], conditions: Mapping[str, np.ndarray],
                     count: int, resolution: int | None) -> dict[str, Any]:
    """The content part: weight fingerprints, the samples' conditions and how many, the images' resolution."""
    return {"weight_files": [file_fingerprint(path) for path in weight_files], "num_samples": count,
            "conditions_sha256": arrays_digest(conditions), "resolution": resolution}


def digest(value: Any, chars: int = 16) -> str:
    """Short SHA-256 of a JSON-able value (keys sorted), stable across processes and machines."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:chars]


def run_fingerprint(cfg: DictConfig | Mapping, content: Mapping) -> str:
    """What a shard is stamped with: the config part by names only (files enter through `content`), so
    a readable and an unreadable spelling of the same file give one fingerprint."""
    return digest({"config": config_identity(cfg, read_files=False), "content": content})


def differences(stored: Any, current: Any, prefix: str = "") -> list[str]:
    """`field: stored -> current` for every leaf that differs (dotted paths).

    A file fingerprint and a bare name match when the names agree: one run could not read the file.
    """
    if _is_fingerprint(stored) != _is_fingerprint(current):
        names = [value["name"] if _is_fingerprint(value) else value for value in (stored, current)]
        if names[0] == names[1]:
            return []
    elif isinstance(stored, Mapping) and isinstance(current, Mapping) and not _is_fingerprint(stored):
        return [line for key in sorted(set(stored) | set(current), key=str)
                for line in differences(stored.get(key, "<absent>"), current.get(key, "<absent>"),
                                        f"{prefix}.{key}" if prefix else str(key))]
    if stored == current:
        return []
    return [f"{prefix or '<identity>'}: {stored!r} (stored) -> {current!r} (now)"]


def _is_fingerprint(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"name", "size", "sha256_edges"}


def run_key(*, _root_: DictConfig) -> str:
    """Last component of the default run_dir: readable knobs plus a hash of the whole config identity.

    `n-<num_samples>_cfg-<cfg_scale>_<decoding>[_<budget allocation>]_<hash>`: two configurations that sample
    differently never share a folder; the same configuration spelled differently (paths, device, batch_size)
    does. A CPU and a GPU run of one configuration with `dtype=auto` share it too; the identity check tells
    them apart. The budget allocation is named when it is not the default (uniform, left out of the identity).
    """
    from lineareval.config import path_safe

    identity = config_identity(_root_, for_folder=True)
    sampling = identity.get("sampling") or {}
    cfg_scale = sampling.get("cfg_scale", "none") if isinstance(sampling, Mapping) else "none"
    decoding = identity.get("decoding") or {}
    name = decoding.get("name", "sequential") if isinstance(decoding, Mapping) else "sequential"
    allocation = identity.get("budget_allocation")
    named = f"_{path_safe(allocation.get('name'))}" if isinstance(allocation, Mapping) else ""
    return (f"n-{path_safe(identity.get('num_samples'))}_cfg-{path_safe(cfg_scale)}_{path_safe(name)}{named}_"
            f"{digest(identity, HASH_CHARS)}")


def register_resolvers() -> None:
    """The resolvers the configs use: `path_safe` (lineareval.config) and `run_key` (here)."""
    from lineareval.config import path_safe

    if not OmegaConf.has_resolver("path_safe"):
        OmegaConf.register_new_resolver("path_safe", path_safe)
    if not OmegaConf.has_resolver("run_key"):
        OmegaConf.register_new_resolver("run_key", run_key)
