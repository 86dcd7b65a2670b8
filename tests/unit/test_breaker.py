"""Circuit breaker state machine, driven by a controllable clock; concurrency ordered with asyncio.Event."""

from __future__ import annotations

import asyncio
import logging

import pytest

from _support import Clock
from streamwarden import (
    BreakerPolicy,
    BreakerRegistry,
    BreakerRejection,
    BreakerState,
    BreakerTransition,
    CircuitBreaker,
    CircuitOpenError,
    ErrorClass,
    ReliabilitySettings,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def make_breaker(
    threshold: int = 3, reset_timeout: float = 30.0, name: str = "db"
) -> tuple[CircuitBreaker, Clock]:
    clock = Clock(100.0)
    breaker = CircuitBreaker(
        BreakerPolicy(failure_threshold=threshold, reset_timeout=reset_timeout), name=name, clock=clock
    )
    return breaker, clock


def fail(breaker: CircuitBreaker, error_class: ErrorClass = ErrorClass.TRANSIENT, times: int = 1) -> None:
    for _ in range(times):
        breaker.record_failure(breaker.admit(), ConnectionError("down"), error_class)


def succeed(breaker: CircuitBreaker) -> None:
    breaker.record_success(breaker.admit())


def trip(breaker: CircuitBreaker) -> None:
    fail(breaker, times=breaker.policy.failure_threshold)
    assert breaker.state == OPEN


# --- closed -> open -----------------------------------------------------------------------------


def test_opens_after_threshold_consecutive_transient_failures() -> None:
    """``failure_threshold`` consecutive transient failures open the breaker; one fewer does not."""
    breaker, _ = make_breaker(threshold=3)
    fail(breaker, times=2)
    assert breaker.state == CLOSED
    assert breaker.failure_count == 2
    fail(breaker)
    assert breaker.state == OPEN


def test_unknown_failures_count_toward_opening() -> None:
    """Unknown failures count like transient ones."""
    breaker, _ = make_breaker(threshold=3)
    fail(breaker, ErrorClass.UNKNOWN, times=2)
    fail(breaker, ErrorClass.TRANSIENT)
    assert breaker.state == OPEN


def test_permanent_failures_never_open_it() -> None:
    """Any number of permanent failures leaves the breaker closed with no failures counted."""
    breaker, _ = make_breaker(threshold=2)
    fail(breaker, ErrorClass.PERMANENT, times=50)
    assert breaker.state == CLOSED
    assert breaker.failure_count == 0


def test_permanent_failure_resets_the_consecutive_count() -> None:
    """A permanent failure is an answer from the dependency (pybreaker "excluded"): the streak restarts."""
    breaker, _ = make_breaker(threshold=3)
    fail(breaker, times=2)
    fail(breaker, ErrorClass.PERMANENT)
    assert breaker.failure_count == 0
    fail(breaker, times=2)
    assert breaker.state == CLOSED
    fail(breaker)
    assert breaker.state == OPEN


def test_success_resets_the_consecutive_count() -> None:
    """Failures must be consecutive: a success in between restarts the count."""
    breaker, _ = make_breaker(threshold=3)
    fail(breaker, times=2)
    succeed(breaker)
    assert breaker.failure_count == 0
    fail(breaker, times=2)
    assert breaker.state == CLOSED


def test_policy_can_come_from_seed_settings() -> None:
    """The seed passes its settings object: threshold and timeout are taken from it."""
    settings = ReliabilitySettings(circuit_breaker_threshold=2, circuit_breaker_timeout=7)
    breaker = CircuitBreaker(settings)
    assert breaker.policy == BreakerPolicy(failure_threshold=2, reset_timeout=7.0)
    fail(breaker, times=2)
    assert breaker.state == OPEN


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"failure_threshold": 0}, id="zero-threshold"),
        pytest.param({"reset_timeout": 0.0}, id="zero-timeout"),
        pytest.param({"reset_timeout": -1.0}, id="negative-timeout"),
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    """A breaker that could never close or open is refused."""
    with pytest.raises(ValueError, match=r"failure_threshold|reset_timeout"):
        BreakerPolicy(**kwargs)  # type: ignore[arg-type]


# --- open ---------------------------------------------------------------------------------------


