"""The Kafka runner against a real broker (Tansu): every message handled once, commits that never pass
an unfinished record, restarts from the committed offsets, ordering, backpressure and give-backs."""

from __future__ import annotations

import asyncio
import collections

from _kafka_suite import MakeLayer, MakeTopic, Running, committed_is, committed_offsets, make_runner, produce
from aiokafka import AIOKafkaProducer, TopicPartition

from _support import Otel, eventually
from streamwarden._envelope import Envelope
from streamwarden._retry import ExponentialBackoff
from streamwarden._runners._kafka import KafkaOrdering, TopicProducer


async def test_every_message_once_and_committed_to_the_end(
    bootstrap: str,
    make_topic: MakeTopic,
    group: str,
    producer: AIOKafkaProducer,
    make_layer: MakeLayer,
    otel: Otel,
) -> None:
    """300 messages on 3 partitions: each handled once, and the group's commits reach each end."""
    topic = await make_topic(3)
    ids = await produce(producer, topic, 300, partitions=3, key=lambda i: f"k{i % 7}")
    seen: collections.Counter[str] = collections.Counter()

    async def handler(env: Envelope) -> None:
        seen[env.id] += 1

    runner = make_runner(bootstrap, topic, group, handler, make_layer(), concurrency=8)
    async with Running(runner):
        await eventually(lambda: len(seen) == 300, what="all handled")
        await eventually(
            lambda: committed_is(bootstrap, group, topic, {0: 100, 1: 100, 2: 100}), what="committed"
        )
        health = await runner.health()
        assert health.ready, health.reason
        assert (health.lag, health.pending) == (0, 0)
        assert runner.partition_lags() == {f"{topic}/{p}": 0 for p in range(3)}
        rows = runner._partition_lag_rows()  # the streamwarden.consumer.partition_lag gauge's source
        assert sorted(attrs["messaging.destination.partition.id"] for _name, _lag, attrs in rows) == [
            "0",
            "1",
            "2",
        ]
        assert {attrs["messaging.destination.name"] for _name, _lag, attrs in rows} == {topic}
        exported = otel.points("streamwarden.consumer.partition_lag")  # the gauge, as a reader sees it
        assert sorted(attrs["messaging.destination.partition.id"] for attrs, _ in exported) == ["0", "1", "2"]
        assert {value for _attrs, value in exported} == {0}
    assert set(seen) == set(ids)
    assert max(seen.values()) == 1
    assert runner.stats.acked == 300
    assert runner.stats.outcomes == {"processed": 300}


async def test_commit_waits_for_the_unfinished_record(
    bootstrap: str, make_topic: MakeTopic, group: str, producer: AIOKafkaProducer, make_layer: MakeLayer
) -> None:
    """Records after an unfinished one finish first: the commit stops at the unfinished offset until it
    is done, then jumps to the end."""
    topic = await make_topic(1)
    await produce(producer, topic, 20)
    release = asyncio.Event()
    done: list[str] = []

    async def handler(env: Envelope) -> None:
        if env.id == "m5":
            await asyncio.wait_for(release.wait(), timeout=20)
        done.append(env.id)

    runner = make_runner(
        bootstrap, topic, group, handler, make_layer(), concurrency=32, ordering=KafkaOrdering.UNORDERED
    )
    async with Running(runner):
        await eventually(lambda: runner.stats.acked == 19, what="the other 19 acknowledged")
        assert "m5" not in done
        assert await committed_offsets(bootstrap, group, topic, 1) == {0: 5}
        release.set()
        await eventually(lambda: committed_is(bootstrap, group, topic, {0: 20}), what="committed to the end")
    assert sorted(done) == sorted(f"m{i}" for i in range(20))


