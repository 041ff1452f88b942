"""`saco`: the command line (README.md). A thin face over offline/, model_store/ and service/.

Progress goes to stderr; the last line of stdout is one JSON object; errors exit non-zero with one line
on stderr.
"""

from __future__ import annotations

import functools
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

if TYPE_CHECKING:
    from loop.logstream import ExportSummary

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="SACO coupon decisioning: simulate, train, calibrate, evaluate, serve.",
)
models_app = typer.Typer(no_args_is_help=True, help="List, promote and roll back model versions.")
app.add_typer(models_app, name="models")

F = TypeVar("F", bound=Callable[..., Any])

LOG_SUFFIXES = (".parquet", ".pq", ".csv")  # the formats `offline.logs.log_writer` writes
INSTALL_HINT = (
    "install the dependency group the command needs: saco[serve] (serve), saco[train] (simulate, train, "
    "calibrate, export, retrain, serve --bootstrap), saco[research] (evaluate, report), saco[spark] "
    "(windows --engine spark)"
)


def _emit(result: dict[str, Any]) -> None:
    from offline.jsonsafe import json_safe

    # valid JSON for every parser: a non-finite number (an estimate with no evidence) is null, never NaN
    print(json.dumps(json_safe(result), default=float, allow_nan=False), flush=True)


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def _errors_as_one_line(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from model_store import ArtifactError

        # a bad log file is a ValueError (offline.logs.LogValidationError); RedisError where redis is installed
        expected: tuple[type[Exception], ...] = (ArtifactError, ValueError, RuntimeError, OSError)
        try:
            from redis import RedisError

            expected += (RedisError,)
        except ModuleNotFoundError:
            pass
        try:
            return fn(*args, **kwargs)
        except typer.Exit:  # an exit status chosen by the command (a RuntimeError to click), its line written
            raise
        except ModuleNotFoundError as exc:  # an optional dependency group not installed (pyproject.toml)
            _fail(f"{exc.name} is not installed: {INSTALL_HINT}")
        except expected as exc:
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    return wrapper  # type: ignore[return-value]


def _progress(desc: str, total: int | None, unit: str = "it") -> Any:
    from offline.progress import progress

    return progress(desc, total, unit)


@app.command()
@_errors_as_one_line
def simulate(
    users: Annotated[int, typer.Option(min=1, help="number of users")] = 10_000,
    rounds: Annotated[int, typer.Option(min=1, help="rounds per user")] = 10,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    out: Annotated[Path, typer.Option(help="output .parquet or .csv")] = Path("logs.parquet"),
    behaviour_bias: Annotated[float, typer.Option(help="0 = uniform random logging; >0 tilts it")] = 0.0,
    effects: Annotated[
        bool, typer.Option("--effects/--no-effects", help="carry-over effects (habit, fatigue, reference)")
    ] = True,
) -> None:
    """Logs of the built-in sequential synthetic world under a random behaviour policy."""
    if out.suffix.lower() not in LOG_SUFFIXES:  # refused before any work, like log_writer would
        raise ValueError(f"unsupported output {out.name!r}: use .parquet or .csv")
    from offline.logs import log_writer
    from research.simulate import blocks, simulate_blocks
    from research.world import WorldConfig

    config = WorldConfig(users=users, rounds=rounds, seed=seed)
    if not effects:
        config = config.myopic()
    rows = 0
    # a block of users at a time, each written as it is simulated: memory is bounded by a block
    with _progress("simulate", rounds * blocks(config), "round") as bar, log_writer(out) as write:
        for table in simulate_blocks(config, behaviour_bias, progress=bar.update):
            write(table)
            rows += table.num_rows
    _emit({"rows": rows, "path": str(out)})


@app.command()
@_errors_as_one_line
def train(
    store: Annotated[Path, typer.Option(help="model store directory")],
    logs: Annotated[
        Path | None, typer.Option(help="logs (.parquet, Parquet directory, or .csv), or a directory of window shards")
    ] = None,
    windows: Annotated[
        Path | None, typer.Option(help="window shards (`saco windows`): stream them instead of loading logs")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="default: TrainConfig's (12)")] = None,
    max_steps: Annotated[
        int | None, typer.Option(min=1, help="a step budget: train exactly this many steps (instead of --epochs)")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    objective: Annotated[str, typer.Option(help="value | dt-lagrangian | dt-literal")] = "value",
    token_layout: Annotated[str, typer.Option(help="step (one token per step) | dt4 (the paper's 4 tokens)")] = "step",
    context_length: Annotated[
        int | None, typer.Option(min=1, help="steps the model sees (default 6; window shards: their length)")
    ] = None,
    d_model: Annotated[int | None, typer.Option(min=8, help="width (default 32)")] = None,
    layers: Annotated[int | None, typer.Option(min=1, help="default 1")] = None,
    heads: Annotated[int | None, typer.Option(min=1, help="default 4")] = None,
    promote: Annotated[
        bool, typer.Option("--promote/--no-promote", help="make the new version current (else only publish it)")
    ] = True,
    delay_method: Annotated[
        str, typer.Option(help="exported logs: delay-model | maturity | naive (outcomes not arrived yet)")
    ] = "delay-model",
    maturity_days: Annotated[float, typer.Option(min=0, help="exported logs: the maturity window")] = 7.0,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="window shards: save the training state here, and resume from it")
    ] = None,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="steps between checkpoints")] = 1000,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="continue from the checkpoint in --checkpoint-dir if any")
    ] = True,
) -> None:
    """Train the SACO model on logs (or the exporter's Parquet partitions, or window shards), export TorchScript
    and publish a new version."""
    from model_store import OBJECTIVES
    from offline.train import TrainConfig
    from offline.windows import MANIFEST

    if objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}")
    if (logs is None) == (windows is None):
        raise ValueError("give the training data: --logs PATH or --windows DIR")
    if logs is not None and (logs / MANIFEST).is_file():
        logs, windows = None, logs  # a directory `saco windows` wrote
    if checkpoint_dir is not None and windows is None:
        raise ValueError("--checkpoint-dir needs --windows: training on logs in memory keeps no checkpoints")
    given: dict[str, Any] = {
        "context_length": context_length,
        "d_model": d_model,
        "n_layers": layers,
        "n_heads": heads,
        "epochs": epochs,
        "max_steps": max_steps,
    }
    if windows is not None and context_length is None:
        from offline.windows import read_manifest

        given["context_length"] = read_manifest(windows)["context_length"]
    cfg = TrainConfig(
        objective=objective,
        token_layout=token_layout,
        seed=seed,
        **{name: value for name, value in given.items() if value is not None},
    )
    if windows is not None:
        checkpoints = _checkpoints(checkpoint_dir, checkpoint_every, resume)
        _train_windows(windows, store, cfg, checkpoints, promote)
    else:
        assert logs is not None
        _train_logs(logs, store, cfg, promote, delay_method, maturity_days)


