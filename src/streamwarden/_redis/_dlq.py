"""The Redis Streams dead-letter store: one stream per destination, never trimmed silently.

Layout (``prefix`` is ``key_prefix``, ``streamwarden`` by default)::

    {prefix}:dlq:{destination}     a Redis Stream of entries (XADD), one per destination
    {prefix}:dlq-index             a hash: destination -> stream key, the known destinations

Destinations made only of ``[A-Za-z0-9_.:-]`` (at most 200 characters) are used as they are; any other
destination (spaces, ``{}``, non-ASCII, very long) is keyed by ``#`` + the SHA-256 of its UTF-8 bytes, so
keys stay printable, bounded and free of Redis Cluster hash tags. The index maps back to the real name,
so listing, counting and purging never scan the keyspace (no ``KEYS``/``SCAN``).

**Entry ids** are ``"{destination}/{stream id}"`` (``orders/1718000000000-0``): the stream id is the
``XADD`` reply, and the destination tells :meth:`RedisDeadLetterStore.get` and ``delete`` which stream to
read. Destinations may contain ``/``: the id is split at its *last* ``/``.

**Writes.** ``add`` checks the stream length and appends in one Lua script, so with
``max_entries_per_destination`` a full queue refuses the write (:class:`~streamwarden.DeadLetterQueueFullError`)
instead of trimming older entries. Any Redis failure (``NOPERM``, ``OOM``, connection) raises
:class:`~streamwarden.DeadLetterError` from the original error: the write was not confirmed and the
message must not be acknowledged.

**Fields.** Every :class:`~streamwarden.DeadLetterEntry` field is stored as text, plus ``traceparent``:

* ``payload`` is JSON (``payload_encoding=json``); ``bytes`` payloads are base64 (``base64``); anything
  JSON cannot encode is stored as its ``repr`` (``repr``) and cannot be replayed;
* an encoded payload above ``max_payload_bytes`` is left out (``payload_encoding=omitted``,
  ``payload_omitted_reason=oversize``, ``payload_size`` = its encoded size): the entry keeps the metadata;
* ``error_message``, ``traceback`` and header values are redacted by ``redact_patterns`` before they
  are written (:meth:`~streamwarden.Redactor.entry`, the same as the embedded store); the traceback is
  bounded again (its last ``max_traceback_chars`` characters). The payload itself is stored as it is,
  because a replay needs it;
* every text field is encoded so that no ``str`` can fail the write: UTF-8 with ``surrogateescape``
  (text decoded from non-UTF-8 bytes round-trips), lone surrogates that no bytes produce as ``\\udXXX``
  escapes; a message id that is not UTF-8 is kept exactly (``message_id_b64``, and
  ``message_id_codec=surrogatepass`` for lone surrogates);
* ``consumer_group`` (when known) names the group that failed the message: with the destination, the
  dedup scope a replay runs in.

Reading an entry whose payload was not stored gives an :class:`OmittedPayload` as ``entry.payload``.
"""

from __future__ import annotations

import base64
import builtins
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from redis.exceptions import RedisError

from .._dlq import (
    DEFAULT_REDACT_HEADER_NAMES,
    DEFAULT_REDACT_PATTERNS,
    REDACTED,
    DeadLetterEntry,
    OmittedPayload,
    Redactor,
    entry_matches,
)
from .._exceptions import DeadLetterError, DeadLetterQueueFullError
from ._wire import as_text, encode_text, safe_key_part

__all__ = [
    "DEFAULT_REDACT_HEADER_NAMES",
    "DEFAULT_REDACT_PATTERNS",
    "REDACTED",
    "OmittedPayload",
    "Redactor",
    "RedisDeadLetterStore",
    "parse_entry_id",
    "safe_key_part",
]

_SCHEMA_VERSION: Final = "1"
_STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_PAGE = 256
# Stream ids carry the Redis server's clock, ``dead_lettered_at`` the writer's: time filters read a
# stream range widened by this much, then filter exactly on ``dead_lettered_at``.
_CLOCK_SKEW_ALLOWANCE_MS: Final = 3_600_000
_MAX_PREVIEW_CHARS: Final = 4096


