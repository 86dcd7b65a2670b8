"""The transport-neutral runner core, driven through an in-memory consumer group.

Time is injected (a hand-moved clock, sleeps that record or wait for the test), and concurrency is
ordered with ``asyncio.Event``: nothing here waits on the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import pytest
from _memory_transport import MemoryGroup, Refused

import streamwarden as sw
from _support import Clock, Otel, RecordingSleep
from streamwarden._dedup import InMemoryDedupStore, RecordState
from streamwarden._retry import ExponentialBackoff
from streamwarden._runners._core import ConsumerRunner

SETTINGS: dict[str, Any] = {
    "dedup_lease": 10.0,
    "processing_timeout": 5.0,
    "retry_initial_delay": 0.001,
    "retry_max_delay": 0.01,
}


class Handler:
    """An async callable object: records runs and what ran beside each; chosen ids wait for release."""

    def __init__(self, *blocking: str, fail: Callable[[str], BaseException | None] | None = None) -> None:
        self.blocking = set(blocking)
        self.fail = fail
        self.started: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.release: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.running: set[str] = set()
        self.alongside: dict[str, set[str]] = {}
        self.runs: Counter[str] = Counter()
        self.order: list[str] = []

    async def __call__(self, env: sw.Envelope) -> str:
        mid = env.id
        self.alongside[mid] = set(self.running)
        self.running.add(mid)
        self.runs[mid] += 1
        self.order.append(mid)
        self.started[mid].set()
        try:
            if mid in self.blocking:
                await self.release[mid].wait()
            error = self.fail(mid) if self.fail is not None else None
            if error is not None:
                raise error
        finally:
            self.running.discard(mid)
        return mid

    def release_all(self) -> None:
        for mid in self.blocking:
            self.release[mid].set()


class HeldSleep:
    """An injected sleep: delays for which ``hold`` is true wait until :attr:`released` is set; all move
    the clock by the delay and are recorded."""

    def __init__(self, clock: Clock, hold: Callable[[float], bool]) -> None:
        self.clock = clock
        self.hold = hold
        self.delays: list[float] = []
        self.released = asyncio.Event()
        self.holding = asyncio.Event()

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.hold(delay):
            self.holding.set()
            await self.released.wait()
        self.clock.advance(delay)


class RecordingStore(InMemoryDedupStore):
    """The embedded dedup store, logging every batch of ids claimed (shared by its scoped copies)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.claimed: list[list[str]] = []

    async def claim_many(self, message_ids: Any, lease_seconds: float, fingerprints: Any = None) -> Any:
        self.claimed.append(list(message_ids))
        return await super().claim_many(message_ids, lease_seconds, fingerprints)


async def until(condition: Callable[[], bool], *, turns: int = 20_000) -> None:
    """Let the loop run until ``condition()`` holds (fails after ``turns`` scheduler turns)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def settle(turns: int = 200) -> None:
    """Give every ready task a chance to run (to show that something does NOT happen)."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def started(handler: Handler, ids: Iterable[str]) -> None:
    for mid in ids:
        await handler.started[mid].wait()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_layer(otel: Otel, clock: Clock) -> Callable[..., sw.ReliabilityLayer]:
    def make(dedup_store: Any = None, **settings: Any) -> sw.ReliabilityLayer:
        return sw.ReliabilityLayer(
            None,
            sw.ReliabilitySettings(**{**SETTINGS, **settings}),
            dedup_store=dedup_store,
            clock=clock,
            tracer_provider=otel.tracer_provider,
            meter_provider=otel.meter_provider,
        )

    return make


