"""Property tests: ``Retrier`` / ``RetryPolicy`` against a plain model of retrying.

For any policy and any sequence of attempt outcomes (success, transient / unknown / permanent error, a
``BaseException``), with an injected clock that only the attempts' own work and the recorded sleeps move:

* attempts never exceed ``max_attempts`` (``max_retries + 1``), run in order, and stop at the first
  success or non-retriable error;
* only transient errors are retried, and unknown ones only when ``retry_unknown``; a BaseException never;
* the delay before retry *n* is within ``[0, cap(n)]``, ``cap(n) = min(max_delay, initial * factor**(n-1))``,
  and exactly ``cap(n)`` without jitter; ``on_retry`` sees each of them;
* the deadline holds: a retry is only slept for when it would end before the deadline, so every attempt
  starts before it; retries stop early only because of it;
* the result is the successful attempt's value, or the handler's own last exception, not a wrapper.

Times are multiples of 1/4 s (exact in binary floating point), so the model's arithmetic is the code's.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamwarden import ErrorClassifier, Retrier, RetryDetails, RetryPolicy

START = 1000.0
KINDS = ("ok", "transient", "unknown", "permanent", "base")


class AttemptBaseError(BaseException):
    """A BaseException from an attempt: never retried, re-raised as it is."""


def make_error(kind: str, attempt: int) -> BaseException:
    if kind == "transient":
        return ConnectionError(f"attempt {attempt}")
    if kind == "unknown":
        return RuntimeError(f"attempt {attempt}")
    if kind == "permanent":
        return ValueError(f"attempt {attempt}")
    return AttemptBaseError(f"attempt {attempt}")


def cap(policy: RetryPolicy, failed_attempts: int) -> float:
    """The model's backoff bound after ``failed_attempts`` failures."""
    return min(policy.max_delay, policy.initial_delay * policy.backoff_factor ** (failed_attempts - 1))


def retriable(policy: RetryPolicy, kind: str) -> bool:
    return kind == "transient" or (kind == "unknown" and policy.retry_unknown)


@dataclass
class World:
    """The clock, the recorded sleeps and what each attempt saw."""

    now: float = START
    sleeps: list[tuple[float, float]] = field(default_factory=list)  # (elapsed when sleeping, delay)
    attempt_starts: list[float] = field(default_factory=list)
    raised: list[BaseException] = field(default_factory=list)
    details: list[RetryDetails] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append((self.now - START, delay))
        self.now += delay


quarter = st.integers(0, 40).map(lambda q: q / 4)
policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(1, 6),
    initial_delay=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]),
    backoff_factor=st.sampled_from([1.0, 1.5, 2.0, 3.0]),
    max_delay=st.integers(0, 20).map(float),
    jitter=st.booleans(),
    deadline=st.none() | st.integers(1, 160).map(lambda q: q / 4),
    attempt_timeout=st.none(),
    retry_unknown=st.booleans(),
)
attempt_plans = st.lists(st.tuples(st.sampled_from(KINDS), quarter), min_size=1, max_size=8)


