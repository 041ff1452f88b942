"""The state-store contract, run against both implementations (embedded and a real Redis)."""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from service.engine import new_decision_ids
from service.state import (
    CampaignNotFound,
    CampaignUpdate,
    CostAboveReservation,
    NewStep,
    Outcome,
    ReserveItem,
    StateStore,
)
from service.state.context import append_step, decode_context, empty_context
from service.state.memory import MemoryStateStore
from service.state.redis_store import RedisStateStore, parse_decision_record
from service.state.resp import pack_command

Scenario = Callable[[StateStore], Awaitable[Any]]
DAY_MS = 86_400_000


@pytest.fixture(params=["memory", "redis"])
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Scenario], Any]]:
    """Run an async scenario against a fresh store of the parametrized kind."""

    def runner(scenario: Scenario) -> Any:
        async def main() -> Any:
            store: StateStore
            if request.param == "memory":
                store = MemoryStateStore()
            else:
                url = request.getfixturevalue("redis_url")
                prefix = request.getfixturevalue("redis_prefix")
                store = RedisStateStore(url, prefix=prefix)
            try:
                return await scenario(store)
            finally:
                await store.close()

        return asyncio.run(main())

    yield runner


def put(budget: int, coupons: dict[int, int] | None = None, **kw: Any) -> CampaignUpdate:
    return CampaignUpdate(replace=True, budget=budget, coupons=coupons or {1: 200, 2: 500, 3: 1000}, **kw)


async def reserve(
    store: StateStore,
    campaign: str,
    items: list[ReserveItem],
    now: int | None = None,
    expiry_ms: int = DAY_MS,
) -> Any:
    return await store.reserve(
        campaign,
        items,
        model_version="v1",
        lam=0.25,
        now_ms=now if now is not None else int(time.time() * 1000),
        reservation_expiry_ms=expiry_ms,
        decision_ttl_ms=30 * DAY_MS,
    )


def item(n: int, prefs: list[int], request_id: str | None = None, user: str | None = None) -> ReserveItem:
    return ReserveItem(f"d-{n}", user or f"u{n}", request_id, prefs)


def test_campaign_put_patch_get(run: Callable[[Scenario], Any]) -> None:
    async def scenario(store: StateStore) -> None:
        assert await store.get_campaign("c") is None
        with pytest.raises(CampaignNotFound):
            await store.upsert_campaign("c", CampaignUpdate(replace=False, budget=5))
        state = await store.upsert_campaign("c", put(10_000, admin_lambda=0.3, expected_users=10))
        assert (state.budget, state.spent, state.reserved, state.admin_lambda) == (10_000, 0, 0, 0.3)
        assert state.coupons == {1: 200, 2: 500, 3: 1000} and state.expected_users == 10
        state = await store.upsert_campaign("c", CampaignUpdate(replace=False, budget=20_000))
        assert state.budget == 20_000 and state.admin_lambda == 0.3 and state.coupons[3] == 1000
        state = await store.upsert_campaign("c", CampaignUpdate(replace=False, clear_lambda=True))
        assert state.admin_lambda is None
        state = await store.upsert_campaign("c", CampaignUpdate(replace=False, admin_lambda=0.5))
        assert state.admin_lambda == 0.5
        state = await store.upsert_campaign("c", put(100))  # PUT clears what it does not name
        assert state.admin_lambda is None and state.expected_users is None and state.budget == 100
        assert await store.campaign_ids() == ["c"]
        got = await store.get_campaign("c")
        assert got == state

    run(scenario)


def test_reserve_fits_budget_in_priority_order_with_fallback(run: Callable[[Scenario], Any]) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(1_200))
        result = await reserve(
            store,
            "c",
            [
                item(1, [3, 2, 0]),  # 10.00 fits (12.00 left)
                item(2, [3, 1, 0]),  # 10.00 does not fit 2.00 -> the next preferred that fits: 1 (2.00)
                item(3, [2, 1, 0]),  # nothing left
                item(4, [0]),  # the policy prefers no coupon
            ],
        )
        got = [(d.decision_id, d.action, d.cost, d.new, d.downgraded) for d in result.decisions]
        assert got == [
            ("d-1", 3, 1000, True, False),
            ("d-2", 1, 200, True, True),
            ("d-3", 0, 0, True, True),
            ("d-4", 0, 0, True, False),
        ]
        assert result.remaining == 0
        state = await store.get_campaign("c")
        assert state is not None and (state.reserved, state.spent, state.decisions) == (1_200, 0, 4)
        assert state.model_version == "v1"
        assert result.decisions[0].lam == 0.25 and result.decisions[0].model_version == "v1"

    run(scenario)


def test_preferences_below_no_coupon_are_never_issued(run: Callable[[Scenario], Any]) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(100))  # only 1.00: nothing fits
        result = await reserve(store, "c", [item(1, [1, 0, 2])])
        assert result.decisions[0].action == 0

    run(scenario)


