"""The ledger's rules (CONTRACT §4): campaigns, reservations, settlement, expiry; on every kind of store."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import Run, item, put, reserve

from service.state import (
    CampaignNotFound,
    CampaignSettings,
    CampaignUpdate,
    CostAboveReservation,
    Outcome,
    RequestIdConflict,
)
from service.state.store import StateStore


def test_campaign_put_patch_get(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        assert await store.get_campaign("c") is None
        with pytest.raises(CampaignNotFound):
            await store.upsert_campaign("c", CampaignUpdate(replace=False, budget=5))
        state = await store.upsert_campaign(
            "c", put(10_000, admin_lambda=0.3, expected_users=10, ends_ms=9, pacing=False)
        )
        assert (state.budget, state.spent, state.reserved, state.settings.admin_lambda) == (10_000, 0, 0, 0.3)
        assert state.coupons == {1: 200, 2: 500, 3: 1000} and state.settings.expected_users == 10
        assert (state.settings.ends_ms, state.settings.pacing, state.settings.reservation_mode) == (9, False, "strict")
        state = await store.upsert_campaign("c", CampaignUpdate(replace=False, budget=20_000))
        assert state.budget == 20_000 and state.settings.admin_lambda == 0.3 and state.coupons[3] == 1000
        state = await store.upsert_campaign("c", CampaignUpdate(replace=False, cleared=frozenset({"admin_lambda"})))
        assert state.settings.admin_lambda is None and state.settings.ends_ms == 9
        state = await store.upsert_campaign("c", CampaignUpdate(replace=False, admin_lambda=0.5, overspend_risk=0.05))
        assert state.settings.admin_lambda == 0.5 and state.settings.overspend_risk == 0.05
        state = await store.upsert_campaign("c", put(100))  # PUT resets what it does not name
        assert state.settings == CampaignSettings(budget=100, coupons={1: 200, 2: 500, 3: 1000})
        assert await store.campaign_ids() == ["c"]
        assert await store.get_campaign("c") == state

    run(scenario)


def test_decisions_read_every_campaign_change(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000, admin_lambda=0.5))
        config, _ = await store.load_for_decision("c", ["u"])
        assert config is not None
        assert (config.budget, config.settings.admin_lambda, config.coupons[2]) == (10_000, 0.5, 500)
        update = CampaignUpdate(replace=False, budget=7_000, expected_users=4, cleared=frozenset({"admin_lambda"}))
        await store.upsert_campaign("c", update)
        config, (context,) = await store.load_for_decision("c", ["u"])
        assert config is not None
        assert (config.budget, config.settings.admin_lambda, config.settings.expected_users) == (7_000, None, 4)
        assert context is None
        assert await store.load_for_decision("other", ["u"]) == (None, [None])

    run(scenario)


def test_reserve_fits_budget_in_priority_order_with_fallback(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(1_200))
        items = [
            item("u1", [3, 2, 0]),  # 10.00 fits (12.00 left)
            item("u2", [3, 1, 0]),  # 10.00 does not fit 2.00 -> the next preferred that fits: 1 (2.00)
            item("u3", [2, 1, 0]),  # nothing left
            item("u4", [0]),  # the policy prefers no coupon
        ]
        result = await reserve(store, "c", items)
        got = [(d.user_id, d.action, d.cost, d.new, d.downgraded) for d in result.decisions]
        assert got == [
            ("u1", 3, 1000, True, False),
            ("u2", 1, 200, True, True),
            ("u3", 0, 0, True, True),
            ("u4", 0, 0, True, False),
        ]
        assert len({d.decision_id for d in result.decisions}) == 4
        assert result.remaining == 0
        state = await store.get_campaign("c")
        assert state is not None and (state.reserved, state.spent, state.decisions) == (1_200, 0, 4)
        assert state.model_version == "v1"
        assert result.decisions[0].lam == 0.25 and result.decisions[0].model_version == "v1"

    run(scenario)


def test_preferences_below_no_coupon_and_coupons_not_offered_are_never_issued(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(100))  # only 1.00: nothing fits
        assert (await reserve(store, "c", [item("u", [1, 0, 2])])).decisions[0].action == 0
        await store.upsert_campaign("d", put(10_000, {2: 500}))
        decided = (await reserve(store, "d", [item("u", [3, 2, 0])])).decisions[0]
        assert (decided.action, decided.cost) == (2, 500)

    run(scenario)


def test_request_id_is_idempotent(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000))
        first = await reserve(store, "c", [item("u1", [3, 0], "r1"), item("u1", [2, 0], "r1")])
        ids = [d.decision_id for d in first.decisions]
        assert ids[0] == ids[1] and [d.new for d in first.decisions] == [True, False]  # one request_id twice
        again = await reserve(store, "c", [item("u1", [1, 0], "r1")])
        d = again.decisions[0]
        assert (d.decision_id, d.action, d.cost, d.user_id, d.new) == (ids[0], 3, 1000, "u1", False)
        # another user's request id, or one request id for two users in a batch: refused, nothing written
        for items in (
            [item("u3", [1, 0], "r3"), item("other", [1, 0], "r1")],
            [item("a", [1, 0], "r2"), item("b", [1, 0], "r2")],
        ):
            with pytest.raises(RequestIdConflict) as conflict:
                await reserve(store, "c", items)
            assert conflict.value.item == 1 and conflict.value.request_id == items[1].request_id
        assert [d.new for d in (await reserve(store, "c", [item("u3", [0], "r3")])).decisions] == [True]
        state = await store.get_campaign("c")
        assert state is not None and state.reserved == 1000 and state.decisions == 2

    run(scenario)


def test_unknown_campaign(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        with pytest.raises(CampaignNotFound):
            await reserve(store, "nope", [item("u", [1, 0])])
        with pytest.raises(CampaignNotFound):
            await store.settle("nope", [Outcome("d-1", 1.0, 0)])
        campaign, _ = await store.load_for_decision("nope", ["a"])
        assert campaign is None

    run(scenario)


def test_settle_replaces_reservation_with_realized_cost(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000))
        result = await reserve(
            store, "c", [item("u1", [3, 0]), item("u2", [2, 0]), item("u3", [1, 0]), item("u4", [0])]
        )
        d1, d2, _, d4 = (d.decision_id for d in result.decisions)
        outcomes = [Outcome(d1, 12.5, 700), Outcome(d2, 0.0, 0), Outcome(d1, 12.5, 700), Outcome("zzz", 1.0, 0)]
        settled = await store.settle("c", [*outcomes, Outcome(d4, 3.0, 0), Outcome(d1[:-1] + "9", 1.0, 0)])
        assert (settled.accepted, settled.duplicates, settled.unknown) == (3, 1, 2)
        assert sorted(u for u, *_ in settled.context_updates) == ["u1", "u2", "u4"]
        state = await store.get_campaign("c")
        assert state is not None and (state.spent, state.reserved) == (700, 200)
        assert settled.remaining == 10_000 - 900
        again = await store.settle("c", [Outcome(d1, 12.5, 700)])
        assert (again.accepted, again.duplicates) == (0, 1)

    run(scenario)


def test_cost_above_reservation_refuses_the_whole_batch(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000))
        result = await reserve(store, "c", [item("u1", [1, 0]), item("u2", [1, 0]), item("u3", [0])])
        d1, d2, d3 = (d.decision_id for d in result.decisions)
        with pytest.raises(CostAboveReservation) as info:
            await store.settle("c", [Outcome("unknown", 1.0, 0), Outcome(d1, 1.0, 200), Outcome(d2, 1.0, 201)])
        assert info.value.index == 2  # the position in the request, unknown ids counted
        with pytest.raises(CostAboveReservation):
            await store.settle("c", [Outcome(d3, 1.0, 1)])  # no coupon, no cost
        state = await store.get_campaign("c")
        assert state is not None and (state.spent, state.reserved) == (0, 400)

    run(scenario)


def test_sweep_releases_expired_reservations_and_late_outcomes_still_count(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(1_500))
        now = int(time.time() * 1000)
        first = await reserve(store, "c", [item("u1", [3, 0]), item("u2", [2, 0])], now=now, expiry_ms=1000)
        d1, d2 = (d.decision_id for d in first.decisions)
        assert await store.sweep_expired("c", now + 999) == 0
        assert await store.sweep_expired("c", now + 1000) == 2
        assert await store.sweep_expired("c", now + 5000) == 0
        state = await store.get_campaign("c")
        assert state is not None and state.reserved == 0
        # a new reservation takes the freed budget; a late outcome is charged only as far as it fits
        await reserve(store, "c", [item("u3", [3, 0])], now=now + 2000)
        late = await store.settle("c", [Outcome(d2, 4.0, 500), Outcome(d1, 1.0, 1000)])
        assert late.accepted == 2
        state = await store.get_campaign("c")
        assert state is not None and (state.reserved, state.spent, state.overrun) == (1000, 500, 1000)
        assert state.spent + state.reserved <= state.budget

    run(scenario)


def test_sweep_releases_by_deadline_whatever_the_order_reserved(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10**6))
        now = 1_000_000
        await reserve(store, "c", [item("u1", [1, 0])], now=now, expiry_ms=5000)
        await reserve(store, "c", [item("u2", [1, 0])], now=now, expiry_ms=1000)  # reserved later, due first
        assert await store.sweep_expired("c", now + 999) == 0
        assert await store.sweep_expired("c", now + 1000) == 1
        assert await store.sweep_expired("c", now + 4999) == 0
        assert await store.sweep_expired("c", now + 5000) == 1
        state = await store.get_campaign("c")
        assert state is not None and state.reserved == 0

    run(scenario)


def test_a_batch_settles_and_expires_record_by_record(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(3_000))
        now = int(time.time() * 1000)
        items = [item("u0", [3, 0]), item("u1", [2, 0], "req-1"), item("u2", [0]), item("u3", [3, 2, 1, 0])]
        result = await reserve(store, "c", items, now=now, expiry_ms=1000)
        assert [(d.action, d.cost) for d in result.decisions] == [(3, 1000), (2, 500), (0, 0), (3, 1000)]
        ids = [d.decision_id for d in result.decisions]
        replay = await reserve(store, "c", [item("u1", [1, 0], "req-1")], now=now)
        assert (replay.decisions[0].decision_id, replay.decisions[0].new) == (ids[1], False)
        with pytest.raises(CostAboveReservation):  # all or nothing: ids[0] is not settled either
            await store.settle("c", [Outcome(ids[0], 5.0, 800), Outcome(ids[1], 1.0, 501)])
        settled = await store.settle("c", [Outcome(ids[0], 5.0, 800), Outcome(ids[0], 5.0, 800), Outcome(ids[2], 0, 0)])
        assert (settled.accepted, settled.duplicates, settled.unknown) == (2, 1, 0)
        assert await store.sweep_expired("c", now + 999) == 0
        assert await store.sweep_expired("c", now + 1000) == 2  # ids[1] and ids[3]; ids[0] was settled
        state = await store.get_campaign("c")
        assert state is not None and (state.spent, state.reserved, state.decisions) == (800, 0, 4)
        late = await store.settle("c", [Outcome(ids[3], 2.0, 1000)])
        assert late.accepted == 1
        state = await store.get_campaign("c")
        assert state is not None and (state.spent, state.overrun) == (1800, 0)

    run(scenario)


def test_lowering_the_budget_below_the_ledger_stops_new_coupons(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(2_000))
        first = await reserve(store, "c", [item("u1", [3, 0]), item("u2", [3, 0])])
        state = await store.upsert_campaign("c", CampaignUpdate(replace=False, budget=1_500))
        assert (state.reserved, state.remaining) == (2_000, 0)
        result = await reserve(store, "c", [item("u3", [1, 0])])
        assert result.decisions[0].action == 0 and result.remaining == -500
        await store.settle("c", [Outcome(first.decisions[0].decision_id, 0.0, 0)])
        assert (await reserve(store, "c", [item("u4", [3, 0])])).decisions[0].action == 0  # 5.00 left
        assert (await reserve(store, "c", [item("u5", [3, 2, 0])])).decisions[0].action == 2

    run(scenario)


def test_concurrent_reservations_never_overspend(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(5_000))

        async def worker(w: int) -> int:
            total = 0
            for r in range(10):
                res = await reserve(store, "c", [item(f"u{w}-{r}-{j}", [3, 2, 1, 0]) for j in range(5)])
                total += sum(d.cost for d in res.decisions)
            return total

        totals = await asyncio.gather(*(worker(w) for w in range(8)))
        state = await store.get_campaign("c")
        assert state is not None and sum(totals) == state.reserved <= 5_000

    run(scenario)
