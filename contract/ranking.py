"""Ranking and first fit: the reference of how a request's coupons are granted. The service ranks with
`preferences`; service/lua/reserve.lua grants in that order (tested against `first_fit` through the real
store); calibration rollouts grant with `first_fit`."""

from __future__ import annotations

import numpy as np


def ranking(scores: np.ndarray, offered: list[int]) -> tuple[list[list[int]], list[int], np.ndarray]:
    """`preferences` as columns: the distinct preference lists (a batch has a handful), each row's index
    among them, and the priority order of rows."""
    allowed = np.zeros(scores.shape[1], np.bool_)
    allowed[0] = True
    allowed[[a for a in offered if 0 < a < scores.shape[1]]] = True
    masked = np.where(allowed, scores, -np.inf)
    unscored = ~np.isfinite(scores).all(axis=1)
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