def test_coupons_not_in_the_campaign_are_skipped(run: Callable[[Scenario], Any]) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000, {2: 500}))
        result = await reserve(store, "c", [item(1, [3, 2, 0])])
        assert (result.decisions[0].action, result.decisions[0].cost) == (2, 500)

    run(scenario)


def test_request_id_is_idempotent(run: Callable[[Scenario], Any]) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000))
        first = await reserve(store, "c", [item(1, [3, 0], "r1"), item(2, [2, 0], "r1")])
        assert [d.decision_id for d in first.decisions] == ["d-1", "d-1"]  # same request_id twice in a batch
        assert [d.new for d in first.decisions] == [True, False]
        again = await reserve(store, "c", [item(9, [1, 0], "r1", user="other")])
        d = again.decisions[0]
        assert (d.decision_id, d.action, d.cost, d.user_id, d.new) == ("d-1", 3, 1000, "u1", False)
        state = await store.get_campaign("c")
        assert state is not None and state.reserved == 1000 and state.decisions == 1

    run(scenario)


def test_unknown_campaign(run: Callable[[Scenario], Any]) -> None:
    async def scenario(store: StateStore) -> None:
        with pytest.raises(CampaignNotFound):
            await reserve(store, "nope", [item(1, [1, 0])])
        with pytest.raises(CampaignNotFound):
            await store.settle("nope", [Outcome("d-1", 1.0, 0)])
        campaign, contexts = await store.load_for_decision("nope", ["a"])
        assert campaign is None and contexts == []

    run(scenario)


def test_settle_replaces_reservation_with_realized_cost(run: Callable[[Scenario], Any]) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000))
        await reserve(store, "c", [item(1, [3, 0]), item(2, [2, 0]), item(3, [1, 0]), item(4, [0])])
        result = await store.settle(
            "c",
            [
                Outcome("d-1", 12.5, 700),
                Outcome("d-2", 0.0, 0),
                Outcome("d-1", 12.5, 700),
                Outcome("zzz", 1.0, 0),
                Outcome("d-4", 3.0, 0),
            ],
        )
        assert (result.accepted, result.duplicates, result.unknown) == (3, 1, 1)
        assert sorted(u for u, *_ in result.context_updates) == ["u1", "u2", "u4"]
        state = await store.get_campaign("c")
        assert state is not None and (state.spent, state.reserved) == (700, 200)
        assert result.remaining == 10_000 - 900
        again = await store.settle("c", [Outcome("d-1", 12.5, 700)])
        assert (again.accepted, again.duplicates) == (0, 1)

    run(scenario)


def test_cost_above_reservation_refuses_the_whole_batch(run: Callable[[Scenario], Any]) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000))
        await reserve(store, "c", [item(1, [1, 0]), item(2, [1, 0]), item(3, [0])])
        with pytest.raises(CostAboveReservation) as info:
            await store.settle("c", [Outcome("d-1", 1.0, 200), Outcome("d-2", 1.0, 201)])
        assert info.value.index == 1
        with pytest.raises(CostAboveReservation):
            await store.settle("c", [Outcome("d-3", 1.0, 1)])  # no coupon, no cost
        state = await store.get_campaign("c")
        assert state is not None and (state.spent, state.reserved) == (0, 400)

    run(scenario)


def test_sweep_releases_expired_reservations_and_late_outcomes_still_count(
    run: Callable[[Scenario], Any],
) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(1_500))
        now = int(time.time() * 1000)
        await reserve(store, "c", [item(1, [3, 0]), item(2, [2, 0])], now=now, expiry_ms=1000)
        assert await store.sweep_expired("c", now + 999) == 0
        assert await store.sweep_expired("c", now + 1000) == 2
        assert await store.sweep_expired("c", now + 5000) == 0
        state = await store.get_campaign("c")
        assert state is not None and state.reserved == 0
        # a new reservation takes the freed budget; a late outcome is charged only as far as it fits
        await reserve(store, "c", [item(3, [3, 0])], now=now + 2000)
        late = await store.settle("c", [Outcome("d-2", 4.0, 500), Outcome("d-1", 1.0, 1000)])
        assert late.accepted == 2
        state = await store.get_campaign("c")
        assert state is not None
        assert (state.reserved, state.spent, state.overrun) == (1000, 500, 1000)
        assert state.spent + state.reserved <= state.budget

    run(scenario)


def test_lowering_the_budget_below_the_ledger_stops_new_coupons(run: Callable[[Scenario], Any]) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(2_000))
        await reserve(store, "c", [item(1, [3, 0]), item(2, [3, 0])])
        state = await store.upsert_campaign("c", CampaignUpdate(replace=False, budget=1_500))
        assert (state.reserved, state.remaining) == (2_000, 0)
        result = await reserve(store, "c", [item(3, [1, 0])])
        assert result.decisions[0].action == 0 and result.remaining == -500
        await store.settle("c", [Outcome("d-1", 0.0, 0)])
        result = await reserve(store, "c", [item(4, [3, 0])])
        assert result.decisions[0].action == 0  # 5.00 left: the 10.00 coupon does not fit
        result = await reserve(store, "c", [item(5, [3, 2, 0])])
        assert result.decisions[0].action == 2

    run(scenario)


