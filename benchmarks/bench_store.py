"""The Redis store's two write scripts alone: reservation and context append, wall time and Redis CPU.

    python benchmarks/bench_store.py                 # this checkout
    git worktree add /tmp/old REV && python benchmarks/bench_store.py --repo /tmp/old   # another revision

Runs against a throwaway redis-server. Reservation: batches of 1, 128 and 1024 engine-issued decisions;
prints the wall time of `store.reserve`, the server's CPU per script call (`INFO commandstats`) and, at
the end, the keys and memory the decision records take. Append: 128 users with full contexts, each step
carrying the context as read (the decision path's way) and without it (the Lua path).

    python benchmarks/bench_store.py --append-against REV   # REV's append_steps.lua and this one, alternating

With --append-against, both versions of the append script get the same calls (128 full contexts, each step
carrying the context as read) in alternating rounds on one Redis, so a change of the script is judged by a
ratio taken in the same minutes (a shared machine's speed drifts); each round checks that both leave the same values.
"""

from __future__ import annotations

import argparse
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis
from bench_service import throwaway_redis


async def run(url: str) -> None:
    from service.engine import new_decision_ids
    from service.state.base import CampaignUpdate, NewStep, ReserveItem
    from service.state.redis_store import RedisStateStore

    stats = redis.Redis.from_url(url)
    store = RedisStateStore(url, prefix="bench:")
    try:
        await store.upsert_campaign("c", CampaignUpdate(replace=True, budget=10**15, coupons={1: 200, 2: 500, 3: 1000}))
        for users, calls in ((1, 300), (128, 200), (1024, 50)):
            stats.config_resetstat()
            wall = []
            for _ in range(calls):
                items = [ReserveItem(d, f"user-{j}", None, [3, 2, 0]) for j, d in enumerate(new_decision_ids(users))]
                started = time.perf_counter()
                await store.reserve(
                    "c", items, model_version="v1", lam=0.25, now_ms=int(time.time() * 1000),
                    reservation_expiry_ms=86_400_000, decision_ttl_ms=30 * 86_400_000,
                )  # fmt: skip
                wall.append(time.perf_counter() - started)
            cpu = stats.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]
            print(f"reserve {users:5d} users: wall p50 {np.median(wall) * 1e3:6.2f} ms, Redis CPU {cpu:6.0f} us/call")
        print(f"decision records: {stats.dbsize()} keys, {stats.info('memory')['used_memory'] / 1e6:.1f} MB in use")

        features = struct.pack("<8f", *range(8))
        users = [f"u{i}" for i in range(128)]
        keys = [store.context_key("c", u) for u in users]
        kw = {"capacity": 9, "ttl_ms": 10**9, "initial_rtg": 40.0, "initial_ctg": 10.0}
        for n in range(10):
            await store.append_steps("c", [NewStep(u, f"d-{n}-{u}", 1, features) for u in users], **kw)
        for with_read in (False, True):
            if with_read and "read" not in NewStep._fields:
                print("append  128 users from the read: not in this revision")
                continue
            stats.config_resetstat()
            wall = []
            for n in range(200):
                read = stats.mget(keys)  # (untimed) through redis-py: every revision has it
                steps = [
                    NewStep(u, f"d-x{n}-{u}", 1, features, read[i])
                    if with_read
                    else NewStep(u, f"d-x{n}-{u}", 1, features)
                    for i, u in enumerate(users)
                ]
                started = time.perf_counter()
                await store.append_steps("c", steps, **kw)
                wall.append(time.perf_counter() - started)
            cpu = stats.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]
            how = "from the read" if with_read else "in Lua       "
            print(f"append  128 users {how}: wall p50 {np.median(wall) * 1e3:6.2f} ms, Redis CPU {cpu:6.0f} us/call")
    finally:
        await store.close()
        stats.close()


def compare_append(url: str, rev: str, rounds: int = 6, calls: int = 200) -> None:
    """Redis CPU per 128-user append call of REV's script against this checkout's, alternating rounds."""
    from service.state.context import HEADER, append_steps_to, empty_context, new_step_bytes
    from service.state.redis_store import LUA_DIR

    sources = {
        rev: subprocess.run(
            ["git", "show", f"{rev}:service/lua/append_steps.lua"],
            check=True,
            capture_output=True,
            text=True,
            cwd=LUA_DIR,  # inside the repository whatever the caller's directory
        ).stdout,
        "this checkout": (LUA_DIR / "append_steps.lua").read_text(),
    }
    client = redis.Redis.from_url(url)
    shas = {name: client.script_load(source) for name, source in sources.items()}
    capacity, features = 5, struct.pack("<8f", *range(8))
    initial = empty_context(8, 40.0, 10.0)
    full = initial
    for n in range(capacity + 1):
        full = append_steps_to([full], [new_step_bytes(f"d-{n}", 1, features)], capacity, initial)[0]
    keys = [f"bench:ctx:u{i}" for i in range(128)]
    steps = [new_step_bytes(f"d-x-{i}", 1, features) for i in range(128)]
    appended = append_steps_to([full] * 128, steps, capacity, initial)
    args: list[Any] = [capacity, 10**9, initial, b"".join(steps), *[full[: HEADER.size]] * 128, *appended]
    cpu: dict[str, list[float]] = {name: [] for name in shas}
    try:
        for _ in range(rounds):
            for name, sha in shas.items():
                client.config_resetstat()
                for _ in range(calls):
                    client.mset(dict.fromkeys(keys, full))  # every call finds the contexts as read
                    client.evalsha(sha, len(keys), *keys, *args)
                cpu[name].append(client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])
                assert client.mget(keys) == appended, f"{name}'s script stored other values"
    finally:
        client.delete(*keys)
        client.close()
    for name, values in cpu.items():
        print(f"append 128 users, {name:>13}: Redis CPU median {np.median(values):5.0f} us/call (rounds: "
              + ", ".join(f"{v:.0f}" for v in values) + ")")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1], help="code to measure")
    parser.add_argument("--append-against", metavar="REV", help="compare REV's append script with this one's")
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo.resolve()))
    import uvloop

    with throwaway_redis() as url:
        if args.append_against:
            compare_append(url, args.append_against)
        else:
            uvloop.run(run(url))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
