"""The embedded demo model: its data set, its committed checkpoint, and that it really learned.

The quality tests generate a few balanced samples and compare their offline TF-Inception features
(the demo benchmark's features) with held-out real crops by KID, which unlike FID is unbiased at
20 samples. Margins are far from the measured values (in the `kids` fixture).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lineareval.decoding.method import Sequential

from conftest import CONF_DIR
from lineareval.identity import register_resolvers
from lineareval.demo import DEMO_DIR, GPT_FILE, VQ_FILE
from lineareval.demo.data import PHOTOS, SPLITS, crop_boxes, heldout_corner, load_photos, make_crops
from lineareval.keep import parse_keep
from lineareval.models.checkpoint import CheckpointError, load_state_dict_file
from lineareval.models.init import initialise_random
from lineareval.compose import compose_config
from lineareval.factory import build_generator, build_policy

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # the demo's image size
SAMPLES = 20  # per quality measurement: two per class


def test_crops_are_deterministic_and_balanced():
    images, labels = make_crops(30, SIZE, "train", seed=3)
    again, labels_again = make_crops(30, SIZE, "train", seed=3)
    other, _ = make_crops(30, SIZE, "train", seed=4)
    assert images.shape == (30, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert not np.array_equal(images, other)
    assert np.bincount(labels).tolist() == [3] * len(PHOTOS)


@pytest.mark.parametrize("split", SPLITS)
def test_training_crops_never_touch_the_heldout_quadrant(split):
    photos = load_photos(4 * SIZE)
    boxes, labels, _ = crop_boxes(500, SIZE, split, seed=0)
    for box, label in zip(boxes, labels):
        height, width = photos[label].shape[:2]
        top, left = heldout_corner(photos[label])
        assert SIZE <= box.side <= 2 * SIZE and box.top + box.side <= height and box.left + box.side <= width
        if split == "train":
            assert not box.overlaps(top, left)
        else:
            assert box.top >= top and box.left >= left


def test_a_crop_is_its_photo_region():
    """Crops of side `SIZE` are copied pixel for pixel (mirrored when flipped) from their box."""
    photos = load_photos(4 * SIZE)
    images, _ = make_crops(200, SIZE, "heldout", seed=5)
    boxes, labels, flips = crop_boxes(200, SIZE, "heldout", seed=5)
    exact = [i for i, box in enumerate(boxes) if box.side == SIZE]
    assert exact, "no crop of the native size drawn"
    for index in exact:
        box = boxes[index]
        region = photos[labels[index]][box.top:box.top + SIZE, box.left:box.left + SIZE]
        assert np.array_equal(images[index], region[:, ::-1] if flips[index] else region)


def _compose(*overrides: str):
    register_resolvers()
    return compose_config("model=demo", "device=cpu", *overrides)


def test_committed_checkpoint_loads_strictly_and_matches_its_training_config():
    cfg = _compose()
    generator = build_generator(cfg, torch.device("cpu"), torch.float32)
    assert generator.weights == "checkpoint"
    assert generator.weight_files == [str(DEMO_DIR / GPT_FILE), str(DEMO_DIR / VQ_FILE)]
    assert sum((DEMO_DIR / name).stat().st_size for name in (GPT_FILE, VQ_FILE)) <= 20 * 2**20
    stored = load_state_dict_file(DEMO_DIR / GPT_FILE)
    loaded = generator.model.state_dict()
    assert set(stored) == set(loaded) and all(torch.equal(stored[key], loaded[key]) for key in stored)
    trained = json.loads((DEMO_DIR / "train_config.json").read_text())
    model = cfg.model
    assert (model.dim, model.n_layer, model.n_head, model.vocab_size, model.image_size, model.num_classes) == (
        trained["dim"], trained["n_layer"], trained["n_head"], trained["codebook_size"], trained["image_size"],
        len(PHOTOS))
    assert (list(model.vq.ch_mult), model.vq.ch, model.vq.z_channels, model.vq.num_res_blocks) == (
        trained["vq_ch_mult"], trained["vq_ch"], trained["vq_z_channels"], trained["vq_num_res_blocks"])
    assert generator.layout.rows == generator.layout.line_len == 16  # line-level policies matter
    with pytest.raises(CheckpointError, match="shape mismatches"):
        build_generator(_compose("model.dim=128", "model.n_head=2"), torch.device("cpu"), torch.float32)


def kernel_distance(samples: np.ndarray, reference: np.ndarray) -> float:
    """KID: unbiased MMD^2 with the cubic polynomial kernel on features (N, D), (M, D).

    Binkowski et al. 2018, https://arxiv.org/abs/1801.01401. Unbiased, so usable at 20 samples,
    where FID is dominated by its small-sample bias.
    """
    def kernel(x, y):
        return (x @ y.T / x.shape[1] + 1) ** 3

    within_samples, within_reference = kernel(samples, samples), kernel(reference, reference)
    n, m = len(samples), len(reference)
    return float((within_samples.sum() - np.trace(within_samples)) / (n * (n - 1))
                 + (within_reference.sum() - np.trace(within_reference)) / (m * (m - 1))
                 - 2 * kernel(samples, reference).mean())


def test_training_is_reproducible_and_loads_through_the_standard_loader(tmp_path, monkeypatch):
    """Two tiny trainings with one seed give identical weights; the files load strictly as model=demo."""
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "scripts" / "train_demo.py")
    train_demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_demo", train_demo)  # dataclasses look their module up there
    spec.loader.exec_module(train_demo)
    config = train_demo.TrainConfig(train_crops=40, heldout_crops=20, vq_steps=2, vq_batch=4, restart_every=1,
                                    gpt_steps=2, gpt_batch=4, warmup_steps=1, log_every=1)
    threads = torch.get_num_threads()
    try:
        for run in ("a", "b"):
            train_demo.train(config, tmp_path / run)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    for name in (GPT_FILE, VQ_FILE):
        first, second = (load_state_dict_file(tmp_path / run / name) for run in ("a", "b"))
        assert set(first) == set(second) and all(torch.equal(first[key], second[key]) for key in first)
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert log["vq_codebook_usage_train"] > 1 and np.isfinite(log["gpt_heldout_loss"])
    cfg = _compose(f"model.gpt_ckpt={tmp_path / 'a' / GPT_FILE}", f"model.vq_ckpt={tmp_path / 'a' / VQ_FILE}")
    generator = build_generator(cfg, torch.device("cpu"), torch.float32)
    assert generator.weight_files == [str(tmp_path / "a" / GPT_FILE), str(tmp_path / "a" / VQ_FILE)]


@pytest.fixture(scope="module")
def kids() -> dict[str, float]:
    """KID (offline TF-Inception features) of SAMPLES balanced samples against held-out real crops.

    `full` and `linear_half` (keep=1/2): the committed model, same seeds; `random`: the same
    architecture and trained tokenizer with random GPT weights, so the gap measures what the GPT
    learned. Measured at commit time: full 0.054, linear_half 0.061, random 0.264 (held-out real
    crops against the same reference: -0.020, i.e. 0 within noise).
    """
    from lineareval.metrics.features import build_extractor, extract_features

    extractor = build_extractor("fid-helper-inception")
    reference = extract_features(make_crops(2 * SAMPLES, SIZE, "heldout", seed=1)[0], extractor, progress=False)
    trained = build_generator(_compose(), torch.device("cpu"), torch.float32)
    untrained = build_generator(_compose(), torch.device("cpu"), torch.float32)
    initialise_random([untrained.model], seed=0)

    def score(generator, cache: str, keep: str) -> float:
        policy = build_policy(_compose(f"cache={cache}").cache)
        ids = torch.arange(SAMPLES)
        budget = parse_keep(keep).budget(generator.layout.num_visual)
        tokens = generator.generate(ids % generator.num_classes, ids, policy, budget, seed=0, method=Sequential()).tokens
        features = extract_features(generator.decode_images(tokens).numpy(), extractor, progress=False)
        return kernel_distance(features, reference)

    return {"full": score(trained, "full", "1"), "linear_half": score(trained, "linear", "1/2"),
            "random": score(untrained, "full", "1")}


def test_demo_samples_are_far_from_random_weight_samples(kids):
    assert kids["random"] > 2.5 * kids["full"] and kids["random"] - kids["full"] > 0.1, kids


def test_full_and_linear_at_half_budget_stay_close(kids):
    assert abs(kids["linear_half"] - kids["full"]) < 0.2 * (kids["random"] - kids["full"]), kids


def test_demo_benchmark_records_fid_and_the_report_compares_policies(make_config, tmp_path, monkeypatch):
    """Two runs of benchmark=demo_fid (tiny counts), then scripts/demo_report.py's table and grid."""
    from lineareval.runner import run

    small = ("model=demo", "benchmark=demo_fid", "num_samples=5", "batch_size=5", "benchmark.reference_count=10")
    records = [run(make_config(*small, "cache=full", "keep=1")),
               run(make_config(*small, "cache=linear", "keep=1/4"))]
    for record in records:
        assert record["fid"] > 0 and record["num_reference"] == 10 and record["evaluated"]
        assert record["feature_extractor"] == "fid-helper-inception" and record["weights"] == "checkpoint"
    assert (tmp_path / "outputs/feature_cache/demo_reference-v1-32px-10-seed1.npz").is_file()

    spec = importlib.util.spec_from_file_location("demo_report", ROOT / "scripts" / "demo_report.py")
    report = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "demo_report", report)
    spec.loader.exec_module(report)
    runs = report.finished_runs(tmp_path / "outputs/demo_fid/demo", seed=0)
    frame = report.table(runs)
    assert frame["policy"].tolist() == ["full", "linear"] and frame["budget"].tolist() == [256, 64]
    assert frame["FID"].tolist() == [record["fid"] for record in records]
    assert np.isnan(frame["FID diff"][0]) and frame["FID diff"][1] == records[1]["fid_difference"]  # full: none
    assert frame["token agreement low"][1] <= frame["token agreement"][1] <= frame["token agreement high"][1]
    shown = report.printed(frame)
    assert shown["FID diff"][0] == "-" and shown["FID diff"][1].startswith("+" if records[1]["fid_difference"] > 0
                                                                            else "-")
    grid = report.sample_grid(runs, columns=5, scale=2)
    assert grid.size == (report.LABEL_WIDTH + 5 * (64 + 2), 3 * (64 + 2))  # real row + one row per run


def test_low_rank_frechet_distance_equals_the_matrix_square_root_one():
    from lineareval.benchmarks.demo_fid import frechet_distance_low_rank
    from lineareval.metrics.fid import feature_statistics, frechet_distance

    rng = np.random.default_rng(0)
    samples, reference = rng.gamma(2.0, size=(12, 40)), rng.gamma(3.0, size=(60, 40)) + 0.2
    mu, sigma = feature_statistics(reference)
    expected = frechet_distance(*feature_statistics(samples), mu, sigma)
    assert frechet_distance_low_rank(samples, mu, sigma) == pytest.approx(expected, rel=1e-6)  # sqrtm: ~1e-8
    assert abs(frechet_distance_low_rank(samples[:6], mu, sigma) - expected) > 1  # other samples, other value
    more = rng.gamma(2.0, size=(50, 40))  # N > D: the full formula
    full = frechet_distance(*feature_statistics(more), mu, sigma)
    assert frechet_distance_low_rank(more, mu, sigma) == pytest.approx(full, rel=1e-12)