ONE, TWO = struct.pack("<f", 1.0), struct.pack("<f", 2.0)  # 1-feature states


def test_contexts_append_trim_and_take_outcomes(run: Callable[[Scenario], Any]) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000))
        kw: dict[str, Any] = {"capacity": 3, "ttl_ms": DAY_MS, "initial_rtg": 50.0, "initial_ctg": 20.0}
        for n in range(5):
            await store.append_steps("c", [NewStep("u", f"d-{n}", n % 4, ONE)], **kw)
        await store.append_steps("c", [NewStep("v", "d-v", 1, TWO)], **kw)
        campaign, raw = await store.load_for_decision("c", ["u", "v", "w"])
        assert campaign is not None and raw[2] is None
        u, v = decode_context(raw[0]), decode_context(raw[1])
        assert u is not None and v is not None
        assert u.t == 5 and u.decision_ids == ["d-2", "d-3", "d-4"]
        assert u.steps["t"].tolist() == [2, 3, 4] and u.steps["features"].tolist() == [[1.0]] * 3
        assert (v.t, v.rtg, v.ctg, v.decision_ids) == (1, 50.0, 20.0, ["d-v"])
        assert v.steps[0].tolist() == (b"d-v", 1, 0.0, 0.0, 50.0, 20.0, 0, [2.0])
        # one call for several outcomes, two of them for the same user, one for a trimmed step
        await store.apply_outcomes_to_contexts(
            "c", [("u", "d-3", 10.0, 250), ("v", "d-v", 2.0, 0), ("u", "d-0", 1.0, 0)], ttl_ms=DAY_MS
        )
        _, (raw_u,) = await store.load_for_decision("c", ["u"])
        u = decode_context(raw_u)
        assert u is not None
        assert u.rtg == pytest.approx(39.0) and u.ctg == pytest.approx(17.5)
        d2, d3, d4 = u.steps.tolist()
        assert d2[2:5] == (0.0, 0.0, 50.0)
        assert d3[2:6] == (10.0, 2.5, 50.0, 20.0)
        assert d4[4:6] == (40.0, 17.5)
        # one call appending for several users
        await store.append_steps("c", [NewStep("u", "d-5", 2, ONE), NewStep("w", "d-w", 3, TWO)], **kw)
        _, raw = await store.load_for_decision("c", ["u", "w"])
        u, w = decode_context(raw[0]), decode_context(raw[1])
        assert u is not None and w is not None
        assert u.steps[-1].tolist()[4:7] == (pytest.approx(39.0), pytest.approx(17.5), 5)
        assert (w.t, w.decision_ids, w.steps["action"].tolist()) == (1, ["d-w"], [3])

    run(scenario)


def test_both_stores_write_byte_identical_contexts(redis_url: str, redis_prefix: str) -> None:
    """The Lua scripts and the Python operations of service.state.context are one format."""

    async def history(store: StateStore, campaign: str, with_reads: bool) -> list[bytes | None]:
        """Appends and outcomes; with_reads: each append carries the context as read just before it (the
        decision path's way: Redis stores the value derived from it), else none (Redis appends in Lua)."""
        await store.upsert_campaign(campaign, put(10_000))
        kw: dict[str, Any] = {"capacity": 2, "ttl_ms": DAY_MS, "initial_rtg": 7.25, "initial_ctg": 3.5}
        features = struct.pack("<3f", 0.5, -1.0, 1e-3)
        for n in range(4):
            _, read = await store.load_for_decision(campaign, ["a", "b"])
            steps = [
                NewStep(u, f"d-{u}{n}", n, features, read[i] if with_reads else None) for i, u in enumerate(("a", "b"))
            ]
            await store.append_steps(campaign, steps, **kw)
            await store.apply_outcomes_to_contexts(campaign, [("a", f"d-a{n}", 1.5 * n, 25 * n)], ttl_ms=DAY_MS)
        _, contexts = await store.load_for_decision(campaign, ["a", "b"])
        return contexts

    async def main() -> list[list[bytes | None]]:
        memory, redis_store = MemoryStateStore(), RedisStateStore(redis_url, prefix=redis_prefix)
        try:
            return [
                await history(memory, "c", with_reads=True),
                await history(redis_store, "c", with_reads=False),
                await history(redis_store, "c2", with_reads=True),
            ]
        finally:
            await redis_store.close()

    in_memory, in_redis_lua, in_redis_from_reads = asyncio.run(main())
    assert in_memory == in_redis_lua == in_redis_from_reads and all(in_memory)


