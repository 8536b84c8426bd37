"""The plain sampling benchmark: which samples to draw, and their conditions; cost metrics only.

Class-conditional models: `num_samples` labels uniform from (seed, i). Text-conditional models: every
prompt (`prompt=...` or `prompts_file=...`) times `images_per_prompt`; sample (p, j) draws its
randomness from the key p * 2**20 + j, so it depends only on (seed, p, j).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lineareval.benchmarks.base import Benchmark
from lineareval.sampling import class_labels

IMAGE_KEY_BITS = 20


@dataclass
class SampleSet:
    """What to generate: one randomness key and one condition per sample, plus arrays for tokens.npz."""

    sample_ids: torch.Tensor  # (n,) int64
    conditions: torch.Tensor | list[str]  # (n,) class labels or n prompts
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def batch(self, start: int, stop: int, device: torch.device):
        conditions = self.conditions[start:stop]
        if isinstance(conditions, torch.Tensor):
            conditions = conditions.to(device)
        return self.sample_ids[start:stop].to(device), conditions


def read_text_file(path: Path, field: str) -> str:
    """A text file's contents; a ValueError naming the field, the file and the first bad byte if not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{field} {path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}"
                         "): is it an image or an archive? Pass a .txt (one prompt per line), .json (a list) or "
                         ".jsonl file") from error


def load_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """Prompts from the command line or a file (.txt one per line; .json list; .jsonl with 'prompt'/'caption')."""
    if prompt and prompts_file:
        raise ValueError("give either prompt=... or prompts_file=..., not both")
    if prompt:
        return [str(prompt)]
    if not prompts_file:
        raise ValueError("this model is text-conditional: pass prompt=\"...\" or prompts_file=PATH (or a text benchmark)")
    path = Path(prompts_file).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"prompts_file {path} does not exist")
    text = read_text_file(path, "prompts_file")
    try:
        if path.suffix == ".json":
            prompts = json.loads(text)
        elif path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            prompts = [row.get("prompt", row.get("caption")) if isinstance(row, dict) else row for row in rows]
        else:
            prompts = [line.strip() for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ValueError(f"prompts_file {path} is not valid JSON{' lines' * (path.suffix == '.jsonl')} ({error}); "
                         "a .txt file takes one prompt per line") from error
    if not prompts or not all(isinstance(text, str) and text for text in prompts):
        raise ValueError(f"{path} holds no prompts, or entries that are not non-empty strings")
    return prompts


def text_samples(prompts: list[str], images_per_prompt: int) -> SampleSet:
    if images_per_prompt < 1 or images_per_prompt >= 2**IMAGE_KEY_BITS:
        raise ValueError(f"images_per_prompt must be in [1, {2**IMAGE_KEY_BITS}), got {images_per_prompt}")
    prompt_index = np.repeat(np.arange(len(prompts)), images_per_prompt)
    image_index = np.tile(np.arange(images_per_prompt), len(prompts))
    keys = torch.from_numpy(prompt_index * 2**IMAGE_KEY_BITS + image_index).long()
    return SampleSet(keys, [prompts[p] for p in prompt_index],
                     {"prompts": np.array(prompts), "prompt_index": prompt_index, "image_index": image_index})


@dataclass
class Samples(Benchmark):
    """Conditions for class- or text-conditional models; scores nothing beyond the runner's cost record."""

    def samples(self, cfg, generator) -> SampleSet:
        if generator.conditioning == "text":
            return text_samples(load_prompts(cfg.get("prompt"), cfg.get("prompts_file")), cfg.images_per_prompt)
        ids = torch.arange(cfg.num_samples)
        labels = class_labels(cfg.seed, ids, generator.num_classes)
        return SampleSet(ids, labels, {"labels": labels.numpy()})

    def evaluate(self, run_dir: Path, device: torch.device | str = "cpu") -> dict:
        return {}
