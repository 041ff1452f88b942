"""The budget invariant under a race (CONTRACT.md §4): 4 service processes on one Redis (standalone or
Cluster), or one process on the embedded store, concurrent clients issuing 20,000+ decisions against a
small budget, retries through other processes, outcomes settling as they go, and a poller checking
`spent + reserved <= budget` at every observation (strict mode). In expected mode the same race keeps the
ledger exact (what is reserved is what the live records hold, what is spent is what was settled) and
issues more coupons than the budget could reserve at their cost."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from svc_served import ADMIN, serve

from model_store import ModelStore
from service.state.embedded import EmbeddedRedis
from service.state.store import StateStore, parse_decision_record

BUDGET = 300.0
COUPONS = [{"action": 1, "cost": 2.0}, {"action": 2, "cost": 5.0}, {"action": 3, "cost": 10.0}]
CLIENTS, BATCHES, USERS_PER_BATCH = 16, 40, 32  # 20,480 decisions, each batch retried once


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["strict", "expected"])
def test_concurrent_processes_never_overspend(
    store_kind: str,
    mode: str,
    model_store_dir: Path,
    redis_prefix: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    dim = ModelStore(model_store_dir).load().manifest.feature_dim
    embedded = store_kind == "embedded"
    redis_url = None if embedded else request.getfixturevalue("store_url")
    state_dir = tmp_path / "state"
    with serve(
        model_store_dir,
        redis_url,
        prefix=redis_prefix,
        count=1 if embedded else 4,  # processes share a Redis; the embedded store is one process's own
        log_dir=tmp_path,
        extra_env={"SACO_STATE_DIR": str(state_dir)},
    ) as served:
        bases = served * (4 // len(served))
        admin = httpx.Client(timeout=30)
        # lambda 0 makes coupons attractive, so the budget is the binding constraint
        resp = admin.put(
            bases[0] + "/v1/admin/campaigns/race",
            headers=ADMIN,
            json={"budget": BUDGET, "coupons": COUPONS, "lambda": 0.0, "reservation_mode": mode},
        )
        assert resp.status_code == 200

        issued: dict[str, float] = {}  # decision_id -> cost of every coupon handed out
        settled: dict[str, float] = {}  # decision_id -> realized cost sent as its outcome
        errors: list[str] = []
        observations: list[tuple[float, float]] = []
        lock = threading.Lock()
        done = threading.Event()

        def poll() -> None:
            with httpx.Client(timeout=30) as http:
                while not done.is_set():
                    camp = http.get(bases[len(observations) % 4] + "/v1/admin/campaigns/race", headers=ADMIN).json()
                    observations.append((camp["spent"], camp["reserved"]))
                    time.sleep(0.02)

        redeemed = 0.5 if mode == "strict" else 0.2

        def client(k: int) -> None:
            rng = random.Random(k)
            with httpx.Client(timeout=60) as http:
                for b in range(BATCHES):
                    reqs = [
                        {
                            "user_id": f"r{k}-{rng.randrange(200)}",
                            "features": [rng.gauss(0, 1) for _ in range(dim)],
                            "request_id": f"q{k}-{b}-{j}",
                        }
                        for j in range(USERS_PER_BATCH)
                    ]
                    decisions = decide_twice(http, bases, k, "race", reqs, errors)
                    if decisions is None:
                        continue
                    coupons = [d for d in decisions if d["action"] > 0]
                    with lock:
                        for d in coupons:
                            issued[d["decision_id"]] = d["cost"]
                    # settle some: the realized cost is the reservation or nothing (never more)
                    outcomes = [
                        {
                            "decision_id": d["decision_id"],
                            "reward": 1.0,
                            "cost": d["cost"] if rng.random() < redeemed else 0.0,
                        }
                        for d in coupons
                        if rng.random() < 0.3
                    ]
                    if outcomes:
                        resp = http.post(
                            bases[(k + 2) % 4] + "/v1/campaigns/race/outcomes", json={"outcomes": outcomes}
                        )
                        if resp.status_code != 200 or resp.json()["accepted"] != len(outcomes):
                            errors.append(f"outcomes {resp.status_code} {resp.text[:100]}")
                        with lock:
                            settled.update((o["decision_id"], o["cost"]) for o in outcomes)

        poller = threading.Thread(target=poll)
        poller.start()
        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(client, range(CLIENTS)))
        elapsed = time.monotonic() - started
        done.set()
        poller.join()

        assert not errors, errors[:3]
        assert len(observations) > 10
        camp = admin.get(bases[3] + "/v1/admin/campaigns/race", headers=ADMIN).json()
        assert camp["decisions"] == CLIENTS * BATCHES * USERS_PER_BATCH  # retries reserved nothing more
        live = {d: c for d, c in issued.items() if d not in settled}
        assert camp["spent"] == pytest.approx(sum(settled.values()), abs=1e-6)
        if mode == "strict":
            for spent, reserved in observations:
                assert spent + reserved <= BUDGET + 1e-9, (spent, reserved)
            assert camp["reserved"] == pytest.approx(sum(live.values()), abs=1e-6)
            assert camp["spent"] + camp["reserved"] <= BUDGET
            assert sum(issued.values()) > BUDGET / 2  # the race really fought over the budget
        else:  # each coupon reserves its expected cost: more coupons than the budget holds at their cost
            assert camp["reserved"] <= sum(live.values()) and sum(issued.values()) > BUDGET
            assert camp["spent"] <= BUDGET * 1.01
    # the ledger equals the sum of the live reservations recorded in Redis itself (the embedded store's
    # from its append-only file, after the service stopped)
    private = EmbeddedRedis(state_dir) if embedded else None
    url = private.start() if private is not None else redis_url
    assert url is not None
    try:
        reserved = asyncio.run(live_reservations(url, redis_prefix))
    finally:
        if private is not None:
            private.stop()
    assert sum(reserved.values()) == round(camp["reserved"] * 100)
    assert set(reserved) == set(live) if mode == "strict" else set(reserved) <= set(live)
    print(f"race: {camp['decisions']} decisions in {elapsed:.1f}s, {len(observations)} observations")


def decide_twice(
    http: httpx.Client, bases: list[str], k: int, campaign: str, reqs: list[dict[str, Any]], errors: list[str]
) -> list[dict[str, Any]] | None:
    """Client k's request through one process, then retried through the next: the first answer, or None
    (an error noted) when either failed or the retry answered other decisions."""
    first = http.post(bases[k % 4] + f"/v1/campaigns/{campaign}/decisions", json={"requests": reqs})
    retry = http.post(bases[(k + 1) % 4] + f"/v1/campaigns/{campaign}/decisions", json={"requests": reqs})
    if first.status_code != 200 or retry.status_code != 200:
        errors.append(f"{first.status_code} {retry.status_code} {first.text[:100]}")
        return None
    decisions: list[dict[str, Any]] = first.json()["decisions"]
    if retry.json()["decisions"] != decisions:
        errors.append("a retried request_id gave another decision")
    return decisions


async def live_reservations(url: str, prefix: str) -> dict[str, int]:
    """Decision id -> cents of every record still reserved, read from the store's pending batches."""
    store = StateStore(url, prefix=prefix)
    try:
        client = await store.client()
        batches = [m.decode() for m in await client.zrange(store.keys.pending_key("race"), 0, -1)]
        assert batches  # one entry per batch that reserved
        reserved: dict[str, int] = {}
        for batch in batches:
            for field, raw in (await client.hgetall(store.keys.batch_key("race", batch))).items():
                record = parse_decision_record(raw)
                assert record["status"] in {"R", "S"}
                if record["status"] == "R" and int(record["reserved"]):
                    reserved[f"d-{batch}-{field.decode()}"] = int(record["reserved"])
        return reserved
    finally:
        await store.close()


