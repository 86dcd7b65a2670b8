"""Retries: backoff arithmetic, what is retried, the deadline, hooks. Time is a fake clock moved by a fake sleep."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tenacity import RetryCallState

from _support import Clock, RecordingSleep
from streamwarden import CircuitOpenError, ErrorClass, ErrorClassifier, Retrier, RetryDetails, RetryPolicy


class Handler:
    """An attempt function that raises a fresh exception from ``make_error`` on every call, or returns."""

    def __init__(
        self,
        make_error: Callable[[int], BaseException | None],
        *,
        clock: Clock | None = None,
        duration: float = 0.0,
    ) -> None:
        self.make_error = make_error
        self.clock = clock
        self.duration = duration
        self.calls = 0
        self.raised: list[BaseException] = []

    async def __call__(self) -> str:
        self.calls += 1
        if self.clock is not None:
            self.clock.now += self.duration
        error = self.make_error(self.calls)
        if error is None:
            return f"ok after {self.calls}"
        self.raised.append(error)
        raise error


def always(factory: Callable[[], BaseException]) -> Callable[[int], BaseException]:
    return lambda _call: factory()


def make_retrier(
    policy: RetryPolicy, clock: Clock | None = None, **kwargs: object
) -> tuple[Retrier, RecordingSleep, Clock]:
    clock = clock or Clock(0.0)
    sleep = RecordingSleep(clock)
    return Retrier(policy, sleep=sleep, clock=clock, **kwargs), sleep, clock  # type: ignore[arg-type]


def wait_at(policy: RetryPolicy, attempt_number: int) -> float:
    """The tenacity wait of ``policy`` after ``attempt_number`` failed attempts."""
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt_number
    return policy.wait_strategy()(state)


def nominal_backoff(policy: RetryPolicy, failed_attempts: int) -> float:
    """The documented delay ``min(max_delay, initial * factor ** (n - 1))``, computed in log space so that
    huge attempt numbers cannot overflow here (it is the reference the implementation is checked against)."""
    if policy.max_delay == 0:
        return 0.0
    log_value = math.log(policy.initial_delay) + (failed_attempts - 1) * math.log(policy.backoff_factor)
    if log_value >= math.log(policy.max_delay):
        return policy.max_delay
    return math.exp(log_value)


# --- backoff arithmetic -------------------------------------------------------------------------


async def test_exact_delays_without_jitter() -> None:
    """Without jitter the delays are initial * factor^(n-1), capped at max_delay, and attempts = max_retries + 1."""
    policy = RetryPolicy(max_attempts=6, initial_delay=0.5, backoff_factor=3.0, max_delay=10.0, jitter=False)
    retrier, sleep, _ = make_retrier(policy)
    handler = Handler(always(lambda: ConnectionError("refused")))

    with pytest.raises(ConnectionError):
        await retrier.call(handler)

    # 0.5, 0.5*3, 0.5*9, 0.5*27=13.5 -> capped, 0.5*81 -> capped
    assert sleep.delays == [0.5, 1.5, 4.5, 10.0, 10.0]
    assert handler.calls == 6


async def test_delays_follow_backoff_cap_without_jitter() -> None:
    """The recorded delays equal ``backoff_cap`` of each failed attempt (the documented bound is exact)."""
    policy = RetryPolicy(max_attempts=8, initial_delay=0.1, backoff_factor=2.0, max_delay=5.0, jitter=False)
    retrier, sleep, _ = make_retrier(policy)

    with pytest.raises(ConnectionError):
        await retrier.call(Handler(always(ConnectionError)))

    assert sleep.delays == [policy.backoff_cap(n) for n in range(1, 8)]
    assert sleep.delays[:6] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2]  # doubling a float is exact
    assert sleep.delays[6] == 5.0


@pytest.mark.parametrize("max_retries", [0, 1, 3, 7], ids=lambda r: f"max_retries={r}")
async def test_attempts_are_max_retries_plus_one(max_retries: int) -> None:
    """A handler that always fails transiently is called max_retries + 1 times."""
    policy = RetryPolicy(max_attempts=max_retries + 1, jitter=False, deadline=None)
    retrier, sleep, _ = make_retrier(policy)
    handler = Handler(always(ConnectionError))

    with pytest.raises(ConnectionError):
        await retrier.call(handler)

    assert handler.calls == max_retries + 1
    assert len(sleep.delays) == max_retries


policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(1, 20),
    # initial_delay > 0: see the report note on initial_delay=0 at overflowing attempt numbers
    initial_delay=st.floats(0.001, 5.0),
    backoff_factor=st.floats(1.0, 10.0),
    max_delay=st.floats(0.0, 120.0),
    jitter=st.just(True),
    deadline=st.none(),
)


@settings(max_examples=200, deadline=None, database=None)
@given(policy=policies, attempt=st.integers(1, 10_000))
def test_jittered_wait_is_within_zero_and_cap(policy: RetryPolicy, attempt: int) -> None:
    """With full jitter every delay lies in [0, min(max_delay, initial * factor^(n-1))]."""
    delay = wait_at(policy, attempt)
    cap = nominal_backoff(policy, attempt)
    assert 0.0 <= delay <= cap * (1 + 1e-9)
    assert delay <= policy.max_delay
    assert policy.backoff_cap(attempt) == pytest.approx(cap, rel=1e-9, abs=1e-12)


@settings(max_examples=200, deadline=None, database=None)
@given(policy=policies, attempt=st.integers(1, 10_000))
def test_unjittered_wait_is_the_nominal_backoff(policy: RetryPolicy, attempt: int) -> None:
    """Without jitter the tenacity wait equals the documented formula at every attempt number."""
    exact = RetryPolicy(
        initial_delay=policy.initial_delay,
        backoff_factor=policy.backoff_factor,
        max_delay=policy.max_delay,
        jitter=False,
    )
    assert wait_at(exact, attempt) == pytest.approx(nominal_backoff(exact, attempt), rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None, database=None)
@given(policy=policies)
def test_retrier_jittered_delays_are_within_bounds(policy: RetryPolicy) -> None:
    """Through the Retrier, the n-th recorded jittered delay lies in [0, backoff_cap(n)]."""
    retrier, sleep, _ = make_retrier(policy)
    handler = Handler(always(ConnectionError))

    async def run() -> None:
        with pytest.raises(ConnectionError):
            await retrier.call(handler)

    asyncio.run(run())

    assert handler.calls == policy.max_attempts
    assert len(sleep.delays) == policy.max_attempts - 1
    for n, delay in enumerate(sleep.delays, start=1):
        assert 0.0 <= delay <= policy.backoff_cap(n)


def test_jitter_actually_varies_delays() -> None:
    """Full jitter spreads delays: many draws at one attempt are not all equal to the cap."""
    policy = RetryPolicy(initial_delay=1.0, backoff_factor=2.0, max_delay=100.0, jitter=True)
    draws = {wait_at(policy, 4) for _ in range(50)}
    assert len(draws) > 1
    assert all(0.0 <= d <= 8.0 for d in draws)


@pytest.mark.parametrize("jitter", [False, True], ids=["exact", "jitter"])
def test_no_overflow_at_huge_attempt_numbers(jitter: bool) -> None:
    """At attempt 10 000 the cap is max_delay and the tenacity wait neither raises nor exceeds it."""
    policy = RetryPolicy(initial_delay=0.1, backoff_factor=2.0, max_delay=30.0, jitter=jitter)
    assert policy.backoff_cap(10_000) == 30.0
    delay = wait_at(policy, 10_000)
    assert 0.0 <= delay <= 30.0
    if not jitter:
        assert delay == 30.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"max_attempts": 0}, "max_attempts", id="zero-attempts"),
        pytest.param({"initial_delay": -1.0}, "negative", id="negative-initial"),
        pytest.param({"max_delay": -1.0}, "negative", id="negative-max"),
        pytest.param({"backoff_factor": 0.5}, "backoff_factor", id="shrinking-backoff"),
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float], message: str) -> None:
    """A policy that could not back off sensibly is refused at construction."""
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


# --- what is retried ----------------------------------------------------------------------------


async def test_success_first_time_never_sleeps() -> None:
    """A handler that succeeds at once returns its result without any wait."""
    retrier, sleep, _ = make_retrier(RetryPolicy(jitter=False))
    handler = Handler(lambda _call: None)
    assert await retrier.call(handler) == "ok after 1"
    assert sleep.delays == []


async def test_transient_failure_then_success_returns_result() -> None:
    """Two transient failures then a success: the result comes back after two waits."""
    retrier, sleep, _ = make_retrier(RetryPolicy(max_attempts=5, initial_delay=1.0, jitter=False))
    handler = Handler(lambda call: ConnectionError() if call < 3 else None)
    assert await retrier.call(handler) == "ok after 3"
    assert sleep.delays == [1.0, 2.0]


@pytest.mark.parametrize(
    "error_type",
    [
        pytest.param(ValueError, id="ValueError"),
        pytest.param(KeyError, id="KeyError"),
        pytest.param(TypeError, id="TypeError"),
    ],
)
async def test_permanent_error_is_not_retried(error_type: type[Exception]) -> None:
    """A permanent error is raised after one call, unchanged, without sleeping."""
    retrier, sleep, _ = make_retrier(RetryPolicy(max_attempts=5))
    handler = Handler(always(lambda: error_type("permanent problem")))

    with pytest.raises(error_type, match="permanent problem") as caught:
        await retrier.call(handler)

    assert caught.value is handler.raised[0]
    assert handler.calls == 1
    assert sleep.delays == []


@pytest.mark.parametrize(
    ("retry_unknown", "expected_calls"),
    [pytest.param(True, 4, id="retry-unknown"), pytest.param(False, 1, id="dead-letter-unknown")],
)
async def test_unknown_errors_follow_the_policy(retry_unknown: bool, expected_calls: int) -> None:
    """Unknown errors are retried only when the policy says so."""
    policy = RetryPolicy(max_attempts=4, jitter=False, retry_unknown=retry_unknown)
    retrier, _, _ = make_retrier(policy)
    handler = Handler(always(lambda: RuntimeError("who knows")))

    with pytest.raises(RuntimeError):
        await retrier.call(handler)

    assert handler.calls == expected_calls


async def test_circuit_open_error_is_never_retried() -> None:
    """A breaker rejection stops retrying at once although the classifier calls it transient."""
    retrier, sleep, _ = make_retrier(RetryPolicy(max_attempts=5, jitter=False))
    rejection = CircuitOpenError("db", retry_after=10.0)
    assert retrier.classifier.classify(rejection) is ErrorClass.TRANSIENT
    handler = Handler(lambda call: ConnectionError() if call == 1 else rejection)

    with pytest.raises(CircuitOpenError) as caught:
        await retrier.call(handler)

    assert caught.value is rejection
    assert handler.calls == 2
    assert len(sleep.delays) == 1


async def test_permanent_error_on_a_later_attempt_stops_retries() -> None:
    """After transient failures, a permanent error ends the retries and is the one raised."""
    retrier, _, _ = make_retrier(RetryPolicy(max_attempts=10, jitter=False))
    handler = Handler(lambda call: ConnectionError() if call < 3 else ValueError("poison"))

    with pytest.raises(ValueError, match="poison") as caught:
        await retrier.call(handler)

    assert caught.value is handler.raised[-1]
    assert handler.calls == 3


async def test_last_exception_is_reraised_unchanged() -> None:
    """When retries run out the handler's last exception object is raised, not a tenacity wrapper."""
    retrier, _, _ = make_retrier(RetryPolicy(max_attempts=3, jitter=False))
    handler = Handler(lambda call: ConnectionError(f"attempt {call}"))

    with pytest.raises(ConnectionError) as caught:
        await retrier.call(handler)

    assert caught.value is handler.raised[-1]
    assert str(caught.value) == "attempt 3"
    assert type(caught.value) is ConnectionError


