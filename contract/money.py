"""Money is integer minor units (cents) on both sides; floats only at the edges (the API, the logs' columns)."""

from __future__ import annotations

import math
from decimal import Decimal

import numpy as np
import numpy.typing as npt

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


def rounded_cents(amount: npt.ArrayLike) -> np.ndarray:
    """Amounts of any precision (a reward, a simulated cost) as int64 cents, rounded half up: floor(100 x +
    0.5) in doubles, the same operations (hence the same result) as the ledger's Lua where it rounds."""
    return np.floor(np.asarray(amount, dtype=np.float64) * CENTS_PER_UNIT + 0.5).astype(np.int64)


def from_cents(cents: int) -> float:
    return cents / CENTS_PER_UNIT
