"""Up-front checks of option values, each raising a one-line error that names the option.

The CLI calls these before any expensive work (model loading, attacks, training), so a bad
value never fails after minutes of compute. NaN passes every ``<``/``>`` comparison, so ranges
check finiteness first.
"""

from __future__ import annotations

import math
from collections.abc import Sized

from advpurify.errors import AdvpurifyError


def finite(option: str, value: float) -> None:
    if not math.isfinite(value):
        raise AdvpurifyError(f"{option} {value}: must be a finite number")


def at_least(option: str, value: float, minimum: float) -> None:
    finite(option, value)
    if value < minimum:
        raise AdvpurifyError(f"{option} {value}: must be at least {minimum}")


def positive(option: str, value: float) -> None:
    finite(option, value)
    if value <= 0:
        raise AdvpurifyError(f"{option} {value}: must be greater than 0")


def in_range(option: str, value: float, low: float, high: float) -> None:
    finite(option, value)
    if not low <= value <= high:
        raise AdvpurifyError(f"{option} {value}: must be in {low}..{high}")


def not_empty(option: str, values: Sized, text: str) -> None:
    if not len(values):
        raise AdvpurifyError(f"{option} {text!r}: names nothing")


def seed(option: str, value: int) -> None:
    """A run seed: what a torch generator takes (the training seeds a second one with + 1)."""
    if not 0 <= value < 2**63:
        raise AdvpurifyError(f"{option} {value}: must be in 0..{2**63 - 1}")