async def test_custom_classifier_decides_what_is_retried() -> None:
    """The Retrier consults its classifier: a user rule can make a builtin permanent."""
    classifier = ErrorClassifier()
    classifier.add_type(ConnectionRefusedError, ErrorClass.PERMANENT)
    retrier, _, _ = make_retrier(RetryPolicy(max_attempts=4), classifier=classifier)
    handler = Handler(always(ConnectionRefusedError))

    with pytest.raises(ConnectionRefusedError):
        await retrier.call(handler)

    assert handler.calls == 1


async def test_cancellation_during_a_retry_attempt_is_not_retried() -> None:
    """A CancelledError raised by a retry attempt propagates at once instead of being retried."""
    retrier, sleep, _ = make_retrier(RetryPolicy(max_attempts=5, jitter=False))
    handler = Handler(lambda call: ConnectionError() if call == 1 else asyncio.CancelledError())

    with pytest.raises(asyncio.CancelledError):
        await retrier.call(handler)

    assert handler.calls == 2
    assert len(sleep.delays) == 1


async def test_outside_cancel_during_a_retry_attempt_cancels_the_task() -> None:
    """task.cancel() while a retry attempt runs ends the task as cancelled, without further attempts."""
    retrier, _, _ = make_retrier(RetryPolicy(max_attempts=5, jitter=False))
    second_attempt_started = asyncio.Event()
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError()
        if calls == 2:
            second_attempt_started.set()
            await asyncio.Event().wait()  # until cancelled
        return "ran again after the cancel"  # bounded: the buggy retrier must not hang the loop

    task = asyncio.create_task(retrier.call(attempt))
    await second_attempt_started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 2


