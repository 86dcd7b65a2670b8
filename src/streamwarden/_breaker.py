"""Circuit breaker: an asyncio adapter over pybreaker's state machine.

pybreaker has no asyncio support (its ``call_async`` needs Tornado) and its open-state timeout reads
the wall clock. :class:`CircuitBreaker` therefore splits a call in two, without ever blocking the loop:

* **admission** (:meth:`CircuitBreaker.admit`), ours: closed admits; open rejects with
  :class:`~streamwarden.CircuitOpenError` until ``reset_timeout`` has passed on the injected clock,
  then moves pybreaker to half-open and admits exactly one trial; while that trial runs, everyone
  else is rejected;
* **outcome** (:meth:`CircuitBreaker.record`), pybreaker's: the finished call's outcome is fed through
  ``pybreaker.CircuitBreaker.call`` with a function that returns or raises, so pybreaker counts
  consecutive failures, trips at ``fail_max``, and closes or re-opens after the trial.

Only transient and unknown failures count. Permanent errors (the dependency answered, the message was
bad) are fed as pybreaker "excluded" errors, which pybreaker treats as successes: they never trip the
breaker and a permanent answer to a half-open trial closes it. An outcome that arrives after the state
changed under it (a slow call admitted before the breaker opened) is ignored: only calls admitted in the
current state move the state machine. A closed breaker with no failures recorded skips pybreaker on
success, since the call could not change anything; that keeps the fast path at a few hundred ns.
"""

from __future__ import annotations

import contextvars
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import pybreaker

from ._classify import ErrorClass, ErrorClassifier
from ._exceptions import CircuitOpenError

__all__ = [
    "BreakerPolicy",
    "BreakerRegistry",
    "BreakerRejection",
    "BreakerState",
    "BreakerTransition",
    "CircuitBreaker",
]

log = logging.getLogger("streamwarden.breaker")


class BreakerState(enum.StrEnum):
    """Breaker states, spelled as they appear in telemetry (``half_open`` with an underscore).

    Members equal their strings (``BreakerState.OPEN == "open"``); iterate the class for all of them.
    """

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_FROM_PYBREAKER = {
    pybreaker.STATE_CLOSED: BreakerState.CLOSED,
    pybreaker.STATE_OPEN: BreakerState.OPEN,
    pybreaker.STATE_HALF_OPEN: BreakerState.HALF_OPEN,
}


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """Consecutive counted failures that open the breaker, and seconds it stays open before a trial."""

    failure_threshold: int = 5
    reset_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if self.reset_timeout <= 0:
            raise ValueError("reset_timeout must be positive")


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """A state change, passed to transition listeners."""

    name: str
    from_state: str
    to_state: str
    at: float


@dataclass(frozen=True, slots=True)
class BreakerRejection:
    """A refused call, passed to rejection listeners."""

    name: str
    state: str
    retry_after: float


class _Excluded(Exception):
    """Carrier for a permanent error: pybreaker is told to exclude it (treat it as a success)."""


def _return_none() -> None:
    return None


def _raise(error: BaseException) -> None:
    raise error


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: CircuitBreaker) -> None:
        self._owner = owner

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        old = _FROM_PYBREAKER.get(getattr(old_state, "name", "") or "", BreakerState.CLOSED)
        new = _FROM_PYBREAKER[new_state.name]
        self._owner._on_state_change(old, new)


class Admission:
    """Token for one admitted call; hand it back to :meth:`CircuitBreaker.record` or ``abandon``."""

    __slots__ = ("generation", "trial")

    def __init__(self, generation: int, trial: bool) -> None:
        self.generation = generation
        self.trial = trial


