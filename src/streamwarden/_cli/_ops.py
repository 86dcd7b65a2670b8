"""Operator commands: ``streamwarden dlq list|show|count|replay|purge``, ``metrics`` and ``breakers``.

:func:`register` adds them to the main ``streamwarden`` click group. Every command connects with the
shared connection options of :func:`~._common.redis_options` (``--redis-url``, ``--username``,
``--password``, ``--tls-ca-file``, ``--key-prefix`` and their ``STREAMWARDEN_*`` variables) and fails
with one ``error:`` line (see :class:`~._common.GuardedCommand`).

The ``dlq`` commands work on either dead-letter store through one code path (they take a
:class:`~streamwarden.DeadLetterStore`): the Redis Streams store by default, the Kafka store with
``--kafka-bootstrap`` (env ``STREAMWARDEN_KAFKA_BOOTSTRAP``; ``--dlq-topic`` names the DLQ topic when it
is not ``{topic}.dlq``; TLS and SASL through the shared options of
:func:`~._common.kafka_connection_options`). ``--topic`` is another name of ``--destination``. ``replay``
on Kafka still uses Redis (``--redis-url``) for the dedup records, as the Kafka consumer does. aiokafka
is imported only when ``--kafka-bootstrap`` is given.

Tables and progress bars use rich; colour follows the terminal: none when output is not a TTY or when
``NO_COLOR`` is set. ``--json`` prints machine-readable output instead (valid UTF-8 even for ids that
are not: their bytes appear as ``\\udcXX`` escapes).

Time filters (``--since`` / ``--until``) take an ISO 8601 time (``2024-06-01T12:00:00Z``; UTC when no
offset is given), epoch seconds, or an age: ``90s``, ``15m``, ``2h``, ``7d`` ago.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .._breaker import BreakerState
from .._counters import COUNTER_NAMES, with_rates
from .._dlq import DeadLetterEntry, DeadLetterStore, DepthRefreshing
from .._redis._breaker import read_shared_breakers
from .._redis._counters import RedisCounterStore
from .._redis._dlq import OmittedPayload, RedisDeadLetterStore, parse_entry_id
from .._replay import DeadLetterReplayer, ReplayItem, ReplayReport, ReplayResult
from ._common import (
    CliError,
    GuardedCommand,
    GuardedGroup,
    KafkaConnection,
    RedisTarget,
    finite_float,
    json_text,
    kafka_connection_options,
    load_handler,
    log_level_option,
    make_console,
    non_empty,
    printable,
    redis_options,
    start_telemetry,
)

if TYPE_CHECKING:
    from .._kafka._dlq import KafkaDeadLetterStore

__all__ = ["DEFAULT_TRACE_URL_TEMPLATE", "KafkaDlqTarget", "kafka_options", "register"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

#: Opens the trace in Grafana Explore on the Tempo data source of ``compose/`` (uid ``tempo``).
#: ``{trace_id}`` and ``{span_id}`` are substituted; nothing else in the template is interpreted.
DEFAULT_TRACE_URL_TEMPLATE = (
    "http://localhost:3000/explore?left=%7B%22datasource%22:%22tempo%22,%22queries%22:%5B%7B"
    "%22refId%22:%22A%22,%22queryType%22:%22traceql%22,%22query%22:%22{trace_id}%22%7D%5D%7D"
)

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_AGE_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# --- helpers -----------------------------------------------------------------------------------------
def parse_time(value: str | None, *, now: float | None = None) -> float | None:
    """Epoch seconds of an ISO 8601 time, an epoch number, or an age such as ``15m`` (ago)."""
    if value is None or value == "":
        return None
    current = time.time() if now is None else now
    age = _AGE.match(value)
    if age:
        return current - float(age.group(1)) * _AGE_SECONDS[age.group(2)]
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if math.isfinite(number):
            return number
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a time: use ISO 8601, epoch seconds, or an age like 15m / 2h / 7d"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def _iso(ts: float) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def trace_url(template: str, trace_id: str | None, span_id: str | None) -> str | None:
    """The trace-UI link of an entry, or ``None`` without a trace id."""
    if not trace_id:
        return None
    return template.replace("{trace_id}", trace_id).replace("{span_id}", span_id or "")


def _json(value: Any, **options: Any) -> str:
    return json_text(value, default=_json_default, **options)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii")}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return repr(value)


def entry_dict(entry: DeadLetterEntry) -> dict[str, Any]:
    """Every field of ``entry`` plus ``traceparent``, JSON-ready."""
    out = {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry)}
    out["headers"] = dict(entry.headers)
    out["traceparent"] = entry.traceparent
    if isinstance(entry.payload, OmittedPayload):
        out["payload"] = None
        out["payload_omitted"] = dataclasses.asdict(entry.payload)
    return out


async def _require_destination(store: DeadLetterStore, destination: str | None) -> None:
    """A ``--destination`` that names no dead-letter queue is a typo, not an empty queue."""
    if destination is None or not isinstance(store, DepthRefreshing):
        return
    known = await store.refresh_depths()
    if destination not in known:
        names = ", ".join(printable(repr(name)) for name in sorted(known)) or "none"
        raise CliError(
            f"no dead-letter queue for destination {printable(repr(destination))} (known destinations: {names})"
        )


def _time_option(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    try:
        return parse_time(value)
    except click.BadParameter as exc:
        exc.ctx, exc.param = ctx, param
        raise


def _destination_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--destination",
        "-d",
        "--topic",
        "destination",
        default=None,
        callback=non_empty,
        help="Only this destination (the Redis stream, or the Kafka topic whose DLQ to read).",
    )(func)


def _filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        _destination_option,
        click.option("--error-type", default=None, help="Only this error.type (e.g. ValueError)."),
        click.option(
            "--error-class",
            type=click.Choice(["transient", "permanent", "unknown"]),
            default=None,
            help="Only this error class.",
        ),
        click.option(
            "--since",
            default=None,
            callback=_time_option,
            help="Dead-lettered at or after (ISO time, epoch, or 15m/2h/7d).",
        ),
        click.option(
            "--until",
            default=None,
            callback=_time_option,
            help="Dead-lettered at or before (same forms as --since).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


# --- dlq ---------------------------------------------------------------------------------------------
@click.group(cls=GuardedGroup)
def dlq() -> None:
    """Inspect, replay and purge the dead-letter queue (Redis Streams, or Kafka with --kafka-bootstrap)."""


@dataclasses.dataclass(frozen=True)
class KafkaDlqTarget:
    """Where the Kafka dead letters are (``--kafka-bootstrap``, ``--dlq-topic``) and how to reach them
    (TLS, SASL: ``--kafka-security-protocol`` and friends; its repr hides the password)."""

    bootstrap: str
    dlq_topic: str | None = None
    connection: KafkaConnection = dataclasses.field(default_factory=KafkaConnection)

    def store(self) -> KafkaDeadLetterStore:
        """A :class:`~streamwarden.kafka.KafkaDeadLetterStore`: every DLQ topic of the cluster, or only
        ``dlq_topic``."""
        try:
            from .._kafka._dlq import KafkaDeadLetterStore
        except ImportError as exc:
            raise CliError(
                f"--kafka-bootstrap needs aiokafka ({exc}): pip install 'streamwarden[kafka]'"
            ) from exc
        options = self.connection.store_options()
        if self.dlq_topic is not None:
            topic = self.dlq_topic
            options.update(topic_for=lambda _destination: topic, topics=[topic])
        return KafkaDeadLetterStore(self.bootstrap, client_id="streamwarden-cli", **options)


def _kafka_target(
    ctx: click.Context, bootstrap: str | None, dlq_topic: str | None, connection: KafkaConnection
) -> KafkaDlqTarget | None:
    if bootstrap is None:
        if dlq_topic is not None:
            raise click.UsageError("--dlq-topic needs --kafka-bootstrap", ctx=ctx)
        return None
    return KafkaDlqTarget(bootstrap=bootstrap, dlq_topic=dlq_topic, connection=connection)


def _dlq_topic(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,244}", value):
        raise click.BadParameter(
            f"{printable(repr(value))} is not a Kafka topic name ([A-Za-z0-9._-], at most 244 characters)",
            ctx=ctx,
            param=param,
        )
    return value


def kafka_options(func: F) -> F:
    """``--kafka-bootstrap`` (env ``STREAMWARDEN_KAFKA_BOOTSTRAP``), ``--dlq-topic`` (env
    ``STREAMWARDEN_KAFKA_DLQ_TOPIC``) and the TLS/SASL options of :func:`~._common.kafka_connection_options`;
    the command gets ``kafka_target`` (``None``: the Redis store)."""
    options = [
        click.option(
            "--kafka-bootstrap",
            envvar="STREAMWARDEN_KAFKA_BOOTSTRAP",
            default=None,
            callback=non_empty,
            help="Kafka bootstrap servers (host:port[,host:port]): read the Kafka dead-letter topics "
            "instead of Redis (env STREAMWARDEN_KAFKA_BOOTSTRAP).",
        ),
        click.option(
            "--dlq-topic",
            envvar="STREAMWARDEN_KAFKA_DLQ_TOPIC",
            default=None,
            callback=_dlq_topic,
            help="The Kafka DLQ topic to read (default: every '*.dlq' topic, or TOPIC.dlq with --topic; "
            "env STREAMWARDEN_KAFKA_DLQ_TOPIC). Needs --kafka-bootstrap.",
        ),
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        target = _kafka_target(
            click.get_current_context(),
            kwargs.pop("kafka_bootstrap"),
            kwargs.pop("dlq_topic"),
            kwargs.pop("kafka_connection"),
        )
        kwargs["kafka_target"] = target
        return func(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return kafka_connection_options(wrapper)  # type: ignore[return-value]


def _with_store(
    redis_target: RedisTarget,
    kafka_target: KafkaDlqTarget | None,
    work: Callable[[DeadLetterStore, Any], Coroutine[Any, Any, T]],
) -> T:
    """Run ``work(store, redis_client)`` on the chosen dead-letter store (the Redis client is made in any
    case but connects only when used: the Kafka store's replay needs it for the dedup records)."""

    async def run(client: Any) -> T:
        if kafka_target is None:
            return await work(RedisDeadLetterStore(client, key_prefix=redis_target.key_prefix), client)
        # aiokafka logs each failed connection attempt; without a configured handler Python would print
        # them raw beside the one error line (a --log-level handler on the root still receives them)
        kafka_log = logging.getLogger("aiokafka")
        if not any(isinstance(h, logging.NullHandler) for h in kafka_log.handlers):
            kafka_log.addHandler(logging.NullHandler())
        async with kafka_target.store() as store:
            return await work(store, client)

    return redis_target.run(run)


def _check_entry_id(entry_id: str, kafka_target: KafkaDlqTarget | None) -> None:
    if kafka_target is not None:
        from .._kafka._dlq import parse_entry_id as parse_kafka_entry_id

        if parse_kafka_entry_id(entry_id) is None:
            raise click.BadParameter(
                f"{printable(repr(entry_id))} is not TOPIC/PARTITION/OFFSET", param_hint="'ENTRY_ID'"
            )
    elif parse_entry_id(entry_id) is None:
        raise click.BadParameter(
            f"{printable(repr(entry_id))} is not DESTINATION/STREAM-ID", param_hint="'ENTRY_ID'"
        )


@dlq.command("list")
@redis_options()
@kafka_options
@_filter_options
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1), help="Entries to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines, one entry per line.")
def dlq_list(
    redis_target: RedisTarget,
    kafka_target: KafkaDlqTarget | None,
    destination: str | None,
    error_type: str | None,
    error_class: str | None,
    since: float | None,
    until: float | None,
    limit: int,
    as_json: bool,
) -> None:
    """List dead letters, oldest first."""

    async def work(store: DeadLetterStore, client: Any) -> list[DeadLetterEntry]:
        await _require_destination(store, destination)
        return await store.list(
            destination, limit=limit, error_type=error_type, error_class=error_class, since=since, until=until
        )

    entries = _with_store(redis_target, kafka_target, work)
    if as_json:
        for entry in entries:
            click.echo(_json(entry_dict(entry)))
        return
    console = make_console()
    if not entries:
        console.print("no dead letters match")
        return
    table = Table(title=f"dead letters ({len(entries)} shown)", header_style="bold")
    for name, justify in (
        ("entry id", "left"),
        ("dead-lettered (UTC)", "left"),
        ("message id", "left"),
        ("error", "left"),
        ("class", "left"),
        ("attempts", "right"),
        ("message", "left"),
    ):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for entry in entries:
        table.add_row(
            *(
                printable(cell)
                for cell in (
                    entry.entry_id or "",
                    _iso(entry.dead_lettered_at),
                    entry.message_id or "-",
                    entry.error_type,
                    entry.error_class,
                    str(entry.attempts),
                    entry.error_message[:120],
                )
            )
        )
    console.print(table)