def parse_entry_id(entry_id: str) -> tuple[str, str] | None:
    """Split ``"{destination}/{stream id}"`` into its parts; ``None`` when it is not such an id."""
    destination, sep, stream_id = entry_id.rpartition("/")
    if not sep or not destination or not _STREAM_ID.fullmatch(stream_id):
        return None
    return destination, stream_id


# KEYS[1] stream. ARGV[1] capacity (0: unbounded). ARGV[2..] field, value, ...
# Replies {1, id, length} when appended, {0, length} when the stream is full (nothing written).
_ADD_SCRIPT = """
local cap = tonumber(ARGV[1])
local len = redis.call('XLEN', KEYS[1])
if cap > 0 and len >= cap then
  return {0, len}
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
return {1, id, len + 1}
"""

# KEYS[1] stream. ARGV[1] capacity, ARGV[2] n, ARGV[3 .. 2+n] ids to remove, then field, value, ...
# Appends the new entry and deletes the old ones atomically; the capacity check counts the removals.
_REPLACE_SCRIPT = """
local cap = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local present = 0
for i = 3, 2 + n do
  if #redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i]) > 0 then present = present + 1 end
end
local len = redis.call('XLEN', KEYS[1])
if cap > 0 and len - present >= cap then
  return {0, len}
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3 + n))
for i = 3, 2 + n do
  redis.call('XDEL', KEYS[1], ARGV[i])
end
return {1, id, redis.call('XLEN', KEYS[1])}
"""

# KEYS[1] stream. Deletes it; replies how many entries it held.
# Claim or renew the right to report one destination's depth: KEYS[1] the owner key; ARGV = token, ttl ms.
_DEPTH_OWNER_SCRIPT: Final = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_PURGE_SCRIPT = """
local n = redis.call('XLEN', KEYS[1])
redis.call('DEL', KEYS[1])
return n
"""


