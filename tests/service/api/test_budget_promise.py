"""The budget promise against what surrounds the ledger, over HTTP on every kind of store: coupons the
model prices near zero, a switch of reservation mode, time plans, a replica whose clock is off, and
outcomes later than their reservation's expiry."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from svc_http import ADMIN, campaign_body, republish, users

import service.campaigns
from research.delay_study import DelayStudy
from service.app import create_app
from service.settings import DAY_S, Settings

FACES = {1: 200, 2: 500, 3: 1000}  # svc_http.COUPONS, cents


def at(seconds_from_now: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds_from_now)).isoformat()


def put(client: TestClient, cid: str, budget: float = 100.0, **extra: Any) -> dict[str, Any]:
    body = campaign_body(budget, **{"lambda": 0.0, **extra})
    resp = client.put(f"/v1/admin/campaigns/{cid}", json=body, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def view(client: TestClient, cid: str) -> dict[str, Any]:
    return dict(client.get(f"/v1/admin/campaigns/{cid}", headers=ADMIN).json())


def decide(client: TestClient, cid: str, n: int, dim: int, prefix: str) -> list[dict[str, Any]]:
    resp = client.post(f"/v1/campaigns/{cid}/decisions", json={"requests": users(n, dim, prefix=prefix)})
    assert resp.status_code == 200, resp.text
    return list(resp.json()["decisions"])


def price_everything_at_zero(client: TestClient, model_store_dir: Path) -> None:
    """Serve a model whose expected costs are all 0 (a calibration cost ratio of 1e-9): every coupon looks free."""
    republish(model_store_dir, cost_ratios=[1e-9])
    assert client.post("/v1/admin/models/reload", headers=ADMIN).json()["changed"]


def bernstein_margin(faces: list[int], p: float, dearest: int, risk: float) -> float:
    log_risk = math.log(1 / risk)
    third = dearest * log_risk / 3
    variance = sum(face * face * p * (1 - p) for face in faces)
    return third + math.sqrt(third * third + 2 * variance * log_risk)


# ---- expected mode: a floor under every reservation ----------------------------------------------------
def test_coupons_priced_at_zero_still_reserve_their_floor(
    client: TestClient, model_store_dir: Path, feature_dim: int
) -> None:
    """A model that prices every coupon at 0: each granted coupon reserves its floor (the campaign's minimum
    redemption probability times its cost, at least a cent), and the margin counts every one of them, so
    the coupons granted fit the budget with the margin of their floors."""
    price_everything_at_zero(client, model_store_dir)
    put(client, "floor", budget=60.0, reservation_mode="expected", min_redemption=0.1)
    decisions = decide(client, "floor", 200, feature_dim, "z")
    faces = [FACES[d["action"]] for d in decisions if d["action"]]
    state = view(client, "floor")
    assert state["min_redemption"] == 0.1
    assert round(state["reserved"] * 100) == sum(math.ceil(face * 0.1) for face in faces) > 0
    assert round(state["outstanding"] * 100) == sum(faces)
    cents = round(state["reserved"] * 100) + bernstein_margin(faces, 0.1, max(FACES.values()), 0.01)
    assert cents <= 6000 and len(faces) < 200  # the margin bound the grants: not every user got a coupon


def test_the_default_floor_is_a_cent_at_least(client: TestClient, model_store_dir: Path, feature_dim: int) -> None:
    price_everything_at_zero(client, model_store_dir)
    put(client, "default-floor", budget=1000.0, reservation_mode="expected")
    decisions = decide(client, "default-floor", 50, feature_dim, "d")
    faces = [FACES[d["action"]] for d in decisions if d["action"]]
    state = view(client, "default-floor")
    assert state["min_redemption"] == 0.02  # the service's default
    assert round(state["reserved"] * 100) == sum(max(1, math.ceil(face * 0.02)) for face in faces) > 0


# ---- a change of reservation mode ------------------------------------------------------------------------
def test_a_switch_to_strict_counts_the_outstanding_coupons_at_their_cost(
    client: TestClient, model_store_dir: Path, feature_dim: int
) -> None:
    """Coupons granted in expected mode reserve a fraction of their cost; once the campaign is strict, every
    outstanding coupon counts at its cost, so strict grants only what fits beside them and, all redeemed,
    strict's coupons never take spend above the budget."""
    price_everything_at_zero(client, model_store_dir)
    put(client, "switch", budget=100.0, reservation_mode="expected", min_redemption=0.1)
    decide(client, "switch", 30, feature_dim, "e")
    before = view(client, "switch")
    assert before["outstanding"] > before["reserved"] > 0
    patched = client.patch("/v1/admin/campaigns/switch", json={"reservation_mode": "strict"}, headers=ADMIN)
    assert patched.status_code == 200, patched.text
    after = decide(client, "switch", 30, feature_dim, "s")
    granted = [FACES[d["action"]] for d in after if d["action"]]
    state = view(client, "switch")
    # what strict granted fits beside the expected-mode coupons at their cost
    assert state["outstanding"] * 100 == pytest.approx(before["outstanding"] * 100 + sum(granted))
    assert sum(granted) <= max(0.0, 100.0 - before["outstanding"]) * 100
    # every coupon outstanding redeemed at its cost: strict's own never pushed spend above the budget
    if before["outstanding"] < 100.0:
        assert state["spent"] + state["outstanding"] <= 100.0


