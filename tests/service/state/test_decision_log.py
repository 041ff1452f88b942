"""The campaign's decision and outcome log (a Redis stream written by reserve.lua and settle.lua), the
behaviour policy's exploration and holdout, and the group counters, on each kind of store."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import redis
import redis.cluster
from conftest import DAY_MS, Run, item, put, reserve

from contract.keys import LOG_GROUP
from contract.log_entry import decode_decisions
from loop.logstream import export_logs
from service.state import LogStatus, Outcome, ReserveItem
from service.state.store import StateStore, parse_decision_record

NOW = 1_767_225_600_000  # 2026-01-01, epoch ms


def features(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def sync_client(store: StateStore) -> Any:
    if store.cluster:
        return redis.cluster.RedisCluster.from_url(store.url)
    return redis.Redis.from_url(store.url)


def read_log(store: StateStore, campaign: str) -> list[dict[str, bytes]]:
    """Every entry of the campaign's log stream, oldest first (field names decoded, values as stored)."""
    client = sync_client(store)
    try:
        return [{k.decode(): v for k, v in fields.items()} for _, fields in client.xrange(store.keys.log_key(campaign))]
    finally:
        client.close()


def record(store: StateStore, decision_id: str) -> dict[str, str]:
    _, batch, index = decision_id.split("-")
    client = sync_client(store)
    try:
        return parse_decision_record(client.hget(store.keys.batch_key("c", batch), index))
    finally:
        client.close()


def reserve_each(store: StateStore, campaign: str, items: list[ReserveItem]) -> Any:
    """One reservation call per item: one log entry each."""

    async def calls() -> list[Any]:
        return [(await reserve(store, campaign, [one])).decisions[0] for one in items]

    return calls()


def decisions_logged(store: StateStore, campaign: str) -> list[dict[str, object]]:
    """Every decision of the campaign's log, oldest first, as the export reads them."""
    client = sync_client(store)
    try:
        rows: list[dict[str, object]] = []
        for entry_id, fields in client.xrange(store.keys.log_key(campaign)):
            if fields[b"kind"] == b"decisions":
                rows += decode_decisions(campaign, entry_id.decode(), fields)[0]
        return rows
    finally:
        client.close()


