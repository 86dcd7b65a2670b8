"""Retries on tenacity: exponential backoff with full jitter, a deadline, transient errors only.

The delay before retry *n* (after *n* failed attempts) is
``min(max_delay, initial_delay * backoff_factor ** (n - 1))``; with jitter it is drawn uniformly from
``[0, that]`` ("full jitter"), which spreads a thundering herd best. Tenacity computes it
(``wait_exponential`` / ``wait_random_exponential``) and saturates at ``max_delay`` instead of
overflowing at huge attempt numbers.

**Fast path.** Entering tenacity's ``AsyncRetrying`` costs ~20 µs even when nothing fails, so the
first attempt runs outside it. Only after a failure does :meth:`Retrier.retry_after` enter tenacity,
replaying the first failure as tenacity's attempt 1 so that attempt numbers, waits and stop
conditions are exactly tenacity's. Callers never see a tenacity type: when retries run out, the
handler's last exception is re-raised as it was.

**Seams.** ``sleep`` and ``clock`` are injectable: tests record exact delays and move time by hand.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_base, wait_exponential, wait_random_exponential

from ._classify import ErrorClass, ErrorClassifier
from ._exceptions import CircuitOpenError

__all__ = ["Backoff", "ExponentialBackoff", "Retrier", "RetryDetails", "RetryPolicy"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Frozen retry policy; ``max_attempts`` counts the first attempt (``max_retries + 1``)."""

    max_attempts: int = 4
    initial_delay: float = 0.1
    backoff_factor: float = 2.0
    max_delay: float = 10.0
    jitter: bool = True
    deadline: float | None = 60.0
    attempt_timeout: float | None = 30.0
    retry_unknown: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_delay < 0 or self.max_delay < 0:
            raise ValueError("delays must not be negative")
        if self.backoff_factor < 1:
            raise ValueError("backoff_factor must be at least 1")

    def wait_strategy(self) -> wait_base:
        """The tenacity wait strategy for this policy."""
        if self.jitter:
            return wait_random_exponential(
                multiplier=self.initial_delay, max=self.max_delay, exp_base=self.backoff_factor
            )
        return wait_exponential(
            multiplier=self.initial_delay, max=self.max_delay, exp_base=self.backoff_factor
        )

    def backoff_cap(self, failed_attempts: int) -> float:
        """Upper bound of the delay after ``failed_attempts`` failures (the exact delay without jitter)."""
        try:
            value = self.initial_delay * self.backoff_factor ** (failed_attempts - 1)
        except OverflowError:
            return self.max_delay
        return max(0.0, min(value, self.max_delay))


@dataclass(frozen=True, slots=True)
class RetryDetails:
    """One scheduled retry, passed to ``on_retry`` hooks: the failed attempt and the coming delay."""

    attempt: int
    delay: float
    error: BaseException
    error_class: ErrorClass
    elapsed: float


