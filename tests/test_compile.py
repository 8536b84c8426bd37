"""Compiled decoding (compile=true) against the same oracle as eager decoding, for every policy.

torch.compile takes a while on two cores, so only LineAR (per-head holes, masked attention, line-end
scoring: the most variants of the step) runs in the default suite; the other policies are `slow`.
"""

from __future__ import annotations

import pytest
import torch

from lineareval.decoding.method import Sequential

from conftest import ALLOCATION_CONFIGS, CACHE_CONFIGS, llamagen_depth, roundoff_tolerance, tiny_llamagen
from lineareval.decoding.stepper import Stepper
from lineareval.keep import parse_keep
from lineareval.factory import build_generator, build_policy
from test_cache import oracle_masks, run_policy

DEFAULT_SUITE = ("linear",)


def cases():
    for allocation in ALLOCATION_CONFIGS:
        for name in CACHE_CONFIGS:
            keep = "1" if name == "full" else 21  # 21 of 64: not a whole number of lines
            marks = () if name in DEFAULT_SUITE else (pytest.mark.slow,)
            yield pytest.param(name, keep, allocation, id=f"{name}-{keep}-{allocation}", marks=marks)


@pytest.fixture(scope="module")
def compiled():
    torch._dynamo.reset()
    model = tiny_llamagen(grid=8)
    stepper = Stepper(model)
    stepper.compile("cpu")
    return model, stepper


@pytest.mark.parametrize("name, keep, allocation", list(cases()))
def test_compiled_decoding_passes_the_oracle_and_equals_eager(compiled, policy_factory, budgets_for, name, keep,
                                                              allocation):
    compiled_model, stepper = compiled
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([3, 7, 10, 10])
    tokens = torch.randint(0, compiled_model.config.vocab_size, (4, compiled_model.layout.num_visual),
                           generator=generator)
    budget = budgets_for(policy_factory(name), parse_keep(keep).budget(compiled_model.layout.num_visual), allocation,
                         compiled_model)
    trace = run_policy(compiled_model, policy_factory(name), budget, labels, tokens, stepper)
    eager = run_policy(tiny_llamagen(grid=8), policy_factory(name), budget, labels, tokens)
    oracle = compiled_model(labels, tokens[:, :-1], oracle_masks(trace, compiled_model.layout.prefix_len))
    tolerance = roundoff_tolerance(oracle, llamagen_depth(compiled_model))
    torch.testing.assert_close(trace.logits, oracle, **tolerance)
    torch.testing.assert_close(trace.logits, eager.logits, **tolerance)
    for compiled_maps, eager_maps in zip(trace.after, eager.after):  # the same evictions, step by step
        assert all(torch.equal(a, b) for a, b in zip(compiled_maps, eager_maps))
    assert stepper.compiled


@pytest.mark.slow
def test_compiled_generator_samples_the_same_tokens(make_config):
    """compile=true end to end (decode step and sampler): the same tokens as eager."""
    tokens = {}
    for compile in (False, True):
        cfg = make_config("weights=random", "model.image_size=128", f"compile={compile}", "cache=linear")
        generator = build_generator(cfg, torch.device("cpu"), torch.float32)
        assert generator.compiled is compile and generator.decoder.stepper.compiled is compile
        tokens[compile] = generator.generate(torch.tensor([1, 2]), torch.arange(2), build_policy(cfg.cache), 24,
                                             seed=3, method=Sequential()).tokens
    assert torch.equal(tokens[False], tokens[True])


def test_cuda_graph_mode_reuses_one_cache_and_resets_it(policy_factory):
    """With CUDA graphs a generation reuses the previous cache (addresses stay); emptied, it decodes as new."""
    model = tiny_llamagen(grid=8)
    labels, tokens = torch.tensor([3, 10]), torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(2))
    fresh = run_policy(model, policy_factory("linear"), 24, labels, tokens)
    stepper, layout = Stepper(model), model.layout
    stepper.cuda_graphs = True  # the GPU bookkeeping without a GPU (the step itself stays eager)
    first = stepper.new_cache(policy_factory("linear"), 24, 2, layout)
    assert first.state.width_multiple == 64
    again = run_policy(model, policy_factory("linear"), 24, labels, tokens, stepper)  # the same cache, reset
    assert stepper.new_cache(policy_factory("linear"), 24, 2, layout) is first
    assert stepper.new_cache(policy_factory("linear"), 32, 2, layout) is not first  # another budget: a new cache
    torch.testing.assert_close(again.logits, fresh.logits, **roundoff_tolerance(fresh.logits, llamagen_depth(model)))
    assert all(torch.equal(a, b) for a, b in zip(again.after[-1], fresh.after[-1]))
