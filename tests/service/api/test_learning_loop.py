"""The learning loop's service side over HTTP: the decision and outcome log, exploration with logged
probabilities, the holdout group and its incremental revenue, on each kind of store."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
import redis.cluster
from fastapi.testclient import TestClient
from svc_http import ADMIN, campaign_body, users

from contract.log_entry import decode_decisions
from service.app import create_app
from service.scoring import in_holdout
from service.settings import Settings
from service.state.store import StateStore


def read_log(client: TestClient, campaign: str) -> list[dict[str, bytes]]:
    store: StateStore = client.app.state.runtime.store  # type: ignore[attr-defined]
    reader: Any = (redis.cluster.RedisCluster if store.cluster else redis.Redis).from_url(store.url)
    try:
        return [{k.decode(): v for k, v in fields.items()} for _, fields in reader.xrange(store.keys.log_key(campaign))]
    finally:
        reader.close()


def logged_decisions(client: TestClient, campaign: str) -> list[dict[str, object]]:
    """The decisions of the campaign's log (its `decisions` entries), as the export reads them."""
    rows: list[dict[str, object]] = []
    for entry in read_log(client, campaign):
        if entry["kind"] == b"decisions":
            rows += decode_decisions(campaign, "-", {k.encode(): v for k, v in entry.items()})[0]
    return rows


def decide(client: TestClient, campaign: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    resp = client.post(f"/v1/campaigns/{campaign}/decisions", json={"requests": requests})
    assert resp.status_code == 200, resp.text
    decisions: list[dict[str, Any]] = resp.json()["decisions"]
    return decisions


def test_rates_are_set_shown_and_checked(client: TestClient) -> None:
    view = client.put("/v1/admin/campaigns/c", json=campaign_body(), headers=ADMIN).json()
    assert (view["exploration_rate"], view["holdout_rate"], view["explored"], view["log_entries"]) == (0, 0, 0, 0)
    assert view["holdout"] == {"decisions": 0, "settled": 0, "reward": 0, "cost": 0, "reward_per_decision": None}
    assert view["incremental_revenue_per_decision"] is None
    body = campaign_body(exploration_rate=0.05, holdout_rate=0.1)
    view = client.put("/v1/admin/campaigns/c", json=body, headers=ADMIN).json()
    assert (view["exploration_rate"], view["holdout_rate"]) == (0.05, 0.1)
    view = client.patch("/v1/admin/campaigns/c", json={"exploration_rate": None}, headers=ADMIN).json()
    assert (view["exploration_rate"], view["holdout_rate"]) == (0, 0.1)
    for bad in ({"exploration_rate": 0.6}, {"holdout_rate": -0.1}, {"holdout_rate": "0.1"}):
        resp = client.patch("/v1/admin/campaigns/c", json=bad, headers=ADMIN)
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", *bad]
    assert client.get("/v1/admin/campaigns/c", headers=ADMIN).json()["holdout_rate"] == 0.1  # nothing half-written
    huge = {"outcomes": [{"decision_id": "d-x", "reward": 1e13, "cost": 0}]}
    resp = client.post("/v1/campaigns/c/outcomes", json=huge)
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "outcomes", 0, "reward"]


def test_the_log_holds_exactly_the_decisions_and_outcomes(client: TestClient, feature_dim: int) -> None:
    client.put("/v1/admin/campaigns/c", json=campaign_body(30.0), headers=ADMIN)
    requests = users(12, feature_dim, request_id=None)
    for i, request in enumerate(requests):
        request["features"] = [0.25 * i - 1.0 + 0.001 * j for j in range(feature_dim)]
        if i % 2:
            request["request_id"] = f"r{i}"
        else:
            del request["request_id"]
    decided = decide(client, "c", requests)
    assert decide(client, "c", [r for r in requests if "request_id" in r])  # replays: nothing new
    log = read_log(client, "c")
    assert [e["kind"] for e in log] == [b"decisions"]  # one entry for the request's decisions
    rows, features = decode_decisions("c", "1-0", {k.encode(): v for k, v in log[0].items()})
    by_id = {row["decision_id"]: (row, row_features) for row, row_features in zip(rows, features, strict=True)}
    assert set(by_id) == {d["decision_id"] for d in decided}
    for request, decision in zip(requests, decided, strict=True):
        row, row_features = by_id[decision["decision_id"]]
        assert row["user_id"] == request["user_id"]
        assert row["action"] == decision["action"] and row["cost"] == decision["cost"]
        assert row["model_version"] == decision["model_version"] and row["lambda"] == decision["lambda"]
        np.testing.assert_array_equal(row_features, np.asarray(request["features"], "<f4"))
        assert (row["probability"], row["explored"], row["holdout"]) == (1.0, False, False)

    outcomes = [{"decision_id": d["decision_id"], "reward": 1.5, "cost": d["cost"]} for d in decided[:5]]
    first = client.post("/v1/campaigns/c/outcomes", json={"outcomes": outcomes}).json()
    again = client.post("/v1/campaigns/c/outcomes", json={"outcomes": outcomes[:3]}).json()
    assert (first["accepted"], again["duplicates"]) == (5, 3)
    log = read_log(client, "c")
    assert len(log) == 6
    logged = [(e["decision_id"].decode(), int(e["reward"]), int(e["cost"])) for e in log[1:]]
    assert logged == [(o["decision_id"], 150, round(o["cost"] * 100)) for o in outcomes]
    view = client.get("/v1/admin/campaigns/c", headers=ADMIN).json()
    assert view["log_entries"] == 6 and view["treated"]["settled"] == 5 and view["treated"]["reward"] == 7.5
    assert 'saco_decision_log_entries{campaign="c"} 6.0' in client.get("/metrics").text


