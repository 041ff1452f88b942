"""Model announcements: after a version becomes current, the publisher tells every service replica on the
store's pub/sub channel (contract/keys.py `models_channel`; the message is the version); a replica that
hears it reloads, verifying the version first (a refused version leaves its incumbent serving)."""

from __future__ import annotations

import redis

from contract.keys import Keys


def announce(redis_url: str, prefix: str, version: str) -> int:
    """Publish `version` on the models channel; returns how many subscribers received it."""
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.publish(Keys(prefix).models_channel, version))
    finally:
        client.close()
