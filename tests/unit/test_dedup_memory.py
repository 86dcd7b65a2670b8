"""The embedded dedup store and the seed's DeduplicationManager, on an injected clock."""

from __future__ import annotations

import pytest

from streamwarden import (
    ClaimStatus,
    DeduplicationManager,
    DedupPolicy,
    DedupStore,
    InMemoryDedupStore,
    Lease,
)
from streamwarden._dedup import LocalDedupStore

NEW, DUPLICATE, IN_PROGRESS, CONFLICT = (
    ClaimStatus.NEW,
    ClaimStatus.DUPLICATE,
    ClaimStatus.IN_PROGRESS,
    ClaimStatus.CONFLICT,
)
LEASE = 30.0
TTL = 3600.0


class Clock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> InMemoryDedupStore:
    return InMemoryDedupStore(clock=clock)


async def claim_lease(store: InMemoryDedupStore, message_id: str, lease: float = LEASE) -> Lease:
    result = await store.claim(message_id, lease)
    assert result.status is NEW
    assert result.lease is not None
    return result.lease


def test_store_satisfies_the_protocols(store: InMemoryDedupStore) -> None:
    """The embedded store implements the store protocol and its synchronous fast-path twin."""
    assert isinstance(store, DedupStore)
    assert isinstance(store, LocalDedupStore)


# --- claim / complete / release -----------------------------------------------------------------


async def test_first_claim_is_new_with_a_lease(store: InMemoryDedupStore, clock: Clock) -> None:
    """The first claim of an id is NEW and carries a lease that expires ``lease_seconds`` from now."""
    result = await store.claim("m1", LEASE)
    assert result.status is NEW
    assert result.lease is not None
    assert result.lease.message_id == "m1"
    assert result.lease.expires_at == clock.now + LEASE
    assert result.lease.owner


async def test_second_claim_during_live_lease_is_in_progress(store: InMemoryDedupStore, clock: Clock) -> None:
    """While the lease is live, another claim is IN_PROGRESS with the time left on the lease."""
    await claim_lease(store, "m1")
    clock.now += 10.0
    result = await store.claim("m1", LEASE)
    assert result.status is IN_PROGRESS
    assert result.lease is None
    assert result.retry_after == pytest.approx(20.0)


async def test_completed_id_is_duplicate(store: InMemoryDedupStore) -> None:
    """After ``complete``, claims of the id are DUPLICATE."""
    lease = await claim_lease(store, "m1")
    assert await store.complete(lease, TTL) is True
    assert (await store.claim("m1", LEASE)).status is DUPLICATE
    assert await store.is_completed("m1")


async def test_released_id_can_be_claimed_again(store: InMemoryDedupStore) -> None:
    """After ``release``, the id is NEW again (processing failed, let it be retried)."""
    lease = await claim_lease(store, "m1")
    assert await store.release(lease) is True
    again = await claim_lease(store, "m1")
    assert again.fencing_token > lease.fencing_token
    assert not await store.is_completed("m1")


async def test_double_release_and_double_complete_are_refused(store: InMemoryDedupStore) -> None:
    """A lease can be used once: a second release or complete of the same lease returns False."""
    lease = await claim_lease(store, "m1")
    assert await store.release(lease) is True
    assert await store.release(lease) is False
    assert await store.complete(lease, TTL) is False
    assert not await store.is_completed("m1")


async def test_distinct_ids_do_not_interfere(store: InMemoryDedupStore) -> None:
    """Claims, completions and releases of one id leave other ids alone."""
    a = await claim_lease(store, "a")
    b = await claim_lease(store, "b")
    await store.complete(a, TTL)
    assert (await store.claim("b", LEASE)).status is IN_PROGRESS
    await store.release(b)
    assert (await store.claim("a", LEASE)).status is DUPLICATE
    assert (await store.claim("b", LEASE)).status is NEW


# --- lease expiry and fencing ------------------------------------------------------------------


