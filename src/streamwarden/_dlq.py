"""Dead letters: the entry model every store shares, and the embedded in-memory store.

A :class:`DeadLetterEntry` holds what an operator needs to understand and replay a failed message:
the original message, why it failed (error type, class and message, a bounded traceback), how hard
we tried (attempts, delivery count), when, in which service, and the ``trace_id`` / ``span_id`` of the
failed ``process`` span so the operator can jump from the entry to its trace.

A write is *confirmed* when :meth:`DeadLetterStore.add` returns an entry id. Only then may a stream
runner acknowledge the original message. A store that cannot confirm raises
:class:`~streamwarden.DeadLetterError` (:class:`~streamwarden.DeadLetterQueueFullError` when full): the
message is then not acknowledged and nothing is lost or overwritten.
"""

from __future__ import annotations

import builtins
import enum
import itertools
import re
import time
import traceback as tb_module
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol, runtime_checkable

from ._exceptions import DeadLetterQueueFullError, error_type_name

__all__ = [
    "DEFAULT_REDACT_HEADER_NAMES",
    "DEFAULT_REDACT_PATTERNS",
    "REDACTED",
    "DeadLetterEntry",
    "DeadLetterReason",
    "DeadLetterStore",
    "DepthRefreshing",
    "DepthReporting",
    "InMemoryDeadLetterStore",
    "NamedQueues",
    "OmittedPayload",
    "Redactor",
    "ReplacingStore",
    "entry_matches",
    "error_type_name",
    "format_traceback",
    "format_traceback_safely",
    "tail_text",
]

MAX_ERROR_MESSAGE_CHARS = 2048


class DeadLetterReason(enum.StrEnum):
    """Why a message was dead-lettered (the ``streamwarden.dlq.reason`` attribute)."""

    ERROR = "error"
    MISSING_ID = "missing_id"
    INVALID_MESSAGE = "invalid_message"
    POISON = "poison"


def tail_text(text: str, max_chars: int) -> str:
    """``text`` cut to its last ``max_chars`` characters (the end of a traceback names the cause),
    behind a ``...[truncated]...`` marker when the limit leaves room for it; never longer than the limit."""
    if max_chars <= 0:
        return ""
    if len(text) <= max_chars:
        return text
    marker = "...[truncated]...\n"
    if max_chars <= len(marker):
        return text[len(text) - max_chars :]
    return marker + text[len(text) - (max_chars - len(marker)) :]


def format_traceback(error: BaseException, max_chars: int) -> str:
    """The formatted traceback of ``error``, keeping its last ``max_chars`` characters (the cause end)."""
    if max_chars <= 0:
        return ""
    return tail_text("".join(tb_module.format_exception(error)), max_chars)


def format_traceback_safely(error: BaseException, max_chars: int) -> str:
    """:func:`format_traceback`, or a short placeholder when the exception object breaks formatting
    (a ``__notes__`` that is not a list, a property that raises): describing a failure never fails."""
    try:
        return format_traceback(error, max_chars)
    except Exception as broken:
        return tail_text(f"<traceback unavailable: {type(broken).__name__}>", max_chars)


@dataclass(frozen=True, slots=True)
class OmittedPayload:
    """Stands in for a payload the entry does not hold; such an entry cannot be replayed.

    ``reason`` is ``oversize`` (larger than ``max_payload_bytes`` once encoded) or ``not_json`` (JSON
    cannot encode it; ``preview`` holds its ``repr``). ``size`` is the encoded size in bytes.
    """

    reason: str
    size: int
    preview: str = ""


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """One dead-lettered message; ``entry_id`` is assigned by the store that confirmed the write."""

    message_id: str | None
    destination: str
    payload: Any
    reason: str
    error_type: str
    error_class: str
    error_message: str
    attempts: int
    service: str
    headers: Mapping[str, str] = field(default_factory=dict)
    traceback: str = ""
    first_failed_at: float = 0.0
    dead_lettered_at: float = 0.0
    delivery_count: int = 1
    source_ref: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    #: the consumer group that failed it (with ``destination``, the dedup scope a replay runs in)
    consumer_group: str | None = None
    #: ``traceparent`` of every earlier failed attempt of this message (oldest first): a replay that fails
    #: again leaves one entry, and the traces of all its failures stay reachable from it
    earlier_traces: tuple[str, ...] = ()
    entry_id: str | None = None

    @property
    def traceparent(self) -> str | None:
        """W3C ``traceparent`` of the failed process span, for linking a replay to it."""
        if not self.trace_id or not self.span_id:
            return None
        return f"00-{self.trace_id}-{self.span_id}-01"

    def with_id(self, entry_id: str) -> DeadLetterEntry:
        """A copy carrying the store-assigned ``entry_id``."""
        return replace(self, entry_id=entry_id)

    @staticmethod
    def bound_message(text: str) -> str:
        """Cut an error message to :data:`MAX_ERROR_MESSAGE_CHARS`."""
        if len(text) <= MAX_ERROR_MESSAGE_CHARS:
            return text
        return text[: MAX_ERROR_MESSAGE_CHARS - 15] + "...[truncated]"