def test_open_breaker_rejects_with_remaining_time() -> None:
    """While open, ``admit`` raises CircuitOpenError whose retry_after is the time left on the clock."""
    breaker, clock = make_breaker(threshold=1, reset_timeout=30.0)
    trip(breaker)
    clock.now += 12.5

    with pytest.raises(CircuitOpenError) as caught:
        breaker.admit()

    assert caught.value.retry_after == pytest.approx(17.5)
    assert caught.value.name == "db"
    assert breaker.retry_after() == pytest.approx(17.5)
    assert breaker.state == OPEN


def test_open_breaker_rejects_until_exactly_the_reset_timeout() -> None:
    """Just before ``reset_timeout`` it still rejects; at the timeout it admits a trial."""
    breaker, clock = make_breaker(threshold=1, reset_timeout=30.0)
    trip(breaker)
    clock.now += 29.999
    with pytest.raises(CircuitOpenError):
        breaker.admit()
    clock.now += 0.001
    admission = breaker.admit()
    assert admission.trial
    assert breaker.state == HALF_OPEN


async def test_async_with_raises_while_open_without_running_the_body() -> None:
    """The seed's ``async with breaker:`` raises CircuitOpenError before the body runs."""
    breaker, _ = make_breaker(threshold=1)
    trip(breaker)
    ran = False
    with pytest.raises(CircuitOpenError):
        async with breaker:
            ran = True
    assert not ran


def test_state_stays_open_after_timeout_until_someone_asks() -> None:
    """An elapsed open timeout shows as open; the half-open move happens on the next admission."""
    breaker, clock = make_breaker(threshold=1, reset_timeout=5.0)
    trip(breaker)
    clock.now += 60
    assert breaker.state == OPEN
    assert breaker.retry_after() == 0.0
    breaker.admit()
    assert breaker.state == HALF_OPEN


# --- half-open ----------------------------------------------------------------------------------


async def test_half_open_admits_exactly_one_of_50_concurrent_callers() -> None:
    """After the reset timeout, 50 concurrent ``async with`` callers: one trial admitted, 49 rejected."""
    breaker, clock = make_breaker(threshold=2, reset_timeout=10.0)
    trip(breaker)
    clock.now += 10.0
    rejections: list[BreakerRejection] = []
    breaker.add_rejection_listener(rejections.append)

    finish_trial = asyncio.Event()
    all_tried = asyncio.Event()
    tried = 0

    def mark_tried() -> None:
        nonlocal tried
        tried += 1
        if tried == 50:
            all_tried.set()

    async def caller() -> str:
        try:
            async with breaker:
                mark_tried()
                await finish_trial.wait()  # hold the trial open while everyone else arrives
                return "admitted"
        except CircuitOpenError:
            mark_tried()
            return "rejected"

    tasks = [asyncio.create_task(caller()) for _ in range(50)]
    await all_tried.wait()
    assert breaker.state == HALF_OPEN
    finish_trial.set()
    results = await asyncio.gather(*tasks)

    assert results.count("admitted") == 1
    assert results.count("rejected") == 49
    assert len(rejections) == 49
    assert {(r.state, r.retry_after) for r in rejections} == {(HALF_OPEN, 0.0)}
    assert breaker.state == CLOSED  # the trial succeeded


def test_trial_success_closes_and_resets_the_count() -> None:
    """A successful trial closes the breaker; it then needs a full threshold of failures to open again."""
    breaker, clock = make_breaker(threshold=2, reset_timeout=10.0)
    trip(breaker)
    clock.now += 10.0
    succeed(breaker)
    assert breaker.state == CLOSED
    assert breaker.failure_count == 0
    fail(breaker)
    assert breaker.state == CLOSED
    fail(breaker)
    assert breaker.state == OPEN


def test_trial_failure_reopens_and_restarts_the_clock() -> None:
    """A failed trial re-opens the breaker for a fresh full reset_timeout from the failure."""
    breaker, clock = make_breaker(threshold=2, reset_timeout=10.0)
    trip(breaker)
    clock.now += 15.0
    trial = breaker.admit()
    clock.now += 3.0  # the trial takes 3 s
    breaker.record_failure(trial, TimeoutError(), ErrorClass.TRANSIENT)
    assert breaker.state == OPEN

    clock.now += 9.0
    with pytest.raises(CircuitOpenError) as caught:
        breaker.admit()
    assert caught.value.retry_after == pytest.approx(1.0)
    clock.now += 1.0
    assert breaker.admit().trial
    assert breaker.state == HALF_OPEN


