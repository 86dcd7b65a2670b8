"""Type aliases shared across the package: one spelling for each (handlers, time, the Redis client).

``RedisClient`` is the asyncio client the Redis-backed pieces accept: a ``redis.asyncio.Redis`` or a
``redis.asyncio.RedisCluster`` (any object with the same commands works; nothing checks the class).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import redis.asyncio

__all__ = ["Clock", "DedupResult", "Outcome", "Processor", "RedisClient", "Sleep"]

#: A message handler: ``async def handler(message) -> result``.
Processor: TypeAlias = Callable[[Any], Awaitable[Any]]
#: A monotonic clock in seconds (``time.monotonic``).
Clock: TypeAlias = Callable[[], float]
#: An awaitable sleep in seconds (``asyncio.sleep``); tests inject a recorder.
Sleep: TypeAlias = Callable[[float], Awaitable[object]]
#: The asyncio Redis client streamwarden's Redis stores and runners take.
RedisClient: TypeAlias = "redis.asyncio.Redis | redis.asyncio.RedisCluster"


class Outcome(enum.StrEnum):
    """What happened to a message; decides acknowledgement (``ProcessResult.should_ack``).

    The values are the ``streamwarden.outcome`` attribute of the ``streamwarden.messages`` counter.
    """

    PROCESSED = "processed"
    DUPLICATE = "duplicate"
    IN_PROGRESS = "in_progress"
    DEAD_LETTERED = "dead_lettered"
    DEFERRED = "deferred"
    FAILED = "failed"


class DedupResult(enum.StrEnum):
    """Values of ``streamwarden.dedup.result``: a claim's answer (the first four equal ``ClaimStatus``),
    or what else happened to a claim."""

    NEW = "new"
    DUPLICATE = "duplicate"
    IN_PROGRESS = "in_progress"
    CONFLICT = "conflict"
    #: the store could not answer
    ERROR = "error"
    #: a NEW claim that replaced an expired lease: its owner may have run the effect (possible duplicate)
    TAKEOVER = "takeover"
    #: our lease expired and was taken or could not be extended: another owner may run the message
    LEASE_LOST = "lease_lost"
