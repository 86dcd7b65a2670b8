"""The embedded dedup store and the seed's DeduplicationManager, on an injected clock."""

from __future__ import annotations

import pytest

from _support import Clock
from streamwarden import (
    ClaimResult,
    ClaimStatus,
    DeduplicationManager,
    DedupPolicy,
    DedupStore,
    InMemoryDedupStore,
    Lease,
)
from streamwarden._dedup import LocalDedupStore, RecordState

NEW, DUPLICATE, IN_PROGRESS, CONFLICT = (
    ClaimStatus.NEW,
    ClaimStatus.DUPLICATE,
    ClaimStatus.IN_PROGRESS,
    ClaimStatus.CONFLICT,
)
LEASE = 30.0
TTL = 3600.0


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


async def test_a_lease_ends_in_one_transition(store: InMemoryDedupStore) -> None:
    """Re-sending a release or a completion answers True and changes nothing (as in Redis, where a
    client may re-send a call whose reply was lost); the other transition is refused afterwards."""
    lease = await claim_lease(store, "m1")
    assert await store.release(lease) is True
    assert await store.release(lease) is True
    assert await store.complete(lease, TTL) is False
    assert not await store.is_completed("m1")
    assert await store.state("m1") is RecordState.RELEASED
    other = await claim_lease(store, "m2")
    assert await store.complete(other, TTL) is True
    assert await store.complete(other, TTL) is True
    assert await store.release(other) is False
    assert await store.state("m2") is RecordState.COMPLETED


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


async def test_expired_lease_not_taken_over_still_completes(store: InMemoryDedupStore, clock: Clock) -> None:
    """A lease that ran out while nobody claimed the id is still its owner's (as in Redis): nobody else
    can have started, so its completion records the effect."""
    lease = await claim_lease(store, "m1")
    clock.now += LEASE
    assert await store.state("m1") is RecordState.IN_PROGRESS
    assert await store.complete(lease, TTL) is True
    assert (await store.claim("m1", LEASE)).status is DUPLICATE


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


async def test_extend_of_a_taken_over_lease_fails(store: InMemoryDedupStore, clock: Clock) -> None:
    """An expired lease can be extended until someone takes the id over; then it is lost."""
    lease = await claim_lease(store, "m1")
    clock.now += LEASE
    renewed = await store.extend(lease, LEASE)
    assert renewed is not None
    clock.now += LEASE
    assert (await store.claim("m1", LEASE)).takeover is True
    assert await store.extend(renewed, LEASE) is None


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


@pytest.mark.parametrize("state", ["completed", "held", "released", "dead_lettered"])
async def test_forget_makes_any_record_claimable(store: InMemoryDedupStore, state: str) -> None:
    """``forget`` turns a completed, held, released or dead-lettered id into a released record: NEW at
    once with a greater fencing token and the attempt counter restarted; it reports whether a record
    existed, and cuts off the lease."""
    assert await store.forget("m1") is False
    assert await store.state("m1") is RecordState.ABSENT
    lease = await claim_lease(store, "m1")
    if state == "completed":
        await store.complete(lease, TTL)
    elif state == "released":
        await store.release(lease)
    elif state == "dead_lettered":
        await store.mark_dead_lettered(lease, LEASE)
    assert await store.forget("m1") is True
    assert await store.state("m1") is RecordState.RELEASED
    assert await store.complete(lease, TTL) is False
    assert await store.release(lease) is False
    again = await store.claim("m1", LEASE)
    assert again.status is NEW
    assert again.lease is not None
    assert again.lease.fencing_token > lease.fencing_token
    assert again.attempt == 1


# --- store contract v2: attempts, dead-letter markers, state, retention, scopes ------------------


async def test_attempt_counts_handler_runs_across_releases_takeovers_and_markers(
    store: InMemoryDedupStore, clock: Clock
) -> None:
    """ClaimResult.attempt counts the runs of an id: +1 per NEW claim (a takeover counts the dead
    owner's run), nothing for a release of a lease whose handler never ran, reset by forget."""
    first = await store.claim("m1", LEASE)
    assert first.attempt == 1
    assert first.lease is not None
    await store.release(first.lease)
    second = await store.claim("m1", LEASE)
    assert second.attempt == 2
    assert second.lease is not None
    await store.release(second.lease, attempted=False)  # e.g. the breaker refused: never ran
    third = await store.claim("m1", LEASE)
    assert third.attempt == 2
    clock.now += LEASE  # its owner died without releasing
    fourth = await store.claim("m1", LEASE)
    assert (fourth.takeover, fourth.attempt) == (True, 3)
    assert fourth.lease is not None
    assert await store.mark_dead_lettered(fourth.lease, 5.0)
    clock.now += 5.0
    fifth = await store.claim("m1", LEASE)
    assert (fifth.takeover, fifth.attempt) == (False, 4)
    await store.forget("m1")
    assert (await store.claim("m1", LEASE)).attempt == 1
    assert [r.attempt for r in await store.claim_many(["m1", "n1"], LEASE)] == [0, 1]  # IN_PROGRESS: 0