async def test_expired_lease_is_taken_over_with_a_higher_fencing_token(
    store: InMemoryDedupStore, clock: Clock
) -> None:
    """Once a lease expires, a new claim succeeds with a strictly higher fencing token."""
    stale = await claim_lease(store, "m1")
    clock.now += LEASE  # expires_at is exclusive: at that instant the lease is gone
    fresh = await claim_lease(store, "m1")
    assert fresh.fencing_token > stale.fencing_token
    assert fresh.expires_at == clock.now + LEASE


async def test_lease_is_live_until_just_before_expiry(store: InMemoryDedupStore, clock: Clock) -> None:
    """A claim just before the lease expires is still IN_PROGRESS."""
    await claim_lease(store, "m1")
    clock.now += LEASE - 0.001
    assert (await store.claim("m1", LEASE)).status is IN_PROGRESS


async def test_stale_owner_cannot_complete_or_release(store: InMemoryDedupStore, clock: Clock) -> None:
    """After a takeover the old lease's complete/release return False and leave the new owner's claim intact."""
    stale = await claim_lease(store, "m1")
    clock.now += LEASE + 1
    fresh = await claim_lease(store, "m1")

    assert await store.complete(stale, TTL) is False
    assert await store.release(stale) is False
    assert await store.extend(stale, LEASE) is None

    assert (await store.claim("m1", LEASE)).status is IN_PROGRESS  # new owner still holds it
    assert not await store.is_completed("m1")
    assert await store.complete(fresh, TTL) is True
    assert (await store.claim("m1", LEASE)).status is DUPLICATE


async def test_expired_lease_cannot_complete_even_without_takeover(
    store: InMemoryDedupStore, clock: Clock
) -> None:
    """An owner whose lease ran out cannot complete, even if nobody took over (another may at any moment)."""
    lease = await claim_lease(store, "m1")
    clock.now += LEASE
    assert await store.complete(lease, TTL) is False
    assert (await store.claim("m1", LEASE)).status is NEW


async def test_fencing_tokens_increase_across_ids(store: InMemoryDedupStore) -> None:
    """Fencing tokens are unique and increasing over all claims of the store."""
    tokens = [(await claim_lease(store, f"m{i}")).fencing_token for i in range(20)]
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == 20


async def test_extend_keeps_a_long_handler_s_lease(store: InMemoryDedupStore, clock: Clock) -> None:
    """``extend`` moves expiry to now + lease_seconds; the lease stays usable past its original expiry."""
    lease = await claim_lease(store, "m1")
    clock.now += LEASE - 1
    renewed = await store.extend(lease, 60.0)
    assert renewed is not None
    assert renewed.expires_at == clock.now + 60.0
    assert renewed.fencing_token == lease.fencing_token
    clock.now += 30.0  # past the original expiry
    assert (await store.claim("m1", LEASE)).status is IN_PROGRESS
    assert await store.complete(renewed, TTL) is True


async def test_extend_of_an_expired_lease_fails(store: InMemoryDedupStore, clock: Clock) -> None:
    """A lease that already expired cannot be extended."""
    lease = await claim_lease(store, "m1")
    clock.now += LEASE
    assert await store.extend(lease, 60.0) is None


# --- TTL ----------------------------------------------------------------------------------------


async def test_completed_id_is_forgotten_after_ttl(store: InMemoryDedupStore, clock: Clock) -> None:
    """A completed id is DUPLICATE within the TTL and NEW once the TTL has passed."""
    await store.complete(await claim_lease(store, "m1"), 100.0)
    clock.now += 99.999
    assert (await store.claim("m1", LEASE)).status is DUPLICATE
    assert await store.is_completed("m1")
    clock.now += 0.001
    assert not await store.is_completed("m1")
    assert (await store.claim("m1", LEASE)).status is NEW


