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
# Weight files of a folder, tried in this order: safetensors (transformers' layout), then the pickled
# `pytorch_model.bin` that older releases such as deepseek-ai/Janus-Pro-* ship (read with weights_only=True).
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")


def resolve_model_folder(path: str, weights_dir: str | Path, *, download: bool = True,
                         required: tuple[str | tuple[str, ...], ...] = ("config.json",),
                         patterns: tuple[str, ...] = PATTERNS) -> Path:
    """`path` as `from_pretrained` takes it: a local folder, or a hub id found in / fetched to weights_dir/<name>.

    Each entry of `required` is a glob, or a tuple of globs of which one must match (e.g. safetensors or
    `.bin` weights); `patterns` are the files a download fetches. Raises MissingWeightsError naming the
    missing files, the folder and the command to fetch them.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        folder, repo_id = local, None
    else:
        folder, repo_id = Path(weights_dir).expanduser().resolve() / path.split("/")[-1], path
    missing = _missing(folder, required)
    if missing and repo_id and download and not os.environ.get("HF_HUB_OFFLINE"):
        try:
            from huggingface_hub import snapshot_download

            log.info("downloading %s into %s", repo_id, folder)
            snapshot_download(repo_id, local_dir=folder, allow_patterns=list(patterns))
            missing = _missing(folder, required)
        except Exception as error:  # offline, gated, unknown repo: all end in the same clear message
            log.warning("download of %s failed: %s", repo_id, str(error).splitlines()[0])
    if missing:
        source = (f"Get them from https://huggingface.co/{repo_id}, e.g.:\n    hf download {repo_id} --local-dir {folder}"
                  if repo_id else f"model.path={path} is a local folder: put the files there")
        raise MissingWeightsError(
            f"Missing model files in {folder}: {', '.join(missing)}.\n{source}\n"
            "Random weights are only used when asked for explicitly with weights=random (for speed benchmarks).")
    return folder


def _missing(folder: Path, required: tuple[str | tuple[str, ...], ...]) -> list[str]:
    wanted = [names if isinstance(names, tuple) else (names,) for names in required]
    return [" or ".join(names) for names in wanted if not any(any(folder.glob(name)) for name in names)]


def checkpoint_files(path: str | Path) -> list[Path]:
    """The weight files of a HF checkpoint: a folder (the first of `WEIGHT_FILES` found), a file, or a shard index."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise MissingWeightsError(f"No checkpoint in {path}: expected one of {', '.join(WEIGHT_FILES)} (with its "
                                      "shards) as in a Hugging Face model download, e.g. "
                                      "Alpha-VLLM/Lumina-mGPT-7B-768.")
        path = found[0]
    if not path.exists():
        raise MissingWeightsError(f"No checkpoint at {path}: expected a folder holding one of {', '.join(WEIGHT_FILES)}"
                                  " (a Hugging Face model download, e.g. Alpha-VLLM/Lumina-mGPT-7B-768).")
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
