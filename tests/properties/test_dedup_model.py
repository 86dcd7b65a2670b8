"""Stateful property tests: both dedup stores against one small pure-Python model of the v2 contract.

A ``RuleBasedStateMachine`` claims (one id, or a batch), completes, releases (attempted or not),
extends, expires leases, marks dead letters (a live marker, or one whose window is made to pass),
forgets, marks completed and reads states, in any order, on a few ids; a stale lease stays in play
after it lost its claim. After every step it checks, against the model:

* every answer (status, takeover, attempt counter, whether an owner-checked call was accepted);
* fencing tokens strictly increase per id (on Redis: exactly +1 per claim for as long as the record
  lives; the embedded store hands out one family-wide increasing counter);
* at most one live lease per id (a claim during one is ``IN_PROGRESS``);
* a stale lease (taken over, completed, released, marked, forgotten) can never complete, release,
  extend or mark;
* ``state()`` of every id, and a live dead-letter marker is never ``is_completed``.

The embedded store runs on an injected clock, which the machine also jumps past TTLs and retention.
The Redis store runs on the session ``redis-server`` with a fresh scope per example; its leases and
markers are hours long, and the machine expires one by shortening it to 1 ms (``extend``) and polling
the server's clock until it passed: no sleeping, a bounded poll.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import pytest
import redis.asyncio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from _redis_server import RedisServer
from _support import Clock, eventually
from streamwarden._dedup import ClaimResult, ClaimStatus, DedupStore, InMemoryDedupStore, Lease, RecordState
from streamwarden._redis._dedup import RedisDedupStore

T = TypeVar("T")

IDS = ("a", "b", "c")
FINGERPRINTS = st.sampled_from([None, "sha256:1", "sha256:2"])
TINY = 0.001  # the shortest lease / marker: 1 ms on the Redis server's clock

NEW, DUPLICATE, IN_PROGRESS, CONFLICT = (
    ClaimStatus.NEW,
    ClaimStatus.DUPLICATE,
    ClaimStatus.IN_PROGRESS,
    ClaimStatus.CONFLICT,
)


@dataclass
class Record:
    """The model of one id's record."""

    state: str  # p in progress, c completed, r released, d dead-lettered (also once its window passed)
    fence: int  # fencing token of the last claim (0: none yet)
    by: tuple[str, int] | None  # (owner, token) of the lease that made the last transition; None: cut off
    attempts: int
    until: float  # p: lease end; d: marker end; c: TTL end
    keep: float  # r: the instant the record vanishes
    fingerprint: str | None = None


def identity(lease: Lease) -> tuple[str, int]:
    """A lease's identity (``extend`` returns a copy with another expiry)."""
    return (lease.owner, lease.fencing_token)


