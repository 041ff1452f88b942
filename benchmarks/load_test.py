"""Open-loop load test of the decision service: latency against offered load, as an SRE would measure it.

    python benchmarks/load_test.py                                  # 16 users per request, rates 50..800/s
    python benchmarks/load_test.py --users 128 --rates 25,50,100,150 --seconds 10
    python benchmarks/load_test.py --store DIR --redis-url redis://127.0.0.1:6379/15 --plot docs/load.png

bench_service.py sends one request at a time (a closed loop: each waits for the previous answer), which
measures the latency of an idle service. Real callers do not wait for each other: here requests arrive
at Poisson times at a fixed offered rate, over a pool of keep-alive connections, and each one's latency
runs from the moment it is issued to its answer, so time spent waiting for a free connection or behind
other requests counts (no coordinated omission; the generator's own timer lateness is printed apart).
For each rate it prints the achieved throughput, p50 / p90 / p99 / max latency and how many requests the
micro-batcher put in one forward on average (from the service's /metrics), and it can draw latency
against throughput as a PNG.

The service runs as a real process on a throwaway Redis (or the given one, or --embedded); users cycle
over groups that keep their context between requests, and a warm-up fills every context first. The load
generator shares the machine: on 2 cores its own CPU is part of what the figures pay for.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvloop
from bench_service import KeepAliveClient, Workload, delete_keys, start_service, throwaway_redis, train_small_model

GROUPS = 64  # user groups the requests cycle over (a user's next request comes GROUPS requests later)


class Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol for this test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, host)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
        self.writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status_line = await self.reader.readuntil(b"\r\n")
        length = None
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:  # the service always sends one (no chunked answers to read here)
            raise RuntimeError(f"answer without Content-Length: {status_line!r}")
        return int(status_line.split()[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


@dataclass
class RateResult:
    offered: float
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    lag_ms: list[float] = field(default_factory=list)  # how late the generator issued each request
    errors: int = 0
    requests_per_forward: float = float("nan")

    def row(self, users: int) -> dict[str, Any]:
        ms = np.array(self.latencies_ms) if self.latencies_ms else np.array([np.nan])
        done = len(self.latencies_ms)
        return {
            "offered_per_s": self.offered,
            "achieved_per_s": done / self.seconds,
            "users_per_s": done * users / self.seconds,
            "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(np.max(ms)),
            "errors": self.errors,
            "requests_per_forward": self.requests_per_forward,
            "generator_lag_p50_ms": float(np.percentile(self.lag_ms, 50)) if self.lag_ms else float("nan"),
        }


def batcher_counts(base: str) -> tuple[float, float]:
    """(decisions requests answered 200, forwards run) so far, from the service's /metrics."""
    text = httpx.get(base + "/metrics").text
    route = r'method="POST",route="/v1/campaigns/\{campaign_id\}/decisions",status="200"'
    found = re.search(rf"saco_http_request_duration_seconds_count\{{{route}\}} (\S+)", text)
    forwards = re.search(r"saco_inference_seconds_count (\S+)", text)
    return float(found[1]) if found else 0.0, float(forwards[1]) if forwards else 0.0


async def offer(base: str, bodies: list[bytes], rate: float, seconds: float, connections: int) -> RateResult:
    """Poisson arrivals at `rate` per second for `seconds`; each takes a free connection when one is."""
    host, port = base.removeprefix("http://").split(":")
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    path = Workload.path
    for i in range(connections):  # each connection opened and used once, untimed
        conn = await Connection.open(host, int(port))
        await conn.post(path, bodies[i % len(bodies)])
        pool.put_nowait(conn)
    result = RateResult(rate, seconds)
    rng = random.Random(int(rate * 1000))

    async def one(scheduled: float, body: bytes) -> None:
        conn = await pool.get()
        try:
            status, _ = await conn.post(path, body)
        except (OSError, asyncio.IncompleteReadError):
            result.errors += 1
            conn.close()
            pool.put_nowait(await Connection.open(host, int(port)))
            return
        pool.put_nowait(conn)
        if status == 200:
            result.latencies_ms.append((time.perf_counter() - scheduled) * 1000)
        else:
            result.errors += 1

    tasks = []
    start = time.perf_counter() + 0.05  # perf_counter: uvloop's loop.time() counts whole milliseconds
    arrival, sent = start, 0
    while arrival < start + seconds:
        delay = arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        # the clock starts when the request is issued: a timer that fired late (the loop's timers have
        # millisecond resolution) is the generator's delay, not the service's; waiting for a connection counts
        issued = time.perf_counter()
        result.lag_ms.append((issued - arrival) * 1000)
        tasks.append(asyncio.create_task(one(issued, bodies[sent % len(bodies)])))
        sent += 1
        arrival += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    result.seconds = max(seconds, time.perf_counter() - start)
    while not pool.empty():
        pool.get_nowait().close()
    return result


