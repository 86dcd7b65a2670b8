"""The Kafka DLQ record layout without a broker: entry -> record -> entry is exact for any text, the
payload is left out when it does not fit, header values stay bounded, and the marker index agrees with a
plain set of deleted offsets whatever the order of deletes and purges."""

from __future__ import annotations

import json
from typing import Any

import pytest
from _kafka_dlq_support import entry
from hypothesis import given, settings
from hypothesis import strategies as st

from streamwarden._dlq import DeadLetterEntry, OmittedPayload
from streamwarden._kafka._dlq import (
    HEADER_HEADERS,
    HEADER_PAYLOAD_ENCODING,
    HEADER_TRACEPARENT,
    MAX_ORIGINAL_HEADER_VALUE_CHARS,
    MAX_ORIGINAL_HEADERS_CHARS,
    _PartitionMarks,
    decode_record,
    default_dlq_topic,
    done_topic,
    encode_entry,
    parse_entry_id,
)

BIG = 64 * 1024 * 1024

# any str, lone surrogates included: the ones surrogateescape makes from bytes (\udc80-\udcff), others
# (\ud800 from JSON), and pairs that happen to spell valid UTF-8 once escaped (\udcc3\udca9)
hostile_text = st.lists(
    st.one_of(
        st.characters(),
        st.integers(0xD800, 0xDFFF).map(chr),
        st.sampled_from(["\udcc3\udca9", "\x00", "é", "\U0001f600", ",", "\n"]),
    ),
    max_size=12,
).map("".join)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | hostile_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(hostile_text, children, max_size=4),
    max_leaves=12,
)

hex_ids = st.tuples(
    st.text("0123456789abcdef", min_size=32, max_size=32),
    st.text("0123456789abcdef", min_size=16, max_size=16),
)


@st.composite
def entries(draw: st.DrawFn) -> DeadLetterEntry:
    trace = draw(st.one_of(hex_ids, st.tuples(st.none() | hostile_text, st.none() | hostile_text)))
    return DeadLetterEntry(
        message_id=draw(st.none() | hostile_text),
        destination=draw(hostile_text),
        payload=draw(json_values | st.binary(max_size=64) | hostile_text),
        reason=draw(hostile_text),
        error_type=draw(hostile_text),
        error_class=draw(hostile_text),
        error_message=draw(hostile_text),
        attempts=draw(st.integers(-(2**70), 2**70)),
        service=draw(hostile_text),
        headers=draw(st.dictionaries(hostile_text, hostile_text, max_size=4)),
        traceback=draw(hostile_text),
        first_failed_at=draw(st.floats(allow_nan=False)),
        dead_lettered_at=draw(st.floats(allow_nan=False)),
        delivery_count=draw(st.integers(-5, 2**40)),
        source_ref=draw(st.none() | hostile_text),
        trace_id=trace[0],
        span_id=trace[1],
        consumer_group=draw(st.none() | hostile_text),
        earlier_traces=tuple(draw(st.lists(hostile_text, max_size=3))),
    )


def _round_trip(e: DeadLetterEntry, **options: Any) -> DeadLetterEntry | None:
    options.setdefault("max_payload_bytes", None)
    options.setdefault("max_record_bytes", BIG)
    record = encode_entry(e, **options)
    return decode_record("orders.dlq", 2, 7, record.key, record.value, record.headers)


@settings(max_examples=200, deadline=None)
@given(entries())
def test_every_entry_reads_back_exactly(e: DeadLetterEntry) -> None:
    """decode(encode(entry)) == entry, for any text (lone surrogates too), payload and optional field."""
    assert _round_trip(e) == e.with_id("orders.dlq/2/7")


@settings(max_examples=60, deadline=None)
@given(entries())
def test_records_are_kafka_safe(e: DeadLetterEntry) -> None:
    """Header names are ASCII, values bytes; the key is the message id (None without one)."""
    record = encode_entry(e, max_payload_bytes=None, max_record_bytes=BIG)
    for name, value in record.headers:
        assert name.isascii()
        assert isinstance(value, bytes)
    assert (record.key is None) == (e.message_id is None)


def test_the_record_carries_what_kafka_tools_show() -> None:
    """Key = message id, value = the payload as it was, a W3C traceparent of the failed span, and the
    original partition/offset parsed from the source ref."""
    e = entry("orders", payload=b"\x00raw bytes\xff")
    record = encode_entry(e, max_payload_bytes=None, max_record_bytes=BIG)
    headers = dict(record.headers)
    assert record.key == b"m-1"
    assert record.value == b"\x00raw bytes\xff"
    assert headers[HEADER_TRACEPARENT] == b"00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"
    assert headers["streamwarden.original.topic"] == b"orders"
    assert headers["streamwarden.original.partition"] == b"0"
    assert headers["streamwarden.original.offset"] == b"41"
    assert headers["streamwarden.error.type"] == b"ValueError"
    assert headers["streamwarden.consumer_group"] == b"billing"
    assert json.loads(headers[HEADER_HEADERS])["k"] == "v"
    assert record.timestamp_ms == int(e.dead_lettered_at * 1000)
    text = encode_entry(entry("orders", payload="plain text"), max_payload_bytes=None, max_record_bytes=BIG)
    assert text.value == b"plain text"  # text is written as it is, not as a JSON string
    assert dict(text.headers)[HEADER_PAYLOAD_ENCODING] == b"text"


