"""Run record round trip, atomic writes, and environment info that never crashes."""

import json
import platform
import shutil
import subprocess
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import torch

import lineareval
from lineareval import record as record_module
from lineareval.record import (
    LEGACY_DEFAULTS,
    BudgetAllocation,
    Decoding,
    ExternalRecord,
    RecordError,
    RunRecord,
    SuiteRecord,
    environment_info,
    find_runs,
    is_finished,
    load_record,
    load_run,
    save_record,
    write_json_atomic,
    write_npz_atomic,
)
from record_files import SAMPLES_RECORD, samples_record, write_record


def _record(**overrides) -> RunRecord:
    fields = dict(
        model="llamagen_tiny", cache="linear", keep="1/6", visual_budget=43, batch_size=4,
        num_samples=8, seed=0, weights="random", dtype="float32", device="cpu",
        decoding=Decoding("sjd", {"window": 16}), budget_allocation=BudgetAllocation("pyramid", (50, 36)),
        peak_memory_bytes=123_456, peak_memory_method="cpu_rss_poll",
        kv_cache_capacity_bytes=4096, kv_cache_high_water_bytes=2048, latency_s_per_batch=0.5,
        generation_time_s=1.0, images_per_s=8.0, tokens_per_s=2048.0,
        device_name="Test CPU (2 cores)", git_commit="unknown", git_dirty=False,
        versions={"python": "3.11.7"}, extra={"fid": 12.5, "clip_score": np.float32(0.25)},
    )
    return RunRecord(**{**fields, **overrides})


def test_round_trip_flattens_extra(tmp_path):
    rec = _record()
    path = save_record(rec, tmp_path / "run")
    assert path == tmp_path / "run" / "metrics.json"
    loaded = load_record(path)
    assert loaded == {**rec.to_dict(), "clip_score": 0.25}
    assert loaded["fid"] == 12.5 and loaded["keep"] == "1/6" and loaded["visual_budget"] == 43
    assert "extra" not in loaded
    # on disk as before the typed fields: decoding an object, the allocation flat fields
    assert loaded["decoding"] == {"name": "sjd", "window": 16}
    assert (loaded["budget_allocation"], loaded["layer_budgets"]) == ("pyramid", [50, 36])
    assert "head_floors" not in loaded and "head_caps" not in loaded
    assert load_record(tmp_path / "run") == loaded  # the run folder works as well
    text = path.read_text()
    assert list(json.loads(text)) == sorted(loaded)
    assert '\n  "batch_size": 4,' in text


def test_created_at_is_utc_iso8601():
    created = datetime.fromisoformat(_record().created_at)
    assert created.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - created) < timedelta(minutes=1)


@pytest.mark.parametrize("key", ["seed", "keep", "extra", "decoding", "budget_allocation", "layer_budgets",
                                 "head_caps"])
def test_extra_collision_raises(key):
    with pytest.raises(ValueError, match=key):
        _record(extra={key: 1})


def test_extra_collision_added_later_raises_and_writes_nothing(tmp_path):
    rec = _record()
    rec.extra["model"] = "oops"
    with pytest.raises(ValueError, match="model"):
        save_record(rec, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "overrides",
    [{"weights": "pretrained"}, {"weights": "random", "weights_files": ["a.pt"]}, {"keep": 0.5}],
)
def test_invalid_fields_raise(overrides):
    with pytest.raises(ValueError):
        _record(**overrides)


def test_checkpoint_record_keeps_weights_files(tmp_path):
    save_record(_record(weights="checkpoint", weights_files=["w/a.pt", "w/b.pt"]), tmp_path)
    assert load_record(tmp_path)["weights_files"] == ["w/a.pt", "w/b.pt"]


