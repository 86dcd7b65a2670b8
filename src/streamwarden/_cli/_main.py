"""The ``streamwarden`` command line: ``demo`` here; operator commands register themselves.

Output uses rich: progress bars on long work, tables for results. Colour follows the terminal:
none when output is not a TTY, or when ``NO_COLOR`` is set.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .._demo import ControlServer, DemoConfig, DemoReport, install_stop_signals, run_demo
from ._ops import register as _register_ops

__all__ = ["main"]


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, no_color=bool(os.environ.get("NO_COLOR")), highlight=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="streamwarden")
def main() -> None:
    """streamwarden: reliable, observable event-stream consumers."""


_register_ops(main)  # dlq list|show|count|replay|purge, metrics, breakers


@main.command()
@click.option("--messages", default=4000, show_default=True, help="Signals to produce (not with --live).")
@click.option("--rate", default=800.0, show_default=True, help="Signals per second the producer emits.")
@click.option("--concurrency", default=16, show_default=True, help="Concurrent workers.")
@click.option("--seed", default=1, show_default=True, help="Random seed of the workload.")
@click.option("--live", is_flag=True, help="Run an endless stream until SIGTERM/SIGINT or --max-seconds.")
@click.option("--max-seconds", type=float, default=None, help="Stop producing after this many seconds.")
@click.option("--outage-every", type=float, default=None, help="--live: start an outage every N seconds.")
@click.option(
    "--outage-duration", type=float, default=20.0, show_default=True, help="--live: outage length, s."
)
@click.option("--prometheus-port", type=int, default=None, help="Serve /metrics on 127.0.0.1:PORT.")
@click.option("--prometheus-host", default="127.0.0.1", show_default=True, help="Address for /metrics.")
@click.option("--control-port", type=int, default=None, help="POST/DELETE /outage, GET /status.")
@click.option(
    "--control-host",
    default="127.0.0.1",
    show_default=True,
    help="Address of the control endpoint (0.0.0.0 in a container).",
)
@click.option("--otlp-endpoint", default=None, help="Export traces and metrics over OTLP (gRPC).")
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON.")
@click.option(
    "--redis-url",
    default=None,
    help="Run through Redis instead: a stream, 3 consumer runners, the Redis dedup store and DLQ.",
)
@click.option("--consumers", default=3, show_default=True, help="Consumer runners (with --redis-url).")
def demo(
    messages: int,
    rate: float,
    concurrency: int,
    seed: int,
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
    redis_url: str | None,
    consumers: int,
) -> None:
    """Push a trading-signal stream with duplicates, faults, an outage and poison through the layer.

    Runs on the embedded in-memory stores (no Redis). Exits 1 if the numbers do not reconcile.
    """
    if messages < 1 or rate <= 0 or concurrency < 1:
        raise click.BadParameter("--messages, --rate and --concurrency must be positive")
    config = DemoConfig(
        messages=messages,
        rate=rate,
        concurrency=concurrency,
        seed=seed,
        live=live,
        max_seconds=max_seconds,
        outage_every=outage_every,
        outage_duration=outage_duration,
    )
    if prometheus_port is not None or otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from .._telemetry import configure_telemetry

        configure_telemetry(
            config.service_name,
            otlp_endpoint=otlp_endpoint,
            prometheus_port=prometheus_port,
            prometheus_host=prometheus_host,
        )
    console = _console(stderr=as_json)
    if redis_url is not None:
        if live:
            raise click.BadParameter("--live runs on the embedded stores only", param_hint="--redis-url")
        report = asyncio.run(_run_redis(config, console, redis_url, consumers, quiet=as_json))
    else:
        report = asyncio.run(_run(config, console, control_port, quiet=as_json, control_host=control_host))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print_report(console, report, live)
    if not live and not report.reconciled:
        sys.exit(1)


async def _run(
    config: DemoConfig,
    console: Console,
    control_port: int | None,
    *,
    quiet: bool,
    control_host: str = "127.0.0.1",
) -> DemoReport:
    stop = asyncio.Event()
    install_stop_signals(stop)
    control: ControlServer | None = None
    if control_port is not None:
        control = ControlServer(control_port, asyncio.get_running_loop(), host=control_host)
        control.start()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=quiet or not console.is_terminal,
    )
    total = None if config.live else config.messages
    task = progress.add_task("signals", total=total, stats="")

    def on_progress(report: DemoReport, backlog: int) -> None:
        done = report.outcomes.get("processed", 0) + report.outcomes.get("dead_lettered", 0)
        stats = (
            f"dup {report.outcomes.get('duplicate', 0)}  dlq {report.outcomes.get('dead_lettered', 0)}  "
            f"deferred {report.outcomes.get('deferred', 0)}  backlog {backlog}"
        )
        progress.update(task, completed=min(done, report.unique_ids), stats=stats)

    try:
        with progress:
            report = await run_demo(
                config,
                on_progress=on_progress,
                stop=stop,
                control=control.attach if control is not None else None,
            )
    finally:
        if control is not None:
            control.stop()
    return report


async def _run_redis(
    config: DemoConfig, console: Console, redis_url: str, consumers: int, *, quiet: bool
) -> DemoReport:
    from .._demo import run_redis_demo

    stop = asyncio.Event()
    install_stop_signals(stop)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
    )
    task = progress.add_task("produced", total=config.messages)
    with progress:
        report = await run_redis_demo(
            config,
            redis_url,
            consumers=consumers,
            stop=stop,
            on_progress=lambda r, _backlog: progress.update(task, completed=r.produced),
        )
        progress.update(task, completed=report.produced)
    return report


def _print_report(console: Console, report: DemoReport, live: bool) -> None:
    table = Table(title="streamwarden demo", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("count", justify="right")
    rows: list[tuple[str, Any]] = [
        ("messages produced", report.produced),
        ("  unique signals", report.unique_ids),
        ("  re-sent (duplicates injected)", report.resent),
        ("processed (executed once)", report.outcomes.get("processed", 0)),
        ("duplicates skipped", report.outcomes.get("duplicate", 0)),
        ("retries", report.retries),
        ("dead-lettered", report.outcomes.get("dead_lettered", 0)),
    ]
    rows += [(f"  reason {reason}", count) for reason, count in sorted(report.dlq_reasons.items())]
    rows += [
        ("deferred (breaker open, redelivered)", report.outcomes.get("deferred", 0)),
        ("in progress elsewhere (redelivered)", report.outcomes.get("in_progress", 0)),
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


def load_handler(spec: str) -> Any:
    """Import ``module:function`` (the current directory is importable) and return the function."""
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise click.BadParameter(f"expected module:function, got {spec!r}", param_hint="--handler")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name!r}: {exc}", param_hint="--handler") from exc
    handler = getattr(module, attr, None)
    if handler is None or not callable(handler):
        raise click.BadParameter(f"{module_name!r} has no callable {attr!r}", param_hint="--handler")
    return handler


@main.command()
@click.option(
    "--redis-url", envvar="STREAMWARDEN_REDIS_URL", required=True, help="redis:// or rediss:// URL."
)
@click.option("--stream", required=True, help="Stream to consume.")
@click.option("--group", required=True, help="Consumer group (created if missing).")
@click.option("--consumer", default=None, help="Consumer name (default: host-pid).")
@click.option("--handler", "handler_spec", required=True, help="The message handler, as module:function.")
@click.option("--concurrency", default=16, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--claim-idle-ms", default=60_000, show_default=True, help="Take over entries idle this long.")
@click.option("--claim-every", default=5.0, show_default=True, help="Seconds between takeover scans.")
@click.option("--block-ms", default=1000, show_default=True, help="XREADGROUP block time.")
@click.option("--ordered-by-key", is_flag=True, help="Handle messages with the same key in order.")
@click.option("--shutdown-timeout", default=30.0, show_default=True, help="Seconds to finish in-flight work.")
@click.option("--health-port", type=int, default=None, help="Serve /healthz and /readyz on 127.0.0.1:PORT.")
@click.option("--prometheus-port", type=int, default=None, help="Serve /metrics on 127.0.0.1:PORT.")
@click.option("--otlp-endpoint", default=None, help="Export traces and metrics over OTLP (gRPC).")
@click.option(
    "--flush-every",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds between flushes of the counters to the Redis hash (default: "
    "STREAMWARDEN_METRICS_FLUSH_INTERVAL, 5).",
)
def consume(
    redis_url: str,
    stream: str,
    group: str,
    consumer: str | None,
    handler_spec: str,
    concurrency: int,
    batch_size: int,
    claim_idle_ms: int,
    claim_every: float,
    block_ms: int,
    ordered_by_key: bool,
    shutdown_timeout: float,
    health_port: int | None,
    prometheus_port: int | None,
    otlp_endpoint: str | None,
    flush_every: float | None,
) -> None:
    """Run a handler on a Redis Streams consumer group through the reliability layer.

    Settings come from STREAMWARDEN_* variables (e.g. STREAMWARDEN_EXHAUSTED_TRANSIENT_ACTION=defer).
    Stops gracefully on SIGTERM/SIGINT.
    """
    import socket

    from .._settings import ReliabilitySettings

    handler = load_handler(handler_spec)
    # the runner flushes the counters every metrics_flush_interval (and once more when it stops)
    settings = (
        ReliabilitySettings()
        if flush_every is None
        else ReliabilitySettings(metrics_flush_interval=flush_every)
    )
    if prometheus_port is not None or otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from .._telemetry import configure_telemetry

        configure_telemetry(
            settings.service_name, otlp_endpoint=otlp_endpoint, prometheus_port=prometheus_port
        )
    name = consumer or f"{socket.gethostname()}-{os.getpid()}"
    asyncio.run(
        _consume(
            redis_url,
            settings,
            handler,
            dict(
                stream=stream,
                group=group,
                consumer=name,
                concurrency=concurrency,
                batch_size=batch_size,
                claim_idle_ms=claim_idle_ms,
                claim_every_s=claim_every,
                block_ms=block_ms,
                ordered_by_key=ordered_by_key,
                shutdown_timeout=shutdown_timeout,
            ),
            health_port,
        )
    )


async def _consume(
    redis_url: str,
    settings: Any,
    handler: Any,
    options: dict[str, Any],
    health_port: int | None,
) -> None:
    import redis.asyncio

    from .._layer import ReliabilityLayer
    from .._runners._redis_streams import HealthServer, RedisStreamConsumer

    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        layer = ReliabilityLayer(client, settings)
        for warning in await layer.verify_stores():
            _console(stderr=True).print(f"[yellow]warning:[/yellow] {warning}")
        runner = RedisStreamConsumer(client, handler=handler, layer=layer, **options)
        health: HealthServer | None = None
        if health_port is not None:
            health = HealthServer(runner, port=health_port)
            await health.start()
        console = _console(stderr=True)
        console.print(
            f"consuming [bold]{options['stream']}[/bold] as {options['consumer']} in group {options['group']}"
        )
        try:
            await runner.run_until_signal()
        finally:
            if health is not None:
                await health.close()
            await layer.aclose(timeout=1.0)  # the runner already flushed; bounded if Redis is frozen
        stats = runner.stats
        console.print(
            f"stopped: read {stats.read}, reclaimed {stats.reclaimed}, acked {stats.acked}, "
            f"not acked {stats.not_acked}, lost {stats.lost}, outcomes {stats.outcomes}"
        )
    finally:
        await client.aclose()