def test_an_append_from_a_stale_read_keeps_what_changed_since(run: Callable[[Scenario], Any]) -> None:
    """A decision's step carries the context as it read it; an outcome or another decision that changed
    the context in between must not be lost (the Redis store then appends in Lua instead)."""

    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000))
        kw: dict[str, Any] = {"capacity": 5, "ttl_ms": DAY_MS, "initial_rtg": 50.0, "initial_ctg": 20.0}
        await store.append_steps("c", [NewStep("u", "d-0", 1, ONE)], **kw)
        _, (read,) = await store.load_for_decision("c", ["u"])
        await store.apply_outcomes_to_contexts("c", [("u", "d-0", 3.0, 100)], ttl_ms=DAY_MS)  # after the read
        await store.append_steps("c", [NewStep("u", "d-1", 2, ONE, read)], **kw)
        _, (read,) = await store.load_for_decision("c", ["u"])
        await store.append_steps("c", [NewStep("u", "d-2", 3, ONE)], **kw)  # another decision, after the read
        await store.append_steps("c", [NewStep("u", "d-3", 1, ONE, read)], **kw)
        _, (raw,) = await store.load_for_decision("c", ["u"])
        u = decode_context(raw)
        assert u is not None and (u.t, u.decision_ids) == (4, ["d-0", "d-1", "d-2", "d-3"])
        assert (u.rtg, u.ctg) == (47.0, 19.0)
        assert u.steps["reward"].tolist() == [3.0, 0.0, 0.0, 0.0] and u.steps["rtg"].tolist() == [
            50.0,
            47.0,
            47.0,
            47.0,
        ]
        # a fresh read: the stored value is exactly the read with the step appended
        await store.append_steps("c", [NewStep("u", "d-4", 2, ONE, raw)], **kw)
        _, (after,) = await store.load_for_decision("c", ["u"])
        initial = empty_context(1, 50.0, 20.0)
        assert after == append_step(raw, NewStep("u", "d-4", 2, ONE).encoded(), 5, initial)

    run(scenario)


def test_context_capacity_zero_keeps_only_running_values(run: Callable[[Scenario], Any]) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000))
        await store.append_steps(
            "c", [NewStep("u", "d-1", 1, ONE)], capacity=0, ttl_ms=DAY_MS, initial_rtg=5.0, initial_ctg=2.0
        )
        _, (raw,) = await store.load_for_decision("c", ["u"])
        u = decode_context(raw)
        assert u is not None and (u.t, u.rtg, u.ctg, len(u.steps)) == (1, 5.0, 2.0, 0)

    run(scenario)


def test_concurrent_reservations_never_overspend(run: Callable[[Scenario], Any]) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(5_000))

        async def worker(w: int) -> int:
            total = 0
            for r in range(10):
                res = await reserve(store, "c", [item(w * 1000 + r * 10 + j, [3, 2, 1, 0]) for j in range(5)])
                total += sum(d.cost for d in res.decisions)
            return total

        totals = await asyncio.gather(*(worker(w) for w in range(8)))
        state = await store.get_campaign("c")
        assert state is not None and sum(totals) == state.reserved <= 5_000

    run(scenario)


def test_an_unreadable_context_value_is_treated_as_no_context(redis_url: str, redis_prefix: str) -> None:
    async def scenario() -> None:
        store, direct = RedisStateStore(redis_url, prefix=redis_prefix), aioredis.Redis.from_url(redis_url)
        try:
            await store.upsert_campaign("c", put(10_000))
            await direct.set(store.context_key("c", "u"), '{"t": 3, "s": {}}')  # e.g. an older format
            _, (raw,) = await store.load_for_decision("c", ["u"])
            assert decode_context(raw) is None
            await store.apply_outcomes_to_contexts("c", [("u", "d-1", 1.0, 100)], ttl_ms=DAY_MS)
            await store.append_steps(
                "c", [NewStep("u", "d-2", 1, ONE)], capacity=3, ttl_ms=DAY_MS, initial_rtg=5.0, initial_ctg=2.0
            )
            _, (raw,) = await store.load_for_decision("c", ["u"])
            ctx = decode_context(raw)
            assert ctx is not None and (ctx.t, ctx.rtg, ctx.ctg, ctx.decision_ids) == (1, 5.0, 2.0, ["d-2"])
        finally:
            await store.close()
            await direct.aclose()

    asyncio.run(scenario())


