"""User contexts in the store: appended steps, outcomes, concurrent writers; on every kind of store."""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import DAY_MS, ONE, TWO, Run, put

from service.state import NewStep
from service.state.context import append_step, decode_context, empty_context, new_step_bytes
from service.state.store import StateStore

KW: dict[str, Any] = {"ttl_ms": DAY_MS}


def test_contexts_append_trim_and_take_outcomes(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000))
        for n in range(5):
            await store.append_steps("c", [NewStep("u", f"d-{n}", n % 4, ONE)], capacity=3, **KW)
        await store.append_steps("c", [NewStep("v", "d-v", 1, TWO)], capacity=3, **KW)
        campaign, raw = await store.load_for_decision("c", ["u", "v", "w"])
        assert campaign is not None and raw[2] is None
        u, v = decode_context(raw[0]), decode_context(raw[1])
        assert u is not None and v is not None
        assert u.t == 5 and u.decision_ids == ["d-2", "d-3", "d-4"]
        assert u.steps["t"].tolist() == [2, 3, 4] and u.steps["features"].tolist() == [[1.0]] * 3
        assert (v.t, v.reward, v.cost, v.decision_ids) == (1, 0, 0, ["d-v"])
        assert v.steps[0].tolist() == (b"d-v", 1, 0, 0, 0, [2.0])
        # one call for several outcomes, two of them for the same user, one for a trimmed step
        await store.apply_outcomes_to_contexts(
            "c", [("u", "d-3", 1000, 250), ("v", "d-v", 200, 0), ("u", "d-0", 100, 0)], ttl_ms=DAY_MS
        )
        _, (raw_u,) = await store.load_for_decision("c", ["u"])
        u = decode_context(raw_u)
        assert u is not None and (u.reward, u.cost) == (1100, 250)  # the trimmed step's outcome counts
        assert u.steps["reward"].tolist() == [0, 1000, 0] and u.steps["cost"].tolist() == [0, 250, 0]
        # one call appending for several users
        await store.append_steps("c", [NewStep("u", "d-5", 2, ONE), NewStep("w", "d-w", 3, TWO)], capacity=3, **KW)
        _, raw = await store.load_for_decision("c", ["u", "w"])
        u, w = decode_context(raw[0]), decode_context(raw[1])
        assert u is not None and w is not None
        assert (u.reward, u.cost) == (1100, 250) and u.steps[-1].tolist()[2:5] == (0, 0, 5)
        assert (w.t, w.decision_ids, w.steps["action"].tolist()) == (1, ["d-w"], [3])

    run(scenario)


def test_an_append_from_a_stale_read_keeps_what_changed_since(run: Run) -> None:
    """A decision's step carries the context as it read it; an outcome or another decision that changed
    the context in between is not lost: the store appends to the context as it is now."""

    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000))
        await store.append_steps("c", [NewStep("u", "d-0", 1, ONE)], capacity=5, **KW)
        _, (read,) = await store.load_for_decision("c", ["u"])
        await store.apply_outcomes_to_contexts("c", [("u", "d-0", 300, 100)], ttl_ms=DAY_MS)  # after the read
        await store.append_steps("c", [NewStep("u", "d-1", 2, ONE, read)], capacity=5, **KW)
        _, (read,) = await store.load_for_decision("c", ["u"])
        await store.append_steps("c", [NewStep("u", "d-2", 3, ONE)], capacity=5, **KW)  # another decision
        await store.append_steps("c", [NewStep("u", "d-3", 1, ONE, read)], capacity=5, **KW)
        _, (raw,) = await store.load_for_decision("c", ["u"])
        u = decode_context(raw)
        assert u is not None and (u.t, u.decision_ids) == (4, ["d-0", "d-1", "d-2", "d-3"])
        assert (u.reward, u.cost) == (300, 100)
        assert u.steps["reward"].tolist() == [300, 0, 0, 0]
        # a fresh read: the stored value is exactly the read with the step appended
        await store.append_steps("c", [NewStep("u", "d-4", 2, ONE, raw)], capacity=5, **KW)
        _, (after,) = await store.load_for_decision("c", ["u"])
        assert after == append_step(raw, new_step_bytes("d-4", 2, ONE), 5, empty_context(1))

    run(scenario)


def test_concurrent_writers_of_one_user_lose_no_step(run: Run) -> None:
    """Many writers appending to the same users at once, each from the context it read: every step lands
    (the compare-and-set redoes a write whose context changed under it)."""

    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000))
        users = ["a", "b", "c:x"]

        async def writer(w: int) -> None:
            for n in range(5):
                _, read = await store.load_for_decision("c", users)
                steps = [NewStep(u, f"d-{w}-{n}", 1, ONE, read[i]) for i, u in enumerate(users)]
                await store.append_steps("c", steps, capacity=100, **KW)

        await asyncio.gather(*(writer(w) for w in range(6)))
        _, raws = await store.load_for_decision("c", users)
        for raw in raws:
            view = decode_context(raw)
            assert view is not None and view.t == 30
            assert sorted(view.decision_ids) == sorted(f"d-{w}-{n}" for w in range(6) for n in range(5))
            assert view.steps["t"].tolist() == list(range(30))

    run(scenario)


def test_context_capacity_zero_keeps_only_running_values(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000))
        await store.append_steps("c", [NewStep("u", "d-1", 1, ONE)], capacity=0, ttl_ms=DAY_MS)
        _, (raw,) = await store.load_for_decision("c", ["u"])
        u = decode_context(raw)
        assert u is not None and (u.t, u.reward, u.cost, len(u.steps)) == (1, 0, 0, 0)

    run(scenario)


def test_one_append_call_naming_a_user_twice_keeps_both_steps(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000))
        await store.append_steps("c", [NewStep("u", "d-0", 1, ONE)], capacity=5, **KW)
        _, (read,) = await store.load_for_decision("c", ["u"])
        steps = [NewStep("u", "d-1", 2, ONE, read), NewStep("u", "d-2", 3, TWO, read)]
        await store.append_steps("c", steps, capacity=5, **KW)
        await store.append_steps("c", [NewStep("u", "d-3", 1, ONE), NewStep("u", "d-4", 2, ONE)], capacity=5, **KW)
        _, (raw,) = await store.load_for_decision("c", ["u"])
        u = decode_context(raw)
        assert u is not None and (u.t, u.decision_ids) == (5, ["d-0", "d-1", "d-2", "d-3", "d-4"])
        assert u.steps["t"].tolist() == [0, 1, 2, 3, 4] and u.steps["action"].tolist() == [1, 2, 3, 1, 2]

    run(scenario)


def test_an_unreadable_context_value_is_treated_as_no_context(run: Run) -> None:
    async def scenario(store: StateStore) -> None:
        await store.upsert_campaign("c", put(10_000))
        client = await store.client()
        await client.set(store.keys.context_key("c", "u"), '{"t": 3, "s": {}}')  # written by another program
        _, (raw,) = await store.load_for_decision("c", ["u"])
        assert decode_context(raw) is None
        await store.apply_outcomes_to_contexts("c", [("u", "d-1", 100, 100)], ttl_ms=DAY_MS)
        await store.append_steps("c", [NewStep("u", "d-2", 1, ONE, raw)], capacity=3, ttl_ms=DAY_MS)
        _, (raw,) = await store.load_for_decision("c", ["u"])
        ctx = decode_context(raw)
        assert ctx is not None and (ctx.t, ctx.reward, ctx.cost, ctx.decision_ids) == (1, 0, 0, ["d-2"])

    run(scenario)