class DedupModel(RuleBasedStateMachine):
    """The machine; subclasses provide the store, its clock and how time passes."""

    LEASE: ClassVar[float]
    WINDOW: ClassVar[float]
    TTL: ClassVar[float]
    RETENTION: ClassVar[float]
    EXACT_FENCES: ClassVar[bool]

    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.store: DedupStore = self.run(self.open())
        self.records: dict[str, Record] = {}
        self.tokens: dict[str, list[int]] = {mid: [] for mid in IDS}
        self.issued: set[int] = set()

    # --- what subclasses provide --------------------------------------------------------------
    async def open(self) -> DedupStore:
        raise NotImplementedError

    async def close(self) -> None:
        """Release what :meth:`open` made."""

    def now(self) -> float:
        """The model's clock (the store's clock, or a virtual one)."""
        raise NotImplementedError

    async def pass_time(self, mid: str, seconds: float) -> None:
        """Let ``seconds`` pass, or until the deadline of ``mid``'s record has passed on the store."""
        raise NotImplementedError

    # --- plumbing -----------------------------------------------------------------------------
    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        try:
            self.run(self.close())
        finally:
            self.loop.close()

    def live(self, mid: str) -> Record | None:
        """The model record of ``mid`` unless it vanished (TTL or retention passed)."""
        record = self.records.get(mid)
        if record is None:
            return None
        now = self.now()
        gone = {
            "p": record.until + self.RETENTION <= now,
            "c": record.until <= now,
            "r": record.keep <= now,
            "d": record.until + self.RETENTION <= now,
        }[record.state]
        if gone:
            del self.records[mid]
            return None
        return record

    def owned(self, lease: Lease, state: str) -> Record | None:
        """The record when ``lease`` made its last transition and it is in ``state``."""
        record = self.live(lease.message_id)
        if record is not None and record.state == state and record.by == identity(lease):
            return record
        return None

    def expected_claim(self, mid: str, fingerprint: str | None) -> tuple[ClaimStatus, bool, int]:
        """Status, takeover and attempt counter the model expects; applies a NEW claim's effect."""
        now = self.now()
        record = self.live(mid)
        if record is not None:
            if record.state == "c":
                stored = record.fingerprint
                if fingerprint is not None and stored is not None and stored != fingerprint:
                    return CONFLICT, False, 0
                return DUPLICATE, False, 0
            if record.state == "p" and record.until > now:
                return IN_PROGRESS, False, 0
            if record.state == "d" and record.until > now:
                return DUPLICATE, False, 0
        takeover = record is not None and record.state == "p"
        attempts = (record.attempts if record is not None else 0) + 1
        return NEW, takeover, attempts

    def check_claim(self, mid: str, fingerprint: str | None, result: ClaimResult) -> Lease | None:
        status, takeover, attempts = self.expected_claim(mid, fingerprint)
        assert result.status is status, (mid, result, self.records.get(mid))
        if status is not NEW:
            assert result.lease is None
            return None
        lease = result.lease
        assert lease is not None
        assert lease.message_id == mid
        assert (result.takeover, result.attempt) == (takeover, attempts), (mid, result, self.records.get(mid))
        record = self.records.get(mid)
        history = self.tokens[mid]
        if self.EXACT_FENCES:
            assert lease.fencing_token == (record.fence if record is not None else 0) + 1
        assert not history or lease.fencing_token > history[-1], (history, lease)  # strictly increasing
        assert lease.fencing_token not in self.issued or self.EXACT_FENCES
        history.append(lease.fencing_token)
        self.issued.add(lease.fencing_token)
        self.records[mid] = Record(
            "p", lease.fencing_token, identity(lease), attempts, self.now() + self.LEASE, 0.0
        )
        return lease

    # --- rules --------------------------------------------------------------------------------
    @rule(target=leases, mid=st.sampled_from(IDS), fingerprint=FINGERPRINTS)
    def claim(self, mid: str, fingerprint: str | None) -> Any:
        result = self.run(self.store.claim(mid, self.LEASE, fingerprint))
        lease = self.check_claim(mid, fingerprint, result)
        return multiple() if lease is None else lease

    @rule(
        target=leases,
        mids=st.lists(st.sampled_from(IDS), min_size=1, max_size=4),
        fingerprint=FINGERPRINTS,
    )
    def claim_many(self, mids: list[str], fingerprint: str | None) -> Any:
        results = self.run(self.store.claim_many(mids, self.LEASE, [fingerprint] * len(mids)))
        assert len(results) == len(mids)
        got = [self.check_claim(mid, fingerprint, result) for mid, result in zip(mids, results, strict=True)]
        return multiple(*[lease for lease in got if lease is not None])

    @rule(lease=leases, fingerprint=FINGERPRINTS)
    def complete(self, lease: Lease, fingerprint: str | None) -> None:
        done = self.run(self.store.complete(lease, self.TTL, fingerprint))
        record = self.owned(lease, "p")
        if record is not None:
            record.state, record.until, record.fingerprint = "c", self.now() + self.TTL, fingerprint
            assert done is True
        else:
            assert done is (self.owned(lease, "c") is not None), (lease, self.records.get(lease.message_id))

    @rule(lease=leases, attempted=st.booleans())
    def release(self, lease: Lease, attempted: bool) -> None:
        done = self.run(self.store.release(lease, attempted=attempted))
        record = self.owned(lease, "p")
        if record is not None:
            record.state, record.keep = "r", self.now() + self.RETENTION
            if not attempted:
                record.attempts = max(record.attempts - 1, 0)
            assert done is True
        else:
            assert done is (self.owned(lease, "r") is not None), (lease, self.records.get(lease.message_id))

    @rule(lease=leases)
    def extend(self, lease: Lease) -> None:
        renewed = self.run(self.store.extend(lease, self.LEASE))
        record = self.owned(lease, "p")
        if record is None:
            assert renewed is None
            return
        assert renewed is not None
        assert identity(renewed) == identity(lease)
        record.until = self.now() + self.LEASE

    @rule(lease=leases)
    def expire(self, lease: Lease) -> None:
        """Shorten a lease that is still its owner's to 1 ms and let it run out (a paused owner)."""
        record = self.owned(lease, "p")
        if record is None:
            return
        assert self.run(self.store.extend(lease, TINY)) is not None
        record.until = self.now() + TINY
        self.run(self.pass_time(lease.message_id, TINY))

    @rule(lease=leases, short=st.booleans())
    def mark_dead_lettered(self, lease: Lease, short: bool) -> None:
        window = TINY if short else self.WINDOW
        done = self.run(self.store.mark_dead_lettered(lease, window))
        record = self.owned(lease, "p")
        if record is None:
            assert done is (self.owned(lease, "d") is not None), (lease, self.records.get(lease.message_id))
            return
        assert done is True
        record.state, record.until = "d", self.now() + window
        if short:  # let the window pass: the id is claimable again
            self.run(self.pass_time(lease.message_id, TINY))

    @rule(mid=st.sampled_from(IDS))
    def forget(self, mid: str) -> None:
        found = self.run(self.store.forget(mid))
        record = self.live(mid)
        assert found is (record is not None)
        if record is not None:
            record.state, record.by, record.attempts, record.fingerprint = "r", None, 0, None
            record.keep = self.now() + self.RETENTION

    @rule(mid=st.sampled_from(IDS), fingerprint=FINGERPRINTS)
    def mark_completed(self, mid: str, fingerprint: str | None) -> None:
        self.run(self.store.mark_completed(mid, self.TTL, fingerprint))
        record = self.live(mid)
        fence = record.fence if record is not None else 0
        self.records[mid] = Record("c", fence, None, 0, self.now() + self.TTL, 0.0, fingerprint)

    # --- invariants ---------------------------------------------------------------------------
    @invariant()
    def states_match_the_model(self) -> None:
        now = self.now()
        for mid in IDS:
            record = self.live(mid)
            if record is None:
                expected = RecordState.ABSENT
            elif record.state == "d":
                expected = RecordState.DEAD_LETTERED if record.until > now else RecordState.RELEASED
            else:
                expected = {
                    "p": RecordState.IN_PROGRESS,
                    "c": RecordState.COMPLETED,
                    "r": RecordState.RELEASED,
                }[record.state]
            assert self.run(self.store.state(mid)) is expected, (mid, record)
            completed = self.run(self.store.is_completed(mid))
            assert completed is (expected is RecordState.COMPLETED)  # a live marker never reads completed


