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


async def test_dlq_depth_is_exported_by_one_process_per_destination(
    redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    """Two consumer processes (two telemetry pipelines, two stores) refreshing the same queue: only one
    exports its depth, so a sum over instances equals XLEN (93 + 96 for an XLEN of 96 before); when the
    reporter stops refreshing, the other takes over once the owner key expires."""
    from _support import make_otel

    first_otel, second_otel = make_otel(), make_otel()
    try:
        first = build_layer(redis_client, first_otel, max_retries=0, destination="orders", service_name="a")
        other_client = redis.asyncio.Redis.from_url(redis_url)
        second_store = sw.RedisDeadLetterStore(other_client, depth_owner_ttl=0.2)
        build_layer(  # the second process's layer: its telemetry reads second_store
            other_client, second_otel, max_retries=0, destination="orders", service_name="a",
            dead_letter_store=second_store,
        )  # fmt: skip
        for i in range(3):
            assert (await first.process({"id": f"m{i}"}, broken)).outcome is sw.Outcome.DEAD_LETTERED
        first_store = first.dead_letter_store
        assert isinstance(first_store, sw.RedisDeadLetterStore)
        await first_store.refresh_depths()
        await second_store.refresh_depths()

        def reported(otel: Otel) -> list[Any]:
            return [
                v for a, v in otel.points(n.METRIC_DLQ_DEPTH) if a[n.ATTR_MESSAGING_DESTINATION] == "orders"
            ]

        assert (reported(first_otel), reported(second_otel)) == ([3], [])
        await redis_client.delete(
            first_store._depth_owner_key("orders")
        )  # the reporter died: its key expired
        await second_store.refresh_depths()
        await first_store.refresh_depths()
        assert (reported(first_otel), reported(second_otel)) == ([], [3])
        await other_client.aclose()
    finally:
        first_otel.shutdown()
        second_otel.shutdown()


async def test_dlq_span_names_the_real_queue_and_signals_carry_the_schema_url(
    redis_client: redis.asyncio.Redis, otel: Otel
) -> None:
    """The ``send {destination}.dlq`` span's messaging.destination.name is the Redis key the entry went
    to (it said ``orders.dlq`` while the key is ``streamwarden:dlq:orders``), and the instrumentation
    scope of spans and metrics carries the semantic-conventions schema URL."""
    layer = build_layer(redis_client, otel, max_retries=0, destination="orders")
    assert (await layer.process({"id": "q"}, broken)).outcome is sw.Outcome.DEAD_LETTERED
    (send,) = otel.spans("send orders.dlq")
    assert send.attributes is not None
    assert send.attributes[n.ATTR_MESSAGING_DESTINATION] == "streamwarden:dlq:orders"
    assert send.instrumentation_scope is not None
    assert send.instrumentation_scope.schema_url == n.SCHEMA_URL
    data = otel.reader.get_metrics_data()
    assert data is not None
    scopes = {sm.scope.name: sm.scope.schema_url for rm in data.resource_metrics for sm in rm.scope_metrics}
    assert scopes[n.INSTRUMENTATION_NAME] == n.SCHEMA_URL
