"""A model scoring coupons and bundles by their features, served over HTTP for a catalog campaign, on each kind
of store: a bundle of several coupons ranks by the model's own score of it (not the additive rule); a coupon
the model never saw is scored and granted; the next decision's history reads each past decision's row of
the campaign's action table. A model by index still reads a bundle as its dominant coupon."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from svc_http import ADMIN

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/service: the published test models
from svc_feature_models import FEATURE_DIM, NUM_ACTIONS, TRAINING_CATALOG, publish

from contract.catalog import BUNDLE_ACTIONS, Catalog
from contract.inputs import ModelInputs
from service.policy import LoadedPolicy, load_policy
from service.scoring import build_inputs
from service.state.context import decode_context

BODY: dict[str, Any] = {
    "budget": 1_000_000.0,
    "lambda": 0.0,
    "coupons": [
        {"action": 1, "value": 2.0},
        {"action": 2, "kind": "percent", "value": 10.0, "cap": 5.0},  # an amount of 5.00 in training
        {"action": 3, "value": 3.0, "min_spend": 25.0, "class": "threshold"},  # never in training
    ],
    "max_per_bundle": 2,
}
CATALOG = Catalog.parse(BODY["coupons"], max_per_bundle=BODY["max_per_bundle"])
USERS = 200


@pytest.fixture
def model_store_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A store serving a random policy of the real model, by features (default) or by index ("index"): the
    first seed whose answers to the test's users (`decide`, seed 1) show what the tests look at."""
    by_features = getattr(request, "param", "features") == "features"
    for seed in range(32):
        store = tmp_path / f"store-{seed}"
        publish(store, by_features=by_features, seed=seed)
        if telling(load_policy(str(store), "cpu"), by_features):
            return store
    raise AssertionError("no seed of the random model tells the rules apart")


def telling(policy: LoadedPolicy, by_features: bool) -> bool:
    """Whether the policy's best decisions at lambda 0 for the test's users vary from user to user and show:
    by features, a bundle of several coupons granted, coupon 3 granted, and users the additive rule would
    answer otherwise for a bundle of several; by index, a bundle of several granted."""
    features = users_features(seed=1)
    inputs = build_inputs(policy.manifest, features, [None] * USERS, 0.0)
    if not by_features:
        best = answers(policy.scores(inputs)[:, :NUM_ACTIONS], CATALOG, None)
        return len(set(best)) > 1 and any(a > BUNDLE_ACTIONS for a in best)
    rows = CATALOG.action_rows(NUM_ACTIONS)
    out = policy.scores(inputs, rows.table)
    revenue, t = out[:, :NUM_ACTIONS], len(rows.table)
    model, additive = answers(revenue, CATALOG, out[:, NUM_ACTIONS:t]), answers(revenue, CATALOG, None)
    with_three = {b.action for b in CATALOG.bundles if 3 in b.coupons}
    return (
        len(set(model)) > 1
        and any(a > BUNDLE_ACTIONS for a in model)
        and any(a in with_three for a in model)
        and any(m != a and max(m, a) > BUNDLE_ACTIONS for m, a in zip(model, additive, strict=True))
    )


class RecordingPolicy(LoadedPolicy):
    """The served policy (its real TorchScript runs), keeping each forward's inputs, table and output."""

    seen: list[tuple[ModelInputs, np.ndarray | None, np.ndarray]]

    def scores(self, inputs: ModelInputs, table: np.ndarray | None = None) -> np.ndarray:
        out = super().scores(inputs) if table is None else super().scores(inputs, table)
        self.seen.append((inputs, table, out))
        return out


def recording(client: TestClient) -> RecordingPolicy:
    runtime: Any = client.app.state.runtime  # type: ignore[attr-defined]
    current: LoadedPolicy = runtime.policies.current
    policy = RecordingPolicy(current.artifact, current.module, current.device)
    object.__setattr__(policy, "seen", [])
    runtime.policies.current = policy
    return policy


def users_features(seed: int) -> np.ndarray:
    """The test's users' features: far apart, so that users differ in what they get."""
    return np.random.default_rng(seed).normal(size=(USERS, FEATURE_DIM), scale=10.0).round(3).astype(np.float32)


def decide(client: TestClient, seed: int) -> list[dict[str, Any]]:
    features = users_features(seed)
    requests = [{"user_id": f"u{i}", "features": features[i].tolist()} for i in range(USERS)]
    resp = client.post("/v1/campaigns/c/decisions", json={"requests": requests})
    assert resp.status_code == 200, resp.text
    return list(resp.json()["decisions"])


