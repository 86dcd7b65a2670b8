"""Kafka transport (aiokafka): ``KafkaConsumerRunner`` (the core of ``_core.py`` on a consumer group),
``KafkaTransport``, ``OffsetTracker``, ``TopicProducer`` and ``decode_record``.

* read: ``consumer.getmany(max_records=n, timeout_ms=poll_timeout_ms)`` with ``n`` at most the free
  slots, after the records given back earlier whose redelivery is due;
* reclaim: nothing to take over (a dead member's partitions come back through a rebalance and are read
  again from their committed offsets); it reports the records skipped as undecodable as lost;
* ack: mark the offsets complete, then commit per partition the highest *contiguous* completed offset
  + 1 (:class:`OffsetTracker`), one ``commit`` call per ack batch, for partitions still assigned;
* give back: keep the record here and hand it out again from ``read()`` after a back-off; its offset
  stays open, so the partition's commit stops below it until it is acknowledged.

**Order after a give-back is not preserved** (as with Redis Streams, where a reclaimed entry comes
after newer ones): the record runs again after the records read behind it, in its order key's chain at
that time. Seeking back instead would keep the order but replay every record behind the gap, each one
a duplicate round trip to the dedup store, and stall the partition behind one message that another
member still holds (``IN_PROGRESS``).

**Retry topics** (``retry_delays``, Spring Kafka's non-blocking retries). Giving a record back holds
its partition's commit until it runs again: right for short waits (the layer's in-process retries,
then the local redeliveries above), wrong for long ones. With ``retry_delays=(d0, d1, ...)`` a record
whose handler ran and failed retriably (the layer's ``DEFERRED`` after its retries ran out; set
``exhausted_transient_action="defer"``) is instead copied to ``{topic}.retry.0`` with a due time of now
+ ``d0``, then from there to ``{topic}.retry.1`` and so on; the last retry topic takes its own failures
again. The original offset settles (and commits) once the broker confirmed the copy (``acks=all``); a
copy that fails is held and redelivered here instead. The copy keeps the record's key, value and
headers, carries the message id as the id header (one dedup record for every copy, so the attempt
count that makes it poison counts across topics; ``poison_max_deliveries`` ends the cycle in the DLQ),
and ``streamwarden.original.*`` / ``streamwarden.retry.*`` headers: where it came from, when it is due,
its delivery count and the error's type (never its message). The member subscribes to the retry topics
too (created when missing, with the topic's partition count). A retry-topic record that is not due yet
pauses its partition at that offset until it is (the records behind it are due later: one topic, one
delay); a due time beyond now + that topic's delay (a skewed clock, a forged header) counts as now +
the delay. Retry records run as messages of ``topic``: the same dedup scope, DLQ and metrics (their
source the original record). Partition lag covers ``topic`` only: records waiting in a retry topic are
scheduled, not late.

**Commits** never pass an open offset: a record read and not acknowledged (in flight, given back,
waiting for its redelivery) holds its partition's commit. Offsets need not be consecutive (compaction,
transaction markers): "contiguous" means contiguous among the records read. Acknowledgements of a
partition this member no longer owns (revoked, or reassigned since: each assignment has an ``epoch``
the refs carry) are dropped, never committed: the new owner's copy is the one that counts.

**Rebalances** (aiokafka rebalances eagerly: every member gives up all its partitions, then gets its
new share) go through a ``ConsumerRebalanceListener``. On revoke the transport stops handing out the
revoked partitions' held records, waits up to ``revoke_timeout`` seconds for their records in flight
to settle, commits what is contiguous and forgets the partitions. Keep ``revoke_timeout`` below the
group's rebalance timeout (aiokafka's ``rebalance_timeout_ms``, by default the session timeout) or
the member is dropped from the new generation. A message still running after ``revoke_timeout`` is not
committed; the new owner reads it again and its dedup claim answers ``IN_PROGRESS`` (given back, tried
again later) or, once the first run completed, ``duplicate``: a takeover or duplicate is always
counted, never an uncounted second run (with a dedup store the members share: Redis).

**Backpressure.** While the layer's breaker is open the core calls :meth:`KafkaTransport.pause`: the
assigned partitions are paused (``consumer.pause``) and a keep-alive poll runs so the member stays in
the group: aiokafka heartbeats from a background task, but it leaves the group when ``getmany`` was not
called for ``max_poll_interval_ms`` (default 300 s). The core does not read either while all its slots
are busy: handlers that can run longer than ``max_poll_interval_ms`` need a larger one
(``consumer_options``).

**Messages** (:func:`decode_record`): id from a header (``id_header``, default ``message_id``), else
the record key, else ``"{topic}/{partition}/{offset}"`` (then only redeliveries deduplicate); payload
the JSON value of the record value, else its text; headers as text; trace context from the
``traceparent`` / ``tracestate`` headers. Nothing a record holds makes decoding raise. Records of the
types aiokafka hands out (``bytes`` key and value, headers as ``(str, bytes)`` pairs) take a shorter
path to the same envelope (``_decode_usual``), with the texts a partition's records share (and their
order key's prefix) made once per fetch; any other record goes through :func:`decode_record`. A record
that aiokafka itself cannot decode (a header name that is not UTF-8, a corrupt batch) would make every
poll raise; the transport isolates it, skips it, logs it and counts it as lost
(:meth:`KafkaTransport._isolate`): the partition goes on.

**Ordering** (:class:`KafkaOrdering`): ``partition`` runs a partition's records one after another,
``key`` (the default) those of one key in one partition (a record without a key orders by partition),
``unordered`` runs them as they come, ``concurrency`` at a time.

Tested against Tansu 0.6 (tests/kafka); the idempotent producer is not used (Tansu refuses
``InitProducerId``), so :class:`TopicProducer` expects a producer with ``enable_idempotence=False``
there (a real Kafka takes either).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import heapq
import itertools
import json
import logging
import math
import os
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import propagate

from .. import _names as n
from .._envelope import Envelope
from .._exceptions import ConfigurationError
from .._layer import ReliabilityLayer
from .._redis._wire import as_text
from .._retry import Backoff, ExponentialBackoff
from .._telemetry import Telemetry, telemetry_for
from .._types import Clock, Processor, Sleep
from ._core import (
    Backlog,
    ConsumerRunner,
    Delivery,
    ErrorKind,
    Reclaimed,
    _positive_int,
    _seconds,
)
from ._redis_streams import _decode_payload

try:
    import aiokafka
    import aiokafka.errors as _kerr
except ImportError as exc:  # pragma: no cover - the optional dependency
    raise ImportError("the Kafka transport needs aiokafka: pip install 'streamwarden[kafka]'") from exc

from .._kafka._admin import (
    MAX_TOPIC_CHARS,
    TOPIC_NAME,
    TopicCreationError,
    create_missing_topics,
)

__all__ = [
    "KafkaConsumerRunner",
    "KafkaOrdering",
    "KafkaRef",
    "KafkaTransport",
    "OffsetTracker",
    "TopicProducer",
    "decode_record",
]

log = logging.getLogger("streamwarden.runner")

MESSAGING_SYSTEM_KAFKA = n.MESSAGING_SYSTEM_KAFKA
METRIC_CONSUMER_PARTITION_LAG = n.METRIC_CONSUMER_PARTITION_LAG
ATTR_PARTITION = n.ATTR_MESSAGING_PARTITION
DEFAULT_ID_HEADER = "message_id"
HEADER_TRACEPARENT = "traceparent"
HEADER_TRACESTATE = "tracestate"

# Bound on each broker round trip backlog() makes: the core refreshes the lag from its loop.
_BACKLOG_S = 2.0
# Records the client cannot decode (a header name that is not UTF-8, a corrupt batch): aiokafka raises
# from getmany, every time, for the whole fetch. See KafkaTransport._isolate.
_UNDECODABLE: tuple[type[BaseException], ...] = (UnicodeError, _kerr.CorruptRecordException)
# Bound on the undecodable records one isolation pass skips.
_MAX_SKIPS = 100

# Retry topics (KafkaTransport.reroute): headers of the copy, and bounds on the configuration.
HEADER_RETRY_DUE = "streamwarden.retry.due_ms"
HEADER_RETRY_DELIVERY_COUNT = "streamwarden.retry.delivery_count"
HEADER_RETRY_ERROR_TYPE = "streamwarden.retry.error.type"
HEADER_ORIGINAL_TOPIC = "streamwarden.original.topic"
HEADER_ORIGINAL_PARTITION = "streamwarden.original.partition"
HEADER_ORIGINAL_OFFSET = "streamwarden.original.offset"
_RETRY_HEADER_PREFIXES = ("streamwarden.retry.", "streamwarden.original.")
DEFAULT_RETRY_SUFFIX = ".retry"
_MAX_RETRY_TOPICS = 10
_MAX_RETRY_DELAY_S = 7 * 24 * 3600.0
_MAX_ERROR_TYPE_CHARS = 200
_DIGITS = re.compile(r"[0-9]{1,19}")  # an ASCII partition or offset ("²".isdigit() is true)
_COUNT = re.compile(r"[0-9]{1,9}")
# aiokafka options a consumer shares with the producer and admin client the retry topics need.
_SHARED_CLIENT_OPTIONS = frozenset(
    {
        "security_protocol",
        "ssl_context",
        "sasl_mechanism",
        "sasl_plain_username",
        "sasl_plain_password",
        "sasl_kerberos_service_name",
        "sasl_kerberos_domain_name",
        "sasl_oauth_token_provider",
        "api_version",
        "request_timeout_ms",
        "connections_max_idle_ms",
        "metadata_max_age_ms",
    }
)

# Refusals retrying cannot fix: permissions, credentials, a bad name or option, a broker too old.
_CONFIGURATION_ERRORS: tuple[type[BaseException], ...] = (
    _kerr.TopicAuthorizationFailedError,
    _kerr.GroupAuthorizationFailedError,
    _kerr.ClusterAuthorizationFailedError,
    _kerr.TransactionalIdAuthorizationFailed,
    _kerr.SaslAuthenticationFailed,
    _kerr.AuthenticationFailedError,
    _kerr.AuthenticationMethodNotSupported,
    _kerr.UnsupportedSaslMechanismError,
    _kerr.IllegalSaslStateError,
    _kerr.KafkaConfigurationError,
    _kerr.InvalidConfigurationError,
    _kerr.InvalidTopicError,
    _kerr.InvalidGroupIdError,
    _kerr.InvalidSessionTimeoutError,
    _kerr.UnsupportedVersionError,
    _kerr.IncompatibleBrokerVersion,
    _kerr.UnrecognizedBrokerVersion,
    _kerr.UnsupportedCodecError,
    _kerr.NoOffsetForPartitionError,
    _kerr.SecurityDisabled,
    _kerr.IllegalOperation,
    TopicCreationError,  # a retry topic the broker will not create (policy, permission)
)
_AUTH_ERRORS: tuple[type[BaseException], ...] = (
    _kerr.TopicAuthorizationFailedError,
    _kerr.GroupAuthorizationFailedError,
    _kerr.ClusterAuthorizationFailedError,
    _kerr.TransactionalIdAuthorizationFailed,
    _kerr.SaslAuthenticationFailed,
    _kerr.AuthenticationFailedError,
    _kerr.AuthenticationMethodNotSupported,
    _kerr.UnsupportedSaslMechanismError,
    _kerr.IllegalSaslStateError,
)


class KafkaOrdering(enum.StrEnum):
    """Which records of a topic run one after another (:attr:`Delivery.order_key`)."""

    PARTITION = "partition"  # a partition's records in offset order
    KEY = "key"  # one key's records of a partition in offset order; keyless records by partition
    UNORDERED = "unordered"  # no order: concurrency only


class KafkaRef(NamedTuple):
    """A record as the core refers to it: where it is, and the assignment (``epoch``) it was read in."""

    topic: str
    partition: int
    offset: int
    epoch: int


# --- offsets --------------------------------------------------------------------------------------------
class OffsetTracker:
    """The offsets of one partition between its commit point and the last record read.

    Pure bookkeeping (no I/O, no clock). Records are :meth:`read` in ascending offset order; each is
    then *open* until :meth:`done` (acknowledged). An open record is *busy* (handed to the runner) or
    *held* (given back, waiting for its redelivery: :meth:`hold`, :meth:`retry`). :attr:`commit_point`
    is the offset to commit: the lowest open offset, or the one after the last read when none is open.
    It never passes an open offset, whatever order the records finish in.
    """

    __slots__ = ("_committed", "_done", "_held", "_next", "_open", "_order")

    def __init__(self, start: int) -> None:
        """``start``: the offset the partition is read from, taken as committed already."""
        self._order: deque[int] = deque()  # read and not yet passed by the commit point, ascending
        self._open: set[int] = set()
        self._done: set[int] = set()  # done, but behind an open offset
        self._held: set[int] = set()
        self._next = start
        self._committed = start

    def read(self, offset: int) -> None:
        """Record ``offset`` as read and busy; offsets must ascend (``ValueError`` otherwise)."""
        if offset < self._next:
            raise ValueError(f"offset {offset} read after {self._next - 1}: offsets must ascend")
        self._order.append(offset)
        self._open.add(offset)
        self._next = offset + 1

    def done(self, offset: int) -> bool:
        """``offset`` is acknowledged; ``False`` if it was not open (unknown, or done already)."""
        if offset not in self._open:
            return False
        self._open.remove(offset)
        self._held.discard(offset)
        self._done.add(offset)
        order, finished = self._order, self._done
        while order and order[0] in finished:
            finished.remove(order.popleft())
        return True

    def hold(self, offset: int) -> bool:
        """A busy ``offset`` was given back: it waits for its redelivery (still open)."""
        if offset not in self._open or offset in self._held:
            return False
        self._held.add(offset)
        return True

    def retry(self, offset: int) -> bool:
        """A held ``offset`` is handed out again: busy once more."""
        if offset not in self._held:
            return False
        self._held.remove(offset)
        return True

    @property
    def commit_point(self) -> int:
        """The offset a commit may record now: every record below it is done."""
        return self._order[0] if self._order else self._next

    @property
    def committed(self) -> int:
        """The highest offset committed (or the start)."""
        return self._committed

    def committable(self) -> int | None:
        """:attr:`commit_point` when it is past :attr:`committed`, else ``None``."""
        point = self.commit_point
        return point if point > self._committed else None

    def mark_committed(self, offset: int) -> None:
        """A commit of ``offset`` succeeded (commits never go back)."""
        self._committed = max(self._committed, offset)

    @property
    def open(self) -> int:
        """Records read and not acknowledged (busy or held)."""
        return len(self._open)

    @property
    def busy(self) -> int:
        """Records handed to the runner and not settled yet."""
        return len(self._open) - len(self._held)

    @property
    def last_read(self) -> int:
        """The offset after the last record read (the start when none was)."""
        return self._next

    def lowest_open(self) -> int | None:
        """The lowest open offset, ``None`` when none is open."""
        return self._order[0] if self._order else None


# --- records --------------------------------------------------------------------------------------------
def _header_items(headers: Any) -> list[tuple[str, Any]]:
    """``(name, value)`` pairs of a record's headers; anything unreadable reads as no (more) headers."""
    items: list[tuple[str, Any]] = []
    try:
        for header in headers or ():
            try:
                name, value = header
            except (TypeError, ValueError):
                continue
            items.append((as_text(name), value))
    except Exception:  # an iterator that fails halfway: keep what was read
        pass
    return items


