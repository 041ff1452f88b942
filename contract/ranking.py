"""Ranking and first fit: the reference of how a request's coupons are granted. The service ranks with
`preferences` (a campaign of single coupons) or `bundle_ranking` (a catalog's bundles);
service/lua/reserve.lua grants in that order (tested against `first_fit` and `first_fit_bundles` through the
real store); calibration rollouts grant with `first_fit`.

Each action's score = revenue - lambda x cost, action 0 being no coupon. A one-coupon bundle scores as its
coupon. A bundle of several coupons scores as the model scores it when the model scores bundles by their
features (`several`: the model's own score of each of the catalog's bundles of several coupons); otherwise
its score is built from the per-coupon scores: no coupon's score plus the sum of its coupons' gains over no
coupon, s(B) = s_0 + sum over a in B of (s_a - s_0) (the additive rule: a bundle's coupons add their
effects)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def ranking(scores: np.ndarray, offered: list[int]) -> tuple[list[list[int]], list[int], np.ndarray]:
    """`preferences` as columns: the distinct preference lists (a batch has a handful), each row's index
    among them, and the priority order of rows."""
    allowed = np.zeros(scores.shape[1], np.bool_)
    allowed[0] = True
    allowed[[a for a in offered if 0 < a < scores.shape[1]]] = True
    masked = np.where(allowed, scores, -np.inf)
    return _ranked(masked, ~np.isfinite(scores).all(axis=1))


def bundle_scores(
    scores: np.ndarray, bundles: Sequence[Sequence[int]], several: np.ndarray | None = None
) -> np.ndarray:
    """[B, 1 + n] in the scores' precision: column 0 no coupon (s_0), column j the (j-1)-th bundle. A
    one-coupon bundle is its coupon's score as it is, so that it ranks exactly as the coupon does. A bundle
    of several coupons is its column of `several` [B, m] (the model's scores of the bundles of several coupons
    among `bundles`, in their order) when given; otherwise s_0 + the sum of its coupons' gains over no coupon
    (module docstring; summed in doubles). A bundle naming an action the scores lack scores -inf."""
    rows, k = scores.shape
    dtype = np.result_type(scores.dtype, np.float32)
    out = np.full((rows, 1 + len(bundles)), -np.inf, dtype)
    out[:, 0] = scores[:, 0]
    positions = [j for j, bundle in enumerate(bundles) if len(bundle) > 1]
    if several is not None and several.shape != (rows, len(positions)):
        raise ValueError(
            f"several: the scores of the {len(positions)} bundles of several coupons must be "
            f"[{rows}, {len(positions)}], got {list(several.shape)}"
        )
    for j, bundle in enumerate(bundles):
        if len(bundle) == 1 and 0 < bundle[0] < k:
            out[:, j + 1] = scores[:, bundle[0]]
    scored = [(column, j) for column, j in enumerate(positions) if all(0 < a < k for a in bundles[j])]
    if not scored:
        return out
    if several is not None:
        out[:, [j + 1 for _, j in scored]] = several[:, [column for column, _ in scored]]
        return out
    membership = np.zeros((k, len(scored)), np.float64)
    for column, (_, j) in enumerate(scored):
        membership[list(bundles[j]), column] = 1
    base = scores[:, :1].astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        out[:, [j + 1 for _, j in scored]] = base + (scores - base) @ membership
    return out


def bundle_ranking(
    scores: np.ndarray, bundles: Sequence[Sequence[int]], several: np.ndarray | None = None
) -> tuple[list[list[int]], list[int], np.ndarray]:
    """`ranking` of bundles: per row, bundle positions (1-based in `bundles`; 0 no coupon) by descending
    `bundle_scores` (`several`: the model's scores of the bundles of several coupons), cut after 0, as
    distinct lists and each row's index among them; and the priority order of rows (largest gain of the best
    bundle over none first). Ties keep the earlier bundle and row; a row with any non-finite score (of a
    coupon or of a bundle of several) prefers no coupon alone and comes last."""
    return _ranked(bundle_scores(scores, bundles, several), ~finite_rows(scores, several))


def finite_rows(scores: np.ndarray, several: np.ndarray | None = None) -> np.ndarray:
    """[B] bool: the rows whose scores (and bundle scores, when given) are all finite."""
    finite = np.isfinite(scores).all(axis=1)
    if several is not None:
        finite &= np.isfinite(several).all(axis=1)
    return np.asarray(finite)


def _ranked(masked: np.ndarray, unscored: np.ndarray) -> tuple[list[list[int]], list[int], np.ndarray]:
    """Column 0 is no coupon; -inf columns are not offered."""
    masked[unscored] = -np.inf
    masked[unscored, 0] = 0.0
    ranked = np.argsort(-masked, axis=1, kind="stable").tolist()
    seen: dict[tuple[int, ...], int] = {}  # each distinct list (cut after action 0) -> its index
    index = [seen.setdefault(tuple(row[: row.index(0) + 1]), len(seen)) for row in ranked]
    lists = [list(prefs) for prefs in seen]
    gain = masked.max(axis=1) - masked[:, 0]
    gain[unscored] = -np.inf
    return lists, index, np.argsort(-gain, kind="stable")


def preferences(scores: np.ndarray, offered: list[int]) -> tuple[list[list[int]], np.ndarray]:
    """Per row: offered actions by descending score, cut after action 0 (nothing below "no coupon" is
    preferable to it); and the priority order of rows (largest gain of the best coupon over none first).
    Ties keep the lower action and the earlier row. A row with any non-finite score prefers action 0 alone
    and comes last."""
    lists, index, priority = ranking(scores, offered)
    return [lists[k] for k in index], priority


def first_fit(scores: np.ndarray, prices: np.ndarray, available: int) -> tuple[np.ndarray, np.ndarray]:
    """One request's coupons granted as the service grants them in its `strict` mode: rows in `preferences`'
    priority order, each taking its first preferred coupon whose price fits what is still available after
    the rows before it, else no coupon. Returns the action of every row and whether its preferred coupon
    was refused.

    `scores` [B, K]; `prices` [K] integer cents, negative for an action not offered (action 0, no coupon,
    is always allowed and costs nothing); `available` = budget - spent - reserved, in cents."""
    offered = [a for a in range(1, min(len(prices), scores.shape[1])) if prices[a] >= 0]
    prefs, priority = preferences(scores, offered)
    best = np.array([p[0] for p in prefs], dtype=np.int64)
    refused = np.zeros(len(scores), dtype=bool)
    if int(np.where(best > 0, prices[best], 0).sum()) <= available:  # every first choice fits
        return best, refused
    actions = np.zeros(len(scores), dtype=np.int64)
    for row in priority.tolist():
        for candidate in prefs[row]:
            if candidate == 0:
                break
            if prices[candidate] <= available:
                actions[row] = candidate
                available -= int(prices[candidate])
                break
        refused[row] = best[row] != 0 and actions[row] != best[row]
    return actions, refused


def first_fit_bundles(
    scores: np.ndarray,
    bundles: Sequence[Sequence[int]],
    prices: np.ndarray,
    stock: Mapping[int, int],
    available: int,
    several: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One request's bundles granted as the service grants them in its `strict` mode: rows in
    `bundle_ranking`'s priority order, each taking its first preferred bundle that fits whole: its price,
    the sum of its coupons' `prices` (cents, negative for an action not offered: no bundle holding it is
    granted), fits what is still available after the rows before it, and every coupon of it with a stock
    (`stock`: action -> units left) has a unit left; else no coupon. Returns each row's bundle (its position,
    1-based in `bundles`; 0 no coupon) and whether its preferred bundle was refused. `several`: the model's
    scores of the bundles of several coupons (`bundle_scores`)."""
    lists, index, priority = bundle_ranking(scores, bundles, several)
    left = dict(stock)
    price = [
        int(sum(prices[a] for a in b)) if all(0 <= a < len(prices) and prices[a] >= 0 for a in b) else -1
        for b in bundles
    ]
    granted = np.zeros(len(scores), dtype=np.int64)
    refused = np.zeros(len(scores), dtype=bool)
    for row in priority.tolist():
        prefs = lists[index[row]]
        for candidate in prefs:
            if candidate == 0:
                break
            bundle = bundles[candidate - 1]
            if 0 <= price[candidate - 1] <= available and all(left.get(a, 1) >= 1 for a in bundle):
                granted[row] = candidate
                available -= price[candidate - 1]
                for a in bundle:
                    if a in left:
                        left[a] -= 1
                break
        refused[row] = prefs[0] != 0 and granted[row] != prefs[0]
    return granted, refused
