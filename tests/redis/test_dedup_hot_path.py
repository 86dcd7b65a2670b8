"""RedisDedupStore's hot path: the single-op script calls and the store's own connection.

A claim, a completion, and a deferred completion riding along with the next claim are sent as plain
arguments and answer one integer; on a single node they go over one connection the store holds from
the client's pool, packed by the store itself. Every answer, the crash window and the lost-reply
handling must be the same as through the batch path.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions
from _proxy import ReplyDroppingProxy
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from _redis_server import RedisServer
from streamwarden import ClaimStatus
from streamwarden._dedup import RecordState
from streamwarden._redis._dedup import _SHA, RedisDedupStore, _pack

ClientFactory = Callable[..., redis.asyncio.Redis]
StoreFactory = Callable[..., RedisDedupStore]
LeaseExpiry = Callable[..., Awaitable[None]]

NEW, DUPLICATE, IN_PROGRESS, CONFLICT = (
    ClaimStatus.NEW,
    ClaimStatus.DUPLICATE,
    ClaimStatus.IN_PROGRESS,
    ClaimStatus.CONFLICT,
)


def in_use(client: redis.asyncio.Redis) -> int:
    """Connections of the client's pool taken out of it (redis-py internals, for the test only)."""
    pool: Any = client.connection_pool
    return len(pool._in_use_connections)


async def command_calls(client: redis.asyncio.Redis, command: str) -> int:
    stats: dict[str, Any] = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[ReplyDroppingProxy]:
    async with ReplyDroppingProxy(redis_server.port) as running:
        yield running


# --- the command bytes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("1", "sw:dedup:s:" + "a" * 64, "c", "3600000", "1f-0123456789ab-7", "120000", ""),
        ("2", "k1", "k2", "dc", "0", "o", "12", "3600000", "sha256:ab", "p", "1", "#ff"),
        ("1", "k", "*", "3600000", "c owner  1 \nd o 3 5 sha256:x\n"),
        ("0", "*", "1", ""),
    ],
)
def test_packed_command_is_what_redis_py_would_send(args: tuple[str, ...]) -> None:
    """The store's own packing gives byte for byte redis-py's ``pack_command`` of the same call."""
    assert _pack(args) == b"".join(Connection().pack_command("EVALSHA", _SHA, *args))


# --- answers of the single-op calls -----------------------------------------------------------------


@pytest.mark.parametrize("state", ["new", "same_fp", "other_fp", "no_fp_stored", "live", "expired"])
async def test_claim_with_a_deferred_completion_riding_along(
    redis_client: redis.asyncio.Redis,
    store_factory: StoreFactory,
    lease_expired: LeaseExpiry,
    state: str,
) -> None:
    """``complete previous + claim`` in one call answers every claim outcome and lands the completion."""
    store = store_factory(redis_client, defer_completions=True, flush_interval=60.0, local_cache_size=0)
    other = store_factory(redis_client, local_cache_size=0)
    reader = store_factory(redis_client, local_cache_size=0)
    if state in ("same_fp", "other_fp"):
        await other.mark_completed("target", 60.0, "sha256:one")
    elif state == "no_fp_stored":
        await other.mark_completed("target", 60.0)
    elif state == "live":
        assert (await other.claim("target", 30.0)).status is NEW
    elif state == "expired":
        assert (await other.claim("target", 0.02)).status is NEW
        await lease_expired(redis_client, other.key("target"))
    previous = (await store.claim("previous", 30.0)).lease
    assert previous is not None
    assert await store.complete(previous, 60.0) is True  # queued
    calls = await command_calls(redis_client, "evalsha")
    fingerprint = "sha256:two" if state == "other_fp" else "sha256:one"
    result = await store.claim("target", 30.0, fingerprint)
    assert await command_calls(redis_client, "evalsha") == calls + 1  # one call for both
    assert await reader.is_completed("previous")
    assert store.lost_completions == 0
    expected = {
        "new": NEW,
        "same_fp": DUPLICATE,
        "other_fp": CONFLICT,
        "no_fp_stored": DUPLICATE,
        "live": IN_PROGRESS,
        "expired": NEW,
    }[state]
    assert result.status is expected
    if state == "live":
        assert result.retry_after is not None
        assert 29.0 < result.retry_after <= 30.0
    if expected is NEW:
        assert result.lease is not None
        assert result.lease.fencing_token == (2 if state == "expired" else 1)
        assert result.attempt == (2 if state == "expired" else 1)  # the dead owner's run counts
        assert result.takeover is (state == "expired")
        assert store.takeovers == (1 if state == "expired" else 0)
        assert await store.complete(result.lease, 60.0) is True
        await store.flush()
        assert await reader.is_completed("target")