@dlq.command("show")
@redis_options()
@kafka_options
@click.argument("entry_id")
@click.option(
    "--trace-url-template",
    envvar="STREAMWARDEN_TRACE_URL",
    default=DEFAULT_TRACE_URL_TEMPLATE,
    help="Trace-UI link; {trace_id} and {span_id} are filled in (env STREAMWARDEN_TRACE_URL). "
    "Default: Grafana Explore on the Tempo data source at localhost:3000.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the entry as JSON.")
def dlq_show(
    redis_target: RedisTarget,
    kafka_target: KafkaDlqTarget | None,
    entry_id: str,
    trace_url_template: str,
    as_json: bool,
) -> None:
    """Print every field of one entry (ENTRY_ID is DESTINATION/STREAM-ID on Redis,
    TOPIC/PARTITION/OFFSET on Kafka), with its trace link."""
    _check_entry_id(entry_id, kafka_target)

    async def work(store: DeadLetterStore, client: Any) -> DeadLetterEntry | None:
        return await store.get(entry_id)

    entry = _with_store(redis_target, kafka_target, work)
    if entry is None:
        raise CliError(f"no dead letter {printable(repr(entry_id))}")
    link = trace_url(trace_url_template, entry.trace_id, entry.span_id)
    if as_json:
        data = entry_dict(entry)
        data["trace_url"] = link
        click.echo(_json(data, indent=2))
        return
    _print_entry(make_console(), entry, link)


