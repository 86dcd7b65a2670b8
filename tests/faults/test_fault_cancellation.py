"""Cancellation at the worst moment, in process: a handler succeeded, then its task was cancelled.

A runner cancels in-flight messages when ``shutdown_timeout`` runs out (``RedisStreamConsumer._drain``).
A message cancelled *after* its handler succeeded but before the completion mark reached Redis (the
command still waiting for a pooled connection, say) must not become an uncounted duplicate. The window
is microseconds wide between processes, so this test holds the completion at a gate instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio

import streamwarden as sw
from _redis_server import RedisServer
from _support import eventually
from streamwarden._dedup import Lease
from streamwarden._redis._dedup import RedisDedupStore


class GatedCompletions(RedisDedupStore):
    """A Redis dedup store whose completions wait at a gate before anything is sent."""

    def __init__(self, client: Any) -> None:
        super().__init__(client, local_cache_size=0)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def complete(self, lease: Lease, ttl_seconds: float, fingerprint: str | None = None) -> bool:
        self.entered.set()
        await self.gate.wait()
        return await super().complete(lease, ttl_seconds, fingerprint)


async def test_cancelled_during_completion_a_redelivery_is_no_uncounted_duplicate(
    redis_server_per_test: RedisServer,
) -> None:
    """Cancelled between the handler's success and the completion mark: any re-execution is a counted takeover."""
    client = redis.asyncio.Redis.from_url(redis_server_per_test.url)
    try:
        store = GatedCompletions(client)
        layer = sw.ReliabilityLayer(
            client, sw.ReliabilitySettings(dedup_lease=2.0, processing_timeout=1.0), dedup_store=store
        )
        effects: list[str] = []

        async def handler(message: dict[str, Any]) -> None:
            effects.append(message["id"])

        first = asyncio.create_task(layer.process({"id": "m1"}, handler))
        await store.entered.wait()
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        store.gate.set()

        # the stream redelivers it: again while the lease (if still held) has not expired
        outcomes: list[sw.Outcome] = []

        async def redelivered() -> bool:
            outcomes.append((await layer.process({"id": "m1"}, handler)).outcome)
            return outcomes[-1] is not sw.Outcome.IN_PROGRESS

        await eventually(redelivered, timeout=10)
        takeovers = layer.metrics_collector.counts["dedup_takeovers"]
        assert len(effects) - 1 == takeovers, f"{len(effects)} executions, {takeovers} counted takeovers"
    finally:
        await client.aclose()