async def test_refused_ride_along_completion_is_counted_lost(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory, lease_expired: LeaseExpiry
) -> None:
    """A deferred completion refused inside the next claim's call is counted; the claim still answers."""
    slow = store_factory(redis_client, defer_completions=True, flush_interval=60.0)
    other = store_factory(redis_client)
    lease = (await slow.claim("late", 0.02)).lease
    assert lease is not None
    await lease_expired(redis_client, slow.key("late"))
    assert (await other.claim("late", 30.0)).status is NEW
    assert await slow.complete(lease, 60.0) is True  # queued
    assert (await slow.claim("next", 30.0)).status is NEW  # carries the stale completion
    assert slow.lost_completions == 1
    assert (await redis_client.hget(slow.key("late"), "s")) == b"p"  # still the new owner's lease


async def test_single_completion_is_owner_checked(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory, lease_expired: LeaseExpiry
) -> None:
    """Without deferral ``complete`` is one call: the owner's completion lands, a stale one is refused."""
    store = store_factory(redis_client)
    stale = (await store.claim("x", 0.02)).lease
    assert stale is not None
    await lease_expired(redis_client, store.key("x"))
    fresh = (await store.claim("x", 30.0)).lease
    assert fresh is not None
    assert fresh.fencing_token == 2
    assert await store.complete(stale, 60.0) is False
    assert await store.complete(fresh, 60.0, "sha256:f") is True
    assert await store.complete(fresh, 60.0, "sha256:f") is True  # idempotent for its owner
    record = await redis_client.hgetall(store.key("x"))
    assert record[b"s"] == b"c"
    assert record[b"p"] == b"sha256:f"
    assert 59_000 < await redis_client.pttl(store.key("x")) <= 60_000


@pytest.mark.parametrize("path", ["c", "dc", "batch"])
@pytest.mark.parametrize(
    ("stored_attempts", "expected_attempt"),
    [(5, 6), (70_000, 65_535)],
    ids=["attempts", "attempts-saturated"],
)
async def test_claim_reply_carries_big_fencing_tokens_and_attempts_exactly(
    redis_client: redis.asyncio.Redis,
    store_factory: StoreFactory,
    path: str,
    stored_attempts: int,
    expected_attempt: int,
) -> None:
    """Every claim path (``c``, ``dc``, a batch) packs the attempt counter under the fencing token in
    one reply: a token past 2^32 and the counter come back exact (the counter capped at 65535 in the
    reply, exact in the record), still one call per claim."""
    store = store_factory(
        redis_client, local_cache_size=0, defer_completions=(path == "dc"), flush_interval=60.0
    )
    fence = 2**32
    await redis_client.hset(store.key("big"), mapping={"s": "r", "f": fence, "a": stored_attempts})
    if path == "dc":
        previous = (await store.claim("previous", 30.0)).lease
        assert previous is not None
        assert await store.complete(previous, 60.0)  # queued: rides along with the next claim
    calls = await command_calls(redis_client, "evalsha")
    if path == "batch":
        (result,) = await store.claim_many(["big"], 30.0)
    else:
        result = await store.claim("big", 30.0)
    assert await command_calls(redis_client, "evalsha") == calls + 1
    assert result.status is NEW
    assert result.lease is not None
    assert result.lease.fencing_token == fence + 1
    assert result.attempt == expected_attempt
    assert int(await redis_client.hget(store.key("big"), "a")) == stored_attempts + 1
    if path == "dc":
        assert store.lost_completions == 0
        assert await store.state("previous") is RecordState.COMPLETED


# --- lost replies of the single-op calls ------------------------------------------------------------


async def test_lost_reply_of_a_claim_with_a_ride_along_completion(
    proxy: ReplyDroppingProxy, client_factory: ClientFactory, store_factory: StoreFactory
) -> None:
    """redis-py re-sends the lost call on the store's connection: the completion is idempotent, the
    claim is recognised as ours (NEW, the same fencing token), nothing is counted lost."""
    store = store_factory(
        client_factory(proxy.port, retry=Retry(NoBackoff(), 2)), defer_completions=True, flush_interval=60.0
    )
    first = (await store.claim("first", 30.0)).lease  # also loads the script
    assert first is not None
    assert await store.complete(first, 60.0) is True
    proxy.drop_reply_to(b"EVALSHA")
    result = await store.claim("second", 30.0)
    assert proxy.dropped == 1
    assert proxy.seen[b"EVALSHA"] == 2  # it really ran twice on the server
    assert result.status is NEW
    assert result.lease is not None
    assert result.lease.fencing_token == 1
    assert store.lost_completions == 0
    assert await store_factory(client_factory(proxy.port), local_cache_size=0).is_completed("first")


