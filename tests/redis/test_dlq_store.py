"""RedisDeadLetterStore against a real redis-server: fields, payload caps, redaction, capacity, filters."""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest
import redis.asyncio
from _fixtures_dlq import entry

from streamwarden import DeadLetterError, DeadLetterQueueFullError, DeadLetterStore
from streamwarden._redis._dlq import (
    REDACTED,
    OmittedPayload,
    Redactor,
    RedisDeadLetterStore,
    parse_entry_id,
    safe_key_part,
)


@pytest.fixture
def store(redis_client: redis.asyncio.Redis) -> RedisDeadLetterStore:
    """A store on the session server, emptied before the test."""
    return RedisDeadLetterStore(redis_client)


def test_store_satisfies_the_protocol(store: RedisDeadLetterStore) -> None:
    """The Redis store is a DeadLetterStore."""
    assert isinstance(store, DeadLetterStore)


async def test_add_get_round_trips_every_field(store: RedisDeadLetterStore) -> None:
    """Every entry field, plus the traceparent, survives a write and a read."""
    original = entry(
        source_ref="orders:1-0",
        consumer_group="billing",
        delivery_count=3,
        attempts=4,
        first_failed_at=1_700_000_000.125,
        dead_lettered_at=1_700_000_001.5,
    )
    entry_id = await store.add(original)
    destination, stream_id = entry_id.rsplit("/", 1)
    assert destination == "orders"
    got = await store.get(entry_id)
    assert got is not None
    assert got == original.with_id(entry_id)
    fields = (await store.client.xrange(store.stream_key("orders"), stream_id, stream_id))[0][1]
    assert fields[b"traceparent"] == original.traceparent.encode()  # type: ignore[union-attr]
    assert fields[b"payload_encoding"] == b"json"


@pytest.mark.parametrize(
    ("payload", "encoding"),
    [
        pytest.param({"id": "m", "nested": [1, 2.5, None, "é"]}, "json", id="json"),
        pytest.param(b"\x00\xffraw", "base64", id="bytes"),
        pytest.param("text with \udcff surrogate", "json", id="surrogate-str"),
    ],
)
async def test_payload_encodings_round_trip(store: RedisDeadLetterStore, payload: Any, encoding: str) -> None:
    """JSON payloads and bytes (base64, marked) come back equal."""
    entry_id = await store.add(entry(payload=payload))
    got = await store.get(entry_id)
    assert got is not None
    assert got.payload == payload
    stream_id = entry_id.rsplit("/", 1)[1]
    fields = (await store.client.xrange(store.stream_key("orders"), stream_id, stream_id))[0][1]
    assert fields[b"payload_encoding"] == encoding.encode()
    if encoding == "base64":
        assert base64.b64decode(fields[b"payload"]) == payload


async def test_non_json_payload_is_stored_as_marked_repr(store: RedisDeadLetterStore) -> None:
    """A payload JSON cannot encode is kept as its repr, marked, and reads back as an OmittedPayload."""
    entry_id = await store.add(entry(payload={"when": {1, 2}}))
    got = await store.get(entry_id)
    assert got is not None
    assert isinstance(got.payload, OmittedPayload)
    assert got.payload.reason == "not_json"
    assert got.payload.preview == repr({"when": {1, 2}})


async def test_oversize_payload_becomes_metadata_only(redis_client: redis.asyncio.Redis) -> None:
    """A payload above max_payload_bytes is left out; the entry keeps the reason and original size."""
    store = RedisDeadLetterStore(redis_client, max_payload_bytes=1000)
    big = {"id": "m-1", "blob": "x" * 5000}
    entry_id = await store.add(entry(payload=big))
    got = await store.get(entry_id)
    assert got is not None
    assert got.payload == OmittedPayload("oversize", len('{"id":"m-1","blob":""}') + 5000)
    assert got.error_type == "ValueError"
    assert got.trace_id == "0af7651916cd43dd8448eb211c80319c"
    fields = (await redis_client.xrange(store.stream_key("orders")))[0][1]
    assert fields[b"payload_omitted_reason"] == b"oversize"
    assert b"payload" not in fields


