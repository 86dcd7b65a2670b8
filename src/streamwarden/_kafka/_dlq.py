"""The Kafka dead-letter store: one DLQ topic per destination, a compacted ``.done`` topic beside it.

Layout (``docs/kafka_dlq.md`` has the full reference)::

    {destination}.dlq           the entries: one record per dead letter (key = the message id,
                                value = the original payload, ``streamwarden.*`` headers)
    {destination}.dlq.done      compacted: markers of the entries deleted (replayed) or purged

The topic name comes from ``topic_for(destination)`` (:func:`default_dlq_topic`: ``{destination}.dlq``,
or ``streamwarden-{sha256}.dlq`` for a destination that is not a legal topic name). ``topic_for`` must
give each destination its own topic: depths and purges work per topic.

**Entry ids** are ``"{dlq topic}/{partition}/{offset}"`` (``orders.dlq/0/17``). Topic names cannot hold
``/``, so the id always splits in three.

**Writes.** :meth:`KafkaDeadLetterStore.add` produces with ``acks="all"`` and waits for the broker's
confirmation before it returns the id: a stream runner commits the original offset only after ``add``
returned. The idempotent producer is not used (``enable_idempotence=False``): brokers such as Tansu
refuse ``InitProducerId``, and a duplicate DLQ record after a retried produce is harmless (the message
would be dead-lettered again anyway had the write failed). Every failure (broker down, request timeout,
topic authorization, a record the broker finds too large) raises :class:`~streamwarden.DeadLetterError`
chained to aiokafka's error, within ``delivery_timeout`` seconds: the message is not acknowledged and is
redelivered. A write that timed out on our side may still land later: the DLQ is at least once.

**Deleting in a log.** Kafka cannot delete one record, so :meth:`~KafkaDeadLetterStore.delete` writes a
marker ``d/{partition}/{offset}`` to the compacted ``{dlq topic}.done`` topic and
:meth:`~KafkaDeadLetterStore.purge` writes ``p/{partition}/{end}`` (every offset below ``end`` is gone)
per partition. Reads skip marked entries. Markers are durable (``acks="all"``) and shared: another
process (a second replayer, the CLI) reads them before it answers, so an entry that one replay processed
and deleted is never listed or replayed again by anyone. Each store keeps the markers it has read in
memory and reads only the new ones next time; consecutive markers collapse into a per-partition floor,
so replaying a queue in order keeps that index small.

**Reads** use one group-less consumer (no group, no commits): assign the topic's partitions, seek to the
first unmarked offset, read up to the end offsets taken when the read started, and stop. Every read is
bounded by those offsets and by ``read_timeout``; a read that cannot finish raises
:class:`~streamwarden.DeadLetterError` rather than answer from part of the topic.

**Depth** is arithmetic, not a scan: per partition, high watermark - max(low watermark, marker floor) -
the single markers in between. :meth:`~KafkaDeadLetterStore.refresh_depths` computes it for every DLQ
topic (found by ``topic_pattern`` in the cluster's topic list, or given as ``topics``);
:meth:`~KafkaDeadLetterStore.depths` answers from that cache without I/O, for the dlq depth gauge.

**Capacity** (``max_entries_per_destination``) is checked against that depth before each write:
approximate under concurrent writers (two may pass the check together), never trimming.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, NamedTuple

from aiokafka import (  # type: ignore[import-untyped,unused-ignore]
    AIOKafkaConsumer,
    AIOKafkaProducer,
)
from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped,unused-ignore]
from aiokafka.structs import TopicPartition  # type: ignore[import-untyped,unused-ignore]

from .._dlq import (
    DEFAULT_REDACT_HEADER_NAMES,
    DEFAULT_REDACT_PATTERNS,
    DeadLetterEntry,
    OmittedPayload,
    Redactor,
    entry_matches,
)
from .._exceptions import DeadLetterError, DeadLetterQueueFullError
from ._admin import MAX_TOPIC_CHARS, TOPIC_NAME, TopicCreationError, create_missing_topics

__all__ = [
    "DEFAULT_DLQ_TOPIC_PATTERN",
    "HEADER_ATTEMPTS",
    "HEADER_CONSUMER_GROUP",
    "HEADER_DEAD_LETTERED_AT",
    "HEADER_DELIVERY_COUNT",
    "HEADER_DESTINATION",
    "HEADER_EARLIER_TRACES",
    "HEADER_ERROR_CLASS",
    "HEADER_ERROR_MESSAGE",
    "HEADER_ERROR_TRACEBACK",
    "HEADER_ERROR_TYPE",
    "HEADER_FIRST_FAILED_AT",
    "HEADER_HEADERS",
    "HEADER_ORIGINAL_OFFSET",
    "HEADER_ORIGINAL_PARTITION",
    "HEADER_PAYLOAD_ENCODING",
    "HEADER_PAYLOAD_OMITTED_REASON",
    "HEADER_PAYLOAD_PREVIEW",
    "HEADER_PAYLOAD_SIZE",
    "HEADER_REASON",
    "HEADER_SERVICE",
    "HEADER_SOURCE_REF",
    "HEADER_SPAN_ID",
    "HEADER_SURROGATEPASS",
    "HEADER_TRACEPARENT",
    "HEADER_TRACE_ID",
    "HEADER_VERSION",
    "KafkaDeadLetterStore",
    "decode_record",
    "default_dlq_topic",
    "done_topic",
    "encode_entry",
    "parse_entry_id",
]

log = logging.getLogger("streamwarden.dlq")

# --- record layout ------------------------------------------------------------------------------------
SCHEMA_VERSION: Final = "1"
HEADER_VERSION: Final = "streamwarden.dlq.v"
#: the entry's destination: the topic the message was consumed from
HEADER_DESTINATION: Final = "streamwarden.original.topic"
HEADER_ORIGINAL_PARTITION: Final = "streamwarden.original.partition"
HEADER_ORIGINAL_OFFSET: Final = "streamwarden.original.offset"
HEADER_SOURCE_REF: Final = "streamwarden.source_ref"
HEADER_REASON: Final = "streamwarden.reason"
HEADER_ERROR_TYPE: Final = "streamwarden.error.type"
HEADER_ERROR_CLASS: Final = "streamwarden.error.class"
HEADER_ERROR_MESSAGE: Final = "streamwarden.error.message"
HEADER_ERROR_TRACEBACK: Final = "streamwarden.error.traceback"
HEADER_ATTEMPTS: Final = "streamwarden.attempts"
HEADER_DELIVERY_COUNT: Final = "streamwarden.delivery_count"
HEADER_SERVICE: Final = "streamwarden.service"
HEADER_CONSUMER_GROUP: Final = "streamwarden.consumer_group"
HEADER_FIRST_FAILED_AT: Final = "streamwarden.first_failed_at"
HEADER_DEAD_LETTERED_AT: Final = "streamwarden.dead_lettered_at"
#: W3C trace context of the failed ``process`` span (the DLQ record was produced inside that trace)
HEADER_TRACEPARENT: Final = "traceparent"
#: only when the ids do not form a valid ``traceparent`` (an entry built by hand)
HEADER_TRACE_ID: Final = "streamwarden.trace_id"
HEADER_SPAN_ID: Final = "streamwarden.span_id"
HEADER_EARLIER_TRACES: Final = "streamwarden.earlier_traces"
#: the original message's headers, one JSON object (names never collide with ours; any text round-trips)
HEADER_HEADERS: Final = "streamwarden.headers"
HEADER_PAYLOAD_ENCODING: Final = "streamwarden.payload.encoding"
HEADER_PAYLOAD_SIZE: Final = "streamwarden.payload.size"
HEADER_PAYLOAD_OMITTED_REASON: Final = "streamwarden.payload.omitted_reason"
HEADER_PAYLOAD_PREVIEW: Final = "streamwarden.payload.preview"
#: comma-separated names of the headers (``key``, ``value`` for those) written with ``surrogatepass``
HEADER_SURROGATEPASS: Final = "streamwarden.codec.surrogatepass"

DLQ_SUFFIX: Final = ".dlq"
DONE_SUFFIX: Final = ".done"
#: DLQ topics found in the cluster's topic list for destination-less reads (``list()``, ``count()``)
DEFAULT_DLQ_TOPIC_PATTERN: Final = r".+\.dlq"
DEFAULT_TOPIC_CONFIGS: Final[Mapping[str, str]] = {"retention.ms": "-1"}
_DONE_TOPIC_CONFIGS: Final[Mapping[str, str]] = {"cleanup.policy": "compact", "retention.ms": "-1"}

_ENTRY_ID: Final = re.compile(r"([A-Za-z0-9._-]{1,249})/([0-9]{1,10})/([0-9]{1,19})")
_SOURCE_REF: Final = re.compile(r"(?P<topic>.+)[/:@](?P<partition>[0-9]{1,10})[/:@](?P<offset>[0-9]{1,19})")
_HEX32: Final = re.compile(r"[0-9a-f]{32}")
_HEX16: Final = re.compile(r"[0-9a-f]{16}")

#: bound of each short text header (service, group, error type, source ref, ...)
MAX_SHORT_HEADER_CHARS: Final = 4096
#: bound of each value in the original headers, and of the headers JSON as a whole
MAX_ORIGINAL_HEADER_VALUE_CHARS: Final = 8192
MAX_ORIGINAL_HEADERS_CHARS: Final = 65_536
#: at most this many earlier traceparents are kept (the most recent)
MAX_EARLIER_TRACES: Final = 64
_MAX_PREVIEW_CHARS: Final = 4096
# what a record batch and a record add to the key, value and headers (aiokafka's own size check
# counts them too); the payload is left out when the record would not fit below max_request_size
_BATCH_OVERHEAD: Final = 512
_HEADER_OVERHEAD: Final = 10
_FETCH_RECORDS: Final = 500
# aiokafka options the store sets itself: its own arguments, and the producer's and the reader's settings
_RESERVED_CLIENT_OPTIONS: Final = frozenset(
    {
        "bootstrap_servers",
        "client_id",
        "request_timeout_ms",
        "acks",
        "enable_idempotence",
        "max_request_size",
        "linger_ms",
        "max_batch_size",
        "group_id",
        "enable_auto_commit",
        "auto_offset_reset",
        "fetch_max_wait_ms",
    }
)


def default_dlq_topic(destination: str) -> str:
    """``{destination}.dlq`` when that is a legal Kafka topic name (``[A-Za-z0-9._-]``, short enough to
    leave room for the ``.done`` companion), else ``streamwarden-{sha256 of the destination}.dlq``."""
    name = destination + DLQ_SUFFIX
    if TOPIC_NAME.fullmatch(name) and len(name) + len(DONE_SUFFIX) <= MAX_TOPIC_CHARS:
        return name
    digest = hashlib.sha256(destination.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return f"streamwarden-{digest}{DLQ_SUFFIX}"


def done_topic(dlq_topic: str) -> str:
    """The compacted companion topic holding the delete and purge markers of ``dlq_topic``."""
    return dlq_topic + DONE_SUFFIX


def parse_entry_id(entry_id: str) -> tuple[str, int, int] | None:
    """``"{topic}/{partition}/{offset}"`` as ``(topic, partition, offset)``; ``None`` for anything else."""
    match = _ENTRY_ID.fullmatch(entry_id)
    if match is None:
        return None
    return match.group(1), int(match.group(2)), int(match.group(3))


# --- text codec ---------------------------------------------------------------------------------------
def _encode_text(text: str) -> tuple[bytes, bool]:
    """``text`` as bytes and whether it needs ``surrogatepass`` to read back exactly.

    Plain UTF-8 when possible; ``surrogateescape`` for text decoded from non-UTF-8 bytes (it gives those
    bytes back) when that round-trips; ``surrogatepass`` otherwise (lone surrogates no bytes produce, e.g.
    from JSON ``"\\ud800"``): no ``str`` can fail a write, and none comes back changed.
    """
    try:
        return text.encode("utf-8"), False
    except UnicodeEncodeError:
        pass
    with contextlib.suppress(UnicodeEncodeError):
        data = text.encode("utf-8", "surrogateescape")
        if data.decode("utf-8", "surrogateescape") == text:
            return data, False
    return text.encode("utf-8", "surrogatepass"), True


def _decode_text(data: bytes | None, surrogatepass: bool = False) -> str:
    if data is None:
        return ""
    if surrogatepass:
        with contextlib.suppress(UnicodeDecodeError):
            return data.decode("utf-8", "surrogatepass")
    return data.decode("utf-8", "surrogateescape")


def _bounded(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = "...[truncated]"
    return text[: max(0, limit - len(marker))] + marker


def _bounded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The original headers with each name and value bounded, and as many as fit the JSON bound."""
    out: dict[str, str] = {}
    total = 2
    for name, value in headers.items():
        key = _bounded(str(name), 256)
        text = _bounded(str(value), MAX_ORIGINAL_HEADER_VALUE_CHARS)
        size = len(_json_text(key)) + len(_json_text(text)) + 2
        if total + size > MAX_ORIGINAL_HEADERS_CHARS:
            break
        out[key] = text
        total += size
    return out


