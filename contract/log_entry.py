"""The decision log entry: what the service's Lua writes into a campaign's log stream (service/lua/reserve.lua
`decision` entries, service/lua/settle.lua `outcome` entries, both through service/lua/log.lua), encoded
here for tests and tools, and decoded here for the export (loop/logstream.py). A test holds the Lua's real
output, written through the store on a real Redis, against both.

Fields (every value text but `features`; money in integer cents)::

    decision  kind=decision, decision_id, user_id, action, cost (the coupon's cost; a bundle's: the sum of
              its coupons'), probability (of the logged action), explored (0/1), holdout (0/1), lambda,
              model_version, at_ms, features (float32 little-endian); a catalog campaign's also coupons
              (the bundle's coupon actions, ','-separated, '' for none) and coupon_costs (their costs, cents)
    outcome   kind=outcome, decision_id, user_id, action, reward, cost, at_ms (settled),
              decided_at_ms; a catalog campaign's also coupons and coupon_costs (each coupon's realised cost)

Decoded, every decision and outcome has `coupons` (actions) and `coupon_costs` (currency units): an entry
without them is a campaign's without a catalog, one coupon (its action and cost) or none.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from contract.money import CENTS_PER_UNIT


class LogEntryError(ValueError):
    """A stream entry does not follow the log format; the message names the stream, entry and field."""


def _decimal(x: float) -> str:
    """A number as reserve.lua writes it: %.15g, or %.17g where that does not read back as `x`."""
    text = f"{x:.15g}"
    return text if float(text) == x else f"{x:.17g}"


def decision_fields(
    *,
    decision_id: str,
    user_id: str,
    action: int,
    cost_cents: int,
    probability: float,
    features: np.ndarray,
    at_ms: int,
    model_version: str,
    lam: float,
    explored: bool = False,
    holdout: bool = False,
    coupons: list[tuple[int, int]] | None = None,
) -> dict[str, str | bytes]:
    """The fields of a `decision` entry, as the service writes them; `coupons` (coupon, cost cents) for a
    catalog campaign's."""
    return {
        "kind": "decision",
        "decision_id": decision_id,
        "user_id": user_id,
        "action": str(int(action)),
        "cost": str(int(cost_cents)),
        "probability": _decimal(float(probability)),
        "explored": "1" if explored else "0",
        "holdout": "1" if holdout else "0",
        "lambda": repr(float(lam)),
        "model_version": model_version,
        "at_ms": str(int(at_ms)),
        "features": np.ascontiguousarray(features, dtype="<f4").tobytes(),
        **_coupon_fields(coupons),
    }


def _coupon_fields(coupons: list[tuple[int, int]] | None) -> dict[str, str | bytes]:
    if coupons is None:
        return {}
    return {"coupons": ",".join(str(a) for a, _ in coupons), "coupon_costs": ",".join(str(c) for _, c in coupons)}


def outcome_fields(
    *,
    decision_id: str,
    user_id: str,
    action: int,
    reward_cents: int,
    cost_cents: int,
    at_ms: int,
    decided_at_ms: int,
    coupons: list[tuple[int, int]] | None = None,
) -> dict[str, str | bytes]:
    """The fields of an `outcome` entry, as the service writes them; `coupons` (coupon, realised cents) for a
    catalog campaign's."""
    return {
        "kind": "outcome",
        "decision_id": decision_id,
        "user_id": user_id,
        "action": str(int(action)),
        "reward": str(int(reward_cents)),
        "cost": str(int(cost_cents)),
        "at_ms": str(int(at_ms)),
        "decided_at_ms": str(int(decided_at_ms)),
        **_coupon_fields(coupons),
    }


def _text(fields: Mapping[bytes, bytes], name: str, where: str) -> str:
    value = fields.get(name.encode())
    if value is None:
        raise LogEntryError(f"{where}: field {name!r} is missing")
    try:
        return value.decode()
    except UnicodeDecodeError as exc:
        raise LogEntryError(f"{where}: field {name!r} is not text") from exc


def _int(fields: Mapping[bytes, bytes], name: str, where: str) -> int:
    text = _text(fields, name, where)
    try:
        return int(text)
    except ValueError as exc:
        raise LogEntryError(f"{where}: field {name!r} must be an integer, got {text!r}") from exc


