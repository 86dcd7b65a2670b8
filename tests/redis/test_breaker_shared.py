"""Shared circuit breaker: state travels through Redis off the hot path, between independent clients."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio
from _fixtures_dlq import Handler, commands_processed, make_layer

from _support import Clock, eventually
from streamwarden import BreakerPolicy, BreakerRegistry, CircuitOpenError, InMemoryDeadLetterStore, Outcome
from streamwarden._classify import ErrorClass
from streamwarden._redis._breaker import SharedBreakerSync, read_shared_breakers


@pytest.fixture
async def clients(redis_url: str, redis_client: redis.asyncio.Redis) -> AsyncIterator[Callable[[], Any]]:
    """``new()`` makes another client (another 'process'); all are closed after the test."""
    made: list[redis.asyncio.Redis] = []

    def new() -> redis.asyncio.Redis:
        client = redis.asyncio.Redis.from_url(redis_url)
        made.append(client)
        return client

    yield new
    for client in made:
        await client.aclose()


def _open(registry: BreakerRegistry, name: str = "dep") -> None:
    breaker = registry.get(name)
    for _ in range(breaker.policy.failure_threshold):
        breaker.record_failure(breaker.admit(), ConnectionError("down"), ErrorClass.TRANSIENT)
    assert breaker.state == "open"


def _pair(clients: Callable[[], Any], wall: Clock) -> tuple[BreakerRegistry, SharedBreakerSync, Clock]:
    clock = Clock(500.0)
    registry = BreakerRegistry(BreakerPolicy(failure_threshold=2, reset_timeout=30.0), clock=clock)
    registry.get("dep")
    sync = SharedBreakerSync(clients(), registry, wall_clock=wall)
    return registry, sync, clock


async def test_open_propagates_and_is_not_echoed(clients: Callable[[], Any]) -> None:
    """One process opens; the other adopts open with the remaining time, and does not publish it back."""
    wall = Clock(1_000.0)
    reg_a, sync_a, _ = _pair(clients, wall)
    reg_b, sync_b, _ = _pair(clients, wall)
    _open(reg_a)
    assert await sync_a.publish_pending() == 1
    wall.now += 10.0
    assert await sync_b.poll_once() == ["dep"]
    breaker_b = reg_b.get("dep")
    assert breaker_b.state == "open"
    assert breaker_b.retry_after() == pytest.approx(20.0)
    with pytest.raises(CircuitOpenError):
        breaker_b.admit()
    assert await sync_b.publish_pending() == 0  # adopted, not re-published
    assert await sync_a.poll_once() == []  # its own publication is not adopted again
    assert await sync_b.poll_once() == []  # nothing newer


async def test_close_propagates_after_a_successful_trial(clients: Callable[[], Any]) -> None:
    """When the opener's half-open trial succeeds, the others close too."""
    wall = Clock(1_000.0)
    reg_a, sync_a, clock_a = _pair(clients, wall)
    reg_b, sync_b, _ = _pair(clients, wall)
    _open(reg_a)
    await sync_a.publish_pending()
    await sync_b.poll_once()
    clock_a.now += 30.0
    breaker_a = reg_a.get("dep")
    breaker_a.record_success(breaker_a.admit())
    assert breaker_a.state == "closed"
    await sync_a.publish_pending()
    assert await sync_b.poll_once() == ["dep"]
    assert reg_b.get("dep").state == "closed"


async def test_expired_remote_open_is_not_adopted(clients: Callable[[], Any]) -> None:
    """An open state whose time is up is history, not news: it is not adopted."""
    wall = Clock(1_000.0)
    reg_a, sync_a, _ = _pair(clients, wall)
    reg_b, sync_b, _ = _pair(clients, wall)
    _open(reg_a)
    await sync_a.publish_pending()
    wall.now += 31.0
    assert await sync_b.poll_once() == []
    assert reg_b.get("dep").state == "closed"


async def test_a_late_joiner_adopts_the_open_state_at_start(clients: Callable[[], Any]) -> None:
    """A process that starts while the breaker is open fleet-wide starts open."""
    wall = Clock(1_000.0)
    reg_a, sync_a, _ = _pair(clients, wall)
    _open(reg_a)
    await sync_a.publish_pending()
    reg_c, sync_c, _ = _pair(clients, wall)
    async with sync_c:
        assert reg_c.get("dep").state == "open"
    states = await read_shared_breakers(sync_a.client)
    assert [(s.name, s.state, s.version) for s in states] == [("dep", "open", 1)]
    assert states[0].retry_after(wall.now) == pytest.approx(30.0)


