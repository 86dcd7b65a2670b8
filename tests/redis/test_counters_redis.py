"""Fleet counters in one Redis hash per service: batched flushes, no KEYS, no per-message round trip."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio
from _fixtures_dlq import Handler, commands_processed

from streamwarden import (
    CounterStore,
    InMemoryDeadLetterStore,
    InMemoryDedupStore,
    MetricsCollector,
    ReliabilityLayer,
    ReliabilitySettings,
)
from streamwarden import _names as n
from streamwarden._redis._counters import CounterFlusher, RedisCounterStore, run_periodic_flush


def test_store_satisfies_the_protocol(redis_client: redis.asyncio.Redis) -> None:
    """RedisCounterStore is a CounterStore, and MetricsCollector(redis_client) picks it."""
    assert isinstance(RedisCounterStore(redis_client, service_name="s"), CounterStore)
    collector = MetricsCollector(redis_client, service_name="svc", key_prefix="p")
    assert isinstance(collector.store, RedisCounterStore)
    assert collector.store.key == "p:metrics:svc"


async def test_add_is_one_round_trip_into_one_hash(redis_client: redis.asyncio.Redis) -> None:
    """add sends every delta in one pipelined transaction; totals reads the one hash."""
    store = RedisCounterStore(redis_client, service_name="svc")
    before = await commands_processed(redis_client)
    await store.add({"total_messages": 5, "messages_failed": 2, "unchanged": 0})
    after = await commands_processed(redis_client)
    assert after - before == 1 + 4  # INFO itself, then MULTI + 2 HINCRBY + EXEC in one write
    assert await store.totals() == {"total_messages": 5, "messages_failed": 2}
    assert await redis_client.hgetall("streamwarden:metrics:svc") == {
        b"total_messages": b"5",
        b"messages_failed": b"2",
    }


async def test_two_collectors_aggregate_fleet_wide(redis_client: redis.asyncio.Redis) -> None:
    """Two processes' collectors flush deltas into the same hash; totals and rates are fleet-wide."""
    first = MetricsCollector(redis_client, service_name="fleet")
    second = MetricsCollector(redis_client, service_name="fleet")
    first.increment(n.COUNTER_TOTAL, 3)
    first.increment(n.COUNTER_PROCESSED, 3)
    await second.increment(n.COUNTER_TOTAL)
    await second.increment(n.COUNTER_FAILED)
    await first.flush()
    await first.flush()  # nothing new: no double counting
    report = await second.get_reliability_metrics()
    assert report[n.COUNTER_TOTAL] == 4
    assert report[n.COUNTER_PROCESSED] == 3
    assert report[n.COUNTER_FAILED] == 1
    assert report["success_rate"] == 0.75
    assert report["error_rate"] == 0.25
    other = MetricsCollector(redis_client, service_name="other-service")
    assert (await other.get_reliability_metrics())[n.COUNTER_TOTAL] == 0


async def test_message_path_never_touches_redis(redis_client: redis.asyncio.Redis) -> None:
    """Processing messages through a Redis-counting layer costs no Redis command until a flush."""
    layer = ReliabilityLayer(
        redis_client,
        ReliabilitySettings(service_name="hot"),
        dedup_store=InMemoryDedupStore(),
        dead_letter_store=InMemoryDeadLetterStore(),
    )
    collector = layer.metrics_collector
    assert isinstance(collector.store, RedisCounterStore)
    handler = Handler(fail=False)
    before = await commands_processed(redis_client)
    for i in range(200):
        await layer.process({"id": f"h-{i}"}, handler)
    assert await commands_processed(redis_client) - before == 1  # the INFO call itself
    await collector.flush()
    totals = await collector.store.totals()
    assert totals[n.COUNTER_TOTAL] == 200
    assert totals[n.COUNTER_PROCESSED] == 200


async def test_failed_flush_keeps_its_deltas(redis_server_factory: Any) -> None:
    """A flush that fails sends nothing; the next successful flush carries those deltas."""
    server = redis_server_factory()
    client = redis.asyncio.Redis.from_url(server.url, socket_connect_timeout=1, retry_on_error=[])
    try:
        collector = MetricsCollector(client, service_name="svc")
        collector.increment(n.COUNTER_TOTAL, 7)
        server.kill()
        with pytest.raises(redis.exceptions.ConnectionError):
            await collector.flush()
        server.restart()
        collector.increment(n.COUNTER_TOTAL, 1)
        await collector.flush()
        assert (await collector.store.totals())[n.COUNTER_TOTAL] == 8  # type: ignore[union-attr]
    finally:
        await client.aclose()


async def test_periodic_flush_runs_on_the_injected_sleep(redis_client: redis.asyncio.Redis) -> None:
    """run_periodic_flush flushes after each sleep and survives a failing flush."""
    collector = MetricsCollector(redis_client, service_name="periodic")
    ticks: asyncio.Queue[float] = asyncio.Queue()
    proceed = asyncio.Event()

    async def fake_sleep(seconds: float) -> None:
        await ticks.put(seconds)
        await proceed.wait()
        proceed.clear()

    task = asyncio.create_task(run_periodic_flush(collector, 5.0, sleep=fake_sleep))
    try:
        assert await ticks.get() == 5.0
        collector.increment(n.COUNTER_TOTAL, 2)
        proceed.set()
        assert await ticks.get() == 5.0  # the first flush happened before the second sleep
        assert (await collector.store.totals())[n.COUNTER_TOTAL] == 2  # type: ignore[union-attr]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_counter_flusher_flushes_when_stopped(redis_client: redis.asyncio.Redis) -> None:
    """CounterFlusher flushes what is left when its block ends."""
    collector = MetricsCollector(redis_client, service_name="flusher")
    never = asyncio.Event()

    async def parked(_: float) -> None:
        await never.wait()

    async with CounterFlusher(collector, interval=60.0, sleep=parked):
        collector.increment(n.COUNTER_PROCESSED, 4)
    assert (await collector.store.totals())[n.COUNTER_PROCESSED] == 4  # type: ignore[union-attr]


@pytest.mark.parametrize("interval", [pytest.param(0, id="zero"), pytest.param(-1.0, id="negative")])
async def test_interval_must_be_positive(redis_client: redis.asyncio.Redis, interval: float) -> None:
    """A non-positive flush interval is refused."""
    collector = MetricsCollector(redis_client)
    with pytest.raises(ValueError, match="interval"):
        CounterFlusher(collector, interval)
    with pytest.raises(ValueError, match="interval"):
        await run_periodic_flush(collector, interval)


async def test_no_keys_command_is_ever_used(redis_server_factory: Any) -> None:
    """Counting, flushing and reading issue no KEYS or SCAN (on a server of the test's own)."""
    client = redis.asyncio.Redis.from_url(redis_server_factory().url)
    try:
        collector = MetricsCollector(client, service_name="nokeys")
        collector.increment(n.COUNTER_TOTAL)
        await collector.get_reliability_metrics()
        stats = await client.info("commandstats")
        assert "cmdstat_hincrby" in stats
        assert not any(name in stats for name in ("cmdstat_keys", "cmdstat_scan"))
    finally:
        await client.aclose()