# --- deadline -----------------------------------------------------------------------------------


async def test_deadline_stops_when_the_next_wait_would_pass_it() -> None:
    """Retries stop once elapsed time plus the next delay would reach the deadline (handler time counts)."""
    policy = RetryPolicy(
        max_attempts=20, initial_delay=1.0, backoff_factor=2.0, max_delay=100.0, jitter=False, deadline=8.0
    )
    clock = Clock(1000.0)
    retrier, sleep, _ = make_retrier(policy, clock)
    handler = Handler(always(ConnectionError), clock=clock, duration=0.5)

    with pytest.raises(ConnectionError) as caught:
        await retrier.call(handler)

    # t=0.5 fail, +1 -> 1.5; t=2.0 fail, +2 -> 4.0; t=4.5 fail, 4.5 + 4 = 8.5 >= 8: stop.
    assert sleep.delays == [1.0, 2.0]
    assert handler.calls == 3
    assert caught.value is handler.raised[-1]
    assert clock.now - 1000.0 == 4.5


async def test_deadline_is_measured_from_the_first_attempt() -> None:
    """``retry_after`` counts elapsed time from the ``started`` it is given, not from its own call."""
    policy = RetryPolicy(max_attempts=20, initial_delay=1.0, max_delay=100.0, jitter=False, deadline=5.0)
    clock = Clock(50.0)
    retrier, sleep, _ = make_retrier(policy, clock)
    handler = Handler(always(ConnectionError))

    with pytest.raises(ConnectionError):
        # the first attempt started at t=47 and failed at t=50: 3 s of the 5 s budget are gone
        await retrier.retry_after(ConnectionError("first"), handler, started=47.0)

    # 3 + 1 = 4 < 5 -> sleep 1 (t=51, 4 s gone); 4 + 2 = 6 >= 5 -> stop.
    assert sleep.delays == [1.0]
    assert handler.calls == 1


