"""Money is integer minor units (cents) inside the service; floats only at the API boundary."""

from __future__ import annotations

import math
from decimal import Decimal

CENTS_PER_UNIT = 100


def to_cents(amount: float) -> int:
    """`amount` (currency units) as exact cents; ValueError if not finite or with more than 2 decimals."""
    if not math.isfinite(amount):
        raise ValueError("must be a finite number")
    # repr() is the shortest decimal that round-trips, so 19.99 is "19.99", not 19.989999...
    exact = Decimal(repr(float(amount))) * CENTS_PER_UNIT
    if exact != exact.to_integral_value():
        raise ValueError("must have at most 2 decimals")
    return int(exact)


def from_cents(cents: int) -> float:
    return cents / CENTS_PER_UNIT
