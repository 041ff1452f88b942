"""Random interleavings of reserve, settle, expire, budget change and retry against a real Redis
(hypothesis' stateful testing): CONTRACT §4 holds after every step and no cent is lost or counted twice.

The machine keeps its own account of every decision the store returned (what the client saw) and checks
the store's ledger against it: reserved = the coupons of open reservations, spent + overrun = every
accepted outcome's cost, a repeated request_id returns its first decision and reserves nothing, no new
coupon while spent + reserved is at or above the budget, otherwise spent + reserved <= budget, a settled
cost never above its coupon's cost, and the view's excess = spent + reserved - budget when positive."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from service.state import CampaignUpdate, CostAboveReservation, Outcome, ReserveItem
from service.state.store import StateStore

COUPONS = {1: 200, 2: 500, 3: 1000}  # cents
DAY_MS = 86_400_000
NOW = 1_800_000_000_000


@dataclass
class Seen:
    """A decision as the client saw it, and what happened to it since."""

    user_id: str
    action: int
    cost: int
    status: str = "R"  # R reserved, S settled, X expired (released)


def ledger_machine(url: str, prefix: str) -> type[RuleBasedStateMachine]:
    class Ledger(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.store = StateStore(url, prefix=prefix, cluster=False)
            self.campaign = uuid.uuid4().hex[:10]
            self.budget = 3000
            self.seen: dict[str, Seen] = {}
            self.requests: dict[str, str] = {}  # request id -> decision id
            self.settled_total = 0
            self.now = NOW
            self.users = 0
            self.call(self.store.upsert_campaign(self.campaign, CampaignUpdate(True, budget=3000, coupons=COUPONS)))

        def call(self, coroutine: Any) -> Any:
            return self.loop.run_until_complete(coroutine)

        def teardown(self) -> None:
            self.call(self.store.close())
            self.loop.close()

        def state(self) -> Any:
            return self.call(self.store.get_campaign(self.campaign))

        # ---- rules -------------------------------------------------------------------------------
        @rule(
            prefs=st.lists(st.permutations([3, 2, 1, 0]).map(lambda p: p[: p.index(0) + 1]), min_size=1, max_size=6),
            with_request_ids=st.booleans(),
        )
        def reserve(self, prefs: list[list[int]], with_request_ids: bool) -> None:
            before = self.state()
            items = []
            for p in prefs:
                self.users += 1
                user = f"u{self.users}"
                items.append(ReserveItem(user, f"r-{user}" if with_request_ids else None, p))
            result = self.call(self.store.reserve(self.campaign, items, **self.reserve_args()))
            full = before.spent + before.reserved >= before.budget
            for item, decision in zip(items, result.decisions, strict=True):
                assert decision.new and decision.user_id == item.user_id
                assert decision.cost == COUPONS.get(decision.action, 0)
                assert decision.action in item.preferences
                assert not (full and decision.action), "a coupon was granted while spent + reserved >= budget"
                self.seen[decision.decision_id] = Seen(item.user_id, decision.action, decision.cost)
                if item.request_id is not None:
                    self.requests[item.request_id] = decision.decision_id
            after = self.state()
            if not full:
                assert after.spent + after.reserved <= after.budget

        @precondition(lambda self: bool(self.requests))
        @rule(data=st.data())
        def retry(self, data: st.DataObject) -> None:
            """A client repeats requests it sent before (their request ids): the first decisions come back."""
            request_ids = data.draw(st.lists(st.sampled_from(sorted(self.requests)), min_size=1, max_size=4))
            items = [ReserveItem(self.seen[self.requests[r]].user_id, r, [3, 2, 1, 0]) for r in request_ids]
            before = self.state()
            result = self.call(self.store.reserve(self.campaign, items, **self.reserve_args()))
            for request_id, decision in zip(request_ids, result.decisions, strict=True):
                first = self.seen[self.requests[request_id]]
                assert not decision.new and decision.decision_id == self.requests[request_id]
                assert (decision.action, decision.cost) == (first.action, first.cost)
            after = self.state()
            assert (after.reserved, after.decisions) == (before.reserved, before.decisions)

        @precondition(lambda self: bool(self.seen))
        @rule(data=st.data())
        def settle(self, data: st.DataObject) -> None:
            ids = data.draw(st.lists(st.sampled_from(list(self.seen)), min_size=1, max_size=5))
            outcomes = [Outcome(d, 1.0, data.draw(st.integers(0, self.seen[d].cost))) for d in ids]
            result = self.call(self.store.settle(self.campaign, outcomes))
            accepted = duplicates = 0
            for outcome in outcomes:
                seen = self.seen[outcome.decision_id]
                if seen.status == "S":
                    duplicates += 1
                else:
                    accepted += 1
                    seen.status = "S"
                    self.settled_total += outcome.cost
            assert (result.accepted, result.duplicates, result.unknown) == (accepted, duplicates, 0)

        @precondition(lambda self: any(s.status != "S" and s.cost for s in self.seen.values()))
        @rule(data=st.data())
        def settle_above_the_coupon(self, data: st.DataObject) -> None:
            """A cost above the coupon's cost refuses the whole batch: nothing changes."""
            open_ids = [d for d, s in self.seen.items() if s.status != "S" and s.cost]
            decision_id = data.draw(st.sampled_from(open_ids))
            before = self.state()
            with pytest.raises(CostAboveReservation):
                self.call(
                    self.store.settle(self.campaign, [Outcome(decision_id, 1.0, self.seen[decision_id].cost + 1)])
                )
            assert self.state() == before

        @rule()
        def expire(self) -> None:
            """Time passes beyond the reservation expiry: the sweep releases every open reservation."""
            self.now += DAY_MS + 1
            self.call(self.store.sweep_expired(self.campaign, self.now))
            for seen in self.seen.values():
                if seen.status == "R":
                    seen.status = "X"

        @rule(budget=st.integers(0, 6000))
        def change_budget(self, budget: int) -> None:
            self.budget = budget
            self.call(self.store.upsert_campaign(self.campaign, CampaignUpdate(False, budget=budget)))

        def reserve_args(self) -> dict[str, Any]:
            return {
                "model_version": "v1",
                "lam": 0.5,
                "now_ms": self.now,
                "reservation_expiry_ms": DAY_MS,
                "decision_ttl_ms": 30 * DAY_MS,
            }

        # ---- invariants --------------------------------------------------------------------------
        @invariant()
        def ledger_matches_what_the_client_saw(self) -> None:
            state = self.state()
            assert state.budget == self.budget
            assert state.reserved == sum(s.cost for s in self.seen.values() if s.status == "R")
            assert state.spent + state.overrun == self.settled_total
            assert state.decisions == len(self.seen)
            assert state.excess == max(0, state.spent + state.reserved - state.budget)
            assert state.remaining == max(0, state.budget - state.spent - state.reserved)

    return Ledger


def test_ledger_under_random_interleavings(redis_url: str, redis_prefix: str) -> None:
    machine = ledger_machine(redis_url, redis_prefix)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=60,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            database=None,
        ),
    )