def _safe_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not lose the dead letter
        text = f"<unrepresentable {type(value).__name__}: {exc!r}>"
    return text.encode("ascii", "backslashreplace").decode("ascii")


# --- entry <-> record ---------------------------------------------------------------------------------
class KafkaRecord(NamedTuple):
    """What :func:`encode_entry` hands the producer."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp_ms: int | None

    def size(self) -> int:
        """Bytes of key, value and headers, plus the per-header framing (an estimate from below)."""
        return (
            len(self.key or b"")
            + len(self.value or b"")
            + sum(len(name) + len(value) + _HEADER_OVERHEAD for name, value in self.headers)
        )


class _Headers:
    """Collects ``(name, bytes)`` headers, remembering which ones need ``surrogatepass``."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.surrogatepass: list[str] = []

    def text(self, name: str, value: str) -> None:
        data, special = _encode_text(value)
        self.items.append((name, data))
        if special:
            self.surrogatepass.append(name)

    def ascii(self, name: str, value: str) -> None:
        self.items.append((name, value.encode("ascii")))


def _encode_payload(payload: Any) -> tuple[str, bytes | None, bool]:
    """(encoding, value bytes, needs surrogatepass) of a payload."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return "bytes", bytes(payload), False
    if isinstance(payload, str):
        data, special = _encode_text(payload)
        return "text", data, special
    try:
        text = _json_text(payload)
    except (TypeError, ValueError, RecursionError):
        return "repr", _safe_repr(payload).encode("ascii"), False
    data, special = _encode_text(text)
    return "json", data, special


def _json_text(value: Any) -> str:
    """JSON with every character as it is. Not ``ensure_ascii``: its ``\\ud800\\udc00`` escapes of two
    lone surrogates read back as one joined character; raw surrogates go through :func:`_encode_text`."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=True)


