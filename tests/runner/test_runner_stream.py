"""RedisStreamConsumer against a real redis-server: ack by outcome, reclaim, backpressure, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio

import streamwarden as sw
from _support import Otel, eventually
from streamwarden import _names as n
from streamwarden._runners._redis_streams import RedisStreamConsumer, StreamProducer

MakeLayer = Callable[..., sw.ReliabilityLayer]


class Ledger:
    """What the handler did: every execution, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    @property
    def counts(self) -> Counter[str]:
        return Counter(mid for mid, _ in self.calls)


@contextlib.asynccontextmanager
async def running(consumer: RedisStreamConsumer) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(consumer.run())
    try:
        yield task
    finally:
        consumer.stop()
        await asyncio.wait_for(task, timeout=30)


def make_consumer(
    client: redis.asyncio.Redis, stream: str, layer: sw.ReliabilityLayer, handler: Any, **options: Any
) -> RedisStreamConsumer:
    options.setdefault("block_ms", 50)
    options.setdefault("claim_every_s", 0.05)
    return RedisStreamConsumer(
        client,
        stream=stream,
        group="g",
        consumer=options.pop("name", "c1"),
        handler=handler,
        layer=layer,
        **options,
    )


async def pending(client: redis.asyncio.Redis, stream: str) -> int:
    summary = await client.xpending(stream, "g")
    return int(summary["pending"])


async def test_every_message_processed_once_and_acknowledged(
    client: redis.asyncio.Redis, stream: str, make_layer: MakeLayer
) -> None:
    """200 messages, 20 of them re-sent: each id runs once, every entry is acknowledged."""
    ledger = Ledger()

    async def handler(env: sw.Envelope) -> None:
        ledger.calls.append((env.id, env.payload))

    producer = StreamProducer(client, stream)
    for i in range(200):
        await producer.send({"n": i}, message_id=f"m{i}")
    for i in range(0, 200, 10):
        await producer.send({"n": i}, message_id=f"m{i}")
    consumer = make_consumer(client, stream, make_layer(), handler, batch_size=32)
    async with running(consumer):
        await eventually(lambda: consumer.stats.acked == 220)
    assert ledger.counts == Counter({f"m{i}": 1 for i in range(200)})
    assert consumer.stats.outcomes == {"processed": 200, "duplicate": 20}
    assert await pending(client, stream) == 0


async def test_failed_message_is_dead_lettered_then_acknowledged(
    client: redis.asyncio.Redis, stream: str, make_layer: MakeLayer
) -> None:
    """A permanent failure: dead-lettered (confirmed) and acknowledged; other messages flow."""

    async def handler(env: sw.Envelope) -> None:
        if env.payload["bad"]:
            raise ValueError("bad order")

    producer = StreamProducer(client, stream)
    await producer.send({"bad": True}, message_id="bad")
    await producer.send({"bad": False}, message_id="good")
    layer = make_layer()
    consumer = make_consumer(client, stream, layer, handler)
    async with running(consumer):
        await eventually(lambda: consumer.stats.acked == 2)
    (entry,) = await layer.dead_letter_store.list()
    assert entry.message_id == "bad"
    assert entry.source_ref is not None
    assert entry.destination == stream
    assert await pending(client, stream) == 0


async def test_full_dlq_leaves_the_message_pending(
    client: redis.asyncio.Redis, stream: str, otel: Otel
) -> None:
    """When the DLQ write fails the entry is not acknowledged and the write error is counted."""

    async def handler(env: sw.Envelope) -> None:
        raise ValueError("bad")

    store = sw.InMemoryDeadLetterStore(max_entries=1)
    layer = sw.ReliabilityLayer(
        None,
        sw.ReliabilitySettings(),
        dead_letter_store=store,
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
    )
    producer = StreamProducer(client, stream)
    await producer.send({}, message_id="a")
    await producer.send({}, message_id="b")
    consumer = make_consumer(client, stream, layer, handler, claim_every_s=3600)
    async with running(consumer):
        await eventually(lambda: consumer.stats.acked + consumer.stats.not_acked == 2)
    assert consumer.stats.acked == 1
    assert await pending(client, stream) == 1
    assert otel.value(n.METRIC_DLQ_WRITE_ERRORS) == 1


