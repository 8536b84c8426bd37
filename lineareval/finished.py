"""Whether a finished run's files are whole, checked before the run is skipped as finished.

`metrics.json` marks a run finished, but a copy cut short, a full disk outside our atomic writes, or a
hand edit can leave a readable `metrics.json` beside a truncated `tokens.npz`, or an empty record beside
good samples. A damaged run is never skipped: it is sampled again (`runfolder.usable_result`), or
refused naming the file where its folder cannot be written. The checks read the `.npz` headers only
(a 50k-image `samples.npz` is not loaded), so skipping stays cheap.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np

from lineareval.record import METRICS_FILE, RunRecord

# The fields every generation record has (RunRecord's fields without a default)
RECORD_FIELDS = tuple(field.name for field in dataclasses.fields(RunRecord)
                      if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING)


class DamagedRunError(ValueError):
    """A finished run's file is unreadable or does not hold what its record says."""


def npz_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each array of an `.npz`, from the headers alone; a DamagedRunError if unreadable."""
    if not path.is_file():
        raise DamagedRunError(f"{path} is missing")
    shapes = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                    else:  # 2.0 (and 3.0, whose header differs only in its text encoding)
                        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                shapes[info.filename.removesuffix(".npy")] = (shape, dtype)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DamagedRunError(f"{path} is unreadable ({type(error).__name__}: {error})") from error
    return shapes


def _rows(path: Path, key: str, count: int, ndim: int) -> None:
    shapes = npz_shapes(path)
    if key not in shapes:
        raise DamagedRunError(f"{path} has no {key!r} array (it holds {sorted(shapes)})")
    shape, _ = shapes[key]
    if len(shape) != ndim or shape[0] != count:
        raise DamagedRunError(f"{path} holds {key} of shape {shape}; the record says {count} samples")


def check_generation(run_dir: Path, record: dict, decode_images: bool, fingerprint: str | None) -> None:
    """Raise a DamagedRunError naming the file unless a generation record's files are whole and agree."""
    missing = [name for name in RECORD_FIELDS if name not in record]
    if missing:
        raise DamagedRunError(f"{run_dir / METRICS_FILE} lacks the record fields {missing}")
    count = record["num_samples"]
    _rows(run_dir / "tokens.npz", "tokens", count, 2)
    if decode_images:
        _rows(run_dir / "samples.npz", "arr_0", count, 4)
    stored = {"metrics.json": record.get("run_fingerprint"), "identity.json": fingerprint}
    try:  # tokens.npz carries the fingerprint since runs verified their files
        with np.load(run_dir / "tokens.npz") as data:
            if "fingerprint" in data.files:
                stored["tokens.npz"] = str(data["fingerprint"])
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DamagedRunError(f"{run_dir / 'tokens.npz'} is unreadable ({error})") from error
    known = {name: value for name, value in stored.items() if value is not None}
    if len(set(known.values())) > 1:
        raise DamagedRunError(f"{run_dir}'s files are of different runs: fingerprints " +
                              ", ".join(f"{name} {value}" for name, value in known.items()))


def check_finished(run_dir: Path, record: dict, decode_images: bool) -> None:
    """Raise a DamagedRunError naming the file unless the finished run in `run_dir` (its `record`) is whole."""
    identity_path = run_dir / "identity.json"
    fingerprint = None
    if identity_path.is_file():
        try:
            fingerprint = json.loads(identity_path.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError) as error:
            raise DamagedRunError(f"{identity_path} is unreadable ({error})") from error
    if "rows" in record:  # a suite's record (efficiency): its rows, mirrored in efficiency.csv
        if not isinstance(record["rows"], list) or not record["rows"]:
            raise DamagedRunError(f"{run_dir / METRICS_FILE} holds no measured rows")
        return
    if record.get("model") == "external":  # stage=evaluate of images made elsewhere: the record is all there is
        return
    check_generation(run_dir, record, decode_images, fingerprint)
