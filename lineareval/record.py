"""The run record: one flat `metrics.json` per run folder, written atomically, and read back typed.

A run folder's record is one of three kinds (`load_run` tells them apart, nothing else should):
a `RunRecord` (one policy's samples, scored by its benchmark), a `SuiteRecord` (a multi-policy benchmark
such as efficiency: its measurements are `rows`) or an `ExternalRecord` (stage=evaluate of images made
elsewhere: metrics only).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import torch

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
WEIGHTS_KINDS = ("checkpoint", "random")
# Distributions whose versions go into every record; those not installed are left out.
VERSIONED_DISTRIBUTIONS = (
    "torch", "numpy", "hydra-core", "omegaconf", "transformers", "safetensors", "pillow", "scipy",
)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RecordError(ValueError):
    """A metrics.json that cannot be read as a record: not JSON, not an object, or fields missing or mistyped."""


# What a record means by leaving these fields out: it was written before they were recorded, when every run
# decoded sequentially under a uniform budget. The only place these defaults live.
LEGACY_DEFAULTS: dict[str, Any] = {"decoding": {"name": "sequential"}, "budget_allocation": "uniform"}


@dataclass(frozen=True)
class Decoding:
    """How a run sampled its tokens: the `decoding=` method and its settings (window, acceptance, ...).

    On disk: `"decoding": {"name": ..., **parameters}`, as the method's `describe()` gives it.
    """

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any) -> Decoding:
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            raise ValueError(f"decoding must be an object with a string name, got {value!r}")
        return cls(value["name"], {key: item for key, item in value.items() if key != "name"})

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, **self.parameters}


@dataclass(frozen=True)
class BudgetAllocation:
    """How `budget_allocation=` spread the visual budget B: its name and what each layer (and head) got.

    On disk these are flat fields, as `Budgets.describe()` gives them: `budget_allocation` (the name),
    `layer_budgets` and, for head-adaptive allocations, `head_floors` and `head_caps` (None: not recorded).
    """

    FIELDS: ClassVar[tuple[str, ...]] = ("budget_allocation", "layer_budgets", "head_floors", "head_caps")

    name: str
    layer_budgets: tuple[int, ...] | None = None
    head_floors: tuple[int, ...] | None = None
    head_caps: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, fields: dict[str, Any]) -> BudgetAllocation:
        """From the flat fields (`budget_allocation`, `layer_budgets`, ...) of a record or of `describe()`."""
        name = fields.get("budget_allocation")
        if not isinstance(name, str):
            raise ValueError(f"budget_allocation must be the allocation's name, got {name!r}")
        lists = {key: fields.get(key) for key in cls.FIELDS[1:]}
        for key, value in lists.items():
            if value is not None and not (isinstance(value, list) and all(isinstance(item, int) for item in value)):
                raise ValueError(f"{key} must be a list of integers, got {value!r}")
        return cls(name, *(None if value is None else tuple(value) for value in lists.values()))

    def to_json(self) -> dict[str, Any]:
        """The flat fields; those not recorded are left out."""
        lists = dict(zip(self.FIELDS[1:], (self.layer_budgets, self.head_floors, self.head_caps)))
        recorded = {key: list(value) for key, value in lists.items() if value is not None}
        return {"budget_allocation": self.name, **recorded}


@dataclass(kw_only=True)
class RunRecord:
    """Everything one run measured and the setup that produced it, as flat snake_case fields.

    `keep` is the budget string exactly as the user gave it (`"1/6"`, `"256"`), so result rows group
    exactly; `visual_budget` is what it parsed to. Benchmark metrics go in `extra`; they become
    top-level keys of the JSON and may not reuse a field name (nor the flat fields `budget_allocation`
    writes). `RunRecord.load` reads one back; a record older than `decoding` and `budget_allocation`
    loads with `LEGACY_DEFAULTS`.
    """

    kind: ClassVar[str] = "samples"

    # What ran.
    model: str
    cache: str
    keep: str
    visual_budget: int
    batch_size: int
    num_samples: int
    seed: int
    weights: str
    weights_files: list[str] = field(default_factory=list)
    dtype: str
    device: str
    decoding: Decoding
    budget_allocation: BudgetAllocation
    # What it cost.
    peak_memory_bytes: int
    peak_memory_method: str
    kv_cache_capacity_bytes: int
    kv_cache_high_water_bytes: int
    latency_s_per_batch: float
    generation_time_s: float
    images_per_s: float
    tokens_per_s: float
    # Where it ran: fill from environment_info(device).
    device_name: str
    git_commit: str
    git_dirty: bool
    versions: dict[str, str]
    created_at: str = field(default_factory=_utc_now)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS_KINDS:
            raise ValueError(f"weights must be one of {WEIGHTS_KINDS}, got {self.weights!r}.")
        if self.weights == "random" and self.weights_files:
            raise ValueError(f"weights='random' takes no weights_files, got {self.weights_files}.")
        if not isinstance(self.keep, str):
            raise ValueError(f"keep must be the string the user gave (e.g. '1/6'), got {self.keep!r}.")
        if not isinstance(self.decoding, Decoding) or not isinstance(self.budget_allocation, BudgetAllocation):
            raise ValueError(f"decoding and budget_allocation must be a Decoding and a BudgetAllocation, got "
                             f"{self.decoding!r} and {self.budget_allocation!r}.")
        self._check_extra()

    def _check_extra(self) -> None:
        not_str = [key for key in self.extra if not isinstance(key, str)]
        if not_str:
            raise ValueError(f"extra metric names must be strings, got {not_str}.")
        core = {f.name for f in dataclasses.fields(self)} | set(BudgetAllocation.FIELDS)
        collisions = sorted(core & set(self.extra))
        if collisions:
            raise ValueError(
                f"extra metrics {collisions} collide with RunRecord fields; rename them "
                "(e.g. prefix them with the benchmark name)."
            )

    def to_dict(self) -> dict[str, Any]:
        """The flat record: core fields plus `extra` lifted to the top level."""
        self._check_extra()  # extra is a mutable dict, so check again at write time
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("extra", "decoding", "budget_allocation")}
        return {**flat, "decoding": self.decoding.to_json(), **self.budget_allocation.to_json(), **self.extra}

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunRecord:
        """The record of one run's samples in `path` (a metrics.json or its run folder); RecordError if the
        file is no such record (a suite's or an external evaluation's included), naming the file."""
        record = load_run(path)
        if record.kind != cls.kind:
            raise RecordError(f"{_metrics_path(path)} is the record of {record.kind!r}, not of one run's samples")
        return record

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: str | os.PathLike = "<record>") -> RunRecord:
        """From a flat record as `to_dict` writes it (or as older versions wrote it: see LEGACY_DEFAULTS)."""
        raw = {**LEGACY_DEFAULTS, **raw}
        core = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        with _naming(path):
            if "created_at" not in raw:  # written by every version: its default is the time of writing
                raise ValueError("fields missing: created_at")
            fields = {key: raw[key] for key in core & set(raw) - {"decoding", "budget_allocation"}}
            fields["decoding"] = Decoding.parse(raw["decoding"])
            fields["budget_allocation"] = BudgetAllocation.parse(raw)
            extra = {key: value for key, value in raw.items() if key not in core | set(BudgetAllocation.FIELDS)}
            return _typed(cls, fields, extra)


def _package_dir() -> Path:
    """Folder of the `lineareval` package, whose repository the git info describes."""
    return Path(__file__).resolve().parent


def _git(directory: Path, *args: str) -> str | None:
    """stdout of `git -C directory args`, or None where git is missing or the command fails."""
    try:
        done = subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _cpu_name() -> str:
    model_name = platform.processor() or platform.machine() or "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    # CPUs this process may run on (cgroup/affinity), not the whole host.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model_name} ({cores} cores)"


def _versions() -> dict[str, str]:
    import lineareval

    versions = {"python": platform.python_version()}
    for name in VERSIONED_DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        versions["lineareval"] = importlib.metadata.version("lineareval")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        versions["lineareval"] = lineareval.__version__
    versions["torch"] = torch.__version__  # keeps the local build tag (e.g. +cu130) metadata drops
    if torch.version.cuda is not None:
        versions["cuda"] = torch.version.cuda
    return versions


def environment_info(device: torch.device) -> dict[str, Any]:
    """device_name, git_commit, git_dirty and versions, ready to pass to RunRecord."""
    device = torch.device(device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        device_name = _cpu_name()
    else:
        device_name = device.type
    repo = _package_dir()
    commit = _git(repo, "rev-parse", "HEAD")
    status = _git(repo, "status", "--porcelain")
    return {
        "device_name": device_name,
        "git_commit": commit.strip() if commit else "unknown",
        "git_dirty": bool(status and status.strip()),
        "versions": _versions(),
    }


# Errors of the storage rather than of the program: reported as a StorageError that says where and what to do.
from lineareval.storage import (  # noqa: E402, F401  (re-exported: this module was their home)
    FULL_ERRNOS, READ_ONLY_ERRNOS, TEMPORARY_NAME, StorageError, remove_temporaries, storage_error, write_csv_atomic,
    write_json_atomic, write_npz_atomic, write_npz_stacked_atomic, write_text_atomic,
)


def save_record(record: RunRecord, run_dir: str | os.PathLike) -> Path:
    """Write `record` to `run_dir/metrics.json` atomically; returns that path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / METRICS_FILE
    write_json_atomic(path, record.to_dict())
    log.info("wrote %s", path)
    return path