async def test_failed_call_keeps_the_completion_queued_and_the_claim_recognised(
    proxy: ReplyDroppingProxy, client_factory: ClientFactory, store_factory: StoreFactory
) -> None:
    """Without retries the lost call raises; the completion stays queued and the next claim of the id
    reuses its owner token: NEW at once, the same fencing token."""
    store = store_factory(client_factory(proxy.port), defer_completions=True, flush_interval=60.0)
    first = (await store.claim("first", 30.0)).lease
    assert first is not None
    assert await store.complete(first, 60.0) is True
    proxy.drop_reply_to(b"EVALSHA")
    with pytest.raises(redis.exceptions.ConnectionError):
        await store.claim("second", 30.0)
    assert [entry[0] for entry in store._pending] == ["first"]  # not known to have landed: queued again
    again = await store.claim("second", 30.0)  # sends the queued completion again
    assert again.status is NEW
    assert again.lease is not None
    assert again.lease.fencing_token == 1
    assert store.lost_completions == 0
    assert await store_factory(client_factory(proxy.port), local_cache_size=0).is_completed("first")


# --- the store's own connection ---------------------------------------------------------------------


async def test_store_holds_one_connection_and_gives_it_back(
    client_factory: ClientFactory, redis_server: RedisServer
) -> None:
    """Sequential calls reuse one connection of the pool; aclose() returns it; a later call takes one again."""
    client = client_factory(redis_server.port)
    store = RedisDedupStore(client, scope="own-conn", defer_completions=True)
    for i in range(20):
        lease = (await store.claim(f"m-{i}", 30.0)).lease
        assert lease is not None
        assert await store.complete(lease, 60.0) is True
    assert in_use(client) == 1
    await store.aclose()
    assert in_use(client) == 0
    assert (await store.claim("after-close", 30.0)).status is NEW
    assert in_use(client) == 1
    await store.aclose()
    assert in_use(client) == 0


async def test_concurrent_calls_use_the_pool_while_the_connection_is_busy(
    client_factory: ClientFactory, redis_server: RedisServer
) -> None:
    """Concurrent claims are not serialised on the store's connection: the rest go through the pool."""
    client = client_factory(redis_server.port)
    store = RedisDedupStore(client, scope="busy")
    results = await asyncio.gather(*(store.claim(f"c-{i}", 30.0) for i in range(20)))
    assert [r.status for r in results] == [NEW] * 20
    assert len({r.lease.owner for r in results if r.lease is not None}) == 20
    assert len(client.connection_pool._available_connections) >= 1
    await store.aclose()
    assert in_use(client) == 0


async def test_aclose_during_a_call_gives_the_connection_back_when_it_ends(
    client_factory: ClientFactory, redis_server: RedisServer
) -> None:
    store_client = client_factory(redis_server.port)
    store = RedisDedupStore(store_client, scope="close-busy")
    assert (await store.claim("warm", 30.0)).status is NEW
    task = asyncio.create_task(store.claim("in-flight", 30.0))
    await asyncio.sleep(0)  # the claim has been sent on the store's connection
    await store.aclose()
    assert in_use(store_client) == 1  # still reading the reply
    assert (await task).status is NEW
    assert in_use(store_client) == 0


@pytest.mark.parametrize("variant", ["pool", "single_connection_client"])
async def test_without_a_connection_of_its_own(
    client_factory: ClientFactory, redis_server: RedisServer, variant: str
) -> None:
    """``dedicated_connection=False``, or a client with one connection of its own: every call goes
    through the client."""
    if variant == "pool":
        client = client_factory(redis_server.port)
        store = RedisDedupStore(client, scope="no-own", dedicated_connection=False, defer_completions=True)
    else:
        client = client_factory(redis_server.port, single_connection_client=True)
        store = RedisDedupStore(client, scope="no-own-single", defer_completions=True)
    for i in range(5):
        lease = (await store.claim(f"m-{i}", 30.0)).lease
        assert lease is not None
        assert await store.complete(lease, 60.0) is True
        assert in_use(client) == (1 if variant == "single_connection_client" else 0)
    await store.aclose()
    reader = RedisDedupStore(client, scope=store.scope, local_cache_size=0, dedicated_connection=False)
    assert all([await reader.is_completed(f"m-{i}") for i in range(5)])


