"""Retry topics (Spring Kafka's non-blocking retries) against a real broker (Tansu): a failed record is
copied to ``{topic}.retry.N`` with a due time, runs once due without holding its partition's commit,
counts toward poison across topics, and a forged due time cannot stall a retry partition."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import pytest
from _kafka_suite import (
    FAST_GROUP,
    MakeLayer,
    MakeTopic,
    Running,
    committed_is,
    committed_offsets,
    create_topic,
    make_runner,
    produce,
)
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st

import streamwarden as sw
from _support import Otel, eventually
from streamwarden import _names
from streamwarden._envelope import Envelope
from streamwarden._retry import ExponentialBackoff
from streamwarden._runners._kafka import (
    HEADER_ORIGINAL_OFFSET,
    HEADER_ORIGINAL_PARTITION,
    HEADER_ORIGINAL_TOPIC,
    HEADER_RETRY_DELIVERY_COUNT,
    HEADER_RETRY_DUE,
    HEADER_RETRY_ERROR_TYPE,
    KafkaTransport,
    TopicProducer,
    decode_record,
)

RECORDS = _names.METRIC_RETRY_TOPIC_RECORDS


async def read_all(bootstrap: str, topic: str, expected: int) -> list[Any]:
    """The first ``expected`` records of ``topic`` (partition 0 onwards), read without a group."""
    reader = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await reader.start()
    try:
        out: list[Any] = []
        deadline = time.monotonic() + 15
        while len(out) < expected and time.monotonic() < deadline:
            batch = await reader.getmany(timeout_ms=200)
            for records in batch.values():
                out += records
        return out
    finally:
        await reader.stop()


def headers_of(record: Any) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, value in record.headers:
        found.setdefault(name, []).append(value.decode("utf-8", "surrogateescape"))
    return found


async def test_a_failed_record_waits_in_retry_topics_without_holding_its_partition(
    bootstrap: str,
    make_topic: MakeTopic,
    group: str,
    producer: AIOKafkaProducer,
    make_layer: MakeLayer,
    otel: Otel,
) -> None:
    """m2 fails twice: it goes to .retry.0, then .retry.1, and runs a third time no earlier than each due
    time; the others run meanwhile and the topic's commit reaches its end while m2 waits."""
    topic = await make_topic(1)
    await produce(producer, topic, 2)
    # m2 carries forged retry headers: the copy must hold ours, once each
    await producer.send_and_wait(
        topic,
        value=json.dumps({"n": 2}).encode(),
        headers=[
            ("message_id", b"m2"),
            (HEADER_RETRY_DUE, b"99999999999999"),
            (HEADER_ORIGINAL_OFFSET, b"999"),
            (HEADER_ORIGINAL_TOPIC, b"elsewhere"),
        ],
    )
    await produce(producer, topic, 2, start=3)
    runs: list[tuple[str, float, str | None, int]] = []
    failures: list[float] = []

    async def handler(env: Envelope) -> None:
        runs.append((env.id, time.time(), env.source_ref, env.delivery_count))
        if env.id == "m2" and sum(1 for r in runs if r[0] == "m2") <= 2:
            failures.append(time.time())
            raise ConnectionError("dependency down")

    layer = make_layer(max_retries=0, exhausted_transient_action="defer", circuit_breaker_threshold=100)
    runner = make_runner(bootstrap, topic, group, handler, layer, retry_delays=(0.4, 0.8))
    async with Running(runner):
        await eventually(lambda: committed_is(bootstrap, group, topic, {0: 5}), what="topic committed")
        m2_runs_at_commit = sum(1 for r in runs if r[0] == "m2")
        await eventually(lambda: sum(1 for r in runs if r[0] == "m2") == 3, what="m2's third run")
        await eventually(lambda: committed_is(bootstrap, group, f"{topic}.retry.0", {0: 1}), what="retry.0")
        await eventually(lambda: committed_is(bootstrap, group, f"{topic}.retry.1", {0: 1}), what="retry.1")

    assert m2_runs_at_commit < 3  # the topic's commit did not wait for m2's last run
    m2 = [r for r in runs if r[0] == "m2"]
    assert [r[2] for r in m2] == [f"{topic}/0/2"] * 3  # the source is the original record every time
    assert [r[3] for r in m2] == [1, 2, 3]
    # each retry ran no earlier than its due time (failure + delay; the due time is in whole ms)
    assert m2[1][1] >= failures[0] + 0.4 - 0.002
    assert m2[2][1] >= failures[1] + 0.8 - 0.002
    # the others were not held behind m2
    others = [r for r in runs if r[0] != "m2"]
    assert sorted(r[0] for r in others) == ["m0", "m1", "m3", "m4"]
    assert all(r[1] < m2[1][1] for r in others)

    [copy0] = await read_all(bootstrap, f"{topic}.retry.0", 1)
    [copy1] = await read_all(bootstrap, f"{topic}.retry.1", 1)
    for copy, count in ((copy0, "2"), (copy1, "3")):
        head = headers_of(copy)
        assert head["message_id"] == ["m2"]
        assert head[HEADER_ORIGINAL_TOPIC] == [topic]
        assert head[HEADER_ORIGINAL_PARTITION] == ["0"]
        assert head[HEADER_ORIGINAL_OFFSET] == ["2"]
        assert head[HEADER_RETRY_DELIVERY_COUNT] == [count]
        assert head[HEADER_RETRY_ERROR_TYPE] == ["builtins.ConnectionError"]
        [due] = head[HEADER_RETRY_DUE]
        assert int(due) < 99999999999999
        assert json.loads(copy.value) == {"n": 2}
    assert runner.stats.rerouted == 2
    assert otel.value(RECORDS, streamwarden__retry_topic__result="sent") == 2
    assert otel.value(RECORDS, streamwarden__retry_topic__name=f"{topic}.retry.1") == 1
    assert await layer.dead_letter_store.count() == 0


