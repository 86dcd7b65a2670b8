"""RedisDedupStore against a real redis-server: the DedupStore contract, leases, fencing, keys, cache."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions

from _redis_server import RedisServer
from _support import Clock
from streamwarden import ClaimStatus, ConfigurationError, DedupStore
from streamwarden._dedup import LocalDedupStore, RecordState
from streamwarden._redis._dedup import RedisDedupStore

ClientFactory = Callable[..., redis.asyncio.Redis]
StoreFactory = Callable[..., RedisDedupStore]
LeaseExpiry = Callable[..., Awaitable[None]]

NEW, DUPLICATE, IN_PROGRESS, CONFLICT = (
    ClaimStatus.NEW,
    ClaimStatus.DUPLICATE,
    ClaimStatus.IN_PROGRESS,
    ClaimStatus.CONFLICT,
)
CACHE = pytest.mark.parametrize("cache_size", [0, 10_000], ids=["redis", "local-cache"])


async def command_calls(client: redis.asyncio.Redis, command: str) -> int:
    """How often the server executed ``command`` (INFO commandstats)."""
    stats: dict[str, Any] = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def round_trips(client: redis.asyncio.Redis) -> int:
    """Script and key commands the dedup store may send."""
    total = 0
    for command in ("evalsha", "eval", "hget", "del"):
        total += await command_calls(client, command)
    return total


def test_store_satisfies_the_protocol_but_is_not_local(redis_client: redis.asyncio.Redis) -> None:
    """RedisDedupStore is a DedupStore and, doing I/O, never offers the synchronous LocalDedupStore calls."""
    store = RedisDedupStore(redis_client)
    assert isinstance(store, DedupStore)
    assert not isinstance(store, LocalDedupStore)


@CACHE
async def test_claim_answers_new_then_in_progress_then_duplicate(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory, cache_size: int
) -> None:
    """A first claim is NEW, a second owner's is IN_PROGRESS, and after completion every claim is DUPLICATE."""
    mine, other = store_factory(redis_client, local_cache_size=cache_size), store_factory(redis_client)
    first = await mine.claim("m-1", 30.0)
    assert first.status is NEW
    assert first.lease is not None
    assert first.lease.message_id == "m-1"
    assert first.lease.fencing_token == 1
    busy = await other.claim("m-1", 30.0)
    assert busy.status is IN_PROGRESS
    assert busy.lease is None
    assert busy.retry_after is not None
    assert 0 < busy.retry_after <= 30.0
    assert await mine.complete(first.lease, 60.0) is True
    assert (await other.claim("m-1", 30.0)).status is DUPLICATE
    assert (await mine.claim("m-1", 30.0)).status is DUPLICATE
    assert await mine.is_completed("m-1")
    assert await other.is_completed("m-1")


async def test_record_layout_and_ttls(redis_client: redis.asyncio.Redis, store_factory: StoreFactory) -> None:
    """One hash per id at prefix:dedup:scope:sha256(id); a lease outlives itself by fence_retention, a completion lives ttl."""
    store = store_factory(redis_client, key_prefix="svc", fence_retention=100.0)
    key = f"svc:dedup:{store.scope}:" + hashlib.sha256(b"order-7").hexdigest()
    assert store.key("order-7") == key
    claim = await store.claim("order-7", 10.0)
    assert claim.lease is not None
    record = await redis_client.hgetall(key)
    assert record[b"s"] == b"p"
    assert record[b"o"] == claim.lease.owner.encode()
    assert record[b"f"] == b"1"
    assert 100_000 < await redis_client.pttl(key) <= 110_000
    assert await store.complete(claim.lease, 50.0, "sha256:abc")
    record = await redis_client.hgetall(key)
    assert record[b"s"] == b"c"
    assert record[b"p"] == b"sha256:abc"
    assert 40_000 < await redis_client.pttl(key) <= 50_000


async def test_fifty_concurrent_workers_exactly_one_new(
    redis_url: str,
    redis_client: redis.asyncio.Redis,
    client_factory: ClientFactory,
    store_factory: StoreFactory,
) -> None:
    """50 workers, each with its own connection, claim one id at once: exactly one NEW; after completion all DUPLICATE."""
    workers = [store_factory(client_factory(redis_url)) for _ in range(50)]
    first = await asyncio.gather(*(w.claim("hot-id", 30.0) for w in workers))
    statuses = [r.status for r in first]
    assert statuses.count(NEW) == 1
    assert statuses.count(IN_PROGRESS) == 49
    winner_index = statuses.index(NEW)
    lease = first[winner_index].lease
    assert lease is not None
    assert await workers[winner_index].complete(lease, 60.0)
    again = await asyncio.gather(*(w.claim("hot-id", 30.0) for w in workers))
    assert {r.status for r in again} == {DUPLICATE}


