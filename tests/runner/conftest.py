"""Fixtures of the runner suite: a real redis-server per test, layers wired to in-memory SDK readers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio

import streamwarden as sw
from _redis_server import RedisServer
from _support import Otel, make_otel


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = make_otel()
    yield o
    o.tracer_provider.shutdown()
    o.meter_provider.shutdown()


@pytest.fixture
async def client(redis_server_per_test: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    c = redis.asyncio.Redis.from_url(redis_server_per_test.url, socket_timeout=5)
    yield c
    await c.aclose()


@pytest.fixture
def stream() -> str:
    return f"orders-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_layer(otel: Otel) -> Callable[..., sw.ReliabilityLayer]:
    def make(**settings: Any) -> sw.ReliabilityLayer:
        settings.setdefault("retry_initial_delay", 0.001)
        settings.setdefault("retry_max_delay", 0.01)
        return sw.ReliabilityLayer(
            None,
            sw.ReliabilitySettings(**settings),
            tracer_provider=otel.tracer_provider,
            meter_provider=otel.meter_provider,
        )

    return make