# stock binds, not the budget: 8 + 12 units fought over by bundles of one and two coupons
STOCKED: dict[str, Any] = {
    "coupons": [
        {"action": 1, "cost": 2.0, "stock": 8},
        {"action": 2, "kind": "percent", "value": 10.0, "cap": 5.0, "stock": 12},
        {"action": 3, "cost": 10.0},
    ],
    "bundles": [[1], [2], [1, 2], [2, 3], [1, 3]],
}


@pytest.mark.slow
def test_concurrent_processes_never_oversell_stock(
    store_kind: str, model_store_dir: Path, redis_prefix: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """4 processes on one Redis (one on the embedded store), 16 clients with retries through other processes
    and outcomes that redeem some coupons of a bundle and leave others unused (their units come back): at
    every observation no coupon has more units held or redeemed than its stock, and at the end the store's
    count of each is the clients' own."""
    dim = ModelStore(model_store_dir).load().manifest.feature_dim
    embedded = store_kind == "embedded"
    redis_url = None if embedded else request.getfixturevalue("store_url")
    stock = {c["action"]: c["stock"] for c in STOCKED["coupons"] if "stock" in c}
    with serve(
        model_store_dir,
        redis_url,
        prefix=redis_prefix,
        count=1 if embedded else 4,
        log_dir=tmp_path,
        extra_env={"SACO_STATE_DIR": str(tmp_path / "state")},
    ) as served:
        bases = served * (4 // len(served))
        admin = httpx.Client(timeout=30)
        resp = admin.put(
            bases[0] + "/v1/admin/campaigns/stock", headers=ADMIN, json={"budget": 1e6, "lambda": 0.0, **STOCKED}
        )
        assert resp.status_code == 200, resp.text
        held: dict[int, int] = dict.fromkeys(stock, 0)  # units granted less units returned, by the clients' count
        errors: list[str] = []
        lows: list[int] = []
        lock = threading.Lock()
        done = threading.Event()

        def poll() -> None:
            with httpx.Client(timeout=30) as http:
                while not done.is_set():
                    view = http.get(bases[len(lows) % 4] + "/v1/admin/campaigns/stock", headers=ADMIN).json()
                    lows.append(min(c["stock_left"] for c in view["coupons"] if c["stock"] is not None))
                    time.sleep(0.02)

        def client(k: int) -> None:
            rng = random.Random(k)
            with httpx.Client(timeout=60) as http:
                for b in range(10):
                    reqs = [
                        {"user_id": f"s{k}-{b}-{j}", "features": [rng.gauss(0, 1) for _ in range(dim)],
                         "request_id": f"s{k}-{b}-{j}"}
                        for j in range(16)
                    ]  # fmt: skip
                    decisions = decide_twice(http, bases, k, "stock", reqs, errors)
                    if decisions is None:
                        continue
                    granted = [d for d in decisions if d["coupons"]]
                    outcomes = []
                    for d in granted:
                        if rng.random() < 0.5:  # an outcome: each coupon redeemed in full or not at all
                            used = [c for c in d["coupons"] if rng.random() < 0.5]
                            cost = round(sum(c["cost"] for c in used), 2)
                            outcomes.append({"decision_id": d["decision_id"], "reward": 1.0, "cost": cost,
                                             "coupons": used})  # fmt: skip
                        else:
                            used = d["coupons"]  # no outcome yet: every unit stays held
                        with lock:
                            for c in used:
                                if c["action"] in held:
                                    held[c["action"]] += 1
                    if outcomes:
                        resp = http.post(
                            bases[(k + 2) % 4] + "/v1/campaigns/stock/outcomes", json={"outcomes": outcomes}
                        )
                        if resp.status_code != 200 or resp.json()["accepted"] != len(outcomes):
                            errors.append(f"outcomes {resp.status_code} {resp.text[:100]}")

        poller = threading.Thread(target=poll)
        poller.start()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(client, range(CLIENTS)))
        done.set()
        poller.join()

        assert not errors, errors[:3]
        assert len(lows) > 10 and min(lows) >= 0
        view = admin.get(bases[3] + "/v1/admin/campaigns/stock", headers=ADMIN).json()
        assert 0 in lows  # the race took every unit of a coupon
        for coupon in view["coupons"]:
            if coupon["stock"] is not None:
                assert coupon["stock"] - coupon["stock_left"] == held[coupon["action"]], coupon
        print(f"stock race: {view['decisions']} decisions, {len(lows)} observations, held {held}")
