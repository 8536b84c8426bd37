"""`keep` parsing, budgets and the errors a user sees."""

from fractions import Fraction

import pytest

from lineareval.cache.linear import LineAR
from lineareval.cache.policy import TokenLayout
from lineareval.keep import BudgetError, check_budget, parse_keep

LLAMAGEN = TokenLayout(prefix_len=1, rows=24, line_len=24)


@pytest.mark.parametrize("value, budget", [("1/6", 96), ("1/4", 144), (0.25, 144), ("0.25", 144), (1, 576),
                                           ("1", 576), (1.0, 576), (96, 96), ("96", 96), (576, 576), ("1/8", 72),
                                           ("1/7", 82)])
def test_budget_is_floor_of_keep_times_n(value, budget):
    assert parse_keep(value).budget(LLAMAGEN.num_visual) == budget


def test_text_is_kept_as_given():
    assert parse_keep("1/6").text == "1/6"
    assert parse_keep(0.25).fraction == Fraction(1, 4)
    assert parse_keep(1).is_full and not parse_keep("1/2").is_full


@pytest.mark.parametrize("value", [0, "0", -1, "-1/6", "2/1", 1.5, "1/0", "text", "", "1/6/2", -0.25, True])
def test_invalid_values_say_the_accepted_range(value):
    with pytest.raises(BudgetError, match=r"fraction in \(0, 1\]"):
        parse_keep(value).budget(576)


def test_token_count_above_n_is_rejected():
    with pytest.raises(BudgetError, match="577 visual tokens.*N=576"):
        parse_keep(577).budget(576)


def test_budget_below_policy_minimum_names_the_minimum():
    keep = parse_keep("1/16")
    minimum = LineAR().minimum_budget(LLAMAGEN)
    assert minimum == 48  # the first line (anchors) + the most recent line
    with pytest.raises(BudgetError, match=r"model=llamagen_xl needs at least 48.*keep >= 1/12"):
        check_budget(keep, keep.budget(576), minimum, 576, policy="linear", model="llamagen_xl")
    check_budget(parse_keep("1/12"), 48, minimum, 576, policy="linear", model="llamagen_xl")  # exactly enough


def test_a_policy_that_protects_more_than_n_says_so_instead_of_asking_for_an_impossible_keep(make_config):
    from lineareval.runner import run

    with pytest.raises(BudgetError) as info:
        run(make_config("weights=random", "cache=rkv", "cache.window=1000", "keep=1/2"))
    message = str(info.value)
    assert "always protects 1001 tokens, more than the N=256 visual tokens of model=llamagen_tiny" in message
    assert "cache.window=1000" in message and "keep >=" not in message