REDACTED: Final = "[REDACTED]"

_SECRET_NAMES: Final = (
    r"(?:password|passwd|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|secret[_-]?key"
    r"|client[_-]?secret|private[_-]?key|credentials?)"
)

#: Regular expressions whose matches are redacted. When a pattern has a group named ``secret`` only that
#: group is replaced by ``[REDACTED]`` (the key name stays readable); otherwise the whole match is.
DEFAULT_REDACT_PATTERNS: Final[tuple[str, ...]] = (
    # password=..., token: ..., "api_key": "...", client_secret=..., in URLs, logs, JSON and repr()s.
    # A quoted value is redacted up to its closing quote (spaces and escaped quotes included; to the end
    # of the line when the quote is never closed), an unquoted one up to whitespace or a delimiter; an
    # already redacted value is left alone, so redacting twice (layer, then store) changes nothing.
    r"(?i)" + _SECRET_NAMES + r"""["']?\s*[:=]\s*(?P<q>["'])?"""
    r"""(?P<secret>(?(q)(?:\\.|(?!(?P=q))[^\\\r\n])+|(?!\[REDACTED\])[^\s"'&,;}\]]+))""",
    # Authorization: Bearer <token> / Basic <credentials>
    r"(?i)\b(?:bearer|basic)\s+(?P<secret>[A-Za-z0-9._~+/=-]{6,})",
    # AWS access key ids
    r"\b(?P<secret>(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16})\b",
    # AWS secret access keys next to a telling name (aws_secret_access_key = ..., AWS_SECRET=...)
    r"""(?i)aws[A-Za-z_ -]{0,24}(?:secret|key)["']?\s*[:=]\s*["']?(?P<secret>[A-Za-z0-9/+=]{40})""",
    # user:password@ in URLs (redis://user:pw@host, https://user:pw@host). The password runs to the LAST
    # `@` of the URL, as the CLI parses it: a password may hold `@`, `/` or `#` unencoded, and stopping
    # at the first `@` printed the rest of it (over-redacting a later `@` in a query is the safe side).
    r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:(?P<secret>\S+)@",
)

#: Header names whose values are always redacted whole (case-insensitive).
DEFAULT_REDACT_HEADER_NAMES: Final[tuple[str, ...]] = (
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-auth-token",
)


class Redactor:
    """Redacts secrets from text and header values with a list of regular expressions.

    Every dead-letter store runs the error message, the traceback and the header values of an entry
    through one before storing it: secrets are never printed or stored.

    >>> Redactor().text("login failed: password=hunter2")
    'login failed: password=[REDACTED]'
    >>> Redactor().text('{"password": "correct horse battery", "user": "bob"}')
    '{"password": "[REDACTED]", "user": "bob"}'
    """

    __slots__ = ("_header_names", "_patterns")

    def __init__(
        self,
        patterns: Iterable[str | re.Pattern[str]] = DEFAULT_REDACT_PATTERNS,
        *,
        header_names: Iterable[str] = DEFAULT_REDACT_HEADER_NAMES,
    ) -> None:
        self._patterns = tuple(p if isinstance(p, re.Pattern) else re.compile(p) for p in patterns)
        self._header_names = frozenset(h.lower() for h in header_names)

    def text(self, text: str) -> str:
        """``text`` with every match of every pattern redacted."""
        for pattern in self._patterns:
            if "secret" in pattern.groupindex:
                text = pattern.sub(_redact_secret_group, text)
            else:
                text = pattern.sub(REDACTED, text)
        return text

    def headers(self, headers: Mapping[str, Any]) -> dict[str, str]:
        """Header values as text, redacted; values of sensitive header names are redacted whole."""
        out: dict[str, str] = {}
        for name, value in headers.items():
            key = str(name)
            out[key] = REDACTED if key.lower() in self._header_names else self.text(str(value))
        return out

    def entry(self, entry: DeadLetterEntry, max_traceback_chars: int) -> DeadLetterEntry:
        """``entry`` as a store keeps it: the error message redacted and bounded, the traceback redacted
        and then cut to its last ``max_traceback_chars`` characters, header values redacted; the
        payload as it is (a replay needs it)."""
        return replace(
            entry,
            error_message=DeadLetterEntry.bound_message(self.text(entry.error_message)),
            traceback=tail_text(self.text(entry.traceback), max_traceback_chars),
            headers=self.headers(entry.headers),
        )


def _redact_secret_group(match: re.Match[str]) -> str:
    start, end = match.span("secret")
    if start < 0:
        return REDACTED
    whole = match.group(0)
    offset = match.start()
    return whole[: start - offset] + REDACTED + whole[end - offset :]


