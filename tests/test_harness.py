"""The test harness itself: real redis-server processes that can be killed, paused and restarted."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from _redis_server import RedisServer, RedisServerNotFoundError


def _client(url: str, timeout: float = 2.0) -> redis.asyncio.Redis:
    # No retries: redis-py retries ConnectionError/TimeoutError with backoff by default, which would
    # hide (and slow down) exactly the failures these tests look for.
    return redis.asyncio.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )


@pytest.fixture
async def per_test_client(redis_server_per_test: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = _client(redis_server_per_test.url, timeout=0.3)
    try:
        yield client
    finally:
        await client.aclose()


async def test_session_server_answers_ping_and_set_get(redis_client: redis.asyncio.Redis) -> None:
    """The session server answers PING and stores and returns a value through redis.asyncio."""
    assert await redis_client.ping() is True
    assert await redis_client.set("harness:key", "value") is True
    assert await redis_client.get("harness:key") == b"value"


async def test_redis_client_starts_empty(redis_client: redis.asyncio.Redis) -> None:
    """redis_client FLUSHALLs the session server before each test, so a test starts with no keys."""
    assert await redis_client.dbsize() == 0


def test_session_server_is_not_the_default_port(redis_server: RedisServer, redis_url: str) -> None:
    """The session server listens on a free loopback port, never 6379, and redis_url points at it."""
    assert redis_server.host == "127.0.0.1"
    assert redis_server.port != 6379
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"


async def test_killed_server_fails_then_restarts_on_same_port(
    redis_server_per_test: RedisServer, per_test_client: redis.asyncio.Redis
) -> None:
    """After kill() a command fails with ConnectionError; after restart() on the same port it succeeds."""
    port = redis_server_per_test.port
    assert await per_test_client.set("k", "v") is True

    redis_server_per_test.kill()
    assert not redis_server_per_test.running
    with pytest.raises(redis.exceptions.ConnectionError):
        await per_test_client.ping()

    redis_server_per_test.restart()
    assert redis_server_per_test.port == port
    assert await per_test_client.ping() is True
    assert await per_test_client.get("k") is None  # no persistence: a restarted server is empty


async def test_stopped_server_restarts_on_same_port(
    redis_server_per_test: RedisServer, per_test_client: redis.asyncio.Redis
) -> None:
    """stop() (SIGTERM) makes commands fail with ConnectionError; restart() brings it back on the same port."""
    port = redis_server_per_test.port
    redis_server_per_test.stop()
    with pytest.raises(redis.exceptions.ConnectionError):
        await per_test_client.ping()
    redis_server_per_test.restart()
    assert redis_server_per_test.port == port
    assert await per_test_client.ping() is True


async def test_paused_server_times_out_until_resumed(
    redis_server_per_test: RedisServer, per_test_client: redis.asyncio.Redis
) -> None:
    """While paused (SIGSTOP) a command times out; after resume (SIGCONT) commands work again."""
    assert await per_test_client.ping() is True

    redis_server_per_test.pause()
    try:
        with pytest.raises(redis.exceptions.TimeoutError):
            await per_test_client.ping()
    finally:
        redis_server_per_test.resume()

    assert await per_test_client.ping() is True


def test_two_servers_get_different_ports(
    redis_server: RedisServer,
    redis_server_per_test: RedisServer,
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """Servers running at the same time each get their own port."""
    extra = redis_server_factory()
    ports = {redis_server.port, redis_server_per_test.port, extra.port}
    assert len(ports) == 3
    assert 6379 not in ports


async def test_extra_args_reach_the_server(redis_server_factory: Callable[..., RedisServer]) -> None:
    """extra_args are passed to redis-server, and the server keeps nothing on disk."""
    server = redis_server_factory(["--maxmemory-policy", "allkeys-lru"])
    client = _client(server.url)
    try:
        assert await client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
        assert await client.config_get("appendonly") == {"appendonly": "no"}
        assert await client.config_get("save") == {"save": ""}
    finally:
        await client.aclose()
    assert "Ready to accept connections" in server.log_text()


def test_bad_extra_args_fail_with_the_log() -> None:
    """A server that cannot start raises an error carrying its output instead of hanging."""
    server = RedisServer(["--no-such-option", "1"])
    with pytest.raises(RuntimeError, match="no-such-option"):
        server.start()
    server.close()


def test_missing_binary_is_an_error_not_a_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without redis-server on PATH, RedisServer raises an error that says how to install it."""
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RedisServerNotFoundError, match=r"run scripts/bootstrap --with-servers"):
        RedisServer()
