"""A Redis that hangs (SIGSTOP) fails every store call within its socket timeout, whatever the URL
carries: a password (AUTH) and a database other than 0 (SELECT) are sent inside the bounded call, so
waiting callers do not queue behind one connection attempt."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time

import pytest

from service.state import StateStoreError
from service.state.servers import start_redis
from service.state.store import StateStore

TIMEOUT_S = 0.5
CALLERS = 40


@pytest.mark.parametrize("secured", [False, True], ids=["plain", "password-and-db"])
def test_every_call_fails_within_the_timeout_when_redis_hangs(secured: bool) -> None:
    with start_redis(password="s3cret@pass" if secured else None, database=5 if secured else 0) as server:
        url = server.url

        async def scenario() -> list[float]:
            store = StateStore(url, prefix="frozen:", cluster=False, socket_timeout_s=TIMEOUT_S)
            try:
                assert await store.ping()
                await store.close()  # every caller below opens its own connection (TCP, AUTH, SELECT)
                os.kill(server.process.pid, signal.SIGSTOP)
                try:

                    async def one() -> float:
                        started = time.perf_counter()
                        with pytest.raises(StateStoreError):
                            await store.get_campaign("c1")
                        return time.perf_counter() - started

                    return list(await asyncio.gather(*(one() for _ in range(CALLERS))))
                finally:
                    os.kill(server.process.pid, signal.SIGCONT)
            finally:
                await store.close()

        waits = asyncio.run(scenario())
    assert len(waits) == CALLERS
    # each call is bounded by the timeout (plus scheduling): none queues behind another's connection
    assert max(waits) < 4 * TIMEOUT_S, (statistics.median(waits), max(waits))
    assert statistics.median(waits) < 2 * TIMEOUT_S
