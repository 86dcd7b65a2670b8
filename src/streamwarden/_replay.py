"""Replaying dead letters through the reliability layer.

:class:`DeadLetterReplayer` selects entries (by id, or by destination, error type/class and time),
and runs each payload through :meth:`ReliabilityLayer.process` again, under a CONSUMER span
``process {destination}.dlq`` that *links* to the failed ``process`` span recorded in the entry (and
to the producer's context from the message's ``traceparent`` header, when there is one). The layer's
own ``process`` span becomes a child of the replay span.

Rules, per entry:

* **dedup-aware**: an id the layer's dedup store already holds as completed is reported
  ``skipped_duplicate`` and not executed, unless ``force=True`` (then the record is forgotten first).
  The entry stays: it is removed only after a successful run.
* **processed**: the entry is removed after :class:`~streamwarden.Outcome` ``PROCESSED`` (the layer has
  completed the dedup record by then, so a later replay of the same id is a no-op).
* **failed again**: the layer dead-letters the message anew. The replayer then replaces the new entry
  and the replayed one by a single entry carrying ``attempts`` = old attempts + new attempts and the
  original ``first_failed_at``, written before the two are deleted (atomically on stores that offer
  ``replace(entry, remove)``, as :class:`~streamwarden.RedisDeadLetterStore` does; in that order
  otherwise). Exactly one entry remains, and a crash midway leaves extra entries, never none.
  When the layer could not dead-letter (``Outcome.FAILED``), the old entry is kept as it is.
* **headers do not grow**: replay headers (``streamwarden-replay-*``) are replaced, never appended.
* **not replayable**: entries without a message id or whose payload was not stored
  (:class:`~streamwarden.OmittedPayload`) are reported ``failed`` and kept.
* an open circuit breaker (``Outcome.DEFERRED``) stops the run: the rest would be deferred too.

The processor receives what the consumer received. By default (``pass_envelope=None``) that is the
:class:`~streamwarden.Envelope` when the entry has a ``source_ref`` (it came from a stream runner, whose
handlers take envelopes) and the entry's payload otherwise (for plain dict messages, the whole
message); ``True`` / ``False`` force one or the other. Replays are paced by a token bucket
(``rate_per_second``, on the injected ``clock`` and ``sleep``) and counted as
``streamwarden.dlq.replays{streamwarden.dlq.replay.result}``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry.trace import Link, SpanContext, Status, StatusCode, TraceFlags

from . import _names as n
from ._dedup import DedupStore, RecordState
from ._dlq import DeadLetterEntry, DeadLetterStore, OmittedPayload, ReplacingStore, entry_matches
from ._envelope import Envelope
from ._exceptions import CircuitOpenError
from ._types import Outcome

if TYPE_CHECKING:
    from ._layer import ProcessResult, ReliabilityLayer

__all__ = [
    "DeadLetterReplayer",
    "ReplayItem",
    "ReplayProgress",
    "ReplayReport",
    "ReplayResult",
    "TokenBucket",
]

log = logging.getLogger("streamwarden.dlq")

#: Header naming the entry a replayed message came from (replaced on every replay).
HEADER_REPLAY_OF = n.HEADER_REPLAY_OF
#: Header counting how many times the message was replayed (replaced on every replay).
HEADER_REPLAY_COUNT = n.HEADER_REPLAY_COUNT
_REPLAY_HEADER_PREFIX = "streamwarden-replay-"

#: Upper bound on the entries selected by one run when no ``limit`` is given.
DEFAULT_SELECTION_LIMIT = 100_000


class ReplayResult(enum.StrEnum):
    """Result of replaying one entry (the ``streamwarden.dlq.replay.result`` attribute)."""

    PROCESSED = "processed"
    SKIPPED_DUPLICATE = "skipped_duplicate"
    FAILED = "failed"
    DRY_RUN = "dry_run"


@dataclass(frozen=True, slots=True)
class ReplayItem:
    """What happened to one entry.

    ``outcome`` is the layer's :class:`~streamwarden.Outcome` value when the message was run (``None``
    otherwise); ``new_entry_id`` is the entry left after a re-failure.
    """

    entry_id: str
    message_id: str | None
    destination: str
    result: ReplayResult
    detail: str = ""
    attempts: int = 0
    new_entry_id: str | None = None
    outcome: str | None = None


@dataclass(slots=True)
class ReplayReport:
    """Every entry a replay run looked at, in order; ``missing`` lists requested ids not found."""

    items: list[ReplayItem] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    stopped: str | None = None

    def counts(self) -> dict[str, int]:
        """Result -> number of entries (every result present)."""
        out = {str(r): 0 for r in ReplayResult}
        for item in self.items:
            out[str(item.result)] += 1
        return out

    @property
    def processed(self) -> int:
        """Entries replayed successfully (and removed)."""
        return self.counts()[ReplayResult.PROCESSED]

    @property
    def failed(self) -> int:
        """Entries that failed again or could not be replayed."""
        return self.counts()[ReplayResult.FAILED]

    @property
    def skipped_duplicate(self) -> int:
        """Entries whose id was already completed (not executed)."""
        return self.counts()[ReplayResult.SKIPPED_DUPLICATE]


class ReplayProgress(Protocol):
    """Called after each entry with the item, how many are done, and how many were selected."""

    def __call__(self, item: ReplayItem, done: int, total: int) -> object: ...


class TokenBucket:
    """Paces calls to ``rate`` per second (bucket of one token) on an injected clock and sleep."""

    def __init__(
        self,
        rate: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate_per_second must be positive (or None for no limit)")
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._next: float | None = None

    async def acquire(self) -> None:
        """Wait until the next call is allowed."""
        if self.rate is None:
            return
        now = self._clock()
        if self._next is not None and self._next > now:
            await self._sleep(self._next - now)
            now = self._clock()
        self._next = max(now, self._next or now) + 1.0 / self.rate


def _span_context(traceparent: str | None) -> SpanContext | None:
    """The remote span context of a W3C ``traceparent``, or ``None`` when absent or malformed."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    ctx = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 0x01))
    return ctx if ctx.is_valid else None