async def test_poison_counts_runs_across_retry_topics(
    bootstrap: str, make_topic: MakeTopic, group: str, producer: AIOKafkaProducer, make_layer: MakeLayer
) -> None:
    """A message that always fails retriably cycles through the (last) retry topic until its dedup record
    counts ``poison_max_deliveries`` runs; then it is dead-lettered as poison, unrun, and all is committed."""
    topic = await make_topic(1)
    await produce(producer, topic, 3)
    runs: list[str] = []

    async def handler(env: Envelope) -> None:
        runs.append(env.id)
        if env.id == "m1":
            raise TimeoutError("never answers")

    layer = make_layer(
        max_retries=0,
        exhausted_transient_action="defer",
        circuit_breaker_threshold=100,
        poison_max_deliveries=3,
    )
    runner = make_runner(bootstrap, topic, group, handler, layer, retry_delays=(0.05,))
    async with Running(runner):
        await eventually(lambda: layer.dead_letter_store.count(), what="dead-lettered")
        await eventually(lambda: committed_is(bootstrap, group, topic, {0: 3}), what="topic committed")
        await eventually(
            lambda: committed_is(bootstrap, group, f"{topic}.retry.0", {0: 3}), what="retry committed"
        )
    assert runs.count("m1") == 3
    assert runs.count("m0") == runs.count("m2") == 1
    [entry] = await layer.dead_letter_store.list()
    assert entry.message_id == "m1"
    assert entry.reason == "poison"
    assert entry.source_ref == f"{topic}/0/1"


async def test_a_forged_due_time_cannot_stall_a_retry_partition(
    bootstrap: str, make_topic: MakeTopic, group: str, producer: AIOKafkaProducer, make_layer: MakeLayer
) -> None:
    """Records written straight to a retry topic with a due time centuries away, or an unreadable one,
    run within the topic's delay; the record behind them too."""
    topic = await make_topic(1)
    retry = await create_topic(bootstrap, 1, name=f"{topic}.retry.0")
    for mid, due in (("far", b"32503680000000"), ("junk", b"not-a-time"), ("nan", b"nan")):
        await producer.send_and_wait(
            retry, value=b"{}", headers=[("message_id", mid.encode()), (HEADER_RETRY_DUE, due)]
        )
    await producer.send_and_wait(retry, value=b"{}", headers=[("message_id", b"plain")])
    ran: list[str] = []

    async def handler(env: Envelope) -> None:
        ran.append(env.id)

    layer = make_layer(exhausted_transient_action="defer")
    runner = make_runner(bootstrap, topic, group, handler, layer, retry_delays=(0.3,))
    async with Running(runner):
        await eventually(lambda: committed_is(bootstrap, group, retry, {0: 4}), what="retry topic committed")
    assert sorted(ran) == ["far", "junk", "nan", "plain"]