def plot(rows: list[dict[str, Any]], users: int, store_name: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = [r["achieved_per_s"] for r in rows]
    for key, style in (("p50_ms", "o-"), ("p90_ms", "s--"), ("p99_ms", "^-")):
        ax.plot(x, [r[key] for r in rows], style, label=key.removesuffix("_ms"))
    ax.set_xlabel(f"requests answered per second ({users} users each)")
    ax.set_ylabel("latency (issued to answered), ms")
    ax.set_yscale("log")
    ax.set_title(f"Open-loop load, {store_name} store")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=16, help="users per request")
    parser.add_argument("--rates", default="50,100,200,400,800", help="offered requests per second, in order")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long each rate is offered")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections in the pool")
    parser.add_argument("--store", help="model store (default: train a small model on a 600-user world)")
    parser.add_argument("--redis-url", help="Redis to use (default: a throwaway redis-server)")
    parser.add_argument("--embedded", action="store_true", help="serve from the embedded store instead of Redis")
    parser.add_argument("--plot", type=Path, help="write latency against throughput to this PNG")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    if not rates or min(rates) <= 0 or args.users < 1 or args.seconds <= 0 or args.connections < 1:
        parser.error("--rates, --users, --seconds and --connections must be positive")
    from model_store import ModelStore

    with tempfile.TemporaryDirectory(prefix="saco-load-") as tmp, contextlib.ExitStack() as stack:
        store = Path(args.store) if args.store else train_small_model(Path(tmp), users=600)
        manifest = ModelStore(store).load().manifest
        redis_url = None if args.embedded else args.redis_url or stack.enter_context(throwaway_redis())
        prefix = f"load-{uuid.uuid4().hex[:8]}:"
        proc, base = start_service(store, redis_url, prefix)
        rows: list[dict[str, Any]] = []
        try:
            workload = Workload(KeepAliveClient(base), manifest.feature_dim, args.users, groups=GROUPS)
            print(
                f"warming up {GROUPS} groups x {args.users} users ({manifest.context_length} passes) ...",
                file=sys.stderr,
            )
            workload.warm_up(manifest.context_length)
            workload.client.close()
            print(f"{args.users} users per request, {'embedded' if args.embedded else 'Redis'} store, "
                  f"{args.connections} connections, {args.seconds:g} s per rate")  # fmt: skip
            print(f"{'offered/s':>10} {'done/s':>8} {'users/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
                  f"{'max ms':>8} {'errors':>6} {'req/forward':>11} {'lag ms':>7}")  # fmt: skip
            for rate in rates:
                before = batcher_counts(base)
                result = uvloop.run(offer(base, workload.bodies, rate, args.seconds, args.connections))
                after = batcher_counts(base)
                forwards = after[1] - before[1]
                result.requests_per_forward = (after[0] - before[0]) / forwards if forwards else float("nan")
                row = result.row(args.users)
                rows.append(row)
                print(f"{rate:10.0f} {row['achieved_per_s']:8.1f} {row['users_per_s']:8.0f} {row['p50_ms']:8.2f} "
                      f"{row['p90_ms']:8.2f} {row['p99_ms']:8.2f} {row['max_ms']:8.2f} {row['errors']:6d} "
                      f"{row['requests_per_forward']:11.2f} {row['generator_lag_p50_ms']:7.2f}",
                      flush=True)  # fmt: skip
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            if redis_url:
                delete_keys(redis_url, prefix)
    if args.plot:
        plot(rows, args.users, "embedded" if args.embedded else "Redis", args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({"users": args.users, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