def _float(fields: Mapping[bytes, bytes], name: str, where: str) -> float:
    text = _text(fields, name, where)
    try:
        value = float(text)
    except ValueError as exc:
        raise LogEntryError(f"{where}: field {name!r} must be a number, got {text!r}") from exc
    if not np.isfinite(value):
        raise LogEntryError(f"{where}: field {name!r} must be finite, got {text!r}")
    return value


def _flag(fields: Mapping[bytes, bytes], name: str, where: str) -> bool:
    text = _text(fields, name, where)
    if text not in ("0", "1"):
        raise LogEntryError(f"{where}: field {name!r} must be 0 or 1, got {text!r}")
    return text == "1"


def _coupons(fields: Mapping[bytes, bytes], where: str, action: int, cost: int) -> tuple[list[int], list[float]]:
    """The entry's coupons and their costs (currency units); without the fields, its action alone (or none)."""
    if b"coupons" not in fields:
        return ([action], [cost / CENTS_PER_UNIT]) if action else ([], [])
    actions, costs = _text(fields, "coupons", where), _text(fields, "coupon_costs", where)
    try:
        parsed = [int(a) for a in actions.split(",")] if actions else []
        cents = [int(c) for c in costs.split(",")] if costs else []
    except ValueError as exc:
        raise LogEntryError(f"{where}: fields 'coupons' and 'coupon_costs' must be integers, ','-separated") from exc
    if len(parsed) != len(cents):
        raise LogEntryError(f"{where}: fields 'coupons' and 'coupon_costs' name {len(parsed)} and {len(cents)} coupons")
    return parsed, [c / CENTS_PER_UNIT for c in cents]


def decode_decision(
    campaign_id: str, entry_id: str, fields: Mapping[bytes, bytes]
) -> tuple[dict[str, object], np.ndarray]:
    where = f"campaign {campaign_id!r} log entry {entry_id}"
    raw = fields.get(b"features")
    if raw is None:
        raise LogEntryError(f"{where}: field 'features' is missing")
    if len(raw) == 0 or len(raw) % 4:
        raise LogEntryError(f"{where}: field 'features' must be 4 x feature_dim bytes, got {len(raw)}")
    features = np.frombuffer(raw, dtype="<f4").astype(np.float64)
    if not np.isfinite(features).all():
        raise LogEntryError(f"{where}: field 'features' holds a non-finite value")
    at_ms = _int(fields, "at_ms", where)
    action, cost = _int(fields, "action", where), _int(fields, "cost", where)
    coupons, coupon_costs = _coupons(fields, where, action, cost)
    values: dict[str, object] = {
        "decision_id": _text(fields, "decision_id", where),
        "campaign_id": campaign_id,
        "user_id": _text(fields, "user_id", where),
        "t": at_ms,
        "action": action,
        "cost": cost / CENTS_PER_UNIT,
        "probability": _float(fields, "probability", where),
        "explored": _flag(fields, "explored", where),
        "holdout": _flag(fields, "holdout", where),
        "lambda": _float(fields, "lambda", where),
        "model_version": _text(fields, "model_version", where),
        "decided_at_ms": at_ms,
        "coupons": coupons,
        "coupon_costs": coupon_costs,
    }
    return values, features


def decode_outcome(campaign_id: str, entry_id: str, fields: Mapping[bytes, bytes]) -> dict[str, object]:
    where = f"campaign {campaign_id!r} log entry {entry_id}"
    decided = _int(fields, "decided_at_ms", where)
    action, cost = _int(fields, "action", where), _int(fields, "cost", where)
    coupons, coupon_costs = _coupons(fields, where, action, cost)
    return {
        "decision_id": _text(fields, "decision_id", where),
        "campaign_id": campaign_id,
        "user_id": _text(fields, "user_id", where),
        "t": decided,
        "action": action,
        "reward": _int(fields, "reward", where) / CENTS_PER_UNIT,
        "cost": cost / CENTS_PER_UNIT,
        "decided_at_ms": decided,
        "outcome_at_ms": _int(fields, "at_ms", where),
        "coupons": coupons,
        "coupon_costs": coupon_costs,
    }