async def test_restart_resumes_from_the_committed_offsets(
    bootstrap: str, make_topic: MakeTopic, group: str, producer: AIOKafkaProducer, make_layer: MakeLayer
) -> None:
    """A new runner of the group (with an empty dedup store of its own) reads only what was not committed."""
    topic = await make_topic(2)
    await produce(producer, topic, 20, partitions=2)
    first: list[str] = []
    second: list[str] = []

    async def handle_first(env: Envelope) -> None:
        first.append(env.id)

    async def handle_second(env: Envelope) -> None:
        second.append(env.id)

    async with Running(make_runner(bootstrap, topic, group, handle_first, make_layer())):
        await eventually(lambda: committed_is(bootstrap, group, topic, {0: 10, 1: 10}), what="committed")
    await produce(producer, topic, 10, partitions=2, start=20)
    async with Running(make_runner(bootstrap, topic, group, handle_second, make_layer())):
        await eventually(lambda: committed_is(bootstrap, group, topic, {0: 15, 1: 15}), what="committed")
    assert sorted(first) == sorted(f"m{i}" for i in range(20))
    assert sorted(second) == sorted(f"m{i}" for i in range(20, 30))


async def test_give_back_redelivers(
    bootstrap: str, make_topic: MakeTopic, group: str, producer: AIOKafkaProducer, make_layer: MakeLayer
) -> None:
    """A deferred message is held, handed out again after the back-off (delivery 2), and then committed."""
    topic = await make_topic(1)
    await produce(producer, topic, 10)
    runs: list[tuple[str, int]] = []

    async def handler(env: Envelope) -> None:
        runs.append((env.id, env.delivery_count))
        if env.id == "m3" and env.delivery_count == 1:
            raise ConnectionError("dependency down")

    layer = make_layer(max_retries=0, exhausted_transient_action="defer", circuit_breaker_threshold=100)
    runner = make_runner(
        bootstrap,
        topic,
        group,
        handler,
        layer,
        redeliver_backoff=ExponentialBackoff(base=0.05, cap=0.05, jitter=False),
    )
    async with Running(runner):
        await eventually(lambda: committed_is(bootstrap, group, topic, {0: 10}), what="committed")
    assert ("m3", 1) in runs
    assert ("m3", 2) in runs
    assert len(runs) == 11
    assert runner.stats.not_acked == 1
    assert await layer.dead_letter_store.count() == 0


async def test_open_breaker_pauses_the_partitions(
    bootstrap: str, make_topic: MakeTopic, group: str, producer: AIOKafkaProducer, make_layer: MakeLayer
) -> None:
    """While the breaker is open every assigned partition is paused (the member keeps its partitions);
    reading resumes when it half-opens, and every message is handled, none dead-lettered."""
    topic = await make_topic(2)
    await produce(producer, topic, 10, partitions=2)
    failing = True
    handled: set[str] = set()

    async def handler(env: Envelope) -> None:
        if failing:
            raise ConnectionError("dependency down")
        handled.add(env.id)

    layer = make_layer(
        max_retries=0,
        exhausted_transient_action="defer",
        circuit_breaker_threshold=1,
        circuit_breaker_timeout=1.0,
    )
    runner = make_runner(
        bootstrap,
        topic,
        group,
        handler,
        layer,
        redeliver_backoff=ExponentialBackoff(base=0.05, cap=0.05, jitter=False),
    )
    transport = runner.kafka_transport
    async with Running(runner):
        await eventually(lambda: transport.paused, what="paused for the breaker")
        client = transport.client
        assigned = set(client.assignment())
        assert assigned == {TopicPartition(topic, 0), TopicPartition(topic, 1)}
        assert set(client.paused()) == assigned
        failing = False
        await eventually(lambda: len(handled) == 10, what="all handled after the breaker closed")
        assert not transport.paused
        assert not client.paused()
        assert set(client.assignment()) == assigned
        await eventually(lambda: committed_is(bootstrap, group, topic, {0: 5, 1: 5}), what="committed")
    assert runner.stats.paused_for_breaker >= 1
    assert await layer.dead_letter_store.count() == 0


def _interleave(env: Envelope) -> int:
    """A few event-loop turns, different per message, so concurrent handlers finish out of order."""
    return hash(env.id) % 5


