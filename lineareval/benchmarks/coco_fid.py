"""COCO FID and CLIP score for text-to-image models.

Captions: from a COCO captions annotation file. Default: val2014, 30,000 captions, one per image
(the lowest annotation id of each image) for 30,000 images drawn with a fixed permutation
(numpy seed 0, independent of the run's seed so every run scores the same set); `val2017` with 5,000
captions is the other common protocol (`conf/benchmark/coco_fid_val2017.yaml`). One image per caption.
Reference: the same images from the COCO folder, center-cropped to a square and resized to
`resolution` with PIL bicubic, packed as an ADM-layout `.npz` and cached (key: the image list and the
protocol); generated images are resized to `resolution` bicubic on the [-1, 1] tensor. FID (and
precision/recall) as in `lineareval.metrics.fid`; CLIP score as in `lineareval.metrics.clip_score`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from lineareval.benchmarks.base import Benchmark
from lineareval.benchmarks.paired import PairedImageMetrics
from lineareval.benchmarks.samples import SampleSet, text_samples
from lineareval.record import write_npz_atomic

log = logging.getLogger(__name__)
PROTOCOL = "center-crop square, PIL bicubic resize, uint8 RGB v1"


def center_crop_resize(image: Image.Image, size: int) -> np.ndarray:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.convert("RGB").crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.BICUBIC), dtype=np.uint8)


@dataclass
class CocoFID(PairedImageMetrics, Benchmark):
    """`annotations`: captions_val2014.json (or 2017); `images_dir`: the matching image folder."""

    annotations: str
    images_dir: str
    num_captions: int = 30000
    resolution: int = 256
    extractor: str = "inception-v3-compat"
    extractor_weights: str | None = None
    clip_model: str = "ViT-B/32"
    cache_dir: str | None = None
    batch_size: int = 64

    def check(self) -> None:
        for path in (Path(self.annotations), Path(self.images_dir)):
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist: download COCO (captions annotations and the val "
                                        "images) and set benchmark.annotations / benchmark.images_dir")

    def selection(self) -> list[dict]:
        """[{image_id, file_name, caption}] in scoring order."""
        data = json.loads(Path(self.annotations).read_text())
        files = {image["id"]: image["file_name"] for image in data["images"]}
        first: dict[int, dict] = {}
        for annotation in sorted(data["annotations"], key=lambda row: row["id"]):
            first.setdefault(annotation["image_id"], annotation)
        image_ids = sorted(first)
        if len(image_ids) < self.num_captions:
            raise ValueError(f"{self.annotations} has {len(image_ids)} captioned images, fewer than "
                             f"num_captions={self.num_captions}")
        order = np.random.default_rng(0).permutation(len(image_ids))[: self.num_captions]
        return [{"image_id": image_ids[i], "file_name": files[image_ids[i]],
                 "caption": first[image_ids[i]]["caption"].strip()} for i in order]

    def samples(self, cfg, generator) -> SampleSet:
        if generator.conditioning != "text":
            raise ValueError(f"benchmark=coco_fid needs a text-conditional model, not {cfg.model.name}")
        self.check()
        chosen = self.selection()
        samples = text_samples([row["caption"] for row in chosen], 1)
        samples.arrays["image_ids"] = np.array([row["image_id"] for row in chosen])
        return samples

    def reference(self, chosen: list[dict]) -> Path:
        """The cached ADM-layout reference batch of the chosen COCO images."""
        key = hashlib.sha256(json.dumps([PROTOCOL, self.resolution, [r["file_name"] for r in chosen]]).encode())
        cache = Path(self.cache_dir or Path(self.images_dir) / ".lineareval_cache")
        path = cache / f"coco-reference-{key.hexdigest()[:20]}.npz"
        if path.exists():
            return path
        images = np.empty((len(chosen), self.resolution, self.resolution, 3), dtype=np.uint8)
        for index, row in enumerate(tqdm(chosen, desc="COCO reference images", unit="img")):
            source = Path(self.images_dir) / row["file_name"]
            if not source.exists():
                raise FileNotFoundError(f"{source} (listed in {self.annotations}) is missing")
            with Image.open(source) as image:
                images[index] = center_crop_resize(image, self.resolution)
        cache.mkdir(parents=True, exist_ok=True)
        write_npz_atomic(path, arr_0=images)
        return path

    def evaluate(self, run_dir: Path, device="cpu") -> dict:
        from lineareval.metrics.clip_score import clip_score, load_clip
        from lineareval.metrics.fid import compute_metrics

        chosen = self.selection()
        samples = Path(run_dir) / "samples.npz"
        images = np.load(samples)["arr_0"]
        metrics = compute_metrics(samples, self.reference(chosen[: len(images)]), self.extractor,
                                  num_samples=len(images), cache_dir=self.cache_dir, batch_size=self.batch_size,
                                  device=device, weights_path=self.extractor_weights,
                                  sample_layers=self.run_feature_layers(Path(run_dir), device))
        model, preprocess = load_clip(self.clip_model, device)
        captions = [row["caption"] for row in chosen[: len(images)]]
        result = {key: metrics[key] for key in ("fid", "precision", "recall", "feature_extractor", "num_reference")}
        result["clip_score"] = clip_score(images, captions, model, preprocess, self.batch_size, device)
        return result

    def reference_statistics_for(self, run_dir: Path, device="cpu"):
        """The reference statistics of the COCO images of the run's captions (the first n of the selection)."""
        from lineareval.metrics.fid import reference_statistics
        from lineareval.metrics.features import image_source

        count = len(image_source(Path(run_dir) / "samples.npz"))
        return reference_statistics(self.reference(self.selection()[:count]), self.extractor, self.cache_dir,
                                    batch_size=self.batch_size, device=device, weights_path=self.extractor_weights,
                                    progress=False)
