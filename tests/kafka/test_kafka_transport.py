"""The Kafka transport on its own against a real broker: reading, the backlog, holding and handing out
given-back records on an injected clock, dropped stale acknowledgements, pausing; and hostile records
that decode without ever stopping the runner."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from _kafka_suite import (
    FAST_GROUP,
    MakeLayer,
    MakeTopic,
    Running,
    committed_is,
    committed_offsets,
    make_runner,
    produce,
)
from aiokafka import AIOKafkaProducer

from _support import Clock, eventually
from streamwarden._envelope import Envelope
from streamwarden._retry import ExponentialBackoff
from streamwarden._runners._core import Delivery
from streamwarden._runners._kafka import KafkaRef, KafkaTransport


@pytest.fixture
async def open_transport(bootstrap: str, group: str) -> AsyncIterator[Callable[..., Any]]:
    """``await open_transport(topic, **options)``: a started transport, closed after the test."""
    opened: list[KafkaTransport] = []

    async def make(topic: str, **options: Any) -> KafkaTransport:
        options.setdefault("consumer_options", FAST_GROUP)
        options.setdefault("poll_timeout_ms", 100)
        transport = KafkaTransport(
            bootstrap_servers=bootstrap, topic=topic, group=group, consumer="c1", **options
        )
        opened.append(transport)
        await transport.ensure_group()
        return transport

    yield make
    for transport in opened:
        await transport.close()


async def read_at_least(transport: KafkaTransport, count: int, *, batch: int = 100) -> list[Delivery]:
    """Read until ``count`` deliveries arrived (bounded: 100 reads)."""
    got: list[Delivery] = []
    for _ in range(100):
        got += await transport.read(batch)
        if len(got) >= count:
            return got
    raise AssertionError(f"read {len(got)} of {count} deliveries")


async def test_backlog_counts_lag_and_pending(
    open_transport: Callable[..., Any], make_topic: MakeTopic, producer: AIOKafkaProducer
) -> None:
    """Lag is what was not read yet (per partition too), pending what was read and not acknowledged."""
    topic = await make_topic(3)
    await produce(producer, topic, 30, partitions=3)
    transport = await open_transport(topic)
    got = await read_at_least(transport, 6, batch=6)
    backlog = await transport.backlog()
    assert backlog.pending == len(got)
    assert backlog.lag == 30 - len(got)
    assert sum(transport.partition_lags().values()) == backlog.lag
    assert set(transport.partition_lags()) == {f"{topic}/{p}" for p in range(3)}
    assert backlog.oldest_pending_age is not None
    assert backlog.oldest_pending_age >= 0
    await transport.ack([d.ref for d in got])
    assert (await transport.backlog()).pending == 0


async def test_given_back_records_come_back_when_due(
    open_transport: Callable[..., Any],
    make_topic: MakeTopic,
    producer: AIOKafkaProducer,
    group: str,
    bootstrap: str,
) -> None:
    """A given-back record is handed out again once its back-off has passed on the clock, as delivery 2;
    until it is acknowledged the commit stays below it."""
    topic = await make_topic(1)
    await produce(producer, topic, 5)
    clock = Clock()
    transport = await open_transport(
        topic, clock=clock, redeliver_backoff=ExponentialBackoff(base=10, cap=10, jitter=False)
    )
    got = await read_at_least(transport, 5)
    first = got[1]
    transport.give_back([first.ref])
    await transport.ack([d.ref for d in got if d is not first])
    assert await committed_offsets(bootstrap, group, topic, 1) == {0: 1}
    assert await transport.read(10) == []  # not due yet
    clock.advance(10)
    [again] = await transport.read(10)
    assert again.ref == first.ref
    assert again.envelope.id == first.envelope.id
    assert again.envelope.delivery_count == 2
    await transport.ack([again.ref])
    assert await committed_offsets(bootstrap, group, topic, 1) == {0: 5}


async def test_stale_acknowledgements_are_dropped(
    open_transport: Callable[..., Any],
    make_topic: MakeTopic,
    producer: AIOKafkaProducer,
    group: str,
    bootstrap: str,
) -> None:
    """Refs of another assignment (epoch), of another topic, or of no record at all commit nothing."""
    topic = await make_topic(1)
    await produce(producer, topic, 3)
    transport = await open_transport(topic)
    got = await read_at_least(transport, 3)
    ref = got[0].ref
    assert isinstance(ref, KafkaRef)
    await transport.ack([ref._replace(epoch=ref.epoch + 1), ref._replace(topic="other"), "3-0", None])
    transport.give_back([ref._replace(epoch=ref.epoch + 1)])
    assert await committed_offsets(bootstrap, group, topic, 1) == {}
    assert (await transport.backlog()).pending == 3


async def test_pause_and_resume(
    open_transport: Callable[..., Any], make_topic: MakeTopic, producer: AIOKafkaProducer
) -> None:
    """pause() pauses every assigned partition and keeps polling; resume() fetches again, and nothing a
    poll read meanwhile is lost."""
    topic = await make_topic(2)
    transport = await open_transport(topic)
    await eventually(lambda: len(transport.assignment()) == 2, what="assigned")
    transport.pause()
    client = transport.client
    assert set(client.paused()) == set(client.assignment())
    await produce(producer, topic, 4, partitions=2)
    transport.resume()
    assert not client.paused()
    got = await read_at_least(transport, 4)
    assert sorted(d.envelope.id for d in got) == ["m0", "m1", "m2", "m3"]


async def test_hostile_records_never_stop_the_runner(
    bootstrap: str, make_topic: MakeTopic, group: str, producer: AIOKafkaProducer, make_layer: MakeLayer
) -> None:
    """Binary values and keys, tombstones, empty values, JSON too deep to parse, junk trace headers, null
    and repeated headers: every record is handled (or answered as a duplicate) and committed."""
    topic = await make_topic(1)
    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]] = [
        (b"\xff\xfe\x00binary", b"\xff\x00", [("message_id", b"\xffid")]),
        (None, b"tomb", []),  # a tombstone: id from the key
        (b"", None, []),  # empty value, no key, no id: topic/partition/offset
        (b"[" * 50_000, None, [("message_id", b"deep")]),
        (b'{"a": 1}', None, [("traceparent", b"\xff junk"), ("tracestate", None), ("message_id", b"tp")]),
        (b"1", None, [("message_id", b"dup"), ("message_id", b"dup2")]),
        (b"2", None, [("message_id", b"dup2")]),  # the same id as the one before: a duplicate
        (b"\x00" * 10_000, b"k" * 1000, [("x" * 200, b"\xff" * 200)]),
    ]
    for value, key, headers in records:
        await producer.send_and_wait(topic, value=value, key=key, headers=headers or None)
    seen: dict[int, Envelope] = {}

    async def handler(env: Envelope) -> None:
        seen[int(env.source_ref.rsplit("/", 1)[1])] = env

    runner = make_runner(bootstrap, topic, group, handler, make_layer())
    async with Running(runner):
        await eventually(lambda: committed_is(bootstrap, group, topic, {0: len(records)}), what="committed")
    assert runner.stats.outcomes == {"processed": 7, "duplicate": 1}
    assert [seen[i].id for i in range(3)] == ["\udcffid", "tomb", f"{topic}/0/2"]
    assert seen[1].payload is None
    assert seen[3].payload == "[" * 50_000
    assert seen[4].headers["tracestate"] == ""
    assert 6 not in seen  # the duplicate of offset 5 never reached the handler


async def test_revoked_partitions_are_forgotten(
    bootstrap: str,
    make_topic: MakeTopic,
    group: str,
    producer: AIOKafkaProducer,
    open_transport: Callable[..., Any],
) -> None:
    """When a second member joins, the first commits what it finished before giving its partitions up,
    and acknowledgements of records read before the rebalance commit nothing afterwards."""
    topic = await make_topic(2)
    await produce(producer, topic, 10, partitions=2)
    first = await open_transport(topic, revoke_timeout=0.2)
    got = await read_at_least(first, 10)
    await first.ack([d.ref for d in got if d.envelope.id in ("m0", "m1")])  # offset 0 of each partition
    late = [d.ref for d in got if d.envelope.id not in ("m0", "m1")]
    second = KafkaTransport(
        bootstrap_servers=bootstrap,
        topic=topic,
        group=group,
        consumer="c2",
        consumer_options=FAST_GROUP,
        revoke_timeout=0.1,
    )
    joining = asyncio.create_task(second.ensure_group())
    try:
        for _ in range(200):  # the first member notices the rebalance while it polls
            await first.read(10)
            if joining.done():
                break
        await joining
        assert first.rebalances == 2
        await first.ack(late)  # read in the old assignment: dropped
        assert await committed_offsets(bootstrap, group, topic, 2) == {0: 1, 1: 1}
    finally:
        await second.close()


async def test_a_cancelled_read_loses_no_record(
    open_transport: Callable[..., Any], make_topic: MakeTopic, producer: AIOKafkaProducer
) -> None:
    """A read cancelled while it polls (a stop, the end of the keep-alive poll): records that poll
    returns later are handed out by the next read, never skipped."""
    topic = await make_topic(1)
    transport = await open_transport(topic, poll_timeout_ms=5000)
    reading = asyncio.create_task(transport.read(10))
    for _ in range(100):  # into getmany
        await asyncio.sleep(0)
    reading.cancel()
    await asyncio.wait((reading,))
    assert transport._fetch is not None, "the read was not cancelled inside its poll"
    await produce(producer, topic, 3)
    got = await read_at_least(transport, 3)
    assert [d.envelope.id for d in got] == ["m0", "m1", "m2"]


async def test_unreachable_broker_backs_off_and_stops(make_layer: MakeLayer) -> None:
    """No broker at the address: the runner backs off (not ready, counted) and still stops at once."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def handler(env: Envelope) -> None:
        raise AssertionError("nothing to handle")

    runner = make_runner(f"127.0.0.1:{port}", "t", "g", handler, make_layer(), max_backoff_s=0.05)
    async with Running(runner):
        await eventually(lambda: runner.stats.redis_errors >= 2, what="failed connection attempts")
        health = await runner.health()
        assert not health.ready
        assert "kafka unreachable" in health.reason
    assert runner.kafka_transport.client is None