def _checkpoints(directory: Path | None, every: int, resume: bool) -> Any:
    from offline.train import Checkpoints

    return None if directory is None else Checkpoints(directory, every, resume)


def _distributed_run(fit: Callable[[], Any]) -> tuple[Any, bool]:
    """`fit()` data-parallel when torchrun started this process: its result and whether this process publishes
    (rank 0, or the only process)."""
    from offline.train import init_distributed

    distributed = init_distributed()  # under torchrun: data-parallel, rank 0 publishes
    rank = 0
    try:
        result = fit()
    finally:
        if distributed:
            import torch.distributed

            rank = torch.distributed.get_rank()
            torch.distributed.destroy_process_group()
    return result, rank == 0


def _train_logs(logs: Path, store: Path, cfg: Any, promote: bool, delay_method: str, maturity_days: float) -> None:
    from loop.data import DAY_MS, DelayConfig, is_export_dir, training_logs
    from model_store import ModelStore
    from offline.export import export_and_publish
    from offline.logs import load_logs
    from offline.train import train as fit

    started = time.time()
    if is_export_dir(logs):
        delay = DelayConfig(method=delay_method, maturity_ms=round(maturity_days * DAY_MS))
        data, logged = training_logs(logs, now_ms=int(time.time() * 1000), delay=delay)
        print(f"exported logs: {json.dumps(logged.metrics)}", file=sys.stderr)
    else:
        data = load_logs(logs)
    print(
        f"loaded {data.n_rows} rows, {data.n_users} users, {data.feature_dim} features, {data.num_actions} actions",
        file=sys.stderr,
    )
    result, publishes = _distributed_run(lambda: fit(data, cfg))
    if not publishes:
        return
    artifact = export_and_publish(result, data, ModelStore(store), make_current=promote)
    _emit(_trained(artifact.version, store, cfg, result.metrics, result.seconds, started, promote))