def decode_record(
    topic: Any,
    partition: Any,
    offset: Any,
    *,
    key: Any = None,
    value: Any = None,
    headers: Any = (),
    id_header: str = DEFAULT_ID_HEADER,
    delivery_count: int = 1,
) -> Envelope:
    """Turn a Kafka record into an :class:`Envelope`; never raises, whatever the record holds.

    * id: the ``id_header`` header (set by the producer, so producer retries deduplicate), else the
      record key, else ``"{topic}/{partition}/{offset}"`` (then only redeliveries deduplicate);
    * payload: the JSON value of the record value; its text when it is not JSON the parser can take
      (non-UTF-8 bytes are kept as surrogate escapes); ``None`` for a tombstone (no value);
    * headers: every header as text (a repeated name: the last one wins, as Kafka's ``lastHeader``),
      so ``traceparent`` / ``tracestate`` link the process span to the producer's;
    * key: the record key as text (per-key ordering).
    """
    source_ref = f"{as_text(topic)}/{as_text(partition)}/{as_text(offset)}"
    text_headers: dict[str, str] = {}
    for name, raw in _header_items(headers):
        text_headers[name] = "" if raw is None else as_text(raw)
    payload: Any = None if value is None else _decode_payload(as_text(value))
    key_text = as_text(key) if key is not None else ""
    message_id = text_headers.get(id_header, "") or key_text or source_ref
    attributes: dict[str, str | int] = {n.ATTR_MESSAGING_PARTITION: as_text(partition)}
    if type(offset) is int:
        attributes[n.ATTR_KAFKA_OFFSET] = offset
    if key_text:
        attributes[n.ATTR_KAFKA_KEY] = key_text
    return Envelope(
        id=message_id,
        payload=payload,
        headers=text_headers,
        destination=as_text(topic),
        source_ref=source_ref,
        delivery_count=delivery_count,
        key=key_text or None,
        attributes=attributes,
    )


