"""RedisDedupStore under faults: lost replies, a killed or paused server, deferred completions and crashes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions
from _proxy import ReplyDroppingProxy
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from _redis_server import RedisServer
from streamwarden import ClaimStatus, Outcome, ReliabilityLayer, ReliabilitySettings
from streamwarden import _names as n
from streamwarden._dedup import RecordState
from streamwarden._redis._dedup import RedisDedupStore

ClientFactory = Callable[..., redis.asyncio.Redis]
StoreFactory = Callable[..., RedisDedupStore]
LeaseExpiry = Callable[..., Awaitable[None]]

NEW, DUPLICATE, IN_PROGRESS = ClaimStatus.NEW, ClaimStatus.DUPLICATE, ClaimStatus.IN_PROGRESS


class Handler:
    """A processor that counts its runs per message id."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}

    async def __call__(self, message: dict[str, Any]) -> str:
        self.runs[message["id"]] = self.runs.get(message["id"], 0) + 1
        return "ok"


def make_layer(store: RedisDedupStore, **settings: Any) -> ReliabilityLayer:
    """A layer on the Redis dedup store (embedded DLQ and counters), no retries, no timeout; its
    records in the store's own scope (``dedup_scope``), so the test reads them where the layer writes."""
    settings.setdefault("max_retries", 0)
    settings.setdefault("processing_timeout", None)
    settings.setdefault("dedup_scope", store.scope)
    return ReliabilityLayer(None, ReliabilitySettings(**settings), dedup_store=store)


async def command_calls(client: redis.asyncio.Redis, command: str) -> int:
    """How often the server executed ``command`` (INFO commandstats)."""
    stats: dict[str, Any] = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


# --- lost replies ---------------------------------------------------------------------------------


@pytest.fixture
async def proxy(redis_server: RedisServer) -> Any:
    """A reply-dropping proxy in front of the session server."""
    async with ReplyDroppingProxy(redis_server.port) as running:
        yield running


async def _warm(store: RedisDedupStore) -> None:
    """Load the script (a first EVALSHA answers NOSCRIPT) so the dropped request is the real one."""
    await store.claim("warm-up", 1.0)


async def test_lost_claim_reply_is_recognised_as_own(
    proxy: ReplyDroppingProxy,
    redis_client: redis.asyncio.Redis,
    client_factory: ClientFactory,
    store_factory: StoreFactory,
) -> None:
    """A claim whose reply was lost and that redis-py re-sent answers NEW with the lease, not IN_PROGRESS."""
    store = store_factory(client_factory(proxy.port, retry=Retry(NoBackoff(), 2)))
    await _warm(store)
    proxy.drop_reply_to(b"EVALSHA")
    result = await store.claim("lost", 30.0)
    assert proxy.dropped == 1
    assert proxy.seen[b"EVALSHA"] == 2  # the claim really ran twice on the server
    assert result.status is NEW
    assert result.lease is not None
    record = await redis_client.hgetall(store.key("lost"))
    assert record[b"o"] == result.lease.owner.encode()
    assert int(record[b"f"]) == result.lease.fencing_token == 1
    assert await store.complete(result.lease, 60.0) is True


async def test_plain_set_nx_would_report_a_false_duplicate(
    proxy: ReplyDroppingProxy, redis_client: redis.asyncio.Redis, client_factory: ClientFactory
) -> None:
    """The bug the owner token fixes: a re-sent SET NX whose first reply was lost answers 'exists' to its own writer."""
    client = client_factory(proxy.port, retry=Retry(NoBackoff(), 2))
    proxy.drop_reply_to(b"naive-key")
    assert await client.set("naive-key", "me", nx=True, px=30_000) is None
    assert await redis_client.get("naive-key") == b"me"