def load_record(path: str | os.PathLike) -> dict[str, Any]:
    """Read a record from a `metrics.json` (or the run folder holding one) as a flat dict, as on disk
    (`load_run` / `RunRecord.load` read it typed)."""
    path = _metrics_path(path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RecordError(f"{path} is not valid JSON ({err}); delete it and rerun that run.") from err
    if not isinstance(record, dict):
        raise RecordError(f"{path} holds a {type(record).__name__}, not a record; delete it and rerun.")
    return record


@dataclass(kw_only=True)
class SuiteRecord:
    """The record of a multi-policy benchmark (benchmark=efficiency): what ran it, and one dict per measured
    (policy, keep, batch, ...) in `rows`, as `efficiency.csv` holds them."""

    kind: ClassVar[str] = "suite"

    benchmark: str
    model: str
    weights: str
    weights_files: list[str] = field(default_factory=list)
    dtype: str
    device: str
    device_name: str
    git_commit: str
    git_dirty: bool
    versions: dict[str, str]
    rows: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SuiteRecord:
        record = load_run(path)
        if record.kind != cls.kind:
            raise RecordError(f"{_metrics_path(path)} is the record of {record.kind!r}, not of a suite")
        return record


@dataclass(kw_only=True)
class ExternalRecord:
    """The record of stage=evaluate on images made elsewhere (DPG-Bench's images_dir): no model ran, so no
    policy, budget or decoding; `extra` holds the metrics."""

    kind: ClassVar[str] = "external"
    model: ClassVar[str] = "external"

    benchmark: str
    seed: int
    device_name: str
    git_commit: str
    git_dirty: bool
    versions: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)