def _decode_usual(
    topic: str,
    partition: str,
    source_prefix: str,
    offset: Any,
    key: Any,
    value: Any,
    headers: Any,
    id_header: str,
) -> Envelope | None:
    """:func:`decode_record` for the types aiokafka hands out, with less work: a ``bytes`` key and value
    (or ``None``), an ``int`` offset, headers a list or tuple of ``(str, bytes)`` pairs. ``topic`` and
    ``partition`` are the texts of the record's partition and ``source_prefix`` is
    ``"{topic}/{partition}/"``, made once per partition by the caller. The same envelope as
    :func:`decode_record`; ``None`` for anything else (the caller then decodes it the general way)."""
    if (
        type(offset) is not int
        or (key is not None and type(key) is not bytes)
        or (value is not None and type(value) is not bytes)
    ):
        return None
    text_headers: dict[str, str] = {}
    if headers:
        if type(headers) is not list and type(headers) is not tuple:
            return None
        for header in headers:
            if type(header) is not tuple or len(header) != 2:
                return None
            name, raw = header
            if type(name) is not str or type(raw) is not bytes:
                return None
            text_headers[name] = raw.decode("utf-8", "surrogateescape")
    key_text = "" if key is None else key.decode("utf-8", "surrogateescape")
    source_ref = source_prefix + str(offset)
    attributes: dict[str, str | int] = {n.ATTR_MESSAGING_PARTITION: partition, n.ATTR_KAFKA_OFFSET: offset}
    if key_text:
        attributes[n.ATTR_KAFKA_KEY] = key_text
    return Envelope(
        id=text_headers.get(id_header, "") or key_text or source_ref,
        payload=None if value is None else _decode_payload(value.decode("utf-8", "surrogateescape")),
        headers=text_headers,
        destination=topic,
        source_ref=source_ref,
        delivery_count=1,
        key=key_text or None,
        attributes=attributes,
    )


