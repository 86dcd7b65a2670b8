"""``KafkaDeadLetterStore`` against a real broker: the round trip, hostile text, large payloads, list
filters, counts and depths, and delete/purge markers that a second store (another process) respects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiokafka
import pytest
from _kafka_dlq_support import entry
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from _kafka_broker import KafkaBroker
from streamwarden import DeadLetterError, DeadLetterQueueFullError
from streamwarden._dlq import (
    DeadLetterStore,
    DepthRefreshing,
    DepthReporting,
    NamedQueues,
    OmittedPayload,
    ReplacingStore,
)
from streamwarden._kafka import KafkaDeadLetterStore, parse_entry_id

Factory = Callable[..., KafkaDeadLetterStore]


def test_capabilities(store: KafkaDeadLetterStore) -> None:
    """A DeadLetterStore that names its queues and reports/refreshes depths; no atomic replace."""
    assert isinstance(store, DeadLetterStore)
    assert isinstance(store, NamedQueues)
    assert isinstance(store, DepthReporting)
    assert isinstance(store, DepthRefreshing)
    assert not isinstance(store, ReplacingStore)
    assert store.queue_name("orders") == "orders.dlq"


async def test_round_trip_with_every_field(store: KafkaDeadLetterStore, ns: str) -> None:
    """get(add(entry)) == entry with its id, ``{ns}.orders.dlq/0/{offset}``."""
    e = entry(f"{ns}.orders")
    entry_id = await store.add(e)
    assert entry_id == f"{ns}.orders.dlq/0/0"
    assert await store.get(entry_id) == e.with_id(entry_id)
    second = await store.add(entry(f"{ns}.orders", message_id="m-2"))
    assert parse_entry_id(second) == (f"{ns}.orders.dlq", 0, 1)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(
            {"message_id": "\udcff\udcfe-id", "payload": b"\x00\xff\xfe raw"}, id="non-utf8-id-bytes"
        ),
        pytest.param({"message_id": "\ud800", "error_message": "boom \ud83d"}, id="lone-surrogates"),
        pytest.param({"message_id": "zamówienie-№7 🧾", "payload": {"ключ": "值 \u2028 \x00"}}, id="unicode"),
        pytest.param(
            {"payload": "not json {", "headers": {"x-\udcc3\udca9": "\ud800\udc00"}}, id="text+pairs"
        ),
        pytest.param(
            {"message_id": None, "payload": None, "source_ref": None, "consumer_group": None}, id="nones"
        ),
        pytest.param({"message_id": "", "payload": "", "trace_id": None, "span_id": None}, id="empties"),
    ],
)
async def test_hostile_text_round_trips(
    store: KafkaDeadLetterStore, ns: str, fields: dict[str, object]
) -> None:
    """No text can fail a write, and every text reads back exactly (ids, payloads, headers)."""
    e = entry(f"{ns}.orders", **fields)
    entry_id = await store.add(e)
    assert await store.get(entry_id) == e.with_id(entry_id)


async def test_large_payloads(make_store: Factory, ns: str) -> None:
    """A payload that fits is kept whole (replayable); one that does not is left out, the entry kept."""
    store = make_store(max_request_size=2_000_000)
    big = {"blob": "x" * 900_000}
    kept = await store.add(entry(f"{ns}.orders", payload=big))
    got = await store.get(kept)
    assert got is not None
    assert got.payload == big
    huge = "y" * 3_000_000
    left_out = await store.add(entry(f"{ns}.orders", payload=huge))
    got = await store.get(left_out)
    assert got is not None
    assert got.payload == OmittedPayload("oversize", 3_000_000, "")
    assert got.error_message == "bad price"
    capped = make_store(max_payload_bytes=10)
    small_cap = await capped.add(entry(f"{ns}.orders", payload={"id": "m-1", "price": 10}))
    got = await capped.get(small_cap)
    assert got is not None
    assert isinstance(got.payload, OmittedPayload)


async def test_secrets_are_redacted_before_the_write(store: KafkaDeadLetterStore, ns: str) -> None:
    """Error text, traceback and header values are redacted as on Redis; the payload is kept."""
    e = entry(
        f"{ns}.orders",
        error_message="login failed: password=hunter2",
        traceback="token: abc123secret",
        headers={"authorization": "Bearer abcdefghijk"},
        payload={"password": "kept-for-replay"},
    )
    got = await store.get(await store.add(e))
    assert got is not None
    assert "hunter2" not in got.error_message
    assert "abc123secret" not in got.traceback
    assert got.headers == {"authorization": "[REDACTED]"}
    assert got.payload == {"password": "kept-for-replay"}


async def test_list_filters_and_order(make_store: Factory, ns: str) -> None:
    """list(): destination, error type/class, time window and limit; oldest first across partitions."""
    store = make_store(partitions=3)
    now = time.time()
    added = []
    for i in range(9):
        e = entry(
            f"{ns}.orders" if i % 3 else f"{ns}.payments",
            message_id=f"m-{i}",
            error_type="KeyError" if i % 2 else "ValueError",
            error_class="transient" if i == 4 else "permanent",
            dead_lettered_at=now - 100 + i,
        )
        added.append((await store.add(e), e))
    everything = await store.list()
    assert [x.message_id for x in everything] == [f"m-{i}" for i in range(9)]
    orders = await store.list(f"{ns}.orders")
    assert [x.message_id for x in orders] == ["m-1", "m-2", "m-4", "m-5", "m-7", "m-8"]
    keys = await store.list(error_type="KeyError")
    assert [x.message_id for x in keys] == ["m-1", "m-3", "m-5", "m-7"]
    assert [x.message_id for x in await store.list(error_class="transient")] == ["m-4"]
    window = await store.list(since=now - 97.5, until=now - 95.5)
    assert [x.message_id for x in window] == ["m-3", "m-4"]
    assert [x.message_id for x in await store.list(limit=2)] == ["m-0", "m-1"]
    assert await store.list(limit=0) == []
    assert await store.list(f"{ns}.nothing-here") == []
    by_id = {entry_id: e for entry_id, e in added}
    assert all(x == by_id[x.entry_id or ""].with_id(x.entry_id or "") for x in everything)


async def test_count_depths_and_destinations(make_store: Factory, ns: str) -> None:
    """count() per destination and in total; refresh_depths()/depths() report per destination."""
    store = make_store()
    for i in range(3):
        await store.add(entry(f"{ns}.orders", message_id=f"o-{i}"))
    await store.add(entry(f"{ns}.payments"))
    assert await store.count(f"{ns}.orders") == 3
    assert await store.count() == 4
    assert await store.count(f"{ns}.unknown") == 0
    assert await store.destinations() == [f"{ns}.orders", f"{ns}.payments"]
    assert await store.refresh_depths() == {f"{ns}.orders": 3, f"{ns}.payments": 1}
    assert store.depths() == {f"{ns}.orders": 3, f"{ns}.payments": 1}
    await store.add(entry(f"{ns}.orders", message_id="o-3"))
    assert store.depths()[f"{ns}.orders"] == 4  # its own writes, without I/O
    other = make_store()  # another process: learns destinations from the records
    assert await other.refresh_depths() == {f"{ns}.orders": 4, f"{ns}.payments": 1}
    reporting = make_store(depth_reporter=lambda d: d.endswith("payments"))
    await reporting.refresh_depths()
    assert reporting.depths() == {f"{ns}.payments": 1}


async def test_delete_and_purge_are_seen_by_another_store(make_store: Factory, ns: str) -> None:
    """Markers in the .done topic: what one store deletes or purges, a second store (a second process)
    no longer lists, gets, counts or deletes."""
    first, second = make_store(), make_store()
    ids = [await first.add(entry(f"{ns}.orders", message_id=f"m-{i}")) for i in range(5)]
    assert await second.count(f"{ns}.orders") == 5
    assert await first.delete(ids[1]) is True
    assert await second.get(ids[1]) is None
    assert await second.delete(ids[1]) is False
    assert await second.count(f"{ns}.orders") == 4
    assert [e.entry_id for e in await second.list()] == [ids[0], *ids[2:]]
    assert await second.purge(f"{ns}.orders") == 4
    assert await first.count() == 0
    assert await first.list() == []
    assert await first.get(ids[4]) is None
    assert await first.destinations() == []
    later = await first.add(entry(f"{ns}.orders", message_id="after-purge"))
    assert [e.entry_id for e in await second.list()] == [later]
    third = make_store()  # starts from nothing: reads every marker
    assert await third.count() == 1
    assert await third.purge() == 1
    assert await third.purge() == 0


@pytest.mark.parametrize(
    "entry_id",
    ["orders/1-0", "nope.dlq/0/0", "{topic}/0/99", "{topic}/7/0", "garbage"],
)
async def test_delete_and_get_of_what_is_not_there(
    store: KafkaDeadLetterStore, ns: str, entry_id: str
) -> None:
    """Malformed ids, missing topics, offsets past the end and absent partitions: None / False."""
    await store.add(entry(f"{ns}.orders"))
    entry_id = entry_id.format(topic=f"{ns}.orders.dlq")
    assert await store.get(entry_id) is None
    assert await store.delete(entry_id) is False


async def test_foreign_records_are_skipped(
    kafka_broker: KafkaBroker, store: KafkaDeadLetterStore, ns: str
) -> None:
    """A record without the streamwarden headers in a DLQ topic is neither listed nor returned."""
    topic = f"{ns}.orders.dlq"
    producer = aiokafka.AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"someone else's", key=b"k", partition=0)
    finally:
        await producer.stop()
    ours = await store.add(entry(f"{ns}.orders"))
    assert await store.get(f"{topic}/0/0") is None
    assert await store.delete(f"{topic}/0/0") is False
    assert [e.entry_id for e in await store.list()] == [ours]


async def test_capacity_refuses_writes_without_trimming(make_store: Factory, ns: str) -> None:
    """max_entries_per_destination: a full queue raises DeadLetterQueueFullError; deleting makes room."""
    store = make_store(max_entries_per_destination=2)
    first = await store.add(entry(f"{ns}.orders", message_id="a"))
    await store.add(entry(f"{ns}.orders", message_id="b"))
    with pytest.raises(DeadLetterQueueFullError):
        await store.add(entry(f"{ns}.orders", message_id="c"))
    assert await store.count(f"{ns}.orders") == 2
    assert await store.delete(first)
    await store.add(entry(f"{ns}.orders", message_id="c"))


async def test_custom_topics_and_existing_topics(
    kafka_broker: KafkaBroker, make_store: Factory, ns: str
) -> None:
    """topic_for names the DLQ topic; with create_topics=False a pre-created topic is used as it is,
    and a listed ``topics=`` set is read without discovery."""
    topic = f"{ns}-dead-letters"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1), NewTopic(f"{topic}.done", 1, 1)])
    finally:
        await admin.close()
    store = make_store(topic_for=lambda _d: topic, topics=[topic], create_topics=False)
    assert store.queue_name("anything") == topic
    entry_id = await store.add(entry(f"{ns}.orders"))
    assert entry_id.startswith(f"{topic}/")
    assert [e.entry_id for e in await store.list()] == [entry_id]
    assert await store.refresh_depths() == {f"{ns}.orders": 1}
    bad = make_store(topic_for=lambda d: f"{d} with spaces")
    with pytest.raises(DeadLetterError, match="not a Kafka topic name"):
        await bad.add(entry(f"{ns}.orders"))
    assert bad.queue_name(f"{ns}.orders") == f"{ns}.orders.dlq"  # for the span: never raises


async def test_a_store_can_be_closed_and_used_again(store: KafkaDeadLetterStore, ns: str) -> None:
    """aclose() stops the clients; the next call starts new ones (``async with`` works too)."""
    async with store:
        entry_id = await store.add(entry(f"{ns}.orders"))
    assert await store.get(entry_id) is not None
    await store.aclose()
    await store.aclose()


async def test_reads_of_an_unreachable_broker_fail_as_dead_letter_errors(make_store: Factory) -> None:
    """Callers never see aiokafka's exception types: reads raise DeadLetterError (chained)."""
    broker = KafkaBroker()  # never started: nothing listens on its port
    try:
        store = make_store(broker)
        with pytest.raises(DeadLetterError) as raised:
            await store.list()
        assert raised.value.__cause__ is not None
    finally:
        broker.close()


async def test_concurrent_adds_are_all_read_back(make_store: Factory, ns: str) -> None:
    """Many add() calls at once (a runner dead-lettering a batch): every entry is listed and counted by
    another store. Regression: batched records lay past Tansu's ListOffsets end offset and were missed,
    until the producer sent one record per batch."""
    store, other = make_store(partitions=2), make_store()
    ids = await asyncio.gather(*(store.add(entry(f"{ns}.orders", message_id=f"m-{i}")) for i in range(40)))
    assert len(set(ids)) == 40
    assert await other.count(f"{ns}.orders") == 40
    assert sorted(e.entry_id or "" for e in await other.list(limit=1_000)) == sorted(ids)
    assert await other.purge() == 40
    assert await store.count() == 0