def _print_entry(console: Console, entry: DeadLetterEntry, link: str | None) -> None:
    rows: list[tuple[str, str]] = [
        ("entry id", entry.entry_id or ""),
        ("destination", entry.destination),
        ("message id", entry.message_id or "-"),
        ("reason", entry.reason),
        ("error type", entry.error_type),
        ("error class", entry.error_class),
        ("error message", entry.error_message),
        ("attempts", str(entry.attempts)),
        ("delivery count", str(entry.delivery_count)),
        ("service", entry.service),
        ("first failed at", _iso(entry.first_failed_at)),
        ("dead-lettered at", _iso(entry.dead_lettered_at)),
        ("source ref", entry.source_ref or "-"),
        ("trace id", entry.trace_id or "-"),
        ("span id", entry.span_id or "-"),
        ("traceparent", entry.traceparent or "-"),
        ("trace link", link or "-"),
        ("headers", _json(dict(entry.headers))),
    ]
    if isinstance(entry.payload, OmittedPayload):
        payload = f"<not stored: {entry.payload.reason}, {entry.payload.size} bytes>"
        if entry.payload.preview:
            payload += f" preview: {entry.payload.preview[:500]}"
    else:
        payload = _json(entry.payload)
    rows.append(("payload", payload))
    for name, value in rows:
        line = Text(f"{name}: ", style="bold")
        line.append(printable(value))
        console.print(line, soft_wrap=True)
    if entry.traceback:
        console.print(Text("traceback:", style="bold"))
        console.print(Text(printable(entry.traceback)), soft_wrap=True)