def _batch_with_header_name(name: bytes, value: bytes) -> bytes:
    """A v2 record batch of one record whose header name is ``name`` (any bytes, not only UTF-8), as a
    hostile producer can write it: built with a placeholder name, patched, CRC recomputed."""
    import struct

    from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
    from aiokafka.record.util import calc_crc32c

    placeholder = b"P" * len(name)
    builder = _DefaultRecordBatchBuilderPy(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    builder.append(0, timestamp=None, key=None, value=value, headers=[(placeholder.decode(), b"x")])
    data = bytearray(builder.build())
    at = data.index(placeholder)
    data[at : at + len(name)] = name
    data[17:21] = struct.pack(">I", calc_crc32c(bytes(data[21:])))  # CRC-32C of attributes..end
    return bytes(data)


async def test_a_record_the_client_cannot_decode_is_skipped_and_counted(
    bootstrap: str, make_topic: MakeTopic, group: str, producer: AIOKafkaProducer, make_layer: MakeLayer
) -> None:
    """aiokafka raises for a fetch holding a header name that is not UTF-8, at every poll: the runner
    skips that one record (logged, counted as lost) and handles the others of its partition."""
    from aiokafka import TopicPartition
    from aiokafka.protocol.produce import ProduceRequest

    topic = await make_topic(1)
    await producer.send_and_wait(topic, value=b"1", headers=[("message_id", b"before")])
    leader = producer.client.cluster.leader_for_partition(TopicPartition(topic, 0))
    hostile = _batch_with_header_name(b"\xff\xfe", b"2")
    await producer.client.send(leader, ProduceRequest(None, -1, 10_000, [(topic, [(0, hostile)])]))
    await producer.send_and_wait(topic, value=b"3", headers=[("message_id", b"after")])
    handled: list[str] = []

    async def handler(env: Envelope) -> None:
        handled.append(env.id)

    runner = make_runner(bootstrap, topic, group, handler, make_layer(), lost_every_s=0.05)
    async with Running(runner):
        await eventually(lambda: committed_is(bootstrap, group, topic, {0: 3}), what="committed past it")
        await eventually(lambda: runner.stats.lost == 1, what="counted as lost")
    assert handled == ["before", "after"]
