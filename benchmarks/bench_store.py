"""The state store's calls alone (no HTTP, no model), on each way the store can run.

    python benchmarks/bench_store.py                    # standalone Redis, embedded, 3-master Cluster
    python benchmarks/bench_store.py --in-process       # also the same scripts in process (fakeredis + lupa)
    python benchmarks/bench_store.py --catalog          # also a campaign with a coupon catalog, beside

For each store: the wall time (p50, p99) of the decision path's store calls for 1 and 128 users (the read
of campaign and contexts, the reservation script, the context write) with full contexts, as the service
makes them. Calls go in alternating rounds over every store, so all see the same minutes of the machine.
`--in-process` runs the same Lua scripts on fakeredis's in-process Redis (it needs `pip install
'fakeredis[lua]'`): the candidate for the zero-configuration store that the private redis-server won.
`--catalog` measures, in the same rounds, a campaign with a coupon catalog (CATALOG: an amount coupon with
stock, a percent coupon with a cap, a third in a class of its own, every bundle of at most two: 6 bundles),
each user ranking every bundle, beside the campaign without one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import struct
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from contract.catalog import Catalog  # noqa: E402
from service.state import CampaignUpdate, NewStep, ReserveBatch, ReserveItem  # noqa: E402
from service.state.embedded import EmbeddedRedis  # noqa: E402
from service.state.servers import start_cluster, start_redis  # noqa: E402
from service.state.store import StateStore  # noqa: E402

DIM, CAPACITY, DAY_MS = 8, 19, 86_400_000
ROUNDS, CALLS = 5, 40  # per round, store and size
FEATURES = struct.pack(f"<{DIM}f", *range(DIM))
CATALOG = Catalog.parse(
    [
        {"action": 1, "cost": 0.01, "stock": 10**12},
        {"action": 2, "kind": "percent", "value": 10.0, "cap": 0.02},
        {"action": 3, "cost": 0.03, "class": "third"},
    ],
    max_per_bundle=2,
)


async def decision(store: StateStore, users: list[str], step: int, campaign: str = "bench") -> dict[str, float]:
    """One decision's store calls; the seconds each took. Campaign "catalog": CATALOG's bundles."""
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    _, contexts = await store.load_for_decision(campaign, users)
    t1 = time.perf_counter()
    if campaign == "catalog":  # every bundle, those of two coupons first (the first takes a unit of stock)
        pairs = [j for j, b in enumerate(CATALOG.bundles, 1) if len(b.coupons) == 2]
        ranked = [*pairs, *(j for j in range(1, len(CATALOG.bundles) + 1) if j not in pairs), 0]
        items = ReserveBatch.of([ReserveItem(user, None, ranked) for user in users], [b.key for b in CATALOG.bundles])
    else:
        items = ReserveBatch.of([ReserveItem(user, None, [3, 2, 1, 0]) for user in users])
    result = await store.reserve(
        campaign, items, model_version="v", lam=0.1, now_ms=0, reservation_expiry_ms=DAY_MS, decision_ttl_ms=DAY_MS
    )
    t2 = time.perf_counter()
    steps = [NewStep(d.user_id, d.decision_id, d.action, FEATURES, contexts[i]) for i, d in enumerate(result.decisions)]
    await store.append_steps(campaign, steps, capacity=CAPACITY, ttl_ms=DAY_MS)
    t3 = time.perf_counter()
    times["read"], times["reserve"], times["write contexts"], times["all"] = t1 - t0, t2 - t1, t3 - t2, t3 - t0
    return times


async def measure(
    stores: dict[str, StateStore], sizes: list[int], campaigns: list[str]
) -> dict[tuple[str, str, int], dict[str, list[float]]]:
    groups = {users: [[f"u{users}-{g}-{j}" for j in range(users)] for g in range(8)] for users in sizes}
    for store in stores.values():
        await store.upsert_campaign("bench", CampaignUpdate(replace=True, budget=10**15, coupons={1: 1, 2: 2, 3: 3}))
        catalog = CampaignUpdate(replace=True, budget=10**15, coupons=CATALOG.costs, catalog=CATALOG)
        await store.upsert_campaign("catalog", catalog)
        for campaign in campaigns:
            for users in sizes:
                for n in range(CAPACITY * 8):  # every context full
                    await decision(store, groups[users][n % 8], n, campaign)
    figures: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    for round_ in range(ROUNDS):
        print(f"round {round_ + 1}/{ROUNDS}", file=sys.stderr, flush=True)
        for name, store in stores.items():
            for users in sizes:
                for campaign in campaigns:
                    for n in range(CALLS):
                        for stage, seconds in (await decision(store, groups[users][n % 8], n, campaign)).items():
                            figures.setdefault((name, campaign, users), {}).setdefault(stage, []).append(seconds * 1000)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,128", help="users per decision, comma-separated")
    parser.add_argument("--in-process", action="store_true", help="also fakeredis + lupa in process")
    parser.add_argument("--catalog", action="store_true", help="also a campaign with a coupon catalog")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    with contextlib.ExitStack() as stack:
        standalone = stack.enter_context(start_redis())
        cluster = stack.enter_context(start_cluster())
        embedded = EmbeddedRedis(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="saco-bench-"))))
        stack.callback(embedded.stop)
        stores = {
            "standalone": StateStore(standalone.url, prefix=prefix),
            "embedded": StateStore(embedded.start(), prefix=prefix),
            "cluster": StateStore(cluster.url, prefix=prefix),
        }
        if args.in_process:
            try:
                import fakeredis
            except ImportError:
                parser.error("--in-process needs fakeredis with Lua: pip install 'fakeredis[lua]'")
            in_process = StateStore("redis://in-process", prefix=prefix, cluster=False)
            in_process._client = fakeredis.aioredis.FakeRedis()
            stores["in-process"] = in_process

        async def run() -> dict[tuple[str, str, int], dict[str, list[float]]]:
            try:
                return await measure(stores, sizes, ["bench", "catalog"] if args.catalog else ["bench"])
            finally:
                for store in stores.values():
                    await store.close()

        figures = asyncio.run(run())
    print(f"{'store':11} {'campaign':9} {'users':>5} {'stage':15} {'p50 ms':>8} {'p99 ms':>8}")
    for (name, campaign, users), stages in figures.items():
        label = "catalog" if campaign == "catalog" else "plain"
        for stage, values in stages.items():
            p99 = statistics.quantiles(values, n=100)[98]
            print(f"{name:11} {label:9} {users:>5} {stage:15} {statistics.median(values):8.3f} {p99:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