async def test_release_unattempted_takes_back_one_attempt_once(store: InMemoryDedupStore) -> None:
    """release(attempted=False) takes the attempt back once (a re-sent release changes nothing), and
    the counter never goes below zero."""
    lease = await claim_lease(store, "m1")
    assert await store.release(lease, attempted=False) is True
    assert await store.release(lease, attempted=False) is True
    again = await store.claim("m1", LEASE)
    assert again.attempt == 1
    assert again.lease is not None
    assert await store.forget("m1")
    after_forget = await claim_lease(store, "m1")  # counter 0 -> 1
    assert await store.release(after_forget, attempted=False)
    assert (await store.claim("m1", LEASE)).attempt == 1


async def test_dead_letter_marker_is_a_duplicate_but_not_a_completion(
    store: InMemoryDedupStore, clock: Clock
) -> None:
    """While the marker lives claims are DUPLICATE, yet is_completed is False and state() says
    dead_lettered; after the window the id is NEW again (not a takeover) with a greater fencing token."""
    lease = await claim_lease(store, "m1")
    assert await store.mark_dead_lettered(lease, 10.0) is True
    assert (await store.claim("m1", LEASE)).status is DUPLICATE
    assert await store.is_completed("m1") is False
    assert await store.state("m1") is RecordState.DEAD_LETTERED
    clock.now += 9.999
    assert (await store.claim("m1", LEASE, "sha256:other")).status is DUPLICATE  # never a CONFLICT
    clock.now += 0.001
    assert await store.state("m1") is RecordState.RELEASED
    again = await store.claim("m1", LEASE)
    assert (again.status, again.takeover) == (NEW, False)
    assert again.lease is not None
    assert again.lease.fencing_token > lease.fencing_token


async def test_mark_dead_lettered_is_owner_checked_and_idempotent(
    store: InMemoryDedupStore, clock: Clock
) -> None:
    """Only the lease's owner can mark: a re-sent mark answers True; a taken-over, completed or
    released lease answers False and changes nothing."""
    lease = await claim_lease(store, "m1")
    assert await store.mark_dead_lettered(lease, 10.0) is True
    assert await store.mark_dead_lettered(lease, 10.0) is True
    assert await store.release(lease) is False
    assert await store.complete(lease, TTL) is False
    stale = await claim_lease(store, "m2")
    clock.now += LEASE
    fresh = await claim_lease(store, "m2")
    assert await store.mark_dead_lettered(stale, 10.0) is False
    assert await store.state("m2") is RecordState.IN_PROGRESS
    assert await store.complete(fresh, TTL)
    assert await store.mark_dead_lettered(fresh, 10.0) is False
    assert await store.state("m2") is RecordState.COMPLETED


async def test_fencing_tokens_never_repeat_across_dead_letter_replay_and_forget(
    store: InMemoryDedupStore, clock: Clock
) -> None:
    """The issue's 1 -> 2 -> 1: dead-letter, replay (forget, claim) and forget again; every claim's
    fencing token is greater than the one before."""
    tokens = []
    lease = await claim_lease(store, "m1")
    tokens.append(lease.fencing_token)
    await store.mark_dead_lettered(lease, 10.0)
    await store.forget("m1")  # the replayer drops the marker before re-running
    lease = await claim_lease(store, "m1")
    tokens.append(lease.fencing_token)
    await store.complete(lease, TTL)
    await store.forget("m1")  # operator: replay --force
    lease = await claim_lease(store, "m1")
    tokens.append(lease.fencing_token)
    await store.release(lease)
    tokens.append((await claim_lease(store, "m1")).fencing_token)
    assert tokens == sorted(set(tokens))


async def test_records_outlive_their_last_change_by_fence_retention(clock: Clock) -> None:
    """Released, dead-lettered and expired in-progress records (with their attempt counter) are kept
    fence_retention seconds after their last change or lease; then the id is absent and starts over."""
    store = InMemoryDedupStore(clock=clock, fence_retention=100.0)
    released = await claim_lease(store, "rel")
    await store.release(released)
    marked = await claim_lease(store, "dl")
    await store.mark_dead_lettered(marked, 10.0)
    await claim_lease(store, "held", 10.0)
    clock.now += 99.0
    assert [await store.state(m) for m in ("rel", "dl", "held")] == [
        RecordState.RELEASED,
        RecordState.RELEASED,
        RecordState.IN_PROGRESS,
    ]
    clock.now += 1.0
    assert await store.state("rel") is RecordState.ABSENT
    assert await store.state("dl") is RecordState.RELEASED  # window + retention: 10 s more
    assert await store.state("held") is RecordState.IN_PROGRESS  # its lease ended at 10: kept to 110
    after = await store.claim("held", LEASE)
    assert (after.takeover, after.attempt) == (True, 2)
    clock.now += 10.0
    assert await store.state("dl") is RecordState.ABSENT
    assert (await store.claim("rel", LEASE)).attempt == 1
    assert (await store.claim("dl", LEASE)).attempt == 1


