"""Stateful property test: ``CircuitBreaker`` against a plain model of a circuit breaker.

Hypothesis drives admissions, outcomes (success, transient / unknown / permanent failure), abandoned calls
and clock moves in any order, with calls left in flight across state changes, and checks after every
step that the breaker agrees with this model:

* closed: every call is admitted; ``failure_threshold`` consecutive counted (transient or unknown)
  failures open it; a success or a permanent failure (the dependency answered) restarts the count;
* open: calls are rejected (``CircuitOpenError`` with the time left) until ``reset_timeout`` has passed
  on the clock; the next admission then moves it to half-open and is the trial;
* half-open: exactly one trial at a time; the trial's success or permanent failure closes it, a counted
  failure re-opens it for a fresh ``reset_timeout``; an abandoned trial frees the slot;
* an outcome of a call admitted before the last state change is ignored.

Transition listeners must report exactly the model's sequence of state changes, at the clock's time.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from _support import Clock
from streamwarden import (
    BreakerPolicy,
    BreakerRejection,
    BreakerTransition,
    CircuitBreaker,
    CircuitOpenError,
    ErrorClass,
)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class Call:
    """One admitted call: the breaker's token and what the model knew when it was admitted."""

    admission: object
    generation: int
    trial: bool


class BreakerMachine(RuleBasedStateMachine):
    """Drives one CircuitBreaker and the model side by side."""

    calls = Bundle("calls")

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.transitions: list[tuple[str, str, float]] = []
        self.rejections: list[BreakerRejection] = []
        # the model
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.trial_running = False
        self.generation = 0
        self.expected_transitions: list[tuple[str, str, float]] = []
        self.threshold = 1
        self.reset_timeout = 1.0
        self.breaker: CircuitBreaker

    @initialize(threshold=st.integers(1, 4), reset_timeout=st.integers(1, 30))
    def make_breaker(self, threshold: int, reset_timeout: int) -> None:
        self.threshold, self.reset_timeout = threshold, float(reset_timeout)
        self.breaker = CircuitBreaker(
            BreakerPolicy(failure_threshold=threshold, reset_timeout=float(reset_timeout)),
            name="model",
            clock=self.clock,
        )
        self.breaker.add_transition_listener(self._on_transition)
        self.breaker.add_rejection_listener(self.rejections.append)

    def _on_transition(self, event: BreakerTransition) -> None:
        self.transitions.append((event.from_state, event.to_state, event.at))

    # --- model transitions ------------------------------------------------------------------
    def _move(self, to: str) -> None:
        self.expected_transitions.append((self.state, to, self.clock.now))
        self.state = to
        self.generation += 1
        self.trial_running = False
        self.failures = 0
        if to == OPEN:
            self.opened_at = self.clock.now

    def _counted_failure(self, call: Call) -> None:
        if call.generation != self.generation:
            return
        if self.state == HALF_OPEN:
            self._move(OPEN)
        elif self.state == CLOSED:
            self.failures += 1
            if self.failures >= self.threshold:
                self._move(OPEN)

    def _answer(self, call: Call) -> None:
        """A success, or a permanent failure: the dependency answered."""
        if call.generation != self.generation:
            return
        if self.state == HALF_OPEN:
            self._move(CLOSED)
        elif self.state == CLOSED:
            self.failures = 0

    # --- rules ------------------------------------------------------------------------------
    @rule(target=calls)
    def admit(self) -> Call | object:
        admitted = self.state == CLOSED
        if self.state == OPEN and self.clock.now - self.opened_at >= self.reset_timeout:
            self._move(HALF_OPEN)
        if self.state == HALF_OPEN and not self.trial_running:
            self.trial_running = admitted = True
        rejected_before = len(self.rejections)
        if admitted:
            admission = self.breaker.admit()
            return Call(admission, self.generation, self.state == HALF_OPEN)
        retry_after = (
            max(0.0, self.opened_at + self.reset_timeout - self.clock.now) if self.state == OPEN else 0.0
        )
        with pytest.raises(CircuitOpenError) as rejected:  # the model rejects this call
            self.breaker.admit()
        assert rejected.value.retry_after == retry_after
        assert len(self.rejections) == rejected_before + 1
        assert (self.rejections[-1].state, self.rejections[-1].retry_after) == (self.state, retry_after)
        return consumes_nothing

    @rule(call=consumes(calls))
    def succeed(self, call: Call | object) -> None:
        if isinstance(call, Call):
            self.breaker.record_success(call.admission)  # type: ignore[arg-type]
            self._answer(call)

    @rule(call=consumes(calls), error_class=st.sampled_from([ErrorClass.TRANSIENT, ErrorClass.UNKNOWN]))
    def fail_counted(self, call: Call | object, error_class: ErrorClass) -> None:
        if isinstance(call, Call):
            self.breaker.record_failure(call.admission, ConnectionError("down"), error_class)  # type: ignore[arg-type]
            self._counted_failure(call)

    @rule(call=consumes(calls))
    def fail_permanent(self, call: Call | object) -> None:
        if isinstance(call, Call):
            self.breaker.record_failure(call.admission, ValueError("bad"), ErrorClass.PERMANENT)  # type: ignore[arg-type]
            self._answer(call)

    @rule(call=consumes(calls))
    def abandon(self, call: Call | object) -> None:
        if isinstance(call, Call):
            self.breaker.abandon(call.admission)  # type: ignore[arg-type]
            if call.trial and call.generation == self.generation:
                self.trial_running = False

    @rule(seconds=st.integers(0, 40))
    def advance(self, seconds: int) -> None:
        self.clock.now += seconds

    # --- invariants -------------------------------------------------------------------------
    @invariant()
    def state_matches_the_model(self) -> None:
        if hasattr(self, "breaker"):
            assert self.breaker.state == self.state

    @invariant()
    def closed_failure_count_matches(self) -> None:
        if hasattr(self, "breaker") and self.state == CLOSED:
            assert self.breaker.failure_count == self.failures

    @invariant()
    def retry_after_matches(self) -> None:
        if hasattr(self, "breaker"):
            expected = (
                max(0.0, self.opened_at + self.reset_timeout - self.clock.now) if self.state == OPEN else 0.0
            )
            assert self.breaker.retry_after() == expected

    @invariant()
    def listeners_saw_the_model_transitions(self) -> None:
        assert self.transitions == self.expected_transitions

    @invariant()
    def never_two_trials(self) -> None:
        # the model admits at most one trial per half-open period; the breaker must agree, which
        # admit() checks call by call: here, a half-open breaker with a trial out refuses the next one
        if hasattr(self, "breaker") and self.state == HALF_OPEN and self.trial_running:
            try:
                self.breaker.admit()
            except CircuitOpenError:
                self.rejections.pop()  # this probe is not one of the machine's calls
            else:
                raise AssertionError("a second half-open trial was admitted")


consumes_nothing = object()  # what a rejected admission puts in the bundle: no call to finish

BreakerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestBreakerModel = BreakerMachine.TestCase
