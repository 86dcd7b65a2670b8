"""How the Kafka transport turns a fetch into deliveries (``KafkaTransport._register``): records of the
types aiokafka hands out take a shorter path, which must give exactly what :func:`decode_record` gives,
and anything else goes the general way; order keys share one prefix per partition. No broker: records
are built as aiokafka builds them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord, TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from streamwarden._runners._kafka import KafkaOrdering, KafkaTransport, _decode_usual, decode_record

usual = st.one_of(st.none(), st.binary(max_size=48))
raw = st.one_of(usual, st.text(max_size=16), st.integers(), st.just(bytearray(b"ba")))
json_like = st.sampled_from(
    [b'{"a": 1}', b"[1, 2]", b'"text"', b"NaN", b"1e400", b"\xff\xfe", b"[" * 3000, b""]
)
header_name = st.one_of(st.text(max_size=12), st.sampled_from(["message_id", "traceparent"]))
usual_headers = st.lists(st.tuples(header_name, st.binary(max_size=24)), max_size=5)
headers = st.one_of(
    usual_headers,
    usual_headers.map(tuple),
    st.lists(st.tuples(st.one_of(header_name, st.binary(max_size=8)), raw), max_size=4),
    st.none(),
    st.just([("x",)]),
    st.just([["message_id", b"listed"]]),
    st.just(42),
)


def record(topic: str, partition: int, offset: Any, key: Any, value: Any, headers: Any) -> ConsumerRecord:
    return ConsumerRecord(
        topic=topic, partition=partition, offset=offset, timestamp=1_700_000_000_000, timestamp_type=0,
        key=key, value=value, checksum=None, serialized_key_size=-1, serialized_value_size=-1,
        headers=headers,
    )  # fmt: skip


def transport(ordering: KafkaOrdering = KafkaOrdering.KEY) -> KafkaTransport:
    return KafkaTransport(
        bootstrap_servers="127.0.0.1:1", topic="orders", group="g", consumer="c", ordering=ordering
    )


def expected_order_key(ordering: KafkaOrdering, topic: str, partition: int, key: str | None) -> str | None:
    if ordering is KafkaOrdering.UNORDERED:
        return None
    if ordering is KafkaOrdering.KEY and key is not None:
        return f"{topic}/{partition}/{key}"
    return f"{topic}/{partition}"


@given(
    key=st.one_of(usual, raw),
    value=st.one_of(usual, json_like, raw),
    headers=headers,
    offset=st.integers(0, 2**40),
    ordering=st.sampled_from(list(KafkaOrdering)),
)
def test_a_delivery_holds_what_decode_record_gives(
    key: Any, value: Any, headers: Any, offset: int, ordering: KafkaOrdering
) -> None:
    """Whatever a record holds, its delivery's envelope is decode_record's (compared by repr: a NaN
    payload is not equal to itself) and its order key follows the ordering."""
    tr = transport(ordering)
    [delivery] = tr._register(
        {TopicPartition("orders", 2): [record("orders", 2, offset, key, value, headers)]}
    )
    env = decode_record("orders", 2, offset, key=key, value=value, headers=headers)
    assert repr(delivery.envelope) == repr(env)
    assert delivery.order_key == expected_order_key(ordering, "orders", 2, env.key)


class Exploding:
    """Headers whose iteration fails halfway, like a broken iterator."""

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        yield ("message_id", b"m-1")
        raise RuntimeError("broken")


class Name(str):
    """A header name of a str subclass (aiokafka gives plain str)."""


@pytest.mark.parametrize(
    ("make_headers", "key"),
    [
        (Exploding, b"k"),
        (lambda: [(Name("message_id"), b"v")], b"k"),
        (lambda: [("message_id", None)], b"k"),
        (lambda: [("message_id", bytearray(b"m"))], b"k"),
        (lambda: [("message_id", b"m")], "text-key"),
        (lambda: (h for h in [("message_id", b"m")]), b"k"),
    ],
    ids=[
        "exploding-headers",
        "str-subclass-name",
        "null-header",
        "bytearray-header",
        "text-key",
        "generator",
    ],
)
def test_records_of_unusual_types_go_the_general_way(make_headers: Callable[[], Any], key: Any) -> None:
    """Headers that fail to iterate, a header name of another str type, a null or bytearray header
    value, a text key, headers as a generator: no error, and the envelope decode_record gives."""
    rec = record("orders", 0, 5, key, b"{}", make_headers())
    [delivery] = transport()._register({TopicPartition("orders", 0): [rec]})
    env = decode_record("orders", 0, 5, key=key, value=b"{}", headers=make_headers())
    assert repr(delivery.envelope) == repr(env)


def test_order_keys_of_a_fetch_share_their_partition_prefix() -> None:
    """Records of two partitions, keyed and not: each order key is its partition's, plus the key."""
    tr = transport(KafkaOrdering.KEY)
    fetch = {
        TopicPartition("orders", 0): [
            record("orders", 0, 0, b"a", b"1", []),
            record("orders", 0, 1, None, b"2", []),
        ],
        TopicPartition("orders", 1): [record("orders", 1, 0, b"a", b"3", [])],
    }
    assert [d.order_key for d in tr._register(fetch)] == ["orders/0/a", "orders/0", "orders/1/a"]
    by_partition = transport(KafkaOrdering.PARTITION)._register(fetch)
    assert [d.order_key for d in by_partition] == ["orders/0", "orders/0", "orders/1"]
    assert by_partition[0].order_key is by_partition[1].order_key  # one string per partition
    assert [d.order_key for d in transport(KafkaOrdering.UNORDERED)._register(fetch)] == [None] * 3


def test_usual_records_take_the_short_path() -> None:
    """A record as aiokafka hands it out (bytes key and value, (str, bytes) headers) is decoded by the
    short path, to decode_record's envelope; a text key is left to decode_record."""
    headers = [("message_id", b"m-1"), ("traceparent", b"00-ab-cd-01")]
    env = _decode_usual("orders", "3", "orders/3/", 7, b"k", b'{"a": 1}', headers, "message_id")
    assert env == decode_record("orders", 3, 7, key=b"k", value=b'{"a": 1}', headers=headers)
    assert _decode_usual("orders", "3", "orders/3/", 7, "k", b"{}", headers, "message_id") is None
