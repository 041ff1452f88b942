"""The ledger's Lua held against the contract, through the real store on each kind of store: reserve.lua
grants what contract/ranking.py `first_fit` grants, and the log entries the scripts write are what
contract/log_entry.py encodes and decodes."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import redis
import redis.cluster
from conftest import Run, put, reserve

from contract.log_entry import decisions_fields, decode_decisions, decode_outcome, outcome_fields
from contract.ranking import first_fit, preferences
from service.state import Outcome, ReserveItem
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
