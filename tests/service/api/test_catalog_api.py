"""A campaign with a coupon catalog over HTTP, on each kind of store: the admin view shows the catalog and
the stock left; decisions answer bundles with their coupons; outcomes settle each coupon; every rule of the
catalog is a 422 naming its field; a campaign without a catalog answers as it always did."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from svc_http import ADMIN, users

CATALOG: dict[str, Any] = {
    "coupons": [
        {"action": 1, "cost": 2.0},
        {"action": 2, "kind": "percent", "value": 10.0, "cap": 5.0, "stock": 40, "class": "basket"},
        {"action": 3, "kind": "amount", "value": 10.0, "min_spend": 50.0, "stock": 3},
    ],
    "bundles": [[1, 2], [2, 3]],
}


def put(client: TestClient, body: dict[str, Any], campaign: str = "c") -> Any:
    return client.put(f"/v1/admin/campaigns/{campaign}", json=body, headers=ADMIN)


def decide(client: TestClient, feature_dim: int, n: int, prefix: str = "u", campaign: str = "c") -> list[Any]:
    resp = client.post(f"/v1/campaigns/{campaign}/decisions", json={"requests": users(n, feature_dim, prefix)})
    assert resp.status_code == 200, resp.text
    return list(resp.json()["decisions"])


def test_the_view_shows_the_catalog_and_the_stock_left(client: TestClient) -> None:
    resp = put(client, {"budget": 1000.0, "lambda": 0.0, **CATALOG})
    assert resp.status_code == 200, resp.text
    view = resp.json()
    assert view["coupons"] == [
        {"action": 1, "kind": "amount", "value": 2.0, "cap": None, "min_spend": None, "stock": None, "class": None,
         "cost": 2.0, "stock_left": None},
        {"action": 2, "kind": "percent", "value": 10.0, "cap": 5.0, "min_spend": None, "stock": 40,
         "class": "basket", "cost": 5.0, "stock_left": 40},
        {"action": 3, "kind": "amount", "value": 10.0, "cap": None, "min_spend": 50.0, "stock": 3, "class": None,
         "cost": 10.0, "stock_left": 3},
    ]  # fmt: skip
    assert view["bundles"] == [
        {"action": 1_000_001, "coupons": [1, 2], "cost": 7.0},
        {"action": 1_000_002, "coupons": [2, 3], "cost": 15.0},
    ]
    assert view["max_per_bundle"] is None
    # the rule instead of a list: one coupon per class (1 and 3 are both "amount")
    view = client.patch("/v1/admin/campaigns/c", json={"bundles": None, "max_per_bundle": 2}, headers=ADMIN).json()
    assert [b["coupons"] for b in view["bundles"]] == [[1], [2], [3], [1, 2], [2, 3]]
    assert [b["action"] for b in view["bundles"]] == [1, 2, 3, 1_000_004, 1_000_005]


def test_decisions_answer_bundles_and_outcomes_settle_each_coupon(client: TestClient, feature_dim: int) -> None:
    assert put(client, {"budget": 1000.0, "lambda": 0.0, **CATALOG}).status_code == 200
    decisions = decide(client, feature_dim, 24)
    granted = [d for d in decisions if d["action"]]
    assert granted, "no user got a bundle at lambda 0"
    costs = {1: 2.0, 2: 5.0, 3: 10.0}
    actions = {(): 0, (1, 2): 1_000_001, (2, 3): 1_000_002}  # the listed bundles only
    for d in decisions:
        assert d["action"] == actions[tuple(c["action"] for c in d["coupons"])]
        assert [c["cost"] for c in d["coupons"]] == [costs[c["action"]] for c in d["coupons"]]
        assert sum(c["cost"] for c in d["coupons"]) == d["cost"]
    with_three = [d for d in granted if d["action"] == 1_000_002]
    assert len(with_three) <= 3  # coupon 3's stock
    view = client.get("/v1/admin/campaigns/c", headers=ADMIN).json()
    assert view["reserved"] == sum(d["cost"] for d in granted)
    assert view["coupons"][1]["stock_left"] == 40 - len(granted)
    assert view["coupons"][2]["stock_left"] == 3 - len(with_three)

    first = granted[0]
    split = [{"action": first["coupons"][1]["action"], "cost": 1.23}]  # the second coupon redeemed, the first not
    resp = client.post(
        "/v1/campaigns/c/outcomes",
        json={"outcomes": [{"decision_id": first["decision_id"], "reward": 30.0, "cost": 1.23, "coupons": split}]},
    )
    assert resp.json() == {"accepted": 1, "duplicates": 0, "unknown": 0}
    after = client.get("/v1/admin/campaigns/c", headers=ADMIN).json()
    assert after["spent"] == 1.23
    assert after["reserved"] == pytest.approx(view["reserved"] - first["cost"], abs=1e-9)
    # coupon 2 was redeemed or not as the split says: its unit comes back only when it was not
    returned = 1 if split[0]["action"] != 2 else 0
    assert after["coupons"][1]["stock_left"] == view["coupons"][1]["stock_left"] + returned


def test_outcomes_of_a_bundle_that_do_not_fit_it_are_refused(client: TestClient, feature_dim: int) -> None:
    assert put(client, {"budget": 1000.0, "lambda": 0.0, **CATALOG}).status_code == 200
    granted = [d for d in decide(client, feature_dim, 24) if d["action"]]
    assert granted
    decision_id = granted[0]["decision_id"]
    other = 3 if granted[0]["action"] == 1_000_001 else 1  # a coupon the bundle lacks
    cases: list[tuple[dict[str, Any], list[Any], str]] = [
        ({"cost": 3.0}, ["body", "outcomes", 0, "coupons"], "give each one's realised cost"),
        ({"cost": 5.01, "coupons": [{"action": 2, "cost": 5.01}]}, ["body", "outcomes", 0, "coupons"], "above"),
        ({"cost": 1.0, "coupons": [{"action": other, "cost": 1.0}]}, ["body", "outcomes", 0, "coupons"], "not one"),
        ({"cost": 1.0, "coupons": [{"action": 1, "cost": 0.5}]}, ["body", "outcomes", 0], "sum"),
        (
            {"cost": 1.0, "coupons": [{"action": 1, "cost": 0.5}, {"action": 1, "cost": 0.5}]},
            ["body", "outcomes", 0],
            "twice",
        ),
    ]
    for fields, loc, words in cases:
        resp = client.post(
            "/v1/campaigns/c/outcomes", json={"outcomes": [{"decision_id": decision_id, "reward": 1.0, **fields}]}
        )
        assert resp.status_code == 422, (fields, resp.text)
        (error,) = resp.json()["detail"]
        assert error["loc"] == loc and words in error["msg"], (fields, error)
    assert client.get("/v1/admin/campaigns/c", headers=ADMIN).json()["spent"] == 0.0
    resp = client.post("/v1/campaigns/c/outcomes", json={"outcomes": [{"decision_id": decision_id, "reward": 1.0,
                                                                         "cost": 0.0}]})  # fmt: skip
    assert resp.json()["accepted"] == 1  # nothing redeemed needs no split


@pytest.mark.parametrize(
    ("body", "loc", "words"),
    [
        ({"coupons": [{"action": 1, "kind": "percent", "value": 10.0}]}, ["body", "coupons", 0, "cap"], "cap"),
        ({"coupons": [{"action": 1, "kind": "percent", "value": 120.0, "cap": 1.0}]}, ["body", "coupons", 0, "value"],
         "at most 100"),
        ({"coupons": [{"action": 1, "value": 2.0, "cap": 1.0}]}, ["body", "coupons", 0, "cap"], "percent"),
        ({"coupons": [{"action": 1, "value": 2.0, "cost": 2.0}]}, ["body", "coupons", 0, "cost"], "not both"),
        ({"coupons": [{"action": 1}]}, ["body", "coupons", 0, "value"], "required"),
        ({"coupons": [{"action": 1, "cost": 2.0, "min_spend": -1.0}]}, ["body", "coupons", 0, "min_spend"], ""),
        ({"coupons": [{"action": 1, "cost": 2.0, "stock": -1}]}, ["body", "coupons", 0, "stock"], ""),
        ({"coupons": [{"action": 1, "value": -2.0}]}, ["body", "coupons", 0, "value"], ""),
        ({"coupons": [{"action": 1, "value": 2.001}]}, ["body", "coupons", 0, "value"], "2 decimals"),
        ({"coupons": [{"action": 9, "cost": 2.0}]}, ["body", "coupons", 0, "action"], "the model's actions"),
        ({"coupons": [{"action": 1, "cost": 2.0}], "bundles": [[1, 2]]}, ["body", "bundles", 0, 1],
         "not in the catalog"),
        ({"coupons": [{"action": 1, "cost": 2.0}], "bundles": [[1, 1]]}, ["body", "bundles", 0, 1], "twice"),
        ({"coupons": [{"action": 1, "cost": 2.0}, {"action": 2, "cost": 1.0}], "bundles": [[1, 2], [2, 1]]},
         ["body", "bundles", 1], "same bundle"),
        ({"coupons": [{"action": 1, "cost": 2.0}, {"action": 2, "cost": 1.0}], "bundles": [[1, 2]],
          "max_per_bundle": 1}, ["body", "bundles", 0], "max_per_bundle"),
        ({"coupons": [{"action": 1, "cost": 2.0}], "bundles": [[]]}, ["body", "bundles", 0], ""),
        ({"coupons": [{"action": 1, "cost": 2.0}], "max_per_bundle": 0}, ["body", "max_per_bundle"], ""),
    ],
)  # fmt: skip
def test_a_catalog_that_breaks_a_rule_is_refused_naming_the_field(
    client: TestClient, body: dict[str, Any], loc: list[Any], words: str
) -> None:
    resp = put(client, {"budget": 10.0, **body})
    assert resp.status_code == 422, resp.text
    errors = resp.json()["detail"]
    assert any(e["loc"] == loc and words in e["msg"] for e in errors), errors
    assert client.get("/v1/admin/campaigns/c", headers=ADMIN).status_code == 404  # nothing stored


def test_a_patch_keeps_what_it_does_not_name_and_checks_the_whole(client: TestClient) -> None:
    assert put(client, {"budget": 100.0, **CATALOG}).status_code == 200
    # coupons without 3: the listed bundle [2, 3] names a coupon that is gone
    resp = client.patch("/v1/admin/campaigns/c", json={"coupons": CATALOG["coupons"][:2]}, headers=ADMIN)
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "bundles", 1, 1]
    view = client.patch("/v1/admin/campaigns/c", json={"bundles": [[1], [1, 3]]}, headers=ADMIN).json()
    assert [c["action"] for c in view["coupons"]] == [1, 2, 3]  # kept
    assert view["bundles"] == [{"action": 1, "coupons": [1], "cost": 2.0}, {"action": 1_000_002, "coupons": [1, 3],
                                                                            "cost": 12.0}]  # fmt: skip
    view = client.patch("/v1/admin/campaigns/c", json={"budget": 50.0}, headers=ADMIN).json()
    assert len(view["bundles"]) == 2
    # back to today's form: no catalog, the view and the answers as without one
    view = put(client, {"budget": 100.0, "coupons": [{"action": 1, "cost": 2.0}], "lambda": 0.0}).json()
    assert view["coupons"] == [{"action": 1, "cost": 2.0}] and view["bundles"] is view["max_per_bundle"] is None


def test_a_campaign_without_a_catalog_answers_as_before(client: TestClient, feature_dim: int) -> None:
    body = {"budget": 100.0, "coupons": [{"action": 1, "cost": 2.0}, {"action": 2, "kind": "amount", "value": 5.0}]}
    view = put(client, {**body, "lambda": 0.0}).json()
    assert view["coupons"] == [{"action": 1, "cost": 2.0}, {"action": 2, "cost": 5.0}]  # a plain catalog
    for d in decide(client, feature_dim, 8):
        assert set(d) == {"user_id", "decision_id", "action", "cost", "model_version", "lambda"}
