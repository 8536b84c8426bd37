"""DPG-Bench (ELLA, https://arxiv.org/abs/2403.05135): dense prompts, 4 images each, scored by VQA.

Prompts come from the official release's `prompts/<item_id>.txt`, questions from `dpg_bench.csv`
(paths in the config), both read as UTF-8. Each image is generated on its own (the official protocol
tiles 4 images into a 2x2 grid; `lineareval.metrics.dpg.split_grid` maps one onto the other, in the
same order). Scoring follows `compute_dpg_bench.py` (see `lineareval.metrics.dpg`): `scoring=official`
(default) gives the script's number exactly, `scoring=corrected` fixes its two quirks; the record's
`dpg_scoring` says which. The VQA model is the official mPLUG-large (ModelScope) or, as a documented
alternative whose numbers are not comparable to the paper's, a transformers VQA model:
`benchmark.vqa._target_=lineareval.metrics.dpg.TransformersVQA`.

`images_dir=PATH` scores images made elsewhere, in the official layout: one 2x2 grid per prompt named
`<item_id>.png` / `.jpg`, cropped top-left, top-right, bottom-left, bottom-right at `resolution` (half
the grid's side when unset), the first `images_per_prompt` crops. Run it with `stage=evaluate`: nothing
is generated, and the run folder gets the record and `dpg_details.json`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lineareval.benchmarks.base import Benchmark
from lineareval.benchmarks.samples import SampleSet, text_samples
from lineareval.config import call_target
from lineareval.record import write_json_atomic

log = logging.getLogger(__name__)

GRID_SUFFIXES = (".png", ".jpg", ".jpeg")


class GridCrops(Sequence):
    """The first `count` crops of one official 2x2 grid file, read when asked for (one prompt's images)."""

    def __init__(self, path: Path, resolution: int | None, count: int):
        self.path, self.resolution, self.count = path, resolution, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Image.Image:
        from lineareval.metrics.dpg import split_grid

        if not 0 <= index < self.count:
            raise IndexError(index)
        with Image.open(self.path) as grid:
            grid.load()
            try:
                return split_grid(grid, self.resolution or min(grid.size) // 2, self.count)[index]
            except ValueError as error:
                raise ValueError(f"{self.path}: {error} (set benchmark.resolution to the side of one image)") from error


@dataclass
class DPGBench(Benchmark):
    """`questions`: dpg_bench.csv; `prompts_dir`: the release's prompts/ folder; `limit`: first N prompts;
    `scoring`: official | corrected; `images_dir`: score external 2x2 grids instead (stage=evaluate)."""

    questions: str
    prompts_dir: str
    images_per_prompt: int = 4
    vqa: dict = field(default_factory=lambda: {"_target_": "lineareval.metrics.dpg.MPlugVQA"})
    vqa_batch_size: int = 32
    limit: int | None = None
    scoring: str = "official"
    images_dir: str | None = None
    resolution: int | None = None  # side of one image: the crop size of external grids; generated ones are resized

    def __post_init__(self) -> None:
        from lineareval.metrics.dpg import SCORINGS

        if self.scoring not in SCORINGS:
            raise ValueError(f"benchmark.scoring must be one of {sorted(SCORINGS)}, got {self.scoring!r}")

    @property
    def scores_external_images(self) -> bool:
        """Declared to the runner: stage=evaluate needs no generation, the images are in `images_dir`."""
        return self.images_dir is not None

    def check(self) -> None:
        if self.scores_external_images:
            raise ValueError(f"benchmark.images_dir={self.images_dir} scores images made elsewhere: run with "
                             "stage=evaluate (nothing to generate), or drop benchmark.images_dir")
        for path in (Path(self.questions), Path(self.prompts_dir)):
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist: get DPG-Bench (dpg_bench.csv and prompts/) from the "
                                        "ELLA release (TencentQQGYLab/ELLA, dpg_bench/) and set benchmark.questions / "
                                        "benchmark.prompts_dir")

    def item_ids(self) -> list[str]:
        ids = sorted(path.stem for path in Path(self.prompts_dir).glob("*.txt"))
        if not ids:
            raise FileNotFoundError(f"no <item_id>.txt prompt files in {self.prompts_dir}")
        return ids[: self.limit] if self.limit else ids

    def samples(self, cfg, generator) -> SampleSet:
        if generator.conditioning != "text":
            raise ValueError(f"benchmark=dpg needs a text-conditional model, not {cfg.model.name}")
        self.check()
        items = self.item_ids()
        # UTF-8 whatever the locale; "-sig" drops a byte-order mark an editor may have written
        prompts = [(Path(self.prompts_dir) / f"{item}.txt").read_text(encoding="utf-8-sig").strip() for item in items]
        samples = text_samples(prompts, self.images_per_prompt)
        samples.arrays["item_ids"] = np.array(items)
        return samples

    def evaluate(self, run_dir: Path, device="cpu") -> dict:
        from lineareval.metrics.dpg import SCORINGS, evaluate_dpg, load_dpg_questions

        scoring = SCORINGS[self.scoring]
        questions = load_dpg_questions(self.questions, skip_first_row=scoring.skip_first_row)
        images = self._external_images() if self.scores_external_images else self._run_images(Path(run_dir))
        unscored = sorted(set(images) - set(questions))
        if unscored:  # the official script skips them too (no questions, or its KeyError on the dropped row)
            log.warning("DPG-Bench (scoring=%s): no questions for %d prompts with images, not scored: %s",
                        self.scoring, len(unscored), ", ".join(unscored[:10]))
        images = {item: crops for item, crops in images.items() if item in questions}
        result = evaluate_dpg(images, questions, call_target(self.vqa), self.vqa_batch_size, scoring.category_rule)
        result.update(dpg_scoring=self.scoring, dpg_images_dir=self.images_dir)
        write_json_atomic(Path(run_dir) / "dpg_details.json", json.loads(json.dumps(result, default=str)))
        return {key: value for key, value in result.items()
                if key.startswith("dpg_") and (value is None or isinstance(value, (int, float, str)))}

    def _run_images(self, run_dir: Path) -> dict[str, list[Image.Image]]:
        tokens = np.load(run_dir / "tokens.npz")
        images = np.load(run_dir / "samples.npz")["arr_0"]
        items = list(tokens["item_ids"])
        by_item: dict[str, list[Image.Image]] = {}
        for image, prompt in zip(images, tokens["prompt_index"]):
            by_item.setdefault(items[prompt], []).append(Image.fromarray(image))
        return by_item

    def _external_images(self) -> dict[str, GridCrops]:
        """`<item_id>.<ext>` grids of images_dir; the item is the name up to its first dot, as officially."""
        folder = Path(self.images_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"benchmark.images_dir={folder} is not a folder of <item_id>.png / .jpg grids")
        by_item: dict[str, GridCrops] = {}
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in GRID_SUFFIXES:
                continue
            item = path.name.split(".")[0]
            if item in by_item:
                raise ValueError(f"{folder} holds two grids for prompt {item!r}: {by_item[item].path.name} and "
                                 f"{path.name}; keep one")
            by_item[item] = GridCrops(path, self.resolution, self.images_per_prompt)
        if not by_item:
            raise FileNotFoundError(f"no <item_id>.png / .jpg grid images in {folder}")
        chosen = sorted(by_item)[: self.limit] if self.limit else sorted(by_item)
        return {item: by_item[item] for item in chosen}