class InMemoryModel(DedupModel):
    """The embedded store on an injected clock; the machine also jumps the clock past TTLs and retention."""

    LEASE = 10.0
    WINDOW = 10.0
    TTL = 500.0
    RETENTION = 100.0
    EXACT_FENCES = False

    async def open(self) -> DedupStore:
        self.clock = Clock()
        return InMemoryDedupStore(clock=self.clock, fence_retention=self.RETENTION).scoped("orders/group-1")

    def now(self) -> float:
        return self.clock.now

    async def pass_time(self, mid: str, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(seconds=st.sampled_from([TINY, 5.0, 10.0, 60.0, 100.0, 500.0]))
    def jump(self, seconds: float) -> None:
        """Time passes: leases, markers, retention and TTLs run out as they would."""
        self.clock.advance(seconds)


class RedisModel(DedupModel):
    """The Redis store on the session server, a fresh scope per example; nothing expires by itself.

    No local cache: every answer comes from Redis (:class:`CachedRedisModel` adds the cache)."""

    LEASE = 3600.0
    WINDOW = 3600.0
    TTL = 3600.0
    RETENTION = 3600.0
    EXACT_FENCES = True
    CACHE_SIZE: ClassVar[int] = 0
    port: ClassVar[int]

    async def open(self) -> DedupStore:
        self.virtual_now = 0.0
        self.client = redis.asyncio.Redis(host="127.0.0.1", port=self.port)
        self.redis_store = RedisDedupStore(
            self.client,
            scope=f"prop-{uuid.uuid4().hex}",
            fence_retention=self.RETENTION,
            local_cache_size=self.CACHE_SIZE,
        )
        return self.redis_store

    async def close(self) -> None:
        await self.redis_store.aclose()
        await self.client.aclose()

    def now(self) -> float:
        return self.virtual_now

    async def pass_time(self, mid: str, seconds: float) -> None:
        """Poll (bounded) until the record's deadline has passed on the Redis server's clock."""
        self.virtual_now += seconds
        key = self.redis_store.key(mid)

        async def passed() -> bool:
            raw = await self.client.hget(key, "e")
            server_seconds, micros = await self.client.time()
            return raw is None or int(raw) <= server_seconds * 1000 + micros // 1000

        await eventually(passed, 5.0, step=0, what=f"the deadline of {key} to pass")


class CachedRedisModel(RedisModel):
    """The Redis store with its local cache of completed ids answering what it knows."""

    CACHE_SIZE = 10_000


@pytest.fixture
def redis_port(redis_server: RedisServer) -> int:
    """The session server's port, handed to the Redis machine class."""
    RedisModel.port = redis_server.port
    return redis_server.port


def test_in_memory_store_follows_the_model() -> None:
    """InMemoryDedupStore answers every sequence of operations as the model does (clock jumps included)."""
    run_state_machine_as_test(
        InMemoryModel,
        settings=settings(max_examples=150, stateful_step_count=40, deadline=None, database=None),
    )


@pytest.mark.parametrize("machine", [RedisModel, CachedRedisModel], ids=["redis", "local-cache"])
def test_redis_store_follows_the_model(redis_port: int, machine: type[RedisModel]) -> None:
    """RedisDedupStore, with and without its local cache, answers every sequence of operations as the
    model does (exact fencing tokens)."""
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=25,
            stateful_step_count=25,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_the_model_catches_a_broken_store() -> None:
    """The machine is not vacuous: a store whose forget deletes the record (the seed's behaviour, which
    let fencing tokens restart and lost the attempt counter) is caught."""

    class ForgetDeletes(InMemoryDedupStore):
        async def forget(self, message_id: str) -> bool:
            found = await super().forget(message_id)
            self._parked.pop(message_id, None)  # drop the record: history and attempt counter lost
            self._attempts.pop(message_id, None)
            return found

    class BrokenModel(InMemoryModel):
        async def open(self) -> DedupStore:
            self.clock = Clock()
            return ForgetDeletes(clock=self.clock, fence_retention=self.RETENTION)

    with pytest.raises(AssertionError):
        run_state_machine_as_test(
            BrokenModel,
            settings=settings(max_examples=300, stateful_step_count=40, deadline=None, database=None),
        )