async def test_traceback_and_message_are_bounded(redis_client: redis.asyncio.Redis) -> None:
    """The store bounds the traceback (keeping its end) and the error message again."""
    store = RedisDeadLetterStore(redis_client, max_traceback_chars=200)
    long_tb = "frame\n" * 1000 + "ValueError: the cause\n"
    entry_id = await store.add(entry(traceback=long_tb, error_message="m" * 10_000))
    got = await store.get(entry_id)
    assert got is not None
    assert len(got.traceback) == 200
    assert got.traceback.endswith("ValueError: the cause\n")
    assert got.traceback.startswith("...[truncated]...")
    assert len(got.error_message) <= 2048


SECRETS = [
    pytest.param("connect failed password=hunter2 retrying", "hunter2", id="password="),
    pytest.param('{"api_key": "k-123456789"}', "k-123456789", id="json-api_key"),
    pytest.param("token: abc.def.ghi", "abc.def.ghi", id="token:"),
    pytest.param("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.x.y", "eyJhbGciOiJIUzI1NiJ9.x.y", id="bearer"),
    pytest.param("key AKIAIOSFODNN7EXAMPLE leaked", "AKIAIOSFODNN7EXAMPLE", id="aws-key-id"),
    pytest.param(
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        id="aws-secret",
    ),
    pytest.param("redis://sw:s3cr3t@cache:6379/0 down", "s3cr3t", id="url-credentials"),
    pytest.param("redis://sw:hunter@2Secret@cache:6379/0 down", "2Secret", id="url-password-with-at"),
    pytest.param("redis://sw:pa/ss#word9@cache:6379 down", "ss#word9", id="url-password-with-slash-and-hash"),
    pytest.param('{"password": "correct horse battery", "user": "bob"}', "horse", id="json-multi-word"),
    pytest.param("{'client_secret': 'two words'}", "words", id="repr-multi-word"),
    pytest.param('password="has \\" escaped quote"', "escaped", id="escaped-quote"),
    pytest.param('token = "unclosed and long\nnext line', "unclosed", id="unclosed-quote"),
]


@pytest.mark.parametrize(("text", "secret"), SECRETS)
def test_default_patterns_redact_secrets(text: str, secret: str) -> None:
    """Each default pattern removes the secret and leaves the key name readable."""
    redacted = Redactor().text(text)
    assert secret not in redacted
    assert REDACTED in redacted


async def test_secrets_are_redacted_in_message_traceback_and_headers(store: RedisDeadLetterStore) -> None:
    """error_message, traceback and header values are redacted before they reach Redis; payload is not."""
    secret_entry = entry(
        error_message="login failed: password=hunter2",
        traceback="Traceback...\nRuntimeError: token=tok_live_42\n",
        headers={"authorization": "Bearer abcdefghijkl", "x-note": "api_key=zzz999", "traceparent": "00-x"},
        payload={"id": "m-1", "password": "kept-for-replay"},
    )
    entry_id = await store.add(secret_entry)
    raw = (await store.client.xrange(store.stream_key("orders")))[0][1]
    flat = b" ".join(raw.values())
    for secret in (b"hunter2", b"tok_live_42", b"abcdefghijkl", b"zzz999"):
        assert secret not in flat
    got = await store.get(entry_id)
    assert got is not None
    assert got.error_message == f"login failed: password={REDACTED}"
    assert got.headers == {"authorization": REDACTED, "x-note": f"api_key={REDACTED}", "traceparent": "00-x"}
    assert got.payload == {"id": "m-1", "password": "kept-for-replay"}


@pytest.mark.parametrize(("text", "secret"), SECRETS)
def test_redacting_twice_changes_nothing(text: str, secret: str) -> None:
    """Redaction is idempotent: the layer redacts an entry and the store redacts it again, and an
    already redacted value is left as it is (no stray ``]``)."""
    once = Redactor().text(text)
    assert Redactor().text(once) == once


