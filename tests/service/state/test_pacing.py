"""Online pacing in the store (pace.lua): dual descent on lambda toward the spend plan, one step per
interval across replicas; on every kind of store."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Run, item, put, reserve

from service.state import CampaignUpdate, Outcome
from service.state.store import StateStore

STEP: dict[str, Any] = {"interval_ms": 1_000, "start_lambda": 1.0, "step": 10.0, "max_step": 0.5, "lambda_max": 5.0}


async def pace(store: StateStore, now: int, campaign: str = "c", prior: int = 0, **kw: Any) -> Any:
    return await store.pace(campaign, now_ms=now, prior=prior, **{**STEP, **kw})


def test_a_time_plan_moves_lambda_by_the_excess_spend_of_each_step(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000, starts_ms=0, ends_ms=100_000, coupons={1: 500}))
        assert await pace(store, 10_000) == (1.0, 1_000, 0, True)  # the first step starts from the given lambda
        assert await pace(store, 10_500) == (1.0, 1_050, 0, False)  # within the interval: no step
        # 40.00 reserved, at 35 s on the plan's clock (within the 35% of the budget its time allows, plus the lead)
        decided = await reserve(store, "c", [item(f"u{i}", [1, 0]) for i in range(8)], now=35_000)
        ids = [d.decision_id for d in decided.decisions]
        await store.settle("c", [Outcome(ids[0], 1.0, 500), Outcome(ids[1], 0.0, 0)])  # ratio 1/2
        # spend = 5.00 realised + 30.00 outstanding x 0.5 = 20.00 (+20.00 since the last step), the plan
        # +10.00: excess 10.00 = 0.1 of the budget -> lambda + 1.0, bounded to +0.5 a step
        assert await pace(store, 20_000) == (1.5, 2_000, 2_000, True)
        # at 30 s the plan is 30.00 (+10.00), spend still 20.00: excess -0.1 -> lambda - 0.5 (bounded)
        assert await pace(store, 30_000) == (1.0, 3_000, 2_000, True)
        assert await pace(store, 40_000, max_step=5.0) == (0.0, 4_000, 2_000, True)  # never below 0
        campaign = await store.get_campaign("c")
        assert campaign is not None and campaign.pacing.lam == 0.0 and campaign.pacing.plan == 4_000
        config, _ = await store.load_for_decision("c", [])
        assert config is not None and config.paced is not None and config.paced.lam == 0.0  # what decisions read

    run(scenario)


def test_a_traffic_plan_follows_the_decisions(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(20_000, expected_decisions=100, coupons={1: 1_000}))
        assert await pace(store, 0) == (1.0, 0, 0, True)
        await reserve(store, "c", [item(f"u{i}", [1, 0]) for i in range(10)])  # 10 decisions, all 10.00
        # plan 10% = 20.00; spend 100.00 reserved at ratio 1 (nothing settled): excess 0.4 -> +0.5 (bounded)
        assert await pace(store, 1_000) == (1.5, 2_000, 10_000, True)
        # no new excess, but the 0.35 the bound held back is carried: +0.5 again
        assert await pace(store, 2_000) == (2.0, 2_000, 10_000, True)
        await reserve(store, "c", [item(f"v{i}", [1, 0]) for i in range(10)])
        assert await pace(store, 3_000, lambda_max=2.2, max_step=5.0) == (2.2, 4_000, 20_000, True)

    run(scenario)


def test_a_share_of_the_traffic_or_the_budget_steps_before_the_interval_once_across_callers(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(1_000_000, expected_decisions=100, coupons={1: 1_000}))
        traffic = {"step_share": 0.05}  # a step after 5 decisions or 500.00 of spend, within the 1 s interval
        assert (await pace(store, 0, **traffic))[3]
        await reserve(store, "c", [item(f"u{i}", [0]) for i in range(4)])
        assert not (await pace(store, 10, **traffic))[3]  # 4 decisions: not yet
        await reserve(store, "c", [item("u4", [0])])
        assert not (await pace(store, 20))[3]  # without a share, the interval alone
        # callers asking together (replicas): the first steps, the others find nothing due
        stepped = [(await pace(store, 30 + k, **traffic))[3] for k in range(3)]
        assert stepped == [True, False, False]
        await store.upsert_campaign("b", put(10_000, expected_decisions=1_000_000, coupons={1: 1_000}))
        assert (await pace(store, 0, "b", **traffic))[3]
        await reserve(store, "b", [item("u0", [1, 0])])  # 10.00 of 100.00 reserved: spend past the share
        assert (await pace(store, 10, "b", **traffic))[3]

    run(scenario)


def test_a_bounded_step_carries_the_rest_of_the_error_and_the_clip_at_zero_does_not(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000, expected_decisions=100, coupons={1: 1_000}))
        assert await pace(store, 0) == (1.0, 0, 0, True)
        await reserve(store, "c", [item(f"u{i}", [1, 0]) for i in range(2)])  # plan 2.00, spend 20.00
        # excess 0.18 of the budget -> +1.8 wanted, +0.5 a step: four steps take it (0.5, 0.5, 0.5, 0.3)
        lambdas = [(await pace(store, 1_000 * k))[0] for k in range(1, 6)]
        assert lambdas == pytest.approx([1.5, 2.0, 2.5, 2.8, 2.8])
        await store.upsert_campaign("d", put(10_000, expected_decisions=10, coupons={1: 1_000}))
        assert await pace(store, 0, "d") == (1.0, 0, 0, True)
        await reserve(store, "d", [item(f"u{i}", [0]) for i in range(10)])  # plan 100.00, no spend
        assert (await pace(store, 1_000, "d"))[0] == 0.5  # excess -1.0: -10 wanted, -0.5 a step
        assert (await pace(store, 2_000, "d"))[0] == 0.0  # the carried -9.5 hits the clip at 0 ...
        await reserve(store, "d", [item("big", [1, 0])])  # ... and is dropped there: an excess of +0.1
        assert (await pace(store, 3_000, "d"))[0] == 0.5  # moves lambda up at once (no wind-up)

    run(scenario)


def test_the_prior_keeps_outstanding_spend_cautious_until_outcomes_arrive(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(100_000, expected_decisions=1_000, coupons={1: 1_000}))
        decided = await reserve(store, "c", [item(f"u{i}", [1, 0]) for i in range(4)])
        await store.settle("c", [Outcome(decided.decisions[0].decision_id, 0.0, 0)])  # one of four, not redeemed
        _, _, without_prior, _ = await pace(store, 0, prior=0)  # ratio 0: outstanding counts for nothing
        await store.upsert_campaign("c", CampaignUpdate(replace=False, admin_lambda=2.0))  # restarts pacing
        lam, _, with_prior, _ = await pace(store, 0, prior=1_000, start_lambda=2.0)  # ratio 1,000 / 2,000
        assert (without_prior, with_prior, lam) == (0, 1_500, 2.0)

    run(scenario)


def test_a_new_admin_lambda_is_where_pacing_goes_on_from_and_a_put_restarts_it(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000, expected_decisions=10))
        await pace(store, 0)
        config, _ = await store.load_for_decision("c", [])
        assert config is not None and config.paced is not None and config.paced.lam == 1.0
        await store.upsert_campaign("c", CampaignUpdate(replace=False, budget=20_000))  # pacing goes on
        config, _ = await store.load_for_decision("c", [])
        assert config is not None and config.paced is not None and config.paced.lam == 1.0
        await store.upsert_campaign("c", CampaignUpdate(replace=False, admin_lambda=3.0))
        config, _ = await store.load_for_decision("c", [])  # pacing goes on from the new lambda
        assert config is not None and config.paced is not None and config.paced.lam == 3.0
        assert (await pace(store, 1_000, start_lambda=0.5))[0] == 3.0  # no excess spend: no change
        await store.upsert_campaign("c", CampaignUpdate(replace=False, cleared=frozenset({"admin_lambda"})))
        config, _ = await store.load_for_decision("c", [])  # back to the lambda it starts from
        assert config is not None and config.paced is None
        await store.upsert_campaign("c", put(10_000, expected_decisions=10))
        config, _ = await store.load_for_decision("c", [])
        assert config is not None and config.paced is None

    run(scenario)


@pytest.mark.parametrize("missing", ["nope"])
def test_pacing_an_unknown_campaign(run: Run, missing: str) -> None:
    async def scenario(store: StateStore) -> None:
        assert await pace(store, 0, campaign=missing) is None

    run(scenario)


def test_each_step_leaves_the_allowance_per_decision_and_the_cost_ratios(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000, expected_decisions=100, coupons={1: 1_000}))
        decided = await reserve(store, "c", [item(f"u{i}", [1, 0]) for i in range(4)])  # 40.00 reserved
        await store.settle("c", [Outcome(decided.decisions[0].decision_id, 1.0, 1_000)])  # predicted 1,000 each
        await pace(store, 0, prior=0, prior_coupons=2)
        campaign = await store.get_campaign("c")
        assert campaign is not None and campaign.paced is not None
        # spend: 10.00 realised + 30.00 outstanding at the realised / reserved ratio 1 = 40.00; 96 decisions left
        assert campaign.paced.allowance == pytest.approx((10_000 - 4_000) / 96)
        assert campaign.paced.ratios == {1: 1.0}  # (1,000 + 2 x 1,000) / (1,000 + 2 x 1,000)
        await store.upsert_campaign("t", put(10_000, starts_ms=0, ends_ms=100_000, coupons={1: 1_000}))
        await reserve(store, "t", [item(f"u{i}", [0]) for i in range(5)])
        await pace(store, 10_000, "t")  # 5 decisions in 10 s: 45 more expected in the 90 s left
        campaign = await store.get_campaign("t")
        assert campaign is not None and campaign.paced is not None
        assert campaign.paced.allowance == pytest.approx(10_000 / 45)

    run(scenario)
