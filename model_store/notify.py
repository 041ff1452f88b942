"""Model announcements: after a version becomes current, the publisher tells every service replica on the
store's pub/sub channel ``<prefix>models`` (the message is the version); a replica that hears it reloads,
verifying the version first (a refused version leaves its incumbent serving)."""

from __future__ import annotations

import redis


def models_channel(prefix: str) -> str:
    """The channel replicas subscribe to: ``<prefix>models``."""
    return f"{prefix}models"


def announce(redis_url: str, prefix: str, version: str) -> int:
    """``PUBLISH <prefix>models <version>``; returns how many subscribers received it."""
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.publish(models_channel(prefix), version))
    finally:
        client.close()
