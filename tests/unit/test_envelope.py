"""Envelopes: id coercion, content-hash ids, and what happens to messages without a usable id."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import pytest

from streamwarden import Envelope, InvalidMessageError, MissingMessageIdError, StreamwardenError
from streamwarden._envelope import canonical_fingerprint, coerce_message_id, envelope_from_message


def from_message(message: object, *, content_hash: bool = False, id_field: str = "id") -> Envelope:
    return envelope_from_message(message, id_field=id_field, content_hash_ids=content_hash)


# --- id coercion --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("order-1", "order-1", id="str"),
        pytest.param(42, "42", id="int"),
        pytest.param(0, "0", id="int-zero-is-an-id"),
        pytest.param(-7, "-7", id="negative-int"),
        pytest.param(1.5, "1.5", id="float"),
        pytest.param(b"order-1", "order-1", id="bytes-utf8"),
        pytest.param("é".encode(), "é", id="bytes-non-ascii-utf8"),
        pytest.param(bytearray(b"abc"), "abc", id="bytearray"),
        pytest.param(memoryview(b"abc"), "abc", id="memoryview"),
        pytest.param("", None, id="empty-str"),
        pytest.param(b"", None, id="empty-bytes"),
        pytest.param(None, None, id="None"),
        pytest.param(True, None, id="True-is-not-an-id"),
        pytest.param(False, None, id="False-is-not-an-id"),
    ],
)
def test_coerce_message_id(raw: object, expected: str | None) -> None:
    """Raw ids become the string streamwarden keys on; None, empty and booleans are not ids."""
    assert coerce_message_id(raw) == expected


def test_non_utf8_bytes_id_round_trips() -> None:
    """A non-UTF-8 bytes id decodes without error and encodes back to the same bytes."""
    raw = b"\xff\xfeid-\x80"
    coerced = coerce_message_id(raw)
    assert coerced is not None
    assert coerced.encode("utf-8", "surrogateescape") == raw
    assert coerce_message_id(b"\xff") != coerce_message_id(b"\xfe")


def test_str_subclass_id_becomes_plain_str() -> None:
    """An id of a str subclass is keyed as a plain str with the same text."""

    class Tagged(str):
        pass

    coerced = coerce_message_id(Tagged("abc"))
    assert coerced == "abc"
    assert type(coerced) is str


def test_other_objects_use_their_str() -> None:
    """Objects such as UUIDs are keyed by their string form."""
    import uuid

    value = uuid.UUID(int=1)
    assert coerce_message_id(value) == str(value)


# --- envelope_from_message ------------------------------------------------------------------------


def test_dict_message_keeps_payload_and_headers() -> None:
    """A seed-style dict gives an envelope with its id, the dict as payload and its headers."""
    message = {"id": 7, "data": {"x": 1}, "headers": {"traceparent": "00-abc-def-01"}}
    env = from_message(message)
    assert env.id == "7"
    assert env.payload is message
    assert env.headers == {"traceparent": "00-abc-def-01"}
    assert env.delivery_count == 1


def test_non_mapping_headers_are_ignored() -> None:
    """Headers that are not a mapping are treated as absent rather than crashing."""
    assert from_message({"id": "a", "headers": ["not", "a", "mapping"]}).headers == {}


def test_any_mapping_is_a_message() -> None:
    """A read-only mapping works as well as a dict."""
    env = from_message(MappingProxyType({"id": "m", "data": 1}))
    assert env.id == "m"


def test_custom_id_field() -> None:
    """``id_field`` selects where the id lives."""
    assert from_message({"event_id": "e-1", "id": "ignored"}, id_field="event_id").id == "e-1"


def test_envelope_passes_through() -> None:
    """An Envelope is used as it is."""
    env = Envelope(id="e-1", payload={"x": 1}, delivery_count=3)
    assert from_message(env) is env


@pytest.mark.parametrize(
    "message",
    [
        pytest.param({"data": 1}, id="no-id-key"),
        pytest.param({"id": None, "data": 1}, id="id-None"),
        pytest.param({"id": "", "data": 1}, id="id-empty"),
        pytest.param({"id": b"", "data": 1}, id="id-empty-bytes"),
        pytest.param({"id": True, "data": 1}, id="id-bool"),
        pytest.param(Envelope(id="", payload={}), id="envelope-empty-id"),
    ],
)
def test_missing_id_raises_missing_message_id_error(message: object) -> None:
    """Without a usable id (and no content hashing) the message is refused with reason ``missing_id``."""
    with pytest.raises(MissingMessageIdError) as caught:
        from_message(message)
    assert caught.value.reason == "missing_id"
    assert isinstance(caught.value, InvalidMessageError)


def test_missing_id_message_explains_the_fix() -> None:
    """The error tells the user which field was missing and how to opt into content hashing."""
    with pytest.raises(MissingMessageIdError, match=r"'id'.*content_hash"):
        from_message({"data": 1})


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(None, id="None"),
        pytest.param("id=1", id="str"),
        pytest.param(b'{"id": 1}', id="bytes"),
        pytest.param([("id", 1)], id="list-of-pairs"),
        pytest.param(42, id="int"),
    ],
)
def test_non_mapping_raises_invalid_message(message: object) -> None:
    """Anything that is neither a mapping nor an Envelope is InvalidMessageError ``invalid_message``."""
    with pytest.raises(InvalidMessageError) as caught:
        from_message(message)
    assert caught.value.reason == "invalid_message"
    assert not isinstance(caught.value, MissingMessageIdError)
    assert isinstance(caught.value, StreamwardenError)
    assert isinstance(caught.value, ValueError)
    assert type(message).__name__ in str(caught.value)


# --- content-hash ids ---------------------------------------------------------------------------


def test_content_hash_id_is_stable_across_key_order() -> None:
    """Two messages with the same content in a different key order get the same id."""
    first = from_message({"data": {"b": 2, "a": 1}, "kind": "trade"}, content_hash=True)
    second = from_message({"kind": "trade", "data": {"a": 1, "b": 2}}, content_hash=True)
    assert first.id == second.id
    assert first.id.startswith("sha256:")


@pytest.mark.parametrize(
    "other",
    [
        pytest.param({"data": {"a": 1, "b": 3}}, id="different-value"),
        pytest.param({"data": {"a": 1}}, id="missing-key"),
        pytest.param({"data": {"a": "1", "b": 2}}, id="str-vs-int"),
        pytest.param({"data": [{"a": 1, "b": 2}]}, id="nested-in-list"),
    ],
)
def test_content_hash_ids_differ_for_different_payloads(other: dict[str, Any]) -> None:
    """Different payloads get different content-hash ids."""
    base = from_message({"data": {"a": 1, "b": 2}}, content_hash=True)
    assert from_message(other, content_hash=True).id != base.id


def test_content_hash_is_sha256_of_canonical_json() -> None:
    """The documented form: ``sha256:`` + SHA-256 of sorted-key compact UTF-8 JSON."""
    message = {"z": "é", "a": [1, 2]}
    canonical = '{"a":[1,2],"z":"é"}'.encode()
    expected = "sha256:" + hashlib.sha256(canonical).hexdigest()
    assert canonical_fingerprint(message) == expected
    assert from_message(message, content_hash=True).id == expected


def test_content_hash_used_only_when_id_missing() -> None:
    """A message with an id keeps it even when content hashing is on."""
    assert from_message({"id": "given", "data": 1}, content_hash=True).id == "given"


def test_fingerprint_handles_non_json_values() -> None:
    """Values JSON cannot encode (bytes, datetimes) still fingerprint deterministically."""
    import datetime

    value = {"raw": b"\x00\x01", "at": datetime.datetime(2024, 1, 2, 3, 4, 5)}
    assert canonical_fingerprint(value) == canonical_fingerprint(dict(reversed(list(value.items()))))


def test_fingerprint_of_surrogate_escaped_text() -> None:
    """Text carrying surrogate-escaped bytes (from a non-UTF-8 id) fingerprints without error."""
    assert canonical_fingerprint({"id": b"\xff".decode("utf-8", "surrogateescape")}).startswith("sha256:")


def test_fingerprint_of_lone_surrogate_from_json() -> None:
    """A payload with a lone surrogate, which ``json.loads`` happily produces, still fingerprints."""
    payload = json.loads('{"data": "\\ud800"}')
    assert canonical_fingerprint(payload).startswith("sha256:")
    assert from_message(payload, content_hash=True).id.startswith("sha256:")


def test_fingerprint_of_mixed_key_types() -> None:
    """A Python producer's dict with mixed key types still fingerprints, independent of key order."""
    first: Mapping[Any, Any] = {1: "one", "two": 2}
    second: Mapping[Any, Any] = {"two": 2, 1: "one"}
    assert canonical_fingerprint(first) == canonical_fingerprint(second)
