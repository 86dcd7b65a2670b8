"""Shared test fixtures: real redis-server processes on free loopback ports (never the machine's 6379),
and the OpenTelemetry capture, hand-moved clock and recording sleep of tests/_support.py.

Suites add their own fixtures in their conftest.py (tests/unit, tests/ops, ...).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest
import redis.asyncio

# tests/ on sys.path whatever the import mode or __init__.py layout, so `from _redis_server import ...`
# works here and in any test module.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from _redis_server import RedisServer  # noqa: E402
from _support import Clock, Otel, RecordingSleep, make_otel  # noqa: E402


@pytest.fixture
def otel() -> Iterator[Otel]:
    """SDK providers with in-memory span exporter and metric reader, shut down after the test."""
    o = make_otel()
    yield o
    o.shutdown()


@pytest.fixture
def clock() -> Clock:
    """A clock the test moves by hand."""
    return Clock()


@pytest.fixture
def sleep(clock: Clock) -> RecordingSleep:
    """A sleep that records its delays and moves ``clock`` instead of waiting."""
    return RecordingSleep(clock)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole session. Do not kill or pause it: use redis_server_per_test."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def redis_server_per_test() -> Iterator[RedisServer]:
    """A redis-server of this test's own, free to kill, pause and restart."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[..., RedisServer]]:
    """Start more servers, ``factory(extra_args=[...])``; all are stopped after the test."""
    with contextlib.ExitStack() as stack:

        def factory(extra_args: Sequence[str] = (), *, port: int | None = None) -> RedisServer:
            return stack.enter_context(RedisServer(extra_args, port=port))

        yield factory


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A client of the session server, emptied (FLUSHALL) before the test and closed after it."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.flushall()
        yield client
    finally:
        await client.aclose()