AnyRecord = RunRecord | SuiteRecord | ExternalRecord


def load_run(path: str | os.PathLike) -> AnyRecord:
    """The record in `path` (a metrics.json or its run folder) as its kind's type; RecordError naming the file
    if it is not JSON, not an object, or lacks or mistypes a field its kind needs."""
    raw = load_record(path)
    path = _metrics_path(path)
    if "rows" in raw:  # only a suite measures rows
        return _from_flat(SuiteRecord, raw, path)
    if raw.get("model") == ExternalRecord.model:  # runner.evaluate_external
        return _from_flat(ExternalRecord, {key: value for key, value in raw.items()
                                           if key not in ("model", "cache", "keep", "num_samples")}, path)
    return RunRecord.from_dict(raw, path)


def find_runs(*roots: str | os.PathLike, kinds: tuple[str, ...] = ("samples",)) -> list[tuple[AnyRecord, Path]]:
    """(record, run folder) of every finished run of `kinds` under `roots`, in path order."""
    paths = sorted(path for root in roots for path in Path(root).rglob(METRICS_FILE))
    runs = [(load_run(path), path.parent) for path in paths]
    return [(record, folder) for record, folder in runs if record.kind in kinds]


def _from_flat(cls, raw: dict[str, Any], path: Path):
    core = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    with _naming(path):
        return _typed(cls, {key: raw[key] for key in core & set(raw)},
                      {key: value for key, value in raw.items() if key not in core})


def _typed(cls, fields: dict[str, Any], extra: dict[str, Any]):
    """cls(**fields, extra=extra) after checking that every required field is there with its type."""
    required = [f for f in dataclasses.fields(cls) if f.name != "extra" and f.name not in fields
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        raise ValueError(f"fields missing: {', '.join(f.name for f in required)}")
    for f in dataclasses.fields(cls):
        expected = {"str": str, "int": int, "bool": bool, "float": (int, float)}.get(str(f.type))
        value = fields.get(f.name)
        if expected is not None and f.name in fields and (not isinstance(value, expected) or
                                                          (expected is int and isinstance(value, bool))):
            raise ValueError(f"{f.name} must be {f.type}, got {value!r}")
    return cls(**fields, extra=extra)


@contextmanager
def _naming(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a bad field's ValueError as a RecordError that names the file and what to do."""
    try:
        yield
    except RecordError:
        raise
    except (ValueError, TypeError) as err:
        raise RecordError(f"{path} is not a valid run record: {err}. Rerun that run (force=true) or remove "
                          "its folder.") from err


def _metrics_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / METRICS_FILE if path.is_dir() else path


def is_finished(run_dir: str | os.PathLike) -> bool:
    """Whether `run_dir` holds a readable metrics.json, i.e. the run can be skipped."""
    try:
        load_record(Path(run_dir) / METRICS_FILE)
    except (OSError, ValueError):
        return False
    return True
