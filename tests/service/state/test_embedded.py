"""The zero-configuration store: a private redis-server per service process, its ledger on disk."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import item, put, reserve

from service.state.embedded import EmbeddedRedis
from service.state.servers import RedisServerError
from service.state.store import StateStore


async def _ledger(url: str, action: str) -> tuple[int, int, int] | None:
    store = StateStore(url, prefix="saco:")
    try:
        if action == "write":
            await store.upsert_campaign("c", put(10_000))
            await reserve(store, "c", [item("u1", [3, 0]), item("u2", [2, 0])])
        state = await store.get_campaign("c")
        return None if state is None else (state.budget, state.reserved, state.decisions)
    finally:
        await store.close()


def test_the_ledger_survives_a_restart(tmp_path: Path) -> None:
    embedded = EmbeddedRedis(tmp_path / "state")
    written = asyncio.run(_ledger(embedded.start(), "write"))
    embedded.stop()
    assert written == (10_000, 1_500, 2)
    assert any((tmp_path / "state").rglob("*.aof"))
    again = EmbeddedRedis(tmp_path / "state")
    try:
        assert asyncio.run(_ledger(again.start(), "read")) == written
    finally:
        again.stop()


def test_a_second_process_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path / "state")
    first.start()
    try:
        with pytest.raises(RedisServerError, match="another service process is using the embedded store"):
            EmbeddedRedis(tmp_path / "state").start()
    finally:
        first.stop()
    second = EmbeddedRedis(tmp_path / "state")  # free again once the first stopped
    second.start()
    second.stop()


def test_a_missing_redis_server_binary_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SACO_REDIS_SERVER", str(tmp_path / "no-such-redis-server"))
    with pytest.raises(RedisServerError, match=r"no-such-redis-server.* Redis URL"):
        EmbeddedRedis(tmp_path / "state").start()


def test_the_private_server_stops_when_its_service_is_killed(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from service.state.embedded import EmbeddedRedis\n"
        "e = EmbeddedRedis(Path(sys.argv[1])); e.start()\n"
        "print(e.server.process.pid, flush=True); time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "state")], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, "the private redis-server outlived its service"
        time.sleep(0.05)
