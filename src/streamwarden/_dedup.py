"""Deduplication: claim an id before processing, complete it after, release it on failure.

The original module's check-then-mark (``EXISTS`` then ``SETEX``) lets two consumers run the same id at once.
streamwarden claims instead. A claim answers, atomically:

* ``NEW``: the caller now holds a :class:`Lease` (owner token, fencing token, expiry) and may process;
  :attr:`ClaimResult.attempt` counts the handler runs of the id, this one included;
* ``DUPLICATE``: the id was completed within the TTL, or dead-lettered within the marker window; do not
  process, acknowledge;
* ``IN_PROGRESS``: another owner holds a live lease; do not process, do not acknowledge;
* ``CONFLICT``: the id was completed with a *different* payload fingerprint (only when fingerprints
  are given); treated as a duplicate but counted and flagged.

A record moves between these states (:class:`RecordState`)::

    absent ──claim──► in_progress ──complete──────────► completed   (for the dedup TTL)
                        │  ▲  ├──release──────────────► released
                        │  │  └──mark_dead_lettered───► dead_lettered (for the window, then released)
                        │  └──claim (released, marker over, expired lease: a takeover)
                        └──forget (any state) ────────► released, attempt counter 0

``complete``, ``release``, ``extend`` and ``mark_dead_lettered`` are owner-checked: a stale owner whose
lease was taken over (or cut off by ``mark_completed`` / ``forget``) cannot complete, release, extend
or mark the new owner's record; it gets ``False`` / ``None``. A lease that ran out while nobody claimed the id is
still its owner's (nobody else can have started). Fencing tokens strictly increase per id across
every transition for as long as a record of the id exists: released, dead-lettered and in-progress
records are kept ``fence_retention`` seconds after their last change, completed ones for their TTL.
A downstream system can therefore reject writes from a stale owner
(``streamwarden.current_lease().fencing_token``).

The **attempt counter** lives in the record: +1 per ``NEW`` claim (a takeover of an expired lease
counts the dead owner's run, which was never released), -1 for ``release(attempted=False)`` (the
handler never ran: breaker open, stale lease, outage), reset by ``forget``. Poison detection reads it,
so deliveries lost to a crashed batch-mate or an open breaker never count.

**Scopes.** One store serves one scope (``store.scope``, ``"default"`` when built directly);
``store.scoped(name)`` gives the store of another scope, sharing the connection, clock and options
(the layer uses one scope per destination and consumer group, so two groups on one stream each
process every message).

Where duplicates can still happen (each is counted): a crash after the side effect but before
``complete``; a lease that expires while its owner is paused; a completed record lost (TTL, eviction,
failover). Every store implements :class:`DedupStore`; :class:`InMemoryDedupStore` is the embedded
default for one process, the Redis store shares the contract for a fleet.
"""

from __future__ import annotations

import copy
import enum
import itertools
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol, Self, runtime_checkable

__all__ = [
    "BatchCompletingStore",
    "ClaimResult",
    "ClaimStatus",
    "ClosableStore",
    "DedupPolicy",
    "DedupStore",
    "EvictionCheckedStore",
    "InMemoryDedupStore",
    "Lease",
    "LocalDedupStore",
    "RecordState",
    "ScopedStore",
]


class ClaimStatus(enum.StrEnum):
    """Answer of a dedup claim (values are the ``streamwarden.dedup.result`` attribute)."""

    NEW = "new"
    DUPLICATE = "duplicate"
    IN_PROGRESS = "in_progress"
    CONFLICT = "conflict"


class RecordState(enum.StrEnum):
    """State of an id's dedup record (:meth:`DedupStore.state`)."""

    ABSENT = "absent"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    DEAD_LETTERED = "dead_lettered"
    RELEASED = "released"


class Lease(NamedTuple):
    """The right to process one message id until ``expires_at`` (store clock, seconds)."""

    message_id: str
    owner: str
    fencing_token: int
    expires_at: float


