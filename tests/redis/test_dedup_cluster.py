"""RedisDedupStore on a real three-node Redis Cluster (redis-server --cluster-enabled yes)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio
from redis.crc import key_slot

from streamwarden import ClaimStatus, Outcome, ReliabilityLayer, ReliabilitySettings
from streamwarden._dedup import RecordState
from streamwarden._redis._dedup import RedisDedupStore

StoreFactory = Callable[..., RedisDedupStore]
LeaseExpiry = Callable[..., Awaitable[None]]

NEW, DUPLICATE, IN_PROGRESS, CONFLICT = (
    ClaimStatus.NEW,
    ClaimStatus.DUPLICATE,
    ClaimStatus.IN_PROGRESS,
    ClaimStatus.CONFLICT,
)


async def nodes_of(client: redis.asyncio.RedisCluster, keys: list[str]) -> set[str]:
    """The names of the primaries that own ``keys``."""
    await client.initialize()
    return {client.get_node_from_key(key).name for key in keys}


async def test_cluster_claim_complete_duplicate_conflict(
    cluster_client: redis.asyncio.RedisCluster, store_factory: StoreFactory
) -> None:
    """On a cluster a claim is NEW then IN_PROGRESS for another owner, then DUPLICATE, and CONFLICT for another payload."""
    store, other = store_factory(cluster_client), store_factory(cluster_client, local_cache_size=0)
    lease = (await store.claim("c-1", 30.0, "sha256:a")).lease
    assert lease is not None
    assert (await other.claim("c-1", 30.0)).status is IN_PROGRESS
    assert await store.complete(lease, 60.0, "sha256:a") is True
    assert (await other.claim("c-1", 30.0, "sha256:a")).status is DUPLICATE
    assert (await other.claim("c-1", 30.0, "sha256:b")).status is CONFLICT
    assert await other.is_completed("c-1")
    assert await other.forget("c-1") is True
    assert (await other.claim("c-1", 30.0)).status is NEW


async def test_cluster_keys_spread_over_slots(
    cluster_client: redis.asyncio.RedisCluster, store_factory: StoreFactory
) -> None:
    """Record keys carry no hash tag: a hundred ids land on many slots and on every node."""
    store = store_factory(cluster_client)
    keys = [store.key(f"id-{i}") for i in range(100)]
    assert len({key_slot(k.encode()) for k in keys}) > 90
    assert len(await nodes_of(cluster_client, keys)) == 3


async def test_cluster_batch_claims_across_slots(
    cluster_client: redis.asyncio.RedisCluster, store_factory: StoreFactory
) -> None:
    """claim_many over ids on every node answers in order (new / duplicate / in_progress, repeats included); complete_many too."""
    store = store_factory(cluster_client, local_cache_size=0)
    other = store_factory(cluster_client)
    done = (await other.claim("done", 30.0)).lease
    assert done is not None
    await other.complete(done, 60.0)
    await other.claim("held", 30.0)
    fresh = [f"n-{i}" for i in range(40)]
    ids = ["done", *fresh, "held", fresh[0]]
    assert len(await nodes_of(cluster_client, [store.key(m) for m in ids])) == 3
    results = await store.claim_many(ids, 30.0)
    assert [r.status for r in results] == [DUPLICATE, *[NEW] * 40, IN_PROGRESS, IN_PROGRESS]
    leases = [r.lease for r in results if r.lease is not None]
    assert await store.complete_many(leases, 60.0) == [True] * 40
    again = await store.claim_many(fresh, 30.0)
    assert {r.status for r in again} == {DUPLICATE}


async def test_cluster_stale_owner_cannot_complete_or_release(
    cluster_client: redis.asyncio.RedisCluster, store_factory: StoreFactory, lease_expired: LeaseExpiry
) -> None:
    """On a cluster, a stale owner cannot complete or release after a takeover, and the takeover's fencing token is greater."""
    stale_store, new_store = store_factory(cluster_client), store_factory(cluster_client)
    stale = (await stale_store.claim("stale", 0.02)).lease
    assert stale is not None
    await lease_expired(cluster_client, stale_store.key("stale"))
    takeover = (await new_store.claim("stale", 30.0)).lease
    assert takeover is not None
    assert takeover.fencing_token > stale.fencing_token
    assert await stale_store.complete(stale, 60.0) is False
    assert await stale_store.release(stale) is False
    assert await new_store.complete(takeover, 60.0) is True