# ---- time plans ------------------------------------------------------------------------------------------
def test_a_time_plan_is_paced_from_the_first_request(client: TestClient, feature_dim: int) -> None:
    """A campaign paced over the next minute cannot commit its budget in its first seconds: spent plus
    reserved stays within the share of the horizon gone by plus the plan's lead (0.1 by default)."""
    put(client, "minute", budget=100.0, ends_at=at(60))
    decide(client, "minute", 200, feature_dim, "m")
    state = view(client, "minute")
    elapsed = (datetime.now(UTC) - datetime.fromisoformat(state["starts_at"])).total_seconds()
    assert 0 < state["spent"] + state["reserved"] <= 100.0 * (elapsed / 60 + 0.1)


def test_no_coupon_outside_the_horizon(client: TestClient, feature_dim: int) -> None:
    put(client, "ended", budget=100.0, starts_at=at(-10), ends_at=at(1))
    time.sleep(1.2)
    assert all(d["action"] == 0 for d in decide(client, "ended", 50, feature_dim, "x"))
    put(client, "later", budget=100.0, starts_at=at(3600), ends_at=at(7200))
    assert all(d["action"] == 0 for d in decide(client, "later", 50, feature_dim, "y"))
    assert view(client, "ended")["reserved"] == view(client, "later")["reserved"] == 0.0


@pytest.mark.parametrize("method", ["put", "patch"])
def test_a_horizon_that_ends_before_it_starts_is_refused(client: TestClient, method: str) -> None:
    """An ends_at in the past without starts_at (which is then now) is refused, on PUT and on PATCH."""
    if method == "put":
        resp = client.put("/v1/admin/campaigns/past", json=campaign_body(100.0, ends_at=at(-60)), headers=ADMIN)
    else:
        put(client, "past")
        resp = client.patch("/v1/admin/campaigns/past", json={"ends_at": at(-60)}, headers=ADMIN)
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == ["body", "ends_at"] and "starts_at" in resp.json()["detail"][0]["msg"]
    if method == "patch":
        assert view(client, "past")["ends_at"] is None  # nothing written


# ---- clocks ----------------------------------------------------------------------------------------------
@pytest.fixture
def short_expiry_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"reservation_expiry_s": 60}))) as test_client:
        yield test_client


def test_a_replica_clock_ahead_releases_nothing_early(
    short_expiry_client: TestClient, feature_dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deadlines and sweeps read the store's clock: a replica whose own clock runs 120 s ahead (past the
    60-s expiry) neither releases the reservations others made nor stamps its own far ahead."""
    client = short_expiry_client
    put(client, "clock", budget=100.0)
    decide(client, "clock", 10, feature_dim, "c")
    reserved = view(client, "clock")["reserved"]
    assert reserved > 0
    real = time.time
    monkeypatch.setattr(service.campaigns, "now_ms", lambda: int((real() + 120) * 1000))
    monkeypatch.setattr(time, "time", lambda: real() + 120)
    assert view(client, "clock")["reserved"] == reserved  # the GET sweeps: nothing is due by the store's clock


# ---- expiry against delayed outcomes ---------------------------------------------------------------------
def test_the_default_expiry_covers_the_delays_the_delay_model_expects() -> None:
    """99% of exponential delays with the delay study's mean arrive before the default expiry."""
    mean_s = DelayStudy().delay_mean_days * DAY_S
    assert Settings().reservation_expiry_s >= mean_s * math.log(100)


@pytest.fixture
def instant_expiry_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"reservation_expiry_s": 1}))) as test_client:
        yield test_client


def test_a_late_outcome_is_charged_where_it_fits_and_the_rest_is_overrun(
    instant_expiry_client: TestClient, feature_dim: int
) -> None:
    """A reservation released at its expiry counts as unredeemed; the budget goes to new coupons; an outcome
    reported after that is charged as far as the budget still allows, and the rest is reported as overrun:
    spent never exceeds the budget, and spent + overrun is every cost reported."""
    client = instant_expiry_client
    put(client, "late", budget=20.0)
    first = [d for d in decide(client, "late", 20, feature_dim, "a") if d["action"]]
    time.sleep(1.1)
    assert view(client, "late")["reserved"] == 0.0  # released (the GET sweeps)
    second = [d for d in decide(client, "late", 20, feature_dim, "b") if d["action"]]
    assert sum(d["cost"] for d in second) > 0  # the budget went out again
    outcomes = [{"decision_id": d["decision_id"], "reward": 1.0, "cost": d["cost"]} for d in second + first]
    resp = client.post("/v1/campaigns/late/outcomes", json={"outcomes": outcomes})
    assert resp.status_code == 200 and resp.json()["accepted"] == len(outcomes)
    state = view(client, "late")
    reported = sum(d["cost"] for d in first + second)
    assert state["spent"] <= 20.0 and state["spent"] + state["overrun"] == pytest.approx(reported)
    assert state["overrun"] > 0