def _train_windows(windows: Path, store: Path, cfg: Any, checkpoints: Any, promote: bool) -> None:
    from model_store import ModelStore
    from offline.export import export_and_publish_stream
    from offline.train import train_windows

    started = time.time()
    result, publishes = _distributed_run(lambda: train_windows(windows, cfg, checkpoints))
    if not publishes:
        return
    artifact = export_and_publish_stream(result, ModelStore(store), make_current=promote)
    summary = _trained(artifact.version, store, cfg, result.metrics, result.seconds, started, promote)
    summary["steps"] = int(result.metrics["steps"])
    summary["resumed_from_step"] = int(result.metrics["resumed_from_step"])
    summary["per_process"] = result.processes
    _emit(summary)


def _trained(
    version: str, store: Path, cfg: Any, metrics: dict[str, float], seconds: float, started: float, promote: bool
) -> dict[str, Any]:
    return {
        "version": version,
        "store": str(store),
        "objective": cfg.objective,
        "val_loss": metrics["val_loss"],
        "epochs_run": int(metrics["epochs_run"])
        if float(metrics["epochs_run"]).is_integer()
        else metrics["epochs_run"],
        "train_seconds": round(seconds, 1),
        "total_seconds": round(time.time() - started, 1),
        "current": promote,
        "processes": int(metrics["world_size"]),
    }


@app.command()
@_errors_as_one_line
def windows(
    logs: Annotated[Path, typer.Option(help="Parquet logs: one file or a directory of files")],
    out: Annotated[Path, typer.Option(help="directory for the shards and manifest.json")],
    shards: Annotated[int, typer.Option(min=1, help="number of user shards")] = 16,
    context_length: Annotated[int | None, typer.Option(min=1, help="steps per window (as saco train)")] = None,
    memory_limit: Annotated[str, typer.Option(help="DuckDB's memory limit; beyond it, it spills to disk")] = "1GB",
    temp_dir: Annotated[Path | None, typer.Option(help="where the engine spills (default: OUT/.spill)")] = None,
    engine: Annotated[
        str, typer.Option(help="duckdb (default: this machine, out of core) | spark (a cluster or local mode)")
    ] = "duckdb",
    spark_master: Annotated[
        str | None, typer.Option(help="--engine spark: the master URL (default: local[*]), e.g. spark://host:7077")
    ] = None,
    spark_conf: Annotated[
        list[str] | None, typer.Option(help="--engine spark: a Spark setting KEY=VALUE (repeat for several)")
    ] = None,
) -> None:
    """User-sharded training windows of logs of any size, built out of core (DuckDB) or on Spark."""
    from offline.train import TrainConfig
    from offline.windows import ENGINES, build_windows

    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine != "spark" and (spark_master is not None or spark_conf):
        raise ValueError("--spark-master and --spark-conf are for --engine spark")
    settings: dict[str, str] = {}
    for item in spark_conf or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--spark-conf takes KEY=VALUE, got {item!r}")
        settings[key.strip()] = value
    length = context_length or TrainConfig().context_length
    manifest = build_windows(
        logs, out, length, shards, memory_limit, temp_dir, engine=engine, spark_master=spark_master, spark_conf=settings
    )
    keys = ("rows", "users", "windows", "shards")
    _emit({**{k: manifest[k] for k in keys}, "path": str(out)})


