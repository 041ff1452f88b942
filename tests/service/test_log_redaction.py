"""Passwords in Redis URLs never reach the logs: in the userinfo (also when they contain "@"), or as a
`?password=` query parameter; checked on the function and on a real service's log."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from svc_served import serve

from service.jsonlog import redact
from service.state.servers import start_redis

PASSWORD = "p@ss:w0rd@x"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:p@ss@w@rd@host:1/2", "redis://user:***@host:1/2"),
        ("rediss://user:a/b?c@host/0", "rediss://user:***@host/0"),
        ("redis://h:6379/0?password=abc&db=1", "redis://h:6379/0?password=***&db=1"),
        ("redis://h/0?db=1&password=a%40b", "redis://h/0?db=1&password=***"),
        ("unix:///run/redis.sock?password=pw", "unix:///run/redis.sock?password=***"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://user@host/0", "redis://user@host/0"),
    ],
)
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert redact(f"connecting to {url} failed") == f"connecting to {shown} failed"


@pytest.mark.parametrize("where", ["userinfo", "query"])
def test_the_service_log_has_no_password(trained_store: Path, tmp_path: Path, where: str) -> None:
    with start_redis(password=PASSWORD) as server:
        port = server.url.split("@127.0.0.1:")[1].split("/")[0]
        query = f"redis://127.0.0.1:{port}/0?password={quote(PASSWORD, safe='')}"
        url = query if where == "query" else server.url
        with serve(trained_store, url, prefix="redaction:", log_dir=tmp_path) as (base,):
            assert httpx.get(base + "/readyz").json()["ready"] is True
        log = (tmp_path / "replica-0.log").read_text()
    assert "service ready" in log
    for secret in (PASSWORD, quote(PASSWORD, safe=""), "w0rd", "ss:w0"):
        assert secret not in log, secret
