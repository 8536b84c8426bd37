"""What a user passes to the API or run.py is checked before anything is sampled: a clear ValueError naming the
value, never a silently different sample (the null class, a wrapped seed, a truncated label) or a late IndexError."""

from __future__ import annotations

import numpy as np
import pytest

import lineareval


@pytest.fixture(scope="module")
def pipe():
    """The tiny random class-conditional model (10 classes: label 10 is guidance's null class)."""
    return lineareval.load("llamagen_tiny", "num_samples=1", weights="random", device="cpu", decode_images=False)


@pytest.mark.parametrize("labels, message", [
    ([10], r"labels must be in \[0, 10\).*null class.*\[10\]"),  # the null class: unconditional images before
    ([5000], r"labels must be in \[0, 10\).*\[5000\]"),
    ([-1], r"labels must be in \[0, 10\).*\[-1\]"),
    ([1.7], "labels must be integers.*truncated"),
    ([[1, 2]], "1-D.*shape \\(1, 2\\)"),
    ([], "labels is empty"),
    (np.array([True]), "labels must be integers"),
])
def test_bad_labels_are_refused_with_the_accepted_range(pipe, labels, message):
    assert pipe.generator.num_classes == 10
    with pytest.raises(ValueError, match=message):
        pipe.generate(labels=labels)


@pytest.mark.parametrize("seed", [-1, 2**32, 2**40, "abc", 1.5, True])
def test_bad_seeds_are_refused_as_run_py_refuses_them(pipe, make_config, seed):
    from lineareval.config import check_run_fields

    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        pipe.generate(labels=[1], seed=seed)
    cfg = make_config()
    cfg.seed = seed
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        check_run_fields(cfg)


@pytest.mark.parametrize("sample_ids, message", [
    ([0, 1], "sample_ids has 2 entries but there are 1"),
    ([-3], r"sample_ids must be in \[0, 2\*\*32\)"),
    ([2**32], r"sample_ids must be in \[0, 2\*\*32\)"),
    ([0.5], "sample_ids must be integers"),
])
def test_bad_sample_ids_are_refused(pipe, sample_ids, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate(labels=[1], sample_ids=sample_ids)


def test_valid_inputs_of_every_integer_kind_sample_the_same_tokens(pipe):
    import torch

    reference = pipe.generate(labels=[3, 9], seed=2**32 - 1, sample_ids=[5, 6]).tokens
    for labels in (np.array([3, 9], dtype=np.int32), torch.tensor([3, 9])):
        again = pipe.generate(labels=labels, seed=np.uint32(2**32 - 1), sample_ids=np.array([5, 6])).tokens
        assert np.array_equal(again, reference)