async def test_entries_of_a_dead_consumer_are_reclaimed(
    client: redis.asyncio.Redis, stream: str, make_layer: MakeLayer
) -> None:
    """Entries read but never acked by a dead consumer are taken over with their delivery count."""
    producer = StreamProducer(client, stream)
    for i in range(5):
        await producer.send({"n": i}, message_id=f"r{i}")
    await client.xgroup_create(stream, "g", id="0")
    await client.xreadgroup("g", "dead", {stream: ">"}, count=5)  # read, then "crash"
    seen: list[int] = []

    async def handler(env: sw.Envelope) -> None:
        seen.append(env.delivery_count)

    consumer = make_consumer(client, stream, make_layer(), handler, claim_idle_ms=0)
    async with running(consumer):
        await eventually(lambda: consumer.stats.acked == 5)
    assert consumer.stats.reclaimed == 5
    assert seen == [2] * 5
    assert await pending(client, stream) == 0


async def test_poison_by_delivery_count_from_the_pending_list(
    client: redis.asyncio.Redis, stream: str, make_layer: MakeLayer
) -> None:
    """An entry delivered more than poison_max_deliveries times is dead-lettered as poison, unrun."""
    producer = StreamProducer(client, stream)
    entry_id = await producer.send({"n": 1}, message_id="poison")
    await client.xgroup_create(stream, "g", id="0")
    await client.xreadgroup("g", "dead", {stream: ">"}, count=1)
    for _ in range(3):  # three more crashed deliveries
        await client.xclaim(stream, "g", "dead", min_idle_time=0, message_ids=[entry_id])
    runs = 0

    async def handler(env: sw.Envelope) -> None:
        nonlocal runs
        runs += 1

    layer = make_layer(poison_max_deliveries=4)
    consumer = make_consumer(client, stream, layer, handler, claim_idle_ms=0)
    async with running(consumer):
        await eventually(lambda: consumer.stats.acked == 1)
    assert runs == 0
    (entry,) = await layer.dead_letter_store.list()
    assert (entry.reason, entry.delivery_count) == ("poison", 5)


async def test_trimmed_pending_entries_are_counted_as_lost(
    client: redis.asyncio.Redis, stream: str, make_layer: MakeLayer, otel: Otel
) -> None:
    """Entries deleted while pending are reported by XAUTOCLAIM, counted as lost and logged, never silent."""
    producer = StreamProducer(client, stream)
    ids = [await producer.send({"n": i}, message_id=f"t{i}") for i in range(4)]
    await client.xgroup_create(stream, "g", id="0")
    await client.xreadgroup("g", "dead", {stream: ">"}, count=4)
    await client.xdel(stream, ids[0], ids[1])

    async def handler(env: sw.Envelope) -> None:
        return None

    consumer = make_consumer(client, stream, make_layer(), handler, claim_idle_ms=0)
    async with running(consumer):
        await eventually(lambda: consumer.stats.acked == 2 and consumer.stats.lost == 2)
    assert otel.value(n.METRIC_CONSUMER_LOST) == 2
    assert await pending(client, stream) == 0


async def test_open_breaker_pauses_reading_and_resumes(
    client: redis.asyncio.Redis, stream: str, make_layer: MakeLayer
) -> None:
    """During an outage the breaker opens, reading pauses, nothing is dead-lettered, all is processed after."""
    outage = True
    done: set[str] = set()

    async def handler(env: sw.Envelope) -> None:
        if outage:
            raise ConnectionError("downstream down")
        done.add(env.id)

    layer = make_layer(
        circuit_breaker_threshold=3,
        circuit_breaker_timeout=0.2,
        max_retries=1,
        exhausted_transient_action="defer",
        poison_max_deliveries=None,
    )
    producer = StreamProducer(client, stream)
    for i in range(30):
        await producer.send({"n": i}, message_id=f"o{i}")
    consumer = make_consumer(client, stream, layer, handler, claim_idle_ms=0, concurrency=4)
    async with running(consumer):
        await eventually(lambda: consumer.stats.paused_for_breaker > 0)
        assert consumer.stats.acked == 0
        outage = False
        await eventually(lambda: len(done) == 30)
        await eventually(lambda: consumer.stats.acked == 30)
    assert await layer.dead_letter_store.count() == 0
    assert await pending(client, stream) == 0