def test_failed_json_write_keeps_original_and_leaves_no_temp(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"a": 1})
    original = path.read_bytes()
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": 2, "b": object()})
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_json_write_replaces_existing(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": np.int64(2), "b": np.arange(3)})
    assert json.loads(path.read_text()) == {"a": 2, "b": [0, 1, 2]}


@pytest.mark.parametrize("name", ["samples.npz", "tokens.bin"])
def test_npz_written_to_exact_path(tmp_path, name):
    arrays = {"arr_0": np.arange(12, dtype=np.uint8).reshape(3, 4), "labels": np.array([3, 1])}
    write_npz_atomic(tmp_path / name, **arrays)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    with np.load(tmp_path / name) as data:
        assert sorted(data.files) == ["arr_0", "labels"]
        for key, value in arrays.items():
            np.testing.assert_array_equal(data[key], value)
            assert data[key].dtype == value.dtype


def test_is_finished(tmp_path):
    assert not is_finished(tmp_path / "missing")
    assert not is_finished(tmp_path)
    (tmp_path / "metrics.json").write_text('{"model": ')  # a crash mid-write without atomicity
    assert not is_finished(tmp_path)
    with pytest.raises(ValueError, match="not valid JSON"):
        load_record(tmp_path)
    save_record(_record(), tmp_path)
    assert is_finished(tmp_path)


def test_environment_info_cpu():
    info = environment_info(torch.device("cpu"))
    assert set(info) == {"device_name", "git_commit", "git_dirty", "versions"}
    assert info["device_name"].endswith(" cores)")
    versions = info["versions"]
    assert versions["python"] == platform.python_version()
    assert versions["torch"] == torch.__version__
    assert versions["numpy"] == np.__version__
    assert versions["lineareval"] == lineareval.__version__
    assert {"hydra-core", "omegaconf"} <= set(versions)
    assert isinstance(info["git_dirty"], bool)


def test_environment_info_outside_git_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repo found above
    monkeypatch.setattr(record_module, "_package_dir", lambda: tmp_path)
    info = environment_info(torch.device("cpu"))
    assert info["git_commit"] == "unknown"
    assert info["git_dirty"] is False


def test_environment_info_without_git_binary(monkeypatch):
    monkeypatch.setenv("PATH", "")
    info = environment_info(torch.device("cpu"))
    assert info["git_commit"] == "unknown"
    assert info["git_dirty"] is False


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_environment_info_in_git_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.setattr(record_module, "_package_dir", lambda: tmp_path)

    def git(*args: str) -> str:
        config = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
        cmd = ["git", "-C", str(tmp_path), *config, *args]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "init")
    info = environment_info(torch.device("cpu"))
    assert info["git_commit"] == git("rev-parse", "HEAD")
    assert len(info["git_commit"]) == 40
    assert info["git_dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert environment_info(torch.device("cpu"))["git_dirty"] is True


def test_stacked_npz_is_a_plain_npz_written_part_by_part(tmp_path):
    from lineareval.record import write_npz_stacked_atomic

    parts = [np.random.default_rng(i).integers(0, 256, (n, 4, 5, 3), dtype=np.uint8) for i, n in enumerate((3, 3, 1))]
    path = tmp_path / "samples.npz"
    write_npz_stacked_atomic(path, "arr_0", iter(parts), 7)
    with np.load(path, allow_pickle=False) as data:
        assert data.files == ["arr_0"]
        np.testing.assert_array_equal(data["arr_0"], np.concatenate(parts))
    with pytest.raises(ValueError, match="6 rows written"):
        write_npz_stacked_atomic(tmp_path / "short.npz", "arr_0", parts[:2], 7)
    with pytest.raises(ValueError, match="does not stack"):
        write_npz_stacked_atomic(tmp_path / "odd.npz", "arr_0", [parts[0], parts[0][:, :2]], 6)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["samples.npz"]  # failures leave nothing behind


def test_a_record_loads_back_typed(tmp_path):
    rec = _record(budget_allocation=BudgetAllocation("adaptive_heads", (43, 43), (8, 8), (60, 60)))
    save_record(rec, tmp_path)
    loaded = RunRecord.load(tmp_path)
    assert loaded == rec and loaded.extra == {"fid": 12.5, "clip_score": 0.25}
    assert loaded.decoding == Decoding("sjd", {"window": 16})
    assert loaded.budget_allocation.head_caps == (60, 60)
    assert loaded.to_dict() == load_record(tmp_path)  # and writes back the same JSON
    assert load_run(tmp_path / "metrics.json") == loaded


def test_a_record_older_than_decoding_and_allocation_loads_with_the_documented_defaults(tmp_path):
    old = samples_record(legacy=True, fid=3.5)
    assert "decoding" not in old and "budget_allocation" not in old
    write_record(tmp_path, old)
    loaded = RunRecord.load(tmp_path)
    assert LEGACY_DEFAULTS == {"decoding": {"name": "sequential"}, "budget_allocation": "uniform"}
    assert loaded.decoding == Decoding("sequential") and loaded.budget_allocation == BudgetAllocation("uniform")
    assert loaded.budget_allocation.layer_budgets is None and loaded.extra["fid"] == 3.5
    assert (loaded.model, loaded.cache, loaded.keep, loaded.seed) == ("llamagen_tiny", "linear", "1/4", 0)
    new = RunRecord.load(write_record(tmp_path / "new", samples_record(decoding={"name": "gsd", "window": 4})))
    assert new.decoding == Decoding("gsd", {"window": 4}) and new.budget_allocation.layer_budgets == (16, 16)


def test_suite_and_external_records_are_their_own_kinds(tmp_path):
    suite = {key: SAMPLES_RECORD[key] for key in ("model", "weights", "weights_files", "dtype", "device",
                                                  "device_name", "git_commit", "git_dirty", "versions")}
    rows = [{"cache": "full", "keep": "1", "generation_s": 2.0}, {"cache": "linear", "keep": "1/4"}]
    write_record(tmp_path / "suite", {**suite, "benchmark": "efficiency", "rows": rows})
    external = {"benchmark": "dpg", "model": "external", "cache": None, "keep": None, "num_samples": None,
                "seed": 0, "device_name": "cpu", "git_commit": "abc", "git_dirty": False, "versions": {},
                "dpg_score": 0.75, "evaluated": True}
    write_record(tmp_path / "external", external)
    write_record(tmp_path / "run", samples_record())
    loaded = load_run(tmp_path / "suite")
    assert isinstance(loaded, SuiteRecord) and loaded.kind == "suite" and loaded.rows == rows
    assert (loaded.model, loaded.dtype, loaded.device) == ("llamagen_tiny", "float32", "cpu")
    assert SuiteRecord.load(tmp_path / "suite") == loaded
    outside = load_run(tmp_path / "external")
    assert isinstance(outside, ExternalRecord) and outside.kind == "external" and outside.model == "external"
    assert outside.extra == {"dpg_score": 0.75, "evaluated": True} and outside.benchmark == "dpg"
    with pytest.raises(RecordError, match=r"suite/metrics.json is the record of 'suite', not of one run"):
        RunRecord.load(tmp_path / "suite")
    with pytest.raises(RecordError, match=r"run/metrics.json is the record of 'samples', not of a suite"):
        SuiteRecord.load(tmp_path / "run")
    assert [folder.name for _, folder in find_runs(tmp_path)] == ["run"]  # one run's samples, by default
    assert [(record.kind, folder.name) for record, folder in find_runs(tmp_path, kinds=("suite", "external"))] == [
        ("external", "external"), ("suite", "suite")]


@pytest.mark.parametrize("fields, message", [
    ({"seed": None}, "fields missing: seed"),
    ({"seed": None, "model": None}, "fields missing: model, seed"),
    ({"created_at": None}, "fields missing: created_at"),
    ({"keep": 0.25}, "keep must be"),
    ({"seed": "0"}, "seed must be int"),
    ({"git_dirty": 1}, "git_dirty must be bool"),
    ({"decoding": "sjd"}, "decoding must be an object with a string name"),
    ({"decoding": None}, "decoding must be an object"),
    ({"budget_allocation": {"name": "pyramid"}}, "budget_allocation must be the allocation's name"),
    ({"layer_budgets": [1.5, 2]}, "layer_budgets must be a list of integers"),
    ({"weights": "pretrained"}, "weights must be one of"),
])
def test_a_malformed_record_names_its_file_and_what_is_wrong(tmp_path, fields, message):
    raw = samples_record()
    raw.update(fields)
    path = write_record(tmp_path / "run-7", {key: value for key, value in raw.items()
                                             if value is not None or key == "decoding"})
    with pytest.raises(RecordError, match=message) as caught:
        RunRecord.load(path.parent)
    assert str(path) in str(caught.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("[1, 2]")
    with pytest.raises(RecordError, match=r"bad/metrics.json holds a list"):
        load_run(tmp_path / "bad")
