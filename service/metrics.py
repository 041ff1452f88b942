"""Prometheus metrics, one registry per app (so several apps can live in one process, e.g. tests)."""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from service.state.types import LogStatus

log = logging.getLogger("saco.service.metrics")
LOG_LAG_WARNING = 0.8  # of the log's bound: an exporter lag from which each sweep's check warns

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_seconds = Histogram(
            "saco_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decision_batch_users = Histogram(
            "saco_decision_request_users",
            "users per decisions request",
            buckets=_ROWS_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "saco_batch_rows",
            "rows per coalesced model forward",
            buckets=_ROWS_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "saco_batch_queue_wait_seconds",
            "time a request waited for its forward to start",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "saco_inference_seconds",
            "duration of one coalesced forward",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decisions = Counter("saco_decisions_total", "new decisions by action", ["action"], registry=r)
        self.idempotent_replays = Counter(
            "saco_decisions_replayed_total",
            "decisions returned again for a repeated request_id",
            registry=r,
        )
        self.reservations_refused = Counter(
            "saco_reservations_refused_total",
            "preferred coupons that did not fit the remaining budget (replaced by a cheaper one or none)",
            ["campaign"],
            registry=r,
        )
        self.budget_remaining = Gauge(
            "saco_budget_remaining",
            "remaining budget per campaign (currency units)",
            ["campaign"],
            registry=r,
        )
        self.campaign_lambda = Gauge(
            "saco_campaign_lambda", "a paced campaign's lambda after its last pacing step", ["campaign"], registry=r
        )
        self.plan_spend = Gauge(
            "saco_plan_spend", "what a paced campaign's spend plan had spent at its last step", ["campaign"], registry=r
        )
        self.pacing_error = Gauge(
            "saco_pacing_error",
            "(spend - plan) / budget at a paced campaign's last step (spend: realised plus expected outstanding)",
            ["campaign"],
            registry=r,
        )
        self.explored_decisions = Counter(
            "saco_decisions_explored_total",
            "new decisions drawn by exploration (uniform among the coupons that fit and none)",
            ["campaign"],
            registry=r,
        )
        self.nonfinite_scores = Counter(
            "saco_nonfinite_scores_total",
            "users whose model output (scores, score terms or expected costs) was not finite: no coupon for them",
            ["campaign"],
            registry=r,
        )
        self.holdout_decisions = Counter(
            "saco_decisions_holdout_total", "new decisions of holdout users (no coupon)", ["campaign"], registry=r
        )
        self.incremental_revenue = Gauge(
            "saco_incremental_revenue_per_decision",
            "mean reward of a treated user's settled decision minus a holdout user's (currency units)",
            ["campaign"],
            registry=r,
        )
        self.log_entries = Gauge(
            "saco_decision_log_entries", "entries in a campaign's decision and outcome log", ["campaign"], registry=r
        )
        self.log_export_lag = Gauge(
            "saco_decision_log_export_lag",
            "entries of a campaign's log the exporter has not read yet (all of them before its first run)",
            ["campaign"],
            registry=r,
        )
        self.log_lost = Gauge(
            "saco_decision_log_lost",
            "entries of a campaign's log trimmed by its bound before the exporter read them (since the campaign began)",
            ["campaign"],
            registry=r,
        )
        self._log_warned: dict[str, tuple[bool, int]] = {}  # campaign -> (lag above the warning, lost) last seen
        self.model_announcements = Counter(
            "saco_model_announcements_total",
            "model versions announced on the store's channel, by result: loaded, unchanged, refused",
            ["result"],
            registry=r,
        )
        self.outcomes = Counter("saco_outcomes_total", "outcomes by result", ["result"], registry=r)
        self.context_write_failures = Counter(
            "saco_context_write_failures_total",
            "decision requests whose steps could not be appended to the users' contexts (answered anyway)",
            registry=r,
        )
        self.reservations_expired = Counter(
            "saco_reservations_expired_total",
            "reservations released by the expiry sweep",
            ["campaign"],
            registry=r,
        )
        self.overloaded = Counter("saco_batcher_overloaded_total", "requests refused by a full queue", registry=r)
        self.state_store_errors = Counter(
            "saco_state_store_errors_total",
            "requests answered 503 because the state store failed",
            registry=r,
        )
        self.model_info = Gauge(
            "saco_model_info",
            "the serving model version and its calibration (empty: the manifest's own lambda) (value 1)",
            ["version", "calibration"],
            registry=r,
        )
        self.gc_pauses = GcPauses()
        r.register(self.gc_pauses)

    def observe_log(self, campaign_id: str, status: LogStatus, bound: int) -> None:
        """A campaign's decision log against its exporter (each sweep): the gauges, and a warning when the
        exporter's lag reaches LOG_LAG_WARNING of the bound and whenever entries were lost since the last
        sweep."""
        self.log_entries.labels(campaign=campaign_id).set(status.entries)
        self.log_export_lag.labels(campaign=campaign_id).set(status.lag)
        self.log_lost.labels(campaign=campaign_id).set(status.lost)
        behind = bound > 0 and status.lag >= LOG_LAG_WARNING * bound
        was_behind, lost_before = self._log_warned.get(campaign_id, (False, status.lost))
        self._log_warned[campaign_id] = (behind, status.lost)
        facts = {"campaign": campaign_id, "lag": status.lag, "bound": bound, "lost": status.lost}
        if behind and not was_behind:
            log.warning("the exporter is behind: the decision log will lose entries unless it catches up", extra=facts)
        if status.lost > lost_before:
            log.warning(
                "the decision log lost entries the exporter had not read",
                extra={**facts, "newly_lost": status.lost - lost_before},
            )

    def set_model(self, previous: tuple[str, str | None] | None, served: tuple[str, str | None]) -> None:
        """`saco_model_info` names what serves: (version, calibration id or None)."""
        if previous is not None:
            self.model_info.remove(previous[0], previous[1] or "")
        self.model_info.labels(version=served[0], calibration=served[1] or "").set(1)


class GcPauses(Collector):
    """Pauses of the cyclic garbage collector, by generation: a histogram fed from `gc.callbacks`.

    A full collection walks every tracked object, so a process holding many long-lived objects pays for it
    as tail latency (this is how the embedded store's per-decision objects were found). The callback runs
    inside the collector, at any allocation in any thread, so it takes no lock: it only bumps integers and
    a float (atomic under the GIL); the collector reads them at scrape time.
    """

    def __init__(self) -> None:
        self._started = 0.0
        self._buckets = [[0] * (len(_LATENCY_BUCKETS) + 1) for _ in range(3)]  # the last is +Inf
        self._sums = [0.0, 0.0, 0.0]

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = info["generation"]
        self._buckets[generation][bisect.bisect_left(_LATENCY_BUCKETS, pause)] += 1
        self._sums[generation] += pause

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "saco_gc_pause_seconds", "pauses of the cyclic garbage collector", labels=["generation"]
        )
        for generation, counts in enumerate(self._buckets):
            cumulative, running = [], 0
            for bound, count in zip([*map(str, _LATENCY_BUCKETS), "+Inf"], counts, strict=True):
                running += count
                cumulative.append((bound, running))
            family.add_metric([str(generation)], cumulative, self._sums[generation])
        yield family


class WithoutCampaigns(Collector):
    """`registry`'s metrics without the campaign label (SACO_METRICS_EXPOSURE=aggregate): per-campaign
    counters summed over the campaigns, per-campaign gauges left out (they say a campaign's budget)."""

    def __init__(self, registry: Collector) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if not any("campaign" in sample.labels for sample in family.samples):
                yield family
                continue
            if family.type != "counter":
                continue
            sums: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "campaign"))
                sums[sample.name, labels] = sums.get((sample.name, labels), 0.0) + sample.value
            summed = Metric(family.name, family.documentation, family.type)
            for (name, labels), value in sums.items():
                summed.add_sample(name, dict(labels), value)
            yield summed