def entry_matches(
    entry: DeadLetterEntry,
    destination: str | None = None,
    error_type: str | None = None,
    error_class: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> bool:
    """Whether ``entry`` passes the filters every store's ``list`` takes (``None`` filters nothing)."""
    return (
        (destination is None or entry.destination == destination)
        and (error_type is None or entry.error_type == error_type)
        and (error_class is None or entry.error_class == error_class)
        and (since is None or entry.dead_lettered_at >= since)
        and (until is None or entry.dead_lettered_at <= until)
    )


@runtime_checkable
class DeadLetterStore(Protocol):
    """Storage for dead letters; one logical queue per destination."""

    async def add(self, entry: DeadLetterEntry) -> str:
        """Store ``entry``; return its id once durable, or raise :class:`DeadLetterError`."""
        ...

    async def get(self, entry_id: str) -> DeadLetterEntry | None:
        """The entry with ``entry_id``, or ``None``."""
        ...

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
        """Entries oldest first, filtered by destination, error type/class and time (epoch seconds)."""
        ...

    async def count(self, destination: str | None = None) -> int:
        """Number of entries (in one destination, or in all)."""
        ...

    async def delete(self, entry_id: str) -> bool:
        """Remove one entry; ``False`` when it was not there."""
        ...

    async def purge(self, destination: str | None = None) -> int:
        """Remove every entry (of one destination); returns how many."""
        ...

    async def destinations(self) -> builtins.list[str]:
        """Destinations that currently have entries."""
        ...


@runtime_checkable
class DepthReporting(Protocol):
    """A store that knows its depth per destination without I/O (safe inside a metric callback)."""

    def depths(self) -> dict[str, int]:
        """Destination -> number of entries."""
        ...


@runtime_checkable
class DepthRefreshing(Protocol):
    """A shared store whose depth cache must be re-read to see other processes' writes."""

    async def refresh_depths(self) -> dict[str, int]:
        """Re-read the depth of every destination."""
        ...


@runtime_checkable
class NamedQueues(Protocol):
    """A store that can name where a destination's entries are written (for the ``send`` span)."""

    def queue_name(self, destination: str) -> str:
        """The queue (e.g. the Redis stream key) holding ``destination``'s dead letters."""
        ...


@runtime_checkable
class ReplacingStore(Protocol):
    """A store that can append one entry and delete others in one atomic step."""

    async def replace(self, entry: DeadLetterEntry, remove: Sequence[str]) -> str:
        """Append ``entry``, delete ``remove``; returns the new entry's id."""
        ...


class InMemoryDeadLetterStore:
    """The embedded dead-letter store: bounded, never drops or overwrites; full means the write fails.

    Entries are redacted on the way in as the Redis store does it (:meth:`Redactor.entry`): the error
    message, the traceback (then bounded to its last ``max_traceback_chars`` characters) and header
    values go through ``redact_patterns``, values of ``redact_header_names`` are redacted whole; the
    payload is kept for replay.
    """

    def __init__(
        self,
        *,
        max_entries: int = 100_000,
        redact_patterns: Iterable[str | re.Pattern[str]] = DEFAULT_REDACT_PATTERNS,
        redact_header_names: Iterable[str] = DEFAULT_REDACT_HEADER_NAMES,
        max_traceback_chars: int = 65_536,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.max_traceback_chars = max_traceback_chars
        self.redactor = Redactor(redact_patterns, header_names=redact_header_names)
        self._entries: dict[str, DeadLetterEntry] = {}
        self._depth: dict[str, int] = {}
        self._seq = itertools.count(1)

    async def add(self, entry: DeadLetterEntry) -> str:
        """Store ``entry``, redacted; raises :class:`DeadLetterQueueFullError` at capacity."""
        if len(self._entries) >= self.max_entries:
            raise DeadLetterQueueFullError(
                f"dead-letter store is full ({self.max_entries} entries); purge or replay entries"
            )
        entry_id = f"{int(time.time() * 1000)}-{next(self._seq)}"
        self._entries[entry_id] = self.redactor.entry(entry, self.max_traceback_chars).with_id(entry_id)
        self._depth[entry.destination] = self._depth.get(entry.destination, 0) + 1
        return entry_id

    async def get(self, entry_id: str) -> DeadLetterEntry | None:
        """The entry with ``entry_id``, or ``None``."""
        return self._entries.get(entry_id)

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
        """Entries oldest first, filtered (see :class:`DeadLetterStore`)."""
        found: builtins.list[DeadLetterEntry] = []
        for entry in self._entries.values():
            if len(found) >= limit:
                break
            if entry_matches(entry, destination, error_type, error_class, since, until):
                found.append(entry)
        return found

    async def count(self, destination: str | None = None) -> int:
        """Number of entries."""
        if destination is None:
            return len(self._entries)
        return self._depth.get(destination, 0)

    def depths(self) -> dict[str, int]:
        """Destination -> number of entries, without awaiting (for metric callbacks)."""
        return dict(self._depth)

    async def delete(self, entry_id: str) -> bool:
        """Remove one entry."""
        entry = self._entries.pop(entry_id, None)
        if entry is None:
            return False
        self._depth[entry.destination] -= 1
        return True

    async def purge(self, destination: str | None = None) -> int:
        """Remove every entry (of one destination)."""
        doomed = [k for k, e in self._entries.items() if destination is None or e.destination == destination]
        for key in doomed:
            await self.delete(key)
        return len(doomed)

    async def destinations(self) -> builtins.list[str]:
        """Destinations that currently have entries."""
        return sorted(d for d, n in self._depth.items() if n > 0)
