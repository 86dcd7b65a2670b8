"""``RedisStreamConsumer``: a Redis Streams consumer-group runner around the reliability layer.

One loop per consumer::

    XAUTOCLAIM idle entries of dead consumers (periodically) ─┐
    XREADGROUP a batch of new entries ────────────────────────┴─► batch dedup claim (one round trip)
        ─► process with bounded concurrency (optionally in order per key)
        ─► XACK the entries whose Outcome says so (one round trip per batch)

Acknowledgement follows :attr:`ProcessResult.should_ack`: processed, duplicate and dead-lettered
(after the DLQ write was confirmed) are acknowledged; in-progress, deferred and failed entries stay
pending and come back later through ``XAUTOCLAIM`` with a higher delivery count, which the layer's
poison check reads.

**Backpressure.** While the circuit breaker is open the runner stops reading instead of burning the
backlog into deferrals; it resumes when the breaker's open timeout has passed (the next message is
the half-open trial). When Redis is unreachable it backs off exponentially (capped, jittered) and
reconnects; there is no busy loop.

**Shutdown.** :meth:`RedisStreamConsumer.stop` (wired to SIGTERM/SIGINT by :meth:`run_until_signal`)
stops reading, waits up to ``shutdown_timeout`` for in-flight messages, then cancels the rest. A
cancelled message releases its claim and is not acknowledged, so nothing unprocessed is ever acked.

**Trimmed while pending.** ``XAUTOCLAIM`` reports ids that were deleted (e.g. ``XTRIM``) while still
pending. Those messages are lost to the stream; the runner counts them
(``streamwarden.consumer.lost``), logs them, and removes them from the pending list.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import propagate

from .. import _names as n
from .._dedup import ClaimResult
from .._dlq import DepthRefreshing
from .._envelope import Envelope
from .._exceptions import CircuitOpenError, DeduplicationUnavailableError
from .._layer import Outcome, ProcessResult, ReliabilityLayer
from .._redis._wire import as_text

__all__ = ["ConsumerStats", "Health", "HealthServer", "RedisStreamConsumer", "StreamProducer", "decode_entry"]

log = logging.getLogger("streamwarden.runner")

Handler = Callable[[Any], Awaitable[Any]]

FIELD_ID = "id"
FIELD_PAYLOAD = "payload"
FIELD_KEY = "key"
FIELD_TRACEPARENT = "traceparent"
FIELD_TRACESTATE = "tracestate"

# Seconds a shutdown waits, after shutdown_timeout, for cancelled messages to release their claims.
_RELEASE_GRACE_S = 2.0
# Bound on stopping each background companion (shared breaker sync, counter flusher) at shutdown.
_HELPER_STOP_S = 1.0


def decode_entry(
    entry_id: Any, fields: Mapping[Any, Any], *, destination: str, delivery_count: int = 1
) -> Envelope:
    """Turn a stream entry into an :class:`Envelope`.

    The message id is the entry's ``id`` field (set by the producer, so producer retries deduplicate),
    or the stream entry id when the field is absent (then only redeliveries deduplicate). ``payload``
    is JSON-decoded when it parses; ``traceparent`` / ``tracestate`` become headers; ``key`` is the
    ordering key.
    """
    decoded = {as_text(k): v for k, v in fields.items()}
    stream_id = as_text(entry_id)
    raw_payload = decoded.get(FIELD_PAYLOAD)
    payload: Any
    if raw_payload is None:
        payload = {k: as_text(v) for k, v in decoded.items()}
    else:
        text = as_text(raw_payload)
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text
    headers = {h: as_text(decoded[h]) for h in (FIELD_TRACEPARENT, FIELD_TRACESTATE) if h in decoded}
    message_id = as_text(decoded[FIELD_ID]) if FIELD_ID in decoded else stream_id
    key = as_text(decoded[FIELD_KEY]) if FIELD_KEY in decoded else None
    return Envelope(
        id=message_id or stream_id,
        payload=payload,
        headers=headers,
        destination=destination,
        source_ref=stream_id,
        delivery_count=delivery_count,
        key=key,
    )


class StreamProducer:
    """Writes messages to a stream with an id, a JSON payload and the current trace context."""

    def __init__(self, client: Any, stream: str, *, maxlen: int | None = None) -> None:
        self.client = client
        self.stream = stream
        self.maxlen = maxlen

    async def send(self, payload: Any, *, message_id: str | None = None, key: str | None = None) -> str:
        """``XADD`` one message; returns the stream entry id. The ``traceparent`` of the current span
        is written so the consumer's process span links to this producer."""
        fields: dict[str, str] = {FIELD_PAYLOAD: json.dumps(payload, separators=(",", ":"))}
        if message_id is not None:
            fields[FIELD_ID] = message_id
        if key is not None:
            fields[FIELD_KEY] = key
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        fields.update({k: v for k, v in carrier.items() if k in (FIELD_TRACEPARENT, FIELD_TRACESTATE)})
        entry_id = await self.client.xadd(self.stream, fields, maxlen=self.maxlen, approximate=False)
        return as_text(entry_id)


