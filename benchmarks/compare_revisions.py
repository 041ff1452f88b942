"""Latency of two revisions of the service measured side by side: did a change make decisions faster?

    python benchmarks/compare_revisions.py main               # that revision against the working tree
    python benchmarks/compare_revisions.py v1 --head v2 --redis-url redis://127.0.0.1:6379/15

Each revision (a git worktree of it, or this checkout for the working tree) trains its own model on the
same simulated logs and serves it on both stores: four services run at once, and the timed requests go
in rounds over every service and batch size, so both revisions see the same minutes of the machine (on a
shared machine, timings taken minutes apart differ by up to 2x; a ratio within one run does not). Absolute
figures come out above bench_service.py's: four processes share the caches.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from bench_service import (
    REPO,
    KeepAliveClient,
    Workload,
    delete_keys,
    start_service,
    throwaway_redis,
    train_small_model,
)

REPEATS = {1: 200, 16: 100, 128: 50, 1024: 8}  # per round


@contextlib.contextmanager
def checkout(revision: str | None, root: Path) -> Iterator[Path]:
    """A worktree of `revision` under `root` (removed after), or this checkout for None."""
    if revision is None:
        yield REPO
        return
    path = root / f"rev-{revision.replace('/', '_')}"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(path), revision], cwd=REPO, check=True, capture_output=True
    )
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="the revision to compare against (a commit, tag or branch)")
    parser.add_argument("--head", help="the revision measured against it (default: the working tree)")
    parser.add_argument("--redis-url", help="Redis to use (default: a throwaway redis-server)")
    parser.add_argument("--sizes", default="1,128", help="users per request, comma-separated")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    names = {"base": args.base, "head": args.head or "working tree"}

    prefix = f"compare-{uuid.uuid4().hex[:8]}:"
    loads: dict[tuple[str, str, int], Workload] = {}
    with tempfile.TemporaryDirectory(prefix="saco-compare-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        redis_url = args.redis_url or stack.enter_context(throwaway_redis())
        stack.callback(delete_keys, redis_url, prefix)  # runs after every service has stopped
        for name, revision in (("base", args.base), ("head", args.head)):
            repo = stack.enter_context(checkout(revision, root))
            print(f"training {name} ({names[name]}) ...", flush=True)
            (root / name).mkdir()
            store = train_small_model(root / name, users=600, repo=repo)
            for store_kind, url in (("embedded", None), ("redis", redis_url)):
                proc, base = start_service(store, url, f"{prefix}{name}:", repo=repo)
                stack.callback(proc.wait, 30)
                stack.callback(proc.terminate)
                client = KeepAliveClient(base)
                stack.callback(client.close)
                for users in sizes:
                    loads[name, store_kind, users] = workload = Workload(client, 8, users)
                    workload.warm_up(10)
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds}", flush=True)
            for workload in loads.values():
                workload.run(REPEATS[workload.users])

    print(f"base = {names['base']}, head = {names['head']}")
    header = ("base p50", "head p50", "ratio", "base p99", "head p99", "ratio")
    print(f"{'store':9} {'users':>5} " + " ".join(f"{h:>9}" if h != "ratio" else f"{h:>6}" for h in header))
    for store_kind in ("embedded", "redis"):
        for users in sizes:
            old, new = loads["base", store_kind, users].figures(), loads["head", store_kind, users].figures()
            print(
                f"{store_kind:9} {users:>5} {old['p50_ms']:9.2f} {new['p50_ms']:9.2f} "
                f"{old['p50_ms'] / new['p50_ms']:5.2f}x {old['p99_ms']:9.2f} {new['p99_ms']:9.2f} "
                f"{old['p99_ms'] / new['p99_ms']:5.2f}x"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
