"""Reservation modes (reserve.lua): strict reserves each coupon's cost; expected reserves its expected cost
plus a Bernstein margin over the outstanding coupons, so realised spend exceeds the budget with
probability at most the campaign's overspend_risk. On every kind of store."""

from __future__ import annotations

import math
import random

import pytest
from conftest import Run, item, put

from service.state import CampaignUpdate, Outcome, ReserveItem
from service.state.store import StateStore, parse_decision_record


async def reserve(store: StateStore, campaign: str, users: list[str], prior: int = 1) -> list[tuple[str, int, int]]:
    result = await store.reserve(
        campaign,
        [item(u, [1, 0]) for u in users],
        model_version="v",
        lam=0.0,
        now_ms=0,
        reservation_expiry_ms=10**9,
        decision_ttl_ms=10**9,
        prior_coupons=prior,
    )
    return [(d.decision_id, d.action, d.cost) for d in result.decisions]


async def learn_ratio(store: StateStore, campaign: str, redeemed: int, issued: int) -> None:
    """`issued` coupons settled, `redeemed` of them at their cost: the campaign's realised / issued ratio."""
    decided = await reserve(store, campaign, [f"h{i}" for i in range(issued)])
    outcomes = [Outcome(d, 1.0, cost if i < redeemed else 0) for i, (d, _, cost) in enumerate(decided)]
    await store.settle(campaign, outcomes)


def margin(variance: float, dearest: int, risk: float) -> float:
    if variance <= 0:
        return 0.0
    log_risk, third = math.log(1 / risk), dearest * math.log(1 / risk) / 3
    return third + math.sqrt(third * third + 2 * variance * log_risk)


def test_expected_mode_reserves_expected_costs_with_a_margin(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        update = put(100_000, {1: 1_000}, reservation_mode="expected", overspend_risk=0.05)
        await store.upsert_campaign("c", update)
        await learn_ratio(store, "c", redeemed=2, issued=10)  # ratio (2 + 1 prior) / (10 + 1) = 3 / 11
        ratio = 3 / 11
        state = await store.get_campaign("c")
        assert state is not None and (state.spent, state.reserved) == (2_000, 0)
        decided = await reserve(store, "c", [f"u{i}" for i in range(400)])
        granted = sum(1 for _, action, _ in decided if action == 1)
        assert all(cost == 1_000 for _, action, cost in decided if action == 1)  # decisions show the coupon's cost
        each, variance = math.ceil(ratio * 1_000), 1_000**2 * ratio * (1 - ratio)
        fits = [n for n in range(1, 401) if 2_000 + n * each + margin(n * variance, 1_000, 0.05) <= 100_000]
        assert granted == max(fits) and granted > 98  # strict would stop at 98 coupons
        state = await store.get_campaign("c")
        assert state is not None and state.reserved == granted * each

    run(scenario)


def test_expected_mode_starts_as_strict_until_outcomes_arrive(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000, {1: 1_000}, reservation_mode="expected"))
        decided = await reserve(store, "c", [f"u{i}" for i in range(20)], prior=5)
        assert sum(1 for _, action, _ in decided if action) == 10  # ratio 1, no variance: the cost each

    run(scenario)


def test_a_strict_campaign_never_overspends_and_a_switch_to_expected_takes_effect(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000, {1: 1_000}))
        await learn_ratio(store, "c", redeemed=0, issued=5)  # 5 coupons reserved then released at no cost
        decided = await reserve(store, "c", [f"u{i}" for i in range(20)])
        assert sum(1 for _, action, _ in decided if action) == 10
        await store.upsert_campaign("c", CampaignUpdate(replace=False, reservation_mode="expected"))
        more = await reserve(store, "c", [f"v{i}" for i in range(20)])
        assert sum(1 for _, action, _ in more if action) == 0  # the 10 strict reservations hold the budget

    run(scenario)


