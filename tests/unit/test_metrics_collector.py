"""MetricsCollector: the seed's counters, derived rates, and batched flushes to a counter store."""

from __future__ import annotations

import gc
import inspect
import warnings
from collections.abc import Mapping

import pytest

from streamwarden import CounterStore, MetricsCollector

SEED_NAMES = ("messages_processed_successfully", "messages_deduplicated", "messages_failed", "total_messages")


class MemoryCounterStore:
    """A real in-memory implementation of our CounterStore protocol: sums what it is sent."""

    def __init__(self, *, fail_next: int = 0) -> None:
        self.totals_by_name: dict[str, int] = {}
        self.batches: list[dict[str, int]] = []
        self.fail_next = fail_next

    async def add(self, deltas: Mapping[str, int]) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("counter store unreachable")
        self.batches.append(dict(deltas))
        for name, delta in deltas.items():
            self.totals_by_name[name] = self.totals_by_name.get(name, 0) + delta

    async def totals(self) -> dict[str, int]:
        return dict(self.totals_by_name)


def test_memory_store_is_a_counter_store() -> None:
    """The test double satisfies the protocol it stands in for."""
    assert isinstance(MemoryCounterStore(), CounterStore)


async def test_increment_with_and_without_await() -> None:
    """``increment`` counts at once; awaiting its result is optional and counts nothing twice."""
    collector = MetricsCollector()
    collector.increment("total_messages")
    await collector.increment("total_messages")
    collector.increment("messages_failed", 5)
    await collector.increment("messages_failed", value=2)
    counts = collector.snapshot()
    assert counts["total_messages"] == 2
    assert counts["messages_failed"] == 7


def test_increment_without_await_leaves_no_unawaited_coroutine() -> None:
    """Calling ``increment`` without awaiting creates no coroutine, so no "never awaited" warning."""
    collector = MetricsCollector()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = collector.increment("total_messages")
        assert not inspect.iscoroutine(result)
        assert inspect.isawaitable(result)
        del result
        gc.collect()
    assert [w for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert collector.snapshot()["total_messages"] == 1


def test_unknown_metric_names_are_counted() -> None:
    """Names outside the seed's set are counted too."""
    collector = MetricsCollector()
    collector.increment("custom_events", 3)
    assert collector.snapshot()["custom_events"] == 3


async def test_fresh_metrics_are_seed_names_with_zeros() -> None:
    """A fresh collector reports every seed counter at zero and all rates at 0.0 (no division by zero)."""
    metrics = await MetricsCollector().get_reliability_metrics()
    for name in SEED_NAMES:
        assert metrics[name] == 0
    assert metrics["success_rate"] == 0.0
    assert metrics["deduplication_rate"] == 0.0
    assert metrics["error_rate"] == 0.0


async def test_rates_are_derived_from_total() -> None:
    """Rates are the processed, deduplicated and failed counts over total_messages."""
    collector = MetricsCollector()
    collector.increment("total_messages", 8)
    collector.increment("messages_processed_successfully", 5)
    collector.increment("messages_deduplicated", 2)
    collector.increment("messages_failed", 1)
    metrics = await collector.get_reliability_metrics()
    assert metrics["success_rate"] == 0.625
    assert metrics["deduplication_rate"] == 0.25
    assert metrics["error_rate"] == 0.125


async def test_rates_are_rounded() -> None:
    """Non-terminating rates are rounded, not reported with float noise."""
    collector = MetricsCollector()
    collector.increment("total_messages", 3)
    collector.increment("messages_processed_successfully", 1)
    metrics = await collector.get_reliability_metrics()
    assert metrics["success_rate"] == pytest.approx(1 / 3, abs=1e-6)
    assert len(repr(metrics["success_rate"])) <= len("0.333333")


async def test_snapshot_is_a_copy() -> None:
    """Changing a snapshot does not change the collector."""
    collector = MetricsCollector()
    snap = collector.snapshot()
    snap["total_messages"] = 99
    assert collector.snapshot()["total_messages"] == 0


# --- flushing to a counter store ------------------------------------------------------------------


async def test_flush_sends_only_deltas() -> None:
    """Each flush sends what changed since the last successful flush, and nothing when nothing changed."""
    store = MemoryCounterStore()
    collector = MetricsCollector(store=store)
    collector.increment("total_messages", 3)
    collector.increment("messages_processed_successfully", 2)
    await collector.flush()
    collector.increment("total_messages")
    await collector.flush()
    await collector.flush()

    assert store.batches == [
        {"total_messages": 3, "messages_processed_successfully": 2},
        {"total_messages": 1},
    ]


async def test_nothing_is_lost_when_the_store_fails_once() -> None:
    """A failed flush keeps its deltas: the next flush sends them together with newer counts."""
    store = MemoryCounterStore(fail_next=1)
    collector = MetricsCollector(store=store)
    collector.increment("total_messages", 4)

    with pytest.raises(ConnectionError):
        await collector.flush()
    assert store.totals_by_name == {}

    collector.increment("total_messages", 2)
    collector.increment("messages_failed")
    await collector.flush()

    assert store.totals_by_name == {"total_messages": 6, "messages_failed": 1}
    assert store.totals_by_name == {k: v for k, v in collector.snapshot().items() if v}


async def test_flush_without_store_is_a_no_op() -> None:
    """Without a store, flushing does nothing and keeps local counts."""
    collector = MetricsCollector()
    collector.increment("total_messages")
    await collector.flush()
    assert collector.snapshot()["total_messages"] == 1


async def test_metrics_with_a_store_are_fleet_totals() -> None:
    """With a shared store, metrics are the store's totals after this process flushed its own counts."""
    store = MemoryCounterStore()
    store.totals_by_name = {"total_messages": 10, "messages_processed_successfully": 9}  # other processes
    collector = MetricsCollector(store=store)
    collector.increment("total_messages", 2)
    collector.increment("messages_processed_successfully", 1)

    metrics = await collector.get_reliability_metrics()

    assert metrics["total_messages"] == 12
    assert metrics["messages_processed_successfully"] == 10
    assert metrics["messages_failed"] == 0  # seed names present even if the store never saw them
    assert metrics["success_rate"] == pytest.approx(10 / 12, abs=1e-6)
    await collector.get_reliability_metrics()
    assert store.totals_by_name["total_messages"] == 12  # asking twice does not re-send counts
