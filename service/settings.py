"""Service configuration: one pydantic-settings object, read from `SACO_*` environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DAY_S = 24 * 3600


def parse_cpu_list(text: str) -> set[int]:
    """'0-3,8' -> {0, 1, 2, 3, 8} (the kernel's cpu-list format); ValueError naming what is wrong."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        last = last if dash else first
        if not (first.isdecimal() and last.isdecimal() and int(first) <= int(last)):
            raise ValueError(f"{part.strip()!r} is not a CPU number or range like 0-3 (in {text!r})")
        cpus.update(range(int(first), int(last) + 1))
    return cpus


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SACO_", extra="ignore")

    store: str = Field(
        default="model_store", description="model store directory (the service loads its CURRENT version)"
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis URL (redis://, rediss://, unix://); without one, state lives in the embedded store",
    )
    redis_cluster: bool | None = Field(
        default=None, description="whether the Redis is a Cluster; unset: asked of the server on first use"
    )
    redis_prefix: str = Field(
        default="saco:", pattern=r"^[^{}]*$", description="prefix of every Redis key this service writes (no braces)"
    )
    state_dir: str | None = Field(
        default=None,
        description="the embedded store's directory (its append-only file); default: <store>/state",
    )
    redis_socket_timeout_s: float = Field(default=0.5, gt=0, description="Redis connect/read timeout")
    admin_token: SecretStr | None = Field(default=None, description="bearer token of the admin routes (off without)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(
        default=0, ge=0, description="intra-op threads of the inference worker; 0 = half the cores (of SACO_CPUS)"
    )
    cpus: str | None = Field(
        default=None,
        description="CPUs the serving process runs on, e.g. '0' or '0-3,8' (Linux); keep Redis off them",
    )

    max_batch: int = Field(default=1024, ge=1, description="most users in one decisions request")
    max_abs_feature: float = Field(
        default=1e6,
        gt=0,
        le=3.4e38,
        description="largest magnitude of a feature (422 above it, naming the user): numbers far outside the "
        "scale the model was trained on overflow its float32 arithmetic",
    )
    max_body_bytes: int = Field(
        default=4 << 20,
        ge=1024,
        description="largest request body in bytes (413 above it, refused before it is read or parsed)",
    )
    metrics_exposure: Literal["full", "aggregate", "admin"] = Field(
        default="full",
        description="what /metrics shows: full (per-campaign series), aggregate (no campaign label: "
        "per-campaign counters summed, per-campaign gauges left out), admin (full, to the admin token only)",
    )
    batcher_max_rows: int = Field(default=2048, ge=1, description="most rows in one coalesced forward")
    batcher_max_wait_ms: float = Field(default=1.0, ge=0, le=2.0, description="longest a row waits for company")
    batcher_queue_size: int = Field(default=256, ge=1, description="most requests waiting for inference (then 503)")

    decision_ttl_s: int = Field(default=30 * DAY_S, ge=1, description="how long outcomes are accepted for a decision")
    reservation_expiry_s: int = Field(
        default=14 * DAY_S,
        ge=1,
        description="reservations without an outcome by then are released (counted unredeemed); a later outcome "
        "is charged where it still fits the budget, the rest counted as overrun. The default covers 99% of the "
        "outcome delays the product's delay model expects (exponential, mean 3 days)",
    )
    min_redemption: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="expected mode: the smallest redemption probability a reservation assumes, for campaigns "
        "that set none (a coupon reserves at least this share of its cost, and at least a cent)",
    )
    plan_lead: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="how far (a share of the budget) spent and committed may run ahead of a time plan "
        "(starts_at .. ends_at); no coupon is granted outside the plan's horizon",
    )
    context_ttl_s: int = Field(default=30 * DAY_S, ge=1, description="a user's trajectory context expires when idle")
    sweep_interval_s: float = Field(default=30.0, gt=0, description="period of the expired-reservation sweep")
    pacing_interval_s: float = Field(default=5.0, gt=0, description="period of a campaign's pacing steps")
    pacing_step_share: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="a pacing step also runs once this share of the plan's decisions (expected_decisions) or "
        "of the budget has gone since the last step, however soon; 0: steps on the timer alone",
    )
    pacing_step: float = Field(
        default=20.0,
        gt=0,
        description="lambda change per unit of excess spend (a fraction of the budget), in model lambdas",
    )
    pacing_max_step: float = Field(default=0.5, gt=0, description="largest lambda change of one step, in model lambdas")
    pacing_lambda_max: float = Field(default=50.0, gt=0, description="largest paced lambda, in model lambdas")
    prior_coupons: int = Field(
        default=20,
        ge=0,
        description="pacing and expected-mode reservations count a coupon at its full cost until outcomes of "
        "about this many coupons of its kind have settled (then at the realised / issued cost ratio)",
    )

    log_max_entries: int = Field(
        default=1_000_000,
        ge=0,
        description="approximate bound of each campaign's decision and outcome log (a Redis stream); 0: no log",
    )
    exploration_seed: int | None = Field(
        default=None,
        description="seed of the exploration draws (reproducible runs); unset: fresh randomness per process",
    )

    log_level: str = "INFO"

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.reservation_expiry_s > self.decision_ttl_s:
            raise ValueError("reservation_expiry_s must not exceed decision_ttl_s (a reservation outlives its record)")
        if self.max_batch > self.batcher_max_rows:
            raise ValueError("max_batch must not exceed batcher_max_rows")
        if self.metrics_exposure == "admin" and (self.admin_token is None or not self.admin_token.get_secret_value()):
            raise ValueError("metrics_exposure 'admin' needs SACO_ADMIN_TOKEN (the token that reads /metrics)")
        return self

    @field_validator("cpus")
    @classmethod
    def _cpu_list(cls, value: str | None) -> str | None:
        if value is not None:
            parse_cpu_list(value)
        return value

    def state_path(self) -> Path:
        return Path(self.state_dir) if self.state_dir else Path(self.store) / "state"

    def cpu_set(self) -> set[int] | None:
        return None if self.cpus is None else parse_cpu_list(self.cpus)

    def inference_threads(self) -> int:
        cpus = self.cpu_set()
        return self.torch_threads or max(1, (len(cpus) if cpus else os.cpu_count() or 2) // 2)
