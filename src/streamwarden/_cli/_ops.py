"""Operator commands: ``streamwarden dlq list|show|count|replay|purge``, ``metrics`` and ``breakers``.

:func:`register` adds them to the main ``streamwarden`` click group. Every command connects with
``--redis-url`` (``STREAMWARDEN_REDIS_URL``; ``rediss://`` for TLS, with ``--tls-ca-file`` to verify
the server against a private CA), ``--username`` / ``--password`` (``STREAMWARDEN_REDIS_USERNAME`` /
``STREAMWARDEN_REDIS_PASSWORD``, kept out of the URL and so out of process listings) and
``--key-prefix`` (``STREAMWARDEN_KEY_PREFIX``).

Tables and progress bars use rich; colour follows the terminal: none when output is not a TTY or when
``NO_COLOR`` is set. ``--json`` prints machine-readable output instead.

Time filters (``--since`` / ``--until``) take an ISO 8601 time (``2024-06-01T12:00:00Z``; UTC when no
offset is given), epoch seconds, or an age: ``90s``, ``15m``, ``2h``, ``7d`` ago.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import importlib
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .._counters import SEED_COUNTERS, with_rates
from .._dlq import DeadLetterEntry
from .._redis._breaker import read_shared_breakers
from .._redis._counters import RedisCounterStore
from .._redis._dlq import OmittedPayload, RedisDeadLetterStore
from .._replay import DeadLetterReplayer, ReplayItem, ReplayReport, ReplayResult

__all__ = ["DEFAULT_TRACE_URL_TEMPLATE", "register"]

#: Opens the trace in Grafana Explore on the Tempo data source of ``compose/`` (uid ``tempo``).
#: ``{trace_id}`` and ``{span_id}`` are substituted; nothing else in the template is interpreted.
DEFAULT_TRACE_URL_TEMPLATE = (
    "http://localhost:3000/explore?left=%7B%22datasource%22:%22tempo%22,%22queries%22:%5B%7B"
    "%22refId%22:%22A%22,%22queryType%22:%22traceql%22,%22query%22:%22{trace_id}%22%7D%5D%7D"
)

T = TypeVar("T")

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_AGE_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# --- helpers -----------------------------------------------------------------------------------------
def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, no_color=bool(os.environ.get("NO_COLOR")), highlight=False)


def parse_time(value: str | None, *, now: float | None = None) -> float | None:
    """Epoch seconds of an ISO 8601 time, an epoch number, or an age such as ``15m`` (ago)."""
    if value is None or value == "":
        return None
    current = time.time() if now is None else now
    age = _AGE.match(value)
    if age:
        return current - float(age.group(1)) * _AGE_SECONDS[age.group(2)]
    try:
        return float(value)
    except ValueError:
        pass
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


def _connect(url: str, username: str | None, password: str | None, tls_ca_file: str | None) -> Any:
    import redis.asyncio

    options: dict[str, Any] = {}
    if username:
        options["username"] = username
    if password:
        options["password"] = password
    if tls_ca_file:
        if not url.startswith("rediss://"):
            raise click.BadParameter("--tls-ca-file needs a rediss:// URL", param_hint="--redis-url")
        options["ssl_ca_certs"] = tls_ca_file
        options["ssl_cert_reqs"] = "required"
    return redis.asyncio.Redis.from_url(url, **options)


class _Conn:
    """Connection options of one command invocation."""

    def __init__(
        self, url: str, username: str | None, password: str | None, tls_ca_file: str | None, prefix: str
    ):
        self.url = url
        self.username = username
        self.password = password
        self.tls_ca_file = tls_ca_file
        self.key_prefix = prefix

    def run(self, work: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        """Run ``work(client)`` on a fresh event loop; connection errors become a clean CLI error."""
        import redis.exceptions

        async def main() -> T:
            client = _connect(self.url, self.username, self.password, self.tls_ca_file)
            try:
                return await work(client)
            finally:
                await client.aclose()

        try:
            return asyncio.run(main())
        except redis.exceptions.NoPermissionError as exc:
            raise click.ClickException(f"Redis refused a command (ACL): {exc}") from exc
        except redis.exceptions.AuthenticationError as exc:
            raise click.ClickException(f"Redis authentication failed: {exc}") from exc
        except (redis.exceptions.ConnectionError, OSError) as exc:
            raise click.ClickException(f"cannot reach Redis at {_redact_url(self.url)}: {exc}") from exc


def _redact_url(url: str) -> str:
    return re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", url)


def _redis_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--redis-url",
            envvar="STREAMWARDEN_REDIS_URL",
            default="redis://localhost:6379/0",
            show_default=True,
            help="Redis URL (env STREAMWARDEN_REDIS_URL); rediss:// for TLS.",
        ),
        click.option("--username", envvar="STREAMWARDEN_REDIS_USERNAME", default=None, help="ACL user."),
        click.option(
            "--password", envvar="STREAMWARDEN_REDIS_PASSWORD", default=None, help="ACL password (env var)."
        ),
        click.option(
            "--tls-ca-file",
            envvar="STREAMWARDEN_REDIS_TLS_CA_FILE",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="CA bundle that must have signed the server certificate (rediss://).",
        ),
        click.option(
            "--key-prefix",
            envvar="STREAMWARDEN_KEY_PREFIX",
            default="streamwarden",
            show_default=True,
            help="Key prefix of the streamwarden keys.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _conn(kwargs: dict[str, Any]) -> _Conn:
    return _Conn(
        kwargs.pop("redis_url"),
        kwargs.pop("username"),
        kwargs.pop("password"),
        kwargs.pop("tls_ca_file"),
        kwargs.pop("key_prefix"),
    )


def _filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--destination", "-d", default=None, help="Only this destination (stream)."),
        click.option("--error-type", default=None, help="Only this error.type (e.g. ValueError)."),
        click.option(
            "--error-class",
            type=click.Choice(["transient", "permanent", "unknown"]),
            default=None,
            help="Only this error class.",
        ),
        click.option(
            "--since", default=None, help="Dead-lettered at or after (ISO time, epoch, or 15m/2h/7d)."
        ),
        click.option("--until", default=None, help="Dead-lettered at or before (same forms as --since)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


# --- dlq ---------------------------------------------------------------------------------------------
@click.group()
def dlq() -> None:
    """Inspect, replay and purge the dead-letter queue (Redis Streams)."""


@dlq.command("list")
@_redis_options
@_filter_options
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1), help="Entries to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines, one entry per line.")
def dlq_list(**kwargs: Any) -> None:
    """List dead letters, oldest first."""
    conn = _conn(kwargs)
    since, until = parse_time(kwargs["since"]), parse_time(kwargs["until"])

    async def work(client: Any) -> list[DeadLetterEntry]:
        store = RedisDeadLetterStore(client, key_prefix=conn.key_prefix)
        return await store.list(
            kwargs["destination"],
            limit=kwargs["limit"],
            error_type=kwargs["error_type"],
            error_class=kwargs["error_class"],
            since=since,
            until=until,
        )

    entries = conn.run(work)
    if kwargs["as_json"]:
        for entry in entries:
            click.echo(json.dumps(entry_dict(entry), default=_json_default, ensure_ascii=False))
        return
    console = _console()
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
            entry.entry_id or "",
            _iso(entry.dead_lettered_at),
            entry.message_id or "-",
            entry.error_type,
            entry.error_class,
            str(entry.attempts),
            entry.error_message[:120],
        )
    console.print(table)


@dlq.command("show")
@_redis_options
@click.argument("entry_id")
@click.option(
    "--trace-url-template",
    envvar="STREAMWARDEN_TRACE_URL",
    default=DEFAULT_TRACE_URL_TEMPLATE,
    help="Trace-UI link; {trace_id} and {span_id} are filled in (env STREAMWARDEN_TRACE_URL). "
    "Default: Grafana Explore on the Tempo data source at localhost:3000.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the entry as JSON.")
def dlq_show(entry_id: str, trace_url_template: str, as_json: bool, **kwargs: Any) -> None:
    """Print every field of one entry (ENTRY_ID is DESTINATION/STREAM-ID), with its trace link."""
    conn = _conn(kwargs)

    async def work(client: Any) -> DeadLetterEntry | None:
        return await RedisDeadLetterStore(client, key_prefix=conn.key_prefix).get(entry_id)

    entry = conn.run(work)
    if entry is None:
        raise click.ClickException(f"no dead letter {entry_id!r}")
    link = trace_url(trace_url_template, entry.trace_id, entry.span_id)
    if as_json:
        data = entry_dict(entry)
        data["trace_url"] = link
        click.echo(json.dumps(data, default=_json_default, ensure_ascii=False, indent=2))
        return
    console = _console()
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
        ("headers", json.dumps(dict(entry.headers), ensure_ascii=False)),
    ]
    if isinstance(entry.payload, OmittedPayload):
        payload = f"<not stored: {entry.payload.reason}, {entry.payload.size} bytes>"
        if entry.payload.preview:
            payload += f" preview: {entry.payload.preview[:500]}"
    else:
        payload = json.dumps(entry.payload, default=_json_default, ensure_ascii=False)
    rows.append(("payload", payload))
    for name, value in rows:
        line = Text(f"{name}: ", style="bold")
        line.append(value)
        console.print(line, soft_wrap=True)
    if entry.traceback:
        console.print(Text("traceback:", style="bold"))
        console.print(Text(entry.traceback), soft_wrap=True)


@dlq.command("count")
@_redis_options
@click.option("--destination", "-d", default=None, help="Only this destination.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dlq_count(destination: str | None, as_json: bool, **kwargs: Any) -> None:
    """Count dead letters per destination."""
    conn = _conn(kwargs)

    async def work(client: Any) -> dict[str, int]:
        store = RedisDeadLetterStore(client, key_prefix=conn.key_prefix)
        if destination is not None:
            return {destination: await store.count(destination)}
        return {d: n for d, n in (await store.refresh_depths()).items() if n > 0}

    counts = conn.run(work)
    if as_json:
        click.echo(json.dumps({"destinations": counts, "total": sum(counts.values())}))
        return
    table = Table(title="dead letters", header_style="bold")
    table.add_column("destination", overflow="fold")
    table.add_column("entries", justify="right")
    for name, count in sorted(counts.items()):
        table.add_row(name, str(count))
    table.add_row(Text("total", style="bold"), Text(str(sum(counts.values())), style="bold"))
    _console().print(table)


def load_handler(spec: str) -> Callable[[Any], Awaitable[Any]]:
    """Import ``module:function`` (``function`` may be dotted: ``module:Class.method``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise click.BadParameter("expected module:function", param_hint="--handler")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: handlers of the current project import
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"cannot load {spec!r}: {exc}", param_hint="--handler") from exc
    if not callable(target):
        raise click.BadParameter(f"{spec!r} is not callable", param_hint="--handler")
    handler: Callable[[Any], Awaitable[Any]] = target
    return handler


