"""MKL-packed decode weights on CPU: the same products as nn.Linear, never stale, eager and compiled."""

import pytest
import torch

from conftest import llamagen_depth, roundoff_tolerance, tiny_llamagen
from lineareval.decoding.stepper import Stepper
from lineareval.models import packed as layers
from lineareval.models.packed import Linear, pack_linears, unpack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="PyTorch built without MKL")


def packed_linears(model) -> list[Linear]:
    return [module for module in model.modules() if isinstance(module, Linear) and module.packed is not None]


def test_packed_product_equals_the_plain_one_and_falls_back_for_other_row_counts():
    torch.manual_seed(0)
    linear = Linear(48, 80, bias=True)
    plain = torch.nn.functional.linear
    assert pack_linears(linear, rows=6) == 48 * 80 * 4
    for x in (torch.randn(6, 1, 48), torch.randn(6, 48), torch.randn(3, 1, 48),  # 3 rows: the plain product
              torch.randn(1, 48, 6).transpose(1, 2)):  # (1, 6, 48), not contiguous
        out = linear(x)
        assert out.shape == (*x.shape[:-1], 80)
        expected = plain(x, linear.weight, linear.bias)
        torch.testing.assert_close(out, expected, **roundoff_tolerance(expected, linear.in_features))


def test_products_that_need_a_gradient_use_the_plain_product():
    linear = Linear(8, 4)
    pack_linears(linear, rows=2)
    x = torch.randn(2, 8)
    linear(x).sum().backward()  # MKL's packed product has no gradient
    assert linear.weight.grad is not None and linear.weight.grad.shape == (4, 8)


def test_packed_weights_never_go_stale():
    linear = Linear(32, 16)
    pack_linears(linear, rows=4)
    first = linear.packed
    pack_linears(linear, rows=4)
    assert linear.packed is first  # unchanged weight, same rows: kept
    with torch.no_grad():
        linear.weight.mul_(2.0)  # in place: a new version
    pack_linears(linear, rows=4)
    assert linear.packed is not first
    x = torch.randn(4, 32)
    expected = torch.nn.functional.linear(x, linear.weight, linear.bias)
    # the packed and the plain product sum the in_features terms in other orders (+1: the bias)
    torch.testing.assert_close(linear(x), expected, **roundoff_tolerance(expected, linear.in_features + 1))
    pack_linears(linear, rows=8)
    assert linear.packed.rows == 8
    linear.load_state_dict({"weight": torch.randn(16, 32), "bias": torch.randn(16)})
    assert linear.packed is None  # loaded: dropped, repacked at the next cache
    pack_linears(linear, rows=4)
    linear.double()
    assert linear.packed is None
    assert pack_linears(linear, rows=4) == 0 and linear.packed is None  # fp64: MKL packs fp32 only
    unpack_linears(linear.float())
    assert linear.packed is None


def test_no_packing_when_a_second_copy_would_crowd_memory(monkeypatch, caplog):
    model = tiny_llamagen(grid=4, layers=1)
    weights = sum(linear.weight.numel() * 4 for linear in model.modules() if isinstance(linear, Linear))
    assert pack_linears(model, rows=4) == weights and packed_linears(model)
    monkeypatch.setattr(layers, "available_memory", lambda: 2 * weights - 1)
    assert pack_linears(model, rows=4) == weights  # already packed: nothing more to allocate
    assert pack_linears(model, rows=8) == 0  # new copies would take over half of what is available
    assert not packed_linears(model) and "not packing" in caplog.text
    assert pack_linears(model, rows=8) == 0  # the next batch's cache: still refused, not warned again
    assert caplog.text.count("not packing") == 1
    monkeypatch.setattr(layers, "available_memory", lambda: 2 * weights)
    assert pack_linears(model, rows=8) == weights and packed_linears(model)


def generate_logits(model, policy, budget: int, labels: torch.Tensor, tokens: torch.Tensor,
                    stepper: Stepper | None = None) -> torch.Tensor:
    """Teacher-forced decoding of `tokens` (B, N); the logits of every step (S, N, V). The same tokens for
    both runs compared: a near tie would flip a greedy token and make the runs diverge on some CPUs."""
    stepper = stepper or Stepper(model)
    cache = stepper.new_cache(policy, budget, len(labels), model.layout)
    logits = [stepper.prefill(labels, cache)]
    for index in range(model.layout.num_visual - 1):
        logits.append(stepper.decode(tokens[:, index], index, cache))
    return torch.stack(logits, dim=1)


def random_tokens(model, rows: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (rows, model.layout.num_visual),
                         generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name, budget", [("full", 64), ("linear", 16), ("h2o", 16)])
@torch.inference_mode()
def test_decoding_with_packed_weights_equals_plain_products(policy_factory, monkeypatch, name, budget):
    model = tiny_llamagen(grid=8)
    labels = torch.tensor([1, 2, 3])
    tokens = random_tokens(model, 3)
    packed = generate_logits(model, policy_factory(name), budget, labels, tokens)
    assert len(packed_linears(model)) == 2 * 5 + 1  # wqkv, wo, w1, w2, w3 per layer and the head
    monkeypatch.setattr(layers, "can_pack", lambda weight: False)
    plain = generate_logits(model, policy_factory(name), budget, labels, tokens)
    assert not packed_linears(model)
    torch.testing.assert_close(packed, plain, **roundoff_tolerance(plain, llamagen_depth(model)))


@torch.inference_mode()
def test_compiled_decode_step_uses_the_packed_weights(policy_factory):
    labels = torch.tensor([1, 2])
    eager = tiny_llamagen(grid=4, layers=1)
    tokens = random_tokens(eager, 2)
    reference = generate_logits(eager, policy_factory("linear"), 8, labels, tokens)
    compiled = tiny_llamagen(grid=4, layers=1)
    stepper = Stepper(compiled)
    stepper.compile("cpu")
    with torch.profiler.profile() as profile:
        out = generate_logits(compiled, policy_factory("linear"), 8, labels, tokens, stepper)
    calls = {event.key: event.count for event in profile.key_averages()}
    steps = compiled.layout.num_visual - 1
    assert calls.get("lineareval::packed_linear", 0) >= 6 * steps  # wqkv, wo, w1, w2, w3, head: every step
    torch.testing.assert_close(out, reference, **roundoff_tolerance(reference, llamagen_depth(eager)))


@torch.inference_mode()
def test_each_fp32_evaluation_lies_within_half_the_roundoff_tolerance_of_float64(policy_factory, monkeypatch):
    """The tolerance's premise, checked against (nearly) exact float64 logits of the same tokens: each fp32
    evaluation, packed or plain, is within depth * u * max|logits| of them, so two are within twice that.
    (On this project's Intel VM an fp32 evaluation was 1.25e-5 away from float64 at max|logits| 8.2: the
    former fixed atol of 1e-5 sat below one evaluation's own round-off.)"""
    model = tiny_llamagen(grid=8)
    labels, tokens = torch.tensor([1, 2, 3]), random_tokens(model, 3)
    exact = tiny_llamagen(grid=8).double()(labels, tokens[:, :-1])
    packed = generate_logits(model, policy_factory("full"), 64, labels, tokens)
    monkeypatch.setattr(layers, "can_pack", lambda weight: False)
    plain = generate_logits(model, policy_factory("full"), 64, labels, tokens)
    bound = roundoff_tolerance(plain, llamagen_depth(model))["atol"] / 2
    for logits in (packed, plain):
        error = (logits.double() - exact).abs().max().item()
        assert 0 < error <= bound, (error, bound)