def test_one_entry_per_reservation_call_and_per_accepted_outcome(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000))
        rows = [features(0.5, -1.0), features(2.0, 3.25), features(0.0, 1e-3)]
        items = [
            ReserveItem("a", "req-a", [2, 0], rows[0]),
            ReserveItem("tab\tuser", None, [3, 2, 0], rows[1]),
            ReserveItem("c", "req-c", [0], rows[2]),
        ]
        first = await store.reserve(
            "c", items, model_version="v7", lam=0.25, now_ms=NOW, reservation_expiry_ms=DAY_MS, decision_ttl_ms=DAY_MS
        )
        log = read_log(store, "c")
        batch = first.decisions[0].decision_id.split("-")[1]
        assert log == [
            {
                "kind": b"decisions",
                "batch": batch.encode(),
                "at_ms": str(NOW).encode(),
                "lambda": b"0.25",
                "model_version": b"v7",
                "items": b"0,1,2",
                "user_ids": b"atab\tuserc",
                "user_id_bytes": b"1,8,1",
                "actions": b"2,3,0",
                "costs": b"500,1000,0",
                "probabilities": b"1,1,1",
                "explored": b"000",
                "holdout": b"000",
                "features": b"".join(rows),
            }
        ]
        logged = decisions_logged(store, "c")
        assert [r["decision_id"] for r in logged] == [d.decision_id for d in first.decisions]
        assert [r["user_id"] for r in logged] == ["a", "tab\tuser", "c"]
        assert [d.action for d in first.decisions] == [2, 3, 0]
        # a replayed request id decides nothing new and logs nothing
        again = await reserve(store, "c", [item("a", [1, 0], "req-a"), item("c", [1, 0], "req-c")])
        assert [d.new for d in again.decisions] == [False, False] and len(read_log(store, "c")) == 1
        # a batch with a replay logs its new decisions only, with their own features
        replay, new = ReserveItem("a", "req-a", [1, 0], rows[0]), ReserveItem("n", None, [1, 0], rows[1])
        mixed = await reserve(store, "c", [replay, new])
        (entry,) = read_log(store, "c")[1:]
        assert (entry["items"], entry["user_ids"], entry["features"]) == (b"1", b"n", rows[1])
        assert decisions_logged(store, "c")[-1]["decision_id"] == mixed.decisions[1].decision_id

        ids = [d.decision_id for d in first.decisions]
        outcomes = [Outcome(ids[0], 0.125, 500), Outcome(ids[1], -1.0, 0), Outcome(ids[0], 99.0, 0)]
        settled = await store.settle("c", outcomes, now_ms=NOW + 5000)
        assert (settled.accepted, settled.duplicates) == (2, 1)
        await store.settle("c", [Outcome(ids[1], 3.0, 0), Outcome("d-unknown", 1.0, 0)], now_ms=NOW + 6000)
        log = read_log(store, "c")
        assert len(log) == 4  # duplicates and unknown ids log nothing
        assert log[2:4] == [
            {
                "kind": b"outcome",
                "decision_id": ids[0].encode(),
                "user_id": b"a",
                "action": b"2",
                "reward": b"13",  # cents, half up
                "cost": b"500",
                "at_ms": str(NOW + 5000).encode(),
                "decided_at_ms": str(NOW).encode(),
            },
            {
                "kind": b"outcome",
                "decision_id": ids[1].encode(),
                "user_id": b"tab\tuser",
                "action": b"3",
                "reward": b"-100",
                "cost": b"0",
                "at_ms": str(NOW + 5000).encode(),
                "decided_at_ms": str(NOW).encode(),
            },
        ]
        state = await store.get_campaign("c")
        assert state is not None and state.log_entries == 4
        assert (state.treated.decisions, state.treated.settled, state.treated.reward, state.treated.cost) == (
            4,
            2,
            -87,
            500,
        )
        assert state.holdout.decisions == state.holdout.settled == 0

    run(scenario)