async def test_per_key_ordering(client: redis.asyncio.Redis, stream: str, make_layer: MakeLayer) -> None:
    """With ordered_by_key, messages sharing a key are handled in stream order even when concurrent."""
    order: dict[str, list[int]] = {"a": [], "b": []}

    async def handler(env: sw.Envelope) -> None:
        await asyncio.sleep(0.001 * (env.payload["n"] % 3))  # uneven latency would reorder if allowed
        order[env.key or ""].append(env.payload["n"])

    producer = StreamProducer(client, stream)
    for i in range(40):
        await producer.send({"n": i}, message_id=f"k{i}", key="a" if i % 2 else "b")
    consumer = make_consumer(client, stream, make_layer(), handler, ordered_by_key=True, concurrency=8)
    async with running(consumer):
        await eventually(lambda: consumer.stats.acked == 40)
    assert order["a"] == sorted(order["a"])
    assert order["b"] == sorted(order["b"])
    assert len(order["a"]) == len(order["b"]) == 20


async def test_trace_context_links_consumer_to_producer(
    client: redis.asyncio.Redis, stream: str, make_layer: MakeLayer, otel: Otel
) -> None:
    """The producer writes traceparent; the consumer's process span links to the producer span."""
    tracer = otel.tracer_provider.get_tracer("test")
    producer = StreamProducer(client, stream)
    with tracer.start_as_current_span("publish") as publish:
        from opentelemetry import trace

        with trace.use_span(publish):
            await producer.send({"n": 1}, message_id="traced")

    async def handler(env: sw.Envelope) -> None:
        assert "traceparent" in env.headers

    # the producer helper injects through the global propagator, which reads the current span
    consumer = make_consumer(client, stream, make_layer(), handler)
    async with running(consumer):
        await eventually(lambda: consumer.stats.acked == 1)
    (span,) = otel.spans(f"process {stream}")
    assert [link.context.span_id for link in span.links] == [publish.get_span_context().span_id]


async def test_stop_mid_batch_acknowledges_nothing_unprocessed(
    client: redis.asyncio.Redis, stream: str, make_layer: MakeLayer
) -> None:
    """stop() with handlers still running: exits within the deadline, the unfinished entries stay pending."""
    started = asyncio.Event()
    count = 0

    async def handler(env: sw.Envelope) -> None:
        nonlocal count
        count += 1
        if count > 2:
            started.set()
            await asyncio.Event().wait()  # never finishes by itself

    producer = StreamProducer(client, stream)
    for i in range(6):
        await producer.send({"n": i}, message_id=f"s{i}")
    layer = make_layer(processing_timeout=None, retry_deadline=None)
    consumer = make_consumer(client, stream, layer, handler, shutdown_timeout=0.2, concurrency=6)
    task = asyncio.create_task(consumer.run())
    await started.wait()
    await eventually(lambda: consumer.stats.acked == 2)
    consumer.stop()
    await asyncio.wait_for(task, timeout=5)
    assert await pending(client, stream) == 4
    # and the abandoned ids were released: another consumer can take them over at once
    assert not await layer.deduplication_manager.is_duplicate("s5")