class ClaimResult(NamedTuple):
    """Outcome of a claim: the status and, for ``NEW``, the lease the caller now holds.

    ``takeover`` marks a ``NEW`` claim that replaced another owner's *expired* lease: that owner may
    have run the side effect and died before completing, so this execution is a possible duplicate
    (the documented crash window); the layer counts it.

    ``attempt`` (``NEW`` only) is the number of handler runs of this id including this one: 1 on the
    first claim; it survives releases, takeovers and the end of a dead-letter marker, and only
    ``release(attempted=False)`` takes one back. Poison detection reads it.
    """

    status: ClaimStatus
    lease: Lease | None = None
    retry_after: float | None = None
    takeover: bool = False
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class DedupPolicy:
    """How long completed ids are remembered and leases last; what to do when the store fails."""

    ttl: float = 3600.0
    lease: float = 120.0
    fail_open: bool = False
    detect_conflicts: bool = False


@runtime_checkable
class DedupStore(Protocol):
    """Storage behind deduplication. Implementations must make each method atomic per id."""

    @property
    def scope(self) -> str:
        """The scope this store's records live in (``"default"`` for a store built directly)."""
        ...

    async def claim(
        self, message_id: str, lease_seconds: float, fingerprint: str | None = None
    ) -> ClaimResult:
        """Claim ``message_id`` for a new owner token the store generates (unique per claim)."""
        ...

    async def claim_many(
        self,
        message_ids: Sequence[str],
        lease_seconds: float,
        fingerprints: Sequence[str | None] | None = None,
    ) -> list[ClaimResult]:
        """Claim a batch in one round trip; results are in the order of ``message_ids``."""
        ...

    async def complete(self, lease: Lease, ttl_seconds: float, fingerprint: str | None = None) -> bool:
        """Mark the id completed for ``ttl_seconds`` if ``lease`` is still the owner's; else ``False``."""
        ...

    async def release(self, lease: Lease, *, attempted: bool = True, keep_takeover: bool = False) -> bool:
        """Let the id be claimed again, if ``lease`` is still the owner's; the fencing token is kept.

        ``attempted=False`` says the handler never ran under this lease: the attempt counter is
        taken back by one (never below 0). ``keep_takeover=True`` (with ``attempted=False``) gives back
        a takeover that never ran *as it was*: the record stays in progress with an expired lease, so
        the next claim is a takeover again (its message still runs alone) and is charged one run then.
        """
        ...

    async def extend(self, lease: Lease, lease_seconds: float) -> Lease | None:
        """Extend a live lease (long handlers); ``None`` when it was lost."""
        ...

    async def mark_dead_lettered(self, lease: Lease, window_seconds: float) -> bool:
        """After a confirmed DLQ write: claims answer ``DUPLICATE`` for ``window_seconds``, then ``NEW``.

        Owner-checked like :meth:`complete`. The marker is not a completion (:meth:`is_completed` is
        ``False``; :meth:`state` reads ``dead_lettered``).
        """
        ...

    async def is_completed(self, message_id: str) -> bool:
        """Whether ``message_id`` was completed and is still remembered (a dead-letter marker is not)."""
        ...

    async def mark_completed(
        self, message_id: str, ttl_seconds: float, fingerprint: str | None = None
    ) -> None:
        """Record ``message_id`` as completed without a claim (the original module's ``mark_processed``)."""
        ...

    async def forget(self, message_id: str) -> bool:
        """Make ``message_id`` claimable again at once (operator action, replay): the record becomes
        released with the attempt counter at 0; its fencing history is kept. ``True`` when a record
        existed."""
        ...

    async def state(self, message_id: str) -> RecordState:
        """The state of the id's record, in one read (an expired lease still reads ``in_progress``)."""
        ...

    def scoped(self, scope: str) -> Self:
        """The store of ``scope``, sharing this one's connection, clock and options (cached per scope)."""
        ...