def test_the_log_is_bounded_and_can_be_turned_off(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        store.log_max_entries = 10
        await store.upsert_campaign("c", put(10**9))
        for batch in range(6):
            await reserve_each(store, "c", [item(f"u{batch}-{i}", [1, 0]) for i in range(100)])
        # MAXLEN ~ trims whole stream nodes (stream-node-max-entries, 100 by default); with no exporter,
        # every entry it trimmed is lost
        status = await store.log_status("c")
        assert 10 <= status.entries <= 10 + 100 and status == LogStatus(
            status.entries, status.entries, 600 - status.entries
        )
        store.log_max_entries = 0
        await store.upsert_campaign("off", put(10**9))
        decided = await reserve(store, "off", [item("u", [1, 0])])
        await store.settle("off", [Outcome(decided.decisions[0].decision_id, 1.0, 0)])
        assert await store.log_length("off") == 0
        state = await store.get_campaign("off")
        assert state is not None and state.treated.settled == 1  # the group counters do not depend on the log

    run(scenario)


def test_exploration_and_holdout_log_their_probabilities(run: Run) -> None:
    """Budget 6.00 with coupons 2, 5, 10: only 1 and 2 fit at first. The caller's draws pick among "no
    coupon" and the coupons that fit at that moment; the logged probability is rate / candidates, plus
    1 - rate for the greedy first fit."""

    async def scenario(store: StateStore) -> None:
        rate = 0.2
        await store.upsert_campaign("c", put(600, exploration_rate=rate))
        prefs = [3, 2, 1, 0]
        items = [
            ReserveItem("x0", None, prefs, features(1.0), explore_draw=0.1),  # candidates 0, 1, 2: takes 0
            ReserveItem("x1", None, prefs, features(1.0), explore_draw=0.5),  # candidates 0, 1, 2: takes 1 (2.00)
            ReserveItem("g", None, prefs, features(1.0)),  # 2 no longer fits: greedy 1 among candidates 0, 1
            ReserveItem("h", None, prefs, features(1.0), holdout=True, explore_draw=0.99),  # held out: no coupon
            ReserveItem("x2", None, prefs, features(1.0), explore_draw=0.7),  # candidates 0, 1: 1 is greedy too
        ]
        result = await store.reserve(
            "c",
            items,
            model_version="v1",
            lam=0.5,
            now_ms=NOW,
            reservation_expiry_ms=DAY_MS,
            decision_ttl_ms=DAY_MS,
            exploration_rate=rate,
        )
        assert [d.action for d in result.decisions] == [0, 1, 1, 0, 1]
        expected = [rate / 3, rate / 3, rate / 2 + 1 - rate, 1.0, rate / 2 + 1 - rate]
        log = decisions_logged(store, "c")
        assert [e["probability"] for e in log] == expected
        assert [e["explored"] for e in log] == [True, True, False, False, True]
        assert [e["holdout"] for e in log] == [False, False, False, True, False]
        assert [e["cost"] for e in log] == [0, 2.0, 2.0, 0, 2.0]
        marks = [record(store, d.decision_id)["probability"] for d in result.decisions]
        assert [m.partition("/")[2] for m in marks] == ["x", "x", "", "h", "x"]
        assert [float(m.partition("/")[0]) for m in marks] == expected
        # reservations follow the chosen actions: the budget invariant holds whatever exploration picks
        state = await store.get_campaign("c")
        assert state is not None and state.reserved == 600 and state.explored == 3 and state.holdout.decisions == 1
        # outcomes count in the decision's group
        ids = [d.decision_id for d in result.decisions]
        await store.settle("c", [Outcome(ids[3], 3.0, 0), Outcome(ids[2], 10.0, 200), Outcome(ids[0], 0.5, 0)])
        state = await store.get_campaign("c")
        assert state is not None
        assert (state.holdout.settled, state.holdout.reward) == (1, 300)
        assert (state.treated.settled, state.treated.reward, state.treated.cost) == (2, 1050, 200)

    run(scenario)


def test_entries_trimmed_before_the_exporter_read_them_are_counted(run: Run) -> None:
    """Bound 40 (MAXLEN ~: whole stream nodes go). Entries the group `export` was never given count as lost
    when the bound trims them, every one while there is no group; entries it read do not. At every step,
    what was written is what the exporter read, what it can still read, or what was counted lost; the
    group's lag is what it can still read."""

    async def scenario(store: StateStore) -> None:
        store.log_max_entries = 40
        await store.upsert_campaign("c", put(10**9))
        key, client = store.keys.log_key("c"), sync_client(store)
        written, read = 0, 0

        def unread() -> int:  # what the stream holds beyond the group's last-delivered id
            last = client.xinfo_groups(key)[0]["last-delivered-id"].decode()
            return len(client.xrange(key, f"({last}", "+"))

        async def check() -> LogStatus:
            status = await store.log_status("c")
            assert status.lag == unread() and 40 <= status.entries <= 40 + 100
            assert written == read + status.lag + status.lost, (written, read, status)
            state = await store.get_campaign("c")
            assert state is not None and (state.log_entries, state.log_lost) == (status.entries, status.lost)
            return status

        try:
            decided = []
            for batch in range(10):  # 300 decisions before any exporter ran: the bound trimmed about 260
                decided += await reserve_each(store, "c", [item(f"a{batch}-{i}", [1, 0]) for i in range(30)])
            written += 300
            status = await store.log_status("c")
            assert status.lag == status.entries and status.lost == written - status.entries >= 300 - 140
            client.xgroup_create(key, LOG_GROUP, id="0")
            assert (await check()).lag == status.entries
            entries = client.xreadgroup(LOG_GROUP, "x", {key: ">"}, count=25)[0][1]
            client.xack(key, LOG_GROUP, *[entry_id for entry_id, _ in entries])
            read += len(entries)
            before = await check()

            for batch in range(10):  # outcomes and decisions: the bound trims the read entries first
                await store.settle("c", [Outcome(d.decision_id, 1.0, 0) for d in decided[20 * batch : 20 * batch + 20]])
                await reserve_each(store, "c", [item(f"b{batch}-{i}", [1, 0]) for i in range(10)])
                written += 30
                status = await check()
            trimmed = before.entries + 300 - status.entries
            assert status.lost - before.lost == trimmed - 25  # every one trimmed but the 25 read

            entries = client.xreadgroup(LOG_GROUP, "x", {key: ">"}, count=1000)[0][1]
            read += len(entries)
            assert [f[b"kind"] for _, f in entries[-10:]] == [b"decisions"] * 10  # the newest
            assert (await check()).lag == 0 and written == read + status.lost
        finally:
            client.close()

    run(scenario)


def test_a_lowered_bound_counts_what_it_trims_unread(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        store.log_max_entries = 1000
        await store.upsert_campaign("c", put(10**9))
        await reserve_each(store, "c", [item(f"a{i}", [1, 0]) for i in range(300)])
        key, client = store.keys.log_key("c"), sync_client(store)
        try:
            client.xgroup_create(key, LOG_GROUP, id="0")
            assert len(client.xreadgroup(LOG_GROUP, "x", {key: ">"}, count=250)[0][1]) == 250
            store.log_max_entries = 10
            await reserve(store, "c", [item("b", [1, 0])])
            status = await store.log_status("c")
            assert status.entries <= 10 + 100 and status.lost == 301 - 250 - status.lag
            assert status.lag == len(
                client.xrange(key, f"({client.xinfo_groups(key)[0]['last-delivered-id'].decode()}", "+")
            )
        finally:
            client.close()

    run(scenario)


def featured(user: str) -> ReserveItem:
    return ReserveItem(user, None, [1, 0], features(0.5, 2.0))


def test_the_export_reports_what_was_lost_since_its_previous_run(run: Run, tmp_path: Path) -> None:
    """Bound 20: 300 decisions before the first export; then an exporter that read 10 entries and died
    before writing them, and 300 decisions more, which trim those 10 with the rest: the next run counts
    them with what the service counted, and every entry written was exported or counted, once."""

    async def scenario(store: StateStore) -> None:
        store.log_max_entries = 20
        await store.upsert_campaign("c", put(10**9))
        await reserve_each(store, "c", [featured(f"a{i}") for i in range(300)])
        first = export_logs(store.url, tmp_path, prefix=store.prefix)
        assert first.entries == first.decisions == (await store.log_status("c")).entries <= 20 + 100
        assert first.trimmed == 300 - first.entries and first.trimmed_by_campaign == {"c": first.trimmed}
        assert first.to_json()["trimmed"] == first.trimmed
        assert first.to_json()["trimmed_by_campaign"] == {"c": first.trimmed}
        assert export_logs(store.url, tmp_path, prefix=store.prefix).trimmed == 0  # nothing new was lost

        await reserve_each(store, "c", [featured(f"b{i}") for i in range(10)])
        client = sync_client(store)
        try:  # the exporter's consumer reads 10 new entries and dies
            assert len(client.xreadgroup(LOG_GROUP, "exporter", {store.keys.log_key("c"): ">"}, count=10)[0][1]) == 10
        finally:
            client.close()
        await reserve_each(store, "c", [featured(f"c{i}") for i in range(300)])
        status = await store.log_status("c")
        service_counted = status.lost - first.trimmed  # the pending 10 are the exporter's to count
        assert service_counted == 310 - 10 - status.entries
        second = export_logs(store.url, tmp_path, prefix=store.prefix)
        assert (second.redelivered, second.decisions) == (10, status.entries)
        assert second.trimmed == service_counted + 10 and second.trimmed_by_campaign == {"c": second.trimmed}
        state = await store.get_campaign("c")
        assert state is not None and state.log_lost == first.trimmed + second.trimmed
        assert first.decisions + second.decisions + state.log_lost == 300 + 10 + 300
        assert export_logs(store.url, tmp_path, prefix=store.prefix).trimmed == 0

    run(scenario)
