"""Faults with real processes: replicas of the service on one Redis (append-only file, fsync always) under
a client load of decisions and outcomes, while a replica is killed (-9), Redis is restarted on its AOF,
stopped, killed (-9) or frozen (SIGSTOP), and a corrupt or inconsistent model is published and reloaded.

The clients retry what failed (a 503, a dropped connection) with the same request ids, until answered, as
a well-behaved caller does. After each fault the campaign's ledger is checked against what the clients
saw: reserved = the coupons of their unsettled decisions, spent = the costs of their accepted outcomes,
decisions = the distinct decisions they were given (nothing lost, nothing counted twice, no reservation
without a decision). Each fault reports the time from the fault to the first 503 and from its end to the
first success.

    .venv/bin/python benchmarks/faults.py                 # the full run: 10 s outages, prints the figures
    .venv/bin/python benchmarks/faults.py --outage-s 2    # shorter

tests/service/test_faults.py runs the same scenarios with short outages in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model_store import ModelStore  # noqa: E402
from service.replicas import Replica, start_replica  # noqa: E402
from service.state.servers import RedisServer, free_port, start_redis  # noqa: E402

TOKEN = "faults-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
COUPONS = [{"action": 1, "cost": 2.0}, {"action": 2, "cost": 5.0}, {"action": 3, "cost": 10.0}]


def cents(amount: float) -> int:
    return round(amount * 100)


@dataclass
class Seen:
    """What the clients saw: every decision and every accepted outcome, and when each answer came."""

    decisions: dict[str, int] = field(default_factory=dict)  # decision id -> reserved cents
    settled: dict[str, int] = field(default_factory=dict)  # decision id -> settled cents
    events: list[tuple[float, str]] = field(default_factory=list)  # (time, "ok" | "503" | "conn")
    lock: threading.Lock = field(default_factory=threading.Lock)

    def event(self, kind: str) -> None:
        with self.lock:
            self.events.append((time.monotonic(), kind))


class Cluster:
    """One Redis (AOF, fsync always) on a fixed port and `replicas` service processes on it."""

    def __init__(self, store: Path, root: Path, replicas: int, prefix: str) -> None:
        self.store, self.root, self.prefix = store, root, prefix
        self.redis_dir = root / "redis"
        self.redis_port = free_port()
        self.redis = self.start_redis()
        self.url = self.redis.url
        self.replicas: list[Replica] = []
        for i in range(replicas):
            self.start_replica(i)

    def start_redis(self) -> RedisServer:
        return start_redis(
            directory=self.redis_dir,
            port=self.redis_port,
            append_only=True,
            extra_args=("--appendfsync", "always"),
        )

    def start_replica(self, i: int) -> None:
        replica = start_replica(
            self.store,
            redis_url=self.url,
            env={"SACO_ADMIN_TOKEN": TOKEN, "SACO_REDIS_PREFIX": self.prefix, "SACO_DEVICE": "cpu"},
            log=self.root / f"replica-{i}.log",
            cwd=REPO,
        )
        if i < len(self.replicas):
            self.replicas[i] = replica
        else:
            self.replicas.append(replica)

    @property
    def bases(self) -> list[str]:
        return [replica.base for replica in self.replicas]

    def kill_replica(self, i: int) -> None:
        self.replicas[i].process.kill()
        self.replicas[i].process.wait()

    def stop(self) -> None:
        for replica in self.replicas:
            if replica.process.poll() is None:
                replica.process.send_signal(signal.SIGTERM)
        for replica in self.replicas:
            replica.stop(timeout_s=20)
        if self.redis.process.poll() is None:
            os.kill(self.redis.process.pid, signal.SIGCONT)
        self.redis.stop()


class Load:
    """`clients` threads, each a loop of: decide for 4 users (request ids), settle about half of them."""

    def __init__(self, cluster: Cluster, campaign: str, seen: Seen, clients: int, dim: int) -> None:
        self.cluster, self.campaign, self.seen, self.dim = cluster, campaign, seen, dim
        self.stopping = threading.Event()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self.client, args=(n,), daemon=True) for n in range(clients)]
        self.rounds = 0

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=180)

    def until_answered(self, http: httpx.Client, path: str, body: dict[str, Any], start: int) -> Any:
        """POST `body` until a replica answers 200 (retrying 503s and dropped connections, the same body)."""
        deadline = time.monotonic() + 150
        replica = start
        while time.monotonic() < deadline:
            base = self.cluster.bases[replica % len(self.cluster.bases)]
            try:
                resp = http.post(base + path, json=body, timeout=10)
            except httpx.TransportError:
                self.seen.event("conn")
                replica += 1
                time.sleep(0.05)
                continue
            if resp.status_code == 503:
                self.seen.event("503")
                time.sleep(0.05)
                continue
            if resp.status_code != 200:
                raise RuntimeError(f"{path}: {resp.status_code} {resp.text[:300]}")
            self.seen.event("ok")
            return resp.json()
        raise TimeoutError(f"{path} not answered within 150 s")

    def client(self, n: int) -> None:
        rng = random.Random(n)
        round_ = 0
        with httpx.Client() as http:
            while not self.stopping.is_set():
                round_ += 1
                try:
                    requests = [
                        {
                            "user_id": f"user-{rng.randrange(400)}",
                            "features": [rng.uniform(-1, 1) for _ in range(self.dim)],
                            "request_id": f"c{n}-r{round_}-{i}",
                        }
                        for i in range(4)
                    ]
                    path = f"/v1/campaigns/{self.campaign}"
                    decided = self.until_answered(http, path + "/decisions", {"requests": requests}, n + round_)
                    outcomes = []
                    with self.seen.lock:
                        for d in decided["decisions"]:
                            self.seen.decisions[d["decision_id"]] = cents(d["cost"])
                    for d in decided["decisions"]:
                        if rng.random() < 0.5:
                            cost = d["cost"] if rng.random() < 0.5 else 0.0
                            outcomes.append({"decision_id": d["decision_id"], "reward": 1.0, "cost": cost})
                    if outcomes:
                        self.until_answered(http, path + "/outcomes", {"outcomes": outcomes}, n + round_)
                        with self.seen.lock:
                            for o in outcomes:
                                self.seen.settled[o["decision_id"]] = cents(o["cost"])
                    self.rounds += 1
                except Exception as exc:  # reported by the scenario
                    self.errors.append(f"client {n}: {type(exc).__name__}: {exc}")
                    return


@dataclass
class Result:
    name: str
    to_503_s: float | None  # fault -> first 503 (None: no 503 seen)
    recovery_s: float | None  # end of the fault -> first success
    rounds: int
    decisions: int
    unavailable: int  # 503s and dropped connections the clients retried
    ledger_exact: bool
    detail: str = ""

    def line(self) -> str:
        to_503 = "-" if self.to_503_s is None else f"{self.to_503_s:.2f} s"
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.2f} s"
        return (
            f"{self.name:<24} first 503 after {to_503:>8}  recovered after {recovery:>8}  rounds {self.rounds:>5}  "
            f"decisions {self.decisions:>6}  retried {self.unavailable:>5}  ledger exact: {self.ledger_exact}"
        )


def check_ledger(cluster: Cluster, campaign: str, seen: Seen) -> tuple[bool, str]:
    """The campaign's ledger against what the clients saw (every request was answered in the end)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            resp = httpx.get(cluster.bases[-1] + f"/v1/admin/campaigns/{campaign}", headers=ADMIN, timeout=10)
            if resp.status_code == 200:
                view = resp.json()
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            return False, "campaign view unavailable"
        time.sleep(0.2)
    reserved = sum(c for d, c in seen.decisions.items() if d not in seen.settled)
    spent = sum(seen.settled.values())
    got = (cents(view["reserved"]), cents(view["spent"]), view["decisions"])
    expected = (reserved, spent, len(seen.decisions))
    return got == expected, f"(reserved, spent, decisions) ledger {got}, clients saw {expected}"