def encode_entry(
    entry: DeadLetterEntry, *, max_payload_bytes: int | None, max_record_bytes: int
) -> KafkaRecord:
    """The Kafka record of a (redacted) entry: key = message id, value = payload, ``streamwarden.*``
    headers for everything else (``docs/kafka_dlq.md``).

    The payload is left out (``encoding=omitted``, ``omitted_reason=oversize``) when its encoded size
    passes ``max_payload_bytes`` or when the record would not fit ``max_record_bytes`` with it; the entry
    then keeps its metadata. Short text headers are bounded (:data:`MAX_SHORT_HEADER_CHARS`), the
    original headers too (:data:`MAX_ORIGINAL_HEADER_VALUE_CHARS` each, :data:`MAX_ORIGINAL_HEADERS_CHARS`
    together); the error message and traceback were bounded by the redactor.
    """
    head = _Headers()
    head.ascii(HEADER_VERSION, SCHEMA_VERSION)
    head.text(HEADER_DESTINATION, entry.destination)
    ref = entry.source_ref
    if ref is not None:
        head.text(HEADER_SOURCE_REF, _bounded(ref, MAX_SHORT_HEADER_CHARS))
        parsed = _SOURCE_REF.fullmatch(ref)
        if parsed is not None:
            head.ascii(HEADER_ORIGINAL_PARTITION, parsed.group("partition"))
            head.ascii(HEADER_ORIGINAL_OFFSET, parsed.group("offset"))
    head.text(HEADER_REASON, _bounded(entry.reason, MAX_SHORT_HEADER_CHARS))
    head.text(HEADER_ERROR_TYPE, _bounded(entry.error_type, MAX_SHORT_HEADER_CHARS))
    head.text(HEADER_ERROR_CLASS, _bounded(entry.error_class, MAX_SHORT_HEADER_CHARS))
    head.text(HEADER_ERROR_MESSAGE, entry.error_message)
    if entry.traceback:
        head.text(HEADER_ERROR_TRACEBACK, entry.traceback)
    head.ascii(HEADER_ATTEMPTS, str(int(entry.attempts)))
    head.ascii(HEADER_DELIVERY_COUNT, str(int(entry.delivery_count)))
    head.text(HEADER_SERVICE, _bounded(entry.service, MAX_SHORT_HEADER_CHARS))
    if entry.consumer_group is not None:
        head.text(HEADER_CONSUMER_GROUP, _bounded(entry.consumer_group, MAX_SHORT_HEADER_CHARS))
    head.ascii(HEADER_FIRST_FAILED_AT, repr(float(entry.first_failed_at)))
    head.ascii(HEADER_DEAD_LETTERED_AT, repr(float(entry.dead_lettered_at)))
    trace_id, span_id = entry.trace_id, entry.span_id
    if trace_id and span_id and _HEX32.fullmatch(trace_id) and _HEX16.fullmatch(span_id):
        head.ascii(HEADER_TRACEPARENT, f"00-{trace_id}-{span_id}-01")
    else:
        if trace_id is not None:
            head.text(HEADER_TRACE_ID, _bounded(trace_id, MAX_SHORT_HEADER_CHARS))
        if span_id is not None:
            head.text(HEADER_SPAN_ID, _bounded(span_id, MAX_SHORT_HEADER_CHARS))
    if entry.earlier_traces:
        traces = [_bounded(t, 256) for t in entry.earlier_traces[-MAX_EARLIER_TRACES:]]
        head.text(HEADER_EARLIER_TRACES, _json_text(traces))
    if entry.headers:
        head.text(HEADER_HEADERS, _json_text(_bounded_headers(entry.headers)))

    key: bytes | None = None
    if entry.message_id is not None:
        key, special = _encode_text(entry.message_id)
        if special:
            head.surrogatepass.append("key")
    timestamp_ms = None
    if 0 < entry.dead_lettered_at < 1e14:  # a real epoch time: the record's own timestamp
        timestamp_ms = int(entry.dead_lettered_at * 1000)

    payload_headers = _Headers()
    value: bytes | None
    if isinstance(entry.payload, OmittedPayload):  # re-adding an entry read back from a store
        value = None
        _omitted(payload_headers, entry.payload.reason, entry.payload.size, entry.payload.preview)
    else:
        encoding, value, special = _encode_payload(entry.payload)
        size = len(value or b"")
        fits = KafkaRecord(key, value, [*head.items, *_SIZE_HEADERS], None).size() + _BATCH_OVERHEAD
        if (max_payload_bytes is not None and size > max_payload_bytes) or fits > max_record_bytes:
            preview = value.decode("ascii")[:_MAX_PREVIEW_CHARS] if encoding == "repr" and value else ""
            value = None
            _omitted(payload_headers, "oversize", size, preview)
        else:
            payload_headers.ascii(HEADER_PAYLOAD_ENCODING, encoding)
            payload_headers.ascii(HEADER_PAYLOAD_SIZE, str(size))
            if special:
                head.surrogatepass.append("value")
    items = [*head.items, *payload_headers.items]
    special_names = head.surrogatepass + payload_headers.surrogatepass
    if special_names:
        items.append((HEADER_SURROGATEPASS, ",".join(special_names).encode("ascii")))
    return KafkaRecord(key, value, items, timestamp_ms)


