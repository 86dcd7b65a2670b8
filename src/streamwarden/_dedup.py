"""Deduplication: claim an id before processing, complete it after, release it on failure.

The seed's check-then-mark (``EXISTS`` then ``SETEX``) lets two consumers run the same id at once.
streamwarden claims instead. A claim answers, atomically:

* ``NEW``: the caller now holds a :class:`Lease` (owner token, fencing token, expiry) and may process;
* ``DUPLICATE``: the id was completed within the TTL; do not process, acknowledge;
* ``IN_PROGRESS``: another owner holds a live lease; do not process, do not acknowledge;
* ``CONFLICT``: the id was completed with a *different* payload fingerprint (only when fingerprints
  are given); treated as a duplicate but counted and flagged.

:meth:`DedupStore.complete` and :meth:`DedupStore.release` are owner-checked: a stale owner whose
lease expired and was taken over cannot complete or delete the new owner's record; they return
``False``. Fencing tokens increase monotonically so a downstream system can reject writes from a
stale owner (``streamwarden.current_lease().fencing_token``).

Where duplicates can still happen (each is counted): a crash after the side effect but before
``complete``; a lease that expires while its owner is paused; a completed record lost (TTL, eviction,
failover). Every store implements :class:`DedupStore`; :class:`InMemoryDedupStore` is the embedded
default for one process, the Redis store shares the contract for a fleet.
"""

from __future__ import annotations

import enum
import itertools
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

__all__ = [
    "ClaimResult",
    "ClaimStatus",
    "ClosableStore",
    "DedupPolicy",
    "DedupStore",
    "EvictionCheckedStore",
    "InMemoryDedupStore",
    "Lease",
    "LocalDedupStore",
]


class ClaimStatus(enum.StrEnum):
    """Answer of a dedup claim (values are the ``streamwarden.dedup.result`` attribute)."""

    NEW = "new"
    DUPLICATE = "duplicate"
    IN_PROGRESS = "in_progress"
    CONFLICT = "conflict"


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
    """

    status: ClaimStatus
    lease: Lease | None = None
    retry_after: float | None = None
    takeover: bool = False


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

    async def release(self, lease: Lease) -> bool:
        """Drop the claim so the id can be processed again, if ``lease`` is still the owner's."""
        ...

    async def extend(self, lease: Lease, lease_seconds: float) -> Lease | None:
        """Extend a live lease (long handlers); ``None`` when it was lost."""
        ...

    async def is_completed(self, message_id: str) -> bool:
        """Whether ``message_id`` was completed and is still remembered."""
        ...

    async def mark_completed(
        self, message_id: str, ttl_seconds: float, fingerprint: str | None = None
    ) -> None:
        """Record ``message_id`` as completed without a claim (the seed's ``mark_processed``)."""
        ...

    async def forget(self, message_id: str) -> bool:
        """Delete any record of ``message_id`` (operator action, forced replay)."""
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
class EvictionCheckedStore(Protocol):
    """A store whose records an external server could evict; it can check the server's policy."""

    async def check_eviction_policy(self, *, refuse: bool = False) -> str | None:
        """A warning when records can be evicted (raises ``ConfigurationError`` with ``refuse``)."""
        ...


_tuple_new = tuple.__new__
_DUPLICATE = ClaimResult(ClaimStatus.DUPLICATE)
_CONFLICT = ClaimResult(ClaimStatus.CONFLICT)