async def test_cluster_concurrent_workers_exactly_one_new(
    redis_cluster: list[int], store_factory: StoreFactory
) -> None:
    """Twenty workers with their own cluster clients claim one id at once: exactly one NEW."""
    clients = [redis.asyncio.RedisCluster(host="127.0.0.1", port=redis_cluster[i % 3]) for i in range(20)]
    try:
        results = await asyncio.gather(*(store_factory(c).claim("race", 30.0) for c in clients))
        assert [r.status for r in results].count(NEW) == 1
    finally:
        for client in clients:
            await client.aclose()


async def test_cluster_deferred_completions_flush_per_slot(
    cluster_client: redis.asyncio.RedisCluster, store_factory: StoreFactory
) -> None:
    """Deferred completions of ids on every node are flushed in one cluster pipeline and land on each node."""
    store = store_factory(cluster_client, defer_completions=True, flush_interval=60.0)
    reader = store_factory(cluster_client, local_cache_size=0)
    ids = [f"d-{i}" for i in range(20)]
    leases = [r.lease for r in await store.claim_many(ids, 30.0) if r.lease is not None]
    assert await store.complete_many(leases, 60.0) == [True] * 20
    assert not await reader.is_completed(ids[0])
    await store.flush()
    assert all([await reader.is_completed(m) for m in ids])


async def test_cluster_layer_processes_once(
    cluster_client: redis.asyncio.RedisCluster, store_factory: StoreFactory
) -> None:
    """The layer on a cluster-backed store processes a message once and reports the redelivery as a duplicate."""
    layer = ReliabilityLayer(
        None, ReliabilitySettings(max_retries=0), dedup_store=store_factory(cluster_client)
    )
    runs: list[Any] = []

    async def handler(message: Any) -> None:
        runs.append(message)

    assert (await layer.process({"id": "L"}, handler)).outcome is Outcome.PROCESSED
    assert (await layer.process({"id": "L"}, handler)).outcome is Outcome.DUPLICATE
    assert len(runs) == 1


async def test_cluster_eviction_policy_checked_on_every_primary(
    cluster_client: redis.asyncio.RedisCluster, redis_cluster: list[int]
) -> None:
    """check_eviction_policy reads every primary: all noeviction passes; one allkeys-lru node is reported by name."""
    store = RedisDedupStore(cluster_client)
    assert await store.check_eviction_policy() is None
    node = redis.asyncio.Redis(host="127.0.0.1", port=redis_cluster[1])
    try:
        await node.config_set("maxmemory-policy", "allkeys-lru")
        message = await store.check_eviction_policy()
        assert message is not None
        assert f"127.0.0.1:{redis_cluster[1]}=allkeys-lru" in message
    finally:
        await node.config_set("maxmemory-policy", "noeviction")
        await node.aclose()


async def test_cluster_scopes_markers_states_and_forget(
    cluster_client: redis.asyncio.RedisCluster, store_factory: StoreFactory
) -> None:
    """On a cluster every v2 operation is one single-key script: scopes keep groups apart, the
    dead-letter marker is a duplicate but not a completion, forget keeps the fencing history, and the
    attempt counter follows releases."""
    group1 = store_factory(cluster_client, local_cache_size=0)
    group2 = group1.scoped(f"{group1.scope}/group-2 {{x}}")  # any text: hashed, no hash tag
    assert "{" not in group2.key("m")
    ids = [f"v2-{i}" for i in range(12)]
    assert len(await nodes_of(cluster_client, [group1.key(m) for m in ids])) == 3
    claims = await group1.claim_many(ids, 30.0)
    leases = [c.lease for c in claims if c.lease is not None]
    assert [c.attempt for c in claims] == [1] * 12
    assert [await group1.mark_dead_lettered(lease, 30.0) for lease in leases[:4]] == [True] * 4
    assert [await group1.release(lease, attempted=False) for lease in leases[4:8]] == [True] * 4
    assert await group1.complete_many(leases[8:], 60.0) == [True] * 4
    assert [await group1.state(m) for m in ids] == (
        [RecordState.DEAD_LETTERED] * 4 + [RecordState.RELEASED] * 4 + [RecordState.COMPLETED] * 4
    )
    assert not any([await group1.is_completed(m) for m in ids[:4]])
    again = await group1.claim_many(ids, 30.0)
    assert [r.status for r in again] == [DUPLICATE] * 4 + [NEW] * 4 + [DUPLICATE] * 4
    assert [r.attempt for r in again[4:8]] == [1] * 4  # the unattempted runs were taken back
    assert [await group1.forget(m) for m in ids[:4]] == [True] * 4
    forgotten = await group1.claim_many(ids[:4], 30.0)
    assert [r.lease.fencing_token for r in forgotten if r.lease is not None] == [2] * 4
    assert {r.status for r in await group2.claim_many(ids, 30.0)} == {NEW}