def test_scripts_are_reloaded_after_noscript(tmp_path: Any) -> None:
    """A Redis that lost its script cache (restart, SCRIPT FLUSH) answers NOSCRIPT: the store reloads."""
    import shutil
    import subprocess

    import redis as sync_redis

    with socket.create_server(("127.0.0.1", 0)) as probe:
        free = probe.getsockname()[1]
    proc = subprocess.Popen(
        [
            shutil.which("redis-server") or "/usr/bin/redis-server",
            "--port",
            str(free),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{free}/0"
    try:
        for _ in range(100):
            try:
                sync_redis.Redis.from_url(url).ping()
                break
            except sync_redis.ConnectionError:
                time.sleep(0.05)

        async def scenario() -> None:
            store, direct = RedisStateStore(url, prefix="noscript:"), aioredis.Redis.from_url(url)
            try:
                await store.load_scripts()
                await store.upsert_campaign("c", put(10_000))
                await direct.script_flush()
                result = await reserve(store, "c", [item(1, [3, 0])])
                assert result.decisions[0].action == 3
                await direct.script_flush()
                await store.append_steps(
                    "c", [NewStep("u", "d-1", 3, ONE)], capacity=3, ttl_ms=DAY_MS, initial_rtg=1.0, initial_ctg=1.0
                )
                _, (raw,) = await store.load_for_decision("c", ["u"])
                ctx = decode_context(raw)
                assert ctx is not None and ctx.t == 1
            finally:
                await store.close()
                await direct.aclose()

        asyncio.run(scenario())
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_decision_records_keep_free_text_ids_through_settlement(redis_url: str, redis_prefix: str) -> None:
    """The Redis decision record is one tab-separated string: user and request ids may hold tabs, and the
    request id's length is counted in bytes (not characters) where it is written and where it is read."""

    async def scenario() -> None:
        store, direct = RedisStateStore(redis_url, prefix=redis_prefix), aioredis.Redis.from_url(redis_url)
        try:
            await store.upsert_campaign("c", put(10_000))
            user, request = "user\twith\ttabs-ü", "req\t1-é€"
            res = await reserve(store, "c", [ReserveItem("d-1", user, request, [2, 1, 0])], now=1_000)
            assert res.decisions[0].user_id == user
            key = store.decision_key("c", "d-1")
            record = parse_decision_record(await direct.get(key))
            assert record == {
                "status": "R", "reserved": "500", "action": "2", "probability": "1", "decided_at_ms": "1000",
                "model_version": "v1", "lambda": "0.25", "reward": "", "cost": "", "request_id": request,
                "user_id": user,
            }  # fmt: skip
            ttl = await direct.pttl(key)
            result = await store.settle("c", [Outcome("d-1", 12.5, 300)])
            assert result.context_updates == [(user, "d-1", 12.5, 300)]
            settled = parse_decision_record(await direct.get(key))
            assert (settled["status"], settled["reward"], settled["cost"]) == ("S", "12.5", "300")
            assert (settled["user_id"], settled["request_id"], settled["action"]) == (user, request, "2")
            assert 0 < await direct.pttl(key) <= ttl  # settlement keeps the record's expiry
        finally:
            await store.close()
            await direct.aclose()

    asyncio.run(scenario())


def test_embedded_store_leaves_the_cyclic_gc_nothing_to_walk() -> None:
    """The embedded store keeps decisions, request records, pending reservations and contexts in dicts of
    atomic keys and values only. CPython re-tracks an untracked dict whenever a tracked object (a new tuple) is
    stored in it, and then walks all of it in each young, middle and full pass: with tuple values a store
    400,000 decisions in cost 16 ms per pass. So after a full pass, further decisions, context writes and
    outcomes must leave no tracked container in the store that grows with it."""

    async def fill(store: MemoryStateStore, batch: int) -> None:
        items = [item(batch * 100 + j, [1, 0], request_id=f"r{batch}-{j}", user=f"u{j}") for j in range(100)]
        result = await reserve(store, "c", items)
        steps = [NewStep(d.user_id, d.decision_id, d.action, ONE) for d in result.decisions]
        await store.append_steps("c", steps, capacity=4, ttl_ms=DAY_MS, initial_rtg=10.0, initial_ctg=5.0)
        outcomes = [Outcome(d.decision_id, 1.0, d.cost) for d in result.decisions[:10]]
        settled = await store.settle("c", outcomes)
        await store.apply_outcomes_to_contexts("c", settled.context_updates, ttl_ms=DAY_MS)

    async def scenario() -> tuple[int, int]:
        store = MemoryStateStore()
        await store.upsert_campaign("c", put(10**9))
        for batch in range(20):
            await fill(store, batch)
        gc.collect()  # untracks every dict of atomic values
        for batch in range(20, 25):  # then the store keeps working
            await fill(store, batch)
        tracked = [obj for obj in reachable(store) if gc.is_tracked(obj)]
        return len(tracked), max(len(gc.get_referents(obj)) for obj in tracked)

    count, widest = asyncio.run(scenario())
    assert count < 100 and widest < 50  # 2,500 decisions, 2,500 request records, 100 contexts held


def test_sweep_releases_by_deadline_whatever_the_order_reserved(run: Callable[[Scenario], Any]) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10**6))
        now = 1_000_000
        await reserve(store, "c", [item(1, [1, 0])], now=now, expiry_ms=5000)
        await reserve(store, "c", [item(2, [1, 0])], now=now, expiry_ms=1000)  # reserved later, due first
        assert await store.sweep_expired("c", now + 999) == 0
        assert await store.sweep_expired("c", now + 1000) == 1
        assert await store.sweep_expired("c", now + 4999) == 0
        assert await store.sweep_expired("c", now + 5000) == 1
        state = await store.get_campaign("c")
        assert state is not None and state.reserved == 0

    run(scenario)