async def test_expired_ids_are_swept_from_memory(store: InMemoryDedupStore, clock: Clock) -> None:
    """Completed ids past their TTL do not accumulate: claims sweep them without a background task."""
    for i in range(500):
        await store.complete(await claim_lease(store, f"old{i}"), 10.0)
    clock.now += 11.0
    for i in range(500):
        await store.complete(await claim_lease(store, f"new{i}"), 10.0)
    assert len(store) < 1000


# --- fingerprints -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completed_with", "claimed_with", "expected"),
    [
        pytest.param("sha256:a", "sha256:b", CONFLICT, id="different-conflict"),
        pytest.param("sha256:a", "sha256:a", DUPLICATE, id="same-duplicate"),
        pytest.param(None, "sha256:b", DUPLICATE, id="completed-without-fingerprint"),
        pytest.param("sha256:a", None, DUPLICATE, id="claimed-without-fingerprint"),
    ],
)
async def test_fingerprints_flag_conflicts(
    store: InMemoryDedupStore, completed_with: str | None, claimed_with: str | None, expected: ClaimStatus
) -> None:
    """A completed id claimed with a different fingerprint is CONFLICT; otherwise DUPLICATE."""
    lease = (await store.claim("m1", LEASE, completed_with)).lease
    assert lease is not None
    await store.complete(lease, TTL, completed_with)
    assert (await store.claim("m1", LEASE, claimed_with)).status is expected


# --- batches ------------------------------------------------------------------------------------


async def test_claim_many_answers_in_order(store: InMemoryDedupStore) -> None:
    """``claim_many`` returns one result per id, in the order given, each as a single claim would."""
    await store.complete(await claim_lease(store, "done"), TTL)
    await claim_lease(store, "held")

    results = await store.claim_many(["fresh1", "done", "held", "fresh2"], LEASE)

    assert [r.status for r in results] == [NEW, DUPLICATE, IN_PROGRESS, NEW]
    assert [r.lease.message_id if r.lease else None for r in results] == ["fresh1", None, None, "fresh2"]


async def test_claim_many_repeated_id_in_batch_is_in_progress(store: InMemoryDedupStore) -> None:
    """An id that appears twice in one batch is NEW the first time and IN_PROGRESS the second."""
    results = await store.claim_many(["a", "b", "a"], LEASE)
    assert [r.status for r in results] == [NEW, NEW, IN_PROGRESS]


async def test_claim_many_with_fingerprints(store: InMemoryDedupStore) -> None:
    """Fingerprints are matched to ids by position."""
    lease = (await store.claim("m1", LEASE, "sha256:a")).lease
    assert lease is not None
    await store.complete(lease, TTL, "sha256:a")
    results = await store.claim_many(["m1", "m2"], LEASE, ["sha256:zzz", "sha256:b"])
    assert [r.status for r in results] == [CONFLICT, NEW]


async def test_claim_many_rejects_mismatched_fingerprints(store: InMemoryDedupStore) -> None:
    """A fingerprint list of the wrong length is an error, not a silent mis-pairing."""
    with pytest.raises(ValueError, match="zip"):
        await store.claim_many(["a", "b"], LEASE, ["sha256:a"])


async def test_claim_many_of_nothing(store: InMemoryDedupStore) -> None:
    """An empty batch gives an empty answer."""
    assert await store.claim_many([], LEASE) == []


# --- bounded memory -----------------------------------------------------------------------------


async def test_max_entries_evicts_oldest_completed_ids(clock: Clock) -> None:
    """Over ``max_entries`` the oldest completed ids are evicted first, and each eviction is counted."""
    store = InMemoryDedupStore(max_entries=3, clock=clock)
    for mid in ["a", "b", "c", "d", "e"]:
        await store.complete(await claim_lease(store, mid), TTL)

    assert store.evictions == 2
    assert [await store.is_completed(m) for m in "abcde"] == [False, False, True, True, True]
    assert (await store.claim("a", LEASE)).status is NEW  # an evicted id can be processed again


