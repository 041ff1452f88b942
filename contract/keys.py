"""Every Redis key and channel name that the service, the log export and the model announcer share: the
layout is written here once.

P = the configured prefix (no braces); C = the campaign id (no braces). The hash tag {c:C} puts every key
of one campaign's ledger in one Cluster slot, so each ledger script touches a single slot::

    P{c:C}:campaign       hash: the settings (budget, coupons as JSON {action: cents}, admin_lambda, ...: the
                          fields of CampaignSettings, '' for a default), the ledger (spent, reserved,
                          outstanding_predicted, overrun: cents), decisions, model_version, pacing's state
    P{c:C}:config         string: the settings as one JSON object, what a decision reads of its campaign
                          (written with the hash by upsert_campaign.lua; read with the users' contexts)
    P{c:C}:pacing         string: what pacing has set (pace.lua, JSON), read with the settings
    P{c:C}:pending        zset: batches that may hold reservations, scored by release deadline (ms)
    P{c:C}:b:<batch>      hash: field i is the record of decision "d-<batch>-<i>" (reserve.lua documents
                          the record); expires with the decision TTL
    P{c:C}:r:<request>    string: the decision returned again for a repeated request_id
    P{c:C}:log            stream: the campaign's decisions and outcomes (contract/log_entry.py), read by
                          the consumer group LOG_GROUP
    P ctx:<n>:C:<user>    string: the user's context (service/state/context.py); n = len(C), so no two
                          (campaign, user) pairs share a key; no hash tag: contexts spread over the slots
    P campaigns           set of campaign ids (for the periodic sweep and the log's readers)
    P models              pub/sub channel: a model version that became current (every replica reloads)
"""

from __future__ import annotations

LOG_GROUP = "export"  # the log exporter's consumer group (loop/logstream.py); the scripts' trim accounting


class Keys:
    """The key and channel names under one prefix."""

    def __init__(self, prefix: str) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"the Redis key prefix {prefix!r} must not contain braces (they set the hash tag)")
        self.prefix = prefix

    def _tag(self, campaign_id: str) -> str:
        if "{" in campaign_id or "}" in campaign_id:
            raise ValueError(f"campaign id {campaign_id!r} must not contain braces")
        return f"{self.prefix}{{c:{campaign_id}}}"

    def campaign_key(self, campaign_id: str) -> str:
        return self._tag(campaign_id) + ":campaign"

    def config_key(self, campaign_id: str) -> str:
        return self._tag(campaign_id) + ":config"

    def pacing_key(self, campaign_id: str) -> str:
        return self._tag(campaign_id) + ":pacing"

    def pending_key(self, campaign_id: str) -> str:
        return self._tag(campaign_id) + ":pending"

    def batch_key(self, campaign_id: str, batch: str) -> str:
        return f"{self._tag(campaign_id)}:b:{batch}"

    def request_key(self, campaign_id: str, request_id: str) -> str:
        return f"{self._tag(campaign_id)}:r:{request_id}"

    def log_key(self, campaign_id: str) -> str:
        return self._tag(campaign_id) + ":log"

    def context_key(self, campaign_id: str, user_id: str) -> str:
        return f"{self.prefix}ctx:{len(campaign_id)}:{campaign_id}:{user_id}"

    @property
    def campaigns_key(self) -> str:
        return f"{self.prefix}campaigns"

    @property
    def models_channel(self) -> str:
        return f"{self.prefix}models"