@app.command("export")
@_errors_as_one_line
def export_logs_command(
    redis_url: Annotated[str, typer.Option(envvar="SACO_REDIS_URL", help="the service's Redis")],
    out: Annotated[Path, typer.Option(help="directory of the Parquet partitions")],
    prefix: Annotated[str, typer.Option(envvar="SACO_REDIS_PREFIX", help="the service's key prefix")] = "saco:",
    batch_size: Annotated[int, typer.Option(min=1, help="entries per Parquet file (at most)")] = 5000,
    consumer: Annotated[str, typer.Option(help="consumer name in the group `export`")] = "exporter",
    every: Annotated[
        float | None, typer.Option(min=0.1, help="keep exporting every so many seconds (one JSON line each)")
    ] = None,
) -> None:
    """Export the campaigns' decision and outcome logs into Parquet partitions (at-least-once, idempotent).
    Entries the logs' bound trimmed before they were exported are counted (`trimmed`) with a warning on
    stderr; a single run that counts any exits with code 3 after its JSON line."""
    from loop.logstream import export_logs, follow

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if every is not None:

        def emit(summary: ExportSummary) -> None:
            _emit(summary.to_json())
            _warn_trimmed(summary)

        follow(redis_url, out, every_s=every, prefix=prefix, consumer=consumer, batch_size=batch_size, emit=emit)
        return
    summary = export_logs(redis_url, out, prefix=prefix, consumer=consumer, batch_size=batch_size, progress=progress)
    _emit(summary.to_json())
    if _warn_trimmed(summary):
        raise SystemExit(EXIT_LOG_ENTRIES_LOST)  # not typer.Exit: a RuntimeError, which would read as a failure


EXIT_LOG_ENTRIES_LOST = 3  # `saco export`: exported, but the logs lost entries since the previous run


def _warn_trimmed(summary: ExportSummary) -> bool:
    """A warning on stderr when the export counted entries lost since the previous run; whether it did."""
    if not summary.trimmed:
        return False
    campaigns = ", ".join(f"{c}: {n}" for c, n in sorted(summary.trimmed_by_campaign.items()))
    print(
        f"warning: {summary.trimmed} log entries were trimmed before they were exported ({campaigns}); "
        'raise SACO_LOG_MAX_ENTRIES or export more often (docs/state.md, "The decision log")',
        file=sys.stderr,
        flush=True,
    )
    return True