@runtime_checkable
class LocalDedupStore(DedupStore, Protocol):
    """A store that answers without I/O may also offer synchronous twins of the two hot calls.

    The layer calls them directly when present, saving a coroutine per message (~0.4 µs each).
    """

    def claim_nowait(
        self, message_id: str, lease_seconds: float, fingerprint: str | None = None
    ) -> ClaimResult:
        """Synchronous :meth:`DedupStore.claim`."""
        ...

    def complete_nowait(self, lease: Lease, ttl_seconds: float, fingerprint: str | None = None) -> bool:
        """Synchronous :meth:`DedupStore.complete`."""
        ...


@runtime_checkable
class ClosableStore(Protocol):
    """A store that buffers work (deferred completions) and flushes it on :meth:`aclose`."""

    async def aclose(self) -> None:
        """Flush what is buffered; the underlying client stays open."""
        ...


@runtime_checkable
class BatchCompletingStore(Protocol):
    """A store that completes many leases in one round trip (a stream runner's group commit)."""

    async def complete_many(
        self,
        leases: Sequence[Lease],
        ttl_seconds: float,
        fingerprints: Sequence[str | None] | None = None,
    ) -> list[bool]:
        """:meth:`DedupStore.complete` for each lease, in one round trip; one answer per lease."""
        ...


@runtime_checkable
class ScopedStore(Protocol):
    """A store that keeps separate records per scope (``destination/group`` by default) and hands out a
    view of another scope sharing its connection."""

    def scoped(self, scope: str) -> DedupStore:
        """The store of ``scope`` (the same object for the same scope)."""
        ...


@runtime_checkable
class EvictionCheckedStore(Protocol):
    """A store whose records an external server could evict; it can check the server's policy."""

    async def check_eviction_policy(self, *, refuse: bool = False) -> str | None:
        """A warning when records can be evicted (raises ``ConfigurationError`` with ``refuse``)."""
        ...


_tuple_new = tuple.__new__
_DUPLICATE = ClaimResult(ClaimStatus.DUPLICATE)
_CONFLICT = ClaimResult(ClaimStatus.CONFLICT)
_NEW = ClaimStatus.NEW

# Kinds of a parked (not in progress, not completed) record of the embedded store.
_RELEASED: Final = "r"
_DEAD_LETTERED: Final = "d"
_NEVER: Final = -math.inf


class _Parked(NamedTuple):
    """A released or dead-lettered record of the embedded store."""

    keep_until: float  # the record (and its attempt counter) is gone from this instant
    kind: str  # _RELEASED or _DEAD_LETTERED
    marker_until: float  # dead-lettered: claims are DUPLICATE before this instant
    fence: int | None  # the lease that parked it (idempotent re-release / re-mark); None after forget


class _Family:
    """What the stores of one family (a store and its :meth:`InMemoryDedupStore.scoped` children) share."""

    __slots__ = ("clock", "max_entries", "owner", "retention", "stores", "tokens")

    def __init__(self, clock: Callable[[], float], max_entries: int, retention: float) -> None:
        self.clock = clock
        self.max_entries = max_entries
        self.retention = retention
        # One counter for the whole family: fencing tokens are unique across ids and scopes and never
        # repeat for the life of the store (stronger than per-id +1, which Redis uses).
        self.tokens = itertools.count(1)
        self.owner = _owner_prefix().rstrip("-")
        self.stores: dict[str, InMemoryDedupStore] = {}


