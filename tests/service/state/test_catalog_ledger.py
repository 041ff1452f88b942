"""The ledger of a campaign with a coupon catalog (contract/catalog.py), on each kind of store: a bundle is
reserved whole or not at all (budget and stock), each coupon of a bundle settles on its own exact to the
cent, expiry releases a bundle and returns its stock, exploration draws among the bundles that fit."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import DAY_MS, Run

from contract.catalog import Catalog
from loop.data import joined_decisions, read_partitions
from loop.logstream import export_logs
from service.state import (
    CampaignUpdate,
    CostAboveReservation,
    CouponCostsRefused,
    Outcome,
    ReserveBatch,
    ReserveItem,
    ReserveResult,
)
from service.state.store import StateStore, parse_decision_record

NOW = 1_767_225_600_000  # 2026-01-01, epoch ms
# 1: 2.00 off; 2: 10% off, at most 5.00, 3 units; 3: 10.00 off a basket of 50.00, 1 unit
CATALOG = Catalog.parse(
    [
        {"action": 1, "cost": 2.0},
        {"action": 2, "kind": "percent", "value": 10.0, "cap": 5.0, "stock": 3},
        {"action": 3, "kind": "amount", "value": 10.0, "min_spend": 50.0, "stock": 1},
    ],
    bundles=[[1], [2], [1, 2], [2, 3]],
)
ONE, TWO, ONE_TWO, TWO_THREE = 1, 2, 3, 4  # positions of the bundles in the preference lists


def put(budget: int, catalog: Catalog = CATALOG, **kw: Any) -> CampaignUpdate:
    return CampaignUpdate(replace=True, budget=budget, coupons=catalog.costs, catalog=catalog, **kw)


async def decide(
    store: StateStore,
    prefs: list[list[int]],
    *,
    now: int = NOW,
    expiry_ms: int = DAY_MS,
    draws: list[float | None] | None = None,
    rate: float = 0.0,
    catalog: Catalog = CATALOG,
    row: bytes = b"",
) -> ReserveResult:
    """Users u0, u1, ... with these preferences (bundle positions) and features `row`, in one request."""
    items = [
        ReserveItem(f"u{i}", None, p, row, explore_draw=None if draws is None else draws[i])
        for i, p in enumerate(prefs)
    ]
    return await store.reserve(
        "c",
        ReserveBatch.of(items, bundles=[b.key for b in catalog.bundles]),
        model_version="v1",
        lam=0.25,
        now_ms=now,
        reservation_expiry_ms=expiry_ms,
        decision_ttl_ms=30 * DAY_MS,
        exploration_rate=rate,
    )


async def ledger(store: StateStore) -> dict[str, int]:
    """The campaign hash's integer fields (the ledger, per-coupon counters, stock used)."""
    client = await store.client()
    raw = cast(dict[bytes, bytes], await client.hgetall(store.keys.campaign_key("c")))
    return {name.decode(): int(value) for name, value in raw.items() if value.lstrip(b"-").isdigit()}


async def record(store: StateStore, decision_id: str) -> dict[str, str]:
    _, batch, index = decision_id.split("-")
    client = await store.client()
    raw = await client.hget(store.keys.batch_key("c", batch), index)
    assert isinstance(raw, bytes)
    return parse_decision_record(raw)


def test_a_bundle_is_reserved_whole_or_not_at_all(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(600))
        # 1+2 reserves 2.00 + 5.00 (the percent coupon's cap): over the 6.00 budget, so the next preference
        (first,) = (await decide(store, [[ONE_TWO, ONE, 0]])).decisions
        assert (first.action, first.cost, first.downgraded) == (1, 200, True)
        assert (await ledger(store))["reserved"] == 200
        assert "used:2" not in await ledger(store)  # the refused bundle took no stock

        await store.upsert_campaign("c", put(100_000))
        result = await decide(store, [[ONE_TWO, 0]])
        assert (result.actions, result.costs, result.components) == ([1_000_003], [700], [[(1, 200), (2, 500)]])
        # stock: 3 has one unit. In one request, A takes 2+3; B's 2+3 is out of stock, so B takes 2 alone
        result = await decide(store, [[TWO_THREE, 0], [TWO_THREE, TWO, 0]])
        assert result.actions == [1_000_004, 2] and result.components == [[(2, 500), (3, 1000)], [(2, 500)]]
        assert result.downgraded == [False, True]
        # every unit of 2 is held now: neither 2 alone nor a bundle with it; 1 alone still fits
        result = await decide(store, [[TWO_THREE, TWO, ONE_TWO, 0], [ONE_TWO, ONE, 0]])
        assert result.actions == [0, 1] and result.components == [[], [(1, 200)]]
        state = await ledger(store)
        assert (state["used:2"], state["used:3"], "used:1" in state) == (3, 1, False)
        assert state["reserved"] == state["outstanding_face"] == 200 + 700 + 1500 + 500 + 200
        campaign = await store.get_campaign("c")
        assert campaign is not None and campaign.stock_used == {2: 3, 3: 1}
        assert campaign.settings.catalog == CATALOG

    run(scenario)


