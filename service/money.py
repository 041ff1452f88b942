"""Money is integer minor units (cents) inside the service; floats only at the API boundary."""

from __future__ import annotations

import math
from decimal import Decimal

CENTS_PER_UNIT = 100
# The largest amount the service takes (a budget, a coupon's cost, an outcome's cost or reward), in
# currency units: its cents, and sums of a few of them, stay below 2^53, so they are exact in the doubles
# of Redis's Lua scripts and of JSON.
MAX_AMOUNT = 10**12


def to_cents(amount: float) -> int:
    """`amount` (currency units) as exact cents; ValueError if not finite, above MAX_AMOUNT or with more
    than 2 decimals."""
    if not math.isfinite(amount):
        raise ValueError("must be a finite number")
    if abs(amount) > MAX_AMOUNT:
        raise ValueError(f"must be at most {MAX_AMOUNT:,} in absolute value (amounts stay exact to the cent)")
    # repr() is the shortest decimal that round-trips, so 19.99 is "19.99", not 19.989999...
    exact = Decimal(repr(float(amount))) * CENTS_PER_UNIT
    if exact != exact.to_integral_value():
        raise ValueError("must have at most 2 decimals")
    return int(exact)


def from_cents(cents: int) -> float:
    return cents / CENTS_PER_UNIT