@dataclass
class ConsumerStats:
    """Counters of one runner (also visible as OpenTelemetry metrics)."""

    read: int = 0
    reclaimed: int = 0
    acked: int = 0
    not_acked: int = 0
    lost: int = 0
    redis_errors: int = 0
    paused_for_breaker: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Health:
    """A readiness answer: ``ready`` plus the facts it is made of."""

    ready: bool
    breakers: dict[str, str]
    redis_ok: bool
    dlq_ok: bool
    dlq_depth: int | None
    lag: int | None
    pending: int | None
    reason: str = ""


class RedisStreamConsumer:
    """Consume ``stream`` as ``consumer`` in ``group`` through ``layer``, acknowledging by outcome."""

    def __init__(
        self,
        client: Any,
        *,
        stream: str,
        group: str,
        consumer: str,
        handler: Handler,
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
    ) -> None:
        if batch_size < 1 or concurrency < 1:
            raise ValueError("batch_size and concurrency must be at least 1")
        self.client = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.handler = handler
        self.layer = layer
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.concurrency = concurrency
        self.ordered_by_key = ordered_by_key
        self.claim_idle_ms = claim_idle_ms
        self.claim_every_s = claim_every_s
        self.start_id = start_id
        self.shutdown_timeout = shutdown_timeout
        self.max_backoff_s = max_backoff_s
        self.metrics_every_s = metrics_every_s
        self.stats = ConsumerStats()
        self._stop = asyncio.Event()
        self._semaphore = asyncio.Semaphore(concurrency)
        self._inflight: set[asyncio.Task[None]] = set()
        self._acks: list[Any] = []  # stream entry ids to acknowledge with the next XACK
        self._ack_task: asyncio.Task[None] | None = None
        self._key_tails: dict[str, asyncio.Task[None]] = {}
        self._claim_cursor = "0-0"
        self._last_claim = 0.0
        self._lag: int | None = None
        self._pending: int | None = None
        self._last_metrics = 0.0
        self._running = False
        self._group_ok = False
        telemetry = layer.telemetry
        attrs = {
            n.ATTR_SERVICE_NAME: layer.settings.service_name,
            n.ATTR_MESSAGING_DESTINATION: stream,
            n.ATTR_MESSAGING_CONSUMER_GROUP: group,
        }
        self._attrs = attrs
        self._lost_counter = telemetry.meter.create_counter(
            n.METRIC_CONSUMER_LOST,
            unit="{message}",
            description="Pending stream entries deleted (trimmed) before they were processed.",
        )
        telemetry.add_consumer_gauge_source(self._gauge_values)

    # --- public control -----------------------------------------------------------------------
    def stop(self) -> None:
        """Stop reading; in-flight messages finish (or are cancelled after ``shutdown_timeout``)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop.is_set()

    async def run_until_signal(self) -> None:
        """:meth:`run`, stopping gracefully on SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        try:
            await self.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)

    async def run(self) -> None:
        """Consume until :meth:`stop`; returns after in-flight work finished or was abandoned."""
        self._running = True
        backoff = 0.05
        helpers = await self._start_helpers()
        try:
            while not self._stop.is_set():
                try:
                    await self.ensure_group()
                    await self._loop_once()
                    backoff = 0.05
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if not _is_redis_error(exc):
                        raise
                    if "NOGROUP" in str(exc):  # stream or group gone (Redis restarted empty, stream deleted)
                        self._group_ok = False
                    self.stats.redis_errors += 1
                    log.warning(
                        "redis error in consumer %s: %r; retrying in %.2fs", self.consumer, exc, backoff
                    )
                    await self._sleep_or_stop(backoff * random.uniform(0.5, 1.0))
                    backoff = min(self.max_backoff_s, backoff * 2)
        finally:
            await self._drain()
            await self._stop_helpers(helpers)
            self._running = False

    async def _start_helpers(self) -> list[Any]:
        """Background companions, per the layer's settings: shared breaker state, fleet counter flushes."""
        from .._redis._breaker import SharedBreakerSync
        from .._redis._counters import CounterFlusher

        settings = self.layer.settings
        helpers: list[Any] = []
        if settings.shared_breaker:
            sync = SharedBreakerSync(
                self.client,
                self.layer.breakers,
                key_prefix=settings.key_prefix,
                poll_interval=settings.shared_breaker_poll_interval,
            )
            await sync.start()
            helpers.append(sync)
        if self.layer.metrics_collector.store is not None:
            flusher = CounterFlusher(self.layer.metrics_collector, interval=settings.metrics_flush_interval)
            flusher.start()
            helpers.append(flusher)
        return helpers

    async def _stop_helpers(self, helpers: list[Any]) -> None:
        """Stop the companions, each within ``_HELPER_STOP_S``: a frozen Redis must not hold up exit (a
        final counter flush that cannot finish in time is logged and dropped)."""
        for helper in reversed(helpers):
            try:
                await asyncio.wait_for(helper.stop(), timeout=_HELPER_STOP_S)
            except (Exception, TimeoutError) as exc:
                log.warning("stopping %s failed: %r", type(helper).__name__, exc)

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

    # --- the loop -----------------------------------------------------------------------------
    async def _loop_once(self) -> None:
        breaker = self.layer.circuit_breaker
        if breaker.state == "open":
            wait = breaker.retry_after()
            if wait > 0:
                self.stats.paused_for_breaker += 1
                await self._sleep_or_stop(wait)
                return
        now = time.monotonic()
        if now - self._last_metrics >= self.metrics_every_s:
            self._last_metrics = now
            await self.refresh_lag()
        if now - self._last_claim >= self.claim_every_s:
            self._last_claim = now
            if await self.reclaim():
                return
        await self._wait_for_capacity()
        count = min(self.batch_size, self.concurrency - len(self._inflight)) or 1
        response = await self._unless_stopped(
            self.client.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=count, block=self.block_ms
            )
        )
        entries = [(eid, fields) for _stream, batch in (response or []) for eid, fields in batch]
        if entries:
            self.stats.read += len(entries)
            await self._dispatch(entries, {})

    async def reclaim(self) -> int:
        """Take over entries idle for ``claim_idle_ms`` (their consumer died); returns how many."""
        reply = await self.client.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=self.claim_idle_ms,
            start_id=self._claim_cursor,
            count=self.batch_size,
        )
        cursor, claimed = reply[0], reply[1]
        deleted = reply[2] if len(reply) > 2 else []
        self._claim_cursor = as_text(cursor)
        if deleted:
            await self._count_lost(deleted)
        claimed = [(eid, fields) for eid, fields in claimed if fields is not None]
        if not claimed:
            return 0
        self.stats.reclaimed += len(claimed)
        deliveries = await self._delivery_counts([eid for eid, _ in claimed])
        await self._dispatch(claimed, deliveries)
        return len(claimed)

    async def _count_lost(self, deleted: Sequence[Any]) -> None:
        ids = [as_text(d) for d in deleted]
        self.stats.lost += len(ids)
        self._lost_counter.add(len(ids), self._attrs)
        log.error(
            "stream %s: %d pending entries were deleted before processing (trimmed?): %s",
            self.stream,
            len(ids),
            ", ".join(ids[:10]),
        )
        # XAUTOCLAIM already dropped them from the pending list; XACK is a harmless confirmation.
        await self.client.xack(self.stream, self.group, *ids)

    async def _delivery_counts(self, entry_ids: Sequence[Any]) -> dict[str, int]:
        """The delivery count of each just-claimed entry: one ``XPENDING`` per id, pipelined.

        Not one range query from the smallest id to the largest: other pending entries between them
        (another consumer's in-flight work, deferred messages) would fill its ``COUNT`` and push the
        later ids out of the reply, and those would be processed as first deliveries, never as poison.
        """
        if not entry_ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
        return {
            as_text(row["message_id"]): int(row["times_delivered"])
            for rows in await pipe.execute()
            for row in rows
        }

    async def _dispatch(
        self, entries: Sequence[tuple[Any, Mapping[Any, Any]]], deliveries: dict[str, int]
    ) -> None:
        envelopes = [
            decode_entry(eid, fields, destination=self.stream, delivery_count=deliveries.get(as_text(eid), 1))
            for eid, fields in entries
        ]
        claims: list[ClaimResult | None]
        try:
            claims = list(await self.layer.deduplication_manager.claim_many([e.id for e in envelopes]))
        except Exception as exc:  # the layer claims one by one and applies the store-failure policy
            log.warning("batch dedup claim failed (%r); falling back to per-message claims", exc)
            claims = [None] * len(envelopes)
        for env, claim in zip(envelopes, claims, strict=True):
            await self._semaphore.acquire()
            previous = self._key_tails.get(env.key) if (self.ordered_by_key and env.key) else None
            task = asyncio.create_task(self._handle(env, claim, previous))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            # released by a callback, not in _handle: a task cancelled before it starts runs no finally
            task.add_done_callback(self._release_slot)
            if self.ordered_by_key and env.key:
                self._key_tails[env.key] = task
                task.add_done_callback(functools.partial(self._forget_tail, env.key))

    def _release_slot(self, _task: asyncio.Task[None]) -> None:
        self._semaphore.release()

    def _forget_tail(self, key: str, task: asyncio.Task[None]) -> None:
        if self._key_tails.get(key) is task:
            del self._key_tails[key]

    async def _handle(
        self, env: Envelope, claim: ClaimResult | None, previous: asyncio.Task[None] | None
    ) -> None:
        if previous is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(previous)
        result = await self.layer.process(env, self.handler, claim=claim)
        await self._acknowledge(env, result)

    async def _acknowledge(self, env: Envelope, result: ProcessResult) -> None:
        outcome = result.outcome.value
        self.stats.outcomes[outcome] = self.stats.outcomes.get(outcome, 0) + 1
        if not result.should_ack:
            self.stats.not_acked += 1
            if _not_attempted(result):
                await self._give_back_delivery(env)
            return
        self._acks.append(env.source_ref)
        if self._ack_task is None:
            self._ack_task = asyncio.get_running_loop().create_task(self._send_acks())

    async def _send_acks(self) -> None:
        """XACK what finished, one command for all of it: the entries that finish while one XACK is in
        flight go together in the next (group commit), so a batch costs a round trip, not one each."""
        try:
            while self._acks:
                entry_ids, self._acks = self._acks, []
                try:
                    await self.client.xack(self.stream, self.group, *entry_ids)
                except Exception as exc:  # they stay pending; redeliveries are answered as duplicates
                    self.stats.redis_errors += 1
                    log.warning(
                        "XACK of %d entries failed (%r): they will be redelivered and deduplicated",
                        len(entry_ids),
                        exc,
                    )
                    continue
                self.stats.acked += len(entry_ids)
        finally:
            self._ack_task = None

    async def _give_back_delivery(self, env: Envelope) -> None:
        """Undo the delivery count of an entry whose handler never ran (``XCLAIM … RETRYCOUNT JUSTID``).

        Poison detection reads the count as "attempts that failed". An entry answered ``IN_PROGRESS``
        (another owner's live lease), or deferred because the breaker rejected it or the dedup store
        was unreachable, was not attempted: counted, a long outage or a slow owner would turn healthy
        messages into poison without a single try. The entry stays pending (its idle time restarts).
        """
        try:
            await self.client.xclaim(
                self.stream, self.group, self.consumer, 0, [env.source_ref],
                retrycount=max(env.delivery_count - 1, 0), justid=True,
            )  # fmt: skip
        except Exception as exc:  # only the poison count is off by one; the entry is still pending
            log.debug("could not restore the delivery count of %s: %r", env.source_ref, exc)

    async def _unless_stopped(self, read: Awaitable[Any]) -> Any:
        """The result of ``read``, or ``None`` if :meth:`stop` comes first (``read`` is then cancelled).

        A stop must not wait for a blocking read, above all when Redis does not answer (frozen, or
        partitioned away) and the read would last the socket timeout. Entries that Redis delivered to a
        cancelled read are in this consumer's pending list, unprocessed and unacknowledged: another
        consumer takes them over after ``claim_idle_ms``.
        """
        task = asyncio.ensure_future(read)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            stopped.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.wait((task,))
        if not task.cancelled():
            task.exception()  # a read that failed as it was cancelled no longer matters
        return None

    async def _wait_for_capacity(self) -> None:
        if len(self._inflight) < self.concurrency:
            return
        await asyncio.wait(set(self._inflight), return_when=asyncio.FIRST_COMPLETED)

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    async def _drain(self) -> None:
        await self._drain_inflight()
        if self._ack_task is not None:  # the acknowledgements of what finished
            await asyncio.wait((self._ack_task,), timeout=_RELEASE_GRACE_S)

    async def _drain_inflight(self) -> None:
        if not self._inflight:
            return
        _done, pending = await asyncio.wait(set(self._inflight), timeout=self.shutdown_timeout)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("shutdown: abandoned %d in-flight messages (not acknowledged)", len(pending))
            # Cancelled messages release their claims: one round trip, unless Redis does not answer.
            # Then their leases simply expire and the redeliveries are counted takeovers.
            _released, stuck = await asyncio.wait(pending, timeout=_RELEASE_GRACE_S)
            if stuck:
                log.warning("shutdown: %d claims not released in time; their leases will expire", len(stuck))

    # --- metrics and health -------------------------------------------------------------------
    async def refresh_lag(self) -> None:
        """Read the group's lag (Redis ≥ 7) and pending count for the gauges and health; refresh the
        dead-letter depth cache so the gauge counts other processes' writes too."""
        store = self.layer.dead_letter_store
        if isinstance(store, DepthRefreshing):
            try:
                await store.refresh_depths()
            except Exception as exc:
                log.debug("refreshing DLQ depths failed: %r", exc)
        try:
            groups = await self.client.xinfo_groups(self.stream)
        except Exception as exc:
            log.debug("XINFO GROUPS failed: %r", exc)
            return
        for info in groups:
            if as_text(info.get("name")) == self.group:
                lag = info.get("lag")
                self._lag = int(lag) if lag is not None else None
                self._pending = int(info.get("pending", 0))

    def _gauge_values(self) -> list[tuple[str, int, Mapping[str, Any]]]:
        values: list[tuple[str, int, Mapping[str, Any]]] = []
        if self._lag is not None:
            values.append((n.METRIC_CONSUMER_LAG, self._lag, self._attrs))
        if self._pending is not None:
            values.append((n.METRIC_CONSUMER_PENDING, self._pending, self._attrs))
        return values

    async def health(self) -> Health:
        """Readiness: breakers, dedup/DLQ stores reachable, DLQ depth, lag."""
        breakers = self.layer.breakers.states()
        redis_ok = True
        try:
            await self.client.ping()
        except Exception:
            redis_ok = False
        dlq_ok, depth = True, None
        try:
            depth = await self.layer.dead_letter_store.count()
        except Exception:
            dlq_ok = False
        await self.refresh_lag()
        reasons = []
        if not redis_ok:
            reasons.append("redis unreachable")
        if not dlq_ok:
            reasons.append("dead-letter store unreachable")
        if any(state == "open" for state in breakers.values()):
            reasons.append("circuit breaker open")
        return Health(
            ready=not reasons,
            breakers=breakers,
            redis_ok=redis_ok,
            dlq_ok=dlq_ok,
            dlq_depth=depth,
            lag=self._lag,
            pending=self._pending,
            reason="; ".join(reasons),
        )