def test_holdout_users_never_get_a_coupon_and_stay_held_out(client: TestClient, feature_dim: int) -> None:
    body = campaign_body(10_000.0, holdout_rate=0.3, **{"lambda": 0.0})
    client.put("/v1/admin/campaigns/h", json=body, headers=ADMIN)
    requests = users(200, feature_dim)
    expected = {r["user_id"] for r in requests if in_holdout("h", r["user_id"], 0.3)}
    assert 30 < len(expected) < 90  # about 0.3 of 200
    for _ in range(2):  # the same users again: the same group
        decided = decide(client, "h", requests)
        assert {d["user_id"] for d in decided if d["action"] == 0} >= expected
    log = logged_decisions(client, "h")
    held = [e for e in log if e["holdout"]]
    assert {e["user_id"] for e in held} == expected and len(held) == 2 * len(expected)
    assert all(e["action"] == 0 and e["probability"] == 1.0 and e["cost"] == 0 for e in held)
    assert any(e["action"] != 0 for e in log if not e["holdout"])  # the others are served

    reward = {True: 2.0, False: 5.0}  # held-out users buy less
    ids = {str(e["decision_id"]): bool(e["holdout"]) for e in log}
    outcomes = [{"decision_id": i, "reward": reward[held_out], "cost": 0.0} for i, held_out in ids.items()]
    assert client.post("/v1/campaigns/h/outcomes", json={"outcomes": outcomes}).json()["accepted"] == 400
    view = client.get("/v1/admin/campaigns/h", headers=ADMIN).json()
    assert view["holdout"]["decisions"] == view["holdout"]["settled"] == 2 * len(expected)
    assert view["treated"]["decisions"] == 400 - 2 * len(expected)
    assert view["holdout"]["reward_per_decision"] == 2.0 and view["treated"]["reward_per_decision"] == 5.0
    assert view["incremental_revenue_per_decision"] == 3.0
    metrics = client.get("/metrics").text
    assert f'saco_decisions_holdout_total{{campaign="h"}} {2.0 * len(expected)}' in metrics
    assert 'saco_incremental_revenue_per_decision{campaign="h"} 3.0' in metrics


@pytest.fixture
def seeded_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"exploration_seed": 20260101}))) as test_client:
        yield test_client


@pytest.mark.parametrize("store_kind", ["standalone"])
def test_exploration_frequencies_match_the_logged_probabilities(seeded_client: TestClient, feature_dim: int) -> None:
    """Identical users and a budget every coupon fits: each decision has the same candidates ("no coupon"
    and the three coupons) and the same greedy action, so each action's logged probability is one number;
    over 4000 decisions each action's frequency is within 4.5 standard deviations of it."""
    client, rate, n = seeded_client, 0.4, 4000
    body = campaign_body(1_000_000.0, exploration_rate=rate)
    assert client.put("/v1/admin/campaigns/e", json=body, headers=ADMIN).status_code == 200
    for batch in range(n // 500):
        decide(client, "e", users(500, feature_dim, prefix=f"b{batch}-"))
    log = logged_decisions(client, "e")
    assert len(log) == n
    probability = {int(e["action"]): float(e["probability"]) for e in log}  # type: ignore[call-overload, arg-type]
    assert len({(e["action"], e["probability"]) for e in log}) == len(probability)  # one number per action
    assert sorted(probability) == [0, 1, 2, 3] and math.isclose(sum(probability.values()), 1.0)
    assert sorted(probability.values())[:3] == [rate / 4] * 3  # the non-greedy actions
    counts = Counter(int(e["action"]) for e in log)  # type: ignore[call-overload]
    for action, p in probability.items():
        assert abs(counts[action] - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)), (action, counts[action], n * p)
    explored = sum(bool(e["explored"]) for e in log)
    assert abs(explored - n * rate) <= 4.5 * math.sqrt(n * rate * (1 - rate))
    view = client.get("/v1/admin/campaigns/e", headers=ADMIN).json()
    assert view["explored"] == explored
    assert f'saco_decisions_explored_total{{campaign="e"}} {float(explored)}' in client.get("/metrics").text