@pytest.mark.parametrize(
    ("options", "payload_size"),
    [
        pytest.param({"max_payload_bytes": 100}, 1_000, id="over-max_payload_bytes"),
        pytest.param({"max_record_bytes": 50_000}, 60_000, id="record-would-not-fit"),
    ],
)
def test_a_payload_that_does_not_fit_is_left_out(options: dict[str, Any], payload_size: int) -> None:
    """The entry keeps its metadata and says why and how big the payload was (not replayable)."""
    e = entry("orders", payload="x" * payload_size)
    back = _round_trip(e, **options)
    assert back is not None
    assert back.payload == OmittedPayload("oversize", payload_size, "")
    assert back.error_type == e.error_type
    assert back.message_id == e.message_id
    record = encode_entry(e, **{"max_payload_bytes": None, "max_record_bytes": BIG, **options})
    assert record.value is None


def test_a_payload_json_cannot_encode_is_kept_as_its_repr() -> None:
    """Like the Redis store: stored as repr, read back as OmittedPayload('not_json') with that text."""
    back = _round_trip(entry("orders", payload={"when": object}))
    assert back is not None
    assert isinstance(back.payload, OmittedPayload)
    assert back.payload.reason == "not_json"
    assert "object" in back.payload.preview


def test_header_values_are_bounded() -> None:
    """Huge original headers are cut (each value, and the JSON as a whole); the write never balloons."""
    many = {f"h{i}": "v" * 20_000 for i in range(50)}
    record = encode_entry(entry("orders", headers=many), max_payload_bytes=None, max_record_bytes=BIG)
    stored = json.loads(dict(record.headers)[HEADER_HEADERS])
    assert len(dict(record.headers)[HEADER_HEADERS]) <= MAX_ORIGINAL_HEADERS_CHARS
    assert all(len(v) <= MAX_ORIGINAL_HEADER_VALUE_CHARS for v in stored.values())
    assert 0 < len(stored) < 50
    long_fields = entry("orders", service="s" * 100_000, earlier_traces=tuple(f"t{i}" for i in range(500)))
    back = _round_trip(long_fields)
    assert back is not None
    assert len(back.service) <= 4096
    assert back.earlier_traces == tuple(f"t{i}" for i in range(436, 500))  # the most recent 64


def test_a_record_that_is_not_a_streamwarden_dead_letter_reads_as_none() -> None:
    """Foreign records (no schema header) in a DLQ topic are skipped, never misread."""
    assert decode_record("orders.dlq", 0, 0, b"k", b"v", [("traceparent", b"x")]) is None


def test_damaged_headers_read_as_defaults() -> None:
    """A record whose numbers or JSON are damaged still reads: never raises on read."""
    record = encode_entry(entry("orders"), max_payload_bytes=None, max_record_bytes=BIG)
    damaged = [
        (name, b"not a number" if name.endswith(("attempts", "_at", "count")) else value)
        for name, value in record.headers
    ]
    damaged = [(n, b"{" if n == HEADER_HEADERS else v) for n, v in damaged]
    back = decode_record("orders.dlq", 0, 0, record.key, b"{broken json", damaged)
    assert back is not None
    assert (back.attempts, back.delivery_count, back.dead_lettered_at, back.headers) == (0, 1, 0.0, {})
    assert isinstance(back.payload, OmittedPayload)
    assert back.payload.reason == "undecodable"


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        pytest.param("orders", "orders.dlq", id="plain"),
        pytest.param("a.b_c-d", "a.b_c-d.dlq", id="dots-dashes"),
        pytest.param("orders/eu", None, id="slash"),
        pytest.param("zamówienia", None, id="non-ascii"),
        pytest.param("x" * 300, None, id="too-long"),
        pytest.param("\ud800", None, id="lone-surrogate"),
    ],
)
def test_default_dlq_topic_is_always_a_legal_topic(destination: str, expected: str | None) -> None:
    """``{destination}.dlq`` when legal, else a stable hashed name; always room for ``.done``."""
    topic = default_dlq_topic(destination)
    if expected is not None:
        assert topic == expected
    else:
        assert topic.startswith("streamwarden-")
        assert topic.endswith(".dlq")
        assert topic == default_dlq_topic(destination)
    assert len(done_topic(topic)) <= 249
    assert parse_entry_id(f"{topic}/3/12") == (topic, 3, 12)


@pytest.mark.parametrize(
    "entry_id", ["orders/1-0", "orders.dlq/0", "orders.dlq/x/1", "a b/0/1", "orders.dlq/0/1/2", ""]
)
def test_parse_entry_id_refuses_other_shapes(entry_id: str) -> None:
    """Only TOPIC/PARTITION/OFFSET parses (a Redis id does not)."""
    assert parse_entry_id(entry_id) is None


ops = st.lists(
    st.tuples(st.sampled_from(["delete", "purge"]), st.integers(0, 40)),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(0, 45), st.integers(0, 45))
def test_marks_agree_with_a_set_of_deleted_offsets(steps: list[tuple[str, int]], low: int, high: int) -> None:
    """Whatever the order of deletes and purges, ``marked`` and ``live`` match a plain set (the model)."""
    marks = _PartitionMarks()
    deleted: set[int] = set()
    for op, offset in steps:
        if op == "delete":
            marks.delete(offset)
            deleted.add(offset)
        else:
            marks.purge(offset)
            deleted |= set(range(offset))
    for offset in range(50):
        assert marks.marked(offset) == (offset in deleted)
    assert marks.live(low, high) == sum(1 for o in range(low, high) if o not in deleted)
    assert all(o >= marks.floor for o in marks.sparse)  # consecutive marks collapsed into the floor
    assert marks.floor not in marks.sparse
