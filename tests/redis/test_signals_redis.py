"""Fleet signals on Redis: one DLQ depth per destination, whatever the number of layers."""

from __future__ import annotations

from typing import Any

import redis.asyncio

import streamwarden as sw
from _support import Otel, build_layer
from streamwarden import _names as n


async def broken(message: Any) -> str:
    raise ValueError("bad")


async def test_dlq_depth_of_three_layers_in_one_process_is_the_stream_length(
    redis_client: redis.asyncio.Redis, otel: Otel
) -> None:
    """Three layers of one service on one Redis DLQ stream report its length once (15 for an XLEN of 5
    before: each layer's store added its own view)."""
    layers = [build_layer(redis_client, otel, max_retries=0, destination="orders") for _ in range(3)]
    for i in range(5):
        result = await layers[i % 3].process({"id": f"m{i}"}, broken)
        assert result.outcome is sw.Outcome.DEAD_LETTERED
    for layer in layers:
        store = layer.dead_letter_store
        assert isinstance(store, sw.RedisDeadLetterStore)
        await store.refresh_depths()
    xlen = await redis_client.xlen(layers[0].dead_letter_store.stream_key("orders"))  # type: ignore[attr-defined]
    assert xlen == 5
    depths = [
        value
        for attrs, value in otel.points(n.METRIC_DLQ_DEPTH)
        if attrs[n.ATTR_MESSAGING_DESTINATION] == "orders"
    ]
    assert depths == [5]