class TopicProducer:
    """Writes messages to a topic with an id header, a JSON value and the current trace context.

    ``producer`` is a started ``aiokafka.AIOKafkaProducer`` that the caller owns (and stops).
    """

    def __init__(
        self,
        producer: Any,
        topic: str,
        *,
        id_header: str = DEFAULT_ID_HEADER,
        service_name: str = "streamwarden",
        tracer_provider: Any = None,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.id_header = id_header
        self._telemetry = telemetry_for(service_name, tracer_provider=tracer_provider)

    async def send(
        self,
        payload: Any,
        *,
        message_id: str | None = None,
        key: str | None = None,
        partition: int | None = None,
    ) -> str:
        """Send one message (waiting for the broker's answer) under a PRODUCER ``send {topic}`` span;
        returns ``"{topic}/{partition}/{offset}"``. The span's ``traceparent`` goes with the message as
        a header, so the consumer's process span links to it."""
        if not self._telemetry.tracing_enabled():
            return await self._send(payload, message_id, key, partition)
        with self._telemetry.send_span(self.topic, message_id, MESSAGING_SYSTEM_KAFKA):
            return await self._send(payload, message_id, key, partition)

    async def _send(
        self, payload: Any, message_id: str | None, key: str | None, partition: int | None
    ) -> str:
        headers: list[tuple[str, bytes]] = []
        if message_id is not None:
            headers.append((self.id_header, message_id.encode("utf-8", "surrogateescape")))
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        headers += [
            (k, v.encode()) for k, v in carrier.items() if k in (HEADER_TRACEPARENT, HEADER_TRACESTATE)
        ]
        value = json.dumps(payload, separators=(",", ":")).encode("utf-8", "surrogateescape")
        meta = await self.producer.send_and_wait(
            self.topic,
            value=value,
            key=None if key is None else key.encode("utf-8", "surrogateescape"),
            partition=partition,
            headers=headers or None,
        )
        return f"{meta.topic}/{meta.partition}/{meta.offset}"


# --- the transport --------------------------------------------------------------------------------------
@dataclasses.dataclass(slots=True)
class _Partition:
    """What this member knows of one assigned partition, for one assignment (``epoch``)."""

    epoch: int
    tracker: OffsetTracker


@dataclasses.dataclass(slots=True)
class _Open:
    """A record read and not acknowledged: its delivery (to hand it out again), its timestamp and the
    record itself (copied as it is to a retry topic)."""

    delivery: Delivery
    timestamp_ms: float | None
    record: Any = None


class _Rebalance(aiokafka.ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka's rebalance callbacks, forwarded to the transport."""

    def __init__(self, transport: KafkaTransport) -> None:
        self._transport = transport

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._transport._revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._transport._assigned(assigned)


class KafkaTransport:
    """One member of a Kafka consumer group on one topic, as :class:`~._core.Transport` (see the module
    docstring). Also :class:`~._core.Pausable`.

    The aiokafka consumer is created and started by :meth:`ensure_group` (again after it failed or was
    closed) with ``enable_auto_commit=False``; ``consumer_options`` adds aiokafka keyword arguments
    (security, session, heartbeat and poll timeouts), except those the transport sets itself.
    ``clock`` (monotonic) times the redeliveries, ``wall_clock`` the age of the oldest pending record.
    """

    name = MESSAGING_SYSTEM_KAFKA

    def __init__(
        self,
        *,
        bootstrap_servers: str | Sequence[str],
        topic: str,
        group: str,
        consumer: str,
        ordering: KafkaOrdering | str = KafkaOrdering.KEY,
        id_header: str = DEFAULT_ID_HEADER,
        start_from: str = "earliest",
        poll_timeout_ms: int = 500,
        revoke_timeout: float = 5.0,
        commit_timeout: float = 10.0,
        close_timeout: float = 5.0,
        redeliver_backoff: Backoff | None = None,
        max_held: int = 1000,
        consumer_options: Mapping[str, Any] | None = None,
        retry_delays: Sequence[float] = (),
        retry_topic_suffix: str = DEFAULT_RETRY_SUFFIX,
        create_retry_topics: bool = True,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        for label, value in (
            ("topic", topic),
            ("group", group),
            ("consumer", consumer),
            ("id_header", id_header),
        ):
            if not isinstance(value, str) or not value:
                raise ConfigurationError(f"{label} must be a non-empty string, got {value!r}")
        servers = _servers(bootstrap_servers)
        if not servers:
            raise ConfigurationError(f"bootstrap_servers must name host:port, got {bootstrap_servers!r}")
        try:
            self.ordering = KafkaOrdering(ordering)
        except ValueError:
            choices = ", ".join(o.value for o in KafkaOrdering)
            raise ConfigurationError(f"ordering must be one of {choices}; got {ordering!r}") from None
        if start_from not in ("earliest", "latest"):
            raise ConfigurationError(f"start_from must be 'earliest' or 'latest', got {start_from!r}")
        _positive_int("poll_timeout_ms", poll_timeout_ms, minimum=1, maximum=3_600_000)
        self.revoke_timeout = _seconds("revoke_timeout", revoke_timeout, allow_zero=True)
        self.commit_timeout = _seconds("commit_timeout", commit_timeout)
        self.close_timeout = _seconds("close_timeout", close_timeout)
        self.max_held = _positive_int("max_held", max_held)
        if redeliver_backoff is not None and not isinstance(redeliver_backoff, Backoff):
            raise ConfigurationError(
                f"redeliver_backoff must have reset() and compute(failures), got {type(redeliver_backoff).__name__}"
            )
        options = dict(consumer_options or {})
        reserved = {
            "group_id",
            "enable_auto_commit",
            "bootstrap_servers",
            "auto_offset_reset",
            "client_id",
            "key_deserializer",  # records are decoded by decode_record, from bytes
            "value_deserializer",
        }
        if clash := sorted(reserved & options.keys()):
            raise ConfigurationError(
                f"consumer_options may not set {', '.join(clash)}: the transport sets them"
            )
        self.retry_delays = _retry_delays(retry_delays)
        self.retry_topics = tuple(
            _retry_topic(topic, retry_topic_suffix, i) for i in range(len(self.retry_delays))
        )
        self.create_retry_topics = bool(create_retry_topics)
        self.topics = (topic, *self.retry_topics)
        self._retry_hop = {name: i for i, name in enumerate(self.retry_topics)}
        self.bootstrap_servers = servers
        self.topic = topic
        self.destination = topic
        self.group = group
        self.consumer = consumer
        self.id_header = id_header
        self.start_from = start_from
        self.poll_timeout_ms = poll_timeout_ms
        self.consumer_options = options
        self._redeliver_backoff: Backoff = redeliver_backoff or ExponentialBackoff(base=0.2, cap=5.0)
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._client: Any = None  # the aiokafka consumer, once started
        self._listener = _Rebalance(self)
        self._parts: dict[tuple[str, int], _Partition] = {}
        self._epochs = itertools.count(1)
        self._open: dict[KafkaRef, _Open] = {}
        self._held: list[tuple[float, int, KafkaRef]] = []  # heap of (due, sequence, ref)
        self._sequence = itertools.count()
        self._revoking: set[tuple[str, int]] = set()
        self._settled = asyncio.Event()  # set whenever an open record settles or is held
        self._commit_lock = asyncio.Lock()
        self._paused = False
        self._keepalive: asyncio.Task[None] | None = None
        self._ending: asyncio.Task[None] | None = None  # a cancelled keep-alive poll, until it ended
        self._fetch: asyncio.Future[Any] | None = None  # a getmany whose caller was cancelled
        self._dirty: set[tuple[str, int]] = set()  # partitions whose last commit failed
        self._skipped: list[str] = []  # undecodable records skipped, until reclaim() reports them
        self._lags: dict[str, int] = {}
        self.rebalances = 0
        # retry topics: partitions paused until their next record is due (wall-clock seconds), the
        # copies in flight, the producer that writes them, and who hears of each copy's fate
        self._waiting: dict[tuple[str, int], float] = {}
        # the due time settled for a retry partition's next record (offset, due), so that a record whose
        # due time was cut to now + delay is not cut again, later, when it is read again
        self._due_at: dict[tuple[str, int], tuple[int, float]] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._producer: Any = None
        self._producer_lock = asyncio.Lock()
        self.on_reroute: Callable[[str, str], None] | None = None
        self.telemetry: Telemetry | None = None  # the runner's: a span around each retry-topic copy

    # --- the group --------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The aiokafka consumer (``None`` before :meth:`ensure_group` or after :meth:`close`)."""
        return self._client

    async def ensure_group(self) -> None:
        """Start the consumer and join the group (the group coordinator creates the group); nothing once
        started. A consumer that fails to start is closed, and the next call starts a new one."""
        if self._client is not None:
            return
        client = aiokafka.AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=self.group,
            client_id=self.consumer,
            enable_auto_commit=False,
            auto_offset_reset=self.start_from,
            **self.consumer_options,
        )
        if self.retry_topics and self.create_retry_topics:
            await self._ensure_retry_topics()
        client.subscribe(list(self.topics), listener=self._listener)
        try:
            await client.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.stop(), timeout=self.close_timeout)
            raise
        self._client = client
        if self._paused:
            self.pause()

    async def close(self) -> None:
        """Commit what is contiguous (bounded by ``commit_timeout``), then stop the consumer (bounded by
        ``close_timeout``); open records are forgotten, uncommitted.

        aiokafka sends ``LeaveGroup`` here (when the group's generation is above 0), so the others
        rebalance at once rather than after the session timeout.
        """
        await self._end_keepalive()
        await self._end_sending()
        if self._client is not None and self._parts:
            try:
                await self._commit(set(self._parts))
            except Exception as exc:
                log.warning("consumer %s: the last commit failed: %r", self.consumer, exc)
        client, self._client = self._client, None
        self._fetch = None
        self._forget(set(self._parts))
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), timeout=self.close_timeout)
            except (Exception, TimeoutError) as exc:
                log.warning("closing the retry-topic producer of %s failed: %r", self.consumer, exc)
        if client is None:
            return
        try:
            await asyncio.wait_for(client.stop(), timeout=self.close_timeout)
        except (Exception, TimeoutError) as exc:
            log.warning("closing the Kafka consumer %s failed: %r", self.consumer, exc)

    def _assigned(self, assigned: Iterable[Any]) -> None:
        """New assignment: partitions get trackers at their first record (from its offset)."""
        self.rebalances += 1
        log.info("consumer %s assigned %s", self.consumer, _describe(assigned))
        if self._paused:
            self._pause_assigned()

    async def _revoked(self, revoked: Iterable[Any]) -> None:
        """Stop handing out the revoked partitions' held records, let their busy records settle
        (``revoke_timeout``), commit what is contiguous, forget them."""
        gone = {(tp.topic, tp.partition) for tp in revoked if tp.topic in self.topics}
        if not gone:
            return
        self._revoking |= gone
        try:
            deadline = asyncio.get_running_loop().time() + self.revoke_timeout
            while busy := sum(p.tracker.busy for tp, p in self._parts.items() if tp in gone):
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    log.warning(
                        "consumer %s: %d records of revoked partitions still running after %.1fs; "
                        "not committed (the new owner's dedup claim sees them)",
                        self.consumer,
                        busy,
                        self.revoke_timeout,
                    )
                    break
                self._settled.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._settled.wait(), timeout=remaining)
            try:
                await self._commit(gone)
            except Exception as exc:  # the rebalance goes on: the new owner dedups what was not committed
                log.warning("consumer %s: commit on revoke failed: %r", self.consumer, exc)
        finally:
            self._forget(gone)
            self._revoking -= gone

    def _forget(self, partitions: set[tuple[str, int]]) -> None:
        for tp in partitions:
            self._parts.pop(tp, None)
            self._dirty.discard(tp)
            self._waiting.pop(tp, None)
            self._due_at.pop(tp, None)
        if not partitions:
            return
        self._open = {r: o for r, o in self._open.items() if (r.topic, r.partition) not in partitions}
        self._held = [h for h in self._held if (h[2].topic, h[2].partition) not in partitions]
        heapq.heapify(self._held)
        self._settled.set()

    # --- reading ----------------------------------------------------------------------------------
    def _live(self, ref: Hashable) -> _Partition | None:
        """The partition state ``ref`` belongs to, if this member still owns it in the same assignment."""
        if not isinstance(ref, KafkaRef):
            return None
        part = self._parts.get((ref.topic, ref.partition))
        return part if part is not None and part.epoch == ref.epoch else None

    def _register(self, records: Mapping[Any, Sequence[Any]]) -> list[Delivery]:
        """Track the records ``getmany`` returned; their deliveries, in the order read."""
        out: list[Delivery] = []
        wall_now: float | None = None
        id_header = self.id_header
        by_key = self.ordering is KafkaOrdering.KEY
        for tp, batch in records.items():
            key = (tp.topic, tp.partition)
            hop = self._retry_hop.get(tp.topic) if self._retry_hop else None
            part = self._parts.get(key)
            # once per partition: the texts every record of it shares (envelope, order key)
            topic_text, partition_text = as_text(tp.topic), as_text(tp.partition)
            source_prefix = f"{topic_text}/{partition_text}/"
            # the order key: the partition's, or (ordering by key) the partition's and the record key's
            order_prefix = None if self.ordering is KafkaOrdering.UNORDERED else f"{tp.topic}/{tp.partition}"
            for record in batch:
                offset = record.offset
                if hop is not None:
                    if wall_now is None:
                        wall_now = self._wall_clock()
                    settled = self._due_at.get(key)
                    if settled is not None and settled[0] == offset:
                        due = settled[1]
                    else:
                        due = self._due(record, hop, wall_now)
                    if due > wall_now:  # this record and the ones behind it: read again once due
                        self._due_at[key] = (offset, due)
                        self._wait_until(tp, offset, due)
                        break
                    self._due_at.pop(key, None)
                if part is None or offset < part.tracker.last_read:
                    if part is not None:  # the position moved back (an offset reset): start over
                        log.warning("consumer %s: %s/%s went back to offset %s", self.consumer, *key, offset)
                        self._forget({key})
                    part = self._parts[key] = _Partition(next(self._epochs), OffsetTracker(offset))
                part.tracker.read(offset)
                try:
                    env = _decode_usual(
                        topic_text,
                        partition_text,
                        source_prefix,
                        offset,
                        record.key,
                        record.value,
                        record.headers,
                        id_header,
                    )
                except Exception:  # whatever the record holds, decode_record copes with it
                    env = None
                if env is None:
                    env = decode_record(
                        tp.topic,
                        tp.partition,
                        offset,
                        key=record.key,
                        value=record.value,
                        headers=record.headers,
                        id_header=id_header,
                    )
                if hop is not None:
                    env = self._retried(env)
                ref = KafkaRef(tp.topic, tp.partition, offset, part.epoch)
                order_key = f"{order_prefix}/{env.key}" if by_key and env.key is not None else order_prefix
                delivery = Delivery(ref=ref, envelope=env, order_key=order_key)
                timestamp = record.timestamp if isinstance(record.timestamp, int | float) else None
                self._open[ref] = _Open(delivery, timestamp, record)
                out.append(delivery)
        return out

    def _take_due(self, limit: int) -> list[Delivery]:
        """Held records whose redelivery is due, at most ``limit``, oldest due first."""
        out: list[Delivery] = []
        now = self._clock()
        while self._held and len(out) < limit and self._held[0][0] <= now:
            _due, _seq, ref = heapq.heappop(self._held)
            part = self._live(ref)
            entry = self._open.get(ref)
            if part is None or entry is None or (ref.topic, ref.partition) in self._revoking:
                continue
            if part.tracker.retry(ref.offset):
                out.append(entry.delivery)
        return out

    async def read(self, max_count: int) -> Sequence[Delivery]:
        """Held records that are due, then ``getmany``: at most ``max_count`` in all. Waits up to
        ``poll_timeout_ms`` (less when a held record falls due sooner) when nothing is ready; reads no
        new records while ``max_held`` records wait for their redelivery or their retry-topic copy.
        Retries a failed commit first."""
        await self._end_keepalive()
        await self._settle_leftover()  # its records are held, due now: handed out below
        if self._client is None:
            raise _kerr.KafkaConnectionError("the Kafka consumer is not started")
        if self._dirty:
            try:
                await self._commit(set(self._dirty))
            except Exception as exc:  # kept dirty: tried again at the next read
                log.debug("consumer %s: commit retry failed: %r", self.consumer, exc)
        out = self._take_due(max_count)
        wait_s = self.poll_timeout_ms / 1000
        if self._held:
            wait_s = max(0.0, min(wait_s, self._held[0][0] - self._clock()))
        if self._waiting:
            wait_s = max(0.0, min(wait_s, self._resume_due()))
        # records waiting here for a redelivery or for their retry-topic copy to be confirmed
        if len(out) < max_count and len(self._held) + len(self._sending) < self.max_held:
            out += await self._poll(0 if out else int(wait_s * 1000), max_count - len(out))
        elif not out:
            await self._sleep(wait_s)
            out = self._take_due(max_count)
        return out

    async def _poll(self, timeout_ms: int, max_records: int | None = None) -> list[Delivery]:
        """``getmany``, safe to cancel: records it returns after its caller was cancelled are not lost
        (their offsets would otherwise be skipped by the next commit): they are tracked and held, due
        at once. Never two ``getmany`` at a time: a poll first waits for the one a cancelled caller left."""
        await self._settle_leftover()
        client = self._client
        if client is None:
            raise _kerr.KafkaConnectionError("the Kafka consumer is not started")
        fetch = asyncio.ensure_future(client.getmany(timeout_ms=timeout_ms, max_records=max_records))
        try:
            records = await asyncio.shield(fetch)
        except asyncio.CancelledError:
            self._fetch = fetch
            fetch.add_done_callback(functools.partial(self._fetched_late, client))
            raise
        except _kerr.ConsumerStoppedError:  # closed underneath: the next ensure_group starts a new one
            self._client = None
            self._forget(set(self._parts))
            raise
        except _UNDECODABLE as exc:
            log.warning("consumer %s: a fetch held a record the client cannot decode: %r", self.consumer, exc)
            return await self._isolate(client, max_records or 1)
        return self._register(records)

    async def _isolate(self, client: Any, max_records: int) -> list[Delivery]:
        """Find and skip the records that make ``getmany`` raise (:data:`_UNDECODABLE`).

        aiokafka raises for a whole fetch when one record cannot be decoded (a header name that is not
        UTF-8, a batch whose CRC does not match) and raises again at every poll: one hostile record
        would stop every partition for good. Here each partition with records to read is polled one
        record at a time; a record that raises is at the partition's position, so the partition seeks
        past it. A skipped record cannot be handled or dead-lettered (it cannot be read): it is logged
        and reported as lost (``streamwarden.consumer.lost``, by :meth:`reclaim`), and the commit passes
        it like an offset that compaction removed.
        """
        out: list[Delivery] = []
        skipped = 0
        paused = set(client.paused())
        for tp in sorted(client.assignment()):
            if tp in paused or tp.topic not in self.topics:
                continue
            while len(out) < max_records and skipped < _MAX_SKIPS:
                position = await asyncio.wait_for(client.position(tp), timeout=_BACKLOG_S)
                end = client.highwater(tp)
                if end is not None and position >= end:
                    break
                try:
                    records = await client.getmany(tp, timeout_ms=self.poll_timeout_ms, max_records=1)
                except _UNDECODABLE as exc:
                    client.seek(tp, position + 1)
                    skipped += 1
                    ref = f"{tp.topic}/{tp.partition}/{position}"
                    self._skipped.append(ref)
                    log.error(
                        "consumer %s: skipped record %s: the client cannot decode it (%r); it is not handled",
                        self.consumer,
                        ref,
                        exc,
                    )
                    continue
                if not records:
                    break
                out += self._register(records)
        return out

    async def _settle_leftover(self) -> None:
        """Wait for the ``getmany`` a cancelled poll left running (its callback holds its records)."""
        leftover = self._fetch
        if leftover is not None:
            await asyncio.wait((leftover,))
            if self._fetch is leftover:
                self._fetch = None

    def _fetched_late(self, client: Any, fetch: asyncio.Future[Any]) -> None:
        if fetch.cancelled() or fetch.exception() is not None or client is not self._client:
            return
        self._hold_now(self._register(fetch.result()))

    def _hold_now(self, deliveries: Iterable[Delivery]) -> None:
        """Tracked deliveries nobody will run now: held, due at once (handed out by the next read)."""
        now = self._clock()
        for delivery in deliveries:
            ref = delivery.ref
            part = self._live(ref)
            if part is not None and isinstance(ref, KafkaRef) and part.tracker.hold(ref.offset):
                heapq.heappush(self._held, (now, next(self._sequence), ref))

    async def reclaim(self, max_count: int) -> Reclaimed:
        """Nothing to take over: a dead member's partitions come back through a rebalance. Reports the
        undecodable records skipped since the last call as lost (see :meth:`_isolate`)."""
        skipped, self._skipped = self._skipped, []
        return Reclaimed((), skipped)

    # --- settling ---------------------------------------------------------------------------------
    async def ack(self, refs: Sequence[Hashable]) -> None:
        """Mark ``refs`` done and commit, in one call, each touched partition's contiguous offset.

        Refs of partitions no longer owned are dropped. A commit the group refuses because it
        rebalanced meanwhile (``CommitFailedError``) is logged, not raised: the new owner reads those
        records again and the dedup store answers them as duplicates.
        """
        touched: set[tuple[str, int]] = set()
        for ref in refs:
            part = self._live(ref)
            if part is None:
                continue
            assert isinstance(ref, KafkaRef)
            if part.tracker.done(ref.offset):
                self._open.pop(ref, None)
            # touched even when done already: the core calls ack again after a failed commit
            touched.add((ref.topic, ref.partition))
        if touched:
            self._settled.set()
            await self._commit(touched)

    def give_back(self, refs: Sequence[Hashable]) -> None:
        """Hold ``refs`` for redelivery after a back-off; their offsets keep holding the commit."""
        now = self._clock()
        for ref in refs:
            part = self._live(ref)
            entry = self._open.get(ref) if isinstance(ref, KafkaRef) else None
            if part is None or entry is None:
                continue
            assert isinstance(ref, KafkaRef)
            if not part.tracker.hold(ref.offset):
                continue
            env = entry.delivery.envelope
            delay = self._redeliver_backoff.compute(env.delivery_count)
            entry.delivery = dataclasses.replace(
                entry.delivery, envelope=dataclasses.replace(env, delivery_count=env.delivery_count + 1)
            )
            heapq.heappush(self._held, (now + delay, next(self._sequence), ref))
        self._settled.set()

    # --- retry topics ---------------------------------------------------------------------------
    def reroute(self, ref: Hashable, error: BaseException | None) -> bool:
        """:class:`~._core.Rerouting`: copy a record whose handler failed retriably to the next retry
        topic, with a due time; ``False`` (give it back instead) without retry topics, or when ``ref``
        is no longer this member's. Its offset stays open until the copy is confirmed (``acks=all``),
        then settles like an acknowledgement; a copy that fails is held here for a local redelivery."""
        if not self.retry_topics or not isinstance(ref, KafkaRef) or self._client is None:
            return False
        part = self._live(ref)
        entry = self._open.get(ref)
        if (
            part is None
            or entry is None
            or entry.record is None
            or (ref.topic, ref.partition) in self._revoking
        ):
            return False
        hop = self._retry_hop.get(ref.topic)
        target = 0 if hop is None else min(hop + 1, len(self.retry_topics) - 1)
        task = asyncio.get_running_loop().create_task(self._send_retry(ref, entry, target, error))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        return True

    async def _send_retry(self, ref: KafkaRef, entry: _Open, hop: int, error: BaseException | None) -> None:
        topic = self.retry_topics[hop]
        try:
            key, value, headers = self._retry_copy(entry, hop, error)
            async with asyncio.timeout(self.commit_timeout):
                producer = await self._producer_ready()
                telemetry = self.telemetry
                if telemetry is None or not telemetry.tracing_enabled():
                    await producer.send_and_wait(topic, value, key=key, headers=headers)
                else:
                    await self._send_traced(telemetry, producer, topic, entry, key, value, headers)
        except asyncio.CancelledError:  # close(): not confirmed, so not settled: read again later
            raise
        except Exception as exc:
            log.warning(
                "consumer %s: copying %s/%s/%s to retry topic %s failed (%r); redelivering it here",
                self.consumer,
                ref.topic,
                ref.partition,
                ref.offset,
                topic,
                exc,
            )
            self._report(topic, "send_failed")
            self.give_back((ref,))
            return
        self._report(topic, "sent")
        try:
            await self.ack((ref,))
        except Exception as exc:  # the partition stays dirty: the next read commits it
            log.debug("consumer %s: commit after a retry-topic copy failed: %r", self.consumer, exc)

    @staticmethod
    async def _send_traced(
        telemetry: Telemetry,
        producer: Any,
        topic: str,
        entry: _Open,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | None]],
    ) -> None:
        """Send the copy under a PRODUCER ``send {retry topic}`` span in the record's own trace (its
        ``traceparent``), and give the copy that span's context: its next run links to it, so the
        trace shows each hop."""
        token = otel_context.attach(propagate.extract(entry.delivery.envelope.headers))
        try:
            with telemetry.send_span(topic, entry.delivery.envelope.id, MESSAGING_SYSTEM_KAFKA):
                carrier: dict[str, str] = {}
                propagate.inject(carrier)
                traced = [(k, v) for k, v in headers if k not in (HEADER_TRACEPARENT, HEADER_TRACESTATE)]
                traced += [
                    (k, v.encode())
                    for k, v in carrier.items()
                    if k in (HEADER_TRACEPARENT, HEADER_TRACESTATE)
                ]
                await producer.send_and_wait(topic, value, key=key, headers=traced)
        finally:
            otel_context.detach(token)

    def _report(self, topic: str, result: str) -> None:
        hook = self.on_reroute
        if hook is not None:
            try:
                hook(topic, result)
            except Exception as exc:  # telemetry must not decide a message's fate
                log.debug("retry-topic report failed: %r", exc)

    def _retry_copy(
        self, entry: _Open, hop: int, error: BaseException | None
    ) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]:
        """Key, value and headers of a record's copy for retry topic ``hop``: the record as it was
        read, its id as the id header (so an id taken from the key or the offset stays the same), where
        it first came from, the due time, the delivery count and the error's type (never its message)."""
        record = entry.record
        env = entry.delivery.envelope
        headers: list[tuple[str, bytes | None]] = []
        for name, raw in _header_items(record.headers):
            if name == self.id_header or name.startswith(_RETRY_HEADER_PREFIXES):
                continue
            if raw is None or isinstance(raw, bytes):  # a null header value stays null
                headers.append((name, raw))
            else:
                headers.append((name, as_text(raw).encode("utf-8", "surrogateescape")))
        # the record it all started from ("{topic}/{partition}/{offset}"; topic names hold no "/")
        _topic, origin_partition, origin_offset = f"//{env.source_ref or ''}".rsplit("/", 2)
        due_ms = int((self._wall_clock() + self.retry_delays[hop]) * 1000)
        error_type = "" if error is None else _type_name(error)[:_MAX_ERROR_TYPE_CHARS]
        headers += [
            (self.id_header, env.id.encode("utf-8", "surrogateescape")),
            (HEADER_ORIGINAL_TOPIC, self.topic.encode()),
            (HEADER_ORIGINAL_PARTITION, origin_partition.encode("utf-8", "surrogateescape")),
            (HEADER_ORIGINAL_OFFSET, origin_offset.encode("utf-8", "surrogateescape")),
            (HEADER_RETRY_DUE, str(due_ms).encode()),
            (HEADER_RETRY_DELIVERY_COUNT, str(env.delivery_count + 1).encode()),
            # a hostile exception type may name itself with any text: replaced, never a failed copy
            (HEADER_RETRY_ERROR_TYPE, error_type.encode("utf-8", "replace")),
        ]
        key = (
            record.key
            if isinstance(record.key, bytes) or record.key is None
            else as_text(record.key).encode()
        )
        value = (
            record.value
            if isinstance(record.value, bytes) or record.value is None
            else as_text(record.value).encode()
        )
        return key, value, headers

    def _due(self, record: Any, hop: int, now: float) -> float:
        """When a retry-topic record may run (wall-clock seconds): its due header, but never later than
        ``now`` plus its topic's delay (a skewed clock or a forged header cannot stall the partition);
        ``now`` when the header is missing or unreadable."""
        for name, raw in _header_items(record.headers):
            if name == HEADER_RETRY_DUE:
                try:
                    due = int(as_text(raw)) / 1000
                except (TypeError, ValueError, OverflowError):
                    return now
                return min(due, now + self.retry_delays[hop]) if math.isfinite(due) else now
        return now

    def _retried(self, env: Envelope) -> Envelope:
        """The envelope of a retry-topic record: the original topic as its destination (one dedup scope
        for every copy), the original record as its source, the delivery count carried along."""
        headers = env.headers
        source = env.source_ref
        partition, offset = (
            headers.get(HEADER_ORIGINAL_PARTITION, ""),
            headers.get(HEADER_ORIGINAL_OFFSET, ""),
        )
        if _DIGITS.fullmatch(partition) and _DIGITS.fullmatch(offset):
            source = f"{self.topic}/{partition}/{offset}"
        count = headers.get(HEADER_RETRY_DELIVERY_COUNT, "")
        delivery_count = int(count) if _COUNT.fullmatch(count) else env.delivery_count
        return dataclasses.replace(
            env, destination=self.topic, source_ref=source, delivery_count=max(1, delivery_count)
        )

    def _wait_until(self, tp: Any, offset: int, due: float) -> None:
        """Pause ``tp`` (a retry topic's) at ``offset`` until ``due``: the records behind it are due later."""
        client = self._client
        if client is None:
            return
        try:
            client.seek(tp, offset)
            client.pause(tp)
        except _kerr.IllegalStateError:  # no longer assigned: its new owner waits instead
            return
        self._waiting[(tp.topic, tp.partition)] = due

    def _resume_due(self) -> float:
        """Resume the waiting retry-topic partitions that are due (unless the breaker paused fetching);
        returns the seconds until the next one is."""
        now = self._wall_clock()
        client = self._client
        for key, due in list(self._waiting.items()):
            if due <= now:
                del self._waiting[key]
                if client is not None and not self._paused:
                    with contextlib.suppress(_kerr.IllegalStateError):
                        client.resume(aiokafka.TopicPartition(*key))
        return min(self._waiting.values(), default=math.inf) - now

    async def _producer_ready(self) -> Any:
        async with self._producer_lock:
            if self._producer is None:
                producer = aiokafka.AIOKafkaProducer(
                    bootstrap_servers=self.bootstrap_servers,
                    client_id=f"{self.consumer}-retry",
                    acks="all",
                    enable_idempotence=False,  # Tansu refuses InitProducerId; a copy is deduplicated anyway
                    **self._shared_options(),
                )
                try:
                    await producer.start()
                except BaseException:
                    with contextlib.suppress(Exception, TimeoutError):
                        await asyncio.wait_for(producer.stop(), timeout=self.close_timeout)
                    raise
                self._producer = producer
            return self._producer

    def _shared_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.consumer_options.items() if k in _SHARED_CLIENT_OPTIONS}

    async def _ensure_retry_topics(self) -> None:
        """Create the retry topics that are missing, with as many partitions as the topic."""
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap_servers,
            client_id=f"{self.consumer}-admin",
            **self._shared_options(),
        )
        async with asyncio.timeout(self.commit_timeout):
            await admin.start()
            try:
                partitions = 1
                with contextlib.suppress(Exception):
                    described = await admin.describe_topics([self.topic])
                    partitions = len(described[0].get("partitions") or ()) or 1
                await create_missing_topics(admin, {name: (partitions, {}) for name in self.retry_topics})
            finally:
                with contextlib.suppress(Exception):
                    await admin.close()

    async def _end_sending(self) -> None:
        """Let the retry-topic copies in flight finish (``close_timeout``), cancel the rest: their
        records were not settled, so they are read again."""
        if not self._sending:
            return
        _done, pending = await asyncio.wait(set(self._sending), timeout=self.close_timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=self.close_timeout)

    async def _commit(self, partitions: Iterable[tuple[str, int]]) -> None:
        """One commit of the committable offsets of ``partitions`` (still assigned), serialised, so a
        commit never records a lower offset after a higher one."""
        client = self._client
        if client is None:
            return
        async with self._commit_lock:
            wanted: dict[Any, tuple[tuple[str, int], OffsetTracker, int]] = {}
            for key in partitions:
                part = self._parts.get(key)
                point = part.tracker.committable() if part is not None else None
                if part is not None and point is not None:
                    wanted[aiokafka.TopicPartition(*key)] = (key, part.tracker, point)
            if not wanted:
                return
            try:
                await asyncio.wait_for(
                    client.commit({tp: point for tp, (_k, _t, point) in wanted.items()}),
                    timeout=self.commit_timeout,
                )
            except (_kerr.CommitFailedError, _kerr.IllegalStateError) as exc:
                log.info("consumer %s: commit skipped, the group rebalanced: %s", self.consumer, exc)
                return
            except BaseException:
                self._dirty.update(key for key, _t, _p in wanted.values())
                raise
            self._dirty.difference_update(key for key, _t, _p in wanted.values())
            for key, tracker, point in wanted.values():
                if self._parts.get(key) is not None and self._parts[key].tracker is tracker:
                    tracker.mark_committed(point)

    # --- backpressure -----------------------------------------------------------------------------
    def pause(self) -> None:
        """Pause fetching every assigned partition; a keep-alive poll keeps the membership (idempotent)."""
        self._paused = True
        self._pause_assigned()
        if self._client is not None and (self._keepalive is None or self._keepalive.done()):
            self._keepalive = asyncio.get_running_loop().create_task(self._keep_alive())

    def resume(self) -> None:
        """Fetch again (the keep-alive poll ends; what it read is handed out first)."""
        self._paused = False
        self._stop_keepalive()
        client = self._client
        if client is not None:
            # a retry-topic partition waiting for its next record's due time stays paused
            paused = [tp for tp in client.paused() if (tp.topic, tp.partition) not in self._waiting]
            if paused:
                client.resume(*paused)

    @property
    def paused(self) -> bool:
        """Whether fetching is paused for the breaker."""
        return self._paused

    def _pause_assigned(self) -> None:
        client = self._client
        if client is not None:
            assigned = list(client.assignment())
            if assigned:
                client.pause(*assigned)

    async def _keep_alive(self) -> None:
        """Poll the paused consumer so aiokafka does not leave the group after ``max_poll_interval_ms``.
        A record it returns (a partition assigned between the rebalance and its pause) is held, due now."""
        try:
            while self._paused and self._client is not None:
                self._hold_now(await self._poll(self.poll_timeout_ms))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the next read meets the same error and the core backs off
            log.debug("keep-alive poll failed: %r", exc)

    def _stop_keepalive(self) -> None:
        task, self._keepalive = self._keepalive, None
        if task is not None:
            task.cancel()
            self._ending = task

    async def _end_keepalive(self) -> None:
        """Wait until a cancelled keep-alive poll has ended: two ``getmany`` calls must not overlap."""
        self._stop_keepalive()
        task, self._ending = self._ending, None
        if task is not None and not task.done():
            await asyncio.wait((task,))

    # --- observation ------------------------------------------------------------------------------
    def _oldest_age(self) -> float | None:
        stamps = [o.timestamp_ms for o in self._open.values() if o.timestamp_ms is not None]
        if not stamps:
            return None
        return max(0.0, self._wall_clock() - min(stamps) / 1000)

    async def backlog(self) -> Backlog:
        """Lag: records not yet read, summed over the assigned partitions (end offset minus the
        position); pending: records read and not acknowledged; the age of the oldest of those from its
        record timestamp. Each broker call is bounded by 2 s.

        The end offset is the larger of the last fetch's high watermark and ``ListOffsets`` (Tansu 0.6
        answers the latter with the last *batch*'s base offset + 1, which understates it).
        """
        pending = sum(p.tracker.open for p in self._parts.values())
        client = self._client
        if client is None:
            return Backlog(None, pending, self._oldest_age())
        partitions = [tp for tp in client.assignment() if tp.topic == self.topic]
        ends: dict[Any, int] = {}
        if partitions:
            with contextlib.suppress(Exception, TimeoutError):
                ends = await asyncio.wait_for(client.end_offsets(partitions), timeout=_BACKLOG_S)
        lags: dict[str, int] = {}
        for tp in partitions:
            end = max(ends.get(tp) or 0, client.highwater(tp) or 0)
            part = self._parts.get((tp.topic, tp.partition))
            if part is not None:
                position: int | None = part.tracker.last_read
            else:
                try:
                    position = await asyncio.wait_for(client.position(tp), timeout=_BACKLOG_S)
                except (Exception, TimeoutError):
                    position = None
            if position is not None:
                lags[f"{tp.topic}/{tp.partition}"] = max(0, end - position)
        self._lags = lags
        return Backlog(sum(lags.values()) if partitions else 0, pending, self._oldest_age())

    def partition_lags(self) -> dict[str, int]:
        """Per-partition lag (``"{topic}/{partition}"``) as of the last :meth:`backlog`."""
        return dict(self._lags)

    def assignment(self) -> set[tuple[str, int]]:
        """The partitions this member owns now, as ``(topic, partition)``."""
        client = self._client
        return set() if client is None else {(tp.topic, tp.partition) for tp in client.assignment()}

    async def ping(self) -> None:
        """A metadata round trip (raises unless the broker answers)."""
        client = self._client
        if client is None:
            raise _kerr.KafkaConnectionError("the Kafka consumer is not started")
        await client.topics()

    # --- errors -----------------------------------------------------------------------------------
    def classify(self, error: BaseException) -> ErrorKind | None:
        """Authentication, authorization, a bad topic or group name, an option or a broker version the
        client refuses: configuration. Any other Kafka error (connection, timeouts, a coordinator that
        moved, a rebalance) and connection-level OS errors: transient. Anything else: not a broker error."""
        if isinstance(error, _CONFIGURATION_ERRORS):
            return ErrorKind.CONFIGURATION
        if isinstance(
            error, _kerr.KafkaError | _kerr.ConsumerStoppedError | ConnectionError | TimeoutError | OSError
        ):
            return ErrorKind.TRANSIENT
        return None

    def explain(self, error: BaseException) -> str:
        """What Kafka refused and what to change, keeping the client's own words."""
        try:
            text = str(error)
        except Exception:
            text = ""
        where = f"topic {self.topic!r}, group {self.group!r} at {','.join(self.bootstrap_servers)}"
        if isinstance(error, _AUTH_ERRORS):
            hint = (
                "check the Kafka credentials and grant the consumer's principal Read on the topic and group"
            )
        elif isinstance(error, _kerr.InvalidTopicError | _kerr.InvalidGroupIdError):
            hint = "the topic or group name is not valid for Kafka"
        elif isinstance(error, _kerr.UnsupportedVersionError | _kerr.IncompatibleBrokerVersion):
            hint = "the broker is too old for this client (Kafka 0.11 or newer is required)"
        elif isinstance(error, TopicCreationError):
            hint = "create the retry topics (or grant the principal Create on the cluster)"
        elif isinstance(error, _kerr.UnsupportedCodecError):
            hint = "the topic is compressed with a codec whose library is not installed (lz4, zstd, snappy)"
        else:
            hint = "the client or broker refused the consumer's options"
        return f"{where}: {hint} (Kafka said: {type(error).__name__}: {text})"