RedisUrl = Annotated[
    str | None, typer.Option(envvar="SACO_REDIS_URL", help="the service's Redis: export, campaigns, announce")
]
Prefix = Annotated[str, typer.Option(envvar="SACO_REDIS_PREFIX", help="the service's key prefix")]
AdminUrl = Annotated[
    str | None, typer.Option(envvar="SACO_ADMIN_URL", help="the service, to recalibrate the campaigns' lambda")
]
AdminToken = Annotated[str | None, typer.Option(envvar="SACO_ADMIN_TOKEN", help="its admin token")]
Tolerance = Annotated[float, typer.Option(min=0, help="how much worse (relative) the candidate's bound may be")]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@_errors_as_one_line
def learning_loop(
    ctx: typer.Context,
    logs: Annotated[Path, typer.Option(help="the export directory (Parquet partitions)")],
    store: Annotated[Path, typer.Option(envvar="SACO_STORE", help="model store directory")],
    redis_url: RedisUrl = None,
    prefix: Prefix = "saco:",
    admin_url: AdminUrl = None,
    admin_token: AdminToken = None,
    tolerance: Tolerance = 0.02,
    maturity_days: Annotated[
        float, typer.Option(min=0, help="--delay-method maturity: only decisions older than this train and gate")
    ] = 7.0,
    delay_method: Annotated[
        str, typer.Option(help="outcomes not arrived yet: delay-model (every decision) | maturity | naive")
    ] = "delay-model",
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    environment_check: Annotated[bool, typer.Option(help="gate on the learned environment too")] = True,
    export: Annotated[bool, typer.Option(help="export the logs first (off where `saco export --every` runs)")] = True,
    campaign: Annotated[
        list[str] | None,
        typer.Option(help="train on and recalibrate only this campaign (repeat for several; default: every one)"),
    ] = None,
    warm_start: Annotated[bool, typer.Option(help="start the candidate from the incumbent's weights")] = False,
    by_features: Annotated[
        bool | None,
        typer.Option(
            "--by-features/--by-index",
            help="the candidate scores coupons and bundles by their features, or coupons by index (default: the "
            "incumbent's kind; no incumbent: by index); a run never switches the incumbent's kind",
        ),
    ] = None,
    eval_fraction: Annotated[
        float, typer.Option(min=0, max=0.9, help="users held out of training (a stable hash): evidence for the gate")
    ] = 0.2,
    cross_fit: Annotated[
        bool,
        typer.Option(help="decisions new to the incumbent are evidence too: two candidates, each trained without half"),
    ] = True,
    refit: Annotated[
        bool, typer.Option(help="once the cross-fitted candidates pass, publish one trained on both halves")
    ] = True,
    keep_refused: Annotated[
        int,
        typer.Option(min=0, help="versions never current (refused, failed candidates) to keep; older ones are deleted"),
    ] = 5,
    every: Annotated[float | None, typer.Option(min=1, help="repeat: seconds between runs")] = None,
    cron: Annotated[str | None, typer.Option(help='repeat at a cron expression\'s times, e.g. "0 3 * * *"')] = None,
    runs: Annotated[int | None, typer.Option(min=1, help="with --every / --cron: stop after so many runs")] = None,
) -> None:
    """One run of the learning loop (export, train a candidate, gate, recalibrate, publish); with --every S or
    --cron EXPR, the same on a schedule, for hosts without a scheduler of their own (docs/learning_loop.md).
    One JSON line per run on stdout; a failed run also writes one line on stderr naming its step and reason
    (a single run then exits 1)."""
    from loop.data import DAY_MS, DelayConfig
    from loop.gate import GateConfig
    from loop.retrain import RetrainConfig, retrain_once, run_scheduler
    from offline.train import TrainConfig

    cfg = RetrainConfig(
        logs=logs,
        store=store,
        redis_url=redis_url,
        prefix=prefix,
        admin_url=admin_url,
        admin_token=admin_token,
        delay=DelayConfig(method=delay_method, maturity_ms=round(maturity_days * DAY_MS)),
        gate=GateConfig(tolerance=tolerance),
        train=TrainConfig() if epochs is None else TrainConfig(epochs=epochs),
        environment_check=environment_check,
        export=export,
        campaigns=campaign or None,
        warm_start=warm_start,
        by_features=by_features,
        eval_fraction=eval_fraction,
        cross_fit=cross_fit,
        refit=refit,
        keep_refused=keep_refused,
    )

    def emit(report: dict[str, Any]) -> None:
        _emit(report)
        if report["decision"] == "failed":
            print(f"error: {ctx.info_name}: {report['reasons'][-1]}", file=sys.stderr, flush=True)

    if ctx.info_name == "scheduler" or every is not None or cron is not None:
        run_scheduler(cfg, every_s=every, cron=cron, runs=runs, emit=emit, log=_say)
        return
    if runs is not None:
        raise ValueError("--runs counts the runs of a schedule: give --every or --cron with it")
    report = retrain_once(cfg, log=_say)
    emit(report)
    if report["decision"] == "failed":
        raise typer.Exit(1)


