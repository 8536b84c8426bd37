"""The one budget knob shared by every policy: `keep`, parsed once.

`keep` is a fraction of the visual tokens (`1/6`, `0.25`; `1` is the full cache) or an integer
number of visual tokens (`96`). The visual budget is `B = floor(keep * N)`; the condition prefix is
never evicted and never counted in `B`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction


class BudgetError(ValueError):
    """A `keep` value that cannot be used for this model and policy."""


ACCEPTED = (
    "keep must be a fraction in (0, 1] written as 'a/b' or a decimal (e.g. 1/6, 0.25; 1 is the full "
    "cache), or an integer number of visual tokens between 2 and N"
)


@dataclass(frozen=True)
class Keep:
    """A parsed `keep`: either a fraction of N or an absolute token count. `text` is what the user wrote."""

    text: str
    fraction: Fraction | None = None
    tokens: int | None = None

    @property
    def is_full(self) -> bool:
        return self.fraction == 1

    def budget(self, num_visual: int) -> int:
        """Visual budget B for a grid of `num_visual` tokens."""
        if self.tokens is not None:
            if self.tokens > num_visual:
                raise BudgetError(f"keep={self.text} asks for {self.tokens} visual tokens but the model only "
                                  f"generates N={num_visual}; {ACCEPTED} (N={num_visual} here)")
            return self.tokens
        return math.floor(self.fraction * num_visual)


def parse_keep(value: str | int | float) -> Keep:
    """Parse a command-line `keep` value; raise `BudgetError` with the accepted range on bad input."""
    text = str(value).strip()
    if isinstance(value, bool):
        raise BudgetError(f"keep={text!r} is not a number; {ACCEPTED}")
    if isinstance(value, int) or (isinstance(value, str) and text.lstrip("+").isdigit()):
        count = int(text)
        if count == 1:
            return Keep(text, fraction=Fraction(1))
        if count < 2:
            raise BudgetError(f"keep={text} is out of range; {ACCEPTED}")
        return Keep(text, tokens=count)
    try:
        if "/" in text:
            numerator, denominator = text.split("/")
            fraction = Fraction(int(numerator), int(denominator))
        else:
            fraction = Fraction(text).limit_denominator(10**6)
    except (ValueError, ZeroDivisionError) as error:
        raise BudgetError(f"keep={text!r} could not be parsed ({error}); {ACCEPTED}") from None
    if not 0 < fraction <= 1:
        raise BudgetError(f"keep={text} is out of range; {ACCEPTED}")
    return Keep(text, fraction=fraction)


def check_budget(keep: Keep, budget: int, minimum: int, num_visual: int, *, policy: str, model: str,
                 fields: dict | None = None) -> None:
    """Stop with a clear message if `budget` is below what `policy` (its knobs `fields`) must protect on `model`."""
    if budget >= minimum:
        return
    if minimum > num_visual:  # no keep can reach it: the policy's own fields are wrong for this model
        counts = [f"cache.{name}={value}" for name, value in (fields or {}).items()
                  if isinstance(value, int) and not isinstance(value, bool) and value > 0]
        raise BudgetError(
            f"cache={policy} {'with ' + ', '.join(counts) + ' ' if counts else ''}always protects {minimum} tokens, "
            f"more than the N={num_visual} visual tokens of model={model}: no budget can hold them. Lower what the "
            f"policy protects (its window, sinks, recent lines or anchors) so it is below N={num_visual}.")
    smallest = Fraction(minimum, num_visual)
    raise BudgetError(
        f"keep={keep.text} gives a visual budget of {budget} tokens, but cache={policy} on model={model} "
        f"needs at least {minimum} (what it always protects); use keep >= {smallest} or keep >= {minimum} "
        f"tokens. {ACCEPTED} (N={num_visual} here)")