def _type_name(error: BaseException) -> str:
    """``module.QualifiedName`` of an exception's type; a hostile type with broken names gives what it can."""
    kind = type(error)
    try:
        return f"{kind.__module__}.{kind.__qualname__}"
    except Exception:
        return "BaseException"


def _retry_delays(delays: object) -> tuple[float, ...]:
    """The retry topics' delays, checked: at most 10, each finite, above 0 and at most a week."""
    if isinstance(delays, str | bytes) or not isinstance(delays, Iterable):
        raise ConfigurationError(f"retry_delays must be a sequence of seconds, got {delays!r}")
    out = tuple(delays)
    if len(out) > _MAX_RETRY_TOPICS:
        raise ConfigurationError(f"at most {_MAX_RETRY_TOPICS} retry topics, got {len(out)} delays")
    for delay in out:
        if (
            isinstance(delay, bool)
            or not isinstance(delay, int | float)
            or not math.isfinite(delay)
            or not 0 < delay <= _MAX_RETRY_DELAY_S
        ):
            raise ConfigurationError(
                f"each retry delay must be seconds above 0 and at most {_MAX_RETRY_DELAY_S:.0f}, got {delay!r}"
            )
    return tuple(float(d) for d in out)


def _retry_topic(topic: str, suffix: str, index: int) -> str:
    """``{topic}{suffix}.{index}``, checked to be a legal topic name."""
    name = f"{topic}{suffix}.{index}"
    if not isinstance(suffix, str) or not TOPIC_NAME.fullmatch(name) or len(name) > MAX_TOPIC_CHARS:
        raise ConfigurationError(
            f"retry topic {name!r} is not a Kafka topic name of at most {MAX_TOPIC_CHARS} characters of [A-Za-z0-9._-]"
        )
    return name