@contextlib.asynccontextmanager
async def running(
    runner: ConsumerRunner, handler: Handler | None = None
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(runner.run())
    try:
        yield task
    finally:
        if handler is not None:
            handler.release_all()
        runner.stop()
        await asyncio.wait_for(task, timeout=30)  # a safety net; the tests order everything with events


# --- finding 1: no more work taken than there are slots ---------------------------------------------------
async def test_reads_never_more_entries_than_free_slots(
    clock: Clock, make_layer: Callable[..., sw.ReliabilityLayer]
) -> None:
    """With every slot busy nothing is read; each read asks for exactly the free slots."""
    group = MemoryGroup(clock)
    for i in range(6):
        group.add(f"m{i}")
    handler = Handler(*(f"m{i}" for i in range(6)))
    runner = ConsumerRunner(
        group, handler=handler, layer=make_layer(), concurrency=3, batch_size=8, clock=clock,
        sleep=RecordingSleep(clock),
    )  # fmt: skip
    async with running(runner, handler):
        await started(handler, ["m0", "m1", "m2"])
        await settle()
        assert group.reads == [3]
        assert not handler.started["m3"].is_set()
        handler.release["m0"].set()
        await handler.started["m3"].wait()
        await settle()
        assert group.reads == [3, 1]
        assert max(len(a) for a in handler.alongside.values()) <= 2


async def test_reclaims_never_more_entries_than_free_slots(
    clock: Clock, make_layer: Callable[..., sw.ReliabilityLayer]
) -> None:
    """A reclaim takes over at most as many idle entries as there are free slots (not a whole batch)."""
    group = MemoryGroup(clock, claim_idle=1.0)
    for i in range(10):
        group.orphan(f"o{i}")
    clock.advance(2.0)
    handler = Handler(*(f"o{i}" for i in range(10)))
    runner = ConsumerRunner(
        group, handler=handler, layer=make_layer(), concurrency=2, batch_size=64, clock=clock,
        sleep=RecordingSleep(clock),
    )  # fmt: skip
    async with running(runner, handler):
        await started(handler, ["o0", "o1"])
        await settle()
        assert group.reclaims == [2]
        assert sum(1 for p in group.pending.values() if p.consumer == "c1") == 2
        assert sum(1 for p in group.pending.values() if p.consumer == "dead") == 8


async def test_claims_are_made_only_for_entries_that_start_now(
    clock: Clock, make_layer: Callable[..., sw.ReliabilityLayer]
) -> None:
    """Every batch claim covers only entries with a free slot, so no lease runs down waiting for one."""
    store = RecordingStore(clock=clock)
    group = MemoryGroup(clock)
    for i in range(7):
        group.add(f"m{i}")
    handler = Handler(*(f"m{i}" for i in range(7)))
    runner = ConsumerRunner(
        group,
        handler=handler,
        layer=make_layer(store),
        concurrency=3,
        clock=clock,
        sleep=RecordingSleep(clock),
    )
    async with running(runner, handler):
        await started(handler, ["m0", "m1", "m2"])
        for i in range(3):
            handler.release[f"m{i}"].set()
            await handler.started[f"m{i + 3}"].wait()
        await settle()
        assert store.claimed == [["m0", "m1", "m2"], ["m3"], ["m4"], ["m5"]]


# --- finding 3: suspects (takeovers) run alone ------------------------------------------------------------
async def test_a_takeover_runs_alone_and_nothing_new_starts_beside_it(
    clock: Clock, make_layer: Callable[..., sw.ReliabilityLayer]
) -> None:
    """A claim that took over a dead owner's lease waits until nothing runs, runs alone, then reading resumes."""
    layer = make_layer()
    group = MemoryGroup(clock)
    handler = Handler("h1", "h2", "k")
    runner = ConsumerRunner(
        group, handler=handler, layer=layer, concurrency=4, clock=clock, sleep=RecordingSleep(clock)
    )
    scoped = layer.dedup_store_for("orders")
    await scoped.claim("k", 10.0)  # an owner that died mid-run
    clock.advance(11.0)
    async with running(runner, handler):
        group.add("h1")
        await handler.started["h1"].wait()
        group.add("k")
        group.add("h2")
        await handler.started["h2"].wait()  # its batch-mate runs beside older work, before the suspect
        group.add("h3")
        await settle()
        assert not handler.started["k"].is_set(), "the suspect waits for the others"
        assert not handler.started["h3"].is_set(), "nothing new is read while a suspect waits"
        handler.release["h1"].set()
        handler.release["h2"].set()
        await handler.started["k"].wait()
        assert handler.alongside["k"] == set()
        await settle()
        assert not handler.started["h3"].is_set(), "nothing new starts beside the suspect"
        handler.release["k"].set()
        await handler.started["h3"].wait()
        assert "k" not in handler.alongside["h3"]
    assert runner.stats.isolated == 1
    assert layer.metrics_collector.counts["dedup_takeovers"] == 1


async def test_reclaimed_entries_are_claimed_one_at_a_time_and_none_behind_a_suspect(
    clock: Clock, make_layer: Callable[..., sw.ReliabilityLayer]
) -> None:
    """Two crashed entries: the second is not claimed (no attempt charged) until the first ran alone."""
    store = RecordingStore(clock=clock)
    layer = make_layer(store)
    group = MemoryGroup(clock, claim_idle=1.0)
    handler = Handler("a", "b")
    runner = ConsumerRunner(
        group, handler=handler, layer=layer, concurrency=4, clock=clock, sleep=RecordingSleep(clock)
    )
    scoped = layer.dedup_store_for("orders")
    for mid in ("a", "b"):
        await scoped.claim(mid, 10.0)
        group.orphan(mid)
    clock.advance(11.0)
    async with running(runner, handler):
        await handler.started["a"].wait()
        await settle()
        assert store.claimed == [["a"]], "b is not claimed while the suspect a may still crash the process"
        assert not handler.started["b"].is_set()
        handler.release["a"].set()
        await handler.started["b"].wait()
        assert handler.alongside["b"] == set()
        assert store.claimed == [["a"], ["b"]]
    assert runner.stats.isolated == 2


async def test_takeovers_read_in_one_batch_run_alone_one_after_another_and_only_runs_are_charged(
    clock: Clock, make_layer: Callable[..., sw.ReliabilityLayer]
) -> None:
    """Kafka hands a dead member's records back through read(), all in one batch: only the first
    takeover is kept as the suspect; the other takeovers (and a record chained behind one) are given
    back unrun, still takeovers, and claimed one at a time after it. No attempt is charged for a run
    that did not happen (the issue-12 fault: healthy batch-mates of a killer reached poison unrun)."""
    layer = make_layer(poison_max_deliveries=2)  # the dead member's run + this one: a leaked charge is poison
    group = MemoryGroup(clock)
    handler = Handler("t1", "t2", "t3")
    runner = ConsumerRunner(
        group, handler=handler, layer=layer, concurrency=8, clock=clock, sleep=RecordingSleep(clock)
    )
    scoped = layer.dedup_store_for("orders")
    for mid in ("t1", "t2", "t3"):
        await scoped.claim(mid, 10.0)  # a member that died holding them (one run charged each)
    clock.advance(11.0)
    for mid in ("t1", "n1", "t2", "t3"):
        group.add(mid)
    async with running(runner, handler):
        await handler.started["t1"].wait()
        await settle()
        assert handler.alongside["t1"] <= {"n1"}, "the first suspect waits for nothing but its batch-mates"
        assert not handler.started["t2"].is_set()
        assert not handler.started["t3"].is_set()
        for mid in ("t2", "t3"):  # given back as they were: in progress, expired, the unrun claim not charged
            assert await scoped.state(mid) is RecordState.IN_PROGRESS
        handler.release["t1"].set()
        await handler.started["t2"].wait()
        await settle()
        assert handler.alongside["t2"] == set(), "the second takeover runs alone too"
        assert not handler.started["t3"].is_set()
        handler.release["t2"].set()
        await handler.started["t3"].wait()
        assert handler.alongside["t3"] == set()
        handler.release["t3"].set()
        await until(lambda: len(group.acked) == 4)
    assert runner.stats.isolated == 3
    assert layer.metrics_collector.counts["dedup_takeovers"] == 3
    assert runner.stats.outcomes == {"processed": 4}, "no takeover reached poison on charges for unrun claims"
    assert [handler.runs[mid] for mid in ("t1", "t2", "t3")] == [1, 1, 1]


# --- finding 7: nothing escapes a message task; the consumer keeps consuming ------------------------------
class CustomBase(BaseException):
    """A BaseException a handler library might define."""


ESCAPES = [SystemExit(3), KeyboardInterrupt(), asyncio.CancelledError(), CustomBase("boom")]


@pytest.mark.parametrize("escape", ESCAPES, ids=lambda e: type(e).__name__)
async def test_base_exception_from_the_handler_fails_that_message_only(
    clock: Clock, make_layer: Callable[..., sw.ReliabilityLayer], escape: BaseException
) -> None:
    """A handler raising SystemExit / KeyboardInterrupt / its own CancelledError / a custom BaseException
    fails that message; the others are processed and the consumer keeps running."""
    group = MemoryGroup(clock)
    handler = Handler("ok1", fail=lambda mid: escape if mid == "bad" else None)
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
    runner = ConsumerRunner(
        group, handler=handler, layer=make_layer(), clock=clock, sleep=RecordingSleep(clock)
    )
    async with running(runner, handler) as task:
        group.add("ok1")
        group.add("bad")
        group.add("ok2")
        await handler.started["ok2"].wait()
        handler.release["ok1"].set()
        await until(lambda: len(group.ack_calls) >= 1 and set(group.acked_ids()) >= {"ok1", "ok2"})
        group.add("ok3")
        await until(lambda: "ok3" in group.acked_ids())
        assert not task.done()
    assert runner.stats.escaped == 0, "the layer turned it into a failed message"
    assert runner.stats.outcomes.get("processed") == 3
    assert runner.stats.outcomes.get("dead_lettered", 0) + runner.stats.outcomes.get("failed", 0) == 1
    assert errors == []


class LeakyLayer(sw.ReliabilityLayer):
    """A layer with a bug: a BaseException escapes ``process`` for one message id."""

    escape: BaseException = SystemExit(3)

    async def process(self, message: Any, processor: Any, **options: Any) -> Any:
        if isinstance(message, sw.Envelope) and message.id == "leak":
            raise self.escape
        return await super().process(message, processor, **options)


@pytest.mark.parametrize("escape", ESCAPES, ids=lambda e: type(e).__name__)
async def test_an_exception_escaping_the_layer_is_observed_and_not_acknowledged(
    clock: Clock, otel: Otel, escape: BaseException
) -> None:
    """Whatever escapes ``layer.process`` ends that message unacknowledged; the loop never sees it."""
    layer = LeakyLayer(
        None, sw.ReliabilitySettings(**SETTINGS), clock=clock, meter_provider=otel.meter_provider
    )
    layer.escape = escape
    group = MemoryGroup(clock)
    handler = Handler()
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
    runner = ConsumerRunner(group, handler=handler, layer=layer, clock=clock, sleep=RecordingSleep(clock))
    async with running(runner, handler) as task:
        group.add("leak")
        group.add("after")
        await until(lambda: "after" in group.acked_ids())
        assert not task.done()
    assert runner.stats.escaped == 1
    assert group.given_back == list(group.refs_of("leak"))
    assert "leak" not in group.acked_ids()
    assert errors == []


# --- finding 4: graceful shutdown ---------------------------------------------------------------------------
async def test_shutdown_waits_for_in_flight_work_then_abandons_it_unacknowledged(
    clock: Clock, make_layer: Callable[..., sw.ReliabilityLayer]
) -> None:
    """stop(): in-flight messages get shutdown_timeout; what finishes is acked, the rest is not, and its
    claim is kept, so the redelivery is a counted takeover."""
    layer = make_layer()
    group = MemoryGroup(clock, claim_idle=1.0)
    handler = Handler("slow", "stuck")
    sleep = HeldSleep(clock, hold=lambda delay: delay == 7.25)
    runner = ConsumerRunner(
        group, handler=handler, layer=layer, shutdown_timeout=7.25, clock=clock, sleep=sleep
    )
    task = asyncio.create_task(runner.run())
    for mid in ("done", "slow", "stuck"):
        group.add(mid)
    await started(handler, ["done", "slow", "stuck"])
    await until(lambda: "done" in group.acked_ids())
    runner.stop()
    await sleep.holding.wait()  # the drain waits for the shutdown deadline
    handler.release["slow"].set()
    await until(lambda: "slow" in group.acked_ids())
    assert not task.done()
    sleep.released.set()  # the deadline passes: "stuck" is cancelled
    await asyncio.wait_for(task, timeout=30)
    assert sorted(group.acked_ids()) == ["done", "slow"]
    assert group.given_back == list(group.refs_of("stuck"))
    store = layer.dedup_store_for("orders")
    assert await store.state("stuck") == RecordState.IN_PROGRESS, "the claim is kept, not released"

    # the next consumer takes it over after the lease: a counted takeover, not an uncounted re-run
    group.consumer = "c2"
    clock.advance(11.0)
    handler.blocking.clear()
    second = ConsumerRunner(group, handler=handler, layer=layer, clock=clock, sleep=RecordingSleep(clock))
    async with running(second):
        await until(lambda: "stuck" in group.acked_ids())
    assert handler.runs["stuck"] == 2
    assert layer.metrics_collector.counts["dedup_takeovers"] == handler.runs["stuck"] - 1


# --- back-off and configuration errors ----------------------------------------------------------------------
async def test_transient_errors_back_off_with_the_injected_backoff_and_reset_after_success(
    clock: Clock, make_layer: Callable[..., sw.ReliabilityLayer]
) -> None:
    """Broker errors sleep backoff.compute(1, 2, 3...) on the injected sleep; a success starts over at 1."""
    group = MemoryGroup(clock)
    for text in ("a", "b", "c"):
        group.fail(ConnectionError(text))
    sleep = RecordingSleep(clock)
    twin = ExponentialBackoff(base=0.05, cap=0.15, rng=random.Random(7))
    runner = ConsumerRunner(
        group, handler=Handler(), layer=make_layer(), clock=clock, sleep=sleep,
        backoff=ExponentialBackoff(base=0.05, cap=0.15, rng=random.Random(7)),
    )  # fmt: skip
    async with running(runner):
        group.add("m0")
        await until(lambda: "m0" in group.acked_ids())
        group.fail(ConnectionError("d"))
        group.add("m1")
        await until(lambda: "m1" in group.acked_ids())
    expected = [twin.compute(1), twin.compute(2), twin.compute(3), twin.compute(1)]
    assert sleep.delays == expected
    assert all(d <= bound for d, bound in zip(sleep.delays, [0.05, 0.1, 0.15, 0.05], strict=True))
    assert runner.stats.redis_errors == 4


async def test_a_configuration_error_stops_run_after_draining(
    clock: Clock, make_layer: Callable[..., sw.ReliabilityLayer]
) -> None:
    """A refusal retrying cannot fix ends run() with a ConfigurationError, after in-flight work finished."""
    group = MemoryGroup(clock)
    handler = Handler("m0")
    sleep = HeldSleep(clock, hold=lambda delay: delay == 30.0)  # the shutdown deadline never passes
    runner = ConsumerRunner(group, handler=handler, layer=make_layer(), clock=clock, sleep=sleep)
    task = asyncio.create_task(runner.run())
    group.add("m0")
    await handler.started["m0"].wait()
    group.fail(Refused("NOPERM no access to 'orders'"))
    await until(lambda: runner.stopping)
    health = await runner.health()
    assert not health.ready
    assert "configuration error" in health.reason
    handler.release["m0"].set()
    with pytest.raises(sw.ConfigurationError, match="refused: NOPERM no access") as raised:
        await asyncio.wait_for(task, timeout=30)
    assert "\n" not in str(raised.value)
    assert group.acked_ids() == ["m0"]
    assert runner.stats.redis_errors == 0, "not retried"


# --- backpressure and health ------------------------------------------------------------------------------
async def test_open_breaker_pauses_reading_until_its_timeout_and_readiness_says_so(
    clock: Clock, make_layer: Callable[..., sw.ReliabilityLayer]
) -> None:
    """The breaker opens: the runner sleeps its retry_after (not ready meanwhile), then reads the trial."""
    layer = make_layer(
        circuit_breaker_threshold=1,
        circuit_breaker_timeout=5.0,
        max_retries=0,
        exhausted_transient_action="defer",
    )
    group = MemoryGroup(clock)
    handler = Handler(fail=lambda mid: ConnectionError("down") if mid == "bad" else None)
    sleep = HeldSleep(clock, hold=lambda delay: delay >= 1.0)
    runner = ConsumerRunner(group, handler=handler, layer=layer, clock=clock, sleep=sleep)
    async with running(runner):
        group.add("bad")
        await until(lambda: runner.stats.outcomes.get("deferred") == 1)
        group.poke()  # the read in flight returns empty, as XREADGROUP does when BLOCK runs out
        await sleep.holding.wait()
        health = await runner.health()
        assert (health.ready, health.paused_for_breaker) == (False, True)
        assert "circuit breaker open" in health.reason
        reads = len(group.reads)
        group.add("ok")
        await settle()
        assert len(group.reads) == reads, "nothing is read while the breaker is open"
        sleep.released.set()
        await until(lambda: "ok" in group.acked_ids())
        assert layer.circuit_breaker.state == "closed"
        assert (await runner.health()).ready
    assert sleep.delays == [pytest.approx(5.0)]
    assert runner.stats.paused_for_breaker == 1


async def test_readiness_follows_the_run_loop(
    clock: Clock, make_layer: Callable[..., sw.ReliabilityLayer]
) -> None:
    """Ready only while run() consumes: not before it starts, not after it stopped."""
    group = MemoryGroup(clock)
    runner = ConsumerRunner(
        group, handler=Handler(), layer=make_layer(), clock=clock, sleep=RecordingSleep(clock)
    )
    before = await runner.health()
    assert not before.ready
    assert "not consuming" in before.reason
    async with running(runner):
        group.add("m0")
        await until(lambda: "m0" in group.acked_ids())
        during = await runner.health()
        assert during.ready, during.reason
        assert (during.lag, during.pending) == (0, 0)
    after = await runner.health()
    assert not after.ready
    assert not after.consuming


async def test_transient_errors_make_the_consumer_not_ready_until_it_recovers(
    clock: Clock, make_layer: Callable[..., sw.ReliabilityLayer]
) -> None:
    """While backing off from broker errors /readyz says so; the next success makes it ready again."""
    group = MemoryGroup(clock)
    sleep = HeldSleep(clock, hold=lambda delay: True)
    runner = ConsumerRunner(group, handler=Handler(), layer=make_layer(), clock=clock, sleep=sleep)
    async with running(runner):
        group.fail(ConnectionError("gone"))
        await sleep.holding.wait()
        health = await runner.health()
        assert not health.ready
        assert health.backing_off
        sleep.released.set()
        group.add("m0")
        await until(lambda: "m0" in group.acked_ids())
        assert (await runner.health()).ready


# --- ordering and acknowledgement ---------------------------------------------------------------------------
async def test_messages_sharing_a_key_run_in_order_and_are_claimed_when_their_turn_comes(
    clock: Clock, make_layer: Callable[..., sw.ReliabilityLayer]
) -> None:
    """Per-key order: a2 waits for a1 (and is claimed only then); b1 runs meanwhile."""
    store = RecordingStore(clock=clock)
    group = MemoryGroup(clock)
    group.add("a1", key="a")
    group.add("b1", key="b")
    group.add("a2", key="a")
    handler = Handler("a1")
    runner = ConsumerRunner(
        group, handler=handler, layer=make_layer(store), clock=clock, sleep=RecordingSleep(clock)
    )
    async with running(runner, handler):
        await started(handler, ["a1", "b1"])
        await settle()
        assert not handler.started["a2"].is_set()
        assert store.claimed == [["a1", "b1"]]
        handler.release["a1"].set()
        await handler.started["a2"].wait()
        await until(lambda: len(group.acked) == 3)
    assert handler.order.index("a2") > handler.order.index("a1")
    assert store.claimed == [["a1", "b1"], ["a2"]]


async def test_the_same_id_twice_in_flight_runs_once_and_both_entries_are_acked(
    clock: Clock, make_layer: Callable[..., sw.ReliabilityLayer]
) -> None:
    """A re-sent id read with its first copy waits for it and is answered as a duplicate (acked)."""
    group = MemoryGroup(clock)
    group.add("dup")
    group.add("dup")
    handler = Handler()
    runner = ConsumerRunner(
        group, handler=handler, layer=make_layer(), clock=clock, sleep=RecordingSleep(clock)
    )
    async with running(runner):
        await until(lambda: len(group.acked) == 2)
    assert handler.runs["dup"] == 1
    assert runner.stats.outcomes == {"processed": 1, "duplicate": 1}


async def test_acks_of_messages_finishing_together_go_in_one_call(
    clock: Clock, make_layer: Callable[..., sw.ReliabilityLayer]
) -> None:
    """Group commit: what finishes while one ack call is in flight is acknowledged by the next, together."""
    group = MemoryGroup(clock)
    group.ack_gate = asyncio.Event()
    handler = Handler()
    runner = ConsumerRunner(
        group, handler=handler, layer=make_layer(), clock=clock, sleep=RecordingSleep(clock)
    )
    async with running(runner):
        group.add("m0")
        await until(lambda: len(group.ack_calls) == 1)
        for i in range(1, 5):
            group.add(f"m{i}")
        await until(lambda: runner.stats.outcomes.get("processed") == 5)
        group.ack_gate.set()
        await until(lambda: len(group.acked) == 5)
    assert [len(call) for call in group.ack_calls] == [1, 4]
    assert runner.stats.acked == 5


async def test_the_worker_pool_runs_handlers_that_wait_concurrently_up_to_the_limit(
    clock: Clock, make_layer: Callable[..., sw.ReliabilityLayer]
) -> None:
    """Messages free to start run on long-lived workers, not a task each: handlers that await run side by
    side, never more than ``concurrency`` at once, and the pool never grows past ``concurrency``."""
    group = MemoryGroup(clock)
    ids = [f"w{i}" for i in range(12)]
    for mid in ids:
        group.add(mid)
    handler = Handler(*ids)  # every handler blocks until released
    runner = ConsumerRunner(
        group, handler=handler, layer=make_layer(), concurrency=5, clock=clock, sleep=RecordingSleep(clock)
    )
    async with running(runner):
        await until(lambda: sum(1 for mid in ids if handler.started[mid].is_set()) == 5)
        await settle()
        assert sum(1 for mid in ids if handler.started[mid].is_set()) == 5, "no more than concurrency"
        assert runner.in_flight == 5
        assert len(runner._workers) == 5
        handler.release_all()
        await until(lambda: len(group.acked) == 12)
    assert runner.stats.outcomes == {"processed": 12}
    assert not runner._workers, "the workers end with the runner"


async def test_a_handler_that_never_awaits_runs_a_whole_batch_on_one_worker(
    clock: Clock, make_layer: Callable[..., sw.ReliabilityLayer]
) -> None:
    """The baton: a worker wakes the next only when it takes a job with more queued; a handler that never
    suspends lets one worker run the batch, so the pool costs no event-loop round per message."""
    group = MemoryGroup(clock)
    for i in range(40):
        group.add(f"q{i}")
    handler = Handler()
    runner = ConsumerRunner(
        group, handler=handler, layer=make_layer(), concurrency=64, clock=clock, sleep=RecordingSleep(clock)
    )
    async with running(runner):
        await until(lambda: len(group.acked) == 40)
        assert len(runner._workers) <= 2
    assert runner.stats.outcomes == {"processed": 40}