class InMemoryDedupStore:
    """The embedded dedup store: one process, bounded memory, TTLs on an injectable monotonic clock.

    Completed ids live in an insertion-ordered dict that is swept from the front a little on every
    claim, so memory follows the TTL without a background task; ``max_entries`` is a hard cap that
    evicts the oldest completed (and parked) ids first (counted in :attr:`evictions`, since an
    evicted id can be processed again).

    ``fence_retention`` is how long a released, dead-lettered or in-progress record (and its attempt
    counter) outlives its last change or its lease, as in Redis. Fencing tokens come from one counter
    per store family, so they are unique across ids and scopes.
    """

    def __init__(
        self,
        *,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
        fence_retention: float = 3600.0,
        scope: str = "default",
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if fence_retention < 0:
            raise ValueError("fence_retention must be >= 0")
        self._init(_Family(clock, max_entries, fence_retention), scope)

    def _init(self, family: _Family, scope: str) -> None:
        self.scope = scope
        self._family = family
        family.stores[scope] = self
        self._clock = family.clock
        self._max_entries = family.max_entries
        self._retention = family.retention
        self._tokens = family.tokens
        self._owner = family.owner
        # An OrderedDict, not a dict: removing from the front of a plain dict leaves holes that every
        # later next(iter(...)) walks over, so sweeping a big store degrades to ~100 µs per claim.
        # id -> (expires_at, fingerprint, fencing token of the completing lease or None)
        self._done: OrderedDict[str, tuple[float, str | None, int | None]] = OrderedDict()
        self._held: dict[str, Lease] = {}
        self._parked: OrderedDict[str, _Parked] = OrderedDict()
        # The attempt counter of every held or parked id (and of no other).
        self._attempts: dict[str, int] = {}
        self._ops = 0
        self.evictions = 0

    def scoped(self, scope: str) -> Self:
        """The store of ``scope``: its own records, this store's clock, limits and token counter."""
        found = self._family.stores.get(scope)
        if found is None:
            # a shallow copy keeps a subclass's own attributes; _init gives it records of its own
            found = copy.copy(self)
            found._init(self._family, scope)
        return found  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"<InMemoryDedupStore scope={self.scope!r} records={len(self)}>"

    def __len__(self) -> int:
        return len(self._done) + len(self._held) + len(self._parked)

    # --- housekeeping ---------------------------------------------------------------------------
    def _sweep(self, now: float, budget: int) -> None:
        done = self._done
        for _ in range(budget):
            if not done:
                break
            first = next(iter(done))
            if done[first][0] > now:
                break
            done.popitem(last=False)
        parked = self._parked
        for _ in range(budget):
            if not parked:
                return
            first = next(iter(parked))
            if parked[first].keep_until > now:
                return
            parked.popitem(last=False)
            self._attempts.pop(first, None)

    def _drop_vanished_leases(self, now: float) -> None:
        retention = self._retention
        for key in [k for k, h in self._held.items() if h.expires_at + retention <= now]:
            del self._held[key]
            self._attempts.pop(key, None)

    def _park(self, message_id: str, record: _Parked) -> None:
        parked = self._parked
        parked.pop(message_id, None)  # keep insertion order = expiry order
        parked[message_id] = record
        if len(parked) > self._max_entries:
            while len(parked) > self._max_entries:
                gone, _ = parked.popitem(last=False)
                self._attempts.pop(gone, None)
                self.evictions += 1

    def _live_held(self, message_id: str, now: float) -> Lease | None:
        """The held lease of the id unless its record has vanished (lease + retention passed)."""
        held = self._held.get(message_id)
        if held is not None and held.expires_at + self._retention <= now:
            del self._held[message_id]
            self._attempts.pop(message_id, None)
            return None
        return held

    def _live_parked(self, message_id: str, now: float) -> _Parked | None:
        parked = self._parked.get(message_id)
        if parked is not None and parked.keep_until <= now:
            del self._parked[message_id]
            self._attempts.pop(message_id, None)
            return None
        return parked

    def _owns(self, held: Lease | None, lease: Lease) -> bool:
        return held is not None and held.fencing_token == lease.fencing_token and held.owner == lease.owner

    # --- claims ---------------------------------------------------------------------------------
    def claim_nowait(
        self, message_id: str, lease_seconds: float, fingerprint: str | None = None
    ) -> ClaimResult:
        """:meth:`claim` without the coroutine: the embedded store never waits (see :class:`LocalDedupStore`)."""
        now = self._clock()
        self._ops += 1
        if not self._ops & 63:  # amortized: up to 128 expired ids every 64 claims outpaces expiry
            self._sweep(now, 128)
        record = self._done.get(message_id)
        if record is not None:
            if record[0] > now:
                if fingerprint is not None and record[1] is not None and record[1] != fingerprint:
                    return _CONFLICT
                return _DUPLICATE
            del self._done[message_id]
        attempts = self._attempts
        takeover = False
        held = self._held.get(message_id)
        if held is not None:
            expires_at = held.expires_at
            if expires_at > now:
                return ClaimResult(ClaimStatus.IN_PROGRESS, retry_after=expires_at - now)
            if expires_at + self._retention > now:
                takeover = True  # its owner may have run the effect: its run stays counted
            else:  # the record vanished (as a Redis key past its TTL): history starts again
                attempts[message_id] = 0
        elif self._parked:
            parked = self._parked.get(message_id)
            if parked is not None:
                if parked.keep_until <= now:
                    attempts[message_id] = 0
                elif parked.marker_until > now:
                    return _DUPLICATE  # dead-lettered moments ago: a redelivery racing the ack
                del self._parked[message_id]
        attempt = attempts.get(message_id, 0) + 1
        attempts[message_id] = attempt
        # One owner string per store family; the fencing token (unique, increasing) tells claims apart.
        # tuple.__new__ skips NamedTuple's Python-level __new__: half the cost on the hot path.
        lease = _tuple_new(Lease, (message_id, self._owner, next(self._tokens), now + lease_seconds))
        self._held[message_id] = lease
        if len(self._held) > self._max_entries:
            self._drop_vanished_leases(now)
        return _tuple_new(ClaimResult, (_NEW, lease, None, takeover, attempt))

    async def claim(
        self, message_id: str, lease_seconds: float, fingerprint: str | None = None
    ) -> ClaimResult:
        """Claim ``message_id`` (see :class:`DedupStore`)."""
        return self.claim_nowait(message_id, lease_seconds, fingerprint)

    async def claim_many(
        self,
        message_ids: Sequence[str],
        lease_seconds: float,
        fingerprints: Sequence[str | None] | None = None,
    ) -> list[ClaimResult]:
        """Claim each id in order; an id repeated in the batch is ``IN_PROGRESS`` after its first claim."""
        if fingerprints is None:
            return [self.claim_nowait(mid, lease_seconds, None) for mid in message_ids]
        return [
            self.claim_nowait(mid, lease_seconds, fp)
            for mid, fp in zip(message_ids, fingerprints, strict=True)
        ]

    # --- owner-checked transitions --------------------------------------------------------------
    async def complete(self, lease: Lease, ttl_seconds: float, fingerprint: str | None = None) -> bool:
        """Owner-checked completion; ``False`` when the lease was taken over or cut off."""
        return self.complete_nowait(lease, ttl_seconds, fingerprint)

    def complete_nowait(self, lease: Lease, ttl_seconds: float, fingerprint: str | None = None) -> bool:
        """:meth:`complete` without the coroutine."""
        message_id = lease.message_id
        held = self._held.get(message_id)
        now = self._clock()
        if (
            held is None
            or held.fencing_token != lease.fencing_token
            or held.owner != lease.owner
            or held.expires_at + self._retention <= now
        ):
            # idempotent for the lease that completed it (a re-sent completion), refused otherwise
            record = self._done.get(message_id)
            return (
                record is not None
                and record[2] == lease.fencing_token
                and lease.owner == self._owner
                and record[0] > now
            )
        del self._held[message_id]
        self._attempts.pop(message_id, None)
        done = self._done
        if message_id in done:  # keep insertion order = expiry order
            del done[message_id]
        done[message_id] = (now + ttl_seconds, fingerprint, lease.fencing_token)
        if len(done) > self._max_entries:
            self._evict()
        return True

    def _evict(self) -> None:
        done = self._done
        while len(done) > self._max_entries:
            done.popitem(last=False)
            self.evictions += 1

    async def release(self, lease: Lease, *, attempted: bool = True, keep_takeover: bool = False) -> bool:
        """Owner-checked release (idempotent for its owner); ``attempted=False`` takes the attempt back;
        ``keep_takeover`` leaves an expired lease of no owner, so the next claim is a takeover again."""
        message_id = lease.message_id
        now = self._clock()
        held = self._live_held(message_id, now)
        if self._owns(held, lease) and keep_takeover and not attempted:
            self._attempts[message_id] = max(self._attempts.get(message_id, 0) - 1, 0)
            self._held[message_id] = _tuple_new(Lease, (message_id, "", lease.fencing_token, now))
            return True
        if self._owns(held, lease):
            del self._held[message_id]
            if not attempted:
                self._attempts[message_id] = max(self._attempts.get(message_id, 0) - 1, 0)
            self._park(message_id, _Parked(now + self._retention, _RELEASED, _NEVER, lease.fencing_token))
            return True
        parked = self._live_parked(message_id, now) if held is None else None
        return (
            parked is not None
            and parked.kind == _RELEASED
            and parked.fence == lease.fencing_token
            and lease.owner == self._owner
        )

    async def extend(self, lease: Lease, lease_seconds: float) -> Lease | None:
        """Extend a lease that is still the owner's to ``lease_seconds`` from now."""
        now = self._clock()
        if not self._owns(self._live_held(lease.message_id, now), lease):
            return None
        renewed = Lease(lease.message_id, lease.owner, lease.fencing_token, now + lease_seconds)
        self._held[lease.message_id] = renewed
        return renewed

    async def mark_dead_lettered(self, lease: Lease, window_seconds: float) -> bool:
        """Owner-checked: claims answer ``DUPLICATE`` for ``window_seconds``, then ``NEW`` (idempotent)."""
        message_id = lease.message_id
        now = self._clock()
        held = self._live_held(message_id, now)
        if self._owns(held, lease):
            del self._held[message_id]
            until = now + window_seconds
            self._park(
                message_id, _Parked(until + self._retention, _DEAD_LETTERED, until, lease.fencing_token)
            )
            return True
        parked = self._live_parked(message_id, now) if held is None else None
        return (
            parked is not None
            and parked.kind == _DEAD_LETTERED
            and parked.fence == lease.fencing_token
            and lease.owner == self._owner
        )

    # --- reads and operator actions -------------------------------------------------------------
    async def is_completed(self, message_id: str) -> bool:
        """Whether the id is completed and within its TTL (a dead-letter marker is not)."""
        record = self._done.get(message_id)
        return record is not None and record[0] > self._clock()

    async def state(self, message_id: str) -> RecordState:
        """The state of the id's record (see :class:`RecordState`)."""
        now = self._clock()
        record = self._done.get(message_id)
        if record is not None and record[0] > now:
            return RecordState.COMPLETED
        if self._live_held(message_id, now) is not None:
            return RecordState.IN_PROGRESS
        parked = self._live_parked(message_id, now)
        if parked is None:
            return RecordState.ABSENT
        if parked.marker_until > now:
            return RecordState.DEAD_LETTERED
        return RecordState.RELEASED

    async def mark_completed(
        self, message_id: str, ttl_seconds: float, fingerprint: str | None = None
    ) -> None:
        """Record the id as completed (cuts off any lease on it)."""
        self._held.pop(message_id, None)
        self._parked.pop(message_id, None)
        self._attempts.pop(message_id, None)
        done = self._done
        done.pop(message_id, None)
        done[message_id] = (self._clock() + ttl_seconds, fingerprint, None)
        if len(done) > self._max_entries:
            self._evict()

    async def forget(self, message_id: str) -> bool:
        """Make the id claimable at once: released, attempt counter 0, fingerprint dropped.

        Cuts off any lease on it. ``True`` when a record existed.
        """
        now = self._clock()
        record = self._done.pop(message_id, None)
        found = record is not None and record[0] > now
        found = self._live_held(message_id, now) is not None or found
        found = self._live_parked(message_id, now) is not None or found
        self._held.pop(message_id, None)
        if not found:
            return False
        self._attempts[message_id] = 0
        self._park(message_id, _Parked(now + self._retention, _RELEASED, _NEVER, None))
        return True


def _owner_prefix() -> str:
    """A process-unique owner prefix: pid and 48 random bits."""
    return f"{os.getpid():x}-{os.urandom(6).hex()}-"