def test_embedded_store_sweep_drops_expired_records_oldest_first() -> None:
    """Decision and request records past the decision TTL leave the embedded store at the next sweep (the
    store's memory stays bounded), live ones stay, a request id used again after its record expired counts
    from its new expiry, and a record that expires before one written earlier goes at its own expiry."""

    async def scenario() -> list[tuple[int, int]]:
        store = MemoryStateStore()
        await store.upsert_campaign("c", put(10**9))

        async def decide(now: int, items: list[ReserveItem], ttl: int = 1000) -> None:
            await store.reserve(
                "c", items, model_version="v1", lam=0.0, now_ms=now, reservation_expiry_ms=100, decision_ttl_ms=ttl
            )

        await decide(0, [item(j, [1, 0], request_id=f"r{j}") for j in range(3)])
        await decide(500, [item(3, [1, 0], request_id="r3")])
        campaign, sizes = store._campaigns["c"], []
        for now in (999, 1000, 1200):
            await store.sweep_expired("c", now)
            sizes.append((len(campaign.decisions), len(campaign.requests)))
        await decide(1200, [item(4, [1, 0], request_id="r0")])  # r0 expired at 1000: a new decision
        await decide(1300, [item(5, [1, 0])], ttl=100)  # expires before item 4, written after it: still dropped
        for now in (1500, 2200):
            await store.sweep_expired("c", now)
            sizes.append((len(campaign.decisions), len(campaign.requests)))
        return sizes

    assert asyncio.run(scenario()) == [(4, 4), (1, 1), (1, 1), (1, 1), (0, 0)]


def test_embedded_store_sweep_drops_expired_contexts() -> None:
    async def scenario() -> tuple[bool, int, int]:
        store = MemoryStateStore()
        await store.upsert_campaign("c", put(10**9))
        for user in ("u", "v"):
            await store.append_steps(
                "c", [NewStep(user, f"d-{user}", 1, ONE)], capacity=2, ttl_ms=60_000, initial_rtg=1.0, initial_ctg=1.0
            )
        wall = int(time.time() * 1000)
        await store.sweep_expired("c", wall - 1)
        _, contexts = await store.load_for_decision("c", ["u", "v"])
        kept = len(store._contexts)
        await store.sweep_expired("c", wall + 120_000)  # past both contexts' TTL
        return all(c is not None for c in contexts), kept, len(store._contexts)

    assert asyncio.run(scenario()) == (True, 2, 0)


def reachable(root: object) -> list[object]:
    """The store's data reachable from `root`: containers and the service's own objects (not its lock, its
    loop or code)."""
    found, todo, seen = [], [root], {id(root)}
    while todo:
        obj = todo.pop()
        found.append(obj)
        for ref in gc.get_referents(obj):
            data = isinstance(ref, dict | list | tuple | set | frozenset) or type(ref).__module__.startswith("service.")
            if data and id(ref) not in seen:
                seen.add(id(ref))
                todo.append(ref)
    return found


def test_decision_config_follows_every_campaign_change(redis_url: str, redis_prefix: str) -> None:
    """Decisions read the campaign from its config string (one MGET with the contexts); a campaign hash
    without one (written by an earlier release) is read from the hash instead."""

    async def scenario() -> None:
        store, direct = RedisStateStore(redis_url, prefix=redis_prefix), aioredis.Redis.from_url(redis_url)
        try:
            await store.upsert_campaign("c", put(10_000, admin_lambda=0.5))
            config, _ = await store.load_for_decision("c", ["u"])
            assert config is not None and (config.budget, config.admin_lambda, config.coupons[2]) == (10_000, 0.5, 500)
            await store.upsert_campaign(
                "c", CampaignUpdate(replace=False, budget=7_000, clear_lambda=True, expected_users=40)
            )
            config, _ = await store.load_for_decision("c", ["u"])
            assert config is not None
            assert (config.budget, config.admin_lambda, config.expected_users) == (7_000, None, 40)
            await direct.delete(store.config_key("c"))
            again, (context,) = await store.load_for_decision("c", ["u"])
            assert again == config and context is None
            assert await store.load_for_decision("other", ["u"]) == (None, [])
        finally:
            await store.close()
            await direct.aclose()

    asyncio.run(scenario())


