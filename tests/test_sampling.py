"""Per-sample randomness, the Gumbel-max sampler, the official filtering semantics, and the fields' ranges."""

import re

import pytest
import torch

from lineareval.sampling import (SamplingConfig, class_labels, counter_bits, filter_logits, keyed_gumbel, sample_tokens,
                                 stream_keys)


def test_draws_depend_only_on_seed_and_sample_index():
    ids = torch.arange(10)
    full = counter_bits(7, ids, 3, 50)
    assert torch.equal(full[4:7], counter_bits(7, ids[4:7], 3, 50))  # any batch slicing
    assert torch.equal(full[[9, 2]], counter_bits(7, torch.tensor([9, 2]), 3, 50))  # any order
    assert not torch.equal(full, counter_bits(8, ids, 3, 50))  # the seed matters
    assert not torch.equal(full, counter_bits(7, ids, 4, 50))  # the step matters
    assert (full >= 0).all() and (full < 2**32).all()


def test_bits_are_uniform():
    bits = counter_bits(0, torch.arange(200), 0, 1000)
    uniform = bits.double() / 2**32
    assert abs(uniform.mean().item() - 0.5) < 0.005
    histogram = torch.histc(uniform.float(), bins=16, min=0, max=1)
    assert (histogram / histogram.sum() - 1 / 16).abs().max() < 0.005
    assert bits.unique().numel() > 0.999 * bits.numel()


def test_gumbel_max_samples_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    draws = 40_000
    tokens = (logits + keyed_gumbel(torch.arange(draws), *stream_keys(3, 0), 5)).argmax(-1)
    frequencies = torch.bincount(tokens, minlength=5).double() / draws
    expected = torch.softmax(logits[0].double(), -1)
    assert (frequencies - expected).abs().max() < 0.01
    assert frequencies[-1] == 0


def test_class_labels_cover_the_classes_uniformly():
    labels = class_labels(0, torch.arange(50_000), 1000)
    counts = torch.bincount(labels, minlength=1000)
    assert counts.min() > 20 and counts.max() < 85  # mean 50
    assert torch.equal(labels[:10], class_labels(0, torch.arange(10), 1000))
    assert not torch.equal(labels[:100], class_labels(1, torch.arange(100), 1000))


def reference_filter(row: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """A plain loop version of top-k then nucleus filtering."""
    row = row.clone()
    if top_k > 0:
        row[row < torch.sort(row, descending=True).values[top_k - 1]] = float("-inf")
    if top_p < 1.0:
        order = torch.argsort(row, descending=True)
        probs = torch.softmax(row, -1)
        total = 0.0
        for rank, index in enumerate(order.tolist()):
            if rank > 0 and total > top_p:
                row[index] = float("-inf")
            total += probs[index].item()
    return row


def test_filtering_matches_a_plain_reference():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 3
    for top_k, top_p in [(0, 1.0), (5, 1.0), (0, 0.7), (10, 0.9), (1, 1.0)]:
        filtered = filter_logits(logits, top_k, top_p)
        expected = torch.stack([reference_filter(row, top_k, top_p) for row in logits])
        assert torch.equal(torch.isinf(filtered), torch.isinf(expected)), (top_k, top_p)


def test_top_k_1_is_greedy_and_temperature_sharpens():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    greedy = sample_tokens(logits, SamplingConfig(top_k=1), 0, torch.arange(4), 0)
    assert torch.equal(greedy, logits.argmax(-1))
    cold = sample_tokens(logits, SamplingConfig(temperature=1e-4), 0, torch.arange(4), 0)
    assert torch.equal(cold, logits.argmax(-1))


def test_cfg_interval_follows_the_official_loop():
    # official: guidance for the prefill token and decode steps i <= cfg_interval (token index i + 1)
    config = SamplingConfig(cfg_scale=4.0, cfg_interval=3)
    assert [config.guidance_at(index) for index in range(7)] == [True] * 5 + [False] * 2
    assert all(SamplingConfig(cfg_scale=4.0).guidance_at(index) for index in range(600))
    assert not SamplingConfig(cfg_scale=1.0).guidance_at(0)


def test_the_stream_is_pinned():
    """The draws of every committed result: a change here changes every sample (the demo FIDs too)."""
    assert counter_bits(0, torch.tensor([0, 1, 7]), 0, 3).tolist() == [
        [2954219348, 149182020, 3454647244], [3040478542, 1949842041, 1466247655], [1387161502, 1846595841, 831275751]]


def test_host_hash_python_hash_and_tensor_hash_agree(monkeypatch):
    """Eager CPU runs hash in numpy uint32, compiled and GPU runs in int64 tensors, keys in Python ints."""
    from lineareval import sampling

    values = [-5, 0, 1, 2**31, 2**32 - 1, 2**40 + 3, 123456789]
    assert [sampling._mix_int(value) for value in values] == sampling._mix32(torch.tensor(values)).tolist()
    ids, keys = torch.arange(0, 2**22, 4099), sampling.stream_keys(11, 300)
    host_bits, host_noise = sampling.keyed_bits(ids, *keys, 3000), sampling.keyed_gumbel(ids, *keys, 3000)
    monkeypatch.setattr(sampling, "_on_host", lambda sample_ids: False)
    assert torch.equal(host_bits, sampling.keyed_bits(ids, *keys, 3000)) and host_bits.dtype == torch.int64
    assert torch.equal(host_noise, sampling.keyed_gumbel(ids, *keys, 3000))
    assert torch.isfinite(host_noise).all()


@pytest.mark.parametrize(("field", "value", "accepted"), [
    ("top_k", -5, r"an integer >= 0 \(0 = off, 1 = greedy\)"), ("top_k", 1.5, "an integer >= 0"),
    ("top_k", True, "an integer >= 0"), ("temperature", 0, r"a number > 0 .*greedy decoding use top_k=1"),
    ("temperature", float("nan"), "a number > 0"), ("cfg_scale", -1, r"a number >= 1 \(1 = no guidance"),
    ("cfg_scale", 0.5, "a number >= 1"), ("cfg_interval", -2, "an integer >= -1"),
    ("top_p", 0.0, r"a number in \(0, 1\]"), ("top_p", 1.01, r"a number in \(0, 1\]"),
    ("top_p", "0.9", r"a number in \(0, 1\]"),
])
def test_out_of_range_sampling_fields_are_refused_with_the_accepted_range(field, value, accepted):
    """Each value used to be taken in another meaning (top_k=-5 as 0, temperature=0 as 1e-5, cfg_scale=-1 as
    no guidance) while the record kept the value given."""
    with pytest.raises(ValueError, match=rf"sampling.{field} must be {accepted}.*, got {re.escape(repr(value))}$"):
        SamplingConfig(**{field: value})


def test_the_edges_of_every_sampling_range_are_accepted():
    edges = SamplingConfig(cfg_scale=1, cfg_interval=-1, temperature=1e-3, top_k=1, top_p=1)
    assert not edges.guided and edges.top_k == 1
    assert SamplingConfig(cfg_interval=0, top_k=0, top_p=0.01).top_p == 0.01