async def test_no_deadline_runs_every_attempt() -> None:
    """With ``deadline=None`` only the attempt count stops retries, however long the waits."""
    policy = RetryPolicy(max_attempts=6, initial_delay=100.0, max_delay=1000.0, jitter=False, deadline=None)
    retrier, sleep, _ = make_retrier(policy)
    handler = Handler(always(ConnectionError))

    with pytest.raises(ConnectionError):
        await retrier.call(handler)

    assert handler.calls == 6
    assert sleep.delays == [100.0, 200.0, 400.0, 800.0, 1000.0]


# --- hooks --------------------------------------------------------------------------------------


async def test_on_retry_receives_details_of_each_scheduled_retry() -> None:
    """``on_retry`` is called once per retry with attempt numbers 1..n-1, the delay, the error and its class."""
    details: list[RetryDetails] = []
    clock = Clock(0.0)
    policy = RetryPolicy(max_attempts=4, initial_delay=0.25, backoff_factor=2.0, jitter=False, deadline=None)
    retrier, sleep, _ = make_retrier(policy, clock, on_retry=details.append)
    handler = Handler(lambda call: TimeoutError(f"attempt {call}"), clock=clock, duration=0.125)

    with pytest.raises(TimeoutError):
        await retrier.call(handler)

    assert [d.attempt for d in details] == [1, 2, 3]
    assert [d.delay for d in details] == sleep.delays == [0.25, 0.5, 1.0]
    assert [d.error for d in details] == handler.raised[:3]
    assert {d.error_class for d in details} == {ErrorClass.TRANSIENT}
    # elapsed at each hook: handler time so far plus the waits already slept
    assert [d.elapsed for d in details] == [0.125, 0.125 * 2 + 0.25, 0.125 * 3 + 0.75]


async def test_on_retry_argument_overrides_the_constructor_hook() -> None:
    """A hook passed to ``retry_after`` replaces the Retrier's own for that call."""
    own: list[RetryDetails] = []
    given_hook: list[RetryDetails] = []
    retrier, _, _ = make_retrier(RetryPolicy(max_attempts=3, jitter=False), on_retry=own.append)
    handler = Handler(lambda call: ConnectionError() if call < 2 else None)

    result = await retrier.retry_after(ConnectionError(), handler, started=0.0, on_retry=given_hook.append)

    assert result == "ok after 2"
    assert own == []
    assert [d.attempt for d in given_hook] == [1, 2]


async def test_on_retry_not_called_for_permanent_errors() -> None:
    """No retry is scheduled, so no hook runs, for a permanent error."""
    details: list[RetryDetails] = []
    retrier, _, _ = make_retrier(RetryPolicy(max_attempts=3), on_retry=details.append)
    with pytest.raises(ValueError, match="bad"):
        await retrier.call(Handler(always(lambda: ValueError("bad"))))
    assert details == []
