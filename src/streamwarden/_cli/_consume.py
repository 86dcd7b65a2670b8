"""``streamwarden consume``: a handler on a Redis Streams consumer group or a Kafka topic's consumer
group (``--kafka-bootstrap`` and ``--topic``), through the reliability layer.

Kafka is an optional dependency: its modules are imported only on the ``--kafka-bootstrap`` path, so
this command (and ``--help``) work without aiokafka. With Kafka, Redis holds the dedup records and
(``--dlq redis``) the dead letters when ``--redis-url`` (or ``STREAMWARDEN_REDIS_URL``) is given;
without it the dedup store is the embedded one, which only one process can see.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import click
from rich.markup import escape

from ._common import (
    PORT,
    CliError,
    GuardedCommand,
    KafkaConnection,
    RedisTarget,
    finite_float,
    kafka_connection_options,
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

# The values of streamwarden._runners._kafka.KafkaOrdering, spelled here so that --help needs no aiokafka.
KAFKA_ORDERINGS = ("partition", "key", "unordered")
# Options of one transport only: given (on the command line) for the other one, they are a usage error.
_REDIS_ONLY = ("claim_idle_ms", "claim_every", "ordered_by_key")
_KAFKA_ONLY = (
    "ordering",
    "id_header",
    "dlq",
    "start_from",
    "revoke_timeout",
    "session_timeout_ms",
    "max_poll_interval_ms",
    "retry_delays",
)


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


@dataclass(frozen=True)
class _KafkaOptions:
    """The ``KafkaConsumerRunner`` arguments of one ``consume --kafka-bootstrap`` invocation."""

    bootstrap_servers: str
    topic: str
    group: str
    consumer: str
    concurrency: int
    batch_size: int
    poll_timeout_ms: int
    ordering: str
    id_header: str
    start_from: str
    revoke_timeout: float
    shutdown_timeout: float
    consumer_options: dict[str, Any]
    retry_delays: tuple[float, ...] = ()

    def kwargs(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _parse_retry_delays(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...]:
    """``5,30,300`` as seconds: at most 10, each finite, above 0 and at most a week."""
    if value is None:
        return ()
    delays: list[float] = []
    for part in value.split(","):
        try:
            delay = float(part.strip())
        except ValueError:
            raise click.BadParameter(
                f"{part.strip()!r} is not a number of seconds", ctx=ctx, param=param
            ) from None
        if not math.isfinite(delay) or not 0 < delay <= 7 * 24 * 3600:
            raise click.BadParameter(
                f"each delay must be above 0 and at most 604800 s, got {part.strip()!r}", ctx=ctx, param=param
            )
        delays.append(delay)
    if len(delays) > 10:
        raise click.BadParameter(f"at most 10 retry topics, got {len(delays)} delays", ctx=ctx, param=param)
    return tuple(delays)


@click.command(cls=GuardedCommand)
@redis_options()
@click.option("--stream", default=None, callback=non_empty, help="Redis stream to consume.")
@click.option(
    "--kafka-bootstrap",
    envvar="STREAMWARDEN_KAFKA_BOOTSTRAP",
    default=None,
    callback=non_empty,
    help="Consume a Kafka topic instead: bootstrap servers host:port[,host:port...] "
    "(env STREAMWARDEN_KAFKA_BOOTSTRAP; needs streamwarden[kafka]).",
)
@click.option(
    "--topic",
    envvar="STREAMWARDEN_KAFKA_TOPIC",
    default=None,
    callback=non_empty,
    help="Kafka topic to consume (env STREAMWARDEN_KAFKA_TOPIC).",
)
@kafka_connection_options
@click.option("--group", required=True, callback=non_empty, help="Consumer group (created if missing).")
@click.option(
    "--consumer",
    "--consumer-name",
    "consumer",
    default=None,
    callback=non_empty,
    help="Consumer name (default: host-pid); the Kafka client id.",
)
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
    help="Entries read per XREADGROUP (records per Kafka poll).",
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
    help="XREADGROUP block time (0 would block forever); the Kafka poll timeout.",
)
@click.option("--ordered-by-key", is_flag=True, help="Handle messages with the same key in order (Redis).")
@click.option(
    "--ordering",
    type=click.Choice(KAFKA_ORDERINGS),
    default="key",
    show_default=True,
    help="Kafka: what runs in order: a partition's records, one key's records of a partition, or none.",
)
@click.option(
    "--id-header",
    envvar="STREAMWARDEN_KAFKA_ID_HEADER",
    default="message_id",
    show_default=True,
    callback=non_empty,
    help="Kafka: the header holding the message id (else the key, else topic/partition/offset).",
)
@click.option(
    "--dlq",
    type=click.Choice(("redis", "kafka")),
    default=None,
    help="Kafka: where dead letters go: Redis, or the topic {topic}.dlq (default: redis with "
    "--redis-url, else kafka).",
)
@click.option(
    "--start-from",
    type=click.Choice(("earliest", "latest")),
    default="earliest",
    show_default=True,
    help="Kafka: where a group without committed offsets starts.",
)
@click.option(
    "--revoke-timeout",
    default=5.0,
    show_default=True,
    type=finite_float(minimum=0),
    help="Kafka: seconds a rebalance waits for in-flight records of revoked partitions.",
)
@click.option(
    "--session-timeout-ms",
    envvar="STREAMWARDEN_KAFKA_SESSION_TIMEOUT_MS",
    default=10_000,
    show_default=True,
    type=click.IntRange(1000, 3_600_000),
    help="Kafka: the group session timeout (a dead member's partitions move after it).",
)
@click.option(
    "--max-poll-interval-ms",
    default=300_000,
    show_default=True,
    type=click.IntRange(1000, 2**31 - 1),
    help="Kafka: the member leaves the group when it polls less often (raise it for slow handlers).",
)
@click.option(
    "--retry-delays",
    default=None,
    callback=_parse_retry_delays,
    metavar="S[,S...]",
    help="Kafka: retry topics TOPIC.retry.0, .1, ... with these delays in seconds (e.g. 5,30,300): a "
    "message whose retries ran out waits there instead of holding its partition (implies "
    "STREAMWARDEN_EXHAUSTED_TRANSIENT_ACTION=defer; STREAMWARDEN_POISON_MAX_DELIVERIES ends the cycle).",
)
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
    stream: str | None,
    kafka_bootstrap: str | None,
    topic: str | None,
    kafka_connection: KafkaConnection,
    group: str,
    consumer: str | None,
    handler_spec: str,
    concurrency: int,
    batch_size: int,
    claim_idle_ms: int,
    claim_every: float,
    block_ms: int,
    ordered_by_key: bool,
    ordering: str,
    id_header: str,
    dlq: str | None,
    start_from: str,
    revoke_timeout: float,
    session_timeout_ms: int,
    max_poll_interval_ms: int,
    retry_delays: tuple[float, ...],
    shutdown_timeout: float,
    health_port: int | None,
    health_host: str,
    prometheus_port: int | None,
    prometheus_host: str,
    otlp_endpoint: str | None,
    flush_every: float | None,
) -> None:
    """Run a handler on a Redis Streams consumer group (--stream) or a Kafka topic's consumer group
    (--kafka-bootstrap, --topic) through the reliability layer.

    Settings come from STREAMWARDEN_* variables (e.g. STREAMWARDEN_EXHAUSTED_TRANSIENT_ACTION=defer).
    Logs breaker transitions, dead letters and takeovers at INFO (--log-level). Stops gracefully on
    SIGTERM/SIGINT.
    """
    from .._settings import ReliabilitySettings

    ctx = click.get_current_context()
    kafka = kafka_bootstrap is not None
    _check_transport(ctx, stream=stream, kafka=kafka, topic=topic)
    use_redis = ctx.get_parameter_source("redis_url") in _GIVEN
    dead_letters = dlq or ("redis" if use_redis else "kafka")
    if kafka and dead_letters == "redis" and not use_redis:
        raise click.UsageError("--dlq redis needs --redis-url (or STREAMWARDEN_REDIS_URL)", ctx=ctx)
    handler = load_handler(handler_spec)
    overrides: dict[str, Any] = {"key_prefix": redis_target.key_prefix, "consumer_group": group}
    if retry_delays:
        overrides["exhausted_transient_action"] = "defer"  # what retry topics are for
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
    health = (health_host, health_port) if health_port is not None else None
    name = consumer or f"{socket.gethostname()}-{os.getpid()}"
    if kafka_bootstrap is not None and topic is not None:
        kafka_options = _KafkaOptions(
            bootstrap_servers=kafka_bootstrap,
            topic=topic,
            group=group,
            consumer=name,
            concurrency=concurrency,
            batch_size=batch_size,
            poll_timeout_ms=block_ms,
            ordering=ordering,
            id_header=id_header,
            start_from=start_from,
            revoke_timeout=revoke_timeout,
            shutdown_timeout=shutdown_timeout,
            retry_delays=retry_delays,
            consumer_options=kafka_connection.client_options(
                session_timeout_ms=session_timeout_ms,
                heartbeat_interval_ms=max(100, min(3000, session_timeout_ms // 3)),
                max_poll_interval_ms=max_poll_interval_ms,
            ),
        )
        target = redis_target if use_redis else None
        asyncio.run(
            _consume_kafka(target, settings, handler, kafka_options, health, dead_letters, kafka_connection)
        )
        return
    assert stream is not None  # _check_transport
    options = _RunnerOptions(
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
    )
    asyncio.run(_consume(redis_target, settings, handler, options, health))


_GIVEN = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)


def _check_transport(ctx: click.Context, *, stream: str | None, kafka: bool, topic: str | None) -> None:
    """One transport: ``--stream`` (Redis) or ``--kafka-bootstrap`` with ``--topic``; the options of the
    other one, given on the command line, are a usage error rather than silently ignored."""
    if kafka and stream is not None:
        raise click.UsageError(
            "give either --stream (Redis) or --kafka-bootstrap with --topic, not both", ctx=ctx
        )
    if kafka and topic is None:
        raise click.UsageError("--kafka-bootstrap needs --topic", ctx=ctx)
    if not kafka and stream is None:
        raise click.UsageError("missing --stream (or --kafka-bootstrap with --topic for Kafka)", ctx=ctx)
    if not kafka and ctx.get_parameter_source("topic") is click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--topic needs --kafka-bootstrap", ctx=ctx)
    wrong = _REDIS_ONLY if kafka else _KAFKA_ONLY
    for name in wrong:
        if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
            flag = "--" + name.replace("_", "-")
            other = "Redis streams" if kafka else "Kafka (--kafka-bootstrap)"
            raise click.UsageError(f"{flag} is an option for {other} only", ctx=ctx)


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


async def _consume_kafka(
    target: RedisTarget | None,
    settings: Any,
    handler: Callable[[Any], Awaitable[Any]],
    options: _KafkaOptions,
    health_at: tuple[str, int] | None,
    dead_letters: str,
    connection: KafkaConnection,
) -> None:
    try:
        from .._runners._kafka import KafkaConsumerRunner
    except ImportError as exc:
        raise CliError(str(exc)) from exc
    from .._layer import ReliabilityLayer
    from .._runners import HealthServer

    console = make_console(stderr=True)
    client = target.client() if target is not None else None
    store: Any = None
    try:
        if client is not None:
            await client.ping()  # an unreachable Redis or a refused password fails here, in one line
        else:
            console.print(
                "[yellow]warning:[/yellow] no --redis-url: the dedup records live in this process only; "
                "another member of the group cannot see them (a rebalance may run a message twice)"
            )
        if dead_letters == "kafka":
            from .._kafka import KafkaDeadLetterStore

            store = KafkaDeadLetterStore(
                options.bootstrap_servers,
                **connection.store_options(),
                **settings.dead_letter_store_options(),
            )
        layer = ReliabilityLayer(client, settings, dead_letter_store=store)
        for warning in await layer.verify_stores():
            console.print(f"[yellow]warning:[/yellow] {warning}")
        runner = KafkaConsumerRunner(handler=handler, layer=layer, redis_client=client, **options.kwargs())
        health: HealthServer | None = None
        if health_at is not None:
            host, port = health_at
            health = HealthServer(runner, host=host, port=port)
            with listening("--health-port", host, port):
                await health.start()
        console.print(
            f"consuming Kafka topic [bold]{_text(options.topic)}[/bold] as {_text(options.consumer)} in "
            f"group {_text(options.group)} at {_text(options.bootstrap_servers)} "
            f"(ordering {options.ordering}, dead letters to {dead_letters})"
        )
        try:
            await runner.run_until_signal()
        finally:
            if health is not None:
                await health.close()
            await layer.aclose(timeout=1.0)
        stats = runner.stats
        console.print(
            f"stopped: read {stats.read}, acked {stats.acked}, not acked {stats.not_acked}, "
            f"outcomes {stats.outcomes}"
        )
    finally:
        if store is not None:
            try:
                await asyncio.wait_for(store.aclose(), timeout=5.0)
            except (Exception, TimeoutError) as exc:
                console.print(f"[yellow]warning:[/yellow] closing the Kafka DLQ failed: {_text(repr(exc))}")
        if client is not None:
            await client.aclose()