def test_each_coupon_of_a_bundle_settles_on_its_own_exact_to_the_cent(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(100_000))
        both, other, alone = (await decide(store, [[ONE_TWO, 0], [TWO_THREE, 0], [ONE, 0]])).decisions
        before = await ledger(store)
        assert before["reserved"] == 700 + 1500 + 200 and before["used:2"] == 2

        # refused, every outcome of the request with it: a coupon above its own cost, a coupon the decision
        # did not grant, a bundle's cost without the split
        refusals = [
            (Outcome(other.decision_id, 1.0, 1002, [(2, 1), (3, 1001)]), CostAboveReservation),
            (Outcome(other.decision_id, 1.0, 501, [(2, 501)]), CostAboveReservation),
            (Outcome(other.decision_id, 1.0, 100, [(1, 100)]), CouponCostsRefused),
            (Outcome(other.decision_id, 1.0, 300), CouponCostsRefused),
            (Outcome(alone.decision_id, 1.0, 201), CostAboveReservation),
        ]
        for bad, error in refusals:
            good = Outcome(alone.decision_id, 1.0, 200)
            with pytest.raises(error) as caught:
                await store.settle("c", [good, bad])
            assert getattr(caught.value, "index", None) == 1
        assert await ledger(store) == before

        # one coupon redeemed (1.99 of its 2.00), the other not: its unit of stock comes back
        settled = await store.settle("c", [Outcome(both.decision_id, 12.5, 199, [(1, 199)])])
        assert settled.accepted == 1
        state = await ledger(store)
        assert state["spent"] == 199 and state["reserved"] == before["reserved"] - 700
        assert state["outstanding_face"] == before["outstanding_face"] - 700
        assert (state["realised:1"], state["realised:2"], state["issued:1"], state["issued:2"]) == (199, 0, 200, 500)
        assert state["used:2"] == before["used:2"] - 1

        # both redeemed in full; the bundle's record keeps its coupons
        await store.settle("c", [Outcome(other.decision_id, 40.0, 1500, [(3, 1000), (2, 500)])])
        state = await ledger(store)
        assert (state["spent"], state["reserved"]) == (199 + 1500, 200)
        assert (state["realised:2"], state["realised:3"], state["used:2"], state["used:3"]) == (500, 1000, 1, 1)
        assert (await record(store, other.decision_id))["status"] == "S"
        again = await store.settle("c", [Outcome(other.decision_id, 40.0, 1500, [(3, 1000), (2, 500)])])
        assert (again.accepted, again.duplicates) == (0, 1)

        # a single coupon settles with its cost alone, as without a catalog
        await store.settle("c", [Outcome(alone.decision_id, 3.0, 150)])
        state = await ledger(store)
        assert (state["spent"], state["reserved"], state["outstanding_face"]) == (1849, 0, 0)
        assert state["budget"] - state["spent"] - state["reserved"] == 100_000 - 1849

    run(scenario)


def test_a_bundle_unused_at_cost_0_returns_its_stock(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(100_000))
        (granted,) = (await decide(store, [[TWO_THREE, 0]])).decisions
        assert (await ledger(store))["used:3"] == 1
        assert (await decide(store, [[TWO_THREE, 0]])).actions == [0]  # 3's one unit is held
        await store.settle("c", [Outcome(granted.decision_id, 0.0, 0)])  # no split needed for nothing spent
        state = await ledger(store)
        assert (state["used:2"], state["used:3"], state["spent"], state["reserved"]) == (0, 0, 0, 0)
        assert (await decide(store, [[TWO_THREE, 0]])).actions == [1_000_004]

    run(scenario)


