"""Numbers at the edge over HTTP, on the three stores: a feature outside the service's range, a model whose
output is NaN for some users, and numbers beyond a double (10^400, 5,000 digits) in every numeric field
of every body. None of them reaches the ledger: a declared 4xx naming the field, or no coupon."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from svc_http import ADMIN, campaign_body, users

from model_store import ModelStore, ScoringModule, save_scripted
from service.app import create_app
from service.settings import Settings

JSON = {"Content-Type": "application/json"}
# numbers as JSON text: beyond a double (10^400 and its negative, 1e400), and 5,000 digits (beyond what
# Python's int() reads by default)
HUGE = ["1" + "0" * 400, "-1" + "0" * 400, "1e400", "7" * 5000, "-" + "7" * 5000]


def view(client: TestClient, cid: str) -> Any:
    resp = client.get(f"/v1/admin/campaigns/{cid}", headers=ADMIN)
    assert resp.status_code == 200, resp.text
    return resp.json()


# ---- the feature range ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [1e21, -1e21, 1e300, 1000000.5])
def test_a_feature_outside_the_range_is_refused_naming_the_user(
    client: TestClient, feature_dim: int, value: float
) -> None:
    client.put("/v1/admin/campaigns/c1", json=campaign_body(100.0, **{"lambda": 0.0}), headers=ADMIN)
    requests = users(3, feature_dim, prefix="ok")
    requests[1] = {"user_id": "mallory", "features": [0.1] * (feature_dim - 1) + [value]}
    resp = client.post("/v1/campaigns/c1/decisions", json={"requests": requests})
    assert resp.status_code == 422, resp.text
    (error,) = resp.json()["detail"]
    assert error["loc"][:4] == ["body", "requests", 1, "features"]
    if value < 1e30:  # within a 32-bit float: the service's range, which names the user and the bound
        assert "'mallory'" in error["msg"] and "1e+06" in error["msg"], error["msg"]
    state = view(client, "c1")
    assert (state["decisions"], state["reserved"], state["spent"]) == (0, 0.0, 0.0)
    # at the bound: served
    requests[1]["features"][-1] = 1e6 if value > 0 else -1e6
    assert client.post("/v1/campaigns/c1/decisions", json={"requests": requests}).status_code == 200


def test_the_feature_range_is_a_setting(settings: Settings, feature_dim: int) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_abs_feature": 10.0}))) as client:
        client.put("/v1/admin/campaigns/c1", json=campaign_body(100.0, **{"lambda": 0.0}), headers=ADMIN)
        requests = [{"user_id": "u", "features": [10.5] * feature_dim}]
        resp = client.post("/v1/campaigns/c1/decisions", json={"requests": requests})
        assert resp.status_code == 422 and "-10..10" in resp.json()["detail"][0]["msg"]


# ---- a model whose output is not finite -------------------------------------------------------------------
class Flaky(ScoringModule):
    """Four actions: revenue x0 * (0, 3, 6, 11), cost (0, 2, 5, 10) currency units (the coupons' costs),
    expected cost now = cost. Users whose feature 1 is negative get NaN: in the score of "no coupon"
    (`forward`) and in the expected costs (`score_terms`), where a model's NaN hides best."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("gain", torch.tensor([0.0, 3.0, 6.0, 11.0]))
        self.register_buffer("price", torch.tensor([0.0, 2.0, 5.0, 10.0]))

    def _nan(self, last: torch.Tensor, width: int) -> torch.Tensor:
        return torch.where(last[:, 1:2] < 0, float("nan"), 0.0).expand(-1, width)

    def scores(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        scores = x[:, :1] * self.gain - lam.unsqueeze(1) * self.price
        return torch.cat([scores[:, :1] + self._nan(x, 1), scores[:, 1:]], dim=1)

    def terms(self, x: torch.Tensor) -> torch.Tensor:
        revenue = x[:, :1] * self.gain
        cost = self.price.expand_as(revenue)
        return torch.cat([revenue, cost, cost + self._nan(x, 4)], dim=1)


@pytest.fixture(params=["score_terms", "scores"])
def flaky_store(request: pytest.FixtureRequest, model_store_dir: Path, tmp_path: Path) -> Path:
    """A model store serving `Flaky` (with or without score terms), with the trained model's dimensions."""
    manifest = ModelStore(model_store_dir).load().manifest.to_json()
    assert (manifest["num_actions"], manifest["feature_dim"] >= 2) == (4, True)
    for name in ("version", "created_at", "model_sha256"):
        manifest.pop(name)
    manifest.update(
        score_terms=request.param == "score_terms", cost_ratios=[], lambda_table=[], default_lambda=1.0, metrics={}
    )
    store = tmp_path / "flaky"
    with tempfile.TemporaryDirectory() as tmp:
        save_scripted(Flaky(), Path(tmp) / "model.pt")
        ModelStore(store).publish(Path(tmp) / "model.pt", manifest)
    return store


@pytest.fixture
def flaky_client(settings: Settings, flaky_store: Path) -> Iterator[TestClient]:
    # no pacing step during the test: before its first one, a traffic plan's allowance is budget / decisions
    flaky = settings.model_copy(update={"store": str(flaky_store), "pacing_interval_s": 3600.0})
    with TestClient(create_app(flaky)) as client:
        yield client


def flaky_users(dim: int, nan_users: tuple[str, ...]) -> list[dict[str, Any]]:
    requests = [
        {"user_id": f"u{i}", "features": [1.0 + 0.05 * i, 1.0] + [0.0] * (dim - 2)} for i in range(7 - len(nan_users))
    ]
    for position, user_id in enumerate(nan_users):
        requests.insert(2 * position + 1, {"user_id": user_id, "features": [2.0, -1.0] + [0.0] * (dim - 2)})
    return requests


@pytest.mark.parametrize("exploration_rate", [0.0, 0.5])
def test_users_the_model_cannot_score_get_no_coupon(
    flaky_client: TestClient, feature_dim: int, exploration_rate: float
) -> None:
    client = flaky_client
    body = campaign_body(1000.0, **{"lambda": 0.0, "exploration_rate": exploration_rate})
    assert client.put("/v1/admin/campaigns/c1", json=body, headers=ADMIN).status_code == 200
    granted = []
    for round_ in range(3):  # with exploration, several draws
        requests = [{**r, "user_id": f"{r['user_id']}-{round_}"} for r in flaky_users(feature_dim, ("nan-a", "nan-b"))]
        resp = client.post("/v1/campaigns/c1/decisions", json={"requests": requests})
        assert resp.status_code == 200, resp.text
        for decision in resp.json()["decisions"]:
            if decision["user_id"].startswith("nan"):
                assert (decision["action"], decision["cost"]) == (0, 0.0), decision
            elif decision["action"]:
                granted.append(decision["cost"])
    assert granted, "the users the model scores got no coupon"
    state = view(client, "c1")
    assert state["decisions"] == 3 * 7 and state["spent"] == 0.0
    assert state["reserved"] == pytest.approx(sum(granted))
    assert 'saco_nonfinite_scores_total{campaign="c1"} 6.0' in client.get("/metrics").text


def test_the_ledger_holds_what_was_granted_when_the_model_fails_some_users(
    flaky_client: TestClient, feature_dim: int
) -> None:
    client = flaky_client
    for mode in ("strict", "expected"):
        cid = f"l-{mode}"
        body = campaign_body(1000.0, **{"lambda": 0.0, "reservation_mode": mode, "exploration_rate": 0.3})
        client.put(f"/v1/admin/campaigns/{cid}", json=body, headers=ADMIN)
        granted: list[dict[str, Any]] = []
        for round_ in range(3):
            requests = [{**r, "user_id": f"{r['user_id']}-{round_}"} for r in flaky_users(feature_dim, ("nan",))]
            resp = client.post(f"/v1/campaigns/{cid}/decisions", json={"requests": requests})
            assert resp.status_code == 200, resp.text
            for decision in resp.json()["decisions"]:
                if decision["user_id"].startswith("nan"):
                    assert decision["action"] == 0
                elif decision["action"]:
                    granted.append(decision)
        state = view(client, cid)
        assert state["decisions"] == 3 * 7 and granted
        if mode == "strict":
            assert state["reserved"] == pytest.approx(sum(d["cost"] for d in granted))
        else:  # an expected-size reservation, never negative, never above the coupon's cost
            assert 0 < state["reserved"] <= sum(d["cost"] for d in granted) + 1e-9
        # every granted coupon settles at its cost; the ledger ends at what was spent
        outcomes = [{"decision_id": d["decision_id"], "reward": 1.0, "cost": d["cost"]} for d in granted]
        settled = client.post(f"/v1/campaigns/{cid}/outcomes", json={"outcomes": outcomes}).json()
        assert settled == {"accepted": len(granted), "duplicates": 0, "unknown": 0}
        state = view(client, cid)
        assert state["reserved"] == 0.0
        assert state["spent"] + state["overrun"] == pytest.approx(sum(d["cost"] for d in granted))
    metrics = client.get("/metrics").text
    assert 'saco_nonfinite_scores_total{campaign="l-strict"} 3.0' in metrics


@pytest.mark.parametrize("flaky_store", ["score_terms"], indirect=True)  # a request's lambda is planned from them
def test_a_traffic_plan_is_not_driven_to_lambda_zero_by_a_user_the_model_cannot_score(
    flaky_client: TestClient, feature_dim: int
) -> None:
    client = flaky_client
    plan = campaign_body(100.0, expected_decisions=100, pacing_method="resolve")
    for cid in ("with-nan", "reference"):
        assert client.put(f"/v1/admin/campaigns/{cid}", json=plan, headers=ADMIN).status_code == 200
    with_nan = flaky_users(feature_dim, ("nan",))
    reference = [r for r in with_nan if r["user_id"] != "nan"]
    answers = {}
    for cid, requests in (("with-nan", with_nan), ("reference", reference)):
        resp = client.post(f"/v1/campaigns/{cid}/decisions", json={"requests": requests})
        assert resp.status_code == 200, resp.text
        answers[cid] = {d["user_id"]: d for d in resp.json()["decisions"]}
    lam = answers["reference"]["u0"]["lambda"]
    assert lam > 0  # a coupon each at lambda 0 would spend 10.00 a user against an allowance of 1.00
    assert answers["with-nan"]["nan"]["action"] == 0
    for user_id, decision in answers["reference"].items():
        assert answers["with-nan"][user_id]["lambda"] == lam
        assert answers["with-nan"][user_id]["action"] == decision["action"]
    spent = sum(d["cost"] for d in answers["with-nan"].values())
    assert spent <= 7 * 1.0 + 2.0  # the plan's allowance for the request, within one coupon
    state = view(client, "with-nan")
    assert state["reserved"] == pytest.approx(spent) and state["decisions"] == 7


# ---- numbers beyond a double in every numeric field -----------------------------------------------------
PLACEHOLDER = "__NUMBER__"


def raw(body: dict[str, Any], path: list[str | int], number: str) -> bytes:
    """`body` as JSON with the JSON number `number` (text: it may be beyond what Python's int() reads) at
    `path`."""
    body = json.loads(json.dumps(body))
    node: Any = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = PLACEHOLDER
    return json.dumps(body).replace(f'"{PLACEHOLDER}"', number).encode()


CAMPAIGN_FIELDS: list[list[str | int]] = [
    ["budget"],
    ["lambda"],
    ["expected_users"],
    ["overspend_risk"],
    ["expected_decisions"],
    ["exploration_rate"],
    ["holdout_rate"],
    ["coupons", 0, "action"],
    ["coupons", 0, "cost"],
]


def declared(client: TestClient, path: str, method: str) -> set[int]:
    spec = client.get("/openapi.json").json()
    return {int(code) for code in spec["paths"][path][method]["responses"]}


def test_numbers_beyond_a_double_are_refused_naming_the_field(client: TestClient, feature_dim: int) -> None:
    full = campaign_body(
        100.0,
        **{
            "lambda": 0.0,
            "expected_users": 10,
            "overspend_risk": 0.05,
            "expected_decisions": 1000,
            "exploration_rate": 0.0,
            "holdout_rate": 0.0,
        },
    )
    assert client.put("/v1/admin/campaigns/c1", json=full, headers=ADMIN).status_code == 200
    decided = client.post("/v1/campaigns/c1/decisions", json={"requests": users(4, feature_dim)}).json()["decisions"]
    before = view(client, "c1")
    campaign_path = "/v1/admin/campaigns/{campaign_id}"
    cases: list[tuple[str, str, str, dict[str, Any], list[str | int]]] = []
    for field in CAMPAIGN_FIELDS:
        cases.append(("PUT", "/v1/admin/campaigns/c1", campaign_path, full, field))
        cases.append(("PUT", "/v1/admin/campaigns/new", campaign_path, full, field))
        patch = {"coupons": full["coupons"]} if field[0] == "coupons" else {field[0]: full[field[0]]}
        cases.append(("PATCH", "/v1/admin/campaigns/c1", campaign_path, patch, field))
    requests = {"requests": users(2, feature_dim)}
    cases.append(("POST", "/v1/campaigns/c1/decisions", "/v1/campaigns/{campaign_id}/decisions", requests, []))
    outcome = {"outcomes": [{"decision_id": decided[0]["decision_id"], "reward": 1.0, "cost": 0.0}]}
    for name in ("reward", "cost"):
        cases.append(("POST", "/v1/campaigns/c1/outcomes", "/v1/campaigns/{campaign_id}/outcomes", outcome, [name]))
    for method, url, template, body, field in cases:
        if url.endswith("/decisions"):
            field = ["requests", 1, "features", feature_dim - 1]
        elif url.endswith("/outcomes"):
            field = ["outcomes", 0, field[0]]
        allowed = declared(client, template, method.lower())
        for number in HUGE:
            resp = client.request(method, url, content=raw(body, field, number), headers={**ADMIN, **JSON})
            assert resp.status_code == 422 and resp.status_code in allowed, (method, url, field, number[:8], resp.text)
            assert resp.json()["detail"][0]["loc"][: len(field) + 1] == ["body", *field], (field, resp.text)
            assert len(resp.content) < 2000  # the number is not sent back
    assert client.get("/v1/admin/campaigns/new", headers=ADMIN).status_code == 404
    after = view(client, "c1")
    assert after == before


def test_bodies_that_are_not_json_answer_a_declared_422(client: TestClient) -> None:
    client.put("/v1/admin/campaigns/c1", json=campaign_body(), headers=ADMIN)
    for content in (b"[" * 100_000 + b"]" * 100_000, b'{"requests": "\xff\xfe"}', b"{not json"):
        for method, url, template in (
            ("POST", "/v1/campaigns/c1/decisions", "/v1/campaigns/{campaign_id}/decisions"),
            ("POST", "/v1/campaigns/c1/outcomes", "/v1/campaigns/{campaign_id}/outcomes"),
            ("PUT", "/v1/admin/campaigns/c1", "/v1/admin/campaigns/{campaign_id}"),
            ("PATCH", "/v1/admin/campaigns/c1", "/v1/admin/campaigns/{campaign_id}"),
        ):
            resp = client.request(method, url, content=content, headers={**ADMIN, **JSON})
            assert resp.status_code == 422, (method, url, content[:10], resp.text)
            assert resp.status_code in declared(client, template, method.lower())
            assert resp.json()["detail"][0]["type"] == "json_invalid"