# the payload headers a kept payload adds, for the size estimate
_SIZE_HEADERS: Final = [(HEADER_PAYLOAD_ENCODING, b"bytes"), (HEADER_PAYLOAD_SIZE, b"0" * 20)]


def _omitted(head: _Headers, reason: str, size: int, preview: str) -> None:
    head.ascii(HEADER_PAYLOAD_ENCODING, "omitted")
    head.text(HEADER_PAYLOAD_OMITTED_REASON, _bounded(reason, 256))
    head.ascii(HEADER_PAYLOAD_SIZE, str(int(size)))
    if preview:
        head.text(HEADER_PAYLOAD_PREVIEW, _bounded(preview, _MAX_PREVIEW_CHARS))


def _int(text: str, default: int) -> int:
    try:
        return int(text)
    except ValueError:
        return default


def _float(text: str, default: float) -> float:
    try:
        return float(text)
    except ValueError:
        return default


def decode_record(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: Iterable[tuple[str, bytes | None]],
) -> DeadLetterEntry | None:
    """The entry of one DLQ record, or ``None`` when it is not a streamwarden dead letter (no
    ``streamwarden.dlq.v`` header). Never raises: a damaged header reads as its default."""
    raw: dict[str, bytes] = {}
    for name, data in headers:
        raw[str(name)] = data or b""
    if HEADER_VERSION not in raw:
        return None
    special = set(_decode_text(raw.get(HEADER_SURROGATEPASS)).split(","))

    def text(name: str, default: str = "") -> str:
        data = raw.get(name)
        return default if data is None else _decode_text(data, name in special)

    def optional(name: str) -> str | None:
        data = raw.get(name)
        return None if data is None else _decode_text(data, name in special)

    trace_id, span_id = optional(HEADER_TRACE_ID), optional(HEADER_SPAN_ID)
    parent = text(HEADER_TRACEPARENT).split("-")
    if trace_id is None and span_id is None and len(parent) == 4:
        trace_id, span_id = parent[1], parent[2]
    message_id = None if key is None else _decode_text(key, "key" in special)
    return DeadLetterEntry(
        message_id=message_id,
        destination=text(HEADER_DESTINATION),
        payload=_decode_payload(raw, value, "value" in special),
        reason=text(HEADER_REASON),
        error_type=text(HEADER_ERROR_TYPE),
        error_class=text(HEADER_ERROR_CLASS),
        error_message=text(HEADER_ERROR_MESSAGE),
        attempts=_int(text(HEADER_ATTEMPTS), 0),
        service=text(HEADER_SERVICE),
        headers=_json_object(optional(HEADER_HEADERS)),
        traceback=text(HEADER_ERROR_TRACEBACK),
        first_failed_at=_float(text(HEADER_FIRST_FAILED_AT), 0.0),
        dead_lettered_at=_float(text(HEADER_DEAD_LETTERED_AT), 0.0),
        delivery_count=_int(text(HEADER_DELIVERY_COUNT), 1),
        source_ref=optional(HEADER_SOURCE_REF),
        trace_id=trace_id,
        span_id=span_id,
        consumer_group=optional(HEADER_CONSUMER_GROUP),
        earlier_traces=_json_strings(optional(HEADER_EARLIER_TRACES)),
        entry_id=f"{topic}/{partition}/{offset}",
    )


def _decode_payload(raw: Mapping[str, bytes], value: bytes | None, surrogatepass: bool) -> Any:
    encoding = _decode_text(raw.get(HEADER_PAYLOAD_ENCODING, b"bytes"))
    size = _int(_decode_text(raw.get(HEADER_PAYLOAD_SIZE, b"0")), 0)
    if encoding == "bytes":
        return value or b""
    if encoding == "text":
        return _decode_text(value or b"", surrogatepass)
    if encoding == "json":
        try:
            return json.loads(_decode_text(value or b"null", surrogatepass))
        except ValueError:
            return OmittedPayload("undecodable", len(value or b""), _decode_text(value)[:_MAX_PREVIEW_CHARS])
    if encoding == "repr":
        return OmittedPayload("not_json", size, _decode_text(value))
    return OmittedPayload(
        reason=_decode_text(raw.get(HEADER_PAYLOAD_OMITTED_REASON, encoding.encode())),
        size=size,
        preview=_decode_text(raw.get(HEADER_PAYLOAD_PREVIEW)),
    )


def _json_object(data: str | None) -> dict[str, str]:
    if not data:
        return {}
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _json_strings(data: str | None) -> tuple[str, ...]:
    if not data:
        return ()
    try:
        value = json.loads(data)
    except ValueError:
        return ()
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


# --- the marker index ---------------------------------------------------------------------------------
@dataclass(slots=True)
class _PartitionMarks:
    """The marked (deleted or purged) offsets of one DLQ partition: all below ``floor``, plus ``sparse``."""

    floor: int = 0
    sparse: set[int] = field(default_factory=set)

    def delete(self, offset: int) -> None:
        if offset >= self.floor:
            self.sparse.add(offset)
            self._collapse()

    def purge(self, end: int) -> None:
        """Every offset below ``end`` is gone (a purge marker, or the partition's low watermark)."""
        if end > self.floor:
            self.floor = end
            self.sparse = {o for o in self.sparse if o >= end}
            self._collapse()

    def _collapse(self) -> None:
        while self.floor in self.sparse:
            self.sparse.remove(self.floor)
            self.floor += 1

    def marked(self, offset: int) -> bool:
        return offset < self.floor or offset in self.sparse

    def live(self, low: int, high: int) -> int:
        """Unmarked offsets in ``[low, high)``."""
        start = max(low, self.floor)
        if high <= start:
            return 0
        return high - start - sum(1 for o in self.sparse if start <= o < high)


@dataclass(slots=True)
class _TopicMarks:
    """Every marker of one DLQ topic read so far, and where reading its ``.done`` topic resumes."""

    partitions: dict[int, _PartitionMarks] = field(default_factory=dict)
    positions: dict[int, int] = field(default_factory=dict)

    def of(self, partition: int) -> _PartitionMarks:
        marks = self.partitions.get(partition)
        if marks is None:
            marks = self.partitions[partition] = _PartitionMarks()
        return marks

    def apply(self, key: bytes | None) -> None:
        """Apply one marker record (``d/{partition}/{offset}`` or ``p/{partition}/{end}``)."""
        parts = (key or b"").split(b"/")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            return  # not a marker of ours: ignored
        partition, offset = int(parts[1]), int(parts[2])
        if parts[0] == b"d":
            self.of(partition).delete(offset)
        elif parts[0] == b"p":
            self.of(partition).purge(offset)


