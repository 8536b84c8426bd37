"""The policy contract is checked where it is used: whatever `score` returns, the engine is right or stops.

A policy author needs to know no engine flag: any candidate may be a victim (the newest tokens included),
`selects_by_position` is an optional speed-up that is verified, and scores the engine cannot honour stop
the run with a `PolicyContractError` naming the policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from conftest import WithMethod, tiny_llamagen
from lineareval.cache import PolicyContractError
from lineareval.cache.policy import CachePolicy, protect
from lineareval.cache.window import Window
from lineareval.decoding.method import Sequential
from lineareval.decoding.speculative import Speculative
from lineareval.generators.base import Generator
from lineareval.generators.llamagen import LlamaGenFamily
from lineareval.sampling import SamplingConfig
from oldest_policy import Oldest


def generator(top_k: int = 1):
    model = tiny_llamagen()
    return Generator.assemble("tiny", model, LlamaGenFamily(model.layout, 10, None),
                              SamplingConfig(2.0, -1, 1.0, top_k, 1.0), "random")


def generate(policy: CachePolicy, budget: int = 20, method=None):
    return generator().generate(torch.tensor([1, 4]), torch.arange(2), policy, budget, seed=0,
                                method=method or Sequential())


@dataclass
class Undeclared(Oldest):
    """The oldest-tokens policy without the optional `selects_by_position`: scored per layer, head and row."""

    selects_by_position = False


@dataclass
class WrongShape(Window):
    selects_by_position = False

    def score(self, view, context):
        return view.positions.float()[:, :, :-1]


@dataclass
class NaNScores(Window):
    selects_by_position = False

    def score(self, view, context):
        return torch.full(view.positions.shape, float("nan"))


@dataclass
class ProtectsEverything(Window):
    selects_by_position = False

    def score(self, view, context):
        return protect(view.positions.float(), view.positions >= 0)


@dataclass
class ReadsKeys(Window):
    """Declares position-only scores but reads the keys."""

    def score(self, view, context):
        return view.keys.norm(dim=-1)


@pytest.mark.parametrize("method", [Sequential(), Speculative(window=5)], ids=["sequential", "sjd"])
def test_the_declaration_is_only_a_speed_up(method):
    """The same tokens and caches with and without `selects_by_position`, for sequential and speculative decoding."""
    declared, undeclared = generate(Oldest(), method=method), generate(Undeclared(), method=method)
    assert torch.equal(declared.tokens, undeclared.tokens)
    for a, b in zip(declared.caches[0].visible_positions(), undeclared.caches[0].visible_positions()):
        assert torch.equal(a, b)


def test_greedy_sjd_equals_sequential_when_the_newest_token_is_the_victim():
    """The oldest-tokens policy evicts the token just written: exact eviction keeps sequential's tokens."""
    sequential = generate(Oldest())
    for window in (2, 5, 16):
        assert torch.equal(generate(Oldest(), method=Speculative(window=window)).tokens, sequential.tokens)


@pytest.mark.parametrize("policy, message", [(WrongShape(), "score\\(\\) must return"),
                                             (NaNScores(), "fewer evictable tokens"),
                                             (ProtectsEverything(), "fewer evictable tokens"),
                                             (ReadsKeys(), "declares selects_by_position but reads keys")],
                         ids=["wrong-shape", "nan", "protects-everything", "reads-keys"])
@pytest.mark.parametrize("method", [Sequential(), Speculative(window=5)], ids=["sequential", "sjd"])
def test_scores_the_engine_cannot_honour_stop_the_run_naming_the_policy(policy, message, method):
    """(A false `selects_by_position` matters only where the engine relies on it, sequential decoding; speculative
    decoding scores every layer anyway, correctly.)"""
    name = type(policy).__name__.lower()
    if isinstance(policy, ReadsKeys) and isinstance(method, Speculative):
        generate(policy.named(name), method=method)  # scored per layer: the declaration is not used
        return
    with pytest.raises(PolicyContractError, match=f"policy {name!r}.*{message}|{message}.*{name}"):
        generate(policy.named(name), method=method)
