"""ACL users: a least-privilege user runs every feature; permission errors are configuration errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio
from _fixtures_dlq import LEAST_PRIVILEGE_RULES, Handler, Otel, create_acl_user, make_layer
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from _redis_server import RedisServer
from streamwarden import (
    BreakerPolicy,
    BreakerRegistry,
    ErrorClass,
    ErrorClassifier,
    InMemoryDeadLetterStore,
    Outcome,
    ReliabilityLayer,
    ReliabilitySettings,
)
from streamwarden import _names as n
from streamwarden._redis._breaker import SharedBreakerSync, read_shared_breakers
from streamwarden._redis._dlq import RedisDeadLetterStore
from streamwarden._replay import DeadLetterReplayer, ReplayResult

PASSWORD = "s3cret-pw"


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    """A redis-server of this module's own: ACL users must not leak into the shared server."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def connect(acl_server: RedisServer) -> AsyncIterator[Callable[..., redis.asyncio.Redis]]:
    """``connect(user=None, password=None)``: clients (no retries) closed after the test; the
    server is flushed first."""
    made: list[redis.asyncio.Redis] = []

    def new(user: str | None = None, password: str | None = None) -> redis.asyncio.Redis:
        client = redis.asyncio.Redis.from_url(
            acl_server.url, username=user, password=password, retry=Retry(NoBackoff(), 0)
        )
        made.append(client)
        return client

    await new().flushall()
    yield new
    for client in made:
        await client.aclose()


@pytest.fixture
async def least_privileged(connect: Callable[..., redis.asyncio.Redis]) -> redis.asyncio.Redis:
    """A client of user ``sw`` with the least-privilege rules."""
    await create_acl_user(connect(), "sw", PASSWORD, LEAST_PRIVILEGE_RULES)
    return connect("sw", PASSWORD)


async def test_least_privilege_user_runs_every_feature(least_privileged: redis.asyncio.Redis) -> None:
    """Dedup, DLQ add/list/replay/purge, counters and the shared breaker all work under the ACL user."""
    client = least_privileged
    layer = ReliabilityLayer(client, ReliabilitySettings(max_retries=0, processing_timeout=None))
    handler = Handler(fail=True)
    result = await layer.process({"id": "acl-1"}, handler)
    assert result.outcome is Outcome.DEAD_LETTERED
    store = layer.dead_letter_store
    assert isinstance(store, RedisDeadLetterStore)
    assert await store.count() == 1
    assert await store.refresh_depths() == {"default": 1}

    handler.fail = False
    report = await DeadLetterReplayer(layer, store, rate_per_second=None).replay(handler)
    assert [i.result for i in report.items] == [ReplayResult.PROCESSED]
    assert (await layer.process({"id": "acl-1"}, handler)).outcome is Outcome.DUPLICATE

    await layer.metrics_collector.flush()
    metrics = await layer.metrics_collector.get_reliability_metrics()
    assert metrics[n.COUNTER_TOTAL] == 3

    registry = BreakerRegistry(BreakerPolicy(failure_threshold=1, reset_timeout=30.0))
    sync = SharedBreakerSync(client, registry)
    breaker = registry.get("dep")
    breaker.record_failure(breaker.admit(), ConnectionError("down"), ErrorClass.TRANSIENT)
    assert await sync.publish_pending() == 1
    await sync.poll_once()
    assert [s.state for s in await read_shared_breakers(client)] == ["open"]

    assert (await layer.process({"id": "acl-2"}, Handler(fail=True))).outcome is Outcome.DEAD_LETTERED
    assert await store.purge() == 1
    assert await store.count() == 0


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(("FLUSHALL",), id="flushall"),
        pytest.param(("KEYS", "*"), id="keys"),
        pytest.param(("CONFIG", "GET", "maxmemory"), id="config"),
        pytest.param(("SET", "other-app:key", "1"), id="foreign-key"),
    ],
)
async def test_least_privilege_user_is_really_limited(
    least_privileged: redis.asyncio.Redis, command: tuple[str, ...]
) -> None:
    """The user cannot run dangerous commands or touch keys outside the prefix."""
    with pytest.raises(redis.exceptions.NoPermissionError):
        await least_privileged.execute_command(*command)


@pytest.mark.parametrize(
    ("user", "password"),
    [pytest.param("sw", "wrong", id="wrong-password"), pytest.param("nobody", PASSWORD, id="unknown-user")],
)
async def test_bad_credentials_fail_closed(
    connect: Callable[..., redis.asyncio.Redis],
    least_privileged: redis.asyncio.Redis,
    user: str,
    password: str,
) -> None:
    """Wrong ACL credentials: an authentication error, and the layer processes nothing."""
    client = connect(user, password)
    with pytest.raises(redis.exceptions.AuthenticationError):
        await client.ping()
    handler = Handler(fail=False)
    result = await ReliabilityLayer(client, ReliabilitySettings(processing_timeout=None)).process(
        {"id": "auth-1"}, handler
    )
    assert result.outcome is Outcome.DEFERRED
    assert handler.calls == []


async def test_permission_errors_are_permanent_and_never_trip_the_breaker(
    least_privileged: redis.asyncio.Redis,
) -> None:
    """A handler hitting NOPERM is not retried and, past the breaker threshold, leaves it closed."""

    async def handler(message: Any) -> None:
        await least_privileged.flushall()  # denied by the ACL: a real NoPermissionError

    layer = make_layer(InMemoryDeadLetterStore(), circuit_breaker_threshold=2, max_retries=3)
    for i in range(3):
        result = await layer.process({"id": f"np-{i}"}, handler)
        assert result.outcome is Outcome.DEAD_LETTERED
        assert isinstance(result.error, redis.exceptions.NoPermissionError)
        assert result.attempts == 1
        assert result.dead_letter is not None
        assert result.dead_letter.error_class == "permanent"
    assert layer.circuit_breaker.state == "closed"
    assert ErrorClassifier().classify(redis.exceptions.NoPermissionError("x")) is ErrorClass.PERMANENT


async def test_dlq_write_denied_by_acl_is_not_acknowledged(
    connect: Callable[..., redis.asyncio.Redis],
) -> None:
    """A user without write access to the DLQ keys: the layer returns FAILED (not acknowledged) and
    counts streamwarden.dlq.write_errors; nothing is written."""
    admin = connect()
    rules = [r for r in LEAST_PRIVILEGE_RULES if r != "~streamwarden:*"]
    rules += ["~streamwarden:dlq-index", "%R~streamwarden:dlq:*"]  # may read dead letters, not write them
    await create_acl_user(admin, "reader", PASSWORD, rules)
    otel = Otel()
    try:
        store = RedisDeadLetterStore(connect("reader", PASSWORD))
        layer = ReliabilityLayer(
            None,
            ReliabilitySettings(max_retries=0, processing_timeout=None, destination="orders"),
            dead_letter_store=store,
            meter_provider=otel.meter_provider,
        )
        result = await layer.process({"id": "denied-1"}, Handler(fail=True))
        assert result.outcome is Outcome.FAILED
        assert not result.should_ack
        assert any("dead-letter write failed" in note for note in getattr(result.error, "__notes__", []))
        errors = otel.points(n.METRIC_DLQ_WRITE_ERRORS)
        assert [value for _, value in errors] == [1]
        assert errors[0][0][n.ATTR_MESSAGING_DESTINATION] == "orders"
        assert await admin.xlen("streamwarden:dlq:orders") == 0
        assert await store.list() == []  # reading is still allowed
    finally:
        otel.shutdown()