def test_expiry_releases_a_bundle_and_returns_its_stock(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(100_000))
        (granted,) = (await decide(store, [[TWO_THREE, 0]], expiry_ms=1_000)).decisions
        (kept,) = (await decide(store, [[ONE_TWO, 0]])).decisions
        assert await store.sweep_expired("c", now_ms=NOW + 1_000) == 1
        state = await ledger(store)
        assert (state["used:2"], state["used:3"], state["reserved"], state["outstanding_face"]) == (1, 0, 700, 700)
        assert (state["issued:2"], state["issued:3"], state["outstanding_predicted"]) == (500, 1000, 700)
        assert (await record(store, granted.decision_id))["status"] == "X"
        # redeemed after its unit was returned: charged where it fits, and the unit is taken again
        await store.settle("c", [Outcome(granted.decision_id, 9.0, 1500, [(2, 500), (3, 1000)])])
        state = await ledger(store)
        assert (state["spent"], state["overrun"], state["used:2"], state["used:3"]) == (1500, 0, 2, 1)
        assert (await record(store, kept.decision_id))["status"] == "R"

    run(scenario)


def test_exploration_draws_among_the_bundles_that_fit(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(100_000, exploration_rate=0.5))
        # candidates by action: none, 1, 2, 1+2 (1000003), 2+3 (1000004): k = 5; the draw 0.9 takes the fifth
        result = await decide(store, [[ONE, 0]], draws=[0.9], rate=0.5)
        assert result.actions == [1_000_004] and result.components == [[(2, 500), (3, 1000)]]
        assert (await record(store, result.decision_ids[0]))["probability"] == "0.1/x"
        # 3 is out of stock now: k = 4, and 0.9 takes 1+2
        result = await decide(store, [[ONE, 0]], draws=[0.9], rate=0.5)
        assert result.actions == [1_000_003]
        assert (await record(store, result.decision_ids[0]))["probability"] == "0.125/x"

    run(scenario)


def test_a_campaign_changed_to_a_catalog_between_ranking_and_reservation(run: Run) -> None:
    """A request ranked against one version of the campaign is reserved against the version the script
    reads: bundles are named by their coupons, so a changed catalog never grants another bundle."""

    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", CampaignUpdate(replace=True, budget=100_000, coupons={1: 200, 2: 500}))
        # ranked as a catalog request (bundle keys) against a campaign without one: coupons alone are offered
        result = await decide(store, [[ONE_TWO, TWO, 0]])
        assert (result.actions, result.components) == ([2], [[(2, 500)]])
        # ranked as a campaign without a catalog against one with a catalog whose bundles moved
        moved = Catalog.parse(
            [{"action": 1, "cost": 2.0}, {"action": 2, "cost": 5.0}], bundles=[[1, 2], [2]], max_per_bundle=2
        )
        await store.upsert_campaign("c", put(100_000, moved))
        legacy = await store.reserve(
            "c",
            [ReserveItem("v", None, [1, 2, 0])],
            model_version="v1",
            lam=0.25,
            now_ms=NOW,
            reservation_expiry_ms=DAY_MS,
            decision_ttl_ms=DAY_MS,
        )
        assert legacy.actions == [2]  # 1 alone is not an allowed bundle any more
        result = await decide(store, [[ONE, 0], [TWO, 0]], catalog=moved)
        assert result.actions == [1_000_001, 2] and result.components == [[(1, 200), (2, 500)], [(2, 500)]]

    run(scenario)