class InMemoryDedupStore:
    """The embedded dedup store: one process, bounded memory, TTLs on an injectable monotonic clock.

    Completed ids live in an insertion-ordered dict that is swept from the front a little on every
    claim, so memory follows the TTL without a background task; ``max_entries`` is a hard cap that
    evicts the oldest completed ids first (counted in :attr:`evictions`, since an evicted id can be
    processed again).
    """

    def __init__(self, *, max_entries: int = 1_000_000, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._clock = clock
        self._max_entries = max_entries
        # An OrderedDict, not a dict: removing from the front of a plain dict leaves holes that every
        # later next(iter(...)) walks over, so sweeping a big store degrades to ~100 µs per claim.
        self._done: OrderedDict[str, tuple[float, str | None]] = OrderedDict()
        self._held: dict[str, Lease] = {}
        self._ops = 0
        self._tokens = itertools.count(1)
        self._owner = _owner_prefix().rstrip("-")
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._done) + len(self._held)

    def _sweep(self, now: float, budget: int) -> None:
        done = self._done
        for _ in range(budget):
            if not done:
                return
            first = next(iter(done))
            if done[first][0] > now:
                return
            done.popitem(last=False)

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
        held = self._held.get(message_id)
        if held is not None and held.expires_at > now:
            return ClaimResult(ClaimStatus.IN_PROGRESS, retry_after=held.expires_at - now)
        # One owner string per store; the fencing token (unique, increasing) tells claims apart.
        # tuple.__new__ skips NamedTuple's Python-level __new__: half the cost on the hot path.
        lease = _tuple_new(Lease, (message_id, self._owner, next(self._tokens), now + lease_seconds))
        self._held[message_id] = lease
        if len(self._held) > self._max_entries:
            self._drop_expired_leases(now)
        return _tuple_new(ClaimResult, (ClaimStatus.NEW, lease, None, held is not None))

    def _drop_expired_leases(self, now: float) -> None:
        for key in [k for k, h in self._held.items() if h.expires_at <= now]:
            del self._held[key]

    def _is_current(self, lease: Lease) -> bool:
        held = self._held.get(lease.message_id)
        return (
            held is not None and held.fencing_token == lease.fencing_token and held.expires_at > self._clock()
        )

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

    async def complete(self, lease: Lease, ttl_seconds: float, fingerprint: str | None = None) -> bool:
        """Owner-checked completion; ``False`` when the lease expired or was taken over."""
        return self.complete_nowait(lease, ttl_seconds, fingerprint)

    def complete_nowait(self, lease: Lease, ttl_seconds: float, fingerprint: str | None = None) -> bool:
        """:meth:`complete` without the coroutine."""
        message_id = lease.message_id
        held = self._held.get(message_id)
        now = self._clock()
        if held is None or held.fencing_token != lease.fencing_token or held.expires_at <= now:
            return False
        del self._held[message_id]
        done = self._done
        if message_id in done:  # keep insertion order = expiry order
            del done[message_id]
        done[message_id] = (now + ttl_seconds, fingerprint)
        if len(done) > self._max_entries:
            self._evict()
        return True

    def _store_done(self, message_id: str, ttl_seconds: float, fingerprint: str | None) -> None:
        done = self._done
        done.pop(message_id, None)
        done[message_id] = (self._clock() + ttl_seconds, fingerprint)
        if len(done) > self._max_entries:
            self._evict()

    def _evict(self) -> None:
        done = self._done
        while len(done) > self._max_entries:
            done.popitem(last=False)
            self.evictions += 1

    async def release(self, lease: Lease) -> bool:
        """Owner-checked release; ``False`` when the lease was no longer the owner's."""
        if not self._is_current(lease):
            return False
        del self._held[lease.message_id]
        return True

    async def extend(self, lease: Lease, lease_seconds: float) -> Lease | None:
        """Extend a live lease by ``lease_seconds`` from now."""
        if not self._is_current(lease):
            return None
        renewed = Lease(lease.message_id, lease.owner, lease.fencing_token, self._clock() + lease_seconds)
        self._held[lease.message_id] = renewed
        return renewed

    async def is_completed(self, message_id: str) -> bool:
        """Whether the id is completed and within its TTL."""
        record = self._done.get(message_id)
        return record is not None and record[0] > self._clock()

    async def mark_completed(
        self, message_id: str, ttl_seconds: float, fingerprint: str | None = None
    ) -> None:
        """Record the id as completed (drops any lease on it)."""
        self._held.pop(message_id, None)
        self._store_done(message_id, ttl_seconds, fingerprint)

    async def forget(self, message_id: str) -> bool:
        """Delete every record of the id."""
        found = self._done.pop(message_id, None) is not None
        return (self._held.pop(message_id, None) is not None) or found


def _owner_prefix() -> str:
    """A process-unique owner prefix: pid and 48 random bits."""
    return f"{os.getpid():x}-{os.urandom(6).hex()}-"