async def test_many_messages_with_failures_each_take_effect_once(
    bootstrap: str, make_topic: MakeTopic, group: str, producer: AIOKafkaProducer, make_layer: MakeLayer
) -> None:
    """200 messages on 2 partitions, every tenth failing twice: each succeeds exactly once, nothing is
    dead-lettered, and the topic and both retry topics are committed to their ends."""
    topic = await make_topic(2)
    ids = await produce(producer, topic, 200, partitions=2)
    failing = set(ids[::10])
    tries: dict[str, int] = {}
    effects: list[str] = []

    async def handler(env: Envelope) -> None:
        tries[env.id] = tries.get(env.id, 0) + 1
        if env.id in failing and tries[env.id] <= 2:
            raise ConnectionError("flaky")
        effects.append(env.id)

    layer = make_layer(max_retries=0, exhausted_transient_action="defer", circuit_breaker_threshold=1000)
    runner = make_runner(bootstrap, topic, group, handler, layer, retry_delays=(0.05, 0.1))
    async with Running(runner):
        await eventually(lambda: len(effects) == 200, what="every effect")
        await eventually(
            lambda: committed_is(bootstrap, group, topic, {0: 100, 1: 100}), what="topic committed"
        )

        async def retries_committed() -> bool:
            first = await committed_offsets(bootstrap, group, f"{topic}.retry.0", 2)
            second = await committed_offsets(bootstrap, group, f"{topic}.retry.1", 2)
            return sum(first.values()) == len(failing) and sum(second.values()) == len(failing)

        await eventually(retries_committed, what="retry topics committed")
    assert sorted(effects) == sorted(ids)
    assert all(tries[i] == 3 for i in failing)
    assert await layer.dead_letter_store.count() == 0
    assert runner.stats.rerouted == 2 * len(failing)


@pytest.mark.parametrize(
    "delays",
    [(0,), (-1,), (math.nan,), (math.inf,), (True,), ("5",), "5,10", tuple(range(1, 12)), (8 * 24 * 3600,)],
)
def test_bad_retry_delays_are_refused(delays: Any) -> None:
    with pytest.raises(sw.ConfigurationError, match="retry"):
        KafkaTransport(
            bootstrap_servers="127.0.0.1:1", topic="t", group="g", consumer="c", retry_delays=delays
        )


@pytest.mark.parametrize("suffix", ["/r", " r", "r" * 250, "é"])
def test_bad_retry_topic_suffixes_are_refused(suffix: str) -> None:
    with pytest.raises(sw.ConfigurationError, match="retry topic"):
        KafkaTransport(
            bootstrap_servers="127.0.0.1:1",
            topic="t",
            group="g",
            consumer="c",
            retry_delays=(1,),
            retry_topic_suffix=suffix,
        )


def test_retry_topics_need_deferred_exhaustion(make_layer: MakeLayer) -> None:
    """With the layer dead-lettering exhausted retries the retry topics would never be used: refused."""
    layer = make_layer()  # exhausted_transient_action="dead_letter"

    async def handler(env: Envelope) -> None:
        return None

    with pytest.raises(sw.ConfigurationError, match="exhausted_transient_action"):
        make_runner("127.0.0.1:1", "t", "g", handler, layer, retry_delays=(1,))


def test_retry_topic_names() -> None:
    transport = KafkaTransport(
        bootstrap_servers="127.0.0.1:1", topic="orders", group="g", consumer="c", retry_delays=(1, 30, 300)
    )
    assert transport.retry_topics == ("orders.retry.0", "orders.retry.1", "orders.retry.2")
    assert transport.topics == ("orders", "orders.retry.0", "orders.retry.1", "orders.retry.2")
    assert transport.retry_delays == (1.0, 30.0, 300.0)