def answers(revenue: np.ndarray, catalog: Catalog, bundle_revenue: np.ndarray | None) -> list[int]:
    """Each user's best decision at lambda 0 (score = revenue term), by the catalog's bundles: a coupon alone its
    own column, a bundle of several its column of `bundle_revenue` (None: no coupon's revenue plus its
    coupons' gains over it)."""
    several = [b for b in catalog.bundles if len(b.coupons) > 1]
    best = []
    for u in range(len(revenue)):
        options = {0: float(revenue[u, 0])}
        for b in catalog.bundles:
            if len(b.coupons) == 1:
                options[b.action] = float(revenue[u, b.action])
            elif bundle_revenue is None:
                gains = sum(float(revenue[u, a]) - float(revenue[u, 0]) for a in b.coupons)
                options[b.action] = float(revenue[u, 0]) + gains
            else:
                options[b.action] = float(bundle_revenue[u, several.index(b)])
        best.append(max(options, key=lambda a: options[a]))
    return best


def test_bundles_rank_by_the_models_own_scores_and_a_new_coupon_is_granted(client: TestClient) -> None:
    policy = recording(client)
    assert client.put("/v1/admin/campaigns/c", json=BODY, headers=ADMIN).status_code == 200
    decisions = decide(client, seed=1)
    ((inputs, table, out),) = policy.seen
    rows = CATALOG.action_rows(NUM_ACTIONS)
    assert table is not None
    np.testing.assert_array_equal(table, rows.table)  # the campaign's table: K coupon rows, then 1+2, 1+3, 2+3
    t = len(rows.table)
    assert out.shape == (USERS, 3 * t) and inputs.rows == USERS
    revenue, bundle_revenue = out[:, :NUM_ACTIONS], out[:, NUM_ACTIONS:t]
    model, additive = answers(revenue, CATALOG, bundle_revenue), answers(revenue, CATALOG, None)
    assert [d["action"] for d in decisions] == model
    differ = [u for u in range(USERS) if model[u] != additive[u]]
    assert any(model[u] > BUNDLE_ACTIONS or additive[u] > BUNDLE_ACTIONS for u in differ), (
        "no user whose bundle of several the model and the additive rule rank differently"
    )
    # coupon 3, which the model never saw, is scored by what it gives, and granted
    assert not TRAINING_CATALOG.action_rows(NUM_ACTIONS).table[3, 1:].any()  # row 3 gave nothing in training
    assert rows.table[3, 1:].any() and not np.allclose(revenue[:, 3], revenue[:, 0])
    granted = [d for d in decisions if 3 in [c["action"] for c in d.get("coupons", [])]]
    assert granted, "coupon 3 was never granted"
    for d in decisions:
        bundle = CATALOG.bundles[[b.action for b in CATALOG.bundles].index(d["action"])] if d["action"] else None
        assert [c["action"] for c in d["coupons"]] == ([] if bundle is None else list(bundle.coupons))


def test_the_history_reads_each_past_decisions_row(client: TestClient) -> None:
    policy = recording(client)
    assert client.put("/v1/admin/campaigns/c", json=BODY, headers=ADMIN).status_code == 200
    first = [d["action"] for d in decide(client, seed=1)]
    assert any(a > BUNDLE_ACTIONS for a in first)
    runtime: Any = client.app.state.runtime  # type: ignore[attr-defined]
    client.portal.call(runtime.decisions.drain)  # type: ignore[union-attr]
    # the contexts hold each decision's action as answered
    _, contexts = client.portal.call(  # type: ignore[union-attr]
        runtime.store.load_for_decision, "c", [f"u{i}" for i in range(USERS)]
    )
    held = [int(view.steps["action"][-1]) for view in map(decode_context, contexts) if view is not None]
    assert held == first
    decide(client, seed=2)
    inputs, table, _ = policy.seen[-1]
    rows = CATALOG.action_rows(NUM_ACTIONS)
    expected = rows.rows(np.array(first))
    assert (expected >= NUM_ACTIONS).any()  # some users' last decision was a bundle of several: its own row
    np.testing.assert_array_equal(inputs.actions[:, -2], expected)
    assert table is not None
    np.testing.assert_array_equal(table, rows.table)


@pytest.mark.parametrize("model_store_dir", ["index"], indirect=True)
def test_a_model_by_index_reads_a_bundle_as_its_dominant_coupon(client: TestClient) -> None:
    policy = recording(client)
    assert client.put("/v1/admin/campaigns/c", json=BODY, headers=ADMIN).status_code == 200
    first = [d["action"] for d in decide(client, seed=1)]
    inputs, table, out = policy.seen[-1]
    assert table is None and out.shape == (USERS, 3 * NUM_ACTIONS)
    assert first == answers(out[:, :NUM_ACTIONS], CATALOG, None)  # the additive rule, as always
    assert any(a > BUNDLE_ACTIONS for a in first)
    runtime: Any = client.app.state.runtime  # type: ignore[attr-defined]
    client.portal.call(runtime.decisions.drain)  # type: ignore[union-attr]
    decide(client, seed=2)
    inputs, _, _ = policy.seen[-1]
    costs = {1: 200, 2: 500, 3: 300}  # the dearest coupon of a bundle stands for it: 1+2 -> 2, 1+3 -> 3, 2+3 -> 2
    dearest = {b.action: max(b.coupons, key=lambda a: costs[a]) for b in CATALOG.bundles}
    expected = [0 if a == 0 else dearest[a] for a in first]
    assert inputs.actions[:, -2].tolist() == expected