@dlq.command("count")
@redis_options()
@kafka_options
@_destination_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dlq_count(
    redis_target: RedisTarget, kafka_target: KafkaDlqTarget | None, destination: str | None, as_json: bool
) -> None:
    """Count dead letters per destination."""

    async def work(store: DeadLetterStore, client: Any) -> dict[str, int]:
        await _require_destination(store, destination)
        if destination is not None:
            return {destination: await store.count(destination)}
        if isinstance(store, DepthRefreshing):
            return {d: n for d, n in (await store.refresh_depths()).items() if n > 0}
        return {d: await store.count(d) for d in await store.destinations()}

    counts = _with_store(redis_target, kafka_target, work)
    if as_json:
        click.echo(_json({"destinations": counts, "total": sum(counts.values())}))
        return
    table = Table(title="dead letters", header_style="bold")
    table.add_column("destination", overflow="fold")
    table.add_column("entries", justify="right")
    for name, count in sorted(counts.items()):
        table.add_row(printable(name), str(count))
    table.add_row(Text("total", style="bold"), Text(str(sum(counts.values())), style="bold"))
    make_console().print(table)


@dlq.command("replay")
@redis_options()
@kafka_options
@_filter_options
@click.option(
    "--handler",
    "handler_spec",
    envvar="STREAMWARDEN_REPLAY_HANDLER",
    required=True,
    help="Processor to run, as module:function or module:Class.method (async); env "
    "STREAMWARDEN_REPLAY_HANDLER.",
)
@click.option(
    "--group",
    default=None,
    callback=non_empty,
    help="Consumer group whose dedup records the replay checks and completes (default: "
    "STREAMWARDEN_CONSUMER_GROUP); use the group of the consumer that dead-lettered the entries.",
)
@click.option("--entry-id", "entry_ids", multiple=True, help="Replay only these entries (repeatable).")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="At most this many entries.")
@click.option("--dry-run", is_flag=True, help="List what would be replayed; run nothing.")
@click.option("--force", is_flag=True, help="Run ids that are already completed too (forgets their record).")
@click.option(
    "--rate",
    default=50.0,
    show_default=True,
    type=finite_float(minimum=0),
    help="Replays per second (0: unlimited).",
)
@click.option(
    "--pass-envelope/--pass-payload",
    default=None,
    help="Hand the handler the Envelope, or the payload. Default: the Envelope for entries that came "
    "from a stream runner (they have a source ref), the payload otherwise.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--otlp-endpoint",
    default=None,
    callback=non_empty,
    help="Export the replay spans over OTLP (gRPC); OTEL_EXPORTER_OTLP_ENDPOINT works too.",
)
@log_level_option("WARNING")
def dlq_replay(
    redis_target: RedisTarget,
    kafka_target: KafkaDlqTarget | None,
    destination: str | None,
    error_type: str | None,
    error_class: str | None,
    since: float | None,
    until: float | None,
    handler_spec: str,
    group: str | None,
    entry_ids: tuple[str, ...],
    limit: int | None,
    dry_run: bool,
    force: bool,
    rate: float,
    pass_envelope: bool | None,
    as_json: bool,
    otlp_endpoint: str | None,
) -> None:
    """Re-run dead letters through the reliability layer (dedup-aware, rate-limited).

    An entry is removed only after its message was processed; an id already completed is reported
    skipped_duplicate unless --force. Exits 1 when any entry failed.
    """
    handler = load_handler(handler_spec)
    from .._settings import ReliabilitySettings

    overrides: dict[str, Any] = {"key_prefix": redis_target.key_prefix}
    if group is not None:
        overrides["consumer_group"] = group
    settings = ReliabilitySettings(**overrides)
    # the replay spans (linked to the failed attempts) go where OTEL_* or --otlp-endpoint say
    start_telemetry(
        settings.service_name, otlp_endpoint=otlp_endpoint, prometheus_port=None, prometheus_host="127.0.0.1"
    )
    console = make_console(stderr=as_json)

    async def work(store: DeadLetterStore, client: Any) -> ReplayReport:
        from .._layer import ReliabilityLayer

        await _require_destination(store, destination)
        layer = ReliabilityLayer(client, settings, dead_letter_store=store)
        replayer = DeadLetterReplayer(layer, store, rate_per_second=rate or None)
        progress = Progress(
            TextColumn("[bold]replay"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[last]}"),
            TimeElapsedColumn(),
            console=console,
            disable=as_json or not console.is_terminal,
        )
        task = progress.add_task("replay", total=None, last="")

        def on_item(item: ReplayItem, done: int, total: int) -> None:
            progress.update(
                task, completed=done, total=total, last=printable(f"{item.result} {item.entry_id}")
            )

        try:
            with progress:
                return await replayer.replay(
                    handler,
                    destination=destination,
                    entry_ids=list(entry_ids) or None,
                    error_type=error_type,
                    error_class=error_class,
                    since=since,
                    until=until,
                    limit=limit,
                    dry_run=dry_run,
                    force=force,
                    pass_envelope=pass_envelope,
                    progress=on_item,
                )
        finally:
            await layer.deduplication_manager.aclose()  # flushes deferred completions, if any

    report = _with_store(redis_target, kafka_target, work)
    if as_json:
        click.echo(
            _json(
                {
                    "counts": report.counts(),
                    "missing": report.missing,
                    "stopped": report.stopped,
                    "items": [dataclasses.asdict(item) for item in report.items],
                }
            )
        )
    else:
        _print_replay(console, report)
    if report.failed:
        sys.exit(1)