async def test_stale_owner_cannot_complete_release_or_extend(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory, lease_expired: LeaseExpiry
) -> None:
    """After a lease expired and another owner took over, the stale owner's complete/release/extend fail; the new fencing token is greater."""
    stale_store, new_store = store_factory(redis_client), store_factory(redis_client)
    stale = (await stale_store.claim("job", 0.02)).lease
    assert stale is not None
    await lease_expired(redis_client, stale_store.key("job"))
    takeover = await new_store.claim("job", 30.0)
    assert takeover.status is NEW
    assert takeover.lease is not None
    assert takeover.lease.fencing_token > stale.fencing_token
    assert takeover.takeover is True
    assert new_store.takeovers == 1
    assert await stale_store.complete(stale, 60.0) is False
    assert await stale_store.release(stale) is False
    assert await stale_store.extend(stale, 30.0) is None
    record = await redis_client.hgetall(new_store.key("job"))
    assert record[b"s"] == b"p"
    assert record[b"o"] == takeover.lease.owner.encode()
    assert await new_store.complete(takeover.lease, 60.0) is True
    assert (await stale_store.claim("job", 30.0)).status is DUPLICATE


async def test_fencing_token_increases_across_release_and_takeovers(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory, lease_expired: LeaseExpiry
) -> None:
    """Each claim of the same id gets a greater fencing token: after a release and after an expiry takeover."""
    store = store_factory(redis_client)
    tokens = []
    lease = (await store.claim("f", 30.0)).lease
    assert lease is not None
    tokens.append(lease.fencing_token)
    assert await store.release(lease) is True
    lease = (await store.claim("f", 0.02)).lease
    assert lease is not None
    tokens.append(lease.fencing_token)
    await lease_expired(redis_client, store.key("f"))
    lease = (await store.claim("f", 30.0)).lease
    assert lease is not None
    tokens.append(lease.fencing_token)
    assert tokens == [1, 2, 3]
    assert store.takeovers == 1  # a release is not a takeover; the expiry is


async def test_expired_lease_not_taken_over_still_completes(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory, lease_expired: LeaseExpiry
) -> None:
    """A lease that ran out while no one else claimed is still the owner's: completing it records the effect."""
    store = store_factory(redis_client)
    lease = (await store.claim("slow", 0.02)).lease
    assert lease is not None
    await lease_expired(redis_client, store.key("slow"))
    assert await store.complete(lease, 60.0) is True
    assert (await store_factory(redis_client).claim("slow", 30.0)).status is DUPLICATE