def replay_headers(headers: Mapping[str, Any], entry_id: str) -> dict[str, str]:
    """``headers`` with the replay headers set (replacing any earlier ones): they never grow."""
    out = {str(k): str(v) for k, v in headers.items() if not str(k).startswith(_REPLAY_HEADER_PREFIX)}
    try:
        count = int(str(headers.get(HEADER_REPLAY_COUNT, "0"))) + 1
    except ValueError:
        count = 1
    out[HEADER_REPLAY_OF] = entry_id
    out[HEADER_REPLAY_COUNT] = str(count)
    return out


class DeadLetterReplayer:
    """Re-runs dead letters from ``store`` through ``layer`` (see the module docstring).

    ``store`` should be the layer's own dead-letter store (``layer.dead_letter_store``), so a
    re-failure lands where the replayed entry was; a different store is refused.
    """

    def __init__(
        self,
        layer: ReliabilityLayer,
        store: DeadLetterStore | None = None,
        *,
        rate_per_second: float | None = 50.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        own = layer.dead_letter_store
        if store is None:
            store = own
        elif store is not own:
            raise ValueError(
                "store must be the layer's dead-letter store (ReliabilityLayer(dead_letter_store=store)), "
                "or a re-failed replay would be written elsewhere"
            )
        self.layer = layer
        self.store = store
        self.bucket = TokenBucket(rate_per_second, clock=clock, sleep=sleep)
        del wall_clock  # accepted for compatibility: the dead-letter marker no longer needs the wall clock

    async def select(
        self,
        *,
        destination: str | None = None,
        entry_ids: Sequence[str] | None = None,
        error_type: str | None = None,
        error_class: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> tuple[list[DeadLetterEntry], list[str]]:
        """The entries a replay with these filters would touch, and the requested ids not found."""
        if entry_ids is None:
            entries = await self.store.list(
                destination,
                limit=DEFAULT_SELECTION_LIMIT if limit is None else limit,
                error_type=error_type,
                error_class=error_class,
                since=since,
                until=until,
            )
            return entries, []
        found: list[DeadLetterEntry] = []
        missing: list[str] = []
        for entry_id in dict.fromkeys(entry_ids):
            entry = await self.store.get(entry_id)
            if entry is None:
                missing.append(entry_id)
            elif entry_matches(entry, destination, error_type, error_class, since, until):
                found.append(entry)
        return (found if limit is None else found[:limit]), missing

    async def replay(
        self,
        processor: Callable[[Any], Awaitable[Any]],
        *,
        destination: str | None = None,
        entry_ids: Sequence[str] | None = None,
        error_type: str | None = None,
        error_class: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
        dry_run: bool = False,
        force: bool = False,
        pass_envelope: bool | None = None,
        progress: ReplayProgress | None = None,
    ) -> ReplayReport:
        """Replay the selected entries through the layer; returns what happened to each."""
        entries, missing = await self.select(
            destination=destination,
            entry_ids=entry_ids,
            error_type=error_type,
            error_class=error_class,
            since=since,
            until=until,
            limit=limit,
        )
        report = ReplayReport(missing=missing)
        total = len(entries)
        for done, entry in enumerate(entries, 1):
            if dry_run:
                item = await self._dry_run(entry, force)
            else:
                await self.bucket.acquire()
                item = await self._replay_one(entry, processor, force, pass_envelope)
            report.items.append(item)
            self._count(item)
            if progress is not None:
                try:
                    progress(item, done, total)
                except Exception:
                    log.exception("replay progress callback failed")
            if item.outcome == Outcome.DEFERRED:
                report.stopped = item.detail
                break
        return report

    # --- one entry --------------------------------------------------------------------------------
    def _unreplayable(self, entry: DeadLetterEntry) -> str | None:
        if not entry.message_id:
            return "entry has no message id: cannot be deduplicated, not replayed"
        if isinstance(entry.payload, OmittedPayload):
            return f"payload not stored ({entry.payload.reason}, {entry.payload.size} bytes): not replayed"
        return None

    async def _dry_run(self, entry: DeadLetterEntry, force: bool) -> ReplayItem:
        """What a replay would do, read-only: nothing is forgotten, claimed or run."""
        reason = self._unreplayable(entry)
        if reason is None:
            state = await self._record_state(entry)
            if state is RecordState.COMPLETED and not force:
                reason = "would skip: id already completed"
            elif state is RecordState.IN_PROGRESS:
                reason = "would skip for now: being processed by another owner"
            else:
                reason = "would replay"
        return self._item(entry, ReplayResult.DRY_RUN, reason)

    def _store_of(self, entry: DeadLetterEntry) -> DedupStore:
        return self.layer.dedup_store_for(entry.destination, entry.consumer_group)

    async def _record_state(self, entry: DeadLetterEntry) -> RecordState:
        """The dedup record of the entry's id, in the scope it was processed in.

        The layer marks a dead-lettered id with its own record state (``dead_lettered``, for one lease
        period) so a redelivery racing the acknowledgement is a duplicate; that marker is never taken for
        a real completion, so a completion by anyone (another replayer, a redelivery after the window) is
        always respected.
        """
        assert entry.message_id is not None
        return await self._store_of(entry).state(entry.message_id)

    async def _replay_one(
        self,
        entry: DeadLetterEntry,
        processor: Callable[[Any], Awaitable[Any]],
        force: bool,
        pass_envelope: bool | None,
    ) -> ReplayItem:
        telemetry = self.layer.telemetry
        destination = entry.destination
        links = [Link(ctx) for ctx in self._link_contexts(entry)]
        with telemetry.replay_span(
            destination, entry.entry_id or "", entry.message_id, links, n.MESSAGING_SYSTEM_DEFAULT
        ) as span:
            item = await self._run(entry, processor, force, pass_envelope)
            if span.is_recording():
                span.set_attribute(n.ATTR_REPLAY_RESULT, str(item.result))
                if item.result is ReplayResult.FAILED:
                    span.set_status(Status(StatusCode.ERROR, item.detail[:200]))
            return item

    @staticmethod
    def _link_contexts(entry: DeadLetterEntry) -> list[SpanContext]:
        """The failed process span, then the producer's context from the message headers."""
        contexts = []
        failed = _span_context(entry.traceparent)
        if failed is not None:
            contexts.append(failed)
        produced = _span_context(str(entry.headers.get("traceparent", "")) or None)
        if produced is not None and (failed is None or produced.span_id != failed.span_id):
            contexts.append(produced)
        return contexts

    async def _run(
        self,
        entry: DeadLetterEntry,
        processor: Callable[[Any], Awaitable[Any]],
        force: bool,
        pass_envelope: bool | None,
    ) -> ReplayItem:
        reason = self._unreplayable(entry)
        if reason is not None:
            return self._item(entry, ReplayResult.FAILED, reason)
        assert entry.message_id is not None
        assert entry.entry_id is not None
        state = await self._record_state(entry)
        if state is RecordState.COMPLETED and not force:
            return self._item(entry, ReplayResult.SKIPPED_DUPLICATE, "id already completed; not executed")
        if state is RecordState.COMPLETED or state is RecordState.DEAD_LETTERED:
            # forced, or this entry's own dead-letter marker: the record keeps its fencing token
            await self._store_of(entry).forget(entry.message_id)
        envelope = Envelope(
            id=entry.message_id,
            payload=entry.payload,
            headers=replay_headers(entry.headers, entry.entry_id),
            destination=entry.destination,
            source_ref=entry.source_ref,
            delivery_count=entry.delivery_count,
        )
        if pass_envelope is None:
            pass_envelope = entry.source_ref is not None
        if pass_envelope:
            call: Callable[[Any], Awaitable[Any]] = processor
        else:

            def call(env: Any) -> Awaitable[Any]:
                return processor(env.payload)

        result = await self.layer.process(
            envelope, call, destination=entry.destination, group=entry.consumer_group
        )
        return await self._settle(entry, result)

    async def _settle(self, entry: DeadLetterEntry, result: ProcessResult) -> ReplayItem:
        assert entry.entry_id is not None
        outcome = result.outcome
        if outcome is Outcome.PROCESSED:
            detail = ""
            try:
                if not await self.store.delete(entry.entry_id):
                    detail = "entry was already gone"
            except Exception as exc:  # the id is completed now: a later replay skips it as a duplicate
                detail = f"processed, but the entry could not be removed: {exc!r}"
            return self._item(
                entry, ReplayResult.PROCESSED, detail, attempts=result.attempts, outcome=outcome
            )
        if outcome is Outcome.DUPLICATE:
            return self._item(
                entry, ReplayResult.SKIPPED_DUPLICATE, "completed meanwhile; not executed", outcome=outcome
            )
        if outcome is Outcome.DEAD_LETTERED and result.dead_letter is not None:
            return await self._merge_refailure(entry, result.dead_letter, result)
        error = result.error
        if outcome is Outcome.DEFERRED and isinstance(error, CircuitOpenError):
            detail = f"circuit breaker open: {error}; entry kept"
        else:
            detail = f"{outcome}: {error!r}; entry kept"
        return self._item(entry, ReplayResult.FAILED, detail, attempts=result.attempts, outcome=outcome)

    async def _merge_refailure(
        self, old: DeadLetterEntry, new: DeadLetterEntry, result: ProcessResult
    ) -> ReplayItem:
        """Leave exactly one entry for a message that failed again: attempts add up."""
        assert old.entry_id is not None
        assert new.entry_id is not None
        # One entry per message, and nothing forgotten: the service that failed it stays (the replaying
        # command may run under another name), and every failed attempt's trace stays reachable.
        earlier = (*old.earlier_traces, *((old.traceparent,) if old.traceparent else ()))
        merged = replace(
            new,
            attempts=old.attempts + new.attempts,
            first_failed_at=old.first_failed_at or new.first_failed_at,
            service=old.service or new.service,
            trace_id=new.trace_id or old.trace_id,
            span_id=new.span_id or old.span_id,
            earlier_traces=earlier if new.traceparent else old.earlier_traces,
            consumer_group=old.consumer_group,
            entry_id=None,
        )
        error = f"failed again: {new.error_type}: {new.error_message}"
        remove = [new.entry_id, old.entry_id]
        try:
            if isinstance(self.store, ReplacingStore) and old.destination == new.destination:
                merged_id = await self.store.replace(merged, remove)
            else:
                merged_id = await self.store.add(merged)
                for entry_id in remove:
                    await self.store.delete(entry_id)
        except Exception as exc:  # both entries are still valid dead letters: nothing is lost
            log.warning("could not merge re-failed replay of %r: %r", old.entry_id, exc)
            return self._item(
                old,
                ReplayResult.FAILED,
                f"{error}; new entry {new.entry_id} kept beside the old one (merge failed: {exc!r})",
                attempts=result.attempts,
                new_entry_id=new.entry_id,
                outcome=result.outcome,
            )
        return self._item(
            old,
            ReplayResult.FAILED,
            error,
            attempts=merged.attempts,
            new_entry_id=str(merged_id),
            outcome=result.outcome,
        )

    @staticmethod
    def _item(
        entry: DeadLetterEntry,
        result: ReplayResult,
        detail: str = "",
        *,
        attempts: int = 0,
        new_entry_id: str | None = None,
        outcome: str | None = None,
    ) -> ReplayItem:
        return ReplayItem(
            entry_id=entry.entry_id or "",
            message_id=entry.message_id,
            destination=entry.destination,
            result=result,
            detail=detail,
            attempts=attempts,
            new_entry_id=new_entry_id,
            outcome=None if outcome is None else str(outcome),
        )

    def _count(self, item: ReplayItem) -> None:
        telemetry = self.layer.telemetry
        telemetry.dlq_replays.add(
            1,
            {
                n.ATTR_SERVICE_NAME: telemetry.service_name,
                n.ATTR_MESSAGING_DESTINATION: item.destination,
                n.ATTR_REPLAY_RESULT: str(item.result),
            },
        )