def test_the_export_carries_the_bundle_and_its_coupons(run: Run, tmp_path: Path) -> None:
    """`saco export`'s partitions: every decision and outcome with its coupons and their costs (a campaign
    without a catalog's too); training reads a bundle of several coupons as its dearest coupon."""

    async def scenario(store: StateStore) -> None:
        row = struct.pack("<f", 0.5)
        await store.upsert_campaign("c", put(100_000))
        bundle, single, nothing = (await decide(store, [[TWO_THREE, 0], [ONE, 0], [0]], row=row)).decisions
        await store.settle("c", [Outcome(bundle.decision_id, 30.0, 1000, [(3, 1000)])], now_ms=NOW + 1)
        # a campaign without a catalog beside it
        await store.upsert_campaign("plain", CampaignUpdate(replace=True, budget=10_000, coupons={2: 500}))
        await store.reserve(
            "plain",
            [ReserveItem("p", None, [2, 0], row)],
            model_version="v1",
            lam=0.25,
            now_ms=NOW,
            reservation_expiry_ms=DAY_MS,
            decision_ttl_ms=DAY_MS,
        )
        export_logs(store.url, tmp_path, prefix=store.prefix)
        decisions = read_partitions(tmp_path, "decisions", "c").sort_by("decision_id").to_pylist()
        by_id = {d["decision_id"]: d for d in decisions}
        assert (by_id[bundle.decision_id]["action"], by_id[bundle.decision_id]["cost"]) == (1_000_004, 15.0)
        assert by_id[bundle.decision_id]["coupons"] == [2, 3]
        assert by_id[bundle.decision_id]["coupon_costs"] == [5.0, 10.0]
        assert (by_id[single.decision_id]["coupons"], by_id[single.decision_id]["coupon_costs"]) == ([1], [2.0])
        assert (by_id[nothing.decision_id]["coupons"], by_id[nothing.decision_id]["coupon_costs"]) == ([], [])
        (outcome,) = read_partitions(tmp_path, "outcomes", "c").to_pylist()
        assert (outcome["coupons"], outcome["coupon_costs"], outcome["cost"]) == ([2, 3], [0.0, 10.0], 10.0)
        (plain,) = read_partitions(tmp_path, "decisions", "plain").to_pylist()
        assert (plain["action"], plain["coupons"], plain["coupon_costs"]) == (2, [2], [5.0])
        joined, _ = joined_decisions(tmp_path, campaigns=["c"])
        actions = dict(zip(joined.column("decision_id").to_pylist(), joined.column("action").to_pylist(), strict=True))
        assert actions == {bundle.decision_id: 3, single.decision_id: 1, nothing.decision_id: 0}

    run(scenario)


def test_expected_mode_reserves_a_bundle_at_its_coupons_expected_costs(run: Run) -> None:
    """In expected mode each coupon of a bundle reserves its own expected cost (the model's, corrected by
    that coupon's realised / predicted ratio); settling corrects each coupon's ratio on its own."""

    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(100_000, reservation_mode="expected"))
        expected = [0, 50, 120, 300]  # cents, by action
        item = ReserveItem("u", None, [ONE_TWO, 0], expected_costs=expected)

        async def reserve_expected(*users: str) -> ReserveResult:
            items = [item._replace(user_id=user) for user in users]
            return await store.reserve(
                "c", ReserveBatch.of(items, bundles=[b.key for b in CATALOG.bundles]), model_version="v1", lam=0.25,
                now_ms=NOW, reservation_expiry_ms=DAY_MS, decision_ttl_ms=DAY_MS, prior_coupons=1,
            )  # fmt: skip

        first, _ = (await reserve_expected("u", "v")).decisions
        assert first.cost == 700  # the answer is the bundle's cost: its coupons' worst cases
        state = await ledger(store)
        assert state["reserved"] == state["outstanding_predicted"] == 2 * (50 + 120)
        assert state["outstanding_face"] == 2 * 700
        parts = (await record(store, first.decision_id))["parts"]
        assert [p.split(",")[:3] for p in parts.split(";")] == [["1", "50", "200"], ["2", "120", "500"]]
        # coupon 1 redeemed at its full 2.00 (4x its prediction), coupon 2 not at all
        await store.settle("c", [Outcome(first.decision_id, 10.0, 200, [(1, 200)])])
        state = await ledger(store)
        assert (state["issued:1"], state["realised:1"], state["issued:2"], state["realised:2"]) == (50, 200, 120, 0)
        assert state["reserved"] == 50 + 120
        # with one coupon at its cost as the prior, the ratios are (200 + 200) / (50 + 200) = 1.6 for coupon 1
        # and (0 + 500) / (120 + 500) for coupon 2: they reserve ceil(1.6 x 50) = 80 and ceil(0.806 x 120) = 97
        (third,) = (await reserve_expected("w")).decisions
        parts = (await record(store, third.decision_id))["parts"]
        assert [p.split(",")[:3] for p in parts.split(";")] == [["1", "80", "200"], ["2", "97", "500"]]
        assert (await ledger(store))["reserved"] == 50 + 120 + 80 + 97

    run(scenario)