async def test_script_flushed_on_the_server_is_loaded_again(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """NOSCRIPT on the store's connection (SCRIPT FLUSH, a failover) falls back to EVAL once."""
    store = store_factory(redis_client, defer_completions=True, flush_interval=60.0)
    lease = (await store.claim("before", 30.0)).lease
    assert lease is not None
    assert await store.complete(lease, 60.0) is True
    await redis_client.script_flush()
    evals = await command_calls(redis_client, "eval")
    assert (await store.claim("after", 30.0)).status is NEW  # carries the completion too
    assert await command_calls(redis_client, "eval") == evals + 1
    await store.flush()
    assert store.lost_completions == 0
    assert await store_factory(redis_client, local_cache_size=0).is_completed("before")


async def test_non_ascii_prefix_is_sent_through_redis_py_encoding(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """A key prefix that is not ASCII is not packed by the store: the keys are the ones redis-py encodes."""
    store = store_factory(redis_client, key_prefix="dédup-ü", defer_completions=True, flush_interval=60.0)
    lease = (await store.claim("x", 30.0)).lease
    assert lease is not None
    assert await store.complete(lease, 60.0) is True
    assert (await store.claim("y", 30.0)).status is NEW
    assert await redis_client.hget(store.key("x"), "s") == b"c"
    assert await redis_client.hget(store.key("y"), "s") == b"p"


async def test_completions_deferred_while_a_batch_call_awaits_are_sent_later_not_settled_by_it(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """Two batches side by side on a deferring store: one's ``complete_many`` queues its completions while
    the other's ``claim_many`` awaits Redis with an empty queue. Those completions must not be taken
    for answered by that claim (it never sent them): every claim answers, no completion is reported
    lost, and every record ends completed."""
    store = store_factory(redis_client, defer_completions=True, flush_interval=60.0, local_cache_size=0)

    async def batch(k: int) -> None:
        claims = await store.claim_many([f"b{k}-{i}" for i in range(32)], 30)
        assert [c.status for c in claims] == [ClaimStatus.NEW] * 32
        assert (
            await store.complete_many([c.lease for c in claims if c.lease is not None], 3600) == [True] * 32
        )

    for k in range(0, 40, 2):
        await asyncio.gather(batch(k), batch(k + 1))
    await store.flush()
    assert store.lost_completions == 0
    for k in range(40):
        for i in range(0, 32, 7):
            assert await store.state(f"b{k}-{i}") is RecordState.COMPLETED


async def test_completions_deferred_while_a_group_commit_awaits_are_not_settled_by_it(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory, scope: str
) -> None:
    """The same race on the group commit (``complete_and_xack``): completions deferred by another batch
    while it awaits Redis are left for the next call, not taken as answered."""
    store = store_factory(redis_client, defer_completions=True, flush_interval=60.0, local_cache_size=0)
    stream = f"{scope}-stream"
    await redis_client.xgroup_create(stream, "g", id="0", mkstream=True)

    async def deferred(k: int) -> None:
        claims = await store.claim_many([f"d{k}-{i}" for i in range(16)], 30)
        assert (
            await store.complete_many([c.lease for c in claims if c.lease is not None], 3600) == [True] * 16
        )

    async def committed(k: int) -> None:
        claims = await store.claim_many([f"x{k}-{i}" for i in range(16)], 30)
        for i in range(16):
            await redis_client.xadd(stream, {"i": f"{k}-{i}"})
        entries = await redis_client.xreadgroup("g", "c", {stream: ">"}, count=16)
        ids = [entry_id.decode() for _name, rows in entries for entry_id, _fields in rows]
        leases = [c.lease for c in claims if c.lease is not None]
        answers = await store.complete_and_xack(
            leases, 3600, [None] * len(leases), stream=stream, group="g", entry_ids=ids
        )
        assert answers == [True] * 16

    for k in range(20):
        await asyncio.gather(committed(k), deferred(k))
    await store.flush()
    assert store.lost_completions == 0
    assert (await redis_client.xpending(stream, "g"))["pending"] == 0
    for k in range(20):
        for prefix in ("d", "x"):
            assert await store.state(f"{prefix}{k}-3") is RecordState.COMPLETED
