"""Find model weight files in a local folder, downloading them from the Hugging Face hub if allowed.

Missing weights are an error, never a silent fall-back to random initialisation: random weights are
only used when a run asks for them with `weights=random` (speed benchmarks).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

HUB_URL = "https://huggingface.co"


@dataclass
class WeightFile:
    """One file a model needs: looked up as `weights_dir/filename`, else fetched from `repo_id`.

    An explicit `path` overrides the lookup and must exist. `field` names the config field that sets
    `path` (e.g. `model.ckpt`), so error messages can say what to override.
    """

    filename: str
    repo_id: str | None
    path: str | None = None
    field: str | None = None


class MissingWeightsError(FileNotFoundError):
    """One or more weight files are neither on disk nor downloadable."""


def resolve_weight_files(
    files: list[WeightFile], weights_dir: str | Path, *, download: bool = True
) -> list[Path]:
    """Return a local path for every file, downloading from the hub where needed and allowed.

    All files are tried before failing, so one `MissingWeightsError` lists everything missing.
    """
    folder = Path(weights_dir).expanduser().absolute()
    resolved: list[Path] = []
    missing: list[str] = []
    for file in files:
        path, problem = _resolve_one(file, folder, download)
        if path is not None:
            resolved.append(path)
        else:
            missing.append(problem)
    if missing:
        raise MissingWeightsError(
            f"Missing model weights ({len(missing)} file{'s' if len(missing) > 1 else ''}):\n"
            + "\n".join(missing)
            + "\nRandom weights are only used when asked for explicitly with weights=random "
            "(for speed benchmarks)."
        )
    return resolved


def _resolve_one(file: WeightFile, folder: Path, download: bool) -> tuple[Path | None, str]:
    """Return (path, "") when found, else (None, a description of the problem and its fix)."""
    override = f"set {file.field or 'model.<field>'}=PATH"
    if file.path is not None:
        path = Path(file.path).expanduser().absolute()
        if path.is_file():
            logger.info("Using %s from explicit path %s", file.filename, path)
            return path, ""
        if path.is_dir():
            return None, f"- {path}: is a directory, not a file.\n    {override} to the checkpoint file{_inside(path)}."
        return None, f"- {path}: explicit path does not exist.\n    {override} to an existing file."

    local = folder / file.filename
    if local.is_file():
        logger.info("Found %s in %s", file.filename, folder)
        return local, ""
    if local.is_dir():
        return None, (f"- {local} is a directory, not a file.\n    Move the checkpoint file{_inside(local)} to "
                      f"that path, or {override} to it.")

    if file.repo_id is None:
        reason = "no hub repository is known for it"
    elif not download:
        reason = "download is disabled"
    elif _hub_offline():
        reason = "offline: HF_HUB_OFFLINE is set"
    else:
        path, reason = _download(file.repo_id, file.filename, folder)
        if path is not None:
            return path, ""

    lines = [f"- {file.filename}: not found in {folder} ({reason})."]
    if file.repo_id is not None:
        lines += [
            f"    Get it from {HUB_URL}/{file.repo_id}, e.g.:",
            f"    {_hub_cli()} {file.repo_id} {file.filename} --local-dir {folder}",
        ]
    lines.append(f"    Or put it in {folder}, or {override} to a copy you already have.")
    return None, "\n".join(lines)


def _inside(folder: Path) -> str:
    """ " inside it (a.pt, b.pt)" listing the checkpoint files a directory holds, for error messages."""
    from lineareval.models.checkpoint import CHECKPOINT_SUFFIXES

    found = sorted(str(item) for item in folder.iterdir() if item.suffix in CHECKPOINT_SUFFIXES)
    return f" inside it ({', '.join(found[:5])})" if found else ""


def _download(repo_id: str, filename: str, folder: Path) -> tuple[Path | None, str]:
    from huggingface_hub import hf_hub_download

    logger.info("Downloading %s from %s/%s into %s", filename, HUB_URL, repo_id, folder)
    try:
        path = Path(hf_hub_download(repo_id=repo_id, filename=filename, local_dir=folder))
    except _hub_errors() as error:
        return None, f"download failed: {type(error).__name__}: {_first_line(error)}"
    logger.info("Downloaded %s to %s", filename, path)
    return path, ""


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exceptions `hf_hub_download` raises for offline, missing or unreachable files.

    Most derive from OSError (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError with
    RepositoryNotFoundError, GatedRepoError, RemoteEntryNotFoundError); the rest are looked up by
    name because not every huggingface_hub version has them.
    """
    from huggingface_hub import errors

    names = ("EntryNotFoundError", "HfHubHTTPError", "HFValidationError", "XetDownloadError")
    found = tuple(getattr(errors, name) for name in names if hasattr(errors, name))
    return (OSError, *found)


def _hub_offline() -> bool:
    """Offline per the environment now, or per huggingface_hub (which reads it once at import)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in {"1", "ON", "YES", "TRUE"} or constants.HF_HUB_OFFLINE


def _hub_cli() -> str:
    """The installed hub client's download command (`hf download` since huggingface_hub 0.34)."""
    from huggingface_hub import __version__

    major, minor = (int(part) for part in __version__.split(".")[:2])
    return "hf download" if (major, minor) >= (0, 34) else "huggingface-cli download"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"
