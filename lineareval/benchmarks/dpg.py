"""DPG-Bench (ELLA, https://arxiv.org/abs/2403.05135): dense prompts, 4 images each, scored by VQA.

Prompts come from the official release's `prompts/<item_id>.txt`, questions from `dpg_bench.csv`
(paths in the config). Each image is generated on its own (the official protocol tiles 4 images into a
2x2 grid; `lineareval.metrics.dpg.split_grid` maps one onto the other, in the same order). Scoring
follows `compute_dpg_bench.py` (see `lineareval.metrics.dpg`); the VQA model is the official mPLUG-large
(ModelScope) or, as a documented alternative whose numbers are not comparable to the paper's, a
transformers VQA model: `benchmark.vqa._target_=lineareval.metrics.dpg.TransformersVQA`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lineareval.benchmarks.samples import SampleSet, text_samples
from lineareval.config import call_target
from lineareval.record import write_json_atomic


@dataclass
class DPGBench:
    """`questions`: dpg_bench.csv; `prompts_dir`: the release's prompts/ folder; `limit`: first N prompts."""

    questions: str
    prompts_dir: str
    images_per_prompt: int = 4
    vqa: dict = field(default_factory=lambda: {"_target_": "lineareval.metrics.dpg.MPlugVQA"})
    vqa_batch_size: int = 32
    limit: int | None = None

    def check(self) -> None:
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
        prompts = [(Path(self.prompts_dir) / f"{item}.txt").read_text().strip() for item in items]
        samples = text_samples(prompts, self.images_per_prompt)
        samples.arrays["item_ids"] = np.array(items)
        return samples

    def evaluate(self, run_dir: Path, device="cpu") -> dict:
        from lineareval.metrics.dpg import evaluate_dpg, load_dpg_questions

        tokens = np.load(Path(run_dir) / "tokens.npz")
        images = np.load(Path(run_dir) / "samples.npz")["arr_0"]
        items = list(tokens["item_ids"])
        by_item: dict[str, list[Image.Image]] = {}
        for image, prompt in zip(images, tokens["prompt_index"]):
            by_item.setdefault(items[prompt], []).append(Image.fromarray(image))
        questions = load_dpg_questions(self.questions)
        result = evaluate_dpg(by_item, questions, call_target(self.vqa), self.vqa_batch_size)
        write_json_atomic(Path(run_dir) / "dpg_details.json", json.loads(json.dumps(result, default=str)))
        return {key: value for key, value in result.items()
                if key.startswith("dpg_") and (value is None or isinstance(value, (int, float, str)))}