def _marker_value(op: str) -> bytes:
    return json.dumps({"op": op, "at": time.time()}).encode("ascii")


class _Watermarks(NamedTuple):
    low: int
    high: int


# --- the store ----------------------------------------------------------------------------------------
class KafkaDeadLetterStore:
    """Dead letters in Kafka topics (see the module docstring and ``docs/kafka_dlq.md``).

    Implements :class:`~streamwarden.DeadLetterStore`, :class:`~streamwarden.NamedQueues` (the DLQ
    topic of a destination), :class:`~streamwarden.DepthReporting` and
    :class:`~streamwarden.DepthRefreshing`. It does not offer ``replace`` (:class:`ReplacingStore`):
    Kafka cannot append and mark in one atomic step without transactions, so the replayer writes the
    merged entry first and marks the old ones after (a crash leaves extra entries, never none).

    Entries are redacted before the write like in every store: by ``redactor``, or by one built from
    ``redact_patterns`` and ``redact_header_names``; the traceback is then cut to its last
    ``max_traceback_chars`` characters. The keyword arguments of
    :meth:`~streamwarden.ReliabilitySettings.dead_letter_store_options` are accepted as they are.

    Clients start on first use; :meth:`aclose` (or ``async with``) stops them. ``client_options`` go to
    every aiokafka client, the producer, the reader and the admin client alike (``security_protocol``,
    ``ssl_context``, ``sasl_mechanism``, ``sasl_plain_username``, ``sasl_plain_password``, ...); they
    may not set what the store sets itself (``bootstrap_servers``, ``client_id`` and
    ``request_timeout_ms`` are its own arguments; ``acks``, ``group_id``, ...). ``repr()`` shows none of
    them (they may hold a password). ``depth_reporter(destination)`` decides
    whether this process exports a destination's depth (e.g. the member owning partition 0 of the source
    topic), so a fleet reports each queue once; ``None`` reports every destination it knows.
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        *,
        topic_for: Callable[[str], str] = default_dlq_topic,
        topics: Iterable[str] | None = None,
        topic_pattern: str | re.Pattern[str] = DEFAULT_DLQ_TOPIC_PATTERN,
        create_topics: bool = True,
        partitions: int = 1,
        replication_factor: int | None = None,
        topic_configs: Mapping[str, str] = DEFAULT_TOPIC_CONFIGS,
        redactor: Redactor | None = None,
        redact_patterns: Iterable[str | re.Pattern[str]] = DEFAULT_REDACT_PATTERNS,
        redact_header_names: Iterable[str] = DEFAULT_REDACT_HEADER_NAMES,
        max_traceback_chars: int = 65_536,
        max_payload_bytes: int | None = None,
        max_request_size: int = 1_048_576,
        max_entries_per_destination: int | None = None,
        request_timeout_ms: int = 10_000,
        delivery_timeout: float = 30.0,
        read_timeout: float = 30.0,
        client_id: str = "streamwarden-dlq",
        client_options: Mapping[str, Any] | None = None,
        depth_reporter: Callable[[str], bool] | None = None,
    ) -> None:
        if partitions < 1:
            raise ValueError("partitions must be at least 1")
        if replication_factor is not None and replication_factor < 1:
            raise ValueError("replication_factor must be at least 1 (or None: min(3, brokers))")
        if max_payload_bytes is not None and max_payload_bytes < 0:
            raise ValueError("max_payload_bytes must not be negative")
        if max_entries_per_destination is not None and max_entries_per_destination < 1:
            raise ValueError("max_entries_per_destination must be at least 1 (or None)")
        if delivery_timeout <= 0 or read_timeout <= 0 or request_timeout_ms <= 0:
            raise ValueError("timeouts must be positive")
        options = dict(client_options or {})
        if clash := sorted(_RESERVED_CLIENT_OPTIONS & options.keys()):
            raise ValueError(
                f"client_options may not set {', '.join(clash)}: the store sets it (bootstrap_servers, "
                "client_id and request_timeout_ms are arguments of the store)"
            )
        self.bootstrap_servers = (
            bootstrap_servers if isinstance(bootstrap_servers, str) else list(bootstrap_servers)
        )
        self.topic_for = topic_for
        self.topics = None if topics is None else tuple(dict.fromkeys(topics))
        self.topic_pattern = re.compile(topic_pattern) if isinstance(topic_pattern, str) else topic_pattern
        self.create_topics = create_topics
        self.partitions = partitions
        self.replication_factor = replication_factor
        self.topic_configs = dict(topic_configs)
        self.redactor = redactor or Redactor(redact_patterns, header_names=redact_header_names)
        self.max_traceback_chars = max_traceback_chars
        self.max_payload_bytes = max_payload_bytes
        self.max_request_size = max_request_size
        self.max_entries_per_destination = max_entries_per_destination
        self.request_timeout_ms = request_timeout_ms
        self.delivery_timeout = delivery_timeout
        self.read_timeout = read_timeout
        self.client_id = client_id
        self.client_options = options
        self.depth_reporter = depth_reporter
        self._producer: Any = None
        self._reader: Any = None
        self._admin: Any = None
        self._start_lock = asyncio.Lock()
        # one group-less consumer serves every read: its assignment is per operation
        self._read_lock = asyncio.Lock()
        self._ensured: set[str] = set()
        self._marks: dict[str, _TopicMarks] = {}
        self._written: set[str] = set()
        # topic -> destination (None: not a streamwarden DLQ topic), learnt from writes and records
        self._topic_destination: dict[str, str | None] = {}
        self._depths: dict[str, int] = {}
        # topic -> partitions, from full metadata requests only: a request naming topics would let a
        # broker with auto.create.topics.enable create them, and the reader's own metadata follows its
        # assignment, so it cannot answer for other topics
        self._topic_partitions: dict[str, tuple[int, ...]] = {}

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the clients now (they otherwise start on first use); raises :class:`DeadLetterError`
        when the broker cannot be reached."""
        try:
            await self._producer_ready()
            await self._reader_ready()
            await self._admin_ready()
        except Exception as exc:
            raise DeadLetterError(f"cannot start the Kafka dead-letter clients: {_describe(exc, 0)}") from exc

    async def aclose(self) -> None:
        """Stop every client this store started; it may be used again (clients start anew)."""
        async with self._start_lock:
            clients = (self._producer, self._reader, self._admin)
            self._producer = self._reader = self._admin = None
            for client in clients:
                if client is None:
                    continue
                stop = client.close if isinstance(client, AIOKafkaAdminClient) else client.stop
                try:
                    await stop()
                except Exception as exc:  # closing must not fail the caller's shutdown
                    log.debug("closing a Kafka DLQ client failed: %r", exc)

    def __repr__(self) -> str:
        # not the client options: they may hold a password
        security = self.client_options.get("security_protocol", "PLAINTEXT")
        return (
            f"<{type(self).__name__} {self.bootstrap_servers!r} client_id={self.client_id!r} "
            f"security_protocol={security!r}>"
        )

    async def __aenter__(self) -> KafkaDeadLetterStore:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _common(self) -> dict[str, Any]:
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "request_timeout_ms": self.request_timeout_ms,
            **self.client_options,
        }

    async def _started(self, attr: str, make: Callable[[], Any]) -> Any:
        client = getattr(self, attr)
        if client is not None:
            return client
        async with self._start_lock:
            client = getattr(self, attr)
            if client is not None:
                return client
            client = make()
            try:
                await client.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await (client.close() if isinstance(client, AIOKafkaAdminClient) else client.stop())
                raise
            setattr(self, attr, client)
            return client

    async def _producer_ready(self) -> Any:
        return await self._started(
            "_producer",
            lambda: AIOKafkaProducer(
                acks="all",
                enable_idempotence=False,
                max_request_size=self.max_request_size,
                linger_ms=0,
                # one record per batch: Tansu 0.6 answers ListOffsets(latest) with the base offset + 1 of
                # the last batch, so the other records of a multi-record batch would lie past the "end"
                # that reads stop at; dead letters are rare, batching them buys nothing
                max_batch_size=1,
                **self._common(),
            ),
        )

    async def _reader_ready(self) -> Any:
        return await self._started(
            "_reader",
            lambda: AIOKafkaConsumer(
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=100,
                **self._common(),
            ),
        )

    async def _admin_ready(self) -> Any:
        return await self._started("_admin", lambda: AIOKafkaAdminClient(**self._common()))

    # --- names ----------------------------------------------------------------------------------
    def dlq_topic(self, destination: str) -> str:
        """The DLQ topic of ``destination`` (``topic_for``), checked to be a legal topic name."""
        topic = self.topic_for(destination)
        if not TOPIC_NAME.fullmatch(topic) or len(done_topic(topic)) > MAX_TOPIC_CHARS:
            raise ValueError(
                f"topic_for({destination!r}) gave {topic!r}: not a Kafka topic name of at most "
                f"{MAX_TOPIC_CHARS - len(DONE_SUFFIX)} characters of [A-Za-z0-9._-]"
            )
        self._topic_destination.setdefault(topic, destination)
        return topic

    def queue_name(self, destination: str) -> str:
        """Where ``destination``'s dead letters are written: its DLQ topic (see :class:`NamedQueues`).

        Named in a span before the write, so it never raises: a ``topic_for`` that fails is reported by
        :meth:`add` itself."""
        try:
            return self.dlq_topic(destination)
        except Exception:
            return default_dlq_topic(destination)

    # --- writes ---------------------------------------------------------------------------------
    async def add(self, entry: DeadLetterEntry) -> str:
        """Produce ``entry`` (redacted) to its DLQ topic; returns ``"{topic}/{partition}/{offset}"`` once
        the broker confirmed the write (``acks="all"``).

        Raises :class:`DeadLetterError` when the write was not confirmed within ``delivery_timeout``
        (:class:`DeadLetterQueueFullError` at ``max_entries_per_destination``).
        """
        entry = self.redactor.entry(entry, self.max_traceback_chars)
        destination = entry.destination
        try:
            topic = self.dlq_topic(destination)
        except Exception as exc:  # a topic_for that fails or names no legal topic: nothing was written
            raise DeadLetterError(f"no dead-letter topic for {destination!r}: {exc}") from exc
        record = encode_entry(
            entry, max_payload_bytes=self.max_payload_bytes, max_record_bytes=self.max_request_size
        )
        try:
            async with asyncio.timeout(self.delivery_timeout):
                await self._ensure_topics(topic)
                if self.max_entries_per_destination is not None:
                    await self._check_capacity(destination, topic)
                producer = await self._producer_ready()
                meta = await producer.send_and_wait(
                    topic,
                    record.value,
                    key=record.key,
                    headers=record.headers,
                    timestamp_ms=record.timestamp_ms,
                )
        except DeadLetterError:
            raise
        except Exception as exc:  # aiokafka's errors, OSError, TimeoutError: not confirmed
            raise DeadLetterError(
                f"dead-letter write to Kafka topic {topic!r} failed: {_describe(exc, self.delivery_timeout)}"
            ) from exc
        self._written.add(topic)
        self._topic_destination[topic] = destination
        if destination in self._depths:
            self._depths[destination] += 1
        return f"{meta.topic}/{meta.partition}/{meta.offset}"

    async def _check_capacity(self, destination: str, topic: str) -> None:
        async with self._reading():
            depth = await self._topic_depth(topic)
        self._depths[destination] = depth
        limit = self.max_entries_per_destination
        if limit is not None and depth >= limit:
            raise DeadLetterQueueFullError(
                f"dead-letter queue of {destination!r} ({topic}) is full ({depth} entries, limit "
                f"{limit}); replay or purge entries"
            )

    async def _ensure_topics(self, topic: str) -> None:
        """Create ``topic`` and its ``.done`` companion once per process when missing (``create_topics``)."""
        if topic in self._ensured or not self.create_topics:
            return
        admin = await self._admin_ready()
        specs = {topic: (self.partitions, self.topic_configs), done_topic(topic): (1, _DONE_TOPIC_CONFIGS)}
        try:
            await create_missing_topics(admin, specs, replication_factor=self.replication_factor)
        except TopicCreationError as exc:
            raise DeadLetterError(str(exc)) from exc
        self._ensured.add(topic)

    async def delete(self, entry_id: str) -> bool:
        """Mark one entry deleted (a marker in the ``.done`` topic); ``False`` when it is not there,
        already deleted, or not one of ours. Another process's reads skip it from then on."""
        parsed = parse_entry_id(entry_id)
        if parsed is None:
            return False
        topic, partition, offset = parsed
        async with self._reading():
            entry = await self._read_one(topic, partition, offset)
        if entry is None:
            return False
        await self._mark(topic, [(f"d/{partition}/{offset}", "delete")])
        self._marks_of(topic).of(partition).delete(offset)
        if entry.destination in self._depths:
            self._depths[entry.destination] = max(0, self._depths[entry.destination] - 1)
        return True

    async def purge(self, destination: str | None = None) -> int:
        """Mark every entry (of one destination) deleted: one ``p/{partition}/{end}`` marker per
        partition; returns how many entries that removed."""
        named = None if destination is None else [self.dlq_topic(destination)]
        async with self._reading():
            topics = named if named is not None else await self._dlq_topics()
            plans: list[tuple[str, dict[int, _Watermarks], int]] = []
            for topic in topics:
                if not await self._exists(topic):
                    continue
                marks = await self._caught_up(topic)
                water = await self._watermarks(topic)
                live = sum(marks.of(p).live(w.low, w.high) for p, w in water.items())
                if live:
                    plans.append((topic, water, live))
        total = 0
        for topic, water, live in plans:
            markers = [
                (f"p/{p}/{w.high}", "purge")
                for p, w in water.items()
                if self._marks_of(topic).of(p).live(w.low, w.high)
            ]
            await self._mark(topic, markers)
            for p, w in water.items():
                self._marks_of(topic).of(p).purge(w.high)
            total += live
            name = destination if destination is not None else self._topic_destination.get(topic)
            if name is not None:
                self._depths[name] = 0
        return total

    async def _mark(self, topic: str, markers: Sequence[tuple[str, str]]) -> None:
        """Write markers to ``{topic}.done`` and wait for the broker to confirm each."""
        done = done_topic(topic)
        try:
            async with asyncio.timeout(self.delivery_timeout):
                await self._ensure_topics(topic)
                producer = await self._producer_ready()
                futures = [
                    await producer.send(done, _marker_value(op), key=key.encode("ascii"))
                    for key, op in markers
                ]
                await asyncio.gather(*futures)
        except Exception as exc:
            raise DeadLetterError(
                f"writing markers to Kafka topic {done!r} failed: {_describe(exc, self.delivery_timeout)}"
            ) from exc

    # --- reads ----------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[None]:
        """Hold the reader; aiokafka errors become :class:`DeadLetterError` here, once."""
        async with self._read_lock:
            try:
                async with asyncio.timeout(self.read_timeout):
                    yield
            except DeadLetterError:
                raise
            except Exception as exc:  # aiokafka's errors, OSError, our read_timeout
                raise DeadLetterError(
                    f"reading the Kafka dead-letter queue failed: {_describe(exc, self.read_timeout)}"
                ) from exc
            finally:
                reader = self._reader
                if reader is not None:
                    with contextlib.suppress(Exception):
                        reader.assign([])  # no background fetches while idle

    async def get(self, entry_id: str) -> DeadLetterEntry | None:
        """The entry with ``entry_id`` (``"{topic}/{partition}/{offset}"``), or ``None`` when it does not
        exist, was deleted or purged, or is not a streamwarden dead letter."""
        parsed = parse_entry_id(entry_id)
        if parsed is None:
            return None
        async with self._reading():
            return await self._read_one(*parsed)

    async def _read_one(self, topic: str, partition: int, offset: int) -> DeadLetterEntry | None:
        if not await self._exists(topic):
            return None
        if partition not in self._topic_partitions.get(topic, ()):
            await self._refresh_metadata()  # partitions may have been added since we looked
        water = await self._watermarks(topic)
        if partition not in water or not water[partition].low <= offset < water[partition].high:
            return None
        if (await self._caught_up(topic)).of(partition).marked(offset):
            return None
        found: list[DeadLetterEntry] = []

        def visit(record: Any) -> bool:
            if record.offset == offset:
                entry = _entry_of(record)
                if entry is not None:
                    found.append(entry)
            return False  # one record is all we want

        await self._scan(topic, {partition: (offset, offset + 1)}, visit)
        if found:
            self._topic_destination.setdefault(topic, found[0].destination)
        return found[0] if found else None

    async def list(
        self,
        destination: str | None = None,
        *,
        limit: int = 100,
        error_type: str | None = None,
        error_class: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> builtins.list[DeadLetterEntry]:
        """Entries oldest first (by ``dead_lettered_at``), filtered by destination, error type/class and
        ``dead_lettered_at``; each partition is read up to its end offset at the start of the call."""
        if limit <= 0:
            return []
        found: builtins.list[DeadLetterEntry] = []
        named = None if destination is None else [self.dlq_topic(destination)]
        async with self._reading():
            topics = named if named is not None else await self._dlq_topics()
            for topic in topics:
                if not await self._exists(topic):
                    continue
                marks = await self._caught_up(topic)
                water = await self._watermarks(topic)
                per_partition: dict[int, int] = {}

                def visit(
                    record: Any, marks: _TopicMarks = marks, counts: dict[int, int] = per_partition
                ) -> bool:
                    if marks.of(record.partition).marked(record.offset):
                        return True
                    entry = _entry_of(record)
                    if entry is None or not entry_matches(
                        entry, destination, error_type, error_class, since, until
                    ):
                        return True
                    found.append(entry)
                    counts[record.partition] = counts.get(record.partition, 0) + 1
                    return counts[record.partition] < limit  # oldest first within a partition

                ranges = {p: (max(w.low, marks.of(p).floor), w.high) for p, w in water.items()}
                await self._scan(topic, ranges, visit)
        found.sort(key=_entry_order)
        return found[:limit]

    async def count(self, destination: str | None = None) -> int:
        """Number of entries (in one destination, or in all DLQ topics)."""
        if destination is None:
            return sum((await self.refresh_depths()).values())
        topic = self.dlq_topic(destination)
        async with self._reading():
            depth = await self._topic_depth(topic)
        self._depths[destination] = depth
        return depth

    async def destinations(self) -> builtins.list[str]:
        """Destinations that currently have entries."""
        return sorted(d for d, n in (await self.refresh_depths()).items() if n > 0)

    async def refresh_depths(self) -> dict[str, int]:
        """Re-read the depth of every DLQ topic (watermarks and new markers; no record is read except
        one per topic whose destination is not known yet). Returns destination -> entries, zeros
        included; :meth:`depths` answers from it afterwards."""
        depths: dict[str, int] = {}
        async with self._reading():
            for topic in await self._dlq_topics():
                if not await self._exists(topic):
                    continue
                destination = await self._destination_of(topic)
                if destination is None:
                    continue
                depths[destination] = depths.get(destination, 0) + await self._topic_depth(topic)
        self._depths = dict(depths)
        return depths

    def depths(self) -> dict[str, int]:
        """Destination -> entries from the cache (no I/O: safe in a metric callback): the last
        :meth:`refresh_depths` or :meth:`count`, followed by this store's own writes and deletes; only
        the destinations ``depth_reporter`` accepts."""
        out: dict[str, int] = {}
        for destination, depth in self._depths.items():
            if depth <= 0:
                continue
            if self.depth_reporter is not None:
                try:
                    if not self.depth_reporter(destination):
                        continue
                except Exception:
                    log.exception("depth_reporter raised for %r; its depth is not reported", destination)
                    continue
            out[destination] = depth
        return out

    # --- reading helpers (called with the reader held) -------------------------------------------
    async def _refresh_metadata(self) -> set[str]:
        """Every topic of the cluster with its partitions (one metadata request for all topics)."""
        admin = await self._admin_ready()
        known: dict[str, tuple[int, ...]] = {}
        for topic in await admin.describe_topics():
            if topic.get("error_code") == 0:
                known[topic["topic"]] = tuple(sorted(p["partition"] for p in topic.get("partitions", ())))
        self._topic_partitions = known
        return set(known)

    async def _dlq_topics(self) -> builtins.list[str]:
        """The DLQ topics to read when no destination is given."""
        if self.topics is not None:
            return list(self.topics)
        existing = await self._refresh_metadata()
        found = {
            t
            for t in existing
            if not t.startswith("__")
            and self.topic_pattern.fullmatch(t)
            and not (t.endswith(DONE_SUFFIX) and t[: -len(DONE_SUFFIX)] in existing)
        }
        found |= self._written & existing
        return sorted(found)

    async def _exists(self, topic: str) -> bool:
        if self._topic_partitions.get(topic):
            return True
        await self._refresh_metadata()  # the topic may be newer than what we know
        return bool(self._topic_partitions.get(topic))

    async def _watermarks(self, topic: str) -> dict[int, _Watermarks]:
        reader = await self._reader_ready()
        tps = [TopicPartition(topic, p) for p in self._topic_partitions.get(topic, ())]
        if not tps:
            return {}
        # assigned, the reader learns (and keeps fresh) their metadata; paused, it does not fetch them:
        # a fetch waiting on the broker would hold up the offset requests behind it on the connection
        reader.assign(tps)
        reader.pause(*tps)
        low = await reader.beginning_offsets(tps)
        high = await reader.end_offsets(tps)
        return {tp.partition: _Watermarks(low[tp], high[tp]) for tp in tps}

    async def _topic_depth(self, topic: str) -> int:
        if not await self._exists(topic):
            return 0
        marks = await self._caught_up(topic)
        water = await self._watermarks(topic)
        return sum(marks.of(p).live(w.low, w.high) for p, w in water.items())

    def _marks_of(self, topic: str) -> _TopicMarks:
        marks = self._marks.get(topic)
        if marks is None:
            marks = self._marks[topic] = _TopicMarks()
        return marks

    async def _caught_up(self, topic: str) -> _TopicMarks:
        """The markers of ``topic``, after reading the ones written since the last call."""
        marks = self._marks_of(topic)
        done = done_topic(topic)
        if not await self._exists(done):
            return marks
        water = await self._watermarks(done)
        if any(w.high < marks.positions.get(p, 0) for p, w in water.items()):
            # the .done topic was recreated (offsets went back): start over
            marks = self._marks[topic] = _TopicMarks()
        ranges = {p: (max(w.low, marks.positions.get(p, 0)), w.high) for p, w in water.items()}

        def visit(record: Any) -> bool:
            marks.apply(record.key)
            return True

        await self._scan(done, ranges, visit)
        for p, w in water.items():
            marks.positions[p] = max(marks.positions.get(p, 0), w.high)
        return marks

    async def _destination_of(self, topic: str) -> str | None:
        """The destination a DLQ topic holds: known from writes, else from its first record, else (an
        empty topic) from the default naming; ``None`` for a topic that is not a streamwarden DLQ."""
        if topic in self._topic_destination:
            return self._topic_destination[topic]
        water = await self._watermarks(topic)
        firsts: builtins.list[DeadLetterEntry | None] = []

        def visit(record: Any) -> bool:
            firsts.append(_entry_of(record))
            return False

        for p, w in water.items():
            if w.low < w.high:
                await self._scan(topic, {p: (w.low, w.low + 1)}, visit)
                break
        if firsts:
            name = firsts[0].destination if firsts[0] is not None else None
        elif topic.endswith(DLQ_SUFFIX) and default_dlq_topic(topic[: -len(DLQ_SUFFIX)]) == topic:
            name = topic[: -len(DLQ_SUFFIX)]
        else:
            return None  # empty and unnamed: nothing to report, ask again later
        self._topic_destination[topic] = name
        return name

    async def _scan(
        self, topic: str, ranges: Mapping[int, tuple[int, int]], visit: Callable[[Any], bool]
    ) -> None:
        """Read ``[start, end)`` of each partition, oldest first, calling ``visit(record)`` until it
        returns ``False`` (for that partition) or the end offset is reached. Bounded by the offsets and
        by the ``read_timeout`` of the enclosing :meth:`_reading`."""
        reader = await self._reader_ready()
        active: dict[Any, int] = {}
        for partition, (start, end) in ranges.items():
            if start < end:
                active[TopicPartition(topic, partition)] = end
        if not active:
            return
        reader.assign(builtins.list(active))
        for tp in active:
            reader.seek(tp, ranges[tp.partition][0])

        def finish(tp: Any) -> None:
            del active[tp]
            reader.pause(tp)  # read to its end: no more fetches (see _watermarks)

        while active:
            batch = await reader.getmany(*active, timeout_ms=200, max_records=_FETCH_RECORDS)
            for tp, records in batch.items():
                stop = active.get(tp)
                if stop is None:
                    continue
                for record in records:
                    if record.offset >= stop or not visit(record) or record.offset + 1 >= stop:
                        finish(tp)
                        break
            if not batch:
                # nothing came: a gap (compacted away) may sit before the end offset
                for tp, end in builtins.list(active.items()):
                    if await reader.position(tp) >= end:
                        finish(tp)


def _entry_of(record: Any) -> DeadLetterEntry | None:
    return decode_record(
        record.topic, record.partition, record.offset, record.key, record.value, record.headers or ()
    )


def _entry_order(entry: DeadLetterEntry) -> tuple[float, str, int, int]:
    parsed = parse_entry_id(entry.entry_id or "")
    topic, partition, offset = parsed if parsed is not None else ("", 0, 0)
    return (entry.dead_lettered_at, topic, partition, offset)


def _describe(exc: BaseException, bound: float) -> str:
    """``Type: text`` of an error, once (aiokafka's texts often start with their class name already);
    our own deadline (a bare ``TimeoutError``) says which bound ran out."""
    if type(exc) is TimeoutError:
        return f"no answer within {bound:g} s"
    name = type(exc).__name__
    try:
        text = " ".join(str(exc).split())
    except Exception:
        text = ""
    if not text or text == name or text.startswith(name + ":"):
        return text or name
    return f"{name}: {text}"
