"""Type aliases shared across the package: one spelling for each (handlers, time, the Redis client).

``RedisClient`` is the asyncio client the Redis-backed pieces accept: a ``redis.asyncio.Redis`` or a
``redis.asyncio.RedisCluster`` (any object with the same commands works; nothing checks the class).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import redis.asyncio

__all__ = ["Clock", "Processor", "RedisClient", "Sleep"]

#: A message handler: ``async def handler(message) -> result``.
Processor: TypeAlias = Callable[[Any], Awaitable[Any]]
#: A monotonic clock in seconds (``time.monotonic``).
Clock: TypeAlias = Callable[[], float]
#: An awaitable sleep in seconds (``asyncio.sleep``); tests inject a recorder.
Sleep: TypeAlias = Callable[[float], Awaitable[object]]
#: The asyncio Redis client streamwarden's Redis stores and runners take.
RedisClient: TypeAlias = "redis.asyncio.Redis | redis.asyncio.RedisCluster"