async def test_health_reports_readiness(
    client: redis.asyncio.Redis, stream: str, make_layer: MakeLayer
) -> None:
    """health(): ready with a closed breaker and reachable stores; not ready once the breaker is open."""

    async def handler(env: sw.Envelope) -> None:
        raise ConnectionError("down")

    layer = make_layer(circuit_breaker_threshold=1, max_retries=0, circuit_breaker_timeout=60)
    consumer = make_consumer(client, stream, layer, handler)
    await consumer.ensure_group()
    healthy = await consumer.health()
    assert healthy.ready
    assert healthy.redis_ok
    await StreamProducer(client, stream).send({}, message_id="h")
    async with running(consumer):
        await eventually(lambda: layer.circuit_breaker.state == "open")
    unhealthy = await consumer.health()
    assert not unhealthy.ready
    assert "circuit breaker open" in unhealthy.reason
    assert unhealthy.dlq_depth == 1  # max_retries=0: the one failure was dead-lettered and acked
    assert unhealthy.pending == 0


@pytest.mark.parametrize("kill", ["kill", "pause"], ids=["redis-killed", "redis-paused"])
async def test_redis_outage_backs_off_and_recovers(
    redis_server_per_test: Any, stream: str, make_layer: MakeLayer, kill: str
) -> None:
    """Redis killed or paused mid-stream: the runner backs off without spinning and finishes after recovery."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    server = redis_server_per_test
    client = redis.asyncio.Redis.from_url(server.url, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
    try:
        done: set[str] = set()

        async def handler(env: sw.Envelope) -> None:
            done.add(env.id)

        producer = StreamProducer(client, stream)
        for i in range(10):
            await producer.send({"n": i}, message_id=f"x{i}")
        consumer = make_consumer(client, stream, make_layer(), handler, max_backoff_s=0.2)
        async with running(consumer):
            await eventually(lambda: consumer.stats.acked == 10)
            if kill == "kill":
                server.kill()
            else:
                server.pause()
            await eventually(lambda: consumer.stats.redis_errors >= 2)
            errors_before = consumer.stats.redis_errors
            if kill == "kill":
                server.restart()
            else:
                server.resume()
            if kill == "kill":  # a restarted server has no data: write the rest again
                for i in range(10, 20):
                    await producer.send({"n": i}, message_id=f"x{i}")
                await eventually(lambda: len(done) == 20)
            else:
                for i in range(10, 20):
                    await producer.send({"n": i}, message_id=f"x{i}")
                await eventually(lambda: len(done) == 20)
        # a bounded number of retries, not a busy loop, while Redis was away
        assert errors_before < 200
    finally:
        await client.aclose()


async def test_runners_share_breaker_state_and_flush_fleet_counters(
    client: redis.asyncio.Redis, stream: str, otel: Otel
) -> None:
    """With shared_breaker on, one runner's open breaker is adopted by another; counters reach the Redis hash."""
    settings = sw.ReliabilitySettings(
        circuit_breaker_threshold=1,
        circuit_breaker_timeout=60,
        max_retries=0,
        shared_breaker=True,
        shared_breaker_poll_interval=0.02,
        metrics_flush_interval=0.05,
        service_name="fleet",
        exhausted_transient_action="defer",
    )

    def layer() -> sw.ReliabilityLayer:
        return sw.ReliabilityLayer(
            client, settings, tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider
        )

    async def failing_handler(env: sw.Envelope) -> None:
        raise ConnectionError("downstream down")

    async def quiet_handler(env: sw.Envelope) -> None:
        return None

    first, second = layer(), layer()
    failing = make_consumer(client, stream, first, failing_handler, name="a")
    idle = make_consumer(client, f"{stream}-other", second, quiet_handler, name="b")
    await StreamProducer(client, stream).send({}, message_id="boom")
    async with running(failing), running(idle):
        await eventually(lambda: first.circuit_breaker.state == "open")
        await eventually(lambda: second.circuit_breaker.state == "open")

        async def flushed() -> bool:
            totals = await client.hgetall("streamwarden:metrics:fleet")
            return int(totals.get(b"messages_deferred", 0)) >= 1

        await eventually(flushed)
    await first.aclose()
    await second.aclose()