def test_quoted_secret_is_redacted_whole_and_the_rest_kept() -> None:
    """A quoted value loses every word up to its closing quote; the key, the quotes and what follows stay."""
    text = 'login failed {"password": "correct horse battery", "user": "bob"} at 12:00'
    assert Redactor().text(text) == f'login failed {{"password": "{REDACTED}", "user": "bob"}} at 12:00'
    assert Redactor().text('token = "abc\ndef') == f'token = "{REDACTED}\ndef'  # unclosed: to the line end


async def test_redact_patterns_are_configurable(redis_client: redis.asyncio.Redis) -> None:
    """A custom pattern list replaces the defaults: its matches (or its 'secret' group) are redacted."""
    store = RedisDeadLetterStore(redis_client, redact_patterns=[r"card=(?P<secret>\d{16})", r"SSN \d+"])
    entry_id = await store.add(entry(error_message="card=4111111111111111 SSN 123 password=visible"))
    got = await store.get(entry_id)
    assert got is not None
    assert got.error_message == f"card={REDACTED} {REDACTED} password=visible"


async def test_full_destination_fails_the_write_and_loses_nothing(redis_client: redis.asyncio.Redis) -> None:
    """At max_entries_per_destination the write raises DeadLetterQueueFullError; nothing is trimmed."""
    store = RedisDeadLetterStore(redis_client, max_entries_per_destination=3)
    ids = [await store.add(entry(message_id=f"m-{i}")) for i in range(3)]
    with pytest.raises(DeadLetterQueueFullError):
        await store.add(entry(message_id="m-overflow"))
    assert await store.count("orders") == 3
    assert [e.entry_id for e in await store.list("orders")] == ids
    assert await store.add(entry("payments", message_id="other")) is not None  # per destination
    assert await store.delete(ids[0])
    assert await store.add(entry(message_id="m-after-delete"))


async def test_write_failure_raises_dead_letter_error(redis_server_factory: Any) -> None:
    """A write to an unreachable Redis raises DeadLetterError chained to the connection error."""
    server = redis_server_factory()
    client = redis.asyncio.Redis.from_url(server.url, socket_connect_timeout=1, retry_on_error=[])
    try:
        store = RedisDeadLetterStore(client)
        server.kill()
        with pytest.raises(DeadLetterError) as caught:
            await store.add(entry())
        assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "destination",
    [
        pytest.param("orders.v2:eu", id="plain"),
        pytest.param("with space/and{braces}", id="unsafe"),
        pytest.param("ünïcode", id="unicode"),
        pytest.param("d" * 500, id="long"),
    ],
)
async def test_unsafe_destinations_get_hashed_keys(store: RedisDeadLetterStore, destination: str) -> None:
    """Unsafe destination names are hashed into the key; ids, list and destinations keep the real name."""
    entry_id = await store.add(entry(destination))
    key = store.stream_key(destination)
    assert key == f"streamwarden:dlq:{safe_key_part(destination)}"
    assert "{" not in key
    assert " " not in key
    assert len(key) < 100
    assert parse_entry_id(entry_id) == (destination, entry_id.rsplit("/", 1)[1])
    got = await store.get(entry_id)
    assert got is not None
    assert got.destination == destination
    assert await store.destinations() == [destination]
    assert [e.entry_id for e in await store.list()] == [entry_id]


async def test_non_utf8_message_id_round_trips(store: RedisDeadLetterStore) -> None:
    """A message id decoded with surrogateescape keeps its exact bytes."""
    odd = b"id-\xff\xfe".decode("utf-8", "surrogateescape")
    got = await store.get(await store.add(entry(message_id=odd)))
    assert got is not None
    assert got.message_id == odd


LONE = "\ud800"  # a lone surrogate no bytes decode to (JSON "\\ud800" gives one)


