"""Per-run feature cache (lineareval/metrics/run_features.py) and the channels-last Inception input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import roundoff_tolerance
from lineareval.metrics.features import ExtractorSpec, build_extractor, register_extractor
from lineareval.metrics.run_features import features_path, run_feature_layers, run_features
from test_fid import TinyExtractor


@pytest.fixture
def run_dir(tmp_path):
    register_extractor(ExtractorSpec("tiny-run", TinyExtractor, "pool", "logits", protocol="tiny v1"))
    np.savez(tmp_path / "samples.npz", arr_0=np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), np.uint8))
    return tmp_path


def test_features_are_extracted_once_and_keyed_by_the_samples(run_dir, monkeypatch):
    first = run_feature_layers(run_dir, "tiny-run")
    assert set(first) == {"pool", "logits"} and first["pool"].shape == (6, 16)
    assert features_path(run_dir, "tiny-run").is_file()

    def no_network(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr("lineareval.metrics.run_features.build_extractor", no_network)
    again = run_feature_layers(run_dir, "tiny-run")
    assert all(np.array_equal(first[layer], again[layer]) for layer in first)  # float32 stored: nothing lost
    np.savez(run_dir / "samples.npz", arr_0=np.random.default_rng(1).integers(0, 256, (6, 16, 16, 3), np.uint8))
    with pytest.raises(AssertionError, match="cache was not used"):  # other samples: extracted again
        run_features(run_dir, "tiny-run")


def test_a_run_without_samples_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="decode_images=true"):
        run_features(tmp_path, "fid-helper-inception")


def inception_depth(network: torch.nn.Module) -> int:
    """Reduction lengths chained through the Inception network, counted generously: every convolution's
    C_in * k_h * k_w as if all were in one chain (branches are in parallel), plus the 8 x 8 average pool."""
    return sum(weight.shape[1] * weight.shape[2] * weight.shape[3]
               for _, weight in network.named_parameters() if weight.dim() == 4) + 64


class StandardLayout(torch.nn.Module):
    """The network fed the usual contiguous (NCHW) layout; records whether its input came channels-last."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network, self.saw_channels_last = network, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.saw_channels_last.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return self.network(x.contiguous())


def test_channels_last_input_gives_the_same_features_to_rounding():
    """The channels-last network only sums in another order: within the round-off bound of its depth
    (conftest.roundoff_tolerance; measured: 5e-6 on features of magnitude 5, bound 0.06), while
    swapping the colour channels (a real preprocessing bug) moves them far beyond it."""
    extractor = build_extractor("fid-helper-inception")
    images = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (3, 3, 32, 32), np.uint8))
    network = extractor.net
    with torch.inference_mode():
        channels_last = extractor(images)[0]
        extractor.net = StandardLayout(network)
        standard = extractor(images)[0]
        swapped = extractor(images.flip(1))[0]
    assert extractor.net.saw_channels_last == [True, True]  # the extractor really passes channels-last input
    tolerance = roundoff_tolerance(standard, inception_depth(network))
    torch.testing.assert_close(channels_last, standard, **tolerance)
    assert (swapped - standard).abs().max() > 10 * tolerance["atol"]