def _servers(bootstrap: object) -> list[str]:
    """``host:port`` entries of a comma-separated string or a sequence of strings (else none)."""
    if isinstance(bootstrap, str):
        return [s.strip() for s in bootstrap.split(",") if s.strip()]
    if isinstance(bootstrap, list | tuple):
        return [s.strip() for s in bootstrap if isinstance(s, str) and s.strip()]
    return []


def _describe(partitions: Iterable[Any]) -> str:
    return ", ".join(sorted(f"{tp.topic}/{tp.partition}" for tp in partitions)) or "nothing"


# --- the runner -----------------------------------------------------------------------------------------
_runner_numbers = itertools.count(1)


class KafkaConsumerRunner(ConsumerRunner):
    """Consume ``topic`` as a member of ``group`` through ``layer``, committing by outcome.

    The loop, isolation of suspects, backpressure and shutdown are the core's (``_runners/_core.py``);
    this class adds the Kafka transport (:class:`KafkaTransport`, whose options it passes on) and,
    when the layer keeps its counters in Redis, their flusher; with ``redis_client`` and the
    ``shared_breaker`` setting, the shared breaker state. The consumer is closed when :meth:`run`
    returns, after the acknowledgements of what finished were committed. Records skipped as
    undecodable are counted as lost every ``lost_every_s`` seconds.
    """

    def __init__(
        self,
        *,
        bootstrap_servers: str | Sequence[str],
        topic: str,
        group: str,
        handler: Processor,
        layer: ReliabilityLayer,
        consumer: str | None = None,
        ordering: KafkaOrdering | str = KafkaOrdering.KEY,
        id_header: str = DEFAULT_ID_HEADER,
        start_from: str = "earliest",
        batch_size: int = 64,
        concurrency: int = 16,
        poll_timeout_ms: int = 500,
        revoke_timeout: float = 5.0,
        commit_timeout: float = 10.0,
        close_timeout: float = 5.0,
        shutdown_timeout: float = 30.0,
        max_backoff_s: float = 5.0,
        max_held: int = 1000,
        redeliver_backoff: Backoff | None = None,
        consumer_options: Mapping[str, Any] | None = None,
        retry_delays: Sequence[float] = (),
        retry_topic_suffix: str = DEFAULT_RETRY_SUFFIX,
        create_retry_topics: bool = True,
        redis_client: Any = None,
        metrics_every_s: float = 5.0,
        lost_every_s: float = 5.0,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        backoff: Backoff | None = None,
    ) -> None:
        if not isinstance(layer, ReliabilityLayer):
            raise ConfigurationError(f"layer must be a ReliabilityLayer, got {type(layer).__name__}")
        self.max_backoff_s = _seconds("max_backoff_s", max_backoff_s)
        if retry_delays and layer.settings.exhausted_transient_action != "defer":
            raise ConfigurationError(
                "retry topics take the messages whose retries ran out: set exhausted_transient_action to "
                "'defer' (STREAMWARDEN_EXHAUSTED_TRANSIENT_ACTION=defer), else they are dead-lettered at once"
            )
        transport = KafkaTransport(
            bootstrap_servers=bootstrap_servers,
            topic=topic,
            group=group,
            consumer=consumer or f"{socket.gethostname()}-{os.getpid()}-{next(_runner_numbers)}",
            ordering=ordering,
            id_header=id_header,
            start_from=start_from,
            poll_timeout_ms=poll_timeout_ms,
            revoke_timeout=revoke_timeout,
            commit_timeout=commit_timeout,
            close_timeout=close_timeout,
            redeliver_backoff=redeliver_backoff,
            max_held=max_held,
            consumer_options=consumer_options,
            retry_delays=retry_delays,
            retry_topic_suffix=retry_topic_suffix,
            create_retry_topics=create_retry_topics,
            clock=clock,
            wall_clock=wall_clock,
            sleep=sleep,
        )
        if backoff is None:
            backoff = ExponentialBackoff(base=min(0.05, self.max_backoff_s), cap=self.max_backoff_s)
        super().__init__(
            transport,
            handler=handler,
            layer=layer,
            batch_size=batch_size,
            concurrency=concurrency,
            # reclaim() takes nothing over for Kafka; it reports skipped undecodable records as lost
            claim_every_s=lost_every_s,
            shutdown_timeout=shutdown_timeout,
            metrics_every_s=metrics_every_s,
            clock=clock,
            sleep=sleep,
            backoff=backoff,
        )
        self.kafka_transport = transport
        transport.on_reroute = self._count_rerouted
        transport.telemetry = layer.telemetry
        self.redis_client = redis_client
        self.companion_client = redis_client
        layer.telemetry.add_consumer_gauge_source(self._partition_lag_rows)
        self.topic = topic
        self.group = group
        self.consumer = transport.consumer
        self.ordering = transport.ordering

    async def run(self) -> None:
        """:meth:`ConsumerRunner.run`, then close the consumer (leaving the group)."""
        try:
            await super().run()
        finally:
            await self.kafka_transport.close()

    def _count_rerouted(self, topic: str, result: str) -> None:
        self.layer.telemetry.retry_topic_records.add(
            1, {**self._attrs, n.ATTR_RETRY_TOPIC: topic, n.ATTR_RETRY_TOPIC_RESULT: result}
        )

    def partition_lags(self) -> dict[str, int]:
        """Per-partition lag as of the last lag refresh (``"{topic}/{partition}"`` to records)."""
        return self.kafka_transport.partition_lags()

    def _partition_lag_rows(self) -> list[tuple[str, float, Mapping[str, Any]]]:
        """``streamwarden.consumer.partition_lag`` rows, from the cached lags (no I/O in a callback)."""
        return [
            (METRIC_CONSUMER_PARTITION_LAG, lag, {**self._attrs, ATTR_PARTITION: where.rpartition("/")[2]})
            for where, lag in self.kafka_transport.partition_lags().items()
        ]