class CircuitBreaker:
    """A named circuit breaker for one downstream dependency.

    Use it as ``async with breaker: await call()`` (the original module's form) or through
    :class:`~streamwarden.ReliabilityLayer`, which admits every attempt through it.
    """

    def __init__(
        self,
        policy: BreakerPolicy | Any = None,
        *,
        name: str = "default",
        classifier: ErrorClassifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if policy is None:
            policy = BreakerPolicy()
        elif not isinstance(policy, BreakerPolicy):  # the original module passes its settings object
            policy = policy.breaker_policy()
        self.policy: BreakerPolicy = policy
        self.name = name
        self.classifier = classifier or ErrorClassifier()
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._opened_at = 0.0
        self._trial_running = False
        # pybreaker holds a failure count (fed through _feed): successes in a clean closed state skip it
        self._failures_pending = False
        self._closed_admission = Admission(0, False)
        self._transition_listeners: list[Callable[[BreakerTransition], None]] = []
        self._rejection_listeners: list[Callable[[BreakerRejection], None]] = []
        # admissions of ``async with`` blocks, per task (a context variable, so tasks never mix them)
        self._admissions: contextvars.ContextVar[tuple[Admission, ...]] = contextvars.ContextVar(
            f"streamwarden_breaker_{name}", default=()
        )
        self._cb = pybreaker.CircuitBreaker(
            fail_max=policy.failure_threshold,
            reset_timeout=policy.reset_timeout,
            exclude=[_Excluded],
            listeners=[_Listener(self)],
            throw_new_error_on_trip=False,
            name=name,
        )

    # --- state --------------------------------------------------------------------------------
    @property
    def state(self) -> BreakerState:
        """Current state: ``closed``, ``open`` or ``half_open`` (an elapsed open timeout shows as open)."""
        return self._state

    @property
    def failure_count(self) -> int:
        """Consecutive counted failures, as pybreaker tracks them."""
        return int(self._cb.fail_counter)

    def retry_after(self) -> float:
        """Seconds until an open breaker admits a trial (0 when not open)."""
        if self._state != BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.policy.reset_timeout - self._clock())

    def add_transition_listener(self, listener: Callable[[BreakerTransition], None]) -> None:
        """Call ``listener`` on every state change (idempotent for the same listener)."""
        if listener not in self._transition_listeners:
            self._transition_listeners.append(listener)

    def add_rejection_listener(self, listener: Callable[[BreakerRejection], None]) -> None:
        """Call ``listener`` on every refused call (idempotent for the same listener)."""
        if listener not in self._rejection_listeners:
            self._rejection_listeners.append(listener)

    def _on_state_change(self, old: BreakerState, new: BreakerState) -> None:
        if old == new:
            return
        self._state = new
        self._generation += 1
        self._closed_admission = Admission(self._generation, False)
        self._failures_pending = False
        if new == BreakerState.OPEN:
            self._opened_at = self._clock()
        self._trial_running = False
        event = BreakerTransition(self.name, old, new, self._clock())
        for listener in self._transition_listeners:
            try:
                listener(event)
            except Exception:
                log.exception("circuit breaker transition listener failed")

    def force_open(self, retry_after: float | None = None) -> None:
        """Open the breaker now (e.g. state adopted from another process); a trial is admitted after
        ``retry_after`` seconds (``policy.reset_timeout`` when ``None``)."""
        if self._state != BreakerState.OPEN:
            self._cb.open()  # our listener records the transition and sets _opened_at
        wait = self.policy.reset_timeout if retry_after is None else max(0.0, retry_after)
        self._opened_at = self._clock() + wait - self.policy.reset_timeout

    def force_close(self) -> None:
        """Close the breaker now (resets the failure count), e.g. state adopted from another process."""
        if self._state != BreakerState.CLOSED:
            self._cb.close()

    # --- admission and outcome ----------------------------------------------------------------
    def admit(self) -> Admission:
        """Admit one call or raise :class:`CircuitOpenError`."""
        state = self._state
        if state == BreakerState.CLOSED:
            return self._closed_admission
        if state == BreakerState.OPEN:
            if self._clock() - self._opened_at < self.policy.reset_timeout:
                self._reject()
            self._cb.half_open()  # our listener moves _state to half_open
        if self._trial_running:
            self._reject()
        self._trial_running = True
        return Admission(self._generation, True)

    def _reject(self) -> None:
        retry_after = self.retry_after()
        event = BreakerRejection(self.name, self._state, retry_after)
        for listener in self._rejection_listeners:
            try:
                listener(event)
            except Exception:
                log.exception("circuit breaker rejection listener failed")
        raise CircuitOpenError(self.name, retry_after)

    def record_success(self, admission: Admission) -> None:
        """Report that an admitted call succeeded."""
        if admission.generation != self._generation:
            return
        if admission.trial or self._failures_pending:
            self._feed(None)

    def record_failure(self, admission: Admission, error: BaseException, error_class: ErrorClass) -> None:
        """Report that an admitted call failed; only transient and unknown failures count."""
        if admission.generation != self._generation:
            return
        if error_class is ErrorClass.PERMANENT:
            self._feed(_Excluded())
        else:
            self._feed(error)

    def abandon(self, admission: Admission) -> None:
        """The admitted call ended without an outcome (cancelled): free the half-open trial slot."""
        if admission.trial and admission.generation == self._generation:
            self._trial_running = False

    def _feed(self, error: BaseException | None) -> None:
        self._failures_pending = error is not None and not isinstance(error, _Excluded)
        try:
            if error is None:
                self._cb.call(_return_none)
            else:
                self._cb.call(_raise, error)
        except pybreaker.CircuitBreakerError:  # pragma: no cover - admission prevents open-state calls
            pass
        except BaseException as raised:
            if raised is not error:
                raise
        finally:
            if self._state != BreakerState.HALF_OPEN:
                self._trial_running = False

    # --- the original module's form: async with breaker --------------------------------------------------------
    async def __aenter__(self) -> CircuitBreaker:
        admission = self.admit()
        self._admissions.set((*self._admissions.get(), admission))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack = self._admissions.get()
        admission = stack[-1]
        self._admissions.set(stack[:-1])
        if exc is None:
            self.record_success(admission)
        elif isinstance(exc, Exception):
            self.record_failure(admission, exc, self.classifier.classify(exc))
        else:
            self.abandon(admission)

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} state={self._state} failures={self.failure_count}>"


class BreakerRegistry:
    """Named breakers, one per downstream dependency, created on first use with a default policy."""

    def __init__(
        self,
        policy: BreakerPolicy | None = None,
        *,
        classifier: ErrorClassifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or BreakerPolicy()
        self._classifier = classifier
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        self._on_create: list[Callable[[CircuitBreaker], None]] = []

    def get(self, name: str, policy: BreakerPolicy | None = None) -> CircuitBreaker:
        """The breaker called ``name``, created with ``policy`` (or the default) if it is new."""
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = CircuitBreaker(
                policy or self.policy, name=name, classifier=self._classifier, clock=self._clock
            )
            self._breakers[name] = breaker
            for hook in self._on_create:
                hook(breaker)
        return breaker

    def on_create(self, hook: Callable[[CircuitBreaker], None]) -> None:
        """Call ``hook`` for every breaker already here and every one created later."""
        self._on_create.append(hook)
        for breaker in list(self._breakers.values()):
            hook(breaker)

    def __iter__(self) -> Any:
        return iter(list(self._breakers.values()))

    def __len__(self) -> int:
        return len(self._breakers)

    def states(self) -> dict[str, str]:
        """Name -> state of every breaker."""
        return {name: b.state for name, b in self._breakers.items()}
