"""The ledger's Lua held against the contract, through the real store on each kind of store: reserve.lua
grants what contract/ranking.py `first_fit` (and, for a catalog's bundles, `first_fit_bundles`) grants, and
the log entries the scripts write are what contract/log_entry.py encodes and decodes."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import redis
import redis.cluster
from conftest import Run, put, reserve

from contract.catalog import Catalog
from contract.log_entry import decisions_fields, decode_decisions, decode_outcome, outcome_fields
from contract.ranking import bundle_ranking, first_fit, first_fit_bundles, preferences
from service.state import CampaignUpdate, Outcome, ReserveBatch, ReserveItem
from service.state.store import StateStore

PRICES = np.array([0, 200, 500, 1000])  # cents


def test_reserve_grants_what_first_fit_grants(run: Run) -> None:
    """Randomised requests (scores with ties, offered subsets, budgets that bind or not): the store's
    reservation (strict mode) gives every user the action of the reference."""

    async def scenario(store: StateStore) -> None:
        rng = np.random.default_rng(5)
        for case in range(12):
            offered = sorted(int(a) for a in rng.choice([1, 2, 3], size=int(rng.integers(1, 4)), replace=False))
            scores = rng.normal(size=(int(rng.integers(1, 40)), 4)).round(1)  # ties: the stable orders matter
            budget = int(rng.integers(0, 12_000))
            campaign = f"c{case}"
            await store.upsert_campaign(campaign, put(budget, {a: int(PRICES[a]) for a in offered}))
            prefs, priority = preferences(scores, offered)
            order = priority.tolist()
            items = [ReserveItem(f"u{row}", None, prefs[row]) for row in order]
            granted = (await reserve(store, campaign, items)).decisions
            prices = np.where(np.isin(np.arange(4), [0, *offered]), PRICES, -1)
            expected, _ = first_fit(scores, prices, budget)
            assert [d.action for d in granted] == expected[order].tolist(), f"case {case}"

    run(scenario)


def test_reserve_grants_what_first_fit_bundles_grants(run: Run) -> None:
    """Randomised catalogs (amount and percent coupons, stock of a few units or none, bundles by the rule of
    at most 2 or 3 per bundle and one per class), scores with ties and budgets that bind or not: the store
    grants every user the bundle of the reference, and takes the stock the reference takes."""

    async def scenario(store: StateStore) -> None:
        rng = np.random.default_rng(11)
        for case in range(12):
            coupons: list[dict[str, Any]] = []
            for action in range(1, 5):
                stock = [None, 0, 1, 2, 3][int(rng.integers(0, 5))]
                if rng.random() < 0.5:
                    coupon: dict[str, Any] = {"action": action, "cost": float(rng.integers(1, 9))}
                else:
                    coupon = {"action": action, "kind": "percent", "value": 10.0, "cap": float(rng.integers(1, 9))}
                coupon["class"] = f"k{action % 2}" if rng.random() < 0.5 else f"own{action}"
                coupons.append(coupon if stock is None else {**coupon, "stock": stock})
            catalog = Catalog.parse(coupons, max_per_bundle=int(rng.integers(2, 4)))
            bundles = [b.coupons for b in catalog.bundles]
            scores = rng.normal(size=(int(rng.integers(1, 30)), 5)).round(1)
            budget = int(rng.integers(0, 20_000))
            campaign = f"c{case}"
            await store.upsert_campaign(
                campaign, CampaignUpdate(replace=True, budget=budget, coupons=catalog.costs, catalog=catalog)
            )
            lists, index, priority = bundle_ranking(scores, bundles)
            order = priority.tolist()
            items = [ReserveItem(f"u{row}", None, lists[index[row]]) for row in order]
            batch = ReserveBatch.of(items, bundles=[b.key for b in catalog.bundles])
            granted = await reserve(store, campaign, batch)
            prices = np.array([-1, *(catalog.costs[a] for a in range(1, 5))])
            expected, _ = first_fit_bundles(scores, bundles, prices, catalog.stock, budget)
            actions = [0 if j == 0 else catalog.bundles[j - 1].action for j in expected[order]]
            assert granted.actions == actions, f"case {case}"
            taken: dict[int, int] = {}
            for j in expected[expected > 0]:
                for a in bundles[j - 1]:
                    taken[a] = taken.get(a, 0) + 1
            state = await store.get_campaign(campaign)
            assert state is not None
            assert state.stock_used == {a: n for a, n in taken.items() if a in catalog.stock}, f"case {case}"

    run(scenario)


def _read_log(store: StateStore, campaign: str) -> list[tuple[str, dict[bytes, bytes]]]:
    reader: Any = (redis.cluster.RedisCluster if store.cluster else redis.Redis).from_url(store.url)
    try:
        return [(entry_id.decode(), fields) for entry_id, fields in reader.xrange(store.keys.log_key(campaign))]
    finally:
        reader.close()


def _encoded(fields: dict[str, str | bytes]) -> dict[bytes, bytes]:
    return {name.encode(): value.encode() if isinstance(value, str) else value for name, value in fields.items()}


def test_the_lua_log_entries_are_what_the_contract_encodes_and_decodes(run: Run) -> None:
    features = np.array([[0.25, -1.5, 3.0], [1.0, 2.0, -0.125]], "<f4")

    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(100_000))
        now = int(time.time() * 1000)
        items = [
            ReserveItem("user\twith tab", None, [2, 0], features[0].tobytes()),
            ReserveItem("ünï", None, [0], features[1].tobytes()),
        ]
        decided, other = (await reserve(store, "c", items, now=now)).decisions
        await store.settle("c", [Outcome(decided.decision_id, 3.335, 500)], now_ms=now + 7)
        (decision_id, decision), (outcome_id, outcome) = _read_log(store, "c")

        written = decisions_fields(
            batch_id=decided.decision_id.split("-")[1],
            items=[0, 1],
            user_ids=["user\twith tab", "ünï"],
            actions=[2, 0],
            cost_cents=[500, 0],
            probabilities=[1.0, 1.0],
            features=features,
            at_ms=now,
            model_version="v1",
            lam=0.25,
        )
        assert decision == _encoded(written)
        rows, decoded_features = decode_decisions("c", decision_id, decision)
        assert [r["decision_id"] for r in rows] == [decided.decision_id, other.decision_id]
        assert [r["user_id"] for r in rows] == ["user\twith tab", "ünï"]
        assert [(r["action"], r["cost"], r["lambda"], r["decided_at_ms"]) for r in rows] == [
            (2, 5.0, 0.25, now),
            (0, 0.0, 0.25, now),
        ]
        np.testing.assert_array_equal(decoded_features, features)

        written = outcome_fields(
            decision_id=decided.decision_id,
            user_id="user\twith tab",
            action=2,
            reward_cents=334,  # 3.335 rounded half up, as contract/money.py `rounded_cents` does
            cost_cents=500,
            at_ms=now + 7,
            decided_at_ms=now,
        )
        assert outcome == _encoded(written)
        values = decode_outcome("c", outcome_id, outcome)
        assert (values["reward"], values["cost"], values["outcome_at_ms"]) == (3.34, 5.0, now + 7)

    run(scenario)


def test_a_catalog_campaigns_log_entries_are_what_the_contract_encodes(run: Run) -> None:
    catalog = Catalog.parse(
        [{"action": 1, "cost": 2.0}, {"action": 3, "kind": "percent", "value": 15.0, "cap": 7.5, "stock": 9}],
        max_per_bundle=2,
    )
    features = np.array([1.5], "<f4")

    async def scenario(store: StateStore) -> None:
        update = CampaignUpdate(replace=True, budget=100_000, coupons=catalog.costs, catalog=catalog)
        await store.upsert_campaign("c", update)
        now = int(time.time() * 1000)
        keys = [b.key for b in catalog.bundles]  # 1, 3, 1+3
        items = [ReserveItem("u", None, [3, 0], features.tobytes()), ReserveItem("v", None, [0], features.tobytes())]
        bundle, nothing = (await reserve(store, "c", ReserveBatch.of(items, bundles=keys), now=now)).decisions
        await store.settle("c", [Outcome(bundle.decision_id, 20.0, 349, [(3, 349)])], now_ms=now + 5)
        entries = _read_log(store, "c")
        assert len(entries) == 2
        (decisions_id, decided), (outcome_id, outcome) = entries
        assert decided == _encoded(
            decisions_fields(
                batch_id=bundle.decision_id.split("-")[1],
                items=[0, 1],
                user_ids=["u", "v"],
                actions=[1_000_003, 0],
                cost_cents=[950, 0],
                probabilities=[1.0, 1.0],
                features=np.stack([features, features]),
                at_ms=now,
                model_version="v1",
                lam=0.25,
                coupons=[[(1, 200), (3, 750)], []],
            )
        )
        assert outcome == _encoded(
            outcome_fields(
                decision_id=bundle.decision_id,
                user_id="u",
                action=1_000_003,
                reward_cents=2000,
                cost_cents=349,
                at_ms=now + 5,
                decided_at_ms=now,
                coupons=[(1, 0), (3, 349)],
            )
        )
        (values, skipped), _ = decode_decisions("c", decisions_id, decided)
        assert (values["coupons"], values["coupon_costs"], values["cost"]) == ([1, 3], [2.0, 7.5], 9.5)
        assert (values["decision_id"], skipped["decision_id"]) == (bundle.decision_id, nothing.decision_id)
        assert skipped["coupons"] == [] and skipped["coupon_costs"] == []
        values = decode_outcome("c", outcome_id, outcome)
        assert (values["coupons"], values["coupon_costs"], values["cost"]) == ([1, 3], [0.0, 3.49], 3.49)

    run(scenario)