app.command("retrain")(learning_loop)
# the name older deployments call; the same command (hidden from the help: one way to say it)
app.command("scheduler", hidden=True)(learning_loop)


@app.command()
@_errors_as_one_line
def calibrate(
    store: Annotated[Path, typer.Option(help="model store directory")],
    budget: Annotated[float, typer.Option(help="total budget B over the simulated users")],
    logs: Annotated[Path | None, typer.Option(help="logs the offline environment is learned from")] = None,
    users: Annotated[int | None, typer.Option(min=1, help="users to simulate (default: the logs' users)")] = None,
    version: Annotated[str | None, typer.Option(help="model version (default: current)")] = None,
    method: Annotated[str, typer.Option(help="monotone (default) | slsqp (the paper's Algorithm 2)")] = "monotone",
    reservation: Annotated[
        str,
        typer.Option(
            help="none (default): the lambda whose spend matches B, for a service that paces or reserves "
            "expected costs | strict: the lambda that earns most through the strict ledger, simulated"
        ),
    ] = "none",
    request_size: Annotated[int, typer.Option(min=1, help="users per decision request (strict ledger)")] = 128,
    seed: Annotated[int, typer.Option(help="seed of every random draw: same inputs and seed, same lambda")] = 0,
    redis_url: Annotated[
        str | None,
        typer.Option(envvar="SACO_REDIS_URL", help="announce the calibration to the replicas on this Redis"),
    ] = None,
    prefix: Prefix = "saco:",
    windows: Annotated[
        Path | None,
        typer.Option(help="instead of --logs: the window shards of `saco windows`, read as a map over shards"),
    ] = None,
    sample: Annotated[
        int | None,
        typer.Option(min=1, help="--windows: users simulated for the --users the budget is for (default: all)"),
    ] = None,
    fit_rows: Annotated[
        int | None,
        typer.Option(min=1, help="--windows: rows of the seeded sample the response model is fitted on (100,000)"),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="--windows: processes the shards are mapped over")] = 1,
) -> None:
    """Find lambda so that the policy spends close to, and not above, budget B; record it as the version's
    active calibration (the version's files stay as they are). With a Redis URL, replicas serving the
    version are told to load it. With --windows instead of --logs, the environment and the users come
    from window shards, each step a map over shards (the same lambda whatever --workers)."""
    started = time.time()

    def say(message: str) -> None:
        print(f"[{time.time() - started:5.1f}s] {message}", file=sys.stderr, flush=True)

    from model_store import ModelStore
    from offline.calibrate import FIT_ROWS, calibrate_artifact, calibrate_shards
    from offline.logs import load_logs

    if method not in ("monotone", "slsqp"):
        raise ValueError("--method must be monotone or slsqp")
    if budget <= 0:
        raise ValueError("--budget must be > 0")
    if (logs is None) == (windows is None):
        raise ValueError("give the logs (--logs PATH) or their window shards (--windows DIR), one of the two")
    if windows is None and (sample is not None or workers != 1 or fit_rows is not None):
        raise ValueError("--sample, --fit-rows and --workers are for --windows")
    if windows is not None and reservation != "none":
        raise ValueError(
            "--reservation strict simulates one ledger over every user in one process: calibrate from --logs"
        )
    # progress starts once the inputs are valid: an error stays the only line on stderr
    model_store = ModelStore(store)
    artifact = model_store.load(version)  # a missing or corrupt model fails before the logs are read
    passes = 0

    def tick(phase: str, ev: Any) -> None:
        nonlocal passes
        passes += 1
        say(
            f"pass {passes} ({phase}): lambda {ev.lam:.5g} -> spend {ev.cost:,.2f} "
            f"(BARate {ev.cost / budget:.4f}), revenue {ev.revenue:,.2f}"
        )

    common: dict[str, Any] = {
        "version": version,
        "users": users,
        "method": method,
        "seed": seed,
        "progress": tick,
        "log": say,
        "command": shlex.join(["saco", *sys.argv[1:]]),
    }
    if windows is not None:
        sharded: dict[str, Any] = {"sample": sample, "fit_rows": fit_rows or FIT_ROWS, "workers": workers}
        result = calibrate_shards(model_store, windows, budget, **common, **sharded)
    else:
        assert logs is not None  # one of the two is given
        data = load_logs(logs)
        say(
            f"loaded model {artifact.version} and the logs: {data.n_rows} rows, {data.n_users} users, "
            f"{data.num_actions} actions"
        )
        ledger: dict[str, Any] = {"reservation": reservation, "request_size": request_size}
        result = calibrate_artifact(model_store, data, budget, **common, **ledger)
    _calibrated(result, budget, redis_url, prefix, model_store, say)


