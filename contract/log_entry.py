"""The decision log entry: what the service's Lua writes into a campaign's log stream (service/lua/reserve.lua
`decisions` entries, service/lua/settle.lua `outcome` entries, both through service/lua/log.lua), encoded
here for tests and tools, and decoded here for the export (loop/logstream.py). A test holds the Lua's real
output, written through the store on a real Redis, against both.

Fields (every value text but `user_ids` and `features`; money in integer cents)::

    decisions  one entry per reservation call: every new decision of one request, as columns.
               kind=decisions, batch, at_ms, lambda, model_version (shared by the request's decisions);
               items (comma-separated: the decisions' indices in the batch, decision id d-<batch>-<index>),
               user_ids (the user ids' UTF-8 bytes concatenated) with user_id_bytes (their lengths,
               comma-separated), actions, costs (the coupons' costs), probabilities (of the logged actions),
               each comma-separated; explored and holdout (one 0/1 character per decision); features
               (float32 little-endian rows, one per decision, concatenated); a catalog campaign's also
               coupons (per decision the bundle's coupon actions, '+'-separated, '' for none) and
               coupon_costs (their costs, cents, the same shape), each comma-separated by decision; a
               bundle's cost is the sum of its coupons'
    outcome    kind=outcome, decision_id, user_id, action, reward, cost, at_ms (settled), decided_at_ms;
               a catalog campaign's also coupons and coupon_costs (each coupon's realised cost, cents),
               ','-separated
    decision   one decision (the entry of earlier service versions, still read): kind=decision,
               decision_id, user_id, action, cost, probability, explored (0/1), holdout (0/1), lambda,
               model_version, at_ms, features

Decoded, every decision and outcome has `coupons` (actions) and `coupon_costs` (currency units): an entry
without them is a campaign's without a catalog, one coupon (its action and cost) or none.

One entry per request rather than per decision keeps the reservation script's work per user small: a
request's decisions share one stream entry and their columns are joined once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
) -> dict[str, str | bytes]:
    """The fields of a `decision` entry, as the service writes them."""
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
    }


def decisions_fields(
    *,
    batch_id: str,
    items: Sequence[int],
    user_ids: Sequence[str],
    actions: Sequence[int],
    cost_cents: Sequence[int],
    probabilities: Sequence[float],
    features: np.ndarray,
    at_ms: int,
    model_version: str,
    lam: float,
    explored: Sequence[bool] | None = None,
    holdout: Sequence[bool] | None = None,
    coupons: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> dict[str, str | bytes]:
    """The fields of a `decisions` entry (one request's new decisions), as the service writes them;
    `features` is [decisions, feature_dim]; `coupons`, for a catalog campaign's, each decision's (coupon,
    cost cents)."""
    n = len(items)
    names = [user_id.encode() for user_id in user_ids]
    return {
        "kind": "decisions",
        "batch": batch_id,
        "at_ms": str(int(at_ms)),
        "lambda": repr(float(lam)),
        "model_version": model_version,
        "items": ",".join(str(int(i)) for i in items),
        "user_ids": b"".join(names),
        "user_id_bytes": ",".join(str(len(name)) for name in names),
        "actions": ",".join(str(int(a)) for a in actions),
        "costs": ",".join(str(int(c)) for c in cost_cents),
        "probabilities": ",".join(_decimal(float(p)) for p in probabilities),
        "explored": "".join("1" if e else "0" for e in (explored or [False] * n)),
        "holdout": "".join("1" if h else "0" for h in (holdout or [False] * n)),
        "features": np.ascontiguousarray(features, dtype="<f4").tobytes(),
        **(
            {}
            if coupons is None
            else {
                "coupons": ",".join("+".join(str(a) for a, _ in bundle) for bundle in coupons),
                "coupon_costs": ",".join("+".join(str(c) for _, c in bundle) for bundle in coupons),
            }
        ),
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


def _column(fields: Mapping[bytes, bytes], name: str, where: str, n: int, kind: type[int] | type[float]) -> list:
    text = _text(fields, name, where)
    values = text.split(",") if text else []
    if len(values) != n:
        raise LogEntryError(f"{where}: field {name!r} must hold {n} values (one per decision), got {len(values)}")
    try:
        parsed = [kind(v) for v in values]
    except ValueError as exc:
        raise LogEntryError(f"{where}: field {name!r} holds a value that is not {kind.__name__}: {exc}") from exc
    if kind is float and not all(np.isfinite(parsed)):
        raise LogEntryError(f"{where}: field {name!r} holds a non-finite value")
    return parsed


def _flags(fields: Mapping[bytes, bytes], name: str, where: str, n: int) -> list[bool]:
    text = _text(fields, name, where)
    if len(text) != n or set(text) - {"0", "1"}:
        raise LogEntryError(f"{where}: field {name!r} must be {n} characters 0 or 1 (one per decision), got {text!r}")
    return [c == "1" for c in text]


def _bundles(
    fields: Mapping[bytes, bytes], where: str, actions: list[int], costs: list[int]
) -> tuple[list[list[int]], list[list[float]]]:
    """Each decision's coupons and their costs (currency units) of a `decisions` entry; without the fields,
    each decision's action alone (or none)."""
    if b"coupons" not in fields:
        faces = [[c / CENTS_PER_UNIT] if a else [] for a, c in zip(actions, costs, strict=True)]
        return [[a] if a else [] for a in actions], faces
    n = len(actions)
    bundles = _text(fields, "coupons", where).split(",")
    prices = _text(fields, "coupon_costs", where).split(",")
    if len(bundles) != n or len(prices) != n:
        raise LogEntryError(f"{where}: fields 'coupons' and 'coupon_costs' must hold {n} bundles (one per decision)")
    try:
        parsed = [[int(a) for a in bundle.split("+")] if bundle else [] for bundle in bundles]
        cents = [[int(c) for c in price.split("+")] if price else [] for price in prices]
    except ValueError as exc:
        raise LogEntryError(f"{where}: fields 'coupons' and 'coupon_costs' must be integers, '+'-separated") from exc
    if any(len(a) != len(c) for a, c in zip(parsed, cents, strict=True)):
        raise LogEntryError(f"{where}: fields 'coupons' and 'coupon_costs' name different numbers of coupons")
    return parsed, [[c / CENTS_PER_UNIT for c in bundle] for bundle in cents]


def decode_decisions(
    campaign_id: str, entry_id: str, fields: Mapping[bytes, bytes]
) -> tuple[list[dict[str, object]], np.ndarray]:
    """A `decisions` entry: one row per decision (the export's decision columns) and their features
    [decisions, feature_dim] (float64)."""
    where = f"campaign {campaign_id!r} log entry {entry_id}"
    batch = _text(fields, "batch", where)
    items = _text(fields, "items", where)
    indices = items.split(",") if items else []
    n = len(indices)
    if n == 0 or not all(i.isdigit() for i in indices):
        raise LogEntryError(f"{where}: field 'items' must list the decisions' indices, got {items!r}")
    lengths = _column(fields, "user_id_bytes", where, n, int)
    names = fields.get(b"user_ids")
    if names is None:
        raise LogEntryError(f"{where}: field 'user_ids' is missing")
    if min(lengths) < 0 or sum(lengths) != len(names):
        raise LogEntryError(f"{where}: field 'user_id_bytes' does not add up to the {len(names)} bytes of 'user_ids'")
    user_ids, start = [], 0
    for length in lengths:
        try:
            user_ids.append(names[start : start + length].decode())
        except UnicodeDecodeError as exc:
            raise LogEntryError(f"{where}: field 'user_ids' is not UTF-8 text") from exc
        start += length
    raw = fields.get(b"features")
    if raw is None:
        raise LogEntryError(f"{where}: field 'features' is missing")
    if len(raw) == 0 or len(raw) % (4 * n):
        raise LogEntryError(f"{where}: field 'features' must be {n} x 4 x feature_dim bytes, got {len(raw)}")
    features = np.frombuffer(raw, dtype="<f4").reshape(n, -1).astype(np.float64)
    if not np.isfinite(features).all():
        raise LogEntryError(f"{where}: field 'features' holds a non-finite value")
    at_ms = _int(fields, "at_ms", where)
    lam = _float(fields, "lambda", where)
    version = _text(fields, "model_version", where)
    actions = _column(fields, "actions", where, n, int)
    costs = _column(fields, "costs", where, n, int)
    probabilities = _column(fields, "probabilities", where, n, float)
    explored = _flags(fields, "explored", where, n)
    holdout = _flags(fields, "holdout", where, n)
    coupons, coupon_costs = _bundles(fields, where, actions, costs)
    rows: list[dict[str, object]] = [
        {
            "decision_id": f"d-{batch}-{indices[k]}",
            "campaign_id": campaign_id,
            "user_id": user_ids[k],
            "t": at_ms,
            "action": actions[k],
            "cost": costs[k] / CENTS_PER_UNIT,
            "probability": probabilities[k],
            "explored": explored[k],
            "holdout": holdout[k],
            "lambda": lam,
            "model_version": version,
            "decided_at_ms": at_ms,
            "coupons": coupons[k],
            "coupon_costs": coupon_costs[k],
        }
        for k in range(n)
    ]
    return rows, features