async def test_layers_share_an_open_breaker_through_the_background_task(clients: Callable[[], Any]) -> None:
    """Two layers on two clients: one trips, the other defers within the poll interval."""
    settings: dict[str, Any] = {"circuit_breaker_threshold": 2, "circuit_breaker_timeout": 60}
    layer_a = make_layer(InMemoryDeadLetterStore(), **settings)
    layer_b = make_layer(InMemoryDeadLetterStore(), **settings)
    poll = 0.02
    async with (
        SharedBreakerSync(clients(), layer_a.breakers, poll_interval=poll) as sync_a,
        SharedBreakerSync(clients(), layer_b.breakers, poll_interval=poll),
    ):
        failing = Handler(fail=True, error=lambda: ConnectionError("dependency down"))
        for i in range(2):
            await layer_a.process({"id": f"a-{i}"}, failing)
        assert layer_a.circuit_breaker.state == "open"
        delay = await eventually(lambda: layer_b.circuit_breaker.state == "open", timeout=5.0)
        assert sync_a.round_trips >= 2
        healthy = Handler(fail=False)
        result = await layer_b.process({"id": "b-1"}, healthy)
        assert result.outcome is Outcome.DEFERRED
        assert healthy.calls == []
    assert delay < 5.0


async def test_no_round_trip_per_message(
    clients: Callable[[], Any], redis_client: redis.asyncio.Redis
) -> None:
    """With sharing on, processing messages (successes and failures) sends no Redis command."""
    layer = make_layer(InMemoryDeadLetterStore(), circuit_breaker_threshold=1000)
    sync = SharedBreakerSync(clients(), layer.breakers, poll_interval=3600.0)
    async with sync:
        await eventually(
            lambda: sync.round_trips >= 2, timeout=5.0
        )  # the start-up poll and the loop's first pass
        trips = sync.round_trips
        before = await commands_processed(redis_client)
        ok, bad = Handler(fail=False), Handler(fail=True, error=lambda: ConnectionError("x"))
        for i in range(300):
            await layer.process({"id": f"m-{i}"}, bad if i % 3 == 0 else ok)
        assert await commands_processed(redis_client) - before == 1  # the INFO call itself
        assert sync.round_trips == trips


async def test_redis_down_leaves_breakers_working_locally(
    redis_server_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """When Redis is gone, the local breaker still opens and rejects; the sync task only logs."""
    server = redis_server_factory()
    client = redis.asyncio.Redis.from_url(server.url, socket_connect_timeout=0.5, retry_on_error=[])
    try:
        registry = BreakerRegistry(BreakerPolicy(failure_threshold=2, reset_timeout=30.0))
        sync = SharedBreakerSync(client, registry, poll_interval=0.01)
        registry.get("dep")
        async with sync:
            server.kill()
            with caplog.at_level(logging.WARNING, logger="streamwarden.breaker"):
                _open(registry)
                await eventually(lambda: "unavailable" in caplog.text, timeout=5.0)
            with pytest.raises(CircuitOpenError):
                registry.get("dep").admit()
    finally:
        await client.aclose()


async def test_breakers_created_later_are_shared(clients: Callable[[], Any]) -> None:
    """A breaker the registry creates after the sync started is shared too."""
    wall = Clock(1_000.0)
    reg_a = BreakerRegistry(BreakerPolicy(failure_threshold=1, reset_timeout=5.0))
    reg_b = BreakerRegistry(BreakerPolicy(failure_threshold=1, reset_timeout=5.0))
    sync_a = SharedBreakerSync(clients(), reg_a, wall_clock=wall)
    sync_b = SharedBreakerSync(clients(), reg_b, wall_clock=wall)
    _open(reg_a, "late")
    reg_b.get("late")
    await sync_a.publish_pending()
    assert await sync_b.poll_once() == ["late"]


async def test_state_lost_with_redis_is_rebuilt(
    clients: Callable[[], Any], redis_client: redis.asyncio.Redis
) -> None:
    """After the shared hash is lost (restart, flush), new publications start at version 1 and are still
    adopted by processes that had seen higher versions."""
    wall = Clock(1_000.0)
    reg_a, sync_a, clock_a = _pair(clients, wall)
    reg_b, sync_b, _ = _pair(clients, wall)
    for _ in range(2):  # B sees versions up to 4 (open, closed, open, closed)
        _open(reg_a)
        await sync_a.publish_pending()
        await sync_b.poll_once()
        clock_a.now += 30.0
        breaker = reg_a.get("dep")
        breaker.record_success(breaker.admit())
        await sync_a.publish_pending()
        await sync_b.poll_once()
    await redis_client.flushall()
    assert await sync_b.poll_once() == []
    _open(reg_a)
    await sync_a.publish_pending()
    assert await sync_b.poll_once() == ["dep"]
    assert reg_b.get("dep").state == "open"
    assert [(s.name, s.version) for s in await read_shared_breakers(redis_client)] == [("dep", 1)]
