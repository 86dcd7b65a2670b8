"""Reliability counters: the names, the store contract and the derived rates.

Counting happens in process memory (:class:`~streamwarden.MetricsCollector`, a dict update per event);
a :class:`CounterStore` (one Redis hash per service) receives the accumulated deltas in batches, never a
round trip per message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from . import _names as n

__all__ = ["COUNTER_NAMES", "CounterStore", "Flushable", "with_rates"]

COUNTER_NAMES = (
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


@runtime_checkable
class CounterStore(Protocol):
    """Where counters are aggregated across processes (e.g. one Redis hash per service)."""

    async def add(self, deltas: Mapping[str, int]) -> None:
        """Add ``deltas`` to the shared totals (one round trip)."""
        ...

    async def totals(self) -> dict[str, int]:
        """The shared totals."""
        ...


@runtime_checkable
class Flushable(Protocol):
    """Something that sends buffered counts to its store (:class:`~streamwarden.MetricsCollector`)."""

    async def flush(self) -> None:
        """Send what was counted since the last flush."""
        ...


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
