"""What a cross-CPU hop costs on the machine it runs on: Redis PING round trips with the client and Redis on the same
CPU and on different CPUs (Linux).

    python benchmarks/wakeup_cost.py                # a throwaway redis-server pinned to the first CPU

On a VM, waking a vCPU that went idle can cost tens of microseconds (a halt exit and an inter-processor
interrupt), and a decision makes several such hops (the request, the Redis round trips, the inference
thread and back, the answer). This prints the round trip per placement and the guest's halt-polling
setting when the kernel has one (`cpuidle-haltpoll`: 0 ns means an idle vCPU halts at once); it changes
nothing. docs/service.md (Performance) has measured figures.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
from bench_service import throwaway_redis

HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")


def ping_round_trips(port: int, count: int) -> np.ndarray:
    """Seconds per PING round trip over one TCP connection, `count` of them."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = np.empty(count)
        for i in range(count):
            started = time.perf_counter()
            conn.sendall(b"*1\r\n$4\r\nPING\r\n")
            if conn.recv(64) != b"+PONG\r\n":
                raise RuntimeError("unexpected reply to PING")
            times[i] = time.perf_counter() - started
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=5000, help="round trips per placement and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over the placements")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        parser.error("needs at least two CPUs")
    redis_cpu, other_cpu = cpus[0], cpus[-1]
    placements = {"same CPU": {redis_cpu}, "other CPU": {other_cpu}}
    results: dict[str, list[float]] = {name: [] for name in placements}
    with throwaway_redis({redis_cpu}) as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        try:
            for _ in range(args.rounds):
                for name, client_cpus in placements.items():
                    os.sched_setaffinity(0, client_cpus)
                    results[name].append(float(np.median(ping_round_trips(port, args.count))) * 1e6)
        finally:
            os.sched_setaffinity(0, set(cpus))
    print(f"Redis on CPU {redis_cpu}; PING round trip, median per round ({args.count} each):")
    for name, values in results.items():
        print(f"  client on the {name:9s}: " + ", ".join(f"{v:6.1f}" for v in values) + " us")
    if HALT_POLL.exists():
        print(f"guest halt polling: {HALT_POLL.read_text().strip()} ns ({HALT_POLL})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
