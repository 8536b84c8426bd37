"""benchmark=coco_fid on a tiny Janus: caption selection, cached reference, FID and CLIP score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lineareval.benchmarks.coco_fid import CocoFID
from lineareval.metrics.features import ExtractorSpec, register_extractor
from lineareval.runner import run
from test_fid import TinyExtractor


@pytest.fixture
def coco(tmp_path) -> tuple[Path, Path]:
    images_dir = tmp_path / "val2014"
    images_dir.mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id in range(1, 7):
        name = f"COCO_val2014_{image_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (20 + image_id, 30, 3), dtype=np.uint8)).save(images_dir / name)
        images.append({"id": image_id, "file_name": name})
        annotations += [{"id": 100 + 2 * image_id, "image_id": image_id, "caption": "a red apple "},
                        {"id": 99 + 2 * image_id, "image_id": image_id, "caption": "a green pear"}]
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path, images_dir


def test_selection_is_one_caption_per_image_with_a_fixed_permutation(coco):
    annotations, images_dir = coco
    chosen = CocoFID(str(annotations), str(images_dir), num_captions=4).selection()
    assert len(chosen) == 4 and len({row["image_id"] for row in chosen}) == 4
    assert all(row["caption"] == "a green pear" for row in chosen)  # the lowest annotation id of each image
    assert chosen == CocoFID(str(annotations), str(images_dir), num_captions=4).selection()
    with pytest.raises(ValueError, match="fewer than num_captions=7"):
        CocoFID(str(annotations), str(images_dir), num_captions=7).selection()


def test_coco_run_scores_fid_and_clip(make_config, janus_folder, coco, tiny_clip_file):
    register_extractor(ExtractorSpec("tiny-coco", TinyExtractor, "pool", protocol="tiny v1"))
    annotations, images_dir = coco
    cfg = make_config("model=janus_pro_1b", f"model.path={janus_folder}", "benchmark=coco_fid",
                      f"benchmark.annotations={annotations}", f"benchmark.images_dir={images_dir}",
                      "benchmark.num_captions=4", "benchmark.resolution=8", "benchmark.extractor=tiny-coco",
                      f"benchmark.clip_model={tiny_clip_file}", "batch_size=2")
    record = run(cfg)
    assert np.load(Path(cfg.run_dir) / "samples.npz")["arr_0"].shape == (4, 8, 8, 3)
    assert record["evaluated"] and record["fid"] > 0 and 0 <= record["clip_score"] <= 100  # value: test_clip_score
    assert record["num_reference"] == 4 and record["num_samples"] == 4
    references = list((Path(cfg.output_root) / "feature_cache").glob("coco-reference-*.npz"))
    assert len(references) == 1 and np.load(references[0])["arr_0"].shape == (4, 8, 8, 3)


def test_missing_coco_files_stop_before_generating(make_config, janus_folder, tmp_path):
    cfg = make_config("model=janus_pro_1b", f"model.path={janus_folder}", "benchmark=coco_fid",
                      f"benchmark.annotations={tmp_path / 'none.json'}", f"benchmark.images_dir={tmp_path}")
    with pytest.raises(FileNotFoundError, match="download COCO"):
        run(cfg)
    assert not (Path(cfg.run_dir) / "tokens.npz").exists()