class RedisDeadLetterStore:
    """Dead letters in Redis Streams, one stream per destination (see the module docstring).

    ``client`` is a ``redis.asyncio.Redis`` (``decode_responses`` either way). Implements
    :class:`~streamwarden.DeadLetterStore`; :meth:`depths` answers from a cache without I/O, for the
    ``streamwarden.dlq.depth`` gauge, and :meth:`refresh_depths` re-reads it.
    """

    def __init__(
        self,
        client: Any,
        *,
        key_prefix: str = "streamwarden",
        max_payload_bytes: int = 1_048_576,
        redact_patterns: Iterable[str | re.Pattern[str]] = DEFAULT_REDACT_PATTERNS,
        redact_header_names: Iterable[str] = DEFAULT_REDACT_HEADER_NAMES,
        max_entries_per_destination: int | None = None,
        max_traceback_chars: int = 65_536,
        depth_owner_ttl: float = 15.0,
    ) -> None:
        if max_payload_bytes < 0:
            raise ValueError("max_payload_bytes must not be negative")
        if max_entries_per_destination is not None and max_entries_per_destination < 1:
            raise ValueError("max_entries_per_destination must be at least 1 (or None)")
        self.client = client
        self.key_prefix = key_prefix
        self.max_payload_bytes = max_payload_bytes
        self.max_entries_per_destination = max_entries_per_destination
        self.max_traceback_chars = max_traceback_chars
        self.redactor = Redactor(redact_patterns, header_names=redact_header_names)
        self.index_key = f"{key_prefix}:dlq-index"
        self._add = client.register_script(_ADD_SCRIPT)
        self._replace = client.register_script(_REPLACE_SCRIPT)
        self._purge = client.register_script(_PURGE_SCRIPT)
        self._registered: set[str] = set()
        self._depths: dict[str, int] = {}
        # One exporter per destination across the fleet (see refresh_depths): this store's token, the
        # destinations it currently reports, and whether it takes part in the election at all.
        self._depth_token = os.urandom(8).hex()
        self._depth_owner_ms = str(max(1, round(depth_owner_ttl * 1000)))
        self._owned: set[str] = set()
        self._electing = False

    # --- keys -----------------------------------------------------------------------------------
    def stream_key(self, destination: str) -> str:
        """The Redis key of the stream holding ``destination``'s dead letters."""
        return f"{self.key_prefix}:dlq:{safe_key_part(destination)}"

    def queue_name(self, destination: str) -> str:
        """Where ``destination``'s dead letters are written: its stream key (see :class:`NamedQueues`)."""
        return self.stream_key(destination)

    # --- writes ---------------------------------------------------------------------------------
    async def add(self, entry: DeadLetterEntry) -> str:
        """Append ``entry``; returns ``"{destination}/{stream id}"`` once Redis confirmed the write.

        Raises :class:`DeadLetterQueueFullError` when the destination holds
        ``max_entries_per_destination`` entries, :class:`DeadLetterError` when Redis refused or failed.
        """
        destination = entry.destination
        key = self.stream_key(destination)
        cap = self.max_entries_per_destination or 0
        try:
            await self._register(destination, key)
            reply = await self._add(keys=[key], args=[cap, *self._encode(entry)])
        except (RedisError, OSError) as exc:
            raise DeadLetterError(f"dead-letter write to {destination!r} failed: {exc}") from exc
        return self._confirmed(destination, reply)

    async def replace(self, entry: DeadLetterEntry, remove: Sequence[str]) -> str:
        """Append ``entry`` and delete the entries ``remove`` in one atomic step; returns the new id.

        Used by the replayer when a replayed message fails again: exactly one entry remains. Every id
        in ``remove`` must belong to ``entry.destination`` (``ValueError`` otherwise). Raises like
        :meth:`add`; on failure nothing was added or removed.
        """
        destination = entry.destination
        stream_ids: list[str] = []
        for entry_id in remove:
            parsed = parse_entry_id(entry_id)
            if parsed is None or parsed[0] != destination:
                raise ValueError(f"{entry_id!r} is not an entry of destination {destination!r}")
            stream_ids.append(parsed[1])
        key = self.stream_key(destination)
        cap = self.max_entries_per_destination or 0
        try:
            await self._register(destination, key)
            reply = await self._replace(
                keys=[key], args=[cap, len(stream_ids), *stream_ids, *self._encode(entry)]
            )
        except (RedisError, OSError) as exc:
            raise DeadLetterError(f"dead-letter write to {destination!r} failed: {exc}") from exc
        return self._confirmed(destination, reply)

    async def _register(self, destination: str, key: str) -> None:
        # Registered once per process; the index is never shrunk, so another process's purge cannot
        # leave a stream that the index does not know.
        if destination not in self._registered:
            await self.client.hset(self.index_key, encode_text(destination), key)
            self._registered.add(destination)

    def _confirmed(self, destination: str, reply: Sequence[Any]) -> str:
        if int(reply[0]) != 1:
            depth = int(reply[1])
            self._depths[destination] = depth
            raise DeadLetterQueueFullError(
                f"dead-letter queue of {destination!r} is full ({depth} entries, limit "
                f"{self.max_entries_per_destination}); replay or purge entries"
            )
        self._depths[destination] = int(reply[2])
        return f"{destination}/{as_text(reply[1])}"

    async def delete(self, entry_id: str) -> bool:
        """Remove one entry; ``False`` when it was not there (or ``entry_id`` is not one of ours)."""
        parsed = parse_entry_id(entry_id)
        if parsed is None:
            return False
        destination, stream_id = parsed
        removed = int(await self.client.xdel(self.stream_key(destination), stream_id))
        if removed and destination in self._depths:
            self._depths[destination] = max(0, self._depths[destination] - removed)
        return removed > 0

    async def purge(self, destination: str | None = None) -> int:
        """Remove every entry (of one destination); returns how many."""
        names = [destination] if destination is not None else await self._known()
        total = 0
        for name in names:
            total += int(await self._purge(keys=[self.stream_key(name)]))
            self._depths[name] = 0
        return total

    # --- reads ----------------------------------------------------------------------------------
    async def get(self, entry_id: str) -> DeadLetterEntry | None:
        """The entry with ``entry_id`` (``"{destination}/{stream id}"``), or ``None``."""
        parsed = parse_entry_id(entry_id)
        if parsed is None:
            return None
        destination, stream_id = parsed
        rows = await self.client.xrange(self.stream_key(destination), stream_id, stream_id)
        if not rows:
            return None
        row_id, fields = rows[0]
        return self.decode(destination, as_text(row_id), fields)

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
        """Entries oldest first (by ``dead_lettered_at``), filtered by destination, error type/class
        and ``dead_lettered_at``."""
        if limit <= 0:
            return []
        names = [destination] if destination is not None else await self._known()
        found: builtins.list[tuple[tuple[int, int], DeadLetterEntry]] = []
        for name in names:
            found.extend(
                await self._scan(name, limit, error_type, error_class, since, until)  # oldest first each
            )
        # one stream is in arrival order; across streams, order by the time of dead-lettering
        found.sort(key=lambda pair: (pair[1].dead_lettered_at, pair[0]))
        return [entry for _, entry in found[:limit]]

    async def _scan(
        self,
        destination: str,
        limit: int,
        error_type: str | None,
        error_class: str | None,
        since: float | None,
        until: float | None,
    ) -> builtins.list[tuple[tuple[int, int], DeadLetterEntry]]:
        key = self.stream_key(destination)
        start = "-" if since is None else str(max(0, int(since * 1000) - _CLOCK_SKEW_ALLOWANCE_MS))
        stop_ms = None if until is None else int(until * 1000) + _CLOCK_SKEW_ALLOWANCE_MS
        out: builtins.list[tuple[tuple[int, int], DeadLetterEntry]] = []
        while len(out) < limit:
            rows = await self.client.xrange(key, start, "+", count=_PAGE)
            if not rows:
                break
            for raw_id, fields in rows:
                stream_id = as_text(raw_id)
                ms, seq = (int(part) for part in stream_id.split("-"))
                if stop_ms is not None and ms > stop_ms:
                    return out
                entry = self.decode(destination, stream_id, fields)
                if not entry_matches(entry, None, error_type, error_class, since, until):
                    continue
                out.append(((ms, seq), entry))
                if len(out) >= limit:
                    break
            if len(rows) < _PAGE:
                break
            start = "(" + as_text(rows[-1][0])
        return out

    async def count(self, destination: str | None = None) -> int:
        """Number of entries (in one destination, or in all)."""
        if destination is not None:
            depth = int(await self.client.xlen(self.stream_key(destination)))
            self._depths[destination] = depth
            return depth
        return sum((await self._read_depths()).values())

    async def destinations(self) -> builtins.list[str]:
        """Destinations that currently have entries."""
        return sorted(d for d, n in (await self._read_depths()).items() if n > 0)

    async def _read_depths(self, *, elect: bool = False) -> dict[str, int]:
        """The depth of every known destination, read in one pipelined round trip (plus the index); with
        ``elect``, also claim or renew the right to report each one (see :meth:`refresh_depths`)."""
        names = await self._known()
        if not names:
            self._depths = {}
            if elect:
                self._owned = set()
            return {}
        per_name = 2 if elect else 1
        async with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.xlen(self.stream_key(name))
                if elect:
                    pipe.eval(
                        _DEPTH_OWNER_SCRIPT,
                        1,
                        self._depth_owner_key(name),
                        self._depth_token,
                        self._depth_owner_ms,
                    )
            replies = await pipe.execute()
        lengths = replies[0::per_name]
        self._depths = {name: int(n) for name, n in zip(names, lengths, strict=True)}
        if elect:
            mine = replies[1::per_name]
            self._owned = {name for name, won in zip(names, mine, strict=True) if int(won) == 1}
        return dict(self._depths)

    async def refresh_depths(self) -> dict[str, int]:
        """Re-read the depth of every known destination (one pipelined round trip plus the index).

        It also takes part in electing one reporter per destination for the ``streamwarden.dlq.depth``
        gauge: the first store to claim ``{prefix}:dlq-depth-owner:{destination}`` (a key with a TTL of
        ``depth_owner_ttl``, renewed by every refresh of its owner) reports it, the others do not, so a
        fleet of consumers exports each queue's depth once and a ``sum`` over instances is right. When
        the owner dies its key expires and the next refresh of another store takes over.
        """
        self._electing = True
        return await self._read_depths(elect=True)

    def depths(self) -> dict[str, int]:
        """Destination -> entries, from the cache (no I/O: safe in a metric callback).

        Once this store refreshes (a runner does, periodically), only the destinations it was elected to
        report; before that, what it knows from its own writes.
        """
        return {d: n for d, n in self._depths.items() if n > 0 and (not self._electing or d in self._owned)}

    def _depth_owner_key(self, destination: str) -> str:
        return f"{self.key_prefix}:dlq-depth-owner:{safe_key_part(destination)}"

    async def _known(self) -> builtins.list[str]:
        names = sorted(as_text(n) for n in await self.client.hkeys(self.index_key))
        self._registered.update(names)
        return names

    # --- encoding -------------------------------------------------------------------------------
    def _encode(self, entry: DeadLetterEntry) -> builtins.list[str | bytes]:
        """Flat field/value list for XADD (see the module docstring for the fields).

        Every text field is encoded by :func:`encode_text`, so no ``str`` (lone surrogates included)
        can make the write fail: a message that cannot be dead-lettered would fail forever.
        """
        entry = self.redactor.entry(entry, self.max_traceback_chars)
        fields: builtins.list[str | bytes] = ["v", _SCHEMA_VERSION]
        if entry.message_id is not None:
            fields += _message_id_fields(entry.message_id)
        fields += ["destination", encode_text(entry.destination)]
        fields += self._encode_payload(entry.payload)
        fields += [
            "reason", encode_text(entry.reason),
            "error_type", encode_text(entry.error_type),
            "error_class", encode_text(entry.error_class),
            "error_message", encode_text(entry.error_message),
            "attempts", str(entry.attempts),
            "service", encode_text(entry.service),
            "headers", json.dumps(entry.headers, ensure_ascii=True),
            "traceback", encode_text(entry.traceback),
            "first_failed_at", repr(float(entry.first_failed_at)),
            "dead_lettered_at", repr(float(entry.dead_lettered_at)),
            "delivery_count", str(entry.delivery_count),
        ]  # fmt: skip
        if entry.source_ref is not None:
            fields += ["source_ref", encode_text(entry.source_ref)]
        if entry.consumer_group is not None:
            fields += ["consumer_group", encode_text(entry.consumer_group)]
        if entry.earlier_traces:
            fields += ["earlier_traces", json.dumps(list(entry.earlier_traces))]
        if entry.trace_id:
            fields += ["trace_id", encode_text(entry.trace_id)]
        if entry.span_id:
            fields += ["span_id", encode_text(entry.span_id)]
        traceparent = entry.traceparent
        if traceparent:
            fields += ["traceparent", encode_text(traceparent)]
        return fields

    def _encode_payload(self, payload: Any) -> builtins.list[str | bytes]:
        if isinstance(payload, OmittedPayload):  # re-adding an entry read back from a store
            return _omitted_fields(payload.reason, payload.size, payload.preview)
        encoding = "json"
        if isinstance(payload, bytes | bytearray | memoryview):
            encoding, text = "base64", base64.b64encode(bytes(payload)).decode("ascii")
        else:
            try:
                text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"), allow_nan=True)
            except (TypeError, ValueError, RecursionError):
                encoding, text = "repr", _safe_repr(payload)
        size = len(text)  # ASCII only: characters are bytes
        if size > self.max_payload_bytes:
            preview = text[:_MAX_PREVIEW_CHARS] if encoding == "repr" else ""
            return _omitted_fields("oversize", size, preview)
        return ["payload", text, "payload_encoding", encoding, "payload_size", str(size)]

    def decode(self, destination: str, stream_id: str, raw: Mapping[Any, Any]) -> DeadLetterEntry:
        """Build the :class:`DeadLetterEntry` of one stream entry (fields as XRANGE returns them)."""
        fields = {as_text(k): v for k, v in raw.items()}

        def field(name: str, default: str = "") -> str:
            value = fields.get(name)
            return default if value is None else as_text(value)

        def optional(name: str) -> str | None:
            value = fields.get(name)
            return None if value is None else as_text(value)

        message_id = optional("message_id")
        if message_id is None and "message_id_b64" in fields:
            codec = "surrogatepass" if field("message_id_codec") == "surrogatepass" else "surrogateescape"
            message_id = base64.b64decode(field("message_id_b64")).decode("utf-8", codec)
        try:
            headers = json.loads(field("headers", "{}"))
        except ValueError:
            headers = {}
        return DeadLetterEntry(
            message_id=message_id,
            destination=field("destination", destination),
            payload=_decode_payload(fields),
            reason=field("reason"),
            error_type=field("error_type"),
            error_class=field("error_class"),
            error_message=field("error_message"),
            attempts=int(field("attempts", "0")),
            service=field("service"),
            headers=headers if isinstance(headers, dict) else {},
            traceback=field("traceback"),
            first_failed_at=float(field("first_failed_at", "0")),
            dead_lettered_at=float(field("dead_lettered_at", "0")),
            delivery_count=int(field("delivery_count", "1")),
            source_ref=optional("source_ref"),
            consumer_group=optional("consumer_group"),
            earlier_traces=_earlier_traces(optional("earlier_traces")),
            trace_id=optional("trace_id"),
            span_id=optional("span_id"),
            entry_id=f"{destination}/{stream_id}",
        )