@dlq.command("replay")
@_redis_options
@_filter_options
@click.option(
    "--handler",
    envvar="STREAMWARDEN_REPLAY_HANDLER",
    required=True,
    help="Processor to run, as module:function (an async def); env STREAMWARDEN_REPLAY_HANDLER.",
)
@click.option("--entry-id", "entry_ids", multiple=True, help="Replay only these entries (repeatable).")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="At most this many entries.")
@click.option("--dry-run", is_flag=True, help="List what would be replayed; run nothing.")
@click.option("--force", is_flag=True, help="Run ids that are already completed too (forgets their record).")
@click.option(
    "--rate",
    default=50.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Replays per second (0: unlimited).",
)
@click.option(
    "--pass-envelope/--pass-payload",
    default=None,
    help="Hand the handler the Envelope, or the payload. Default: the Envelope for entries that came "
    "from a stream runner (they have a source ref), the payload otherwise.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def dlq_replay(**kwargs: Any) -> None:
    """Re-run dead letters through the reliability layer (dedup-aware, rate-limited).

    An entry is removed only after its message was processed; an id already completed is reported
    skipped_duplicate unless --force. Exits 1 when any entry failed.
    """
    conn = _conn(kwargs)
    handler = load_handler(kwargs["handler"])
    since, until = parse_time(kwargs["since"]), parse_time(kwargs["until"])
    as_json: bool = kwargs["as_json"]
    console = _console(stderr=as_json)

    async def work(client: Any) -> ReplayReport:
        from .._layer import ReliabilityLayer
        from .._settings import ReliabilitySettings

        settings = ReliabilitySettings(key_prefix=conn.key_prefix)
        store = RedisDeadLetterStore(client, key_prefix=conn.key_prefix)
        layer = ReliabilityLayer(client, settings, dead_letter_store=store)
        rate = kwargs["rate"] or None
        replayer = DeadLetterReplayer(layer, store, rate_per_second=rate)
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
            progress.update(task, completed=done, total=total, last=f"{item.result} {item.entry_id}")

        try:
            with progress:
                return await replayer.replay(
                    handler,
                    destination=kwargs["destination"],
                    entry_ids=list(kwargs["entry_ids"]) or None,
                    error_type=kwargs["error_type"],
                    error_class=kwargs["error_class"],
                    since=since,
                    until=until,
                    limit=kwargs["limit"],
                    dry_run=kwargs["dry_run"],
                    force=kwargs["force"],
                    pass_envelope=kwargs["pass_envelope"],
                    progress=on_item,
                )
        finally:
            await layer.deduplication_manager.aclose()  # flushes deferred completions, if any

    report = conn.run(work)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "counts": report.counts(),
                    "missing": report.missing,
                    "stopped": report.stopped,
                    "items": [dataclasses.asdict(item) for item in report.items],
                },
                default=_json_default,
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
                item.entry_id,
                item.message_id or "-",
                Text(str(item.result), style=_RESULT_STYLE[item.result]),
                detail,
            )
        console.print(table)
    counts = ", ".join(f"{name} {count}" for name, count in report.counts().items())
    console.print(f"replayed: {counts}")
    if report.missing:
        console.print(f"not found (already replayed or purged): {', '.join(report.missing)}")
    if report.stopped:
        console.print(Text(f"stopped: {report.stopped}", style="red"))