async def test_a_copy_that_cannot_be_written_is_redelivered_here(
    bootstrap: str, make_topic: MakeTopic, group: str, make_layer: MakeLayer, otel: Otel
) -> None:
    """A record whose copy the producer refuses (it would pass the producer's 1 MiB request limit with
    the retry headers) is held and redelivered by this member instead: nothing is lost, the offset is
    committed only after the record finally succeeds, and each refused copy is counted."""
    topic = await make_topic(1)
    big = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=False, acks="all", max_request_size=4 << 20
    )
    await big.start()
    try:
        await big.send_and_wait(
            topic, value=json.dumps("x" * 1_048_540).encode(), headers=[("message_id", b"big")]
        )
        await big.send_and_wait(topic, value=b"{}", headers=[("message_id", b"small")])
    finally:
        await big.stop()
    tries: list[str] = []

    async def handler(env: Envelope) -> None:
        tries.append(env.id)
        if env.id == "big" and tries.count("big") <= 2:
            raise ConnectionError("flaky")

    layer = make_layer(max_retries=0, exhausted_transient_action="defer", circuit_breaker_threshold=100)
    runner = make_runner(
        bootstrap,
        topic,
        group,
        handler,
        layer,
        retry_delays=(0.05,),
        redeliver_backoff=ExponentialBackoff(base=0.05, cap=0.05, jitter=False),
    )
    async with Running(runner):
        await eventually(lambda: committed_is(bootstrap, group, topic, {0: 2}), what="topic committed")
    assert tries.count("big") == 3
    assert tries.count("small") == 1
    assert otel.value(RECORDS, streamwarden__retry_topic__result="send_failed") == 2
    assert otel.value(RECORDS, streamwarden__retry_topic__result="sent") == 0
    assert await layer.dead_letter_store.count() == 0


async def test_each_hop_is_a_send_span_in_the_message_trace(
    bootstrap: str,
    make_topic: MakeTopic,
    group: str,
    producer: AIOKafkaProducer,
    make_layer: MakeLayer,
    otel: Otel,
) -> None:
    """The copy to a retry topic is sent under a PRODUCER span in the trace of the record's producer, and
    the retry's process span links to that span: an operator follows the message hop by hop."""
    topic = await make_topic(1)
    sender = TopicProducer(producer, topic, tracer_provider=otel.tracer_provider)
    await sender.send({"order": 1}, message_id="o-1")
    runs: list[int] = []

    async def handler(env: Envelope) -> None:
        runs.append(env.delivery_count)
        if len(runs) == 1:
            raise ConnectionError("dependency down")

    layer = make_layer(max_retries=0, exhausted_transient_action="defer", circuit_breaker_threshold=100)
    runner = make_runner(bootstrap, topic, group, handler, layer, retry_delays=(0.05,))
    async with Running(runner):
        await eventually(lambda: len(runs) == 2, what="the retry ran")
        await eventually(lambda: len(otel.spans(f"process {topic}")) == 2, what="two process spans")
    [original] = otel.spans(f"send {topic}")
    [hop] = otel.spans(f"send {topic}.retry.0")
    first, second = sorted(otel.spans(f"process {topic}"), key=lambda s: s.start_time or 0)
    assert hop.context.trace_id == original.context.trace_id
    assert hop.parent is not None
    assert hop.parent.span_id == original.context.span_id
    assert hop.attributes["messaging.message.id"] == "o-1"
    assert [link.context.span_id for link in first.links] == [original.context.span_id]
    assert [link.context.span_id for link in second.links] == [hop.context.span_id]


def _record(
    topic: str, headers: list[tuple[str, bytes]], *, key: bytes | None = None
) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic, 0, 7, 0, 0, key, b"{}", None, 0, 2, headers)


_header_values = (
    st.binary(max_size=40)
    | st.text(max_size=12).map(lambda t: t.encode("utf-8", "surrogatepass"))
    | st.integers(min_value=-(10**30), max_value=10**30).map(lambda i: str(i).encode())
    | st.sampled_from(["²", "٣", "1e3", " 5", "5\n", "-0", "0x10"]).map(str.encode)
)


@settings(max_examples=300, deadline=None)
@given(
    due=_header_values,
    now=st.floats(min_value=0, max_value=4e9),
    delay=st.floats(min_value=0.001, max_value=3600),
)
def test_a_due_time_is_never_later_than_the_topics_delay(due: bytes, now: float, delay: float) -> None:
    """Whatever a retry record's due header holds, it runs no later than now + its topic's delay."""
    transport = KafkaTransport(
        bootstrap_servers="127.0.0.1:1", topic="t", group="g", consumer="c", retry_delays=(delay,)
    )
    when = transport._due(_record("t.retry.0", [("streamwarden.retry.due_ms", due)]), 0, now)
    assert math.isfinite(when)
    assert when <= now + delay