async def test_extend_keeps_a_live_lease(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """extend() moves the lease deadline forward and returns the renewed lease with the same fencing token."""
    store, other = store_factory(redis_client), store_factory(redis_client)
    lease = (await store.claim("long", 0.5)).lease
    assert lease is not None
    renewed = await store.extend(lease, 60.0)
    assert renewed is not None
    assert renewed.fencing_token == lease.fencing_token
    assert renewed.expires_at > lease.expires_at
    seconds, micros = await redis_client.time()
    deadline = int(await redis_client.hget(store.key("long"), "e"))
    assert deadline - (seconds * 1000 + micros // 1000) > 50_000
    busy = await other.claim("long", 30.0)
    assert busy.status is IN_PROGRESS
    assert busy.retry_after is not None
    assert busy.retry_after > 50


async def test_release_lets_the_next_owner_in_at_once(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """A released claim can be claimed again immediately by another owner (no wait for the lease)."""
    store, other = store_factory(redis_client), store_factory(redis_client)
    lease = (await store.claim("r", 30.0)).lease
    assert lease is not None
    assert await store.release(lease) is True
    again = await other.claim("r", 30.0)
    assert again.status is NEW
    assert again.lease is not None
    assert again.lease.fencing_token == 2
    assert await store.complete(lease, 60.0) is False


@CACHE
@pytest.mark.parametrize(
    ("stored", "given", "expected"),
    [
        ("sha256:a", "sha256:a", DUPLICATE),
        ("sha256:a", "sha256:b", CONFLICT),
        ("sha256:a", None, DUPLICATE),
        (None, "sha256:b", DUPLICATE),
    ],
    ids=["same-payload", "different-payload", "no-fingerprint-given", "none-stored"],
)
async def test_fingerprint_conflict(
    redis_client: redis.asyncio.Redis,
    store_factory: StoreFactory,
    cache_size: int,
    stored: str | None,
    given: str | None,
    expected: ClaimStatus,
) -> None:
    """A completed id claimed with a different payload fingerprint is CONFLICT; same, none given or none stored is DUPLICATE."""
    store = store_factory(redis_client, local_cache_size=cache_size)
    lease = (await store.claim("p", 30.0, stored)).lease
    assert lease is not None
    assert await store.complete(lease, 60.0, stored)
    assert (await store.claim("p", 30.0, given)).status is expected
    assert (await store_factory(redis_client, local_cache_size=0).claim("p", 30.0, given)).status is expected


async def test_cache_learns_fingerprints_only_when_redis_compared_them(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """A duplicate learned without a fingerprint does not let the cache answer a later claim with one: Redis still flags the conflict."""
    writer, reader = store_factory(redis_client), store_factory(redis_client)
    lease = (await writer.claim("fp", 30.0, "sha256:a")).lease
    assert lease is not None
    await writer.complete(lease, 60.0, "sha256:a")
    assert (await reader.claim("fp", 30.0)).status is DUPLICATE  # cached, fingerprint unknown
    assert (await reader.claim("fp", 30.0, "sha256:b")).status is CONFLICT
    assert (await reader.claim("fp", 30.0, "sha256:a")).status is DUPLICATE


async def test_mark_completed_is_completed_and_forget(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """mark_completed records an id without a claim (cutting off any lease); forget makes it claimable
    again (a released record, local cache included) and reports whether a record existed."""
    store = store_factory(redis_client)
    lease = (await store.claim("k", 30.0)).lease
    assert lease is not None
    await store.mark_completed("k", 60.0)
    assert await store.is_completed("k")
    assert await store.complete(lease, 60.0) is False  # the mark cut the lease off
    assert (await store.claim("k", 30.0)).status is DUPLICATE  # answered by the local cache
    assert await store.forget("k") is True
    assert not await store.is_completed("k")
    assert await store.state("k") is RecordState.RELEASED
    assert await store.forget("k") is True  # the released record is still a record
    assert await store.forget("never-seen") is False
    assert await redis_client.exists(store.key("never-seen")) == 0  # forget creates nothing
    again = await store.claim("k", 30.0)
    assert again.status is NEW
    assert again.lease is not None
    assert again.lease.fencing_token == 2  # the mark kept the first claim's token


HOSTILE_IDS = {
    "empty": "",
    "one-megabyte": "x" * 1_000_000,
    "colons": "a:b:c",
    "colon-prefix": ":a",
    "hash-tag": "{user}",
    "empty-hash-tag": "{}",
    "braces-swapped": "a}{b",
    "non-utf8": bytes(range(128, 256)).decode("utf-8", "surrogateescape"),
    "lone-surrogate": "\ud800",
    "lone-surrogate-bytes": b"\xed\xa0\x80".decode("utf-8", "surrogateescape"),
    "nul": "a\x00b",
    "emoji": "\U0001f600",
}


async def test_hostile_ids_map_to_distinct_fixed_length_keys(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """Empty, 1 MB, ':'/'{}' and non-UTF-8 ids get distinct keys of one length, no hash tag, and round-trip claim/complete."""
    store = store_factory(redis_client, local_cache_size=0)
    keys = {name: store.key(mid) for name, mid in HOSTILE_IDS.items()}
    assert len(set(keys.values())) == len(keys)
    assert len({len(k) for k in keys.values()}) == 1
    assert not any("{" in k or "}" in k for k in keys.values())
    raw = bytes(range(128, 256))
    assert keys["non-utf8"].endswith(hashlib.sha256(raw).hexdigest())  # the id's own bytes are hashed
    for mid in HOSTILE_IDS.values():
        claim = await store.claim(mid, 30.0)
        assert claim.status is NEW
        assert claim.lease is not None
        assert claim.lease.message_id == mid
        assert await store.complete(claim.lease, 60.0)
    for mid in HOSTILE_IDS.values():
        assert (await store.claim(mid, 30.0)).status is DUPLICATE
        assert await store.is_completed(mid)
    assert await redis_client.dbsize() == len(HOSTILE_IDS)


@pytest.mark.parametrize(
    "bad", ["{tag}", "a}", "", "x{"], ids=["hash-tag", "close-brace", "empty", "open-brace"]
)
def test_key_prefix_without_hash_tags(redis_client: redis.asyncio.Redis, bad: str) -> None:
    """A key_prefix that is empty or holds '{' / '}' is a ConfigurationError (it would pin all records to one slot)."""
    with pytest.raises(ConfigurationError):
        RedisDedupStore(redis_client, key_prefix=bad)


@pytest.mark.parametrize(
    "scope",
    ["{tag}", "a}", "", "orders/group 1", "ü", "x" * 300, "\ud800", "orders:g-1.v2"],
    ids=["hash-tag", "close-brace", "empty", "slash-space", "non-ascii", "long", "lone-surrogate", "safe"],
)
async def test_any_string_is_a_scope(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory, scope: str
) -> None:
    """Any scope works: a short printable one appears in the key as it is, any other is hashed, so keys
    stay printable, bounded and free of hash tags."""
    store = store_factory(redis_client, scope=scope)
    key = store.key("m")
    assert store.scope == scope
    middle = key.removeprefix("streamwarden:dedup:").rsplit(":", 1)[0]
    if scope == "orders:g-1.v2":
        assert middle == scope
    else:
        assert middle.startswith("#")
        assert len(middle) == 65
    assert "{" not in key
    assert "}" not in key
    lease = (await store.claim("m", 30.0)).lease
    assert lease is not None
    assert await store.complete(lease, 60.0)
    assert await redis_client.hget(key, "s") == b"c"


async def test_claim_many_mixed_answers_in_order(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """A batch answers new / duplicate / in_progress / conflict per id in order, and an id repeated in it is IN_PROGRESS after its first claim."""
    store, other = store_factory(redis_client, local_cache_size=0), store_factory(redis_client)
    done = (await other.claim("done", 30.0, "sha256:a")).lease
    assert done is not None
    await other.complete(done, 60.0, "sha256:a")
    await other.claim("held", 30.0)
    ids = ["new-1", "done", "held", "new-1", "new-2", "done"]
    fps = [None, "sha256:a", None, None, None, "sha256:b"]
    before = await command_calls(redis_client, "evalsha")
    results = await store.claim_many(ids, 30.0, fps)
    assert await command_calls(redis_client, "evalsha") == before + 1  # one round trip
    assert [r.status for r in results] == [NEW, DUPLICATE, IN_PROGRESS, IN_PROGRESS, NEW, CONFLICT]
    leases = [r.lease for r in results if r.lease is not None]
    assert [lease.message_id for lease in leases] == ["new-1", "new-2"]
    assert len({lease.owner for lease in leases}) == 2
    assert await store.complete_many(leases, 60.0) == [True, True]
    assert [r.status for r in await store.claim_many(["new-1", "new-2"], 30.0)] == [DUPLICATE, DUPLICATE]
    assert await store.claim_many([], 30.0) == []


async def test_claim_many_rejects_mismatched_fingerprints(store: RedisDedupStore) -> None:
    """claim_many with a fingerprint list of another length is a ValueError, before any I/O."""
    with pytest.raises(ValueError, match="fingerprints"):
        await store.claim_many(["a", "b"], 30.0, ["sha256:a"])


async def test_local_cache_answers_hot_duplicates_without_redis(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """Claims of a recently completed id (also with a conflicting fingerprint) and is_completed skip Redis entirely."""
    store = store_factory(redis_client)
    lease = (await store.claim("hot", 30.0, "sha256:a")).lease
    assert lease is not None
    await store.complete(lease, 60.0, "sha256:a")
    before = await round_trips(redis_client)
    for _ in range(100):
        assert (await store.claim("hot", 30.0)).status is DUPLICATE
    assert (await store.claim("hot", 30.0, "sha256:b")).status is CONFLICT
    assert [r.status for r in await store.claim_many(["hot", "hot"], 30.0)] == [DUPLICATE, DUPLICATE]
    assert await store.is_completed("hot")
    assert await round_trips(redis_client) == before


async def test_local_cache_is_ttl_aware_and_bounded(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """A cache entry is dropped when the record's TTL has passed on the store clock, and the LRU keeps at most local_cache_size ids."""
    clock = Clock()  # for the local cache; leases run on the server's clock
    store = store_factory(redis_client, local_cache_size=2, clock=clock)
    for mid in ("a", "b", "c"):
        lease = (await store.claim(mid, 30.0)).lease
        assert lease is not None
        await store.complete(lease, 60.0)
    before = await round_trips(redis_client)
    assert (await store.claim("c", 30.0)).status is DUPLICATE
    assert await round_trips(redis_client) == before  # cached
    assert (await store.claim("a", 30.0)).status is DUPLICATE
    assert await round_trips(redis_client) == before + 1  # evicted from the LRU: asked Redis
    await redis_client.delete(store.key("c"))  # as if the record's TTL had run out ...
    clock.now += 61.0  # ... which the cache sees on its clock
    assert (await store.claim("c", 30.0)).status is NEW  # never a stale DUPLICATE past the TTL


@pytest.mark.parametrize(
    ("policy", "unsafe"),
    [("noeviction", False), ("allkeys-lru", True), ("allkeys-random", True), ("volatile-lru", True)],
    ids=["noeviction", "allkeys-lru", "allkeys-random", "volatile-lru"],
)
async def test_eviction_policy_check(
    redis_server_factory: Any,
    client_factory: ClientFactory,
    caplog: pytest.LogCaptureFixture,
    policy: str,
    unsafe: bool,
) -> None:
    """An evicting maxmemory-policy is logged and returned, and refused with refuse=True; noeviction passes."""
    server: RedisServer = redis_server_factory(["--maxmemory-policy", policy])
    store = RedisDedupStore(client_factory(server.port))
    with caplog.at_level(logging.WARNING, logger="streamwarden"):
        message = await store.check_eviction_policy()
    if not unsafe:
        assert message is None
        assert await store.check_eviction_policy(refuse=True) is None
        return
    assert message is not None
    assert policy in message
    assert any(policy in record.getMessage() for record in caplog.records)
    with pytest.raises(ConfigurationError, match=policy):
        await store.check_eviction_policy(refuse=True)


async def test_eviction_policy_check_without_permission(
    redis_server_factory: Any, client_factory: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A user without CONFIG permission (NOPERM) skips the check with a log line and gets None, even with refuse=True."""
    server: RedisServer = redis_server_factory(
        [
            "--maxmemory-policy",
            "allkeys-lru",
            "--user",
            "app",
            "on",
            ">secret",
            "~*",
            "&*",
            "+@all",
            "-config",
        ]
    )
    client = client_factory(server.port, username="app", password="secret")
    store = RedisDedupStore(client)
    with pytest.raises(redis.exceptions.NoPermissionError):
        await client.config_get("maxmemory-policy")
    with caplog.at_level(logging.INFO, logger="streamwarden"):
        assert await store.check_eviction_policy(refuse=True) is None
    assert any("maxmemory-policy" in record.getMessage() for record in caplog.records)
    lease = (await store.claim("works", 30.0)).lease  # the store itself needs no CONFIG
    assert lease is not None
    assert await store.complete(lease, 60.0)


@pytest.mark.parametrize(
    "fingerprint",
    ["with space", "line\nbreak", "ü-not-ascii", "x" * 5_000, "sha256:" + "0" * 64],
    ids=["space", "newline", "non-ascii", "five-kilobytes", "layer-style"],
)
async def test_any_fingerprint_string_is_stored_and_compared(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory, fingerprint: str
) -> None:
    """Fingerprints with spaces, newlines, non-ASCII or kilobytes of text round-trip: same is DUPLICATE, another is CONFLICT."""
    store = store_factory(redis_client)
    reader = store_factory(redis_client, local_cache_size=0)
    lease = (await store.claim("fp-any", 30.0, fingerprint)).lease
    assert lease is not None
    assert await store.complete(lease, 60.0, fingerprint)
    assert (await reader.claim("fp-any", 30.0, fingerprint)).status is DUPLICATE
    assert (await reader.claim("fp-any", 30.0, fingerprint + "!")).status is CONFLICT
    assert len(await redis_client.hget(store.key("fp-any"), "p")) <= 200


async def test_forget_drops_a_queued_completion(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """forget() of an id whose completion is still queued (defer_completions) removes it: a flush does not bring it back."""
    store = store_factory(redis_client, defer_completions=True, flush_interval=60.0)
    lease = (await store.claim("gone", 30.0)).lease
    assert lease is not None
    await store.complete(lease, 60.0)
    assert await store.forget("gone") is True
    await store.flush()
    assert await store.state("gone") is RecordState.RELEASED
    assert (await store.claim("gone", 30.0)).status is NEW


DEDUP_ACL = [
    "dedup", "on", ">secret", "~svc:dedup:*", "resetchannels", "-@all",
    "+evalsha", "+eval", "+hget", "+hmget", "+hset", "+pexpire", "+pttl", "+time",
]  # fmt: skip


async def test_least_privilege_acl_user_runs_every_operation(
    redis_server_factory: Any, client_factory: ClientFactory
) -> None:
    """A user limited to the dedup key prefix and the store's commands (docs/dedup.md) can claim, complete, release, extend, mark, dead-letter, read states and forget, in any scope."""
    server: RedisServer = redis_server_factory(["--user", *DEDUP_ACL])
    client = client_factory(server.port, username="dedup", password="secret")
    store = RedisDedupStore(client, key_prefix="svc")
    first, second = await store.claim_many(["a", "b"], 30.0)
    assert first.lease is not None
    assert second.lease is not None
    assert await store.extend(first.lease, 30.0) is not None
    assert await store.complete(first.lease, 60.0, "sha256:a")
    assert await store.release(second.lease)
    await store.mark_completed("c", 60.0)
    assert await store.is_completed("c")
    assert (await store.claim("a", 30.0, "sha256:b")).status is CONFLICT
    assert await store.forget("a")
    group = store.scoped("orders/group-1")
    third = (await group.claim("a", 30.0)).lease
    assert third is not None
    assert await group.release(third, attempted=False)
    fourth = (await group.claim("a", 30.0)).lease
    assert fourth is not None
    assert await group.mark_dead_lettered(fourth, 30.0)
    assert await group.state("a") is RecordState.DEAD_LETTERED
    assert await store.check_eviction_policy() is None  # NOPERM for CONFIG: skipped, not failed
    outside = RedisDedupStore(client, key_prefix="other")
    with pytest.raises(redis.exceptions.NoPermissionError):
        await outside.claim("a", 30.0)


# --- store contract v2: attempts, dead-letter markers, state, retention, scopes ------------------


async def test_attempt_counter_survives_release_takeover_and_marker(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory, lease_expired: LeaseExpiry
) -> None:
    """ClaimResult.attempt counts handler runs in the record: +1 per NEW claim (single and batch), a
    takeover counts the dead owner's run, release(attempted=False) takes one back, forget resets it."""
    store = store_factory(redis_client, local_cache_size=0)
    first = await store.claim("m", 30.0)
    assert first.attempt == 1
    assert first.lease is not None
    assert await store.release(first.lease)
    (second,) = await store.claim_many(["m"], 30.0)
    assert second.attempt == 2
    assert second.lease is not None
    assert await store.release(second.lease, attempted=False)  # the handler never ran
    third = await store.claim("m", 0.02)
    assert third.attempt == 2
    assert third.lease is not None
    await lease_expired(redis_client, store.key("m"))  # its owner died mid-run
    fourth = await store.claim("m", 30.0)
    assert (fourth.takeover, fourth.attempt) == (True, 3)
    assert fourth.lease is not None
    assert await store.mark_dead_lettered(fourth.lease, 0.02)
    await lease_expired(redis_client, store.key("m"))  # the marker's window ran out
    fifth = await store.claim("m", 30.0)
    assert (fifth.takeover, fifth.attempt) == (False, 4)
    assert await redis_client.hget(store.key("m"), "a") == b"4"
    assert await store.forget("m")
    assert (await store.claim("m", 30.0)).attempt == 1


async def test_dead_letter_marker_is_distinguishable_from_a_completion(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory, lease_expired: LeaseExpiry
) -> None:
    """A live marker answers DUPLICATE, but is_completed is False (no local cache holds it) and state()
    says dead_lettered; after its window the id is released: NEW, the next fencing token, no takeover."""
    store = store_factory(redis_client)  # with its local cache: it must not remember the marker
    other = store_factory(redis_client)
    lease = (await store.claim("m", 30.0)).lease
    assert lease is not None
    assert await store.mark_dead_lettered(lease, 0.3) is True
    assert (await other.claim("m", 30.0)).status is DUPLICATE
    assert (await store.claim("m", 30.0, "sha256:x")).status is DUPLICATE
    assert await store.is_completed("m") is False
    assert await other.is_completed("m") is False
    assert await store.state("m") is RecordState.DEAD_LETTERED
    assert await redis_client.hget(store.key("m"), "s") == b"d"
    await lease_expired(redis_client, store.key("m"))
    assert await store.state("m") is RecordState.RELEASED
    again = await other.claim("m", 30.0)
    assert (again.status, again.takeover) == (NEW, False)
    assert again.lease is not None
    assert again.lease.fencing_token == lease.fencing_token + 1


async def test_mark_dead_lettered_is_owner_checked_and_idempotent(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory, lease_expired: LeaseExpiry
) -> None:
    """Only the lease's owner can mark; a re-sent mark answers True; a taken-over or completed lease
    answers False and changes nothing."""
    store, other = store_factory(redis_client), store_factory(redis_client)
    lease = (await store.claim("m", 30.0)).lease
    assert lease is not None
    assert await store.mark_dead_lettered(lease, 30.0)
    assert await store.mark_dead_lettered(lease, 30.0)
    assert await store.release(lease) is False
    assert await store.complete(lease, 60.0) is False
    stale = (await store.claim("n", 0.02)).lease
    assert stale is not None
    await lease_expired(redis_client, store.key("n"))
    fresh = (await other.claim("n", 30.0)).lease
    assert fresh is not None
    assert await store.mark_dead_lettered(stale, 30.0) is False
    assert await store.state("n") is RecordState.IN_PROGRESS
    assert await other.complete(fresh, 60.0)
    assert await other.mark_dead_lettered(fresh, 30.0) is False
    assert await store.state("n") is RecordState.COMPLETED


async def test_fencing_tokens_never_repeat_across_dead_letter_replay_and_forget(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """The issue's 1 -> 2 -> 1: after a completion and forget (replay --force), after a dead-letter
    marker and forget (a replay), and after a release, every claim's token is the previous + 1."""
    store = store_factory(redis_client)
    tokens = []
    lease = (await store.claim("m", 30.0)).lease
    assert lease is not None
    tokens.append(lease.fencing_token)
    await store.complete(lease, 60.0)
    assert await store.forget("m")  # operator: replay --force
    lease = (await store.claim("m", 30.0)).lease
    assert lease is not None
    tokens.append(lease.fencing_token)
    await store.mark_dead_lettered(lease, 30.0)
    assert await store.forget("m")  # the replayer drops the marker before re-running
    lease = (await store.claim("m", 30.0)).lease
    assert lease is not None
    tokens.append(lease.fencing_token)
    await store.release(lease)
    lease = (await store.claim("m", 30.0)).lease
    assert lease is not None
    tokens.append(lease.fencing_token)
    assert tokens == [1, 2, 3, 4]


async def test_every_state_keeps_its_record_for_retention_or_ttl(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """In progress: lease + fence_retention; released and forgotten: fence_retention from the change;
    dead-lettered: window + fence_retention; completed: the TTL."""
    store = store_factory(redis_client, fence_retention=100.0)

    async def pttl(mid: str) -> int:
        return int(await redis_client.pttl(store.key(mid)))

    held = (await store.claim("held", 10.0)).lease
    assert held is not None
    assert 109_000 < await pttl("held") <= 110_000
    released = (await store.claim("released", 10.0)).lease
    assert released is not None
    assert await store.release(released)
    assert 99_000 < await pttl("released") <= 100_000
    marked = (await store.claim("marked", 10.0)).lease
    assert marked is not None
    assert await store.mark_dead_lettered(marked, 50.0)
    assert 149_000 < await pttl("marked") <= 150_000
    done = (await store.claim("done", 10.0)).lease
    assert done is not None
    assert await store.complete(done, 500.0)
    assert 499_000 < await pttl("done") <= 500_000
    assert await store.forget("done")
    assert 99_000 < await pttl("done") <= 100_000


async def test_state_reads_every_state_in_one_call(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory, lease_expired: LeaseExpiry
) -> None:
    """state() answers absent, in_progress (also once the lease expired), completed, released and
    dead_lettered, one script call each."""
    store = store_factory(redis_client)
    assert await store.state("x") is RecordState.ABSENT
    lease = (await store.claim("x", 0.02)).lease
    assert lease is not None
    await lease_expired(redis_client, store.key("x"))
    before = await command_calls(redis_client, "evalsha")
    assert await store.state("x") is RecordState.IN_PROGRESS
    assert await command_calls(redis_client, "evalsha") == before + 1
    assert await store.complete(lease, 60.0)  # not taken over: still the owner's
    assert await store.state("x") is RecordState.COMPLETED
    lease = (await store.claim("y", 30.0)).lease
    assert lease is not None
    await store.release(lease)
    assert await store.state("y") is RecordState.RELEASED


async def test_scopes_keep_consumer_groups_apart(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """The issue's second consumer group: an id completed in one scope is NEW in another; scoped() gives
    the same object per scope, from the parent or any sibling."""
    group1 = store_factory(redis_client, scope="orders/group-1")
    group2 = group1.scoped("orders/group-2")
    assert group1.scoped("orders/group-2") is group2
    assert group2.scoped("orders/group-1") is group1
    assert group2.scope == "orders/group-2"
    lease = (await group1.claim("m", 30.0)).lease
    assert lease is not None
    assert await group1.complete(lease, 60.0)
    other = await group2.claim("m", 30.0)
    assert other.status is NEW
    assert other.lease is not None
    assert other.lease.fencing_token == 1
    assert await group2.state("m") is RecordState.IN_PROGRESS
    assert group1.key("m") != group2.key("m")
    assert isinstance(group2, DedupStore)


async def test_scoped_stores_share_the_connection_and_close_with_the_parent(
    client_factory: ClientFactory, redis_server: RedisServer, scope: str
) -> None:
    """Scoped stores share the parent's connection; the parent's aclose() flushes their deferred
    completions and gives the one connection back."""
    client = client_factory(redis_server.port)
    parent = RedisDedupStore(client, scope=scope, defer_completions=True, flush_interval=60.0)
    children = [parent.scoped(f"{scope}-{i}") for i in range(3)]
    for store in [parent, *children]:
        lease = (await store.claim("m", 30.0)).lease
        assert lease is not None
        assert await store.complete(lease, 60.0)  # queued
    assert len(client.connection_pool._in_use_connections) == 1  # type: ignore[attr-defined]
    await parent.aclose()
    assert len(client.connection_pool._in_use_connections) == 0  # type: ignore[attr-defined]
    for store in [parent, *children]:
        reader = RedisDedupStore(client, scope=store.scope, local_cache_size=0, dedicated_connection=False)
        assert await reader.state("m") is RecordState.COMPLETED


async def test_re_sent_completion_keeps_the_cached_fingerprint(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory
) -> None:
    """A completion sent again by its owner (with another or no fingerprint) changes neither the record
    nor what the local cache knows: another payload is still a CONFLICT (found by the model test)."""
    store = store_factory(redis_client)
    lease = (await store.claim("fp", 30.0, "sha256:1")).lease
    assert lease is not None
    assert await store.complete(lease, 60.0, "sha256:1") is True
    assert await store.complete(lease, 60.0) is True  # re-sent, without a fingerprint
    assert await store.complete_many([lease], 60.0) == [True]
    assert await redis_client.hget(store.key("fp"), "p") == b"sha256:1"
    assert (await store.claim("fp", 30.0, "sha256:2")).status is CONFLICT


async def test_an_unrun_takeover_given_back_stays_a_takeover_and_is_not_charged(
    redis_client: redis.asyncio.Redis, store_factory: StoreFactory, lease_expired: LeaseExpiry
) -> None:
    """release(attempted=False, keep_takeover=True): the record stays in progress with an expired lease
    of no owner, so the next claim is a takeover again (its message still runs alone), charged one run
    then, not twice; the giving-back owner can no longer complete."""
    store = store_factory(redis_client, local_cache_size=0)
    dead = await store.claim("m", 0.02)
    assert dead.lease is not None
    await lease_expired(redis_client, store.key("m"))  # its owner died mid-run
    taken = await store.claim("m", 30.0)
    assert (taken.takeover, taken.attempt) == (True, 2)
    assert taken.lease is not None
    assert await store.release(taken.lease, attempted=False, keep_takeover=True)
    assert await store.state("m") is RecordState.IN_PROGRESS
    assert not await store.complete(taken.lease, 60.0), "given back: no longer the owner"
    again = await store.claim("m", 30.0)
    assert (again.status, again.takeover, again.attempt) == (ClaimStatus.NEW, True, 2)
    assert again.lease is not None
    assert again.lease.fencing_token > taken.lease.fencing_token
