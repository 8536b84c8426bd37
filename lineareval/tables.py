"""One table of finished runs, the one every report and notebook starts from.

    run_table(find_runs("outputs/demo_fid"))

One row per run: first the columns results are grouped by (`RUN_COLUMNS`: model, policy name and settings,
keep, allocation, decoding method, seed, sample count, weights, device), then everything else the record
holds (its budget and cost, the allocation's per-layer budgets, the benchmark's metrics with their
intervals), then `run_dir`. The values are the typed record's (lineareval/record.py), so a record written
before decoding methods or budget allocations existed reads as sequential and uniform here as everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from lineareval.record import ExternalRecord, RunRecord

RUN_COLUMNS = ("model", "cache", "policy", "keep", "budget_allocation", "decoding", "seed", "num_samples", "weights",
               "device_name")
# RunRecord fields that are not plain columns: the typed ones become their names and parameters
TYPED_FIELDS = ("decoding", "budget_allocation", "extra")


def run_row(record: RunRecord | ExternalRecord, folder: Path) -> dict[str, Any]:
    """`record`'s row of `run_table` (an external evaluation's: None where no model, policy or budget ran)."""
    if record.kind == "external":  # images made elsewhere: nothing but the benchmark's metrics
        standard = {**dict.fromkeys(RUN_COLUMNS), "model": record.model, "seed": record.seed,
                    "device_name": record.device_name}
        return {**standard, **record.extra, "run_dir": str(folder)}
    allocation = record.budget_allocation
    standard = {"model": record.model, "cache": record.cache, "policy": record.extra.get("policy"),
                "keep": record.keep, "budget_allocation": allocation.name, "decoding": record.decoding.name,
                "seed": record.seed, "num_samples": record.num_samples, "weights": record.weights,
                "device_name": record.device_name}
    fields = {field.name: getattr(record, field.name) for field in dataclasses.fields(record)
              if field.name not in standard and field.name not in TYPED_FIELDS}
    typed = {"decoding_parameters": record.decoding.parameters,
             **{name: None if value is None else list(value) for name, value in
                (("layer_budgets", allocation.layer_budgets), ("head_floors", allocation.head_floors),
                 ("head_caps", allocation.head_caps))}}
    measured = {key: value for key, value in record.extra.items() if key != "policy"}
    return {**standard, **fields, **typed, **measured, "run_dir": str(folder)}


def run_table(runs: Iterable[tuple[RunRecord | ExternalRecord, Path]]) -> pd.DataFrame:
    """One row per (record, run folder), as `find_runs` gives them: `RUN_COLUMNS`, the record's other
    fields and metrics (absent ones NaN), `run_dir`."""
    rows = [run_row(record, folder) for record, folder in runs]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=[*RUN_COLUMNS, "run_dir"])
