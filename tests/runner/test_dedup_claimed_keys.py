"""The Redis dedup store hashes a claimed id once: its completion (or release, or dead-letter mark)
reuses the record key the claim computed. What the runner's batch path relies on, on a real Redis.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio

from streamwarden._dedup import ClaimStatus, RecordState
from streamwarden._redis import _dedup
from streamwarden._redis._dedup import RedisDedupStore


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    c = redis.asyncio.Redis.from_url(redis_url, socket_timeout=5)
    yield c
    await c.aclose()


@pytest.fixture
def digests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every id the store hashes into a record key, in order."""
    seen: list[str] = []
    real = _dedup._id_digest

    def counting(message_id: str) -> str:
        seen.append(message_id)
        return real(message_id)

    monkeypatch.setattr(_dedup, "_id_digest", counting)
    return seen


def new_store(client: redis.asyncio.Redis, **options: Any) -> RedisDedupStore:
    return RedisDedupStore(client, key_prefix=f"t{uuid.uuid4().hex[:8]}", **options)


async def test_a_batch_completion_reuses_the_keys_of_its_claims(
    client: redis.asyncio.Redis, digests: list[str]
) -> None:
    """claim_many then complete_many: each id hashed once, every record completed in Redis."""
    store = new_store(client)
    ids = [f"m{i}" for i in range(5)]
    claims = await store.claim_many(ids, 30.0)
    assert digests == ids
    assert await store.complete_many([c.lease for c in claims if c.lease is not None], 60.0) == [True] * 5
    assert digests == ids
    assert [await store.state(i) for i in ids] == [RecordState.COMPLETED] * 5
    await store.aclose()


@pytest.mark.parametrize("defer", [False, True], ids=["sent", "deferred"])
async def test_a_single_claim_and_completion_hash_the_id_once(
    client: redis.asyncio.Redis, digests: list[str], defer: bool
) -> None:
    """claim then complete (also with deferred completions): one hash, the record completed."""
    store = new_store(client, defer_completions=defer)
    claim = await store.claim("one", 30.0)
    assert claim.status is ClaimStatus.NEW
    assert claim.lease is not None
    assert await store.complete(claim.lease, 60.0)
    await store.flush()
    assert digests == ["one"]
    assert await store.state("one") is RecordState.COMPLETED
    await store.aclose()


async def test_release_and_dead_letter_mark_reuse_the_key_and_let_it_go(
    client: redis.asyncio.Redis, digests: list[str]
) -> None:
    """A release or a dead-letter mark reuses the claim's key; the next claim hashes the id again."""
    store = new_store(client)
    first, second = await store.claim_many(["r", "d"], 30.0)
    assert first.lease is not None
    assert second.lease is not None
    assert await store.release(first.lease, attempted=False)
    assert await store.mark_dead_lettered(second.lease, 5.0)
    assert digests == ["r", "d"]
    assert (await store.claim("r", 30.0)).status is ClaimStatus.NEW
    assert digests == ["r", "d", "r"]
    await store.aclose()


async def test_kept_keys_are_bounded_and_completions_past_the_bound_still_land(
    client: redis.asyncio.Redis, digests: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """More outstanding leases than the bound: the kept keys are dropped (never more than the bound
    plus one batch), and those completions compute their keys again and still complete the records."""
    monkeypatch.setattr(_dedup, "_MAX_CLAIMED_KEYS", 3)
    store = new_store(client)
    ids = [f"b{i}" for i in range(8)]
    leases = []
    for start in range(0, 8, 2):
        claims = await store.claim_many(ids[start : start + 2], 30.0)
        leases += [c.lease for c in claims if c.lease is not None]
        assert len(store._claimed) <= 3
    assert await store.complete_many(leases, 60.0) == [True] * 8
    assert len(digests) > len(ids)  # some keys were computed again
    assert [await store.state(i) for i in ids] == [RecordState.COMPLETED] * 8
    assert not store._claimed
    await store.aclose()


async def test_each_scope_completes_in_its_own_records(client: redis.asyncio.Redis) -> None:
    """The same id claimed in two scopes: each completion lands in its own scope's record."""
    root = new_store(client, scope="one")
    other = root.scoped("two")
    a = await root.claim("same", 30.0)
    b = await other.claim("same", 30.0)
    assert a.lease is not None
    assert b.lease is not None
    assert await other.complete(b.lease, 60.0)
    assert await other.state("same") is RecordState.COMPLETED
    assert await root.state("same") is RecordState.IN_PROGRESS
    assert await root.complete(a.lease, 60.0)
    assert await root.state("same") is RecordState.COMPLETED
    await root.aclose()