@pytest.mark.parametrize(
    "operation", ["claim_many", "complete", "release", "release_unattempted", "mark_dead_lettered", "forget"]
)
async def test_lost_reply_of_other_operations_is_idempotent(
    proxy: ReplyDroppingProxy,
    redis_client: redis.asyncio.Redis,
    client_factory: ClientFactory,
    store_factory: StoreFactory,
    operation: str,
) -> None:
    """Batch claims, completions, releases, dead-letter marks and forgets re-sent after a lost reply
    still report success for their owner, and change the record once (a release of a lease whose
    handler never ran takes back one attempt, not two)."""
    store = store_factory(client_factory(proxy.port, retry=Retry(NoBackoff(), 2)), local_cache_size=0)
    await _warm(store)
    if operation == "claim_many":
        proxy.drop_reply_to(b"EVALSHA")
        results = await store.claim_many(["b-1", "b-2", "b-1"], 30.0)
        assert proxy.seen[b"EVALSHA"] == 2  # the batch really ran twice on the server
        assert [r.status for r in results] == [NEW, NEW, IN_PROGRESS]
        assert [r.attempt for r in results] == [1, 1, 0]
        assert proxy.dropped == 1
        return
    first = (await store.claim("op", 30.0)).lease
    assert first is not None
    assert await store.release(first)
    lease = (await store.claim("op", 30.0)).lease  # attempt 2
    assert lease is not None
    proxy.drop_reply_to(b"EVALSHA")
    if operation == "complete":
        assert await store.complete(lease, 60.0) is True
    elif operation == "release":
        assert await store.release(lease) is True
    elif operation == "release_unattempted":
        assert await store.release(lease, attempted=False) is True
    elif operation == "mark_dead_lettered":
        assert await store.mark_dead_lettered(lease, 30.0) is True
    else:
        assert await store.forget("op") is True
    assert proxy.seen[b"EVALSHA"] == 2  # the call really ran twice on the server
    assert proxy.dropped == 1
    expected = {
        "complete": (RecordState.COMPLETED, b"2"),
        "release": (RecordState.RELEASED, b"2"),
        "release_unattempted": (RecordState.RELEASED, b"1"),  # taken back once, not twice
        "mark_dead_lettered": (RecordState.DEAD_LETTERED, b"2"),
        "forget": (RecordState.RELEASED, b"0"),
    }[operation]
    assert (await store.state("op"), await redis_client.hget(store.key("op"), "a")) == expected


async def test_failed_claim_without_retry_is_recognised_on_the_next_claim(
    proxy: ReplyDroppingProxy, client_factory: ClientFactory, store_factory: StoreFactory
) -> None:
    """Without client retries the lost claim raises; the next claim of that id reuses its owner token and gets NEW at once."""
    store = store_factory(client_factory(proxy.port))  # Retry(NoBackoff(), 0)
    await _warm(store)
    proxy.drop_reply_to(b"EVALSHA")
    with pytest.raises(redis.exceptions.ConnectionError):
        await store.claim("no-retry", 30.0)
    again = await store.claim("no-retry", 30.0)
    assert again.status is NEW  # not IN_PROGRESS until the lost claim's lease expires
    assert again.lease is not None
    assert again.lease.fencing_token == 1  # the same claim, not a second one
    assert (await store_factory(client_factory(proxy.port)).claim("no-retry", 30.0)).status is IN_PROGRESS


# --- a killed or paused server, through the layer --------------------------------------------------


