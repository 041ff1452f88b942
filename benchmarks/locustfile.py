"""A headless load test of a running service (locust): decisions mixed with the outcomes of the coupons
they issued, as a commerce backend sends them. Locust's summary gives p50/p95/p99 latency, throughput and
the error rate per route.

    SACO_ADMIN_TOKEN=... SACO_LOAD_FEATURE_DIM=8 .venv/bin/python -m locust -f benchmarks/locustfile.py \\
        --headless -u 32 -r 32 -t 60s --host http://127.0.0.1:8000 --only-summary

Settings (environment): SACO_ADMIN_TOKEN (creates the campaign at the start), SACO_LOAD_FEATURE_DIM (the
served model's feature_dim), SACO_LOAD_USERS_PER_REQUEST (users per decisions call, 16),
SACO_LOAD_CAMPAIGN (locust-<random>). docs/reliability.md has a run and the commands behind it.
"""

from __future__ import annotations

import os
import random
import uuid
from collections import deque
from typing import Any

from locust import FastHttpUser, between, events, task

FEATURE_DIM = int(os.environ.get("SACO_LOAD_FEATURE_DIM", "8"))
USERS_PER_REQUEST = int(os.environ.get("SACO_LOAD_USERS_PER_REQUEST", "16"))
CAMPAIGN = os.environ.get("SACO_LOAD_CAMPAIGN") or f"locust-{uuid.uuid4().hex[:8]}"
TOKEN = os.environ.get("SACO_ADMIN_TOKEN", "")
COUPONS = [{"action": 1, "cost": 2.0}, {"action": 2, "cost": 5.0}, {"action": 3, "cost": 10.0}]


@events.test_start.add_listener
def create_campaign(environment: Any, **_: Any) -> None:
    """The campaign every simulated client decides in (a budget no run exhausts)."""
    import httpx

    if environment.host and TOKEN:
        body = {"budget": 1e9, "coupons": COUPONS}
        headers = {"Authorization": f"Bearer {TOKEN}"}
        httpx.put(f"{environment.host}/v1/admin/campaigns/{CAMPAIGN}", json=body, headers=headers).raise_for_status()


class CommerceBackend(FastHttpUser):
    """Decides for a page of users, and later reports what became of the coupons (about half redeemed)."""

    wait_time = between(0.0, 0.01)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.unsettled: deque[dict[str, Any]] = deque(maxlen=4096)

    @task(3)
    def decide(self) -> None:
        requests = [
            {
                "user_id": f"user-{self.rng.randrange(100_000)}",
                "features": [self.rng.uniform(-1, 1) for _ in range(FEATURE_DIM)],
                "request_id": uuid.uuid4().hex,
            }
            for _ in range(USERS_PER_REQUEST)
        ]
        with self.client.post(
            f"/v1/campaigns/{CAMPAIGN}/decisions",
            json={"requests": requests},
            name="decisions",
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
                return
            self.unsettled.extend(d for d in resp.json()["decisions"] if d["action"])

    @task(1)
    def report_outcomes(self) -> None:
        batch = [self.unsettled.popleft() for _ in range(min(len(self.unsettled), USERS_PER_REQUEST))]
        if not batch:
            return
        outcomes = [
            {"decision_id": d["decision_id"], "reward": 10.0, "cost": d["cost"] if self.rng.random() < 0.5 else 0.0}
            for d in batch
        ]
        self.client.post(f"/v1/campaigns/{CAMPAIGN}/outcomes", json={"outcomes": outcomes}, name="outcomes")
