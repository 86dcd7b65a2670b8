"""Secrets are never stored: every dead-letter store redacts, whatever the text looks like, and no text
can make a dead-letter write fail (a message that cannot be dead-lettered fails on every delivery)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis.asyncio
from _fixtures_dlq import Handler, make_layer

from streamwarden import InMemoryDeadLetterStore, Outcome, ReliabilityLayer, ReliabilitySettings
from streamwarden._dlq import REDACTED, DeadLetterStore
from streamwarden._redis._dlq import RedisDeadLetterStore

SECRET_WORDS = ("correct", "horse", "battery", "abcdefghijkl", "tok_live_42")


def secret_error() -> ValueError:
    """An error whose text carries a multi-word JSON secret and a token (the issue's example)."""
    return ValueError(
        'upstream refused {"password": "correct horse battery", "user": "bob"} token=tok_live_42'
    )


StoreMaker = Callable[[redis.asyncio.Redis], DeadLetterStore]

STORES = pytest.mark.parametrize(
    "make_store",
    [
        pytest.param(lambda client: InMemoryDeadLetterStore(), id="embedded"),
        pytest.param(lambda client: RedisDeadLetterStore(client), id="redis"),
    ],
)


async def everything_in_redis(client: redis.asyncio.Redis) -> bytes:
    """Every byte of every key on the server (streams and hashes) but dead-letter payloads (stored as
    they are, for replay), to search for leaked secrets."""
    found: list[bytes] = []
    async for key in client.scan_iter():
        kind = await client.type(key)
        if kind == b"stream":
            for _, fields in await client.xrange(key):
                found += [k + b"=" + v for k, v in fields.items() if k != b"payload"]
        elif kind == b"hash":
            found += [k + b"=" + v for k, v in (await client.hgetall(key)).items()]
    return b"\n".join(found)


@STORES
async def test_secrets_in_errors_and_headers_are_never_stored(
    redis_client: redis.asyncio.Redis, make_store: StoreMaker
) -> None:
    """A handler failing with a multi-word quoted password and a token, on a message with an
    Authorization header: the stored entry (embedded or Redis) holds none of the secret words outside
    the payload, keeps the key names, and keeps the payload as it is (a replay needs it)."""
    store = make_store(redis_client)
    layer = make_layer(store)
    message = {"id": "r-1", "amount": 5, "headers": {"authorization": "Bearer abcdefghijkl", "x-trace": "t"}}
    result = await layer.process(message, Handler(error=secret_error))
    assert result.outcome is Outcome.DEAD_LETTERED
    (stored,) = await store.list()
    assert stored.error_message == (
        f'upstream refused {{"password": "{REDACTED}", "user": "bob"}} token={REDACTED}'
    )
    assert stored.headers.get("authorization") == REDACTED
    assert REDACTED in stored.traceback
    text = repr((stored.error_message, stored.traceback, stored.headers))
    for word in SECRET_WORDS:
        assert word not in text
    assert stored.payload == message
    raw = await everything_in_redis(redis_client)
    for word in SECRET_WORDS:
        assert word.encode() not in raw


async def test_embedded_store_built_by_the_layer_redacts() -> None:
    """The layer's own embedded store (no Redis, no store given) redacts as well."""
    layer = ReliabilityLayer(None, ReliabilitySettings(max_retries=0, processing_timeout=None))
    result = await layer.process({"id": "r-2"}, Handler(error=secret_error))
    assert result.outcome is Outcome.DEAD_LETTERED
    (stored,) = await layer.dead_letter_store.list()
    for word in SECRET_WORDS:
        assert word not in stored.error_message
        assert word not in stored.traceback


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("bad \ud800 value", id="lone-high-surrogate"),
        pytest.param("bad \udfff value", id="lone-low-surrogate"),
        pytest.param("bad \udcff value", id="escaped-byte"),
        pytest.param("nul \x00 and ünïcode", id="nul-unicode"),
    ],
)
async def test_any_error_text_can_be_dead_lettered_on_redis(
    redis_client: redis.asyncio.Redis, text: str
) -> None:
    """An error whose text holds lone surrogates is dead-lettered (the write is confirmed and the
    message acknowledged), not FAILED on every delivery by a UnicodeEncodeError."""
    store = RedisDeadLetterStore(redis_client)
    layer = make_layer(store)
    result = await layer.process({"id": "u-1", "note": text}, Handler(error=lambda: ValueError(text)))
    assert result.outcome is Outcome.DEAD_LETTERED
    assert result.should_ack
    (stored,) = await store.list()
    assert stored.message_id == "u-1"
    assert stored.payload == {"id": "u-1", "note": text}  # JSON keeps any str exactly
    visible = stored.error_message.encode("utf-8", "surrogateescape")  # readable text, never raises
    assert visible


async def test_message_id_with_a_lone_surrogate_round_trips(redis_client: redis.asyncio.Redis) -> None:
    """A message id that came from JSON "\\ud800" is written and read back exactly."""
    store = RedisDeadLetterStore(redis_client)
    layer = make_layer(store)
    odd = "id-\ud800"
    result = await layer.process({"id": odd}, Handler())
    assert result.outcome is Outcome.DEAD_LETTERED
    (stored,) = await store.list()
    assert stored.message_id == odd


@pytest.mark.parametrize(
    "make_bounded",
    [
        pytest.param(lambda client, limit: InMemoryDeadLetterStore(max_traceback_chars=limit), id="embedded"),
        pytest.param(
            lambda client, limit: RedisDeadLetterStore(client, max_traceback_chars=limit), id="redis"
        ),
    ],
)
async def test_the_traceback_limit_holds_for_every_small_limit(
    redis_client: redis.asyncio.Redis, make_bounded: Callable[[redis.asyncio.Redis, int], DeadLetterStore]
) -> None:
    """For every limit 0…50 both stores keep at most that many characters of a 1,000-character traceback,
    its end (the Redis store's own copy of the cutting once stored 1,018 characters for a limit of 5)."""
    from streamwarden import DeadLetterEntry

    traceback = "x" * 980 + "ValueError: the end\n"
    for limit in range(51):
        store = make_bounded(redis_client, limit)
        entry = DeadLetterEntry(
            message_id=f"tb-{limit}", destination="tb", payload={}, reason="error", error_type="ValueError",
            error_class="permanent", error_message="e", attempts=1, service="s", traceback=traceback,
        )  # fmt: skip
        stored = await store.get(await store.add(entry))
        assert stored is not None
        assert len(stored.traceback) <= limit, (limit, len(stored.traceback))
        assert traceback.endswith(stored.traceback.removeprefix("...[truncated]...\n")), limit