_RESULT_STYLE = {
    ReplayResult.PROCESSED: "green",
    ReplayResult.SKIPPED_DUPLICATE: "yellow",
    ReplayResult.FAILED: "red",
    ReplayResult.DRY_RUN: "cyan",
}


def _print_replay(console: Console, report: ReplayReport) -> None:
    if report.items:
        table = Table(title="replay", header_style="bold")
        table.add_column("entry id", overflow="fold")
        table.add_column("message id", overflow="fold")
        table.add_column("result")
        table.add_column("detail", overflow="fold")
        for item in report.items:
            detail = item.detail
            if item.new_entry_id:
                detail = f"{detail} (now {item.new_entry_id}, attempts {item.attempts})"
            table.add_row(
                printable(item.entry_id),
                printable(item.message_id or "-"),
                Text(str(item.result), style=_RESULT_STYLE[item.result]),
                printable(detail),
            )
        console.print(table)
    counts = ", ".join(f"{name} {count}" for name, count in report.counts().items())
    console.print(f"replayed: {counts}")
    if report.missing:
        console.print(printable(f"not found (already replayed or purged): {', '.join(report.missing)}"))
    if report.stopped:
        console.print(Text(printable(f"stopped: {report.stopped}"), style="red"))


@dlq.command("purge")
@redis_options()
@kafka_options
@click.option(
    "--destination",
    "-d",
    "--topic",
    "destination",
    default=None,
    callback=non_empty,
    help="Only this destination (default: all).",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def dlq_purge(
    redis_target: RedisTarget, kafka_target: KafkaDlqTarget | None, destination: str | None, yes: bool
) -> None:
    """Delete dead letters for good (asks first unless --yes).

    Exits 1 when --destination names no dead-letter queue (a typo purges nothing).
    """
    where = printable(f"destination {destination!r}") if destination else "every destination"

    async def count(store: DeadLetterStore, client: Any) -> int:
        await _require_destination(store, destination)
        return await store.count(destination)

    found = _with_store(redis_target, kafka_target, count)
    if not yes:
        if found == 0:
            click.echo(f"no dead letters in {where}")
            return
        click.confirm(f"Delete {found} dead letter(s) from {where}?", abort=True)

    async def purge(store: DeadLetterStore, client: Any) -> int:
        return await store.purge(destination)

    removed = _with_store(redis_target, kafka_target, purge)
    click.echo(f"purged {removed} dead letter(s) from {where}")


# --- metrics and breakers -------------------------------------------------------------------------
@click.command("metrics", cls=GuardedCommand)
@redis_options()
@click.option(
    "--service",
    envvar="STREAMWARDEN_SERVICE_NAME",
    default="streamwarden",
    show_default=True,
    callback=non_empty,
    help="Service whose fleet counters to show (env STREAMWARDEN_SERVICE_NAME).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def metrics(redis_target: RedisTarget, service: str, as_json: bool) -> None:
    """Fleet-wide reliability counters of a service, with success / dedup / error rates."""

    async def work(client: Any) -> dict[str, int]:
        return await RedisCounterStore(
            client, service_name=service, key_prefix=redis_target.key_prefix
        ).totals()

    totals = redis_target.run(work)
    counts = dict.fromkeys(COUNTER_NAMES, 0)
    counts.update(totals)
    report = with_rates(counts)
    if as_json:
        click.echo(_json({"service": service, **report}))
        return
    table = Table(title=printable(f"streamwarden metrics: {service}"), header_style="bold")
    table.add_column("counter")
    table.add_column("value", justify="right")
    for name in [*COUNTER_NAMES, *sorted(set(totals) - set(COUNTER_NAMES))]:
        table.add_row(printable(name), str(counts[name]))
    for name in ("success_rate", "deduplication_rate", "error_rate"):
        table.add_row(Text(name, style="bold"), Text(f"{report[name]:.2%}", style="bold"))
    make_console().print(table)


_STATE_STYLE = {BreakerState.CLOSED: "green", BreakerState.OPEN: "red", BreakerState.HALF_OPEN: "yellow"}


@click.command("breakers", cls=GuardedCommand)
@redis_options()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def breakers(redis_target: RedisTarget, as_json: bool) -> None:
    """Shared circuit-breaker states, as the fleet last published them."""

    async def work(client: Any) -> Any:
        return await read_shared_breakers(client, key_prefix=redis_target.key_prefix)

    states = redis_target.run(work)
    now = time.time()
    if as_json:
        click.echo(
            _json([dict(dataclasses.asdict(s), retry_after=round(s.retry_after(now), 3)) for s in states])
        )
        return
    console = make_console()
    if not states:
        console.print("no shared breaker state published")
        return
    table = Table(title="circuit breakers", header_style="bold")
    for name in ("breaker", "state", "retry in", "version", "published by", "published at (UTC)"):
        table.add_column(name, overflow="fold")
    for s in states:
        table.add_row(
            printable(s.name),
            Text(s.state, style=_STATE_STYLE.get(s.state, "")),
            f"{s.retry_after(now):.1f}s" if s.state == BreakerState.OPEN else "-",
            str(s.version),
            printable(s.origin),
            _iso(s.updated_at),
        )
    console.print(table)


def register(cli: click.Group) -> None:
    """Add ``dlq``, ``metrics`` and ``breakers`` to the ``streamwarden`` command group."""
    cli.add_command(dlq)
    cli.add_command(metrics)
    cli.add_command(breakers)