def test_overspend_stays_within_the_risk_over_many_campaigns(run: Run) -> None:
    """200 campaigns whose coupons are redeemed with probability p (known to each campaign from its
    history), filled to what expected mode admits, then the outcomes drawn: the share of campaigns whose
    realised spend exceeds the budget stays within the risk, and they spend far more than strict mode."""
    risk, p, campaigns = 0.05, 0.2, 200
    rng = random.Random(7)

    async def scenario(store: StateStore) -> tuple[int, list[float]]:
        overspent, rates = 0, []
        for k in range(campaigns):
            cid = f"m{k}"
            await store.upsert_campaign(cid, put(10**9, {1: 1_000}, reservation_mode="expected", overspend_risk=risk))
            await learn_ratio(store, cid, redeemed=int(p * 500), issued=500)
            state = await store.get_campaign(cid)
            assert state is not None
            base = state.spent
            await store.upsert_campaign(cid, CampaignUpdate(replace=False, budget=base + 50_000))
            decided = await reserve(store, cid, [f"u{i}" for i in range(1_000)], prior=0)
            granted = [d for d, action, _ in decided if action]
            outcomes = [Outcome(d, 1.0, 1_000 if rng.random() < p else 0) for d in granted]
            await store.settle(cid, outcomes)
            state = await store.get_campaign(cid)
            assert state is not None and state.reserved == 0
            overspent += state.spent > state.budget
            rates.append((state.spent - base) / 50_000)
        return overspent, rates

    overspent, rates = run(scenario)
    assert overspent <= risk * campaigns
    # all ~250 coupons outstanding at once: the margin (~1/3 of the budget here) is what the guarantee costs;
    # strict mode would have spent 0.2 of the budget (50 coupons reserved at their full cost)
    assert sorted(rates)[campaigns // 2] > 0.65


async def reserve_predicted(
    store: StateStore, campaign: str, predicted: dict[str, int], prior: int = 0
) -> list[tuple[str, str, int]]:
    """Each user offered coupon 1 with the model's expected cost `predicted[user]` (cents): (decision id,
    user, action) per user."""
    items = [ReserveItem(user, None, [1, 0], expected_costs=[0, cents]) for user, cents in predicted.items()]
    result = await store.reserve(
        campaign,
        items,
        model_version="v",
        lam=0.0,
        now_ms=0,
        reservation_expiry_ms=10**9,
        decision_ttl_ms=10**9,
        prior_coupons=prior,
    )
    return [(d.decision_id, d.user_id, d.action) for d in result.decisions]


def test_expected_mode_reserves_each_users_predicted_cost_corrected_by_what_was_realised(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(1_000_000, {1: 1_000}, reservation_mode="expected"))
        decided = await reserve_predicted(store, "c", {"low": 100, "high": 900}, prior=10)
        state = await store.get_campaign("c")
        assert state is not None and state.reserved == 1_000  # no outcome yet: the predictions as they are
        client = await store.client()
        records = {}
        for decision_id, user, _ in decided:
            batch, index = decision_id[2:].rsplit("-", 1)
            records[user] = parse_decision_record(await client.hget(store.keys.batch_key("c", batch), index))
        assert (records["low"]["reserved"], records["low"]["predicted"], records["low"]["coupon_cost"]) == (
            "100",
            "100",
            "1000",
        )
        # the model predicts half of what is realised: 20 coupons predicted at 100 each, redeemed 4 times
        history = await reserve_predicted(store, "c", {f"h{i}": 100 for i in range(20)})
        await store.settle("c", [Outcome(d, 1.0, 1_000 if i < 4 else 0) for i, (d, _, _) in enumerate(history)])
        # ratio = (4,000 realised + 10 x 1,000 prior) / (2,000 predicted + 10,000 prior) = 14 / 12
        more = await reserve_predicted(store, "c", {"next": 300, "dear": 990}, prior=10)
        assert [a for _, _, a in more] == [1, 1]
        state = await store.get_campaign("c")
        assert state is not None and state.reserved == 1_000 + math.ceil(300 * 14 / 12) + 1_000  # at most the cost

    run(scenario)


@pytest.mark.parametrize("bias", [0.8, 1.2])
def test_overspend_stays_within_the_risk_with_biased_per_user_predictions(run: Run, bias: float) -> None:
    """200 campaigns whose users redeem with their own probability p_u (from 0.05 to 0.5), predicted by a
    model biased by `bias` (its expected costs are bias x the truth): the realised / predicted ratio learnt
    from 500 settled coupons corrects the bias, and the share of campaigns that overspend stays within the
    risk."""
    risk, campaigns, face = 0.05, 200, 1_000
    rng = random.Random(11 if bias < 1 else 13)

    async def scenario(store: StateStore) -> tuple[int, list[float]]:
        overspent, rates = 0, []
        for k in range(campaigns):
            cid = f"b{k}"
            await store.upsert_campaign(cid, put(10**9, {1: face}, reservation_mode="expected", overspend_risk=risk))
            truth = {f"h{i}": rng.uniform(0.05, 0.5) for i in range(500)}
            history = await reserve_predicted(store, cid, {u: round(bias * p * face) for u, p in truth.items()})
            await store.settle(cid, [Outcome(d, 1.0, face if rng.random() < truth[u] else 0) for d, u, _ in history])
            state = await store.get_campaign(cid)
            assert state is not None
            base = state.spent
            await store.upsert_campaign(cid, CampaignUpdate(replace=False, budget=base + 50_000))
            truth = {f"u{i}": rng.uniform(0.05, 0.5) for i in range(1_000)}
            decided = await reserve_predicted(store, cid, {u: round(bias * p * face) for u, p in truth.items()})
            outcomes = [Outcome(d, 1.0, face if rng.random() < truth[u] else 0) for d, u, a in decided if a]
            await store.settle(cid, outcomes)
            state = await store.get_campaign(cid)
            assert state is not None and state.reserved == 0
            overspent += state.spent > state.budget
            rates.append((state.spent - base) / 50_000)
        return overspent, rates

    overspent, rates = run(scenario)
    assert overspent <= risk * campaigns
    assert sorted(rates)[campaigns // 2] > 0.6


@pytest.mark.parametrize("mode", ["strict", "expected"])
def test_predicted_costs_the_ledger_cannot_settle_are_bounded_to_the_coupons_cost(run: Run, mode: str) -> None:
    """Whatever the caller sends as expected costs (the int64 a NaN becomes, a negative, zero, more than the
    coupon's cost), every record holds a prediction and a reservation within [1 cent, the coupon's cost],
    and settles and expires as any other."""

    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(1_000_000, {1: 1_000}, reservation_mode=mode))
        predicted = {"nan": -(2**63), "negative": -5, "zero": 0, "huge": 2**62}
        decided = await reserve_predicted(store, "c", predicted)
        client = await store.client()
        for decision_id, _, action in decided:
            assert action == 1
            batch, index = decision_id[2:].rsplit("-", 1)
            record = parse_decision_record(await client.hget(store.keys.batch_key("c", batch), index))
            assert 1 <= int(record["reserved"]) <= 1_000 and 1 <= int(record["predicted"]) <= 1_000
        state = await store.get_campaign("c")
        assert state is not None and 4 <= state.reserved <= 4_000 and state.outstanding == 4_000
        settled = await store.settle("c", [Outcome(decided[0][0], 1.0, 1_000), Outcome(decided[1][0], 0.0, 0)])
        assert settled.accepted == 2
        assert await store.sweep_expired("c", 10**10) == 2  # the other two expire
        state = await store.get_campaign("c")
        assert state is not None and (state.spent, state.reserved, state.outstanding) == (1_000, 0, 0)

    run(scenario)
