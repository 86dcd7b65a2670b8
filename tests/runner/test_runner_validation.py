"""RedisStreamConsumer refuses bad arguments at construction, each with a one-line ConfigurationError.

The client is never connected: validation needs no Redis.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions

import streamwarden as sw
from streamwarden._runners._redis_streams import RedisStreamConsumer


async def handler(env: sw.Envelope) -> None:
    """A valid async handler."""


@pytest.fixture
def client() -> redis.asyncio.Redis:
    return redis.asyncio.Redis(host="127.0.0.1", port=1)  # never connected


def build(client: redis.asyncio.Redis, **overrides: Any) -> RedisStreamConsumer:
    options: dict[str, Any] = {
        "stream": "orders",
        "group": "g",
        "consumer": "c1",
        "handler": handler,
        "layer": sw.ReliabilityLayer(None, sw.ReliabilitySettings()),
    }
    options.update(overrides)
    return RedisStreamConsumer(client, **options)


BAD = [
    ("block_ms", -1, "block_ms must be between 1"),
    ("block_ms", 0, "block_ms must be between 1"),
    ("block_ms", 1.5, "block_ms must be an integer"),
    ("block_ms", True, "block_ms must be an integer"),
    ("batch_size", 0, "batch_size must be between 1"),
    ("concurrency", 0, "concurrency must be between 1"),
    ("concurrency", -4, "concurrency must be between 1"),
    ("concurrency", "8", "concurrency must be an integer"),
    ("claim_idle_ms", -1, "claim_idle_ms must be between 0"),
    ("claim_every_s", 0, "claim_every_s must be a finite number of seconds, more than 0"),
    ("claim_every_s", math.nan, "claim_every_s must be a finite number"),
    ("shutdown_timeout", -1, "shutdown_timeout must be a finite number of seconds, 0 or more"),
    ("shutdown_timeout", math.inf, "shutdown_timeout must be a finite number"),
    ("max_backoff_s", 0, "max_backoff_s must be a finite number"),
    ("metrics_every_s", -5, "metrics_every_s must be a finite number"),
    ("stream", "", "stream must be a non-empty string"),
    ("group", None, "group must be a non-empty string"),
    ("consumer", 7, "consumer must be a non-empty string"),
    ("start_id", "yesterday", "start_id must be '0'"),
    ("ordered_by_key", "yes", "ordered_by_key must be True or False"),
    ("backoff", 0.5, "backoff must have reset"),
    ("layer", object(), "layer must be a ReliabilityLayer"),
]


@pytest.mark.parametrize(("option", "value", "message"), BAD, ids=[f"{o}={v!r}" for o, v, _ in BAD])
def test_bad_argument_is_refused_in_one_line(
    client: redis.asyncio.Redis, option: str, value: Any, message: str
) -> None:
    """Each bad constructor argument raises ConfigurationError (a ValueError) naming it, in one line."""
    with pytest.raises(sw.ConfigurationError) as raised:
        build(client, **{option: value})
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)
    assert isinstance(raised.value, ValueError)


def sync_handler(env: sw.Envelope) -> None:
    """Not async: would run its effect and never be acknowledged."""


class SyncCallable:
    def __call__(self, env: sw.Envelope) -> None:
        return None


class AsyncCallable:
    async def __call__(self, env: sw.Envelope) -> None:
        return None


@pytest.mark.parametrize(
    "bad", [sync_handler, SyncCallable(), AsyncCallable, lambda env: None, "module:function"],
    ids=["function", "callable-object", "class", "lambda", "string"],
)  # fmt: skip
def test_a_handler_that_is_not_async_is_refused(client: redis.asyncio.Redis, bad: Any) -> None:
    """A synchronous handler is refused at construction with a one-line explanation."""
    with pytest.raises(sw.ConfigurationError, match="async") as raised:
        build(client, handler=bad)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "good", [handler, AsyncCallable(), functools.partial(handler)], ids=["function", "object", "partial"]
)
def test_async_handlers_are_accepted(client: redis.asyncio.Redis, good: Any) -> None:
    """async def functions, objects with an async __call__ and partials of them are accepted."""
    assert build(client, handler=good).handler is good


def test_valid_start_ids_are_accepted(client: redis.asyncio.Redis) -> None:
    """'0', '$' and explicit stream ids are valid start ids."""
    for start_id in ("0", "$", "1700000000000", "1700000000000-3"):
        assert build(client, start_id=start_id).start_id == start_id


def test_the_runner_binds_the_layer_to_its_group(client: redis.asyncio.Redis) -> None:
    """A layer without a group is bound to the runner's (its dedup scope is destination/group)."""
    layer = sw.ReliabilityLayer(None, sw.ReliabilitySettings())
    build(client, layer=layer, group="executors")
    assert layer.consumer_group == "executors"
    assert layer.dedup_scope_for("orders") == "orders/executors"


def test_a_layer_of_another_group_is_refused(client: redis.asyncio.Redis) -> None:
    """A layer bound to another consumer group cannot serve this runner (it would share dedup records)."""
    layer = sw.ReliabilityLayer(None, sw.ReliabilitySettings(consumer_group="billing"))
    with pytest.raises(sw.ConfigurationError, match="billing") as raised:
        build(client, layer=layer, group="executors")
    assert "\n" not in str(raised.value)


def _reply(text: str) -> Exception:
    """The exception redis-py raises for the error reply ``text``."""
    from redis._parsers.base import BaseParser

    return BaseParser.parse_error(text)  # type: ignore[no-any-return]


CLASSIFIED = [
    (redis.exceptions.ConnectionError("Connection refused"), "transient"),
    (redis.exceptions.TimeoutError("Timeout reading"), "transient"),
    (ConnectionResetError(), "transient"),
    (_reply("LOADING Redis is loading the dataset in memory"), "transient"),
    (_reply("BUSY Redis is busy running a script"), "transient"),
    (_reply("READONLY You can't write against a read only replica."), "transient"),
    (_reply("TRYAGAIN Multiple keys request during rehashing of slot"), "transient"),
    (_reply("MISCONF Redis is configured to save RDB snapshots, but it's unable to persist"), "transient"),
    (_reply("OOM command not allowed when used memory > 'maxmemory'."), "transient"),
    (_reply("NOGROUP No such key 'orders' or consumer group 'g'"), "transient"),
    (_reply("NOPERM User worker has no permissions to run the 'xreadgroup' command"), "configuration"),
    (_reply("WRONGTYPE Operation against a key holding the wrong kind of value"), "configuration"),
    (_reply("WRONGPASS invalid username-password pair or user is disabled."), "configuration"),
    (_reply("ERR unknown command 'XAUTOCLAIM', with args beginning with:"), "configuration"),
    (redis.exceptions.DataError("XREADGROUP block must be a non-negative integer"), "configuration"),
    (RecursionError("a bug, not Redis"), None),
    (KeyError("reply shape"), None),
]


@pytest.mark.parametrize(
    ("error", "kind"), CLASSIFIED, ids=[f"{type(e).__name__}:{str(e)[:20]}" for e, _ in CLASSIFIED]
)
def test_redis_errors_are_told_apart(client: redis.asyncio.Redis, error: Exception, kind: str | None) -> None:
    """Connection trouble and a busy or failing-over server are retried; refusals that retrying cannot fix
    stop the consumer; anything else is not a Redis error (a bug) and is not hidden behind retries."""
    transport = build(client).redis_transport
    found = transport.classify(error)
    assert (found.value if found is not None else None) == kind
    if kind == "configuration":
        explained = transport.explain(error)
        assert "\n" not in explained
        assert str(error) in explained, "Redis' own words are kept"