async def test_mark_completed_also_respects_max_entries(clock: Clock) -> None:
    """The seed's mark path is bounded by the same cap."""
    store = InMemoryDedupStore(max_entries=2, clock=clock)
    for mid in ["a", "b", "c"]:
        await store.mark_completed(mid, TTL)
    assert store.evictions == 1
    assert not await store.is_completed("a")
    assert await store.is_completed("c")


def test_max_entries_must_be_positive() -> None:
    """A store that could hold nothing is refused."""
    with pytest.raises(ValueError, match="max_entries"):
        InMemoryDedupStore(max_entries=0)


# --- mark_completed / is_completed / forget ------------------------------------------------------


async def test_mark_completed_without_claim(store: InMemoryDedupStore, clock: Clock) -> None:
    """``mark_completed`` records an id for the TTL without a claim; it then claims as DUPLICATE."""
    assert not await store.is_completed("m1")
    await store.mark_completed("m1", 50.0)
    assert await store.is_completed("m1")
    assert (await store.claim("m1", LEASE)).status is DUPLICATE
    clock.now += 50.0
    assert not await store.is_completed("m1")


async def test_mark_completed_drops_a_held_lease(store: InMemoryDedupStore) -> None:
    """Marking an id completed supersedes an in-flight claim: its owner can no longer complete it."""
    lease = await claim_lease(store, "m1")
    await store.mark_completed("m1", TTL)
    assert await store.complete(lease, TTL) is False
    assert (await store.claim("m1", LEASE)).status is DUPLICATE


@pytest.mark.parametrize("state", ["completed", "held"])
async def test_forget_removes_any_record(store: InMemoryDedupStore, state: str) -> None:
    """``forget`` deletes a completed or held id so it is NEW again, and reports whether it found one."""
    lease = await claim_lease(store, "m1")
    if state == "completed":
        await store.complete(lease, TTL)
    assert await store.forget("m1") is True
    assert await store.forget("m1") is False
    assert (await store.claim("m1", LEASE)).status is NEW


# --- DeduplicationManager (seed API) -------------------------------------------------------------


async def test_manager_seed_api_check_then_mark(clock: Clock) -> None:
    """``is_duplicate`` is False until ``mark_processed``, then True until the TTL passes."""
    manager = DeduplicationManager(None, ttl=60, store=InMemoryDedupStore(clock=clock))
    assert await manager.is_duplicate("order-1") is False
    await manager.mark_processed("order-1")
    assert await manager.is_duplicate("order-1") is True
    assert await manager.is_duplicate("order-2") is False
    clock.now += 60
    assert await manager.is_duplicate("order-1") is False


async def test_manager_without_redis_uses_the_embedded_store() -> None:
    """``redis_client=None`` selects the in-memory store with the seed's default TTL."""
    manager = DeduplicationManager(None)
    assert isinstance(manager.store, InMemoryDedupStore)
    assert manager.ttl == 3600
    await manager.mark_processed("x")
    assert await manager.is_duplicate("x")


async def test_manager_claim_uses_policy_lease_and_ttl(clock: Clock) -> None:
    """The manager's claim/complete/release use the policy's lease and TTL."""
    store = InMemoryDedupStore(clock=clock)
    manager = DeduplicationManager(None, store=store, policy=DedupPolicy(ttl=100.0, lease=10.0))

    result = await manager.claim("m1")
    assert result.status is NEW
    assert result.lease is not None
    assert result.lease.expires_at == clock.now + 10.0
    assert await manager.complete(result.lease) is True
    assert (await manager.claim("m1")).status is DUPLICATE
    clock.now += 100.0
    again = await manager.claim("m1")
    assert again.status is NEW
    assert again.lease is not None
    assert await manager.release(again.lease) is True
    assert [r.status for r in await manager.claim_many(["m1", "m1"])] == [NEW, IN_PROGRESS]