@settings(max_examples=400, deadline=None)
@given(policy=policies, plan=attempt_plans)
def test_retrier_follows_the_model(policy: RetryPolicy, plan: list[tuple[str, float]]) -> None:
    """Attempts, delays, deadline and the final result or exception all match the model."""
    world = World()
    retrier = Retrier(
        policy,
        classifier=ErrorClassifier(),
        sleep=world.sleep,
        clock=world.clock,
        on_retry=world.details.append,
    )

    async def attempt() -> str:
        number = len(world.attempt_starts) + 1
        world.attempt_starts.append(world.now - START)
        kind, work = plan[number - 1] if number <= len(plan) else ("ok", 0.0)
        world.now += work
        if kind == "ok":
            return f"value {number}"
        error = make_error(kind, number)
        world.raised.append(error)
        raise error

    outcome: Any
    try:
        outcome = asyncio.run(retrier.call(attempt))
    except BaseException as exc:
        outcome = exc

    attempts = len(world.attempt_starts)
    kinds = [plan[i][0] if i < len(plan) else "ok" for i in range(attempts)]

    # attempts are bounded and stop at the first success or non-retriable error
    assert 1 <= attempts <= policy.max_attempts
    assert all(retriable(policy, k) for k in kinds[:-1]), kinds
    # one sleep between consecutive attempts, each within [0, cap] (exactly cap without jitter)
    assert len(world.sleeps) == attempts - 1
    for n, (elapsed, delay) in enumerate(world.sleeps, start=1):
        bound = cap(policy, n)
        assert 0.0 <= delay <= bound <= policy.max_delay
        if not policy.jitter:
            assert delay == bound
        if policy.deadline is not None:
            assert elapsed + delay < policy.deadline  # the retry ends before the deadline
    if policy.deadline is not None:
        assert all(start < policy.deadline for start in world.attempt_starts[1:])
    # on_retry reports every scheduled retry: its attempt number, delay and error
    assert [(d.attempt, d.delay) for d in world.details] == [
        (n, delay) for n, (_, delay) in enumerate(world.sleeps, start=1)
    ]
    assert [d.error for d in world.details] == world.raised[: len(world.details)]

    last = kinds[-1]
    if last == "ok":
        assert outcome == f"value {attempts}"
        return
    # the handler's own last exception, unchanged
    assert outcome is world.raised[-1]
    if retriable(policy, last) and attempts < policy.max_attempts:
        # retries stopped early: only the deadline may do that (the next wait could not end before it)
        assert policy.deadline is not None
        assert world.now - START + cap(policy, attempts) >= policy.deadline


# the boundary: a retry that would end exactly at the deadline is not taken
AT_THE_DEADLINE = RetryPolicy(
    max_attempts=3, initial_delay=1.0, max_delay=10.0, jitter=False, deadline=1.0, attempt_timeout=None
)


@settings(max_examples=200, deadline=None)
@example(policy=AT_THE_DEADLINE, plan=[("transient", 0.0), ("ok", 0.0)])
@example(policy=AT_THE_DEADLINE, plan=[("unknown", 0.25)])
@given(policy=policies.filter(lambda p: not p.jitter), plan=attempt_plans)
def test_unjittered_retries_are_exactly_the_model(policy: RetryPolicy, plan: list[tuple[str, float]]) -> None:
    """Without jitter the run is deterministic: attempts, sleeps and outcome equal the model's simulation."""
    world = World()
    retrier = Retrier(policy, classifier=ErrorClassifier(), sleep=world.sleep, clock=world.clock)

    async def attempt() -> str:
        number = len(world.attempt_starts) + 1
        world.attempt_starts.append(world.now - START)
        kind, work = plan[number - 1] if number <= len(plan) else ("ok", 0.0)
        world.now += work
        if kind == "ok":
            return "done"
        error = make_error(kind, number)
        world.raised.append(error)
        raise error

    try:
        outcome: Any = asyncio.run(retrier.call(attempt))
    except BaseException as exc:
        outcome = exc

    # the model's simulation
    expected_sleeps: list[tuple[float, float]] = []
    elapsed, number, expected_result = 0.0, 0, "raised"
    while True:
        number += 1
        kind, work = plan[number - 1] if number <= len(plan) else ("ok", 0.0)
        elapsed += work
        if kind == "ok":
            expected_result = "done"
            break
        if not retriable(policy, kind) or number >= policy.max_attempts:
            break
        delay = cap(policy, number)
        if policy.deadline is not None and elapsed + delay >= policy.deadline:
            break
        expected_sleeps.append((elapsed, delay))
        elapsed += delay

    assert len(world.attempt_starts) == number
    assert world.sleeps == expected_sleeps
    if expected_result == "done":
        assert outcome == "done"
    else:
        assert outcome is world.raised[-1]
