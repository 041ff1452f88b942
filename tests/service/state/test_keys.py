"""Where the store keeps things: keys that cannot collide, hash tags, records, scripts reloaded."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import DAY_MS, ONE, Run, item, put, reserve
from redis.crc import key_slot

from service.state import NewStep, Outcome
from service.state.context import decode_context
from service.state.servers import start_redis
from service.state.store import StateStore, parse_decision_record


def test_no_two_campaign_user_pairs_share_a_context_key() -> None:
    store = StateStore("redis://127.0.0.1:1/0", prefix="p:")
    pairs = [("x", "y:u"), ("x:y", "u"), ("x", "y:u:"), ("x:", "y:u"), ("1", "1:x"), ("1:1", "x"), ("x", "")]
    assert len({store.keys.context_key(c, u) for c, u in pairs}) == len(pairs)


def test_one_campaigns_ledger_keys_share_a_slot_and_contexts_spread() -> None:
    store = StateStore("redis://127.0.0.1:1/0", prefix="p:")
    keys = [store.keys.campaign_key("c:1"), store.keys.config_key("c:1"), store.keys.pending_key("c:1")]
    keys += [store.keys.batch_key("c:1", "ab" * 10), store.keys.request_key("c:1", "any {request} id}")]
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert len({key_slot(store.keys.context_key("c:1", f"u{i}").encode()) for i in range(50)}) > 40
    with pytest.raises(ValueError, match="braces"):
        store.keys.campaign_key("c{1}")
    with pytest.raises(ValueError, match="braces"):
        StateStore("redis://127.0.0.1:1/0", prefix="p{x}:")


def test_the_same_user_in_two_campaigns_has_two_contexts(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        for campaign in ("x", "x:y"):
            await store.upsert_campaign(campaign, put(10_000))
        kw = {"capacity": 3, "ttl_ms": DAY_MS}
        await store.append_steps("x", [NewStep("y:u", "d-a", 1, ONE)], **kw)
        await store.append_steps("x:y", [NewStep("u", "d-b", 2, ONE)], **kw)
        (_, (first,)), (_, (second,)) = [await store.load_for_decision(c, [u]) for c, u in (("x", "y:u"), ("x:y", "u"))]
        a, b = decode_context(first), decode_context(second)
        assert a is not None and b is not None and (a.decision_ids, b.decision_ids) == (["d-a"], ["d-b"])

    run(scenario)


def test_decision_records_keep_free_text_ids_through_settlement(run: Run) -> None:
    """A decision record is one tab-separated string: user and request ids may hold tabs, and the request
    id's length is counted in bytes (not characters) where it is written and where it is read."""

    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000))
        user, request = "user\twith\ttabs-ü", "req\t1-é€"
        result = await reserve(store, "c", [item(user, [2, 1, 0], request)], now=1_000)
        decided = result.decisions[0]
        assert decided.user_id == user
        batch, index = decided.decision_id[2:].rsplit("-", 1)
        client, key = await store.client(), store.keys.batch_key("c", batch)
        record = parse_decision_record(await client.hget(key, index))
        assert record == {
            "status": "R", "reserved": "500", "coupon_cost": "500", "variance": "0", "predicted": "500",
            "action": "2",
            "probability": "1", "decided_at_ms": "1000",
            "model_version": "v1", "lambda": "0.25", "reward": "", "cost": "", "request_id": request,
            "user_id": user,
        }  # fmt: skip
        ttl = await client.pttl(key)
        settled = await store.settle("c", [Outcome(decided.decision_id, 12.5, 300)])
        assert settled.context_updates == [(user, decided.decision_id, 1250, 300)]
        record = parse_decision_record(await client.hget(key, index))
        assert (record["status"], record["reward"], record["cost"]) == ("S", "1250", "300")
        assert (record["user_id"], record["request_id"], record["action"]) == (user, request, "2")
        assert 0 < await client.pttl(key) <= ttl  # settlement keeps the record's expiry

    run(scenario)


def test_a_batch_is_one_hash_with_one_pending_entry(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10**9))
        result = await reserve(store, "c", [item(f"u{i}", [1, 0]) for i in range(300)], now=5_000)
        ids = [d.decision_id for d in result.decisions]
        batch = ids[0][2:].rsplit("-", 1)[0]
        assert ids == [f"d-{batch}-{i}" for i in range(300)]
        client, key = await store.client(), store.keys.batch_key("c", batch)
        assert await client.hlen(key) == 300 and 29 * DAY_MS < await client.pttl(key) <= 30 * DAY_MS
        record = parse_decision_record(await client.hget(key, "299"))
        assert (record["status"], record["reserved"], record["user_id"]) == ("R", "200", "u299")
        pending = await client.zrange(store.keys.pending_key("c"), 0, -1, withscores=True)
        assert pending == [(batch.encode(), 5_000 + DAY_MS)]
        await store.settle("c", [Outcome(ids[7], 1.0, 100)])
        assert parse_decision_record(await client.hget(key, "7"))["status"] == "S"
        assert await store.sweep_expired("c", 5_000 + DAY_MS) == 299
        assert {parse_decision_record(v)["status"] for v in (await client.hgetall(key)).values()} == {"S", "X"}
        state = await store.get_campaign("c")
        assert state is not None and (state.reserved, state.spent) == (0, 100)

    run(scenario)


def test_scripts_are_loaded_again_after_the_server_lost_them() -> None:
    """A Redis that lost its script cache (restart, SCRIPT FLUSH) answers NOSCRIPT: the store loads it."""

    async def scenario(url: str) -> None:
        store = StateStore(url, prefix="noscript:")
        try:
            client = await store.client()
            await store.upsert_campaign("c", put(10_000))
            await client.script_flush()
            assert (await reserve(store, "c", [item("u", [3, 0])])).decisions[0].action == 3
            await client.script_flush()
            await store.append_steps("c", [NewStep("u", "d-1", 3, ONE)], capacity=3, ttl_ms=DAY_MS)
            _, (raw,) = await store.load_for_decision("c", ["u"])
            ctx = decode_context(raw)
            assert ctx is not None and ctx.t == 1
        finally:
            await store.close()

    with start_redis() as server:
        asyncio.run(scenario(server.url))


def test_a_store_that_cannot_be_reached_says_so() -> None:
    async def scenario() -> tuple[bool, float]:
        store = StateStore("redis://127.0.0.1:1/0", prefix="p:", socket_timeout_s=0.2)
        started = time.monotonic()
        ready = await store.ping()
        await store.close()
        return ready, time.monotonic() - started

    ready, seconds = asyncio.run(scenario())
    assert not ready and seconds < 2