def timed(seen: Seen, fault_at: float, ended_at: float) -> tuple[float | None, float | None]:
    with seen.lock:
        events = list(seen.events)
    first_503 = next((t for t, kind in events if kind == "503" and t >= fault_at), None)
    recovered = next((t for t, kind in events if kind == "ok" and t >= ended_at), None)
    return (
        None if first_503 is None else first_503 - fault_at,
        None if recovered is None else recovered - ended_at,
    )


def scenario(
    name: str, cluster: Cluster, dim: int, clients: int, warm_s: float, fault: Callable[[], object], after_s: float
) -> Result:
    """On a campaign of its own: load, `fault()` (returns when the fault ends), more load, then the ledger
    check."""
    campaign = "faults-" + "".join(c if c.isalnum() else "-" for c in name)
    put_campaign(cluster, campaign)
    seen = Seen()
    with Load(cluster, campaign, seen, clients, dim) as load:
        time.sleep(warm_s)
        fault_at = time.monotonic()
        fault()
        ended_at = time.monotonic()
        time.sleep(after_s)
    if load.errors:
        return Result(name, None, None, load.rounds, len(seen.decisions), 0, False, "; ".join(load.errors[:3]))
    exact, detail = check_ledger(cluster, campaign, seen)
    to_503, recovery = timed(seen, fault_at, ended_at)
    unavailable = sum(1 for _, kind in seen.events if kind != "ok")
    return Result(name, to_503, recovery, load.rounds, len(seen.decisions), unavailable, exact, detail)


