"""Model folders in the Hugging Face layout: a local folder, or a hub id downloaded into weights_dir."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from lineareval.models.checkpoint import CheckpointError
from lineareval.models.weights import MissingWeightsError

log = logging.getLogger(__name__)

PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken")


def resolve_model_folder(path: str, weights_dir: str | Path, *, download: bool = True,
                         required: tuple[str, ...] = ("config.json",)) -> Path:
    """`path` as `from_pretrained` takes it: a local folder, or a hub id found in / fetched to weights_dir/<name>.

    Raises MissingWeightsError naming the missing files, the folder and the command to fetch them.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        folder, repo_id = local, None
    else:
        folder, repo_id = Path(weights_dir).expanduser().resolve() / path.split("/")[-1], path
    missing = [name for name in required if not any(folder.glob(name))]
    if missing and repo_id and download and not os.environ.get("HF_HUB_OFFLINE"):
        try:
            from huggingface_hub import snapshot_download

            log.info("downloading %s into %s", repo_id, folder)
            snapshot_download(repo_id, local_dir=folder, allow_patterns=list(PATTERNS))
            missing = [name for name in required if not any(folder.glob(name))]
        except Exception as error:  # offline, gated, unknown repo: all end in the same clear message
            log.warning("download of %s failed: %s", repo_id, str(error).splitlines()[0])
    if missing:
        source = (f"Get them from https://huggingface.co/{repo_id}, e.g.:\n    hf download {repo_id} --local-dir {folder}"
                  if repo_id else f"model.path={path} is a local folder: put the files there")
        raise MissingWeightsError(
            f"Missing model files in {folder}: {', '.join(missing)}.\n{source}\n"
            "Random weights are only used when asked for explicitly with weights=random (for speed benchmarks).")
    return folder


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a HF checkpoint: a folder, a `.safetensors` file or an index `.json`."""
    path = Path(path).expanduser()
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        path = index if index.exists() else path / "model.safetensors"
    if not path.exists():
        raise MissingWeightsError(f"No checkpoint at {path}: expected a folder holding model.safetensors "
                                  "or model.safetensors.index.json with its shards "
                                  "(a Hugging Face model download, e.g. Alpha-VLLM/Lumina-mGPT-7B-768).")
    if path.suffix != ".json":
        return [path]
    try:
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as error:
        raise CheckpointError(f"Cannot read the shard index {path}: {error!r}") from error
    missing = [name for name in shards if not (path.parent / name).exists()]
    if missing:
        raise MissingWeightsError(f"Shards listed in {path} are missing next to it: {', '.join(missing)}")
    return [path.parent / name for name in shards]
