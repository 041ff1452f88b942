"""CPU per decisions request, by process: the service, Redis and the benchmark client (Linux: /proc).

    python benchmarks/cpu_per_request.py                     # 128 users per request, 10 s, throwaway Redis
    python benchmarks/cpu_per_request.py --users 1 --seconds 20 --store DIR

On a 2-core machine a closed loop of requests is close to serial: the latency is roughly the CPU each
party spends per request, so this tells which party a change has to make cheaper (the service's event
loop and inference thread, Redis's scripts, or the client). Also prints the client's p50 / p99, the
service's own mean (its latency histogram) and the cyclic GC's pauses per request.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import redis
from bench_service import KeepAliveClient, Workload, delete_keys, start_service, throwaway_redis, train_small_model

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a whole process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15 of stat)


def server_figures(base: str) -> tuple[float, float, float]:
    """(decisions seconds sum, decisions count, GC pause seconds) from the service's /metrics."""
    text = httpx.get(base + "/metrics").text
    route = r'method="POST",route="/v1/campaigns/\{campaign_id\}/decisions",status="200"'
    total = float(re.search(rf"saco_http_request_duration_seconds_sum\{{{route}\}} (\S+)", text)[1])  # type: ignore[index]
    count = float(re.search(rf"saco_http_request_duration_seconds_count\{{{route}\}} (\S+)", text)[1])  # type: ignore[index]
    gc = sum(float(v) for v in re.findall(r'saco_gc_pause_seconds_sum\{generation="\d"\} (\S+)', text))
    return total, count, gc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=128, help="users per request")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the timed loop runs")
    parser.add_argument("--store", help="model store (default: train a small model on a 600-user world)")
    args = parser.parse_args()
    from model_store import ModelStore

    with tempfile.TemporaryDirectory(prefix="saco-cpu-") as tmp, throwaway_redis() as url:
        store = Path(args.store) if args.store else train_small_model(Path(tmp), users=600)
        manifest = ModelStore(store).load().manifest
        prefix = "cpu-bench:"
        proc, base = start_service(store, url, prefix)
        redis_pid = int(redis.Redis.from_url(url).info("server")["process_id"])
        try:
            workload = Workload(KeepAliveClient(base), manifest.feature_dim, args.users)
            workload.warm_up(manifest.context_length)
            workload.run(50)
            workload.latencies.clear()
            pids = {"service": proc.pid, "redis": redis_pid, "client": os.getpid()}
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            served_before = server_figures(base)
            started = time.perf_counter()
            while time.perf_counter() - started < args.seconds:
                workload.run(20)
            wall = time.perf_counter() - started
            after = {name: cpu_seconds(pid) for name, pid in pids.items()}
            served_after = server_figures(base)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            delete_keys(url, prefix)
    n = len(workload.latencies)
    ms = np.array(workload.latencies) * 1000
    per_request = {name: (after[name] - before[name]) / n * 1000 for name in pids}
    busy = sum(after[name] - before[name] for name in pids) / wall / (os.cpu_count() or 1)
    served = [(b - a) for a, b in zip(served_before, served_after, strict=True)]
    print(f"{args.users} users per request, {n} requests in {wall:.1f} s (Redis store)")
    print(f"client: p50 {np.percentile(ms, 50):.2f} ms, p99 {np.percentile(ms, 99):.2f} ms; service's own mean "
          f"{served[0] / served[1] * 1000:.2f} ms; GC pauses {served[2] / n * 1000:.3f} ms per request")  # fmt: skip
    print("CPU ms per request: " + ", ".join(f"{name} {value:.2f}" for name, value in per_request.items()))
    print(f"machine busy {busy * 100:.0f}% of {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
