"""Kafka records to envelopes: ids, payloads, headers and keys, and no record that makes decoding raise;
the transport's error classification."""

from __future__ import annotations

import json

import aiokafka.errors as ke
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamwarden._kafka._admin import TopicCreationError
from streamwarden._runners._core import ErrorKind
from streamwarden._runners._kafka import KafkaTransport, decode_record

raw = st.one_of(st.none(), st.binary(max_size=64), st.text(max_size=32))
header = st.tuples(st.text(max_size=12), raw)


@given(
    key=raw,
    value=raw,
    headers=st.one_of(st.lists(header, max_size=6), st.none(), st.just([("x",)]), st.just(42)),
    offset=st.integers(0, 2**40),
)
def test_any_record_decodes(key: object, value: object, headers: object, offset: int) -> None:
    """Whatever the key, value and headers hold, decoding gives an envelope with a non-empty id."""
    env = decode_record("orders", 3, offset, key=key, value=value, headers=headers)
    assert env.id
    assert env.destination == "orders"
    assert env.source_ref == f"orders/3/{offset}"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.headers.items())


@pytest.mark.parametrize(
    ("headers", "key", "expected"),
    [
        ([("message_id", b"m-1")], b"k", "m-1"),
        ([("message_id", b"")], b"k", "k"),  # an empty id header is no id
        ([], b"k", "k"),
        ([], None, "orders/0/7"),
        ([("message_id", b"a"), ("message_id", b"b")], None, "b"),  # the last one, as lastHeader
        ([("message_id", None)], None, "orders/0/7"),
    ],
    ids=["header", "empty-header", "key", "offset", "last-header-wins", "null-header"],
)
def test_message_id(headers: list[tuple[str, bytes | None]], key: bytes | None, expected: str) -> None:
    """The id header, else the key, else topic/partition/offset."""
    assert decode_record("orders", 0, 7, key=key, value=b"{}", headers=headers).id == expected


def test_custom_id_header() -> None:
    """The id header's name is configurable."""
    env = decode_record("t", 0, 1, value=b"1", headers=[("x-id", b"abc")], id_header="x-id")
    assert env.id == "abc"


@pytest.mark.parametrize(
    ("value", "payload"),
    [
        (b'{"a": 1}', {"a": 1}),
        (b"[1, 2]", [1, 2]),
        (b"plain text", "plain text"),
        (b"\xff\xfe not utf-8", b"\xff\xfe not utf-8".decode("utf-8", "surrogateescape")),
        (b"[" * 100_000, "[" * 100_000),  # deeper than the parser's recursion limit
        (None, None),  # a tombstone
    ],
    ids=["object", "array", "text", "binary", "deep", "tombstone"],
)
def test_payload(value: bytes | None, payload: object) -> None:
    """JSON when it parses, else the text (surrogate-escaped), None for a tombstone."""
    assert decode_record("t", 0, 0, value=value).payload == payload


def test_headers_and_key_as_text() -> None:
    """Every header becomes text (trace context included); the key is the ordering key."""
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    env = decode_record(
        "t",
        1,
        2,
        key=b"\xffk",
        value=json.dumps({"x": 1}).encode(),
        headers=[("traceparent", tp.encode()), ("bin", b"\x00\xff"), ("nil", None)],
    )
    assert env.headers["traceparent"] == tp
    assert env.headers["bin"] == "\x00\udcff"
    assert env.headers["nil"] == ""
    assert env.key == "\udcffk"


def _transport() -> KafkaTransport:
    return KafkaTransport(bootstrap_servers="127.0.0.1:1", topic="t", group="g", consumer="c")


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ke.KafkaConnectionError("down"), ErrorKind.TRANSIENT),
        (ke.KafkaTimeoutError(), ErrorKind.TRANSIENT),
        (ke.RequestTimedOutError(), ErrorKind.TRANSIENT),
        (ke.NotCoordinatorForGroupError(), ErrorKind.TRANSIENT),
        (ke.CommitFailedError(), ErrorKind.TRANSIENT),
        (ke.ConsumerStoppedError(), ErrorKind.TRANSIENT),
        (ConnectionResetError(), ErrorKind.TRANSIENT),
        (ke.TopicAuthorizationFailedError(), ErrorKind.CONFIGURATION),
        (ke.GroupAuthorizationFailedError(), ErrorKind.CONFIGURATION),
        (ke.SaslAuthenticationFailed(), ErrorKind.CONFIGURATION),
        (ke.InvalidConfigurationError(), ErrorKind.CONFIGURATION),
        (ke.UnsupportedVersionError(), ErrorKind.CONFIGURATION),
        (
            TopicCreationError("cannot create Kafka topic 't.retry.0': PolicyViolationError"),
            ErrorKind.CONFIGURATION,
        ),
        (ValueError("a bug"), None),
        (KeyError("x"), None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_classify(error: BaseException, kind: ErrorKind | None) -> None:
    """Connection trouble and retriable errors back off; refusals stop the runner; bugs are no broker error."""
    assert _transport().classify(error) is kind


def test_explain_names_the_fix() -> None:
    """A configuration error says where and what to fix, in Kafka's words."""
    text = _transport().explain(ke.TopicAuthorizationFailedError("no read"))
    assert "topic 't'" in text
    assert "Read on the topic" in text
    assert "TopicAuthorizationFailedError" in text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"topic": ""},
        {"group": ""},
        {"bootstrap_servers": ""},
        {"bootstrap_servers": 5},
        {"ordering": "random"},
        {"start_from": "middle"},
        {"poll_timeout_ms": 0},
        {"revoke_timeout": -1},
        {"max_held": 0},
        {"consumer_options": {"enable_auto_commit": True}},
        {"redeliver_backoff": object()},
    ],
    ids=lambda kw: next(iter(kw)),
)
def test_refuses_bad_options(kwargs: dict[str, object]) -> None:
    """Bad options fail at construction with a ConfigurationError naming the option."""
    import streamwarden as sw

    options: dict[str, object] = {
        "bootstrap_servers": "127.0.0.1:1",
        "topic": "t",
        "group": "g",
        "consumer": "c",
    }
    options.update(kwargs)
    with pytest.raises(sw.ConfigurationError, match=next(iter(kwargs))):
        KafkaTransport(**options)  # type: ignore[arg-type]