async def test_text_fields_with_lone_surrogates_never_fail_the_write(store: RedisDeadLetterStore) -> None:
    """Every text field accepts any str: lone surrogates are written as \\udXXX escapes instead of
    raising UnicodeEncodeError (which would fail the message on every delivery); the id is exact."""
    odd = entry(
        destination=f"orders{LONE}",
        message_id=f"id-{LONE}",
        error_message=f"bad {LONE} value",
        error_type=f"Err{LONE}",
        error_class=f"permanent{LONE}",
        reason=f"error{LONE}",
        service=f"svc{LONE}",
        traceback=f"Traceback\nValueError: {LONE}\n",
        headers={"x-note": f"n{LONE}", f"x-{LONE}": "v"},
        source_ref=f"orders:{LONE}",
        consumer_group=f"g{LONE}",
        payload={"text": f"p{LONE}"},
        trace_id=f"t{LONE}",
    )
    entry_id = await store.add(odd)
    got = await store.get(entry_id)
    assert got is not None
    assert got.message_id == f"id-{LONE}"  # exact: base64 of its surrogatepass bytes
    assert got.payload == {"text": f"p{LONE}"}  # JSON escapes it exactly
    assert got.headers == {"x-note": f"n{LONE}", f"x-{LONE}": "v"}
    assert got.error_message == "bad \\ud800 value"
    assert got.traceback.endswith("ValueError: \\ud800\n")
    assert (got.error_type, got.error_class, got.reason, got.service) == (
        "Err\\ud800",
        "permanent\\ud800",
        "error\\ud800",
        "svc\\ud800",
    )
    assert (got.source_ref, got.consumer_group) == ("orders:\\ud800", "g\\ud800")
    assert got.destination == "orders\\ud800"
    assert await store.count(f"orders{LONE}") == 1
    (listed,) = await store.list()  # the index names the stream by its escaped name: the same key
    assert listed.entry_id == f"orders\\ud800/{entry_id.rsplit('/', 1)[1]}"
    assert await store.get(listed.entry_id) == got.with_id(listed.entry_id)


async def test_consumer_group_and_queue_name(store: RedisDeadLetterStore) -> None:
    """The failing consumer group round-trips (a replay runs in its dedup scope); queue_name is the
    stream key, the destination of the ``send`` span."""
    got = await store.get(await store.add(entry(consumer_group="billing")))
    assert got is not None
    assert got.consumer_group == "billing"
    assert store.queue_name("orders") == store.stream_key("orders") == "streamwarden:dlq:orders"
    bare = await store.get(await store.add(entry()))
    assert bare is not None
    assert bare.consumer_group is None


@pytest.mark.parametrize(
    "bad_id",
    [
        pytest.param("no-slash", id="no-slash"),
        pytest.param("orders/not-a-stream-id", id="bad-stream-id"),
        pytest.param("/1-0", id="no-destination"),
    ],
)
async def test_unknown_or_malformed_ids(store: RedisDeadLetterStore, bad_id: str) -> None:
    """get returns None and delete False for ids that are not ours."""
    assert await store.get(bad_id) is None
    assert await store.delete(bad_id) is False


async def test_missing_entry(store: RedisDeadLetterStore) -> None:
    """A well-formed id of an absent entry reads as None and deletes as False."""
    assert await store.get("orders/1-0") is None
    assert await store.delete("orders/1-0") is False


@pytest.fixture
async def populated(store: RedisDeadLetterStore) -> dict[str, Any]:
    """Five entries over two destinations, with distinct error types, classes and times."""
    base = time.time() - 100
    specs = [
        ("orders", "ValueError", "permanent", base + 0),
        ("orders", "TimeoutError", "transient", base + 10),
        ("payments", "ValueError", "permanent", base + 20),
        ("orders", "ValueError", "permanent", base + 30),
        ("payments", "KeyError", "permanent", base + 40),
    ]
    ids = []
    for i, (dest, etype, eclass, at) in enumerate(specs):
        ids.append(
            await store.add(
                entry(dest, message_id=f"m-{i}", error_type=etype, error_class=eclass, dead_lettered_at=at)
            )
        )
    return {"ids": ids, "base": base}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        pytest.param({}, [0, 1, 2, 3, 4], id="all-oldest-first"),
        pytest.param({"destination": "orders"}, [0, 1, 3], id="destination"),
        pytest.param({"error_type": "ValueError"}, [0, 2, 3], id="error-type"),
        pytest.param({"error_class": "transient"}, [1], id="error-class"),
        pytest.param({"since": 15, "until": 35}, [2, 3], id="time-window"),
        pytest.param({"destination": "payments", "error_type": "KeyError"}, [4], id="combined"),
        pytest.param({"limit": 2}, [0, 1], id="limit"),
        pytest.param({"destination": "nowhere"}, [], id="unknown-destination"),
    ],
)
async def test_list_filters(
    store: RedisDeadLetterStore, populated: dict[str, Any], filters: dict[str, Any], expected: list[int]
) -> None:
    """list filters by destination, error type/class, time window and limit, oldest first."""
    for key in ("since", "until"):
        if key in filters:
            filters[key] = populated["base"] + filters[key]
    destination = filters.pop("destination", None)
    found = await store.list(destination, **filters)
    assert [e.entry_id for e in found] == [populated["ids"][i] for i in expected]


