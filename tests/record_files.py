"""metrics.json files for tests of what reads them: complete records, as the runner writes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# One run's samples record, flat as on disk (RunRecord.to_dict): the fields every record has, then the
# fields a benchmark adds. Tests override what they compare.
SAMPLES_RECORD: dict[str, Any] = {
    "model": "llamagen_tiny", "cache": "linear", "keep": "1/4", "visual_budget": 16, "batch_size": 4,
    "num_samples": 8, "seed": 0, "weights": "random", "weights_files": [], "dtype": "float32", "device": "cpu",
    "decoding": {"name": "sequential"}, "budget_allocation": "uniform", "layer_budgets": [16, 16],
    "peak_memory_bytes": 2**20, "peak_memory_method": "cpu_rss_poll", "kv_cache_capacity_bytes": 4096,
    "kv_cache_high_water_bytes": 2048, "latency_s_per_batch": 0.5, "generation_time_s": 1.0, "images_per_s": 8.0,
    "tokens_per_s": 512.0, "device_name": "Test CPU (2 cores)", "git_commit": "unknown", "git_dirty": False,
    "versions": {"python": "3.11.7"}, "created_at": "2026-12-01T00:00:00+00:00",
    "policy": {"anchors": "line", "recent_lines": 1, "score_source": "line"}, "distribution_preserving": True,
    "evaluated": True, "evaluated_fields": [],
}
# Fields a record written before decoding methods and budget allocations existed does not have
NEWER_FIELDS = ("decoding", "budget_allocation", "layer_budgets", "distribution_preserving")


def samples_record(*, legacy: bool = False, **fields: Any) -> dict[str, Any]:
    """SAMPLES_RECORD with `fields` (None removes a field); `legacy`: as written before NEWER_FIELDS."""
    record = {key: value for key, value in SAMPLES_RECORD.items() if not (legacy and key in NEWER_FIELDS)}
    record.update(fields)
    return {key: value for key, value in record.items() if value is not None}


def write_record(folder: Path, record: dict[str, Any]) -> Path:
    """`record` as folder/metrics.json (the folder made if needed); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metrics.json"
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return path
