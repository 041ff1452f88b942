"""Benchmark of the decision service, end to end over HTTP (real `saco serve` processes).

Prints p50 / p99 latency and throughput for requests of 1, 16, 128 and 1024 users, on the embedded store
and on Redis; beside them, in the same run, the HTTP floor (benchmarks/http_floor.py: the same route, body
model and answer under the same uvicorn settings, no model and no store) and the batched forward of as many
users (the TorchScript policy alone, at full context), and the service's p50 against floor + forward. Also
the per-user cost of a 128-user request against a 1-user request, and the speed-up of the batched forward
over a per-user model loop (one forward per user, the paper's way).

    python benchmarks/bench_service.py                    # trains a small model, starts a throwaway Redis
    python benchmarks/bench_service.py --store DIR --redis-url redis://127.0.0.1:6379/15
    python benchmarks/bench_service.py --pin              # Redis on a CPU of its own, the services on the rest

Requests cycle over 8 disjoint groups of users that keep their context between requests, and a warm-up
fills every context first, so the model sees full contexts (context_length steps), as in production. The
floor and both services run side by side and the timed requests (and forwards) are spread over 5 rounds of
every service and size, so a slow minute of a shared machine lands on all of them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from service.replicas import start_replica  # noqa: E402
from service.state.servers import free_port, start_redis  # noqa: E402

TOKEN = "bench-admin-token"
COUPONS = [{"action": 1, "cost": 2.0}, {"action": 2, "cost": 5.0}, {"action": 3, "cost": 10.0}]
BATCH_SIZES = (1, 16, 128, 1024)


def train_small_model(root: Path, users: int, repo: Path = REPO) -> Path:
    """A model trained (1 epoch) on a simulated `users`-user world by the code of `repo`."""
    saco = [sys.executable, "-m", "saco"]  # run from `repo`: its own packages come first on sys.path
    logs, store = root / "logs.parquet", root / "store"
    for cmd in (
        [*saco, "simulate", "--users", str(users), "--rounds", "4", "--seed", "1", "--out", str(logs)],
        [*saco, "train", "--logs", str(logs), "--store", str(store), "--epochs", "1", "--seed", "0"],
    ):
        subprocess.run(cmd, check=True, capture_output=True, cwd=repo)
    return store


@contextlib.contextmanager
def throwaway_redis(cpus: set[int] | None = None) -> Iterator[str]:
    """A redis-server on a free port, without persistence (every thread on `cpus` when given), stopped on
    exit; yields its URL."""
    from service.server import pin_process

    with start_redis() as server:
        if cpus is not None:
            pin_process(cpus, server.process.pid)
        yield server.url


def start_service(
    store: Path, redis_url: str | None, prefix: str, repo: Path = REPO, cpus: set[int] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """`saco serve` run from `repo` (its own code; on `cpus` when given), ready and with the bench campaign."""
    env = {"SACO_ADMIN_TOKEN": TOKEN, "SACO_REDIS_PREFIX": prefix, "SACO_LOG_LEVEL": "WARNING"}
    if cpus is not None:
        env["SACO_CPUS"] = ",".join(map(str, sorted(cpus)))
    replica = start_replica(store, redis_url=redis_url, env=env, cwd=repo)
    proc, base = replica.process, replica.base
    resp = httpx.put(
        f"{base}/v1/admin/campaigns/bench",
        headers={"Authorization": f"Bearer {TOKEN}"},
        json={"budget": 1e12, "coupons": COUPONS},
    )
    assert resp.status_code == 200, resp.text
    return proc, base


def start_floor(repo: Path = REPO, cpus: set[int] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """benchmarks/http_floor.py run from `repo` (on `cpus` when given), ready."""
    port = free_port()
    cmd = [sys.executable, str(repo / "benchmarks" / "http_floor.py"), "--port", str(port)]
    env = dict(os.environ)
    if cpus is not None:
        cmd = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the HTTP floor did not become ready")


def delete_keys(redis_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])
    client.close()


class KeepAliveClient:
    """One keep-alive HTTP/1.1 connection (stdlib): the timed loop's own cost stays small (httpx adds
    ~0.6 ms per request on a 2-core machine, which would be charged to the service)."""

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            self.conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            resp = self.conn.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            self.conn.close()  # the server closed an idle keep-alive connection: reconnect once
            self.conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            resp = self.conn.getresponse()
        return resp.status, resp.read()

    def close(self) -> None:
        self.conn.close()


class Workload:
    """Sequential requests of `users` users to one service. Requests cycle over `groups` disjoint user groups
    (a user's next request comes `groups` requests later, as with real traffic, not back to back); `warm_up`
    fills every user's context first (context_length passes), so the model sees full contexts."""

    path = "/v1/campaigns/bench/decisions"

    def __init__(self, client: KeepAliveClient, dim: int, users: int, groups: int = 8) -> None:
        rng = np.random.default_rng(users)
        self.client, self.users, self.groups = client, users, groups
        self.bodies = [
            json.dumps(
                {
                    "requests": [
                        {"user_id": f"b{users}-{g}-{j}", "features": rng.normal(size=dim).round(4).tolist()}
                        for j in range(users)
                    ]
                }
            ).encode()
            for g in range(self.groups)
        ]
        self.sent = 0
        self.latencies: list[float] = []
        self.wall = 0.0

    def _post(self) -> None:
        status, text = self.client.post(self.path, self.bodies[self.sent % self.groups])
        assert status == 200, text
        self.sent += 1

    def warm_up(self, context_length: int) -> None:
        for _ in range(self.groups * context_length):
            self._post()

    def run(self, requests: int) -> None:
        self._post()  # untimed: reopens the keep-alive connection if the server closed it while idle
        started = time.perf_counter()
        for _ in range(requests):
            t0 = time.perf_counter()
            self._post()
            self.latencies.append(time.perf_counter() - t0)
        self.wall += time.perf_counter() - started

    def figures(self) -> dict[str, float]:
        ms = np.array(self.latencies) * 1000
        return {
            "users": self.users,
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "users_per_s": self.users * len(self.latencies) / self.wall,
        }


def full_context_inputs(manifest: Any, users: int) -> Any:
    """Model inputs of `users` users at full context (every step real), as the warmed-up services see them."""
    from contract.inputs import ModelInputs

    rng = np.random.default_rng(users)
    length = manifest.context_length
    return ModelInputs(
        states=rng.normal(size=(users, length, manifest.feature_dim)).astype(np.float32),
        actions=rng.integers(0, manifest.num_actions, size=(users, length)),
        rtg=np.full((users, length), manifest.initial_rtg, np.float32),
        ctg=np.full((users, length), manifest.initial_ctg, np.float32),
        timesteps=np.tile(np.arange(length), (users, 1)),
        lam=np.zeros(users, np.float32),
        mask=np.ones((users, length), np.bool_),
    )


def load_bench_policy(store: Path) -> Any:
    """The store's policy on the CPU, with as many intra-op threads as the service's inference thread."""
    import torch

    from service.policy import load_policy

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    return load_policy(str(store), "cpu")


class Forward:
    """The batched forward of `users` users alone (the TorchScript policy, in this process), timed in the
    same rounds as the HTTP workloads."""

    def __init__(self, policy: Any, users: int) -> None:
        self.policy, self.users = policy, users
        self.inputs = full_context_inputs(policy.manifest, users)
        self.latencies: list[float] = []
        for _ in range(5):
            policy.scores(self.inputs)

    def run(self, calls: int) -> None:
        for _ in range(calls):
            t0 = time.perf_counter()
            self.policy.scores(self.inputs)
            self.latencies.append(time.perf_counter() - t0)

    def p50_ms(self) -> float:
        return float(np.percentile(np.array(self.latencies) * 1000, 50))


def model_loop_speedup(store: Path, users: int = 128, repeats: int = 30) -> dict[str, float]:
    """One batched forward over `users` full contexts vs one forward per user (same inputs)."""
    policy = load_bench_policy(store)
    batch = full_context_inputs(policy.manifest, users)
    singles = [batch.sliced(slice(i, i + 1)) for i in range(users)]
    for _ in range(5):
        policy.scores(batch)
        policy.scores(singles[0])
    t0 = time.perf_counter()
    for _ in range(repeats):
        policy.scores(batch)
    batched = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    for _ in range(max(1, repeats // 5)):
        for single in singles:
            policy.scores(single)
    looped = (time.perf_counter() - t0) / max(1, repeats // 5)
    return {
        "users": users,
        "batched_ms": batched * 1000,
        "per_user_loop_ms": looped * 1000,
        "speedup": looped / batched,
    }


REPEATS = {1: 1000, 16: 500, 128: 300, 1024: 60}
ROUNDS = 5


def run_suites(
    stores: dict[str, str | None], store: Path, dim: int, context_length: int, cpus: set[int] | None = None
) -> tuple[list[dict[str, Any]], dict[int, float]]:
    """The HTTP floor and both services run side by side and the timed requests (and the forwards) go in
    ROUNDS rounds over every service and batch size, so a slow period of a shared machine lands on all of
    them alike instead of on one row, and the ratios compare figures taken over the same minutes. Returns
    the HTTP figures and the forward's p50 (ms) by users."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    services: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    workloads: dict[tuple[str, int], Workload] = {}
    policy = load_bench_policy(store)
    forwards = {users: Forward(policy, users) for users in BATCH_SIZES}
    try:
        services["floor"] = proc, base = start_floor(cpus=cpus)
        client = KeepAliveClient(base)
        for users in BATCH_SIZES:
            workloads["floor", users] = Workload(client, dim, users)
            workloads["floor", users].warm_up(1)
        for name, redis_url in stores.items():
            services[name] = proc, base = start_service(store, redis_url, prefix, cpus=cpus)
            client = KeepAliveClient(base)
            for users in BATCH_SIZES:
                workloads[name, users] = Workload(client, dim, users)
                workloads[name, users].warm_up(context_length)
        for _ in range(ROUNDS):
            for (_, users), workload in workloads.items():
                workload.run(REPEATS[users] // ROUNDS)
            for users, forward in forwards.items():
                forward.run(REPEATS[users] // ROUNDS)
    finally:
        for workload in workloads.values():
            workload.client.close()
        for proc, _ in services.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        for redis_url in filter(None, stores.values()):
            delete_keys(redis_url, prefix)
    rows = [workload.figures() | {"store": name} for (name, _), workload in workloads.items()]
    return rows, {users: forward.p50_ms() for users, forward in forwards.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="model store (default: train a small model on a 600-user world)")
    parser.add_argument("--redis-url", help="Redis to use (default: a throwaway redis-server)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the throwaway Redis on the last CPU, the services on the others (SACO_CPUS), as when Redis has "
        "cores of its own; without it everything shares every CPU",
    )
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and (len(cpus) < 2 or args.redis_url):
        parser.error("--pin needs two CPUs and the throwaway Redis (no --redis-url)")
    service_cpus, redis_cpus = (set(cpus[:-1]), {cpus[-1]}) if args.pin else (None, None)

    tmp = Path(tempfile.mkdtemp(prefix="saco-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            store = Path(args.store) if args.store else train_small_model(tmp, users=600)
            redis_url = args.redis_url or stack.enter_context(throwaway_redis(redis_cpus))
            from model_store import ModelStore

            manifest = ModelStore(store).load().manifest
            dim, length = manifest.feature_dim, manifest.context_length
            rows, forward = run_suites({"embedded": None, "redis": redis_url}, store, dim, length, service_cpus)
            loop = model_loop_speedup(store)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if args.pin:
        print(f"services on CPUs {sorted(service_cpus or ())}, Redis on CPU {sorted(redis_cpus or ())}")
    print(f"{'store':9} {'users':>5} {'p50 ms':>8} {'p99 ms':>8} {'users/s':>10} {'per-user vs 1-user':>19}")
    for row in rows:
        if row["store"] == "floor":
            continue
        one = next(r for r in rows if r["store"] == row["store"] and r["users"] == 1)
        gain = one["p50_ms"] / (row["p50_ms"] / row["users"])
        print(
            f"{row['store']:9} {row['users']:>5} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} "
            f"{row['users_per_s']:10.0f} {gain:18.1f}x"
        )
    print("\np50 ms of the HTTP floor, the batched forward and the service on Redis; ratio = Redis / (floor + forward)")
    print(f"{'users':>5} {'floor':>8} {'forward':>8} {'Redis':>8} {'ratio':>6}")
    ratios = {}
    for users in BATCH_SIZES:
        floor, service = (next(r for r in rows if r["store"] == s and r["users"] == users) for s in ("floor", "redis"))
        ratios[users] = service["p50_ms"] / (floor["p50_ms"] + forward[users])
        print(
            f"{users:>5} {floor['p50_ms']:10.2f} {forward[users]:12.2f} {service['p50_ms']:10.2f} {ratios[users]:5.1f}x"
        )
    print(
        f"model only, {loop['users']} users at full context: batched forward {loop['batched_ms']:.2f} ms, "
        f"per-user loop {loop['per_user_loop_ms']:.2f} ms -> batched path {loop['speedup']:.1f}x faster"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"http": rows, "forward_p50_ms": forward, "ratio": ratios, "model_loop": loop}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
