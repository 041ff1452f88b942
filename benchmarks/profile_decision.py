"""Where one decisions request spends its time, stage by stage, in process (no HTTP).

    python benchmarks/profile_decision.py --users 128              # embedded store and a throwaway Redis
    python benchmarks/profile_decision.py --users 1 --store DIR --redis-url redis://127.0.0.1:6379/15

Runs the app's lifespan (model, store, batcher), fills every user's context (8 disjoint groups, as in
bench_service.py), then times each stage of `DecisionEngine.decide` by wrapping it: the body parse, the
read of config and contexts, building the model inputs, the forward on the inference thread and the whole
wait for scores (queue and thread hops included), the reservation, and the context write behind the
answer (waited for after each request, so it is timed alone). With a throwaway Redis it also prints the
server's own CPU per call of each command (`INFO commandstats`; not done on a given Redis, whose
statistics this would reset).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import uvloop
from bench_service import COUPONS, TOKEN, delete_keys, throwaway_redis, train_small_model

import service.batcher
import service.engine
from service.app import create_app
from service.schemas import CampaignPut, DecisionsRequest
from service.settings import Settings

Timings = dict[str, list[float]]


def timed(timings: Timings, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
    if asyncio.iscoroutinefunction(function):

        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await function(*args, **kwargs)
            finally:
                timings[label].append(time.perf_counter() - started)

        return timed_async

    def timed_sync(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            timings[label].append(time.perf_counter() - started)

    return timed_sync


async def profile(store: Path, redis_url: str | None, users: int, requests: int) -> Timings:
    prefix = f"profile-{uuid.uuid4().hex[:8]}:"
    settings = Settings(
        store=str(store), redis_url=redis_url, redis_prefix=prefix, admin_token=TOKEN, log_level="WARNING"
    )
    app = create_app(settings)
    timings: Timings = collections.defaultdict(list)
    try:
        async with app.router.lifespan_context(app):
            engine = app.state.runtime.engine
            manifest = app.state.runtime.policies.current.manifest
            await engine.put_campaign("bench", CampaignPut.model_validate({"budget": 1e12, "coupons": COUPONS}))
            rng = np.random.default_rng(users)
            bodies = [
                DecisionsRequest.model_validate(
                    {
                        "requests": [
                            {"user_id": f"u{g}-{j}", "features": rng.normal(size=manifest.feature_dim).tolist()}
                            for j in range(users)
                        ]
                    }
                )
                .model_dump_json()
                .encode()
                for g in range(8)
            ]
            for i in range(8 * manifest.context_length):  # every context full
                await engine.decide("bench", DecisionsRequest.model_validate_json(bodies[i % 8]))
            await engine.drain()

            store_ = engine.store
            for method, label in (
                ("load_for_decision", "read config + contexts"),
                ("reserve", "reserve"),
                ("append_steps", "context write (behind)"),
            ):
                setattr(store_, method, timed(timings, label, getattr(store_, method)))
            engine.batcher.scores = timed(timings, "scores (wait, hops included)", engine.batcher.scores)
            forward, build = service.batcher._forward, service.engine.build_inputs
            service.batcher._forward = timed(timings, "forward (inference thread)", forward)
            service.engine.build_inputs = timed(timings, "build model inputs", build)
            try:
                for i in range(requests):
                    started = time.perf_counter()
                    body = DecisionsRequest.model_validate_json(bodies[i % 8])
                    parsed = time.perf_counter()
                    await engine.decide("bench", body)
                    timings["body parse + validate"].append(parsed - started)
                    timings["decide (all)"].append(time.perf_counter() - parsed)
                    await engine.drain()
            finally:
                service.batcher._forward, service.engine.build_inputs = forward, build
    finally:
        if redis_url:
            delete_keys(redis_url, prefix)
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=128, help="users per request")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--store", help="model store (default: train a small model on a 600-user world)")
    parser.add_argument("--redis-url", help="Redis to use (default: a throwaway redis-server)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="saco-profile-") as tmp, contextlib.ExitStack() as stack:
        store = Path(args.store) if args.store else train_small_model(Path(tmp), users=600)
        redis_url = args.redis_url or stack.enter_context(throwaway_redis())
        for name, url in (("embedded", None), ("redis", redis_url)):
            if url and not args.redis_url:
                import redis

                redis.Redis.from_url(url).config_resetstat()
            timings = uvloop.run(profile(store, url, args.users, args.requests))
            print(f"\n{name} store, {args.users} users per request, {args.requests} requests (ms):")
            print(f"  {'stage':32} {'p50':>7} {'p90':>7} {'p99':>7}")
            for label, values in timings.items():
                ms = np.array(values) * 1000
                p50, p90, p99 = np.percentile(ms, [50, 90, 99])
                print(f"  {label:32} {p50:7.2f} {p90:7.2f} {p99:7.2f}")
            if url and not args.redis_url:
                import redis

                stats = redis.Redis.from_url(url).info("commandstats")
                print(
                    "  Redis CPU per call (us), whole run:",
                    {
                        name.removeprefix("cmdstat_"): round(stat["usec_per_call"], 1)
                        for name, stat in stats.items()
                        if stat["calls"] >= args.requests
                    },
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
