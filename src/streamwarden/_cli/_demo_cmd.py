"""``streamwarden demo``: the demo workload on the embedded stores, through Redis with ``--redis-url``, or
through a Kafka topic with ``--kafka-bootstrap`` (aiokafka is imported on that path only)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .._demo import (
    DEMO_GROUP,
    DEMO_KAFKA_SERVICE,
    DEMO_SERVICE,
    DEMO_STREAM,
    DEMO_TOPIC,
    ControlServer,
    DemoConfig,
    DemoReport,
    install_stop_signals,
    run_demo,
    run_kafka_demo,
    run_redis_demo,
)
from .._types import Outcome
from ._common import (
    PORT,
    CliError,
    GuardedCommand,
    KafkaConnection,
    RedisTarget,
    finite_float,
    kafka_connection_options,
    listening,
    log_level_option,
    make_console,
    non_empty,
    redis_options,
    start_telemetry,
    telemetry_options,
)

__all__ = ["demo"]

_REDIS_URL_HELP = (
    "Run through Redis instead: a stream, consumer runners, the Redis dedup store and DLQ. The demo first "
    f"DELETES its own keys there (the stream {DEMO_STREAM} and its group {DEMO_GROUP}, the dead letters of "
    f"destination {DEMO_STREAM}, the dedup records of that stream and group, the fleet counters of service "
    f"{DEMO_SERVICE}) and touches no other key. Not read from STREAMWARDEN_REDIS_URL."
)


_KAFKA_HELP = (
    "Run through a Kafka topic instead (needs streamwarden[kafka]): host:port[,host:port...]. The demo "
    "creates the topic when missing, moves the offsets of its group "
    f"{DEMO_GROUP} to the topic's end, and runs --consumers consumer runners (with --redis-url, which then "
    "holds the dedup records, dead letters and counters of that topic, deleted first) or one runner on "
    "the embedded stores with dead letters in the topic {topic}.dlq (purged first)."
)


def _given(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source is not click.core.ParameterSource.DEFAULT


def _check_combinations(ctx: click.Context, live: bool, redis: bool, kafka: bool = False) -> None:
    """Options that would be silently ignored in this mode are usage errors."""
    if _given(ctx, "topic") and not kafka:
        raise click.UsageError("--topic only applies with --kafka-bootstrap", ctx=ctx)
    only_live = ("outage_every", "outage_duration")
    only_embedded = ("live", "control_port", "control_host")
    only_redis = ("consumers",)
    for name in only_live:
        if _given(ctx, name) and not live:
            raise click.UsageError(f"--{name.replace('_', '-')} only applies with --live", ctx=ctx)
    if _given(ctx, "messages") and live:
        raise click.UsageError("--messages does not apply with --live (use --max-seconds)", ctx=ctx)
    for name in only_embedded:
        if _given(ctx, name) and (redis or kafka):
            given = "--kafka-bootstrap" if kafka else "--redis-url"
            raise click.UsageError(
                f"--{name.replace('_', '-')} runs on the embedded stores only, not with {given}", ctx=ctx
            )
    for name in only_redis:
        if _given(ctx, name) and not redis:
            raise click.UsageError(f"--{name.replace('_', '-')} only applies with --redis-url", ctx=ctx)


@click.command(cls=GuardedCommand)
@click.option(
    "--messages",
    default=4000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Signals to produce (not with --live).",
)
@click.option(
    "--rate",
    default=800.0,
    show_default=True,
    type=finite_float(minimum=0, open_min=True),
    help="Signals per second the producer emits.",
)
@click.option(
    "--concurrency", default=16, show_default=True, type=click.IntRange(1, 10_000), help="Concurrent workers."
)
@click.option(
    "--seed",
    "--workload",
    "workload",
    default=1,
    show_default=True,
    help="Random seed of the workload: the same number gives the same signals, duplicates and faults.",
)
@click.option("--live", is_flag=True, help="Run an endless stream until SIGTERM/SIGINT or --max-seconds.")
@click.option(
    "--max-seconds",
    type=finite_float(minimum=0, open_min=True),
    default=None,
    help="Stop producing after this many seconds.",
)
@click.option(
    "--outage-every",
    type=finite_float(minimum=0, open_min=True),
    default=None,
    help="--live: start an outage every N seconds.",
)
@click.option(
    "--outage-duration",
    type=finite_float(minimum=0, open_min=True),
    default=20.0,
    show_default=True,
    help="--live: outage length, s.",
)
@telemetry_options
@click.option(
    "--control-port", type=PORT, default=None, help="POST/DELETE /outage, GET /status (live counts)."
)
@click.option(
    "--control-host",
    default="127.0.0.1",
    show_default=True,
    callback=non_empty,
    help="Address of the control endpoint (0.0.0.0 in a container).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON.")
@redis_options(default_url=None, url_envvar=False, url_help=_REDIS_URL_HELP)
@click.option(
    "--consumers",
    default=3,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Consumer runners (with --redis-url).",
)
@click.option("--kafka-bootstrap", default=None, callback=non_empty, help=_KAFKA_HELP)
@click.option(
    "--topic",
    default=DEMO_TOPIC,
    show_default=True,
    callback=non_empty,
    help="The Kafka demo's topic (with --kafka-bootstrap).",
)
@kafka_connection_options
@log_level_option("WARNING")
@click.pass_context
def demo(
    ctx: click.Context,
    messages: int,
    rate: float,
    concurrency: int,
    workload: int,
    live: bool,
    max_seconds: float | None,
    outage_every: float | None,
    outage_duration: float,
    prometheus_port: int | None,
    prometheus_host: str,
    control_port: int | None,
    control_host: str,
    otlp_endpoint: str | None,
    as_json: bool,
    redis_target: RedisTarget | None,
    consumers: int,
    kafka_bootstrap: str | None,
    topic: str,
    kafka_connection: KafkaConnection,
) -> None:
    """Push a trading-signal stream with duplicates, faults, an outage and poison through the layer.

    Runs on the embedded in-memory stores (no Redis) unless --redis-url or --kafka-bootstrap is given.
    Exits 1 if the numbers do not reconcile.
    """
    _check_combinations(ctx, live, redis_target is not None, kafka_bootstrap is not None)
    config = DemoConfig(
        messages=messages,
        rate=rate,
        concurrency=concurrency,
        workload=workload,
        live=live,
        max_seconds=max_seconds,
        outage_every=outage_every,
        outage_duration=outage_duration,
    )
    if kafka_bootstrap is not None:
        config.service_name = DEMO_KAFKA_SERVICE
        config.destination = topic
    start_telemetry(
        config.service_name,
        otlp_endpoint=otlp_endpoint,
        prometheus_port=prometheus_port,
        prometheus_host=prometheus_host,
    )
    console = make_console(stderr=as_json)
    if kafka_bootstrap is not None:
        report = asyncio.run(
            _run_kafka(
                config,
                console,
                kafka_bootstrap,
                topic,
                redis_target,
                consumers,
                kafka_connection,
                quiet=as_json,
            )
        )
    elif redis_target is not None:
        report = asyncio.run(_run_redis(config, console, redis_target, consumers, quiet=as_json))
    else:
        control = (control_host, control_port) if control_port is not None else None
        report = asyncio.run(_run(config, console, control, quiet=as_json))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print_report(console, report, live)
    if not live and not report.reconciled:
        sys.exit(1)


def _progress(console: Console, quiet: bool, *columns: Any) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *columns,
        TimeElapsedColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
    )


async def _run(
    config: DemoConfig, console: Console, control_at: tuple[str, int] | None, *, quiet: bool
) -> DemoReport:
    stop = asyncio.Event()
    install_stop_signals(stop)
    control: ControlServer | None = None
    if control_at is not None:
        host, port = control_at
        control = ControlServer(port, asyncio.get_running_loop(), host=host)
        with listening("--control-port", host, port):
            control.start()
    progress = _progress(console, quiet, TextColumn("{task.fields[stats]}"))
    task = progress.add_task("signals", total=None if config.live else config.messages, stats="")

    def on_progress(report: DemoReport, backlog: int) -> None:
        done = report.outcomes.get(Outcome.PROCESSED, 0) + report.outcomes.get(Outcome.DEAD_LETTERED, 0)
        stats = (
            f"dup {report.outcomes.get('duplicate', 0)}  dlq {report.outcomes.get('dead_lettered', 0)}  "
            f"deferred {report.outcomes.get('deferred', 0)}  backlog {backlog}"
        )
        progress.update(task, completed=min(done, report.unique_ids), stats=stats)

    try:
        with progress:
            return await run_demo(
                config,
                on_progress=on_progress,
                stop=stop,
                control=control.attach if control is not None else None,
            )
    finally:
        if control is not None:
            control.stop()


async def _run_redis(
    config: DemoConfig, console: Console, target: RedisTarget, consumers: int, *, quiet: bool
) -> DemoReport:
    stop = asyncio.Event()
    install_stop_signals(stop)
    progress = _progress(console, quiet)
    task = progress.add_task("produced", total=config.messages)
    client = target.client()
    try:
        await client.ping()  # an unreachable Redis or a refused password fails here, in one line
        with progress:
            report = await run_redis_demo(
                config,
                client,
                consumers=consumers,
                key_prefix=target.key_prefix,
                stop=stop,
                on_progress=lambda r, _backlog: progress.update(task, completed=r.produced),
            )
            progress.update(task, completed=report.produced)
    finally:
        await client.aclose()
    return report


async def _run_kafka(
    config: DemoConfig,
    console: Console,
    bootstrap: str,
    topic: str,
    target: RedisTarget | None,
    consumers: int,
    connection: KafkaConnection,
    *,
    quiet: bool,
) -> DemoReport:
    try:
        import aiokafka  # noqa: F401  (a one-line error when the optional dependency is missing)
    except ImportError as exc:
        raise CliError("the Kafka demo needs aiokafka: pip install 'streamwarden[kafka]'") from exc
    stop = asyncio.Event()
    install_stop_signals(stop)
    progress = _progress(console, quiet)
    task = progress.add_task("produced", total=config.messages)
    client = target.client() if target is not None else None
    try:
        if client is not None:
            await client.ping()  # an unreachable Redis or a refused password fails here, in one line
        with progress:
            report = await run_kafka_demo(
                config,
                bootstrap,
                topic=topic,
                client=client,
                consumers=consumers,
                key_prefix=target.key_prefix if target is not None else "streamwarden",
                client_options=connection.client_options(),
                stop=stop,
                on_progress=lambda r, _backlog: progress.update(task, completed=r.produced),
            )
            progress.update(task, completed=report.produced)
    finally:
        if client is not None:
            await client.aclose()
    return report


def _print_report(console: Console, report: DemoReport, live: bool) -> None:
    table = Table(title="streamwarden demo", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("count", justify="right")
    rows: list[tuple[str, Any]] = [
        ("messages produced", report.produced),
        ("  unique signals", report.unique_ids),
        ("  re-sent (duplicates injected)", report.resent),
        ("processed (executed once)", report.outcomes.get(Outcome.PROCESSED, 0)),
        ("duplicates skipped", report.outcomes.get(Outcome.DUPLICATE, 0)),
        ("retries", report.retries),
        ("dead-lettered", report.outcomes.get(Outcome.DEAD_LETTERED, 0)),
    ]
    rows += [(f"  reason {reason}", count) for reason, count in sorted(report.dlq_reasons.items())]
    rows += [
        ("deferred (breaker open, redelivered)", report.outcomes.get(Outcome.DEFERRED, 0)),
        ("in progress elsewhere (redelivered)", report.outcomes.get(Outcome.IN_PROGRESS, 0)),
        ("breaker transitions", " ".join(f"{a}->{b}" for a, b in report.transitions) or "none"),
        ("success rate", f"{report.metrics.get('success_rate', 0.0):.2%}"),
        ("elapsed", f"{report.elapsed:.1f}s"),
    ]
    for label, value in rows:
        table.add_row(label, str(value))
    console.print(table)
    if live:
        return
    if report.reconciled:
        console.print(
            "[green]Reconciled:[/green] every signal was executed exactly once or sits in the dead-letter "
            "queue; every re-send was answered without running the handler twice."
        )
    else:
        console.print("[red]NOT reconciled:[/red]")
        for problem in report.problems:
            console.print(f"  - {problem}")
