"""decode_entry never raises, whatever a producer wrote (issue 9, finding 5), and honours id_field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamwarden._runners._redis_streams import decode_entry

DEEP_ARRAY = "[" * 2000 + "]" * 2000  # 4 KB: raised RecursionError before the fix
DEEP_OBJECT = '{"a":' * 2000 + "1" + "}" * 2000


@pytest.mark.parametrize(
    ("fields", "payload"),
    [
        ({b"id": b"m", b"payload": DEEP_ARRAY.encode()}, DEEP_ARRAY),
        ({b"id": b"m", b"payload": DEEP_OBJECT.encode()}, DEEP_OBJECT),
        ({b"id": b"m", b"payload": b"\xff\xfe{not json"}, "\udcff\udcfe{not json"),
        ({b"id": b"m", b"payload": b"42"}, 42),
        ({b"id": b"m", b"payload": b'"text"'}, "text"),
        ({b"id": b"m", b"payload": b"[1, 2]"}, [1, 2]),
        ({b"id": b"m", b"payload": b"NaN"}, pytest.approx(float("nan"), nan_ok=True)),
        ({b"id": b"m"}, {"id": "m"}),
    ],
    ids=["deep-array", "deep-object", "non-utf8", "number", "string", "array", "nan", "no-payload"],
)
def test_payloads_decode_to_json_or_raw_text(fields: dict[bytes, bytes], payload: Any) -> None:
    """The payload is its JSON value when the parser takes it, else the raw text; never an exception."""
    env = decode_entry(b"1-0", fields, destination="orders")
    assert env.payload == payload
    assert (env.id, env.source_ref, env.destination) == ("m", "1-0", "orders")


@pytest.mark.parametrize(
    ("fields", "expected_id"),
    [
        ({b"payload": b"{}"}, "7-1"),
        ({b"id": b"", b"payload": b"{}"}, "7-1"),
        ({b"id": b"\xff\xfe", b"payload": b"{}"}, "\udcff\udcfe"),
        ({1: 2, b"id": b"x"}, "x"),
        (None, "7-1"),
        ("not a mapping", "7-1"),
        ([(b"id", b"x")], "7-1"),
    ],
    ids=["no-id", "empty-id", "non-utf8-id", "int-field-name", "none", "str", "list"],
)
def test_ids_fall_back_to_the_stream_entry_id(fields: Any, expected_id: str) -> None:
    """Without a usable id field the stream entry id is the message id; odd field containers read as empty."""
    assert decode_entry(b"7-1", fields, destination="orders").id == expected_id


def test_the_configured_id_field_names_the_id() -> None:
    """id_field (STREAMWARDEN_ID_FIELD) selects the entry field holding the message id."""
    fields = {b"order_id": b"o-17", b"id": b"ignored", b"payload": b"{}"}
    assert decode_entry(b"1-0", fields, destination="s", id_field="order_id").id == "o-17"
    assert decode_entry(b"1-0", {b"id": b"x"}, destination="s", id_field="order_id").id == "1-0"


def test_headers_key_and_delivery_count_are_read() -> None:
    """traceparent / tracestate become headers, key the ordering key; the delivery count is passed on."""
    fields = {b"id": b"m", b"key": b"acct-1", b"traceparent": b"00-ab-cd-01", b"tracestate": b"x=1"}
    env = decode_entry(b"1-0", fields, destination="s", delivery_count=2)
    assert env.headers == {"traceparent": "00-ab-cd-01", "tracestate": "x=1"}
    assert (env.key, env.delivery_count) == ("acct-1", 2)
    assert decode_entry(b"1-0", {b"key": b""}, destination="s").key is None


class HostileMapping(dict[Any, Any]):
    """A mapping whose iteration fails halfway."""

    def items(self) -> Any:
        yield b"id", b"partial"
        raise RuntimeError("broken mapping")


def test_a_mapping_that_fails_to_iterate_keeps_what_was_read() -> None:
    """A field mapping raising while iterated does not make decode_entry raise."""
    assert decode_entry(b"1-0", HostileMapping(), destination="s").id == "partial"


field_bytes = st.binary(max_size=64) | st.sampled_from([b"id", b"payload", b"key", b"traceparent"])


@settings(max_examples=300, deadline=None)
@given(
    entry_id=st.binary(min_size=1, max_size=24) | st.text(min_size=1, max_size=24),  # never empty in Redis
    fields=st.dictionaries(field_bytes, st.binary(max_size=256) | st.text(max_size=64), max_size=6),
    depth=st.integers(min_value=0, max_value=5000),
)
def test_no_entry_content_makes_decode_entry_raise(entry_id: Any, fields: dict[Any, Any], depth: int) -> None:
    """Arbitrary field names and values, and payloads nested up to 5,000 deep, always decode."""
    fields = dict(fields)
    if depth % 3 == 0:
        fields[b"payload"] = ("[" * depth + "]" * depth).encode()
    env = decode_entry(entry_id, fields, destination="orders")
    assert isinstance(env.id, str)
    assert env.id, "a message always has an id"
    json.dumps(env.headers)  # headers are text