async def test_ordering_by_key(
    bootstrap: str, make_topic: MakeTopic, group: str, producer: AIOKafkaProducer, make_layer: MakeLayer
) -> None:
    """Key mode: one key's records run one after another in offset order; different keys run at once."""
    topic = await make_topic(2)
    await produce(producer, topic, 200, partitions=2, key=lambda i: f"k{i % 6}")
    order: dict[tuple[int, str], list[int]] = collections.defaultdict(list)
    running: dict[tuple[int, str], int] = collections.Counter()
    overlap = 0
    now = 0

    async def handler(env: Envelope) -> None:
        nonlocal overlap, now
        partition = int(env.source_ref.split("/")[1])
        chain = (partition, env.key or "")
        assert running[chain] == 0, "two records of one key ran at once"
        running[chain] += 1
        now += 1
        overlap = max(overlap, now)
        for _ in range(_interleave(env)):
            await asyncio.sleep(0)
        order[chain].append(env.payload["n"])
        running[chain] -= 1
        now -= 1

    runner = make_runner(bootstrap, topic, group, handler, make_layer(), concurrency=16)
    async with Running(runner):
        await eventually(lambda: sum(map(len, order.values())) == 200, what="all handled")
    assert all(seq == sorted(seq) for seq in order.values())
    assert overlap > 1


async def test_ordering_by_partition(
    bootstrap: str, make_topic: MakeTopic, group: str, producer: AIOKafkaProducer, make_layer: MakeLayer
) -> None:
    """Partition mode: a partition's records run one at a time, in offset order, whatever their keys."""
    topic = await make_topic(3)
    await produce(producer, topic, 150, partitions=3, key=lambda i: f"k{i}")
    offsets: dict[int, list[int]] = collections.defaultdict(list)
    running: collections.Counter[int] = collections.Counter()

    async def handler(env: Envelope) -> None:
        _topic, partition, offset = env.source_ref.split("/")
        assert running[int(partition)] == 0, "two records of one partition ran at once"
        running[int(partition)] += 1
        for _ in range(_interleave(env)):
            await asyncio.sleep(0)
        offsets[int(partition)].append(int(offset))
        running[int(partition)] -= 1

    runner = make_runner(
        bootstrap, topic, group, handler, make_layer(), concurrency=16, ordering=KafkaOrdering.PARTITION
    )
    async with Running(runner):
        await eventually(lambda: sum(map(len, offsets.values())) == 150, what="all handled")
    assert offsets == {p: list(range(50)) for p in range(3)}


async def test_spans_name_kafka_and_link_to_the_producer(
    bootstrap: str,
    make_topic: MakeTopic,
    group: str,
    producer: AIOKafkaProducer,
    make_layer: MakeLayer,
    otel: Otel,
) -> None:
    """TopicProducer writes the id header and its send span's traceparent; the runner's process span
    says messaging.system=kafka, the topic and the group, and links to that send span."""
    topic = await make_topic(1)
    sender = TopicProducer(producer, topic, tracer_provider=otel.tracer_provider)
    where = await sender.send({"order": 1}, message_id="o-1", key="cust-9")
    assert where == f"{topic}/0/0"
    seen: list[Envelope] = []

    async def handler(env: Envelope) -> None:
        seen.append(env)

    async with Running(make_runner(bootstrap, topic, group, handler, make_layer())):
        await eventually(lambda: bool(otel.spans(f"process {topic}")), what="process span")
    [env] = seen
    assert (env.id, env.key, env.payload) == ("o-1", "cust-9", {"order": 1})
    [send] = otel.spans(f"send {topic}")
    [process] = otel.spans(f"process {topic}")
    assert send.attributes["messaging.system"] == "kafka"
    assert process.attributes["messaging.system"] == "kafka"
    assert process.attributes["messaging.destination.name"] == topic
    assert process.attributes["messaging.consumer.group.name"] == group
    assert [link.context.span_id for link in process.links] == [send.context.span_id]
    # messaging.kafka.* per the semantic conventions, from the record
    assert process.attributes["messaging.destination.partition.id"] == "0"
    assert process.attributes["messaging.kafka.offset"] == 0
    assert process.attributes["messaging.kafka.message.key"] == "cust-9"
