"""The decision helpers: right-aligned inputs from stored contexts, masking and priority."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from contract.ranking import preferences
from model_store import ModelStore
from service.app import create_app
from service.decisions import Decisions
from service.lambdas import plan_lambda
from service.schemas import CampaignPut, DecisionsRequest, OutcomesRequest
from service.scoring import ScoreTerms, build_inputs
from service.settings import Settings
from service.state import CampaignConfig, CampaignSettings, PacedState
from service.state.context import append_step, apply_outcome, decode_context, empty_context, new_step_bytes


def test_build_inputs_right_aligns_each_users_context(model_store_dir: Path) -> None:
    m = ModelStore(model_store_dir).load().manifest
    dim, capacity = m.feature_dim, m.context_length - 1
    initial = empty_context(dim)
    context = None
    for n in range(capacity + 3):  # more steps than fit: the oldest fall out
        step = new_step_bytes(f"d-{n}", n % m.num_actions, np.full(dim, n, "<f4").tobytes())
        context = append_step(context, step, capacity, initial)
    assert context is not None
    context = apply_outcome(context, f"d-{capacity + 1}", 150, 25)
    assert context is not None
    short = append_step(None, new_step_bytes("d-v", 1, np.full(dim, 7, "<f4").tobytes()), capacity, initial)
    current = np.arange(3 * dim, dtype=np.float32).reshape(3, dim)
    inputs = build_inputs(m, current, [context, short, None], lam=0.4)
    length = capacity + 1
    assert inputs.states.shape == (3, length, dim)
    np.testing.assert_array_equal(inputs.states[:, -1], current)
    assert inputs.mask[0].all() and inputs.mask[1].tolist() == [False] * (length - 2) + [True, True]
    assert inputs.mask[2].tolist() == [False] * (length - 1) + [True]
    assert inputs.states[0, 0, 0] == 3 and inputs.states[0, -2, 0] == capacity + 2
    assert inputs.timesteps[0].tolist() == list(range(3, capacity + 4))
    assert inputs.timesteps[1, -2:].tolist() == [0, 1] and inputs.timesteps[2, -1] == 0
    assert inputs.rtg[0, -1] == np.float32(m.initial_rtg - 1.5) and inputs.rtg[2, -1] == np.float32(m.initial_rtg)
    # the steps up to the one with the outcome were before it; the step after it was not
    assert inputs.rtg[0, :-2].tolist() == [np.float32(m.initial_rtg)] * (length - 2)
    assert inputs.ctg[0, -2:].tolist() == [np.float32(m.initial_ctg - 0.25)] * 2
    assert inputs.actions[1, -2] == 1 and inputs.states[1, -2, 0] == 7
    assert inputs.lam.tolist() == [np.float32(0.4)] * 3


def test_preferences_mask_unoffered_and_cut_after_no_coupon() -> None:
    scores = np.array(
        [
            [0.0, 3.0, 2.0, 1.0],  # best: 1 (not offered) -> 2, 3, then 0
            [1.0, 0.5, 2.0, 0.9],  # 2, then 0: 3 is below "no coupon"
            [5.0, 1.0, 2.0, 3.0],
        ],
        np.float32,
    )  # no coupon preferred
    prefs, priority = preferences(scores, [2, 3])
    assert prefs == [[2, 3, 0], [2, 0], [0]]
    assert priority.tolist() == [0, 1, 2]  # gain 2.0, 1.0, 0.0


def test_context_writes_behind_the_answer_are_seen_by_the_next_call(model_store_dir: Path, tmp_path: Path) -> None:
    """The step is appended after the answer; a decision or outcome right after it still sees it."""
    settings = Settings(store=str(model_store_dir), device="cpu", state_dir=str(tmp_path / "state"))
    app = create_app(settings)
    dim = ModelStore(model_store_dir).load().manifest.feature_dim

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            engine: Decisions = app.state.runtime.decisions
            seen: list[list[bytes | None]] = []
            load = engine.store.load_for_decision

            async def spy(campaign_id: str, user_ids: list[str]) -> Any:
                campaign, contexts = await load(campaign_id, user_ids)
                seen.append(contexts)
                return campaign, contexts

            engine.store.load_for_decision = spy  # type: ignore[method-assign]
            await app.state.runtime.campaigns.put_campaign(
                "c", CampaignPut.model_validate({"budget": 100.0, "coupons": []})
            )
            body = DecisionsRequest.model_validate({"requests": [{"user_id": "u", "features": [0.5] * dim}]})
            first = json.loads(await engine.decide("c", body))["decisions"][0]
            await engine.decide("c", body)  # no await in between: the first write may still be in flight
            outcome = OutcomesRequest.model_validate(
                {"outcomes": [{"decision_id": first["decision_id"], "reward": 2.5, "cost": 0.0}]}
            )
            await engine.record_outcomes("c", outcome)
            await engine.drain()
            _, (raw,) = await load("c", ["u"])
            second_view, final = decode_context(seen[1][0]), decode_context(raw)
            assert second_view is not None and second_view.decision_ids == [first["decision_id"]]
            assert final is not None and final.t == 2 and final.steps["reward"].tolist() == [250, 0]

    asyncio.run(scenario())


def test_plan_lambda_is_the_smallest_lambda_whose_expected_spend_fits() -> None:
    revenue = np.array([[0.0, 3.0], [0.0, 2.0], [0.0, 1.0]], np.float32)
    cost = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], np.float32)
    terms = ScoreTerms(revenue, cost, np.array([[0, 100], [0, 100], [0, 100]]))
    campaign = CampaignConfig("c", CampaignSettings(budget=10_000, coupons={1: 500}))
    # a coupon is worth it to user i while lambda < 3, 2, 1: spend 300, 200, 100, 0 cents
    assert plan_lambda(terms, campaign, 300, 10.0) == 0.0
    assert plan_lambda(terms, campaign, 250, 10.0) == pytest.approx(1.0, abs=1e-5)
    assert plan_lambda(terms, campaign, 100, 10.0) == pytest.approx(2.0, abs=1e-5)
    assert plan_lambda(terms, campaign, 0, 2.5) == 2.5  # not reachable within lambda max
    paced = CampaignConfig("c", campaign.settings, PacedState(0.0, None, {1: 2.0}))  # costs twice the predictions
    assert plan_lambda(terms, paced, 250, 10.0) == pytest.approx(2.0, abs=1e-5)


def test_score_terms_expected_costs_follow_the_cost_ratio_of_each_decision_index() -> None:
    """Expected costs (cents) are the model's times the manifest's ratio for that user's decision index (the
    last ratio for later decisions), never above the coupon's cost; without ratios they are the model's."""
    campaign = CampaignConfig("c", CampaignSettings(budget=10_000, coupons={1: 500, 2: 100}))
    outputs = np.zeros((3, 9), np.float32)
    outputs[:, 7:] = [[1.0, 0.9], [1.0, 0.9], [1.0, 0.9]]  # expected cost now: 1.00 and 0.90 currency units
    plain = ScoreTerms.split(outputs, campaign, [], np.array([0, 1, 7]))
    assert plain.expected.tolist() == [[0, 100, 90]] * 3
    corrected = ScoreTerms.split(outputs, campaign, [1.5, 0.5], np.array([0, 1, 7]))
    assert corrected.expected.tolist() == [[0, 150, 100], [0, 50, 45], [0, 50, 45]]  # 135 capped at the cost 100


def test_a_non_finite_output_never_becomes_money() -> None:
    """A row with NaN or an infinity anywhere: every coupon at its face cost, NaN scores (no coupon); the
    other rows' expected costs within [0, the coupon's cost]; the priority puts the row last."""
    campaign = CampaignConfig("c", CampaignSettings(budget=10_000, coupons={1: 500, 2: 100}))
    outputs = np.zeros((5, 9), np.float32)
    outputs[:, 0:3] = [0.0, 4.0, 3.0]
    outputs[:, 6:] = [[0.0, 1.0, 0.5]] * 5
    outputs[1, 7] = np.nan  # an expected cost
    outputs[2, 4] = np.inf  # a cost term
    outputs[3, 0] = -np.inf  # a revenue term
    outputs[4, 7:] = [-3e38, 3e38]  # finite, far outside [0, face]
    terms = ScoreTerms.split(outputs, campaign, [2.0], np.zeros(5, np.int64))
    assert terms.finite.tolist() == [True, False, False, False, True]
    assert terms.expected.tolist() == [[0, 200, 100], [0, 500, 100], [0, 500, 100], [0, 500, 100], [0, 0, 100]]
    scores = terms.scores(0.5)
    prefs, priority = preferences(scores, [1, 2])
    assert prefs[1:4] == [[0], [0], [0]] and prefs[0][0] == 1
    assert priority.tolist()[-3:] == [1, 2, 3]
    # plain scores: NaN in the score of "no coupon" alone is enough
    plain = np.array([[np.nan, 5.0, 4.0], [0.0, 5.0, 4.0]], np.float32)
    assert preferences(plain, [1, 2])[0] == [[0], [1, 2, 0]]


def test_plan_lambda_leaves_out_users_the_model_cannot_score() -> None:
    revenue = np.array([[0.0, 3.0], [0.0, 2.0], [0.0, 1.0], [np.nan, np.nan]], np.float32)
    cost = np.ones((4, 2), np.float32) * [0.0, 1.0]
    outputs = np.concatenate([revenue, cost, cost], axis=1)
    outputs[3, 2:] = [0.0, 1.0, 0.0, np.nan]
    campaign = CampaignConfig("c", CampaignSettings(budget=10_000, coupons={1: 500}))
    terms = ScoreTerms.split(outputs, campaign, [], np.zeros(4, np.int64))
    assert plan_lambda(terms, campaign, 250, 10.0) == pytest.approx(1.0, abs=1e-5)
    assert plan_lambda(terms, campaign, 100, 10.0) == pytest.approx(2.0, abs=1e-5)