def _message_id_fields(message_id: str) -> list[str | bytes]:
    """The id as text, or the base64 of its exact bytes when it is not UTF-8: bytes decoded with
    ``surrogateescape``, or lone surrogates no bytes produce (then ``message_id_codec=surrogatepass``)."""
    try:
        return ["message_id", message_id.encode("utf-8")]
    except UnicodeEncodeError:
        pass
    try:
        data, codec = message_id.encode("utf-8", "surrogateescape"), ""
    except UnicodeEncodeError:
        data, codec = message_id.encode("utf-8", "surrogatepass"), "surrogatepass"
    fields: list[str | bytes] = ["message_id_b64", base64.b64encode(data).decode("ascii")]
    if codec:
        fields += ["message_id_codec", codec]
    return fields


def _omitted_fields(reason: str, size: int, preview: str) -> list[str | bytes]:
    fields: list[str | bytes] = [
        "payload_encoding", "omitted",
        "payload_omitted_reason", reason,
        "payload_size", str(size),
    ]  # fmt: skip
    if preview:
        fields += ["payload_preview", encode_text(preview)]
    return fields


def _safe_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not lose the dead letter
        text = f"<unrepresentable {type(value).__name__}: {exc!r}>"
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _decode_payload(fields: Mapping[str, Any]) -> Any:
    encoding = as_text(fields.get("payload_encoding", "json"))
    if encoding == "json":
        return json.loads(as_text(fields.get("payload", "null")))
    if encoding == "base64":
        return base64.b64decode(as_text(fields.get("payload", "")))
    if encoding == "repr":
        text = as_text(fields.get("payload", ""))
        return OmittedPayload("not_json", int(as_text(fields.get("payload_size", "0"))), text)
    reason = as_text(fields.get("payload_omitted_reason", encoding))
    preview = fields.get("payload_preview")
    return OmittedPayload(
        reason=reason,
        size=int(as_text(fields.get("payload_size", "0"))),
        preview="" if preview is None else as_text(preview),
    )


def _earlier_traces(raw: str | None) -> tuple[str, ...]:
    """The ``earlier_traces`` field: a JSON list of traceparents; anything else reads as none."""
    if not raw:
        return ()
    try:
        value = json.loads(raw)
    except ValueError:
        return ()
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()