@settings(max_examples=300, deadline=None)
@given(
    headers=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    HEADER_ORIGINAL_PARTITION,
                    HEADER_ORIGINAL_OFFSET,
                    HEADER_RETRY_DELIVERY_COUNT,
                    HEADER_ORIGINAL_TOPIC,
                    "message_id",
                ]
            ),
            _header_values,
        ),
        max_size=6,
    )
)
def test_a_retry_record_is_always_a_message_of_the_topic(headers: list[tuple[str, bytes]]) -> None:
    """Hostile retry headers never move a retried message to another destination, never give it a
    source outside the topic, and never a delivery count below 1; decoding never raises."""
    transport = KafkaTransport(
        bootstrap_servers="127.0.0.1:1", topic="orders", group="g", consumer="c", retry_delays=(1,)
    )
    record = _record("orders.retry.0", headers)
    env = transport._retried(
        decode_record(record.topic, 0, 7, key=record.key, value=record.value, headers=record.headers)
    )
    assert env.destination == "orders"
    assert env.source_ref is not None
    assert env.source_ref.startswith(("orders/", "orders.retry.0/"))
    assert env.delivery_count >= 1
    _topic, partition, offset = env.source_ref.rsplit("/", 2)
    assert partition.isascii()
    assert offset.isascii()


async def test_copies_in_flight_count_toward_max_held(
    bootstrap: str, make_topic: MakeTopic, group: str, producer: AIOKafkaProducer
) -> None:
    """A member whose retry-topic copies are slow to confirm stops reading new records once
    ``max_held`` of them wait, as it does for records held for a local redelivery: memory stays bounded."""
    topic = await make_topic(1)
    await produce(producer, topic, 5)
    transport = KafkaTransport(
        bootstrap_servers=bootstrap,
        topic=topic,
        group=group,
        consumer="c",
        retry_delays=(1,),
        max_held=2,
        poll_timeout_ms=100,
        consumer_options=FAST_GROUP,
    )
    await transport.ensure_group()
    never = asyncio.Event()
    stuck = [asyncio.create_task(never.wait()) for _ in range(2)]
    try:
        await eventually(lambda: bool(transport.assignment()), what="the partition assigned")
        transport._sending.update(stuck)
        for _ in range(5):  # two copies in flight: nothing new is read
            assert await transport.read(10) == []
        transport._sending.difference_update(stuck)
        read: list[Any] = []
        await eventually(lambda: _read_more(transport, read), what="reading resumes")
        assert len(read) == 5
    finally:
        never.set()
        await asyncio.gather(*stuck)
        await transport.close()


async def _read_more(transport: KafkaTransport, into: list[Any]) -> bool:
    into += await transport.read(10)
    return len(into) >= 5


async def test_a_hostile_exception_type_and_a_null_header_still_make_a_copy(
    bootstrap: str,
    make_topic: MakeTopic,
    group: str,
    producer: AIOKafkaProducer,
    make_layer: MakeLayer,
    otel: Otel,
) -> None:
    """An exception class named with a lone surrogate and a record carrying a null header value: the copy
    is still written (the type's name replaced where it cannot be encoded, the null header kept null)
    and the retry runs."""

    class Weird(ConnectionError):
        pass

    Weird.__qualname__ = "Weird\ud800Error"
    topic = await make_topic(1)
    await producer.send_and_wait(topic, value=b"{}", headers=[("message_id", b"w1"), ("empty", None)])  # type: ignore[list-item]
    runs: list[dict[str, str]] = []

    async def handler(env: Envelope) -> None:
        runs.append(dict(env.headers))
        if len(runs) == 1:
            raise Weird("odd")

    layer = make_layer(max_retries=0, exhausted_transient_action="defer", circuit_breaker_threshold=100)
    runner = make_runner(bootstrap, topic, group, handler, layer, retry_delays=(0.05,))
    async with Running(runner):
        await eventually(lambda: len(runs) == 2, what="the retry ran")
    assert otel.value(RECORDS, streamwarden__retry_topic__result="sent") == 1
    [copy] = await read_all(bootstrap, f"{topic}.retry.0", 1)
    head = dict(copy.headers)
    assert head["empty"] is None
    assert head[HEADER_RETRY_ERROR_TYPE].decode() == f"{__name__}.Weird?Error"