def _calibrated(
    result: dict[str, Any], budget: float, redis_url: str | None, prefix: str, store: Any, say: Callable[[str], None]
) -> None:
    """`saco calibrate`'s last lines: the lambda found, the announcement (with a Redis URL), the JSON line."""
    spread = ""
    if result.get("spend_standard_error"):
        spread = f" (standard error {result['spend_standard_error']:,.2f} from {result['sample_users']} users)"
    say(
        f"lambda {result['lambda']:.6g}, predicted spend {result['cost']:,.2f}{spread} of {budget:,.2f}: "
        f"calibration {result['calibration']} of {result['version']}"
    )
    if redis_url is not None:
        result["announced_to"] = _announce_calibration(redis_url, prefix, store, result["version"], say)
    _emit(result)


def _announce_calibration(
    redis_url: str, prefix: str, store: Any, version: str, say: Callable[[str], None]
) -> int | None:
    """Announce `version` when it is the store's current one (replicas serving it load its new calibration);
    how many replicas heard it. The calibration stands either way: a failed announcement is a warning (an
    admin reload, `POST /v1/admin/models/reload`, loads it too)."""
    from redis import RedisError

    from model_store.notify import announce

    if store.current_version() != version:
        say(f"{version} is not the current version: nothing announced")
        return None
    try:
        return announce(redis_url, prefix, version)
    except RedisError as exc:
        print(f"warning: the calibration was not announced: {exc}", file=sys.stderr, flush=True)
        return None


@app.command()
@_errors_as_one_line
def evaluate(
    out: Annotated[Path, typer.Option(help="directory for results.md and the PNG figures")] = Path("docs/evaluation"),
    users: Annotated[int, typer.Option(min=10, help="users in the training logs")] = 10_000,
    rounds: Annotated[int, typer.Option(min=1)] = 10,
    eval_users: Annotated[int, typer.Option(min=10, help="users in the evaluation population")] = 5_000,
    epochs: Annotated[int, typer.Option(min=1)] = 12,
    seed: Annotated[int, typer.Option()] = 0,
    objective: Annotated[str, typer.Option(help="value | dt-lagrangian | dt-literal")] = "value",
) -> None:
    """SACO vs random, two-stage and the myopic oracle at 9 budgets, carry-over effects on and off."""
    from offline.train import TrainConfig
    from research.evaluate import EvalConfig, run_evaluation

    cfg = EvalConfig(
        users=users,
        rounds=rounds,
        eval_users=eval_users,
        seed=seed,
        train=TrainConfig(epochs=epochs, seed=seed, objective=objective),
    )
    _emit(run_evaluation(cfg, out))