@pytest.mark.parametrize("fault", ["kill", "pause"])
@pytest.mark.parametrize("mode", ["fail_closed", "fail_open"])
async def test_store_down_through_the_layer(
    redis_server_per_test: RedisServer, client_factory: ClientFactory, fault: str, mode: str
) -> None:
    """With Redis killed or paused, fail-closed defers the message without running it; fail-open runs it; both count the dedup error."""
    client = client_factory(redis_server_per_test.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    layer = make_layer(RedisDedupStore(client), dedup_failure_mode=mode)
    handler = Handler()
    assert (await layer.process({"id": "before"}, handler)).outcome is Outcome.PROCESSED
    if fault == "kill":
        redis_server_per_test.kill()
    else:
        redis_server_per_test.pause()
    try:
        result = await layer.process({"id": "during"}, handler)
    finally:
        if fault == "pause":
            redis_server_per_test.resume()
    assert layer.metrics_collector.counts[n.COUNTER_DEDUP_ERRORS] == 1
    if mode == "fail_closed":
        assert result.outcome is Outcome.DEFERRED
        assert not result.should_ack
        assert "during" not in handler.runs
    else:
        assert result.outcome is Outcome.PROCESSED
        assert handler.runs["during"] == 1


async def test_kill_mid_stream_and_restart_loses_nothing_and_runs_nothing_twice(
    redis_server_per_test: RedisServer, client_factory: ClientFactory
) -> None:
    """Fail-closed across a Redis kill and restart: unacknowledged messages are redelivered and every id runs exactly once."""
    client = client_factory(redis_server_per_test.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    layer = make_layer(RedisDedupStore(client))
    handler = Handler()
    pending = [{"id": f"m-{i}"} for i in range(20)]
    acked: list[str] = []
    for round_number in range(3):
        redelivered = []
        for index, message in enumerate(pending):
            if round_number == 0 and index == 10:
                redis_server_per_test.kill()
            result = await layer.process(message, handler)
            if result.should_ack:
                acked.append(message["id"])
            else:
                redelivered.append(message)
        pending = redelivered
        if round_number == 0:
            assert len(pending) == 10
            redis_server_per_test.restart()
    assert pending == []
    assert sorted(acked) == sorted(f"m-{i}" for i in range(20))
    assert handler.runs == {f"m-{i}": 1 for i in range(20)}


# --- deferred completions ---------------------------------------------------------------------------


async def test_deferred_completion_rides_along_with_the_next_claim(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """With defer_completions a message costs one script round trip: each completion is sent inside the next claim."""
    store = store_factory(redis_client, defer_completions=True, flush_interval=60.0)
    layer = make_layer(store)
    handler = Handler()
    await layer.process({"id": "m-0"}, handler)  # loads the script
    before = await command_calls(redis_client, "evalsha")
    for i in range(1, 51):
        assert (await layer.process({"id": f"m-{i}"}, handler)).outcome is Outcome.PROCESSED
    assert await command_calls(redis_client, "evalsha") == before + 50
    await store.flush()
    reader = store_factory(redis_client, local_cache_size=0)
    assert all([await reader.is_completed(f"m-{i}") for i in range(51)])


async def test_deferred_completion_is_flushed_in_the_background(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """A deferred completion with no claim after it reaches Redis by itself within the flush interval."""
    store = store_factory(redis_client, defer_completions=True, flush_interval=0.005)
    lease = (await store.claim("idle", 30.0)).lease
    assert lease is not None
    assert await store.complete(lease, 60.0) is True
    assert (await store.claim("idle", 30.0)).status is DUPLICATE  # this process knows at once
    reader = store_factory(redis_client, local_cache_size=0)
    completed = asyncio.Event()

    async def poll() -> None:
        while not await reader.is_completed("idle"):
            pass
        completed.set()

    await asyncio.wait_for(poll(), timeout=5.0)
    assert completed.is_set()


async def test_deferred_completions_are_flushed_on_close_and_at_the_batch_limit(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """aclose() sends queued completions; reaching max_deferred sends them at once."""
    store = RedisDedupStore(
        redis_client, scope="close", defer_completions=True, flush_interval=60.0, max_deferred=3
    )
    reader = store_factory(redis_client, scope="close", local_cache_size=0)
    claims = await store.claim_many(["a", "b", "c", "d"], 30.0)
    leases = [c.lease for c in claims if c.lease is not None]
    assert await store.complete_many(leases[:3], 60.0) == [True] * 3  # hits max_deferred: flushed
    assert [await reader.is_completed(m) for m in "abcd"] == [True, True, True, False]
    assert await store.complete(leases[3], 60.0) is True
    assert not await reader.is_completed("d")
    await store.aclose()
    assert await reader.is_completed("d")


async def test_crash_with_deferred_completion_reruns_after_the_lease_and_is_counted(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory, lease_expired: LeaseExpiry
) -> None:
    """The documented window: a store dropped before its flush leaves the id leased; after the lease a redelivery runs it again, counted as a takeover."""
    crashed = RedisDedupStore(redis_client, scope="crash", defer_completions=True, flush_interval=60.0)
    handler = Handler()
    first = make_layer(crashed, dedup_lease=0.3)
    assert (await first.process({"id": "x"}, handler)).outcome is Outcome.PROCESSED
    del first, crashed  # the process dies: no flush, no aclose
    survivor = store_factory(redis_client, scope="crash")
    second = make_layer(survivor, dedup_lease=30.0)
    redelivery = await second.process({"id": "x"}, handler)
    assert redelivery.outcome is Outcome.IN_PROGRESS  # not acknowledged: redelivered later
    await lease_expired(redis_client, survivor.key("x"))
    assert (await second.process({"id": "x"}, handler)).outcome is Outcome.PROCESSED
    assert handler.runs == {"x": 2}
    assert survivor.takeovers == 1
    assert second.metrics_collector.counts[n.COUNTER_TAKEOVERS] == 1  # the possible duplicate is counted
    assert (await second.process({"id": "x"}, handler)).outcome is Outcome.DUPLICATE


async def test_deferred_completion_of_a_taken_over_lease_is_counted_lost(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory, lease_expired: LeaseExpiry
) -> None:
    """A deferred completion that arrives after another owner took the lease over is refused by Redis and counted."""
    slow = store_factory(redis_client, defer_completions=True, flush_interval=60.0)
    other = store_factory(redis_client)
    lease = (await slow.claim("late", 0.02)).lease
    assert lease is not None
    await lease_expired(redis_client, slow.key("late"))
    assert (await other.claim("late", 30.0)).status is NEW
    assert await slow.complete(lease, 60.0) is True  # queued
    await slow.flush()
    assert slow.lost_completions == 1
    assert (await redis_client.hget(slow.key("late"), "s")) == b"p"  # still the new owner's lease
