"""The seed API's store-owning classes: ``DeduplicationManager`` and ``MetricsCollector``.

Both take a Redis client (or ``None``) as the original module did, and choose their store from it: the
Redis stores of :mod:`streamwarden._redis` for a client, the embedded in-memory ones for ``None``. That
choice is the only reason they sit above the stores; the dedup contract (:mod:`._dedup`) and the
counter contract (:mod:`._counters`) know nothing of Redis.

``MetricsCollector`` counts in process memory; ``increment`` returns an already-finished awaitable so
the seed's ``self.metrics_collector.increment(...)`` and ``await collector.increment(...)`` both work.
A :class:`~streamwarden.CounterStore` receives accumulated deltas in batches (:meth:`MetricsCollector.flush`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

from ._counters import COUNTER_NAMES, CounterStore, with_rates
from ._dedup import ClaimResult, ClosableStore, DedupPolicy, DedupStore, InMemoryDedupStore, Lease
from ._redis import RedisCounterStore, RedisDedupStore

__all__ = ["DeduplicationManager", "MetricsCollector"]


class DeduplicationManager:
    """Seed-compatible front of a :class:`DedupStore`.

    ``is_duplicate`` / ``mark_processed`` keep the seed's check-then-mark calls working; the layer uses
    the atomic ``claim`` -> ``complete`` / ``release`` calls.
    ``redis_client=None`` selects :class:`InMemoryDedupStore`.
    """

    def __init__(
        self,
        redis_client: Any = None,
        *,
        ttl: float = 3600,
        lease: float = 120.0,
        store: DedupStore | None = None,
        key_prefix: str = "streamwarden",
        policy: DedupPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        store_options: dict[str, Any] | None = None,
    ) -> None:
        self.policy = policy or DedupPolicy(ttl=float(ttl), lease=float(lease))
        self.ttl = self.policy.ttl
        self.redis_client = redis_client
        if store is None:
            if redis_client is not None:
                # the layer's clock, so a lease's expires_at and the layer's freshness checks agree
                store = RedisDedupStore(
                    redis_client, key_prefix=key_prefix, clock=clock, **(store_options or {})
                )
            else:
                store = InMemoryDedupStore(clock=clock)
        self.store: DedupStore = store

    async def is_duplicate(self, message_id: str) -> bool:
        """Whether ``message_id`` has already been processed (seed API; prefer :meth:`claim`)."""
        return await self.store.is_completed(message_id)

    async def mark_processed(self, message_id: str) -> None:
        """Remember ``message_id`` as processed for the TTL (seed API; prefer :meth:`complete`)."""
        await self.store.mark_completed(message_id, self.ttl)

    async def claim(self, message_id: str, *, fingerprint: str | None = None) -> ClaimResult:
        """Atomically claim ``message_id`` for the policy's lease."""
        return await self.store.claim(message_id, self.policy.lease, fingerprint)

    async def claim_many(
        self, message_ids: Sequence[str], *, fingerprints: Sequence[str | None] | None = None
    ) -> list[ClaimResult]:
        """Claim a batch of ids in one store round trip."""
        return await self.store.claim_many(message_ids, self.policy.lease, fingerprints)

    async def complete(self, lease: Lease, *, fingerprint: str | None = None) -> bool:
        """Complete a claim (owner-checked) for the policy's TTL."""
        return await self.store.complete(lease, self.ttl, fingerprint)

    async def release(self, lease: Lease) -> bool:
        """Release a claim (owner-checked) so the id can be processed again."""
        return await self.store.release(lease)

    async def aclose(self) -> None:
        """Flush what the store buffers (deferred completions); the Redis client stays open."""
        if isinstance(self.store, ClosableStore):
            await self.store.aclose()


class _Done:
    """An awaitable that is already finished (``await collector.increment(...)`` is optional)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # pragma: no cover - makes this a generator


_DONE = _Done()


class MetricsCollector:
    """Counts reliability events; ``redis_client=None`` keeps them in this process only."""

    def __init__(
        self,
        redis_client: Any = None,
        *,
        service_name: str = "streamwarden",
        key_prefix: str = "streamwarden",
        store: CounterStore | None = None,
    ) -> None:
        self.redis_client = redis_client
        self.service_name = service_name
        if store is None and redis_client is not None:
            store = RedisCounterStore(redis_client, service_name=service_name, key_prefix=key_prefix)
        self.store = store
        #: Live counts of this process. Every seed counter is present, so owners of the collector (the
        #: layer) may add to a known key in place; flushes send the difference to the last flush.
        self.counts: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._flushed: dict[str, int] = {}
        self._flush_lock = asyncio.Lock()

    def increment(self, metric_name: str, value: int = 1) -> _Done:
        """Add ``value`` to ``metric_name``; counted at once, awaiting the result is optional."""
        counts = self.counts
        counts[metric_name] = counts.get(metric_name, 0) + value
        return _DONE

    def snapshot(self) -> dict[str, int]:
        """This process's counters."""
        return dict(self.counts)

    async def flush(self) -> None:
        """Send counts accumulated since the last flush to the shared store (no-op without one).

        Flushes are serialised: two at once would both send the same deltas.
        """
        if self.store is None:
            return
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        assert self.store is not None
        current = dict(self.counts)
        deltas = {k: v - self._flushed.get(k, 0) for k, v in current.items() if v != self._flushed.get(k, 0)}
        if not deltas:
            return
        await self.store.add(deltas)  # on failure nothing moves: the next flush sends these deltas too
        self._flushed = current

    async def get_reliability_metrics(self) -> dict[str, Any]:
        """Counters by the seed's names plus ``success_rate``, ``deduplication_rate``, ``error_rate``.

        With a shared store the totals are fleet-wide (this process's counts are flushed first).
        """
        if self.store is not None:
            await self.flush()
            counts: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
            counts.update(await self.store.totals())
        else:
            counts = dict(self.counts)
        return with_rates(counts)