def test_hash_decision_records_of_an_earlier_release_still_settle_and_expire(redis_url: str, redis_prefix: str) -> None:
    """Decision records written before the one-string layout are hashes (fields u, a, p, r, s, ...): after
    an upgrade their outcomes still settle and their reservations still expire, until the records do."""

    async def scenario() -> None:
        store, direct = RedisStateStore(redis_url, prefix=redis_prefix), aioredis.Redis.from_url(redis_url)
        try:
            await store.upsert_campaign("c", put(10_000))
            for decision_id, user in (("d-old1", "u1"), ("d-old2", "u2")):  # as the earlier reserve.lua wrote
                await direct.hset(
                    store.decision_key("c", decision_id),
                    mapping={"u": user, "a": "2", "p": "1", "r": "500", "s": "R", "v": "v0", "l": "0.1", "q": ""},
                )
                await direct.zadd(store.pending_key("c"), {decision_id: 1_000})
            await direct.hincrby(store.campaign_key("c"), "reserved", 1_000)
            result = await store.settle("c", [Outcome("d-old1", 3.0, 200), Outcome("d-old1", 3.0, 200)])
            assert (result.accepted, result.duplicates, result.context_updates) == (1, 1, [("u1", "d-old1", 3.0, 200)])
            assert await store.sweep_expired("c", now_ms=2_000) == 1
            state = await store.get_campaign("c")
            assert state is not None and (state.spent, state.reserved) == (200, 0)
            assert await direct.hget(store.decision_key("c", "d-old2"), "s") == b"X"
        finally:
            await store.close()
            await direct.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "args",
    [
        ("EVALSHA", "a" * 40, 2, "k1", b"k2", 7, -3, 0.25, 1e-05, "é-ü", b"\x00\xff" * 600, memoryview(b"mv")),
        ("CONFIG GET", "maxmemory"),
        (b"CLIENT SETNAME", "x"),
        ("SET", "k", bytearray(b"ba"), 10**30, float("inf")),
        ("MGET", *(f"ctx:{i}" for i in range(300))),
    ],
)
def test_the_fast_command_packer_writes_what_redis_py_writes(args: tuple[Any, ...]) -> None:
    from redis.asyncio.connection import Connection

    assert pack_command(args) == b"".join(bytes(part) for part in Connection().pack_command(*args))


def test_the_fast_command_packer_refuses_what_redis_py_refuses() -> None:
    from redis.exceptions import DataError

    for bad in (True, None, [1]):
        with pytest.raises(DataError):
            pack_command(("SET", "k", bad))


def test_a_batch_of_decisions_settles_and_expires_record_by_record(run: Callable[[Scenario], Any]) -> None:
    """The engine's ids ("d-<batch>-<i>"; Redis keeps the batch's records in one hash with one pending
    entry): each decision still settles, counts a repeat once and expires on its own."""

    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(3_000))
        ids = new_decision_ids(4)
        now = int(time.time() * 1000)
        batch = [
            ReserveItem(ids[0], "u0", None, [3, 0]),
            ReserveItem(ids[1], "u1", "req-1", [2, 0]),
            ReserveItem(ids[2], "u2", None, [0]),
            ReserveItem(ids[3], "u3", None, [3, 2, 1, 0]),  # 1000 + 500 taken: 1000 fits
        ]
        result = await reserve(store, "c", batch, now=now, expiry_ms=1000)
        assert [(d.action, d.cost) for d in result.decisions] == [(3, 1000), (2, 500), (0, 0), (3, 1000)]
        replay = await reserve(store, "c", [ReserveItem(new_decision_ids(1)[0], "u1", "req-1", [1, 0])], now=now)
        assert (replay.decisions[0].decision_id, replay.decisions[0].new) == (ids[1], False)
        with pytest.raises(CostAboveReservation):  # all or nothing: ids[0] is not settled either
            await store.settle("c", [Outcome(ids[0], 5.0, 800), Outcome(ids[1], 1.0, 501)])
        settled = await store.settle("c", [Outcome(ids[0], 5.0, 800), Outcome(ids[0], 5.0, 800), Outcome(ids[2], 0, 0)])
        assert (settled.accepted, settled.duplicates, settled.unknown) == (2, 1, 0)
        assert await store.sweep_expired("c", now + 999) == 0
        assert await store.sweep_expired("c", now + 1000) == 2  # ids[1] and ids[3]; ids[0] was settled
        state = await store.get_campaign("c")
        assert state is not None and (state.spent, state.reserved, state.decisions) == (800, 0, 4)
        late = await store.settle("c", [Outcome(ids[3], 2.0, 1000), Outcome(ids[0] + "9", 1.0, 0)])
        assert (late.accepted, late.unknown) == (1, 1)
        state = await store.get_campaign("c")
        assert state is not None and (state.spent, state.overrun) == (1800, 0)

    run(scenario)