def test_unknown_trial_failure_reopens() -> None:
    """An unknown failure of the trial counts as a failure too."""
    breaker, clock = make_breaker(threshold=1, reset_timeout=1.0)
    trip(breaker)
    clock.now += 1.0
    breaker.record_failure(breaker.admit(), RuntimeError(), ErrorClass.UNKNOWN)
    assert breaker.state == OPEN


def test_permanent_trial_answer_closes() -> None:
    """A permanent error from the trial means the dependency answered: the breaker closes."""
    breaker, clock = make_breaker(threshold=1, reset_timeout=1.0)
    trip(breaker)
    clock.now += 1.0
    breaker.record_failure(breaker.admit(), ValueError("bad message"), ErrorClass.PERMANENT)
    assert breaker.state == CLOSED


async def test_cancelled_trial_frees_the_slot() -> None:
    """A trial that is cancelled leaves no outcome, but the next caller may run a new trial."""
    breaker, clock = make_breaker(threshold=1, reset_timeout=1.0)
    trip(breaker)
    clock.now += 1.0
    entered = asyncio.Event()

    async def trial() -> None:
        async with breaker:
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(trial())
    await entered.wait()
    with pytest.raises(CircuitOpenError):
        breaker.admit()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert breaker.state == HALF_OPEN
    assert breaker.admit().trial


# --- stale outcomes -----------------------------------------------------------------------------


def test_outcome_of_call_admitted_before_opening_is_ignored() -> None:
    """A slow call admitted while closed cannot close, re-count or re-open a breaker that moved on."""
    breaker, clock = make_breaker(threshold=2, reset_timeout=10.0)
    slow_ok = breaker.admit()
    slow_bad = breaker.admit()
    trip(breaker)

    breaker.record_success(slow_ok)
    assert breaker.state == OPEN

    clock.now += 10.0
    trial = breaker.admit()
    breaker.record_success(slow_ok)  # must not close the breaker: only the trial may
    breaker.record_failure(slow_bad, ConnectionError(), ErrorClass.TRANSIENT)  # must not re-open it
    assert breaker.state == HALF_OPEN
    with pytest.raises(CircuitOpenError):
        breaker.admit()  # the trial slot is still taken

    breaker.record_success(trial)
    assert breaker.state == CLOSED


def test_outcome_of_old_trial_is_ignored_after_close() -> None:
    """A late failure from a call admitted in an earlier state does not count in the new closed state."""
    breaker, clock = make_breaker(threshold=1, reset_timeout=10.0)
    before = breaker.admit()
    trip(breaker)
    clock.now += 10.0
    succeed(breaker)
    assert breaker.state == CLOSED
    breaker.record_failure(before, ConnectionError(), ErrorClass.TRANSIENT)
    assert breaker.state == CLOSED
    assert breaker.failure_count == 0


# --- listeners ----------------------------------------------------------------------------------


def test_transition_listeners_see_the_full_cycle_in_order() -> None:
    """Listeners receive closed->open, open->half_open, half_open->closed with the clock time of each."""
    breaker, clock = make_breaker(threshold=2, reset_timeout=10.0, name="payments")
    seen: list[BreakerTransition] = []
    breaker.add_transition_listener(seen.append)
    breaker.add_transition_listener(seen.append)  # idempotent

    fail(breaker, times=2)
    clock.now += 10.0
    trial = breaker.admit()
    clock.now += 0.5
    breaker.record_success(trial)

    assert [(t.from_state, t.to_state) for t in seen] == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]
    assert [t.at for t in seen] == [100.0, 110.0, 110.5]
    assert {t.name for t in seen} == {"payments"}


def test_transition_listeners_see_reopen() -> None:
    """A failed trial is reported as half_open->open."""
    breaker, clock = make_breaker(threshold=1, reset_timeout=1.0)
    seen: list[tuple[str, str]] = []
    breaker.add_transition_listener(lambda t: seen.append((t.from_state, t.to_state)))
    trip(breaker)
    clock.now += 1.0
    fail(breaker)
    assert seen == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN)]


