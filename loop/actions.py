"""The action table of a model that scores coupons and bundles by their features (offline/model.py,
`ModelConfig.action_features`), built from the exported decisions.

Such a model names a decision by its row of an action table: row 0 no coupon, row a (1 <= a < K, K the model's
num_actions, the action space of `loop.retrain.action_space`) coupon a alone, row K + j the j-th of the distinct
bundles of several coupons the logs hold (each its coupon actions ascending; the bundles sorted). Each row is the
decision's `action_descriptors` (contract/catalog.py), the description the service gives the model of a
campaign's coupons and bundles, so a logged bundle is learned as what it gives.

A coupon is described by the campaigns' catalogs (the admin API's campaign views: the first campaign, in id
order, whose catalog has the coupon), and otherwise by the logs (`logged_coupons`): an amount coupon of the
largest cost ever reserved for it. A coupon action below K that neither describes is described as no coupon
(the logs never chose it).

A decision's row is its coupons' (`TrainingTable.rows_of`): none row 0, one coupon its action, several their
bundle's row. The exported partitions name each decision's coupons (loop/data.py `decision_coupons`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from contract.catalog import Catalog, Coupon, action_descriptors
from contract.money import rounded_cents

LOGS = "logs"  # what describes a coupon no campaign's catalog has (`TrainingTable.described_by`)


def logged_coupons(
    coupons: Sequence[Sequence[int]], coupon_costs: Sequence[Sequence[float]], decision_costs: Sequence[float]
) -> dict[int, Coupon]:
    """The coupons the decisions hold, each as an amount coupon of the largest cost reserved for it (currency
    units): its entry of the decision's `coupon_costs`, or the decision's cost where the decision names its one
    coupon without one. The description of a coupon that no campaign's catalog describes."""
    largest: dict[int, int] = {}
    for bundle, costs, decision_cost in zip(coupons, coupon_costs, decision_costs, strict=True):
        if len(costs) == len(bundle):
            pairs = list(zip(bundle, costs, strict=True))
        elif len(bundle) == 1:
            pairs = [(bundle[0], decision_cost)]
        else:
            raise ValueError(f"a decision names coupons {list(bundle)} with {len(costs)} costs")
        for action, cost in pairs:
            cents = max(int(rounded_cents(float(cost))), 0)
            largest[int(action)] = max(largest.get(int(action), 0), cents)
    return {a: Coupon(a, cents) for a, cents in sorted(largest.items())}


@dataclass(frozen=True)
class TrainingTable:
    """The action table a model scoring by features trains on, and what its rows are."""

    table: np.ndarray  # f32 [K + len(several), len(ACTION_FEATURES)]
    num_actions: int  # K: rows 0..K-1 are no coupon and each coupon alone
    several: tuple[tuple[int, ...], ...]  # the bundles of several coupons, rows K, K + 1, ...
    coupons: tuple[Coupon, ...]  # the coupons described, by action
    described_by: Mapping[int, str]  # coupon action -> the campaign whose catalog describes it, or LOGS

    @property
    def rows(self) -> int:
        return len(self.table)

    def rows_of(self, coupons: Sequence[Sequence[int]]) -> np.ndarray:
        """i64: each decision's row, from its coupons (none, one, or a bundle of several). ValueError for a coupon
        beyond the K actions or a bundle the table does not hold."""
        index = {bundle: self.num_actions + j for j, bundle in enumerate(self.several)}
        out = np.zeros(len(coupons), np.int64)
        for i, bundle in enumerate(coupons):
            if len(bundle) == 1:
                action = int(bundle[0])
                if not 0 < action < self.num_actions:
                    raise ValueError(f"a decision holds coupon {action}, beyond the model's {self.num_actions} actions")
                out[i] = action
            elif len(bundle) > 1:
                key = tuple(sorted(int(a) for a in bundle))
                if key not in index:
                    raise ValueError(f"a decision holds the bundle {'+'.join(map(str, key))}, not a row of the table")
                out[i] = index[key]
        return out

    def offered(self, catalog: Catalog) -> np.ndarray:
        """[rows] bool: the rows a campaign of `catalog` may grant: no coupon, its allowed bundles of one coupon
        (those below K) and of several coupons (those the table holds)."""
        out = np.zeros(self.rows, bool)
        out[0] = True
        alone = [b.coupons[0] for b in catalog.bundles if len(b.coupons) == 1 and b.coupons[0] < self.num_actions]
        out[alone] = True
        bundles = {b.coupons for b in catalog.bundles if len(b.coupons) > 1}
        for j, bundle in enumerate(self.several):
            out[self.num_actions + j] = bundle in bundles
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "num_actions": self.num_actions,
            "bundles": ["+".join(map(str, b)) for b in self.several],
            "coupons_described_by": {str(a): source for a, source in sorted(self.described_by.items())},
        }


def training_table(
    decisions: pa.Table, num_actions: int, catalogs: Mapping[str, Catalog] | None = None
) -> TrainingTable:
    """The table of `decisions` (loop/data.py `joined_decisions`: its ``coupons``, ``coupon_costs`` and
    ``face_cost`` columns) for a model of `num_actions`, its coupons described by `catalogs` (campaign id ->
    its catalog) where they can be (module docstring). ValueError for a logged coupon beyond the actions."""
    coupons = [[int(a) for a in b] for b in decisions.column("coupons").to_pylist()]
    costs = [list(c or []) for c in decisions.column("coupon_costs").to_pylist()]
    logged = logged_coupons(coupons, costs, decisions.column("face_cost").to_pylist())
    beyond = [a for a in logged if not 0 < a < num_actions]
    if beyond:
        raise ValueError(f"the logs hold coupon {max(beyond)}, beyond the model's {num_actions} actions")
    described: dict[int, Coupon] = {}
    source: dict[int, str] = {}
    for campaign, catalog in sorted((catalogs or {}).items()):
        for coupon in catalog.coupons:
            if coupon.action not in described:
                described[coupon.action], source[coupon.action] = coupon, campaign
    for action, coupon in logged.items():
        if action not in described:
            described[action], source[action] = coupon, LOGS
    several = tuple(sorted({tuple(sorted(b)) for b in coupons if len(b) > 1}))
    alone: list[tuple[int, ...]] = [(a,) if a in described else () for a in range(1, num_actions)]
    table = action_descriptors(list(described.values()), [*alone, *several])
    used = {a for a in described if a < num_actions} | {a for b in several for a in b}
    return TrainingTable(
        table,
        num_actions,
        several,
        tuple(described[a] for a in sorted(used)),
        {a: source[a] for a in sorted(used)},
    )


def with_rows(decisions: pa.Table, table: TrainingTable) -> pa.Table:
    """`decisions` with each decision's ``action`` its row of `table`."""
    rows = table.rows_of(decisions.column("coupons").to_pylist())
    return decisions.set_column(decisions.column_names.index("action"), "action", pa.array(rows))


def logged_width(decisions: pa.Table) -> int:
    """1 + the largest coupon action the decisions hold (0 without any): the actions they need."""
    largest = max((max(b) for b in decisions.column("coupons").to_pylist() if b), default=-1)
    return int(largest) + 1