@dlq.command("purge")
@_redis_options
@click.option("--destination", "-d", default=None, help="Only this destination (default: all).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def dlq_purge(destination: str | None, yes: bool, **kwargs: Any) -> None:
    """Delete dead letters for good (asks first unless --yes)."""
    conn = _conn(kwargs)
    where = f"destination {destination!r}" if destination else "every destination"

    async def count(client: Any) -> int:
        return await RedisDeadLetterStore(client, key_prefix=conn.key_prefix).count(destination)

    if not yes:
        found = conn.run(count)
        if found == 0:
            click.echo(f"no dead letters in {where}")
            return
        click.confirm(f"Delete {found} dead letter(s) from {where}?", abort=True)

    async def purge(client: Any) -> int:
        return await RedisDeadLetterStore(client, key_prefix=conn.key_prefix).purge(destination)

    removed = conn.run(purge)
    click.echo(f"purged {removed} dead letter(s) from {where}")


# --- metrics and breakers -------------------------------------------------------------------------
@click.command("metrics")
@_redis_options
@click.option(
    "--service",
    envvar="STREAMWARDEN_SERVICE_NAME",
    default="streamwarden",
    show_default=True,
    help="Service whose fleet counters to show (env STREAMWARDEN_SERVICE_NAME).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def metrics(service: str, as_json: bool, **kwargs: Any) -> None:
    """Fleet-wide reliability counters of a service, with success / dedup / error rates."""
    conn = _conn(kwargs)

    async def work(client: Any) -> dict[str, int]:
        return await RedisCounterStore(client, service_name=service, key_prefix=conn.key_prefix).totals()

    totals = conn.run(work)
    counts = dict.fromkeys(SEED_COUNTERS, 0)
    counts.update(totals)
    report = with_rates(counts)
    if as_json:
        click.echo(json.dumps({"service": service, **report}))
        return
    table = Table(title=f"streamwarden metrics: {service}", header_style="bold")
    table.add_column("counter")
    table.add_column("value", justify="right")
    for name in [*SEED_COUNTERS, *sorted(set(totals) - set(SEED_COUNTERS))]:
        table.add_row(name, str(counts[name]))
    for name in ("success_rate", "deduplication_rate", "error_rate"):
        table.add_row(Text(name, style="bold"), Text(f"{report[name]:.2%}", style="bold"))
    _console().print(table)


_STATE_STYLE = {"closed": "green", "open": "red", "half_open": "yellow"}


@click.command("breakers")
@_redis_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def breakers(as_json: bool, **kwargs: Any) -> None:
    """Shared circuit-breaker states, as the fleet last published them."""
    conn = _conn(kwargs)

    async def work(client: Any) -> Any:
        return await read_shared_breakers(client, key_prefix=conn.key_prefix)

    states = conn.run(work)
    now = time.time()
    if as_json:
        click.echo(
            json.dumps(
                [dict(dataclasses.asdict(s), retry_after=round(s.retry_after(now), 3)) for s in states]
            )
        )
        return
    console = _console()
    if not states:
        console.print("no shared breaker state published")
        return
    table = Table(title="circuit breakers", header_style="bold")
    for name in ("breaker", "state", "retry in", "version", "published by", "published at (UTC)"):
        table.add_column(name, overflow="fold")
    for s in states:
        table.add_row(
            s.name,
            Text(s.state, style=_STATE_STYLE.get(s.state, "")),
            f"{s.retry_after(now):.1f}s" if s.state == "open" else "-",
            str(s.version),
            s.origin,
            _iso(s.updated_at),
        )
    console.print(table)


def register(cli: click.Group) -> None:
    """Add ``dlq``, ``metrics`` and ``breakers`` to the ``streamwarden`` command group."""
    cli.add_command(dlq)
    cli.add_command(metrics)
    cli.add_command(breakers)