def test_rejection_listeners_are_called_for_each_refusal() -> None:
    """Every refused admission calls the rejection listeners with the state and the remaining time."""
    breaker, clock = make_breaker(threshold=1, reset_timeout=20.0)
    seen: list[BreakerRejection] = []
    breaker.add_rejection_listener(seen.append)
    trip(breaker)
    for _ in range(3):
        clock.now += 5.0
        with pytest.raises(CircuitOpenError):
            breaker.admit()
    assert [(r.name, r.state) for r in seen] == [("db", OPEN)] * 3
    assert [r.retry_after for r in seen] == pytest.approx([15.0, 10.0, 5.0])


def test_raising_listeners_are_logged_and_swallowed(caplog: pytest.LogCaptureFixture) -> None:
    """A listener that raises is logged; the state change, later listeners and the rejection still happen."""
    breaker, _ = make_breaker(threshold=1)
    later: list[str] = []

    def broken(_event: object) -> None:
        raise RuntimeError("listener bug")

    breaker.add_transition_listener(broken)
    breaker.add_transition_listener(lambda t: later.append(t.to_state))
    breaker.add_rejection_listener(broken)
    breaker.add_rejection_listener(lambda r: later.append("rejected"))

    with caplog.at_level(logging.ERROR, logger="streamwarden.breaker"):
        trip(breaker)
        with pytest.raises(CircuitOpenError):
            breaker.admit()

    assert later == [OPEN, "rejected"]
    messages = [r.getMessage() for r in caplog.records if r.name == "streamwarden.breaker"]
    assert messages == [
        "circuit breaker transition listener failed",
        "circuit breaker rejection listener failed",
    ]
    assert all(r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records)


# --- async with (the seed's form) -----------------------------------------------------------------


async def test_async_with_classifies_the_body_exception() -> None:
    """Exceptions leaving ``async with`` are classified: ConnectionError counts, ValueError does not."""
    breaker, _ = make_breaker(threshold=2)
    for _ in range(5):
        with pytest.raises(ValueError, match="bad message"):
            async with breaker:
                raise ValueError("bad message")
    assert breaker.state == CLOSED

    for _ in range(2):
        with pytest.raises(ConnectionError):
            async with breaker:
                raise ConnectionError("down")
    assert breaker.state == OPEN


async def test_async_with_success_keeps_it_closed() -> None:
    """``async with`` yields the breaker itself, and a clean body resets the failure count."""
    breaker, _ = make_breaker(threshold=2)
    with pytest.raises(ConnectionError):
        async with breaker:
            raise ConnectionError()
    async with breaker as entered:
        assert entered is breaker
    assert breaker.failure_count == 0


# --- registry -----------------------------------------------------------------------------------


def test_registry_returns_one_breaker_per_name() -> None:
    """``get`` returns the same breaker for a name and distinct ones for different names."""
    registry = BreakerRegistry(BreakerPolicy(failure_threshold=1))
    db = registry.get("db")
    assert registry.get("db") is db
    cache = registry.get("cache", BreakerPolicy(failure_threshold=7))
    assert cache is not db
    assert cache.policy.failure_threshold == 7
    assert db.policy.failure_threshold == 1
    assert registry.get("cache", BreakerPolicy(failure_threshold=2)).policy.failure_threshold == 7
    assert len(registry) == 2
    assert {b.name for b in registry} == {"db", "cache"}


def test_registry_breakers_are_independent() -> None:
    """Opening one named breaker leaves the others closed."""
    clock = Clock(100.0)
    registry = BreakerRegistry(BreakerPolicy(failure_threshold=1), clock=clock)
    fail(registry.get("db"))
    assert registry.states() == {"db": OPEN}
    assert registry.get("cache").state == CLOSED
    assert registry.states() == {"db": OPEN, "cache": CLOSED}


def test_registry_breakers_share_the_clock() -> None:
    """Breakers created by the registry read the registry's clock."""
    clock = Clock(100.0)
    registry = BreakerRegistry(BreakerPolicy(failure_threshold=1, reset_timeout=5.0), clock=clock)
    breaker = registry.get("db")
    trip(breaker)
    clock.now += 5.0
    assert breaker.admit().trial


def test_registry_on_create_sees_existing_and_new_breakers() -> None:
    """An ``on_create`` hook is called for breakers already there and for every later one, once each."""
    registry = BreakerRegistry()
    registry.get("a")
    registry.get("b")
    seen: list[str] = []
    registry.on_create(lambda b: seen.append(b.name))
    assert sorted(seen) == ["a", "b"]
    registry.get("c")
    registry.get("a")
    assert sorted(seen) == ["a", "b", "c"]
