"""RedisStreamConsumer against a real redis-server: ack by outcome, reclaim, backpressure, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio

import streamwarden as sw
from _support import Otel, eventually
from streamwarden import _names as n
from streamwarden._dedup import RecordState
from streamwarden._redis._wire import as_text
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


async def test_stream_delivery_counts_do_not_make_poison(
    client: redis.asyncio.Redis, stream: str, make_layer: MakeLayer
) -> None:
    """An entry the stream delivered 5 times but whose handler never ran is run, not dead-lettered as poison.

    Before issue 9 poison was read from the stream's delivery count: this entry went to the DLQ unrun.
    """
    producer = StreamProducer(client, stream)
    entry_id = await producer.send({"n": 1}, message_id="healthy")
    await client.xgroup_create(stream, "g", id="0")
    await client.xreadgroup("g", "dead", {stream: ">"}, count=1)
    for _ in range(4):  # four more deliveries lost to crashes, an outage, ...
        await client.xclaim(stream, "g", "dead", min_idle_time=0, message_ids=[entry_id])
    runs = 0

    async def handler(env: sw.Envelope) -> None:
        nonlocal runs
        runs += 1

    layer = make_layer(poison_max_deliveries=4)
    consumer = make_consumer(client, stream, layer, handler, claim_idle_ms=0)
    async with running(consumer):
        await eventually(lambda: consumer.stats.acked == 1)
    assert runs == 1
    assert consumer.stats.outcomes == {"processed": 1}
    assert await layer.dead_letter_store.count() == 0


async def test_poison_is_counted_from_handler_runs(
    client: redis.asyncio.Redis, stream: str, make_layer: MakeLayer
) -> None:
    """A message failing on every run is dead-lettered as poison after poison_max_deliveries runs, unrun."""
    runs = 0

    async def handler(env: sw.Envelope) -> None:
        nonlocal runs
        runs += 1
        raise ConnectionError("always")

    layer = make_layer(
        poison_max_deliveries=3,
        max_retries=0,
        exhausted_transient_action="defer",
        circuit_breaker_threshold=100,
    )
    await StreamProducer(client, stream).send({}, message_id="bad")
    consumer = make_consumer(client, stream, layer, handler, claim_idle_ms=0)
    async with running(consumer):
        await eventually(lambda: consumer.stats.acked == 1)
    assert runs == 3
    (entry,) = await layer.dead_letter_store.list()
    assert (entry.message_id, entry.reason, entry.attempts) == ("bad", "poison", 0)


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
    """stop() with handlers still running: exits within the deadline, the unfinished entries stay pending
    and keep their claims (the lease expires; a redelivery is a counted takeover, never uncounted)."""
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
    store = layer.dedup_store_for(stream)
    assert {await store.state(f"s{i}") for i in range(2, 6)} == {RecordState.IN_PROGRESS}


async def test_health_reports_readiness(
    client: redis.asyncio.Redis, stream: str, make_layer: MakeLayer
) -> None:
    """health(): not ready before run(); ready while consuming; not ready once the breaker is open."""

    async def handler(env: sw.Envelope) -> None:
        raise ConnectionError("down")

    layer = make_layer(circuit_breaker_threshold=1, max_retries=0, circuit_breaker_timeout=60)
    consumer = make_consumer(client, stream, layer, handler)
    await consumer.ensure_group()
    idle = await consumer.health()
    assert not idle.ready
    assert idle.redis_ok
    async with running(consumer):
        await eventually(lambda: _ready(consumer))
        await StreamProducer(client, stream).send({}, message_id="h")
        await eventually(lambda: layer.circuit_breaker.state == "open")
        unhealthy = await consumer.health()
        assert not unhealthy.ready
        assert "circuit breaker open" in unhealthy.reason
        assert unhealthy.dlq_depth == 1  # max_retries=0: the one failure was dead-lettered and acked
        await eventually(lambda: consumer.stats.acked == 1)
        assert (await consumer.health()).pending == 0


async def _ready(consumer: RedisStreamConsumer) -> bool:
    return (await consumer.health()).ready


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


# --- issue 9 ---------------------------------------------------------------------------------------------
async def test_reclaim_takes_over_no_more_entries_than_free_slots(
    client: redis.asyncio.Redis, stream: str, make_layer: MakeLayer
) -> None:
    """XAUTOCLAIM asks for the free slots only: 30 orphaned entries, 3 slots, 3 move to this consumer.

    Before the fix it claimed a whole batch (64), claimed their dedup leases and let them run down
    while waiting for slots, so another consumer could take them over and run them at the same time.
    """
    producer = StreamProducer(client, stream)
    for i in range(30):
        await producer.send({"n": i}, message_id=f"o{i}")
    await client.xgroup_create(stream, "g", id="0")
    await client.xreadgroup("g", "dead", {stream: ">"}, count=30)
    release = asyncio.Event()
    started: list[str] = []

    async def handler(env: sw.Envelope) -> None:
        started.append(env.id)
        await release.wait()

    consumer = make_consumer(client, stream, make_layer(), handler, claim_idle_ms=0, concurrency=3)
    async with running(consumer):
        await eventually(lambda: len(started) == 3)
        owners = {as_text(c["name"]): int(c["pending"]) for c in await client.xinfo_consumers(stream, "g")}
        assert owners == {"dead": 27, "c1": 3}
        release.set()
        await eventually(lambda: consumer.stats.acked == 30)


async def test_a_key_that_is_not_a_stream_stops_run_with_a_configuration_error(
    client: redis.asyncio.Redis, stream: str, make_layer: MakeLayer
) -> None:
    """WRONGTYPE on the stream key ends run() with a ConfigurationError saying what to fix (not retried)."""
    await client.set(stream, "a string, not a stream")

    async def handler(env: sw.Envelope) -> None:
        return None

    consumer = make_consumer(client, stream, make_layer(), handler)
    with pytest.raises(sw.ConfigurationError, match="is not a stream") as raised:
        await asyncio.wait_for(consumer.run(), timeout=10)
    assert "WRONGTYPE" in str(raised.value), "Redis' own words are kept"
    assert consumer.stats.redis_errors == 0


async def test_a_missing_permission_stops_run_with_a_configuration_error(
    redis_server_per_test: Any, client: redis.asyncio.Redis, stream: str, make_layer: MakeLayer
) -> None:
    """NOPERM (an ACL user without XREADGROUP) ends run() with a ConfigurationError naming docs/security.md."""
    await client.execute_command("ACL", "SETUSER", "reader", "on", ">pw", "~*", "+@all", "-xreadgroup")
    limited = redis.asyncio.Redis.from_url(
        redis_server_per_test.url.replace("redis://", "redis://reader:pw@"), socket_timeout=5
    )

    async def handler(env: sw.Envelope) -> None:
        return None

    try:
        consumer = make_consumer(limited, stream, make_layer(), handler)
        with pytest.raises(sw.ConfigurationError, match=r"docs/security\.md") as raised:
            await asyncio.wait_for(consumer.run(), timeout=10)
        assert "xreadgroup" in str(raised.value).lower()
        assert "\n" not in str(raised.value)
    finally:
        await limited.aclose()


HOSTILE: list[dict[Any, Any]] = [
    {"id": "deep-array", "payload": "[" * 2000 + "]" * 2000},  # 4 KB: RecursionError before the fix
    {"id": "deep-object", "payload": '{"a":' * 2000 + "1" + "}" * 2000},
    {"id": "not-utf8", "payload": b"\xff\xfe\x00{garbage"},
    {"id": "number", "payload": "42"},
    {"id": "no-payload", "other": "x"},
    {"payload": '{"no": "id"}'},
    {"id": "", "payload": "{}"},
    {b"\xff\xfe": b"\x80", "id": "binary-field-name"},
    {"id": b"\xff\xfeid", "payload": "{}"},
    {"id": "huge", "payload": json.dumps({"x": "y" * 1_000_000})},
    {"id": "binary-key", "key": b"\xff", "payload": "{}"},
]


async def test_no_entry_content_stops_the_consumer(
    client: redis.asyncio.Redis, stream: str, otel: Otel
) -> None:
    """Deep, huge, non-UTF-8, non-object and field-less entries are all processed; the consumer goes on."""
    seen: dict[str, Any] = {}

    async def handler(env: sw.Envelope) -> None:
        seen[env.id] = env.payload

    for fields in HOSTILE:
        await client.xadd(stream, fields)
    await StreamProducer(client, stream).send({"ok": True}, message_id="after")
    layer = sw.ReliabilityLayer(
        client,
        sw.ReliabilitySettings(),
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
    )
    consumer = make_consumer(client, stream, layer, handler, ordered_by_key=True)
    async with running(consumer) as task:
        await eventually(lambda: consumer.stats.acked == len(HOSTILE) + 1)
        assert not task.done()
    assert seen["after"] == {"ok": True}
    assert isinstance(seen["deep-array"], str), "too deep for the parser: the raw text"
    assert seen["number"] == 42
    assert seen["\udcff\udcfeid"] == {}
    assert consumer.stats.outcomes == {"processed": len(HOSTILE) + 1}


async def test_the_id_field_setting_names_the_entry_field_holding_the_id(
    client: redis.asyncio.Redis, stream: str, make_layer: MakeLayer
) -> None:
    """STREAMWARDEN_ID_FIELD (settings.id_field) is honoured: a re-sent order_id runs once."""
    runs: list[str] = []

    async def handler(env: sw.Envelope) -> None:
        runs.append(env.id)

    producer = StreamProducer(client, stream, id_field="order_id")
    await producer.send({"n": 1}, message_id="o-1")
    await producer.send({"n": 1}, message_id="o-1")
    consumer = make_consumer(client, stream, make_layer(id_field="order_id"), handler)
    async with running(consumer):
        await eventually(lambda: consumer.stats.acked == 2)
    assert runs == ["o-1"]
    assert consumer.stats.outcomes == {"processed": 1, "duplicate": 1}


async def test_spans_name_redis_and_the_group_and_link_to_the_producer_span(
    client: redis.asyncio.Redis, stream: str, make_layer: MakeLayer, otel: Otel
) -> None:
    """A traced producer writes a PRODUCER ``send {stream}`` span whose context travels with the entry;
    the consumer's process span links to it and says ``messaging.system=redis`` and the consumer group
    (the runner's spans said ``streamwarden`` and no group before)."""
    producer = StreamProducer(client, stream, tracer_provider=otel.tracer_provider)
    await producer.send({"n": 1}, message_id="traced")

    async def handler(env: sw.Envelope) -> None:
        return None

    consumer = make_consumer(client, stream, make_layer(), handler)
    async with running(consumer):
        await eventually(lambda: consumer.stats.acked == 1)
    (send,) = otel.spans(f"send {stream}")
    (process,) = otel.spans(f"process {stream}")
    assert [link.context.span_id for link in process.links] == [send.context.span_id]
    assert process.attributes is not None
    assert process.attributes["messaging.system"] == "redis"
    assert process.attributes["messaging.consumer.group.name"] == "g"


async def test_oldest_pending_age_is_a_gauge(
    client: redis.asyncio.Redis, stream: str, make_layer: MakeLayer, otel: Otel
) -> None:
    """The age of the oldest entry delivered and not acknowledged is exported (0 when nothing is
    pending), so an alert can page on a message stuck in the pending list."""
    release = asyncio.Event()
    started = asyncio.Event()

    async def handler(env: sw.Envelope) -> None:
        started.set()
        await release.wait()

    # an entry id is its creation time in ms: id 1-1 makes this entry 1970's, so its age is known
    await client.xadd(stream, {"id": "stuck", "payload": "{}"}, id="1-1")
    consumer = make_consumer(client, stream, make_layer(), handler, metrics_every_s=0.01)

    def age() -> list[Any]:
        return [v for _, v in otel.points(n.METRIC_CONSUMER_OLDEST_PENDING_AGE)]

    async with running(consumer):
        await started.wait()
        await consumer.refresh_lag()
        (stuck_age,) = age()
        assert stuck_age > 50 * 365 * 86400  # seconds since 1970, from the server's clock
        await client.xadd(stream, {"id": "later", "payload": "{}"})  # does not change the oldest
        release.set()
        await eventually(lambda: consumer.stats.acked == 2)
        await consumer.refresh_lag()
        assert age() == [0.0]