def test_one_call_may_mix_batches_and_ids_of_their_own_in_any_order(run: Callable[[Scenario], Any]) -> None:
    """Items of two batches interleaved with ids that are their own records (the Redis store groups runs
    of consecutive items by record): each one is reserved, settles and expires as its own decision."""

    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000))
        a, b = new_decision_ids(2), new_decision_ids(2)
        now = int(time.time() * 1000)
        ids = [a[1], "own-1", b[0], a[0], "own-2", b[1]]
        items = [ReserveItem(d, f"u{i}", f"r{i}" if i % 2 else None, [(i % 3) + 1, 0]) for i, d in enumerate(ids)]
        result = await reserve(store, "c", items, now=now, expiry_ms=1000)
        costs = {1: 200, 2: 500, 3: 1000}
        assert [(d.decision_id, d.user_id, d.cost) for d in result.decisions] == [
            (d, f"u{i}", costs[(i % 3) + 1]) for i, d in enumerate(ids)
        ]
        assert result.remaining == 10_000 - 3_400
        settled = await store.settle("c", [Outcome(ids[0], 1.0, 100), Outcome("own-2", 1.0, 0)])
        assert (settled.accepted, settled.unknown) == (2, 0)
        assert await store.sweep_expired("c", now + 1000) == 4
        state = await store.get_campaign("c")
        assert state is not None and (state.spent, state.reserved, state.decisions) == (100, 0, 6)

    run(scenario)


def test_redis_keeps_a_batch_in_one_hash_with_one_pending_entry(redis_url: str, redis_prefix: str) -> None:
    async def scenario() -> None:
        store, direct = RedisStateStore(redis_url, prefix=redis_prefix), aioredis.Redis.from_url(redis_url)
        try:
            await store.upsert_campaign("c", put(10**9))
            ids = new_decision_ids(300)
            await reserve(store, "c", [ReserveItem(d, f"u{i}", None, [1, 0]) for i, d in enumerate(ids)], now=5_000)
            batch = ids[0].rsplit("-", 1)[0][2:]
            key = store.batch_key("c", batch)
            assert await direct.hlen(key) == 300 and 29 * DAY_MS < await direct.pttl(key) <= 30 * DAY_MS
            record = parse_decision_record(await direct.hget(key, "299"))
            assert (record["status"], record["reserved"], record["user_id"]) == ("R", "200", "u299")
            assert await direct.zrange(store.pending_key("c"), 0, -1, withscores=True) == [
                (f"b-{batch}".encode(), 5_000 + DAY_MS)
            ]
            assert await direct.exists(store.decision_key("c", ids[0])) == 0
            await store.settle("c", [Outcome(ids[7], 1.0, 100)])
            assert parse_decision_record(await direct.hget(key, "7"))["status"] == "S"
            assert await store.sweep_expired("c", 5_000 + DAY_MS) == 299
            assert {parse_decision_record(v)["status"] for v in (await direct.hgetall(key)).values()} == {"S", "X"}
            state = await store.get_campaign("c")
            assert state is not None and (state.reserved, state.spent) == (0, 100)
        finally:
            await store.close()
            await direct.aclose()

    asyncio.run(scenario())


def test_one_append_call_naming_a_user_twice_keeps_both_steps(run: Callable[[Scenario], Any]) -> None:
    """A request may name a user twice: both decisions become steps, in order, whether or not the steps
    carry the context their decision read (both read the same one)."""

    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000))
        kw: dict[str, Any] = {"capacity": 5, "ttl_ms": DAY_MS, "initial_rtg": 9.0, "initial_ctg": 3.0}
        await store.append_steps("c", [NewStep("u", "d-0", 1, ONE)], **kw)
        _, (read,) = await store.load_for_decision("c", ["u"])
        await store.append_steps("c", [NewStep("u", "d-1", 2, ONE, read), NewStep("u", "d-2", 3, TWO, read)], **kw)
        await store.append_steps("c", [NewStep("u", "d-3", 1, ONE), NewStep("u", "d-4", 2, ONE)], **kw)
        _, (raw,) = await store.load_for_decision("c", ["u"])
        u = decode_context(raw)
        assert u is not None and (u.t, u.decision_ids) == (5, ["d-0", "d-1", "d-2", "d-3", "d-4"])
        assert u.steps["t"].tolist() == [0, 1, 2, 3, 4] and u.steps["action"].tolist() == [1, 2, 3, 1, 2]

    run(scenario)


def test_locating_many_records_is_locating_each() -> None:
    """The batch lookup (a batch's key worked out once) gives each id the place `decision_location` gives,
    also for ids that only look like a batch's."""
    store = RedisStateStore("redis://127.0.0.1:1/0", prefix="p:")
    first, second = new_decision_ids(3), new_decision_ids(2)
    head = first[0].rpartition("-")[0]
    ids = [*first, f"{head}-x", f"{head}-123456", f"{head}-", "own-id", *second, first[1]]
    assert store.decision_locations("c", ids) == [store.decision_location("c", d) for d in ids]
    assert len({key for key, field, _ in store.decision_locations("c", ids) if field}) == 2