async def test_list_pages_through_long_streams(store: RedisDeadLetterStore) -> None:
    """A filter that matches late entries pages past the first XRANGE batch."""
    for i in range(600):
        await store.add(entry(message_id=f"m-{i}", error_type="Late" if i >= 590 else "Early"))
    late = await store.list("orders", error_type="Late", limit=100)
    assert [e.message_id for e in late] == [f"m-{i}" for i in range(590, 600)]


async def test_count_destinations_and_depths(store: RedisDeadLetterStore, populated: dict[str, Any]) -> None:
    """count, destinations and the I/O-free depth cache agree."""
    assert await store.count() == 5
    assert await store.count("payments") == 2
    assert await store.destinations() == ["orders", "payments"]
    assert store.depths() == {"orders": 3, "payments": 2}
    assert await store.delete(populated["ids"][0])
    assert store.depths() == {"orders": 2, "payments": 2}


async def test_depths_follow_other_processes_after_refresh(redis_client: redis.asyncio.Redis) -> None:
    """A second store (another process) sees depths after refresh_depths; depths() never does I/O."""
    writer = RedisDeadLetterStore(redis_client)
    reader = RedisDeadLetterStore(redis_client)
    await writer.add(entry())
    await writer.add(entry("payments"))
    assert reader.depths() == {}
    assert await reader.refresh_depths() == {"orders": 1, "payments": 1}
    assert reader.depths() == {"orders": 1, "payments": 1}


async def test_purge_one_destination_and_all(store: RedisDeadLetterStore, populated: dict[str, Any]) -> None:
    """purge removes one destination's entries, or all, and reports how many."""
    assert await store.purge("payments") == 2
    assert await store.destinations() == ["orders"]
    assert store.depths() == {"orders": 3}
    assert await store.purge() == 3
    assert await store.count() == 0
    assert await store.list() == []
    assert store.depths() == {}
    assert await store.add(entry())  # a purged destination takes new entries
    assert await store.count() == 1


async def test_replace_is_atomic_and_respects_capacity(redis_client: redis.asyncio.Redis) -> None:
    """replace appends the merged entry and removes the old ones in one step; at capacity it counts
    the removals, and on refusal nothing changes."""
    store = RedisDeadLetterStore(redis_client, max_entries_per_destination=2)
    first = await store.add(entry(message_id="a", attempts=1))
    second = await store.add(entry(message_id="a", attempts=2))
    merged = await store.replace(entry(message_id="a", attempts=3), [second, first])
    assert [e.entry_id for e in await store.list()] == [merged]
    other = await store.add(entry(message_id="b"))
    with pytest.raises(DeadLetterQueueFullError):
        await store.replace(entry(message_id="c"), ["orders/1-1"])  # removes nothing that exists
    assert {e.entry_id for e in await store.list()} == {merged, other}
    with pytest.raises(ValueError, match="not an entry"):
        await store.replace(entry(message_id="a"), [f"payments/{merged.rsplit('/', 1)[1]}"])


async def test_works_with_decode_responses_clients(redis_url: str) -> None:
    """A client with decode_responses=True reads the same entries."""
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        store = RedisDeadLetterStore(client, key_prefix="decoded")
        await store.purge()
        entry_id = await store.add(entry(payload=b"\x01\x02"))
        got = await store.get(entry_id)
        assert got is not None
        assert got.payload == b"\x01\x02"
        assert await store.destinations() == ["orders"]
        await store.purge()
    finally:
        await client.aclose()
