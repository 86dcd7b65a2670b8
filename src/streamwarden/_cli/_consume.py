"""``streamwarden consume``: a handler on a Redis Streams consumer group, through the reliability layer."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import click
from rich.markup import escape

from ._common import (
    PORT,
    GuardedCommand,
    RedisTarget,
    finite_float,
    listening,
    load_handler,
    log_level_option,
    make_console,
    non_empty,
    printable,
    redis_options,
    start_telemetry,
    telemetry_options,
)

__all__ = ["consume"]


@dataclass(frozen=True)
class _RunnerOptions:
    """The ``RedisStreamConsumer`` arguments of one ``consume`` invocation."""

    stream: str
    group: str
    consumer: str
    concurrency: int
    batch_size: int
    claim_idle_ms: int
    claim_every_s: float
    block_ms: int
    ordered_by_key: bool
    shutdown_timeout: float

    def kwargs(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@click.command(cls=GuardedCommand)
@redis_options()
@click.option("--stream", required=True, callback=non_empty, help="Stream to consume.")
@click.option("--group", required=True, callback=non_empty, help="Consumer group (created if missing).")
@click.option("--consumer", default=None, callback=non_empty, help="Consumer name (default: host-pid).")
@click.option(
    "--handler",
    "handler_spec",
    required=True,
    help="The message handler, an async def, as module:function or module:Class.method.",
)
@click.option(
    "--concurrency",
    default=16,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="Messages in flight at once.",
)
@click.option(
    "--batch-size",
    default=64,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="Entries read per XREADGROUP.",
)
@click.option(
    "--claim-idle-ms",
    default=60_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Take over entries idle this long.",
)
@click.option(
    "--claim-every",
    default=5.0,
    show_default=True,
    type=finite_float(minimum=0, open_min=True),
    help="Seconds between takeover scans.",
)
@click.option(
    "--block-ms",
    default=1000,
    show_default=True,
    type=click.IntRange(1, 3_600_000),
    help="XREADGROUP block time (0 would block forever).",
)
@click.option("--ordered-by-key", is_flag=True, help="Handle messages with the same key in order.")
@click.option(
    "--shutdown-timeout",
    default=30.0,
    show_default=True,
    type=finite_float(minimum=0),
    help="Seconds to finish in-flight work.",
)
@click.option(
    "--health-port", type=PORT, default=None, help="Serve /healthz and /readyz on --health-host:PORT."
)
@click.option(
    "--health-host",
    default="127.0.0.1",
    show_default=True,
    callback=non_empty,
    help="Address of the health endpoint.",
)
@telemetry_options
@click.option(
    "--flush-every",
    type=finite_float(minimum=0, open_min=True),
    default=None,
    help="Seconds between flushes of the counters to the Redis hash (default: "
    "STREAMWARDEN_METRICS_FLUSH_INTERVAL, 5).",
)
@log_level_option("INFO")
def consume(
    redis_target: RedisTarget,
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
    health_host: str,
    prometheus_port: int | None,
    prometheus_host: str,
    otlp_endpoint: str | None,
    flush_every: float | None,
) -> None:
    """Run a handler on a Redis Streams consumer group through the reliability layer.

    Settings come from STREAMWARDEN_* variables (e.g. STREAMWARDEN_EXHAUSTED_TRANSIENT_ACTION=defer).
    Logs breaker transitions, dead letters and takeovers at INFO (--log-level). Stops gracefully on
    SIGTERM/SIGINT.
    """
    from .._settings import ReliabilitySettings

    handler = load_handler(handler_spec)
    overrides: dict[str, Any] = {"key_prefix": redis_target.key_prefix, "consumer_group": group}
    if flush_every is not None:
        # the runner flushes the counters every metrics_flush_interval (and once more when it stops)
        overrides["metrics_flush_interval"] = flush_every
    settings = ReliabilitySettings(**overrides)
    start_telemetry(
        settings.service_name,
        otlp_endpoint=otlp_endpoint,
        prometheus_port=prometheus_port,
        prometheus_host=prometheus_host,
    )
    options = _RunnerOptions(
        stream=stream,
        group=group,
        consumer=consumer or f"{socket.gethostname()}-{os.getpid()}",
        concurrency=concurrency,
        batch_size=batch_size,
        claim_idle_ms=claim_idle_ms,
        claim_every_s=claim_every,
        block_ms=block_ms,
        ordered_by_key=ordered_by_key,
        shutdown_timeout=shutdown_timeout,
    )
    health = (health_host, health_port) if health_port is not None else None
    asyncio.run(_consume(redis_target, settings, handler, options, health))


def _text(value: str) -> str:
    """A name as literal console text (no markup, printable)."""
    return escape(printable(value))


async def _consume(
    target: RedisTarget,
    settings: Any,
    handler: Callable[[Any], Awaitable[Any]],
    options: _RunnerOptions,
    health_at: tuple[str, int] | None,
) -> None:
    from .._layer import ReliabilityLayer
    from .._runners import HealthServer, RedisStreamConsumer

    console = make_console(stderr=True)
    client = target.client()
    try:
        await client.ping()  # an unreachable Redis or a refused password fails here, in one line
        layer = ReliabilityLayer(client, settings)
        for warning in await layer.verify_stores():
            console.print(f"[yellow]warning:[/yellow] {warning}")
        runner = RedisStreamConsumer(client, handler=handler, layer=layer, **options.kwargs())
        health: HealthServer | None = None
        if health_at is not None:
            host, port = health_at
            health = HealthServer(runner, host=host, port=port)
            with listening("--health-port", host, port):
                await health.start()
        console.print(
            f"consuming [bold]{_text(options.stream)}[/bold] as {_text(options.consumer)} in group "
            f"{_text(options.group)} at {_text(target.display)}"
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