def _not_attempted(result: ProcessResult) -> bool:
    """Whether an unacknowledged result left the handler unrun (see ``_give_back_delivery``)."""
    if result.outcome is Outcome.IN_PROGRESS:
        return True
    if result.outcome is not Outcome.DEFERRED:
        return False
    if isinstance(result.error, DeduplicationUnavailableError):
        return True
    # rejected at the first admission: the layer reports attempts=1 with no attempt made; a later
    # rejection (attempts >= 2) came after real, failed attempts, which do count
    return isinstance(result.error, CircuitOpenError) and result.attempts <= 1


def _is_redis_error(exc: BaseException) -> bool:
    import redis.exceptions

    return isinstance(exc, redis.exceptions.RedisError | ConnectionError | OSError)


class HealthServer:
    """A tiny HTTP endpoint for orchestrator probes, on loopback by default.

    ``GET /healthz`` answers 200 while the process serves; ``GET /readyz`` answers 200 when
    :meth:`RedisStreamConsumer.health` is ready and 503 otherwise, with the facts as JSON.
    """

    def __init__(self, consumer: RedisStreamConsumer, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.consumer = consumer
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Start serving; returns the bound port."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            body: dict[str, Any]
            if path == "/healthz":
                code, body = 200, {"status": "ok"}
            elif path == "/readyz":
                health = await self.consumer.health()
                code = 200 if health.ready else 503
                body = {
                    "ready": health.ready,
                    "reason": health.reason,
                    "breakers": health.breakers,
                    "redis_ok": health.redis_ok,
                    "dlq_ok": health.dlq_ok,
                    "dlq_depth": health.dlq_depth,
                    "lag": health.lag,
                    "pending": health.pending,
                }
            else:
                code, body = 404, {"error": "not found"}
            data = json.dumps(body).encode()
            reason = {200: "OK", 503: "Service Unavailable", 404: "Not Found"}[code]
            writer.write(
                f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
