"""Starting `saco serve` replicas as processes and waiting until they answer `/readyz`: the one way tests and
benchmarks start the service (the service itself never imports this)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from service.state.servers import free_port

EnvFor = Mapping[str, str] | Callable[[int], Mapping[str, str]]  # the same for every replica, or by index


@dataclass
class Replica:
    base: str  # http://127.0.0.1:<port>
    process: subprocess.Popen[bytes]
    log: Path | None  # its stdout and stderr (None: discarded)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (a graceful shutdown), then SIGKILL after `timeout_s`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_replica(
    store: str | os.PathLike[str],
    *,
    redis_url: str | None = None,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    cwd: str | os.PathLike[str] | None = None,
    ready_status: int | None = 200,
    timeout_s: float = 120.0,
) -> Replica:
    """`python -m saco serve --store STORE` on a free port of 127.0.0.1 (the embedded state store without
    `redis_url`), run from `cwd` (default: this interpreter's; a checkout there runs its own code), and
    wait until `/readyz` answers `ready_status` (None: do not wait). The environment is this process's
    without SACO_REDIS_URL, plus `env`; stdout and stderr go to `log` (appended) or are discarded."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if k != "SACO_REDIS_URL"}
    environment.update(env or {})
    cmd = [sys.executable, "-m", "saco", "serve", "--store", str(store), "--host", "127.0.0.1", "--port", str(port)]
    if redis_url is not None:
        cmd += ["--redis-url", redis_url]
    with open(log, "ab") if log is not None else contextlib.nullcontext(subprocess.DEVNULL) as sink:
        process = subprocess.Popen(cmd, cwd=cwd, env=environment, stdout=sink, stderr=sink)
    replica = Replica(f"http://127.0.0.1:{port}", process, log)
    if ready_status is not None:
        try:
            wait_ready(replica, status=ready_status, timeout_s=timeout_s)
        except BaseException:
            replica.stop()
            raise
    return replica


def wait_ready(replica: Replica, *, status: int = 200, timeout_s: float = 120.0) -> None:
    """Poll `/readyz` until it answers `status`; RuntimeError (with the log's end) when the process exits or
    the time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(replica.base + "/readyz", timeout=2).status_code == status:
                return
        exited = replica.process.poll()
        if exited is not None or time.monotonic() > deadline:
            what = f"exited with {exited}" if exited is not None else f"did not answer {status} within {timeout_s:g}s"
            tail = replica.log.read_text(errors="replace")[-2000:] if replica.log and replica.log.exists() else ""
            raise RuntimeError(f"replica {replica.base} {what}" + (f"; its log ends:\n{tail}" if tail else ""))
        time.sleep(0.1)


@contextlib.contextmanager
def replicas(
    store: str | os.PathLike[str],
    count: int = 1,
    *,
    redis_url: str | None = None,
    env: EnvFor | None = None,
    log_dir: Path | None = None,
    cwd: str | os.PathLike[str] | None = None,
    ready_status: int = 200,
    timeout_s: float = 120.0,
) -> Iterator[list[str]]:
    """`count` replicas on one model store (and one Redis); yields their base URLs once every one is ready,
    stops them all on exit. Replica i logs to `log_dir/replica-<i>.log`; `env` may depend on i."""
    started: list[Replica] = []
    try:
        for i in range(count):
            extra = env(i) if callable(env) else env
            log = None if log_dir is None else log_dir / f"replica-{i}.log"
            started.append(start_replica(store, redis_url=redis_url, env=extra, log=log, cwd=cwd, ready_status=None))
        for replica in started:
            wait_ready(replica, status=ready_status, timeout_s=timeout_s)
        yield [replica.base for replica in started]
    finally:
        for replica in started:
            if replica.process.poll() is None:
                replica.process.send_signal(signal.SIGTERM)
        for replica in started:
            replica.stop()
