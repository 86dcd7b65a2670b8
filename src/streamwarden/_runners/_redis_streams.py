"""Redis Streams transport: ``RedisStreamConsumer`` (the core of ``_core.py`` on a consumer group),
``StreamProducer`` and ``decode_entry``. The entry format is documented in ``docs/streams.md``.

* read: ``XREADGROUP GROUP g c COUNT n BLOCK block_ms STREAMS s >`` with ``n`` at most the free slots;
* reclaim: ``XAUTOCLAIM s g c claim_idle_ms cursor COUNT n`` (entries idle that long belonged to a
  consumer that died or stalled); entries deleted while pending (``XTRIM``) come back in its third
  reply element: they are counted as lost (``streamwarden.consumer.lost``), logged and acknowledged;
* ack: ``XACK`` of every entry that finished since the last one (group commit);
* give back: nothing, the entry stays pending and is reclaimed after ``claim_idle_ms``.

Poison is not counted from the stream's delivery counts (they rise for every entry of a process that
dies, and for every redelivery during an outage): the layer counts handler runs in the dedup record.
``Envelope.delivery_count`` is informational: 1 for a first delivery, 2 for a reclaimed one ("at least
the second": ``XAUTOCLAIM`` does not report the count, and asking costs a round trip per entry).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from opentelemetry import propagate

from .. import _names as n
from .._envelope import Envelope
from .._exceptions import ConfigurationError
from .._layer import ReliabilityLayer, StagedCompletion
from .._redis._dedup import RedisDedupStore
from .._redis._wire import as_text
from .._retry import Backoff, ExponentialBackoff
from .._telemetry import telemetry_for
from .._types import Clock, Processor, Sleep
from ._core import (
    Backlog,
    ConsumerRunner,
    ConsumerStats,
    Delivery,
    ErrorKind,
    Reclaimed,
    _positive_int,
    _seconds,
)
from ._health import Health, HealthServer

__all__ = [
    "ConsumerStats",
    "Health",
    "HealthServer",
    "RedisStreamConsumer",
    "RedisStreamsTransport",
    "StreamProducer",
    "decode_entry",
]

FIELD_ID = "id"
FIELD_PAYLOAD = "payload"
FIELD_KEY = "key"
FIELD_TRACEPARENT = "traceparent"
FIELD_TRACESTATE = "tracestate"

_START_ID = re.compile(r"^(\$|0|[0-9]{1,20}(-[0-9]{1,20})?)$")
# Error codes of a Redis that is busy, loading, failing over, resharding, out of memory or unable to
# persist (MISCONF: writes refused until the disk recovers): retry after a back-off.
_TRANSIENT_CODES = frozenset(
    {"LOADING", "BUSY", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "READONLY", "NOREPLICAS", "MOVED", "ASK",
     "OOM", "MISCONF", "UNBLOCKED", "NOGROUP"}
)  # fmt: skip


def _decode_payload(text: str) -> Any:
    """The JSON value of ``text``, or ``text`` itself when it is not JSON the parser can take.

    Never raises: not JSON, nested deeper than the parser's recursion limit (``RecursionError``), or
    too large to build (``MemoryError``) all give the raw text.
    """
    try:
        return json.loads(text)
    except (ValueError, RecursionError, MemoryError):
        return text


def decode_entry(
    entry_id: Any,
    fields: Any,
    *,
    destination: str,
    delivery_count: int = 1,
    id_field: str = FIELD_ID,
) -> Envelope:
    """Turn a stream entry into an :class:`Envelope`; never raises, whatever the entry holds.

    * id: the ``id_field`` field (``STREAMWARDEN_ID_FIELD``, default ``id``; set by the producer, so
      producer retries deduplicate), else the stream entry id (then only redeliveries deduplicate);
    * payload: the JSON value of the ``payload`` field (object, array, string, number, ...); the raw
      text when it is not JSON the parser can take (syntax, nesting deeper than ~1,000 levels, non-UTF-8
      bytes, which are kept as surrogate escapes); without a ``payload`` field, all fields as text;
    * headers: ``traceparent`` / ``tracestate``; key: the ``key`` field (per-key ordering).

    Field names and values are text (bytes decoded as UTF-8 with ``surrogateescape``); anything that is
    not a mapping of fields reads as no fields.
    """
    stream_id = entry_id.decode("utf-8", "surrogateescape") if type(entry_id) is bytes else as_text(entry_id)
    decoded: dict[str, Any] = {}
    if type(fields) is dict:  # what redis-py hands out: one comprehension, no call per name
        try:
            decoded = {
                (name.decode("utf-8", "surrogateescape") if type(name) is bytes else as_text(name)): value
                for name, value in fields.items()
            }
        except Exception:  # pragma: no cover - a plain dict's items() does not fail
            decoded = {}
    elif isinstance(fields, Mapping):
        try:
            for name, value in fields.items():
                decoded[as_text(name)] = value
        except Exception:  # a mapping that fails to iterate: keep what was read
            pass
    raw_payload = decoded.get(FIELD_PAYLOAD)
    payload: Any
    if raw_payload is None:
        payload = {name: as_text(value) for name, value in decoded.items()}
    else:
        payload = _decode_payload(
            raw_payload.decode("utf-8", "surrogateescape")
            if type(raw_payload) is bytes
            else as_text(raw_payload)
        )
    headers = (
        {h: as_text(decoded[h]) for h in (FIELD_TRACEPARENT, FIELD_TRACESTATE) if h in decoded}
        if FIELD_TRACEPARENT in decoded or FIELD_TRACESTATE in decoded
        else {}
    )
    raw_id = decoded.get(id_field)
    if raw_id is None:
        message_id = ""
    elif type(raw_id) is bytes:
        message_id = raw_id.decode("utf-8", "surrogateescape")
    else:
        message_id = as_text(raw_id)
    raw_key = decoded.get(FIELD_KEY)
    key = as_text(raw_key) if raw_key is not None else None
    return Envelope(
        id=message_id or stream_id,
        payload=payload,
        headers=headers,
        destination=destination,
        source_ref=stream_id,
        delivery_count=delivery_count,
        key=key or None,
    )


class StreamProducer:
    """Writes messages to a stream with an id, a JSON payload and the current trace context."""

    def __init__(
        self,
        client: Any,
        stream: str,
        *,
        maxlen: int | None = None,
        id_field: str = FIELD_ID,
        service_name: str = "streamwarden",
        tracer_provider: Any = None,
    ) -> None:
        self.client = client
        self.stream = stream
        self.maxlen = maxlen
        self.id_field = id_field
        self._telemetry = telemetry_for(service_name, tracer_provider=tracer_provider)

    async def send(self, payload: Any, *, message_id: str | None = None, key: str | None = None) -> str:
        """``XADD`` one message under a PRODUCER ``send {stream}`` span; returns the stream entry id.
        The span's ``traceparent`` is written with the message so the consumer's process span links to
        it (without an SDK: the current context's, if any)."""
        if not self._telemetry.tracing_enabled():
            return await self._send(payload, message_id, key)
        with self._telemetry.send_span(self.stream, message_id, n.MESSAGING_SYSTEM_REDIS):
            return await self._send(payload, message_id, key)

    async def _send(self, payload: Any, message_id: str | None, key: str | None) -> str:
        fields: dict[str, str] = {FIELD_PAYLOAD: json.dumps(payload, separators=(",", ":"))}
        if message_id is not None:
            fields[self.id_field] = message_id
        if key is not None:
            fields[FIELD_KEY] = key
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        fields.update({k: v for k, v in carrier.items() if k in (FIELD_TRACEPARENT, FIELD_TRACESTATE)})
        entry_id = await self.client.xadd(self.stream, fields, maxlen=self.maxlen, approximate=False)
        return as_text(entry_id)


def _entry_ms(entry_id: Any) -> float | None:
    """The creation time (ms) a stream entry id carries, ``None`` for anything else."""
    head = as_text(entry_id).partition("-")[0] if entry_id is not None else ""
    return float(head) if head.isdigit() else None


def _error_code(error: BaseException) -> str:
    """The Redis error code (``NOPERM``, ``WRONGTYPE``, ...) of a server error reply, or ``""``."""
    code = getattr(error, "status_code", None)  # redis-py strips the codes it maps to a class
    if isinstance(code, str) and code:
        return code
    first = str(error).split(" ", 1)[0]
    return first if first.isupper() else ""


class RedisStreamsTransport:
    """One consumer of a Redis Streams consumer group, as :class:`~._core.Transport`."""

    name = "redis"

    def __init__(
        self,
        client: Any,
        *,
        stream: str,
        group: str,
        consumer: str,
        block_ms: int = 1000,
        claim_idle_ms: int = 60_000,
        start_id: str = "0",
        ordered_by_key: bool = False,
        id_field: str = FIELD_ID,
    ) -> None:
        for name, value in (("stream", stream), ("group", group), ("consumer", consumer)):
            if not isinstance(value, str) or not value:
                raise ConfigurationError(f"{name} must be a non-empty string, got {value!r}")
        # BLOCK 0 would wait forever, and no reclaim scan would run while it waits
        _positive_int("block_ms", block_ms, minimum=1, maximum=3_600_000)
        _positive_int("claim_idle_ms", claim_idle_ms, minimum=0, maximum=2**40)
        if not isinstance(start_id, str) or not _START_ID.match(start_id):
            raise ConfigurationError(
                f"start_id must be '0' (the whole stream), '$' (new entries only) or a stream id "
                f"like '1700000000000-0', got {start_id!r}"
            )
        if not isinstance(ordered_by_key, bool):
            raise ConfigurationError(f"ordered_by_key must be True or False, got {ordered_by_key!r}")
        self.client = client
        self.stream = stream
        self.destination = stream
        self.group = group
        self.consumer = consumer
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.start_id = start_id
        self.ordered_by_key = ordered_by_key
        self.id_field = id_field
        self._group_ok = False
        self._cursor = "0-0"

    # --- the group --------------------------------------------------------------------------------
    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing."""
        if self._group_ok:
            return
        try:
            await self.client.xgroup_create(self.stream, self.group, id=self.start_id, mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ok = True

    def _check_group(self, error: Exception) -> None:
        if "NOGROUP" in str(error):  # stream or group gone (Redis restarted empty, stream deleted)
            self._group_ok = False

    # --- reading ----------------------------------------------------------------------------------
    def _delivery(self, entry_id: Any, fields: Any, delivery_count: int) -> Delivery:
        env = decode_entry(
            entry_id, fields, destination=self.stream, delivery_count=delivery_count, id_field=self.id_field
        )
        return Delivery(ref=env.source_ref, envelope=env, order_key=env.key if self.ordered_by_key else None)

    async def read(self, max_count: int) -> Sequence[Delivery]:
        """``XREADGROUP … >``: at most ``max_count`` new entries, waiting up to ``block_ms`` for one."""
        try:
            response = await self.client.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=max_count, block=self.block_ms
            )
        except Exception as exc:
            self._check_group(exc)
            raise
        return [self._delivery(eid, fields, 1) for _s, batch in (response or []) for eid, fields in batch]

    async def reclaim(self, max_count: int) -> Reclaimed:
        """``XAUTOCLAIM``: at most ``max_count`` entries idle for ``claim_idle_ms``; deleted ones are lost."""
        try:
            reply = await self.client.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=self.claim_idle_ms,
                start_id=self._cursor,
                count=max_count,
            )
        except Exception as exc:
            self._check_group(exc)
            raise
        cursor, claimed = as_text(reply[0]), reply[1]
        deleted = [as_text(d) for d in (reply[2] if len(reply) > 2 else [])]
        # Redis 6.2 answers a deleted entry as an entry without fields instead
        deleted += [as_text(eid) for eid, fields in claimed if fields is None]
        self._cursor = cursor
        if deleted:  # XAUTOCLAIM already dropped them from the pending list; XACK confirms it
            await self.client.xack(self.stream, self.group, *deleted)
        deliveries = [self._delivery(eid, fields, 2) for eid, fields in claimed if fields is not None]
        return Reclaimed(deliveries, deleted, more=cursor != "0-0")

    async def ack(self, refs: Sequence[Hashable]) -> None:
        """``XACK`` every ref in one command."""
        try:
            await self.client.xack(self.stream, self.group, *refs)
        except Exception as exc:
            self._check_group(exc)
            raise

    async def commit(self, refs: Sequence[Hashable], staged: Sequence[StagedCompletion]) -> list[bool] | None:
        """Group commit: complete ``staged`` and ``XACK`` ``refs`` in one round trip (one script), when
        every completion belongs to one :class:`~streamwarden.RedisDedupStore` on this transport's client.

        ``None`` when it cannot (another store, another client): the core then writes the completions
        through the layer and acknowledges with :meth:`ack`. Raises what Redis raises; then nothing is
        known to have landed, and the core tries again (both halves are idempotent).
        """
        store = staged[0].store if staged else None
        if not isinstance(store, RedisDedupStore) or store.client is not self.client:
            return None
        if any(item.store is not store for item in staged):
            return None
        try:
            return await store.complete_and_xack(
                [item.lease for item in staged],
                staged[0].ttl,
                [item.fingerprint for item in staged],
                stream=self.stream,
                group=self.group,
                entry_ids=[str(ref) for ref in refs],
            )
        except Exception as exc:
            self._check_group(exc)
            raise

    def give_back(self, refs: Sequence[Hashable]) -> None:
        """Nothing to do: an unacknowledged entry stays pending and is reclaimed after ``claim_idle_ms``."""

    async def backlog(self) -> Backlog:
        """``XINFO GROUPS`` (the group's lag, Redis >= 7, and pending count), ``XPENDING`` (the oldest
        pending entry, whose id is its creation time in ms) and ``TIME`` (the server's clock, which
        made that id): one pipelined round trip."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.xinfo_groups(self.stream)
            pipe.xpending(self.stream, self.group)
            pipe.time()
            groups, summary, (seconds, micros) = await pipe.execute()
        oldest = _entry_ms(summary.get("min")) if summary and summary.get("pending") else None
        age = None if oldest is None else max(0.0, (seconds * 1000 + micros / 1000 - oldest) / 1000)
        for info in groups:
            if as_text(info.get("name")) == self.group:
                lag = info.get("lag")
                return Backlog(int(lag) if lag is not None else None, int(info.get("pending", 0)), age)
        return Backlog(None, None, age)

    async def ping(self) -> None:
        """``PING``."""
        await self.client.ping()

    # --- errors -----------------------------------------------------------------------------------
    def classify(self, error: BaseException) -> ErrorKind | None:
        """Connection trouble, timeouts and a busy / loading / failing-over server are transient; a
        refused permission, a key of the wrong type, an argument the client refuses, a failed login or
        an unknown command are configuration errors. Anything else is no Redis error at all."""
        import redis.exceptions as rx

        if isinstance(error, rx.AuthenticationError | rx.AuthorizationError | rx.NoPermissionError):
            return ErrorKind.CONFIGURATION
        if isinstance(error, rx.DataError):
            return ErrorKind.CONFIGURATION
        if isinstance(error, rx.ResponseError):
            code = _error_code(error)
            return ErrorKind.TRANSIENT if code in _TRANSIENT_CODES else ErrorKind.CONFIGURATION
        if isinstance(error, rx.RedisError | ConnectionError | TimeoutError | OSError):
            return ErrorKind.TRANSIENT
        return None

    def explain(self, error: BaseException) -> str:
        """What Redis refused and what to change, keeping Redis' own words."""
        import redis.exceptions as rx

        try:
            text = str(error)
        except Exception:
            text = type(error).__name__
        where = f"stream {self.stream!r}, group {self.group!r}"
        code = _error_code(error)
        if isinstance(error, rx.NoPermissionError) or code == "NOPERM":
            hint = "grant the consumer's Redis user the stream commands and keys (docs/security.md)"
        elif isinstance(error, rx.AuthenticationError | rx.AuthorizationError):
            hint = "check the Redis username and password"
        elif code == "WRONGTYPE":
            hint = f"key {self.stream!r} exists and is not a stream: consume another stream or delete the key"
        elif isinstance(error, rx.DataError):
            hint = "the Redis client refused an argument: check the consumer's options"
        elif "unknown command" in text.lower():
            hint = "the server lacks a stream command: Redis 6.2 or newer is required (XAUTOCLAIM)"
        else:
            hint = "Redis refused the consumer's command: check the options and the server's configuration"
        return f"{where}: {hint} (Redis said: {type(error).__name__}: {text})"


class RedisStreamConsumer(ConsumerRunner):
    """Consume ``stream`` as ``consumer`` in ``group`` through ``layer``, acknowledging by outcome.

    The loop, isolation of suspects, backpressure and shutdown are the core's (``_runners/_core.py``);
    this class adds the Redis Streams transport and the Redis companions of the layer (shared breaker
    state, fleet counter flushes). ``clock``, ``sleep`` and ``backoff`` are injectable; without a
    ``backoff`` the runner backs off exponentially from 0.05 s up to ``max_backoff_s``, with full jitter.
    """

    def __init__(
        self,
        client: Any,
        *,
        stream: str,
        group: str,
        consumer: str,
        handler: Processor,
        layer: ReliabilityLayer,
        batch_size: int = 64,
        block_ms: int = 1000,
        concurrency: int = 16,
        ordered_by_key: bool = False,
        claim_idle_ms: int = 60_000,
        claim_every_s: float = 5.0,
        start_id: str = "0",
        shutdown_timeout: float = 30.0,
        max_backoff_s: float = 5.0,
        metrics_every_s: float = 5.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        backoff: Backoff | None = None,
    ) -> None:
        if not isinstance(layer, ReliabilityLayer):
            raise ConfigurationError(f"layer must be a ReliabilityLayer, got {type(layer).__name__}")
        self.max_backoff_s = _seconds("max_backoff_s", max_backoff_s)
        transport = RedisStreamsTransport(
            client,
            stream=stream,
            group=group,
            consumer=consumer,
            block_ms=block_ms,
            claim_idle_ms=claim_idle_ms,
            start_id=start_id,
            ordered_by_key=ordered_by_key,
            id_field=layer.settings.id_field,
        )
        if backoff is None:
            backoff = ExponentialBackoff(base=min(0.05, self.max_backoff_s), cap=self.max_backoff_s)
        super().__init__(
            transport,
            handler=handler,
            layer=layer,
            batch_size=batch_size,
            concurrency=concurrency,
            claim_every_s=claim_every_s,
            shutdown_timeout=shutdown_timeout,
            metrics_every_s=metrics_every_s,
            clock=clock,
            sleep=sleep,
            backoff=backoff,
        )
        self.redis_transport = transport
        self.client = client
        self.companion_client = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.block_ms = block_ms
        self.ordered_by_key = ordered_by_key
        self.claim_idle_ms = claim_idle_ms
        self.start_id = start_id

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing."""
        await self.redis_transport.ensure_group()