async def test_vanished_lease_record_is_a_fresh_start(clock: Clock) -> None:
    """An expired lease whose retention passed is gone: the next claim is no takeover, attempt 1, and
    the old lease can neither complete nor release."""
    store = InMemoryDedupStore(clock=clock, fence_retention=5.0)
    old = await claim_lease(store, "m1", 10.0)
    clock.now += 15.0
    assert await store.state("m1") is RecordState.ABSENT
    assert await store.complete(old, TTL) is False
    assert await store.release(old) is False
    fresh = await store.claim("m1", LEASE)
    assert (fresh.status, fresh.takeover, fresh.attempt) == (NEW, False, 1)
    assert fresh.lease is not None
    assert fresh.lease.fencing_token > old.fencing_token


async def test_state_reads_every_state(store: InMemoryDedupStore, clock: Clock) -> None:
    """state() answers absent, in_progress (also once the lease expired), completed, released and
    dead_lettered."""
    assert await store.state("x") is RecordState.ABSENT
    lease = await claim_lease(store, "x")
    assert await store.state("x") is RecordState.IN_PROGRESS
    clock.now += LEASE + 1
    assert await store.state("x") is RecordState.IN_PROGRESS
    await store.complete(lease, TTL)
    assert await store.state("x") is RecordState.COMPLETED
    await store.mark_completed("y", TTL)
    assert await store.state("y") is RecordState.COMPLETED


async def test_scopes_keep_records_apart_and_share_the_clock(store: InMemoryDedupStore, clock: Clock) -> None:
    """scoped() gives one store per scope (the same object each time): an id completed in one scope
    is NEW in another; scopes share the clock and never hand out the same fencing token."""
    assert store.scope == "default"
    assert store.scoped("default") is store
    group2 = store.scoped("orders/group-2")
    assert store.scoped("orders/group-2") is group2
    assert group2.scoped("orders/group-2") is group2
    assert group2.scope == "orders/group-2"
    first = await claim_lease(store, "m1")
    await store.complete(first, TTL)
    other = await group2.claim("m1", LEASE)
    assert other.status is NEW
    assert other.lease is not None
    assert other.lease.fencing_token != first.fencing_token
    assert await group2.state("m1") is RecordState.IN_PROGRESS
    assert await store.state("m1") is RecordState.COMPLETED
    clock.now += TTL
    assert await store.state("m1") is RecordState.ABSENT
    assert isinstance(group2, DedupStore)


async def test_scoped_store_of_a_subclass_keeps_its_behaviour(clock: Clock) -> None:
    """A subclass's scoped stores are of that subclass and keep its attributes (a wrapper that
    counts claims counts them in every scope)."""

    class Counting(InMemoryDedupStore):
        def __init__(self) -> None:
            super().__init__(clock=clock)
            self.calls: list[str] = []

        async def claim(
            self, message_id: str, lease_seconds: float, fingerprint: str | None = None
        ) -> ClaimResult:
            self.calls.append(f"{self.scope}:{message_id}")
            return await super().claim(message_id, lease_seconds, fingerprint)

    parent = Counting()
    child = parent.scoped("s2")
    assert type(child) is Counting
    await parent.claim("a", LEASE)
    assert (await child.claim("a", LEASE)).status is NEW
    assert parent.calls == ["default:a", "s2:a"]


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


async def test_an_unrun_takeover_given_back_stays_a_takeover_and_is_not_charged(
    store: InMemoryDedupStore, clock: Clock
) -> None:
    """The embedded store's keep_takeover: as on Redis (tests/redis/test_dedup_store.py)."""
    dead = await store.claim("m", 1.0)
    assert dead.lease is not None
    clock.advance(2.0)
    taken = await store.claim("m", LEASE)
    assert (taken.takeover, taken.attempt) == (True, 2)
    assert taken.lease is not None
    assert await store.release(taken.lease, attempted=False, keep_takeover=True)
    assert await store.state("m") is RecordState.IN_PROGRESS
    assert not await store.complete(taken.lease, 60.0), "given back: no longer the owner"
    again = await store.claim("m", LEASE)
    assert (again.status, again.takeover, again.attempt) == (ClaimStatus.NEW, True, 2)
    assert again.lease is not None
    assert again.lease.fencing_token > taken.lease.fencing_token