class Retrier:
    """Runs an attempt function under a :class:`RetryPolicy`, retrying only transient failures."""

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        classifier: ErrorClassifier | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        on_retry: Callable[[RetryDetails], None] | None = None,
    ) -> None:
        self.policy = policy
        self.classifier = classifier or ErrorClassifier()
        self._sleep = sleep
        self.clock = clock
        self._on_retry = on_retry
        self._wait = policy.wait_strategy()

    def should_retry(self, error: BaseException) -> bool:
        """Transient errors are retried; unknown ones by policy; a breaker rejection never is."""
        if not isinstance(error, Exception) or isinstance(error, CircuitOpenError):
            return False  # cancellation and exits are never retried; nor is a refused call
        cls = self.classifier.classify(error)
        return cls is ErrorClass.TRANSIENT or (cls is ErrorClass.UNKNOWN and self.policy.retry_unknown)

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` with retries; returns its result or raises its last exception."""
        started = self.clock()
        try:
            return await fn()
        except Exception as error:
            return await self.retry_after(error, fn, started=started)

    async def retry_after(
        self,
        first_error: BaseException,
        fn: Callable[[], Awaitable[T]],
        *,
        started: float,
        on_retry: Callable[[RetryDetails], None] | None = None,
    ) -> T:
        """Continue after a failed first attempt (started at ``started`` on :attr:`clock`).

        Returns the first successful result, or re-raises the last exception unchanged when the
        error is not retriable, attempts run out, or the deadline would be passed by the next wait.
        """
        policy = self.policy
        clock = self.clock
        hook = on_retry or self._on_retry
        if not self.should_retry(first_error) or policy.max_attempts <= 1:
            raise first_error

        deadline = policy.deadline

        class stop_deadline(stop_base):
            """Stop when the next wait would end past the overall deadline (on our clock)."""

            def __call__(self, state: RetryCallState) -> bool:
                return deadline is not None and clock() - started + state.upcoming_sleep >= deadline

        def before_sleep(state: RetryCallState) -> None:
            outcome = state.outcome
            error = outcome.exception() if outcome is not None else None
            if hook is not None and error is not None:
                hook(
                    RetryDetails(
                        attempt=state.attempt_number,
                        delay=state.upcoming_sleep,
                        error=error,
                        error_class=self.classifier.classify(error),
                        elapsed=clock() - started,
                    )
                )

        pending: BaseException | None = first_error
        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.max_attempts) | stop_deadline(),
            wait=self._wait,
            retry=retry_if_exception(self.should_retry),
            sleep=self._sleep,  # type: ignore[arg-type]  # an awaitable's value is ignored
            before_sleep=before_sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if pending is not None:
                    # tenacity's attempt 1 is the first attempt, which already failed outside it
                    error, pending = pending, None
                    raise error
                return await fn()
        raise AssertionError("unreachable: tenacity stopped without an outcome")  # pragma: no cover


# --- back-off objects (redis-py's ``backoff.py`` shape: ``reset()`` + ``compute(failures)``) -------------
@runtime_checkable
class Backoff(Protocol):
    """How long to wait after the ``failures``-th consecutive failure (1 for the first).

    The shape of redis-py's ``AbstractBackoff``: an object the caller owns, injectable in tests, instead
    of a module-level ``random`` call. ``reset()`` starts a new series (after a success).
    """

    def reset(self) -> None:
        """Forget the failures so far (stateless back-offs do nothing)."""

    def compute(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures (``failures >= 1``)."""


class ExponentialBackoff:
    """Capped exponential back-off with full jitter: a draw from ``[0, min(cap, base * 2 ** (n - 1))]``.

    ``jitter=False`` returns the bound itself. ``cap_for(n)`` is the bound, for logs and tests. The draw
    comes from ``rng`` (a ``random.Random``), so a seeded one makes the delays reproducible.
    """

    __slots__ = ("_base", "_cap", "_jitter", "_rng")

    def __init__(
        self,
        *,
        base: float = 0.05,
        cap: float = 5.0,
        jitter: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        if not (math.isfinite(base) and base > 0):
            raise ValueError(f"base must be a positive number of seconds, got {base!r}")
        if not (math.isfinite(cap) and cap >= base):
            raise ValueError(f"cap must be a number of seconds >= base ({base!r}), got {cap!r}")
        self._base = base
        self._cap = cap
        self._jitter = jitter
        self._rng = rng if rng is not None else random.Random()

    @property
    def base(self) -> float:
        """The bound after the first failure, s."""
        return self._base

    @property
    def cap(self) -> float:
        """The largest bound, s."""
        return self._cap

    def reset(self) -> None:
        """Stateless: nothing to forget."""

    def cap_for(self, failures: int) -> float:
        """The upper bound of the delay after ``failures`` failures (saturates instead of overflowing)."""
        exponent = max(0, failures - 1)
        if exponent >= 64:  # 2 ** 64 times any sane base is past any cap
            return self._cap
        return min(self._cap, self._base * (1 << exponent))

    def compute(self, failures: int) -> float:
        """A delay in ``[0, cap_for(failures)]`` (full jitter), or the bound itself without jitter."""
        bound = self.cap_for(failures)
        return self._rng.uniform(0.0, bound) if self._jitter else bound

    def __repr__(self) -> str:
        return f"ExponentialBackoff(base={self._base!r}, cap={self._cap!r}, jitter={self._jitter!r})"
