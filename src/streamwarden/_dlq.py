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
import itertools
import time
import traceback as tb_module
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from ._exceptions import DeadLetterQueueFullError

__all__ = [
    "DeadLetterEntry",
    "DeadLetterReason",
    "DeadLetterStore",
    "DepthRefreshing",
    "DepthReporting",
    "InMemoryDeadLetterStore",
    "OmittedPayload",
    "ReplacingStore",
    "entry_matches",
    "error_type_name",
    "format_traceback",
    "tail_text",
]

MAX_ERROR_MESSAGE_CHARS = 2048


class DeadLetterReason:
    """Why a message was dead-lettered (the ``streamwarden.dlq.reason`` attribute)."""

    ERROR = "error"
    MISSING_ID = "missing_id"
    INVALID_MESSAGE = "invalid_message"
    POISON = "poison"


def error_type_name(error: BaseException) -> str:
    """Low-cardinality ``error.type`` value: the exception's qualified name, module-prefixed unless builtin."""
    cls = type(error)
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


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
class ReplacingStore(Protocol):
    """A store that can append one entry and delete others in one atomic step."""

    async def replace(self, entry: DeadLetterEntry, remove: Sequence[str]) -> str:
        """Append ``entry``, delete ``remove``; returns the new entry's id."""
        ...


class InMemoryDeadLetterStore:
    """The embedded dead-letter store: bounded, never drops or overwrites; full means the write fails."""

    def __init__(self, *, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: dict[str, DeadLetterEntry] = {}
        self._depth: dict[str, int] = {}
        self._seq = itertools.count(1)

    async def add(self, entry: DeadLetterEntry) -> str:
        """Store ``entry``; raises :class:`DeadLetterQueueFullError` at capacity."""
        if len(self._entries) >= self.max_entries:
            raise DeadLetterQueueFullError(
                f"dead-letter store is full ({self.max_entries} entries); purge or replay entries"
            )
        entry_id = f"{int(time.time() * 1000)}-{next(self._seq)}"
        self._entries[entry_id] = entry.with_id(entry_id)
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