def put_campaign(cluster: Cluster, campaign: str) -> None:
    body = {"budget": 1_000_000.0, "coupons": COUPONS}
    resp = httpx.put(cluster.bases[-1] + f"/v1/admin/campaigns/{campaign}", json=body, headers=ADMIN, timeout=10)
    resp.raise_for_status()


def bad_models(store: Path) -> Iterator[tuple[str, str]]:
    """Make a corrupt version current (its model bytes changed after publishing), then an inconsistent one
    (one more action than the serving model), yielding (version, what is wrong) while each is current;
    the good version is current again at the end."""
    models = ModelStore(store)
    good = models.load()
    manifest = {k: v for k, v in good.manifest.to_json().items() if k not in ("version", "created_at", "model_sha256")}
    try:
        corrupt = models.publish(good.model_path, manifest)
        corrupt.model_path.write_bytes(corrupt.model_path.read_bytes()[:-64])
        yield corrupt.version, "corrupt"
        inconsistent = models.publish(good.model_path, {**manifest, "num_actions": manifest["num_actions"] + 1})
        yield inconsistent.version, "inconsistent"
    finally:
        models.promote(good.version)


def run_all(store: Path, outage_s: float, clients: int = 4, warm_s: float = 2.0, after_s: float = 3.0) -> list[Result]:
    """Every scenario on one cluster (2 replicas); the replica kill comes last."""
    dim = ModelStore(store).load().manifest.feature_dim
    root = Path(tempfile.mkdtemp(prefix="saco-faults-"))
    cluster = Cluster(store, root, replicas=2, prefix="saco-faults:")
    results: list[Result] = []
    try:

        def restart_redis_on_aof() -> None:
            cluster.redis.stop()  # SIGTERM: Redis flushes its AOF
            cluster.redis = cluster.start_redis()

        def redis_stopped() -> None:
            cluster.redis.stop()
            time.sleep(outage_s)
            cluster.redis = cluster.start_redis()

        def redis_killed() -> None:
            cluster.redis.process.kill()
            cluster.redis.process.wait()
            time.sleep(outage_s)
            cluster.redis = cluster.start_redis()

        def redis_frozen() -> None:
            os.kill(cluster.redis.process.pid, signal.SIGSTOP)
            time.sleep(outage_s)
            os.kill(cluster.redis.process.pid, signal.SIGCONT)

        def reload_bad_models() -> None:
            for version, what in bad_models(store):
                for base in cluster.bases:
                    resp = httpx.post(base + "/v1/admin/models/reload", headers=ADMIN, timeout=60)
                    if resp.status_code != 409 or version not in resp.text:
                        raise RuntimeError(f"reload of the {what} version {version}: {resp.status_code} {resp.text}")

        def replica_killed() -> None:
            cluster.kill_replica(0)

        for name, fault in (
            ("redis restart on AOF", restart_redis_on_aof),
            (f"redis stopped {outage_s:g} s", redis_stopped),
            (f"redis kill -9, {outage_s:g} s", redis_killed),
            (f"redis frozen {outage_s:g} s", redis_frozen),
            ("bad models reloaded", reload_bad_models),
            ("replica kill -9", replica_killed),
        ):
            results.append(scenario(name, cluster, dim, clients, warm_s, fault, after_s))
            print(results[-1].line(), file=sys.stderr, flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    return results


@contextmanager
def trained_store() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="saco-faults-model-"))
    try:
        logs, store = root / "logs.parquet", root / "store"
        saco = [sys.executable, "-m", "saco"]
        subprocess.run(
            [*saco, "simulate", "--users", "300", "--rounds", "4", "--seed", "1", "--out", str(logs)],
            check=True,
            cwd=REPO,
            capture_output=True,
        )
        subprocess.run(
            [*saco, "train", "--logs", str(logs), "--store", str(store), "--epochs", "1"],
            check=True,
            cwd=REPO,
            capture_output=True,
        )
        yield store
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage-s", type=float, default=10.0, help="how long Redis stays stopped or frozen")
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    print("training a small model...", file=sys.stderr, flush=True)
    with trained_store() as store:
        results = run_all(store, args.outage_s, clients=args.clients, warm_s=3.0, after_s=5.0)
    print(json.dumps([r.__dict__ for r in results]))
    if not all(r.ledger_exact for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
