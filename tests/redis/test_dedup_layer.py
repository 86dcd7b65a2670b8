"""ReliabilityLayer on RedisDedupStore: exactly-once processing across workers, hostile messages, big payloads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis.asyncio

from _support import Otel, build_layer
from streamwarden import (
    Lease,
    MissingMessageIdError,
    Outcome,
    ReliabilityLayer,
    current_lease,
)
from streamwarden import _names as n
from streamwarden._redis._dedup import RedisDedupStore

ClientFactory = Callable[..., redis.asyncio.Redis]
StoreFactory = Callable[..., RedisDedupStore]

HUNDRED_MB = 100 * 1024 * 1024


@pytest.fixture(scope="module")
def big_payload() -> Iterator[str]:
    """A 100 MiB string, built once for the module and dropped after it."""
    payload = "x" * HUNDRED_MB
    yield payload
    del payload


def layer_on(store: RedisDedupStore, otel: Otel | None = None, **settings: Any) -> ReliabilityLayer:
    """A layer whose dedup store is ``store`` (other stores embedded), without retries."""
    settings.setdefault("max_retries", 0)
    settings.setdefault("dedup_scope", store.scope)  # the records stay where the test looks for them
    return build_layer(None, otel, dedup_store=store, **settings)


async def test_fifty_layers_process_one_message_once(
    redis_url: str, client_factory: ClientFactory, store_factory: StoreFactory
) -> None:
    """Fifty consumers (own connection, own layer) receive the same message at once: the handler runs exactly once."""
    layers = [layer_on(store_factory(client_factory(redis_url))) for _ in range(50)]
    runs: list[int] = []
    release = asyncio.Event()

    async def handler(message: dict[str, Any]) -> None:
        runs.append(1)
        await release.wait()  # hold the lease until every consumer has tried

    tasks = [asyncio.ensure_future(layer.process({"id": "order-1"}, handler)) for layer in layers]
    others_answered = asyncio.Event()

    def on_done(_: object) -> None:
        if sum(t.done() for t in tasks) == 49:
            others_answered.set()

    for task in tasks:
        task.add_done_callback(on_done)
    await others_answered.wait()  # every other consumer was answered while the winner held the lease
    release.set()
    results = await asyncio.gather(*tasks)
    outcomes = [r.outcome for r in results]
    assert runs == [1]
    assert outcomes.count(Outcome.PROCESSED) == 1
    assert outcomes.count(Outcome.IN_PROGRESS) == 49
    late = await layer_on(store_factory(client_factory(redis_url))).process({"id": "order-1"}, handler)
    assert late.outcome is Outcome.DUPLICATE
    assert late.should_ack


async def test_handler_sees_the_lease_and_its_fencing_token(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """Inside the handler, current_lease() is the Redis lease: its owner and fencing token are the record's."""
    store = store_factory(redis_client)
    seen: list[Lease | None] = []

    async def handler(message: dict[str, Any]) -> None:
        seen.append(current_lease())
        record = await redis_client.hgetall(store.key(message["id"]))
        lease = seen[-1]
        assert lease is not None
        assert record[b"o"] == lease.owner.encode()
        assert int(record[b"f"]) == lease.fencing_token

    result = await layer_on(store).process({"id": "fenced"}, handler)
    assert result.outcome is Outcome.PROCESSED
    assert seen[0] is not None
    assert seen[0].fencing_token == 1


async def test_empty_id_is_rejected_before_the_store(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """A message with an empty id is dead-lettered as missing_id by the layer and never reaches Redis."""
    runs: list[Any] = []

    async def handler(message: Any) -> None:
        runs.append(message)

    result = await layer_on(store_factory(redis_client)).process({"id": ""}, handler)
    assert result.outcome is Outcome.DEAD_LETTERED
    assert isinstance(result.error, MissingMessageIdError)
    assert runs == []
    assert await redis_client.dbsize() == 0


async def test_hundred_megabyte_payload_with_conflict_detection(
    redis_client: redis.asyncio.Redis,
    store_factory: StoreFactory,
    otel: Otel,
    big_payload: str,
) -> None:
    """A 100 MiB payload is processed once with fingerprints; its redelivery is a duplicate, a changed payload a counted conflict."""
    store = store_factory(redis_client)
    first = layer_on(store, detect_payload_conflicts=True)
    again = layer_on(
        store_factory(redis_client, local_cache_size=0),
        otel,
        detect_payload_conflicts=True,
        service_name="conflicts",
    )
    sizes: list[int] = []

    async def handler(message: dict[str, Any]) -> None:
        sizes.append(len(message["payload"]))

    message = {"id": "big", "payload": big_payload}
    assert (await first.process(message, handler)).outcome is Outcome.PROCESSED
    assert (await again.process(message, handler)).outcome is Outcome.DUPLICATE
    changed = {"id": "big", "payload": big_payload, "revision": 2}
    assert (await again.process(changed, handler)).outcome is Outcome.DUPLICATE
    assert sizes == [HUNDRED_MB]
    assert otel.value(n.METRIC_DEDUP_CHECKS, **{n.ATTR_DEDUP_RESULT: "conflict"}) == 1
    assert otel.value(n.METRIC_DEDUP_CHECKS, **{n.ATTR_DEDUP_RESULT: "duplicate"}) == 1
    assert (
        await redis_client.memory_usage(store.key("big")) < 1024
    )  # the record holds a digest, not the payload
