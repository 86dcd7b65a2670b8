"""Seed-compatible reliability counters: ``MetricsCollector.increment`` / ``get_reliability_metrics``.

The seed incremented one Redis key per metric per message (``INCRBY``) and read them back with
``KEYS``. Here counting is an in-process dict update; a counter store (the Redis hash of issue #3, one
hash per service) receives the accumulated deltas in batches via :meth:`MetricsCollector.flush`, never
per message. ``increment`` counts immediately and returns an already-finished awaitable, so both the
seed's ``self.metrics_collector.increment(...)`` and ``await collector.increment(...)`` work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Mapping
from typing import Any, Protocol, runtime_checkable

from . import _names as n

__all__ = ["CounterStore", "MetricsCollector"]

SEED_COUNTERS = (
    n.COUNTER_TOTAL,
    n.COUNTER_PROCESSED,
    n.COUNTER_DEDUPLICATED,
    n.COUNTER_FAILED,
    n.COUNTER_DEAD_LETTERED,
    n.COUNTER_DEFERRED,
    n.COUNTER_IN_PROGRESS,
    n.COUNTER_RETRIES,
    n.COUNTER_BREAKER_REJECTIONS,
    n.COUNTER_BREAKER_OPENED,
    n.COUNTER_DEDUP_ERRORS,
    n.COUNTER_INVALID,
    n.COUNTER_LEASES_LOST,
    n.COUNTER_TAKEOVERS,
)


class _Done:
    """An awaitable that is already finished (``await collector.increment(...)`` is optional)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # pragma: no cover - makes this a generator


_DONE = _Done()


@runtime_checkable
class CounterStore(Protocol):
    """Where counters are aggregated across processes (e.g. one Redis hash per service)."""

    async def add(self, deltas: Mapping[str, int]) -> None:
        """Add ``deltas`` to the shared totals (one round trip)."""
        ...

    async def totals(self) -> dict[str, int]:
        """The shared totals."""
        ...


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
            from ._stores import redis_counter_store

            store = redis_counter_store(redis_client, service_name=service_name, key_prefix=key_prefix)
        self.store = store
        #: Live counts of this process. Every seed counter is present, so owners of the collector (the
        #: layer) may add to a known key in place; flushes send the difference to the last flush.
        self.counts: dict[str, int] = dict.fromkeys(SEED_COUNTERS, 0)
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
            counts: dict[str, int] = dict.fromkeys(SEED_COUNTERS, 0)
            counts.update(await self.store.totals())
        else:
            counts = dict(self.counts)
        return with_rates(counts)


def with_rates(counts: Mapping[str, int]) -> dict[str, Any]:
    """``counts`` plus derived rates (0.0 when nothing was processed)."""
    result: dict[str, Any] = dict(counts)
    total = counts.get(n.COUNTER_TOTAL, 0)

    def rate(key: str) -> float:
        return round(counts.get(key, 0) / total, 6) if total else 0.0

    result["success_rate"] = rate(n.COUNTER_PROCESSED)
    result["deduplication_rate"] = rate(n.COUNTER_DEDUPLICATED)
    result["error_rate"] = rate(n.COUNTER_FAILED)
    return result