@app.command()
@_errors_as_one_line
def serve(
    store: Annotated[Path, typer.Option(envvar="SACO_STORE", help="model store directory")] = Path("var/store"),
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    redis_url: Annotated[str | None, typer.Option(envvar="SACO_REDIS_URL", help="state store; none = embedded")] = None,
    bootstrap: Annotated[bool, typer.Option(help="train a demo model if the store is empty")] = False,
) -> None:
    """Run the HTTP decision service."""
    from model_store import ModelStore

    if ModelStore(store).current_version() is None:
        if not bootstrap:
            raise ValueError(f"model store {store} has no current version: run `saco train` or pass --bootstrap")
        _bootstrap(store)
    from service.server import run

    run(str(store), host, port, redis_url)


def _bootstrap(store: Path) -> None:
    """Simulate a small world, train and publish: a demo model so the service can start on a fresh machine."""
    from model_store import ModelStore
    from offline.calibrate import calibrate_artifact
    from offline.export import export_and_publish
    from offline.logs import validate_table
    from offline.train import TrainConfig
    from offline.train import train as fit
    from research.simulate import simulate_logs
    from research.world import WorldConfig

    print(
        "store is empty: training a bootstrap model on a synthetic world (2,000 users x 10 rounds)...",
        file=sys.stderr,
        flush=True,
    )
    data = validate_table(simulate_logs(WorldConfig(users=2000, rounds=10, seed=0)))
    result = fit(data, TrainConfig(epochs=10))
    artifact = export_and_publish(result, data, ModelStore(store))
    # a default lambda: the one that spends 30% of what the random logging policy spent
    cal = calibrate_artifact(
        ModelStore(store),
        data,
        0.3 * float(data.cost.sum()),
        version=artifact.version,
        command="saco serve --bootstrap",
    )
    print(
        f"bootstrap model {artifact.version} published in {store} (default lambda {cal['lambda']:.3g})",
        file=sys.stderr,
        flush=True,
    )


@models_app.command("list")
@_errors_as_one_line
def models_list(store: Annotated[Path, typer.Option()]) -> None:
    """Versions in the store, oldest first, and which one is current."""
    from model_store import ModelStore

    s = ModelStore(store)
    _emit({"current": s.current_version(), "versions": s.list_versions()})


@models_app.command("promote")
@_errors_as_one_line
def models_promote(store: Annotated[Path, typer.Option()], version: Annotated[str, typer.Argument()]) -> None:
    """Make VERSION current (after verifying its checksum)."""
    from model_store import ModelStore

    ModelStore(store).promote(version)
    _emit({"current": version})


@models_app.command("rollback")
@_errors_as_one_line
def models_rollback(store: Annotated[Path, typer.Option()]) -> None:
    """Make the previously current version current again."""
    from model_store import ModelStore

    _emit({"current": ModelStore(store).rollback()})


@app.command()
@_errors_as_one_line
def report(
    out: Annotated[Path, typer.Option(help="directory for results.md, results.json, PNGs")] = Path("docs"),
    quick: Annotated[bool, typer.Option("--quick", help="tiny worlds, 1 seed, 1 epoch (CI, < 5 min)")] = False,
    hillstrom: Annotated[
        Path | None, typer.Option(envvar="SACO_HILLSTROM", help="hillstrom.csv (default: <repo>/../shared/data/)")
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="number of seeds (full run)")] = 3,
    ablations: Annotated[
        bool, typer.Option("--ablations/--no-ablations", help="train and score the SACO ablations")
    ] = True,
) -> None:
    """SACO vs every baseline at 9 budgets on sequential, single-round and real (Hillstrom) data + ablations."""
    from research.report import ReportConfig, run_report

    cfg = (
        ReportConfig.quick_config(hillstrom)
        if quick
        else ReportConfig(hillstrom_path=hillstrom, seeds=tuple(range(seeds)))
    )
    cfg.ablations = ablations
    _emit(run_report(cfg, out))


def main() -> None:  # pragma: no cover
    app()
