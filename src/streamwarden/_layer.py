"""``ReliabilityLayer``: one message through dedup, breaker, retries, timeout, DLQ, with telemetry.

Pipeline for one message (see ``docs/architecture.md``)::

    envelope -> process span -> dedup claim -> breaker admits? -> attempt (timeout) -> retries
             -> success: complete claim          -> PROCESSED
             -> failure: classify -> DLQ write   -> DEAD_LETTERED (claim released)
             -> breaker open / store down        -> DEFERRED      (claim released, not acknowledged)

:meth:`ReliabilityLayer.process` returns a :class:`ProcessResult` whose :class:`Outcome` tells a stream
runner whether to acknowledge. :meth:`ReliabilityLayer.process_message_reliably` keeps the seed's
contract: the processor's result, ``None`` for a duplicate, otherwise the original exception re-raised
after it was handled.

The success path is kept cheap on purpose (see ``benchmarks/``): no tenacity loop, no timer per
message, no synchronous metric instrument other than the latency histogram, no attribute work on
non-recording spans.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import functools
import inspect
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from types import CoroutineType
from typing import Any, NamedTuple, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span, Status, StatusCode

from . import _names as n
from ._breaker import BreakerRegistry, BreakerTransition, CircuitBreaker
from ._classify import ErrorClass, ErrorClassifier
from ._compat import DeduplicationManager, MetricsCollector
from ._dead_letters import ErrorHandler
from ._dedup import ClaimResult, ClaimStatus, DedupStore, EvictionCheckedStore, Lease, LocalDedupStore
from ._dlq import DeadLetterEntry, DeadLetterReason, DeadLetterStore, error_type_name
from ._envelope import Envelope, canonical_fingerprint, envelope_from_message
from ._exceptions import (
    CircuitOpenError,
    DeadLetterError,
    DeduplicationUnavailableError,
    InvalidMessageError,
    InvalidProcessorError,
    MessageInProgressError,
    PoisonMessageError,
)
from ._redis import RedisDeadLetterStore
from ._retry import Retrier, RetryDetails
from ._settings import ReliabilitySettings
from ._telemetry import DestinationTelemetry, telemetry_for
from ._timeout import run_with_timeout, watchdog

__all__ = ["Outcome", "ProcessResult", "ReliabilityLayer", "current_lease"]

log = logging.getLogger("streamwarden")

T = TypeVar("T")
Processor = Callable[[Any], Awaitable[Any]]


class Outcome(enum.StrEnum):
    """What happened to a message; decides acknowledgement (see :attr:`ProcessResult.should_ack`)."""

    PROCESSED = "processed"
    DUPLICATE = "duplicate"
    IN_PROGRESS = "in_progress"
    DEAD_LETTERED = "dead_lettered"
    DEFERRED = "deferred"
    FAILED = "failed"


_ACKED = frozenset({Outcome.PROCESSED, Outcome.DUPLICATE, Outcome.DEAD_LETTERED})
_SEED_COUNTER = {
    Outcome.PROCESSED: n.COUNTER_PROCESSED,
    Outcome.DUPLICATE: n.COUNTER_DEDUPLICATED,
    Outcome.IN_PROGRESS: n.COUNTER_IN_PROGRESS,
    Outcome.DEAD_LETTERED: n.COUNTER_DEAD_LETTERED,
    Outcome.DEFERRED: n.COUNTER_DEFERRED,
    Outcome.FAILED: n.COUNTER_FAILED,
}


class ProcessResult(NamedTuple):
    """The outcome of one message, with the processor's result or the error that ended it."""

    outcome: Outcome
    message_id: str | None
    result: Any = None
    error: BaseException | None = None
    attempts: int = 0
    dead_letter: DeadLetterEntry | None = None

    @property
    def should_ack(self) -> bool:
        """Acknowledge only after success, a confirmed DLQ write, or a confirmed duplicate."""
        return self.outcome in _ACKED


_NO_HEADERS: Mapping[str, str] = {}
# Enum members bound once: reading ``Outcome.PROCESSED`` costs ~70 ns on Python 3.11, four times per message.
_PROCESSED = Outcome.PROCESSED
_DEAD_LETTERED = Outcome.DEAD_LETTERED
_FAILED = Outcome.FAILED
_NEW = ClaimStatus.NEW
_tuple_new = tuple.__new__  # builds a NamedTuple without its Python-level __new__ (hot path)

_current_lease: contextvars.ContextVar[Lease | None] = contextvars.ContextVar(
    "streamwarden_current_lease", default=None
)


def current_lease() -> Lease | None:
    """The dedup lease of the message being processed (its ``fencing_token`` guards downstream writes)."""
    return _current_lease.get()


class _Retried(NamedTuple):
    """A success after retries: the value and how many attempts it took."""

    value: Any
    attempts: int


def _nowait_twin(store: object, method: str) -> Any:
    """``store.<method>_nowait`` when it is safe to call instead of ``await store.<method>(...)``.

    Only when the store is a :class:`LocalDedupStore` and the class defining the sync twin is at least
    as derived as the one defining the async method: a subclass that overrides ``claim`` alone (to
    wrap or break it) must not be bypassed by an inherited ``claim_nowait``.
    """
    if not isinstance(store, LocalDedupStore):
        return None
    mro = type(store).__mro__
    owner_async = next(c for c in mro if method in c.__dict__)
    owner_sync = next(c for c in mro if f"{method}_nowait" in c.__dict__)
    return getattr(store, f"{method}_nowait") if issubclass(owner_sync, owner_async) else None


def _call_hook(hook: Callable[[T], object] | None, details: T) -> None:
    if hook is None:
        return
    try:
        hook(details)
    except Exception:
        log.exception("streamwarden hook %r failed", hook)


class ReliabilityLayer:
    """Wraps a message processor with deduplication, a circuit breaker, retries, timeouts and a DLQ.

    ``redis_client=None`` runs on the embedded in-memory stores (one process). Every decision emits
    OpenTelemetry signals through the global providers unless ``tracer_provider`` / ``meter_provider``
    are given.
    """

    def __init__(
        self,
        redis_client: Any = None,
        settings: ReliabilitySettings | None = None,
        *,
        classifier: ErrorClassifier | None = None,
        dedup_store: DedupStore | None = None,
        dead_letter_store: DeadLetterStore | None = None,
        breakers: BreakerRegistry | None = None,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        messaging_system: str = n.MESSAGING_SYSTEM_DEFAULT,
        on_retry: Callable[[RetryDetails], object] | None = None,
        on_dead_letter: Callable[[DeadLetterEntry], object] | None = None,
    ) -> None:
        self.settings = settings = settings or ReliabilitySettings()
        self.classifier = classifier = classifier or ErrorClassifier()
        self.telemetry = telemetry_for(
            settings.service_name, tracer_provider=tracer_provider, meter_provider=meter_provider
        )
        if dead_letter_store is None and redis_client is not None:
            options: dict[str, Any] = {
                "max_payload_bytes": settings.dlq_max_payload_bytes,
                "max_entries_per_destination": settings.dlq_max_entries_per_destination,
                "max_traceback_chars": settings.dlq_max_traceback_chars,
            }
            if settings.dlq_redact_patterns is not None:
                options["redact_patterns"] = settings.dlq_redact_patterns
            dead_letter_store = RedisDeadLetterStore(redis_client, key_prefix=settings.key_prefix, **options)
        self.deduplication_manager = DeduplicationManager(
            redis_client,
            policy=settings.dedup_policy(),
            store=dedup_store,
            key_prefix=settings.key_prefix,
            clock=clock,
            store_options={
                "defer_completions": settings.dedup_defer_completions,
                "flush_interval": settings.dedup_flush_interval,
                "local_cache_size": settings.dedup_local_cache_size,
            },
        )
        self.error_handler = ErrorHandler(
            settings, dead_letters=dead_letter_store, classifier=classifier, telemetry=self.telemetry
        )
        self.metrics_collector = MetricsCollector(
            redis_client, service_name=settings.service_name, key_prefix=settings.key_prefix
        )
        self.breakers = breakers or BreakerRegistry(
            settings.breaker_policy(), classifier=classifier, clock=clock
        )
        self.breakers.on_create(self._watch_breaker)
        self.circuit_breaker: CircuitBreaker = self.breakers.get(settings.circuit_breaker_name)
        self.retrier = Retrier(settings.retry_policy(), classifier=classifier, sleep=sleep, clock=clock)
        self._clock = clock
        self._system = messaging_system
        self._on_retry_hook = on_retry
        self._on_dead_letter_hook = on_dead_letter
        self._dedup_store = self.deduplication_manager.store
        self._dedup_policy = self.deduplication_manager.policy
        self._retry_policy = self.retrier.policy
        self._first_timeout = self._clip_timeout(self._retry_policy.deadline)
        self._content_hash_ids = settings.missing_id_policy == "content_hash"
        self._destinations: dict[str, DestinationTelemetry] = {}
        self._id_field = settings.id_field
        self._defer_exhausted = settings.exhausted_transient_action == "defer"
        self._poison_max_deliveries = settings.poison_max_deliveries or sys.maxsize
        self._default_destination = settings.destination
        # The collector's live counts (every seed counter key is present): the layer adds to them in place.
        self._seed_counts = self.metrics_collector.counts
        store = self._dedup_store
        self._claim_nowait: Callable[[str, float, str | None], ClaimResult] | None = _nowait_twin(
            store, "claim"
        )
        self._complete_nowait: Callable[[Lease, float, str | None], bool] | None = _nowait_twin(
            store, "complete"
        )

    @property
    def dedup_store(self) -> DedupStore:
        """The dedup store this layer claims and completes ids in."""
        return self._dedup_store

    @property
    def dead_letter_store(self) -> DeadLetterStore:
        """The dead-letter store failed messages are written to."""
        return self.error_handler.dead_letters

    # --- wiring -----------------------------------------------------------------------------------
    def _watch_breaker(self, breaker: CircuitBreaker) -> None:
        self.telemetry.watch_breaker(breaker)
        breaker.add_transition_listener(self._count_transition)
        breaker.add_rejection_listener(self._count_rejection)

    def _count_transition(self, event: BreakerTransition) -> None:
        if event.to_state == "open":
            self._seed_counts[n.COUNTER_BREAKER_OPENED] += 1

    def _count_rejection(self, _event: object) -> None:
        self._seed_counts[n.COUNTER_BREAKER_REJECTIONS] += 1

    def _dest(self, name: str) -> DestinationTelemetry:
        dt = self._destinations.get(name)
        if dt is None:
            dt = self._destinations[name] = self.telemetry.destination(
                name, self.settings.consumer_group, self._system
            )
        return dt

    def _clip_timeout(self, remaining: float | None) -> float | None:
        timeout = self._retry_policy.attempt_timeout
        if remaining is None:
            return timeout
        return remaining if timeout is None else min(timeout, remaining)

    # --- lifecycle --------------------------------------------------------------------------------
    async def verify_stores(self) -> list[str]:
        """Start-up checks of the external stores; returns warnings (also logged).

        With ``dedup_refuse_evicting_redis`` a Redis whose ``maxmemory-policy`` can evict dedup records
        raises :class:`~streamwarden.ConfigurationError` instead.
        """
        warnings: list[str] = []
        if isinstance(self._dedup_store, EvictionCheckedStore):
            problem = await self._dedup_store.check_eviction_policy(
                refuse=self.settings.dedup_refuse_evicting_redis
            )
            if problem:
                warnings.append(problem)
        return warnings

    async def aclose(self, *, timeout: float = 5.0) -> None:
        """Flush buffered state: deferred dedup completions and counters (the Redis client stays open).

        Bounded by ``timeout`` seconds in all and never raising: at shutdown an unreachable Redis must
        not keep the process alive or crash it. What could not be flushed is logged (deferred
        completions then fall into the documented crash window; unflushed counts are lost to the fleet
        totals only).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for what, step in (
            ("deferred dedup completions", self.deduplication_manager.aclose),
            ("fleet counters", self.metrics_collector.flush),
        ):
            try:
                await asyncio.wait_for(step(), timeout=max(0.0, deadline - loop.time()))
            except (Exception, TimeoutError) as exc:
                log.warning("shutdown: could not flush %s: %r", what, exc)

    async def __aenter__(self) -> ReliabilityLayer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- seed API ---------------------------------------------------------------------------------
    async def process_message_reliably(self, message: Any, processor_func: Processor) -> Any:
        """Process ``message`` with full reliability (the seed's contract).

        Returns the processor's result, or ``None`` for a duplicate. Otherwise raises: the processor's
        own exception after it was classified, retried if transient, dead-lettered and counted;
        :class:`CircuitOpenError` when the breaker deferred it; :class:`MessageInProgressError` when
        another owner holds it; :class:`InvalidMessageError` for a message without a usable id.
        """
        result = await self.process(message, processor_func)
        if result.outcome is Outcome.PROCESSED:
            return result.result
        if result.outcome is Outcome.DUPLICATE:
            return None
        assert result.error is not None
        raise result.error

    def wrap(self, processor: Processor) -> Callable[[Any], Awaitable[Any]]:
        """Decorator form: ``handler = layer.wrap(handler)``; calls :meth:`process_message_reliably`."""

        @functools.wraps(processor)
        async def wrapped(message: Any) -> Any:
            return await self.process_message_reliably(message, processor)

        return wrapped

    # --- the pipeline -----------------------------------------------------------------------------
    async def process(
        self,
        message: Any,
        processor: Processor,
        *,
        destination: str | None = None,
        claim: ClaimResult | None = None,
    ) -> ProcessResult:
        """Process one message and return its :class:`ProcessResult` (never raises for a failed message).

        ``claim`` is the message's dedup claim when the caller already made it (a stream runner claims
        a whole batch in one round trip with ``deduplication_manager.claim_many``); the layer then
        owns that lease: it completes or releases it.

        Only cancellation propagates (after the claim is released). This method is the hot path: the
        common case (a new id, first attempt succeeds) is written out flat, and everything rarer lives
        in helper methods.
        """
        if not callable(processor):
            raise TypeError(f"processor must be an async callable, got {type(processor).__name__}")
        if destination is None:
            destination = (
                message.destination
                if type(message) is Envelope and message.destination
                else self._default_destination
            )
        dt = self._destinations.get(destination) or self._dest(destination)
        dt.consumed.value += 1
        self._seed_counts[n.COUNTER_TOTAL] += 1
        started = time.perf_counter()
        headers: Mapping[str, str]
        if type(message) is dict and type(mid := message.get(self._id_field)) is str and mid:
            raw_headers = message.get("headers")
            if raw_headers is None:
                headers = _NO_HEADERS
            else:
                headers = raw_headers if isinstance(raw_headers, Mapping) else _NO_HEADERS
            env: Envelope | None = None  # built only when a slow path needs it
            delivery = 1
        else:
            try:
                env = envelope_from_message(
                    message, id_field=self._id_field, content_hash_ids=self._content_hash_ids
                )
            except InvalidMessageError as invalid:
                return await self._reject_invalid(message, invalid, dt, started)
            except Exception as broken:  # e.g. a mapping whose .get raises: still never a crash
                unreadable = InvalidMessageError(f"message could not be read: {broken!r}")
                unreadable.__cause__ = broken
                return await self._reject_invalid(message, unreadable, dt, started)
            mid, headers, delivery = env.id, env.headers, env.delivery_count
        telemetry = self.telemetry
        if telemetry.tracing_on or telemetry.tracing_enabled():
            span = telemetry.start_process_span(dt, mid, delivery, headers)
            token = otel_context.attach(trace.set_span_in_context(span)) if span.is_recording() else None
        else:  # no SDK: skip the API's no-op span machinery entirely
            span, token = INVALID_SPAN, None
        failure_type: str | None = None
        try:
            # --- dedup claim ---------------------------------------------------------------------
            policy = self._dedup_policy
            fingerprint = (
                canonical_fingerprint(env.payload if env is not None else message)
                if policy.detect_conflicts
                else None
            )
            lease: Lease | None = None
            try:
                if claim is not None:
                    pass  # claimed by the caller, in a batch
                elif self._claim_nowait is not None:
                    claim = self._claim_nowait(mid, policy.lease, fingerprint)
                else:
                    claim = await self._dedup_store.claim(mid, policy.lease, fingerprint)
            except Exception as exc:
                deferred = self._dedup_failed(mid, dt, span, exc)
                if deferred is not None:
                    return deferred
            else:
                if claim.status is not _NEW:
                    return self._not_new(mid, claim.status, dt, span)
                dt.dedup[_NEW].value += 1
                lease = claim.lease
                if claim.takeover:
                    self._took_over(mid, dt, span)
            if delivery > self._poison_max_deliveries:
                return await self._poison(mid, env, headers, message, delivery, dt, lease)
            # --- first attempt, outside tenacity ------------------------------------------------
            lease_token = _current_lease.set(lease)
            effect_done = False
            try:
                breaker = self.circuit_breaker
                started_attempts = self._clock()
                try:
                    admission = breaker.admit()
                except CircuitOpenError as rejected:
                    return await self._defer(mid, dt, lease, rejected, 1)
                try:
                    awaitable = processor(message)
                    if type(awaitable) is not CoroutineType and not inspect.isawaitable(awaitable):
                        raise InvalidProcessorError(
                            f"processor returned {type(awaitable).__name__}, not an awaitable: "
                            "use an async def function"
                        )
                    timeout = self._first_timeout
                    task = dog = None
                    if timeout is not None:
                        # run_with_timeout written out: saves a coroutine per message on the hot path
                        dog = watchdog()
                        task = dog.arm_current(timeout)
                    if timeout is None:
                        value = await awaitable
                    elif task is None or dog is None:  # not inside a task: the slow, general path
                        value = await run_with_timeout(awaitable, timeout)
                    else:
                        try:
                            value = await awaitable
                        except BaseException as error:
                            dog.settle_error(task, timeout, error)
                            raise
                        dog.settle_ok(task)
                except Exception as first_error:
                    breaker.record_failure(admission, first_error, self.classifier.classify(first_error))
                    retried = await self._retry(
                        mid, env, headers, message, processor, dt, lease, first_error, started_attempts
                    )
                    if type(retried) is ProcessResult:  # dead-lettered, deferred or failed
                        if retried.outcome is _DEAD_LETTERED or retried.outcome is _FAILED:
                            failure_type = self._mark_failed(span, retried.error)
                        return retried
                    assert type(retried) is _Retried
                    value, attempts = retried.value, retried.attempts
                except BaseException:
                    breaker.abandon(admission)
                    raise
                else:
                    breaker.record_success(admission)
                    attempts = 1
                # The handler's effect has happened: from here on, a cancellation must not release the
                # claim (a redelivery would run the effect again uncounted); the lease expires instead
                # and a redelivery is a counted takeover.
                effect_done = True
                if lease is not None:
                    if self._complete_nowait is not None:
                        try:
                            if not self._complete_nowait(lease, policy.ttl, fingerprint):
                                self._lease_lost(lease)
                        except Exception as exc:
                            self._completion_failed(lease, dt, exc)
                    else:
                        await self._complete(lease, fingerprint, dt)
                # _finish(PROCESSED) written out: the common case, on the hot path
                dt.outcomes[_PROCESSED].value += 1
                self._seed_counts[n.COUNTER_PROCESSED] += 1
                return _tuple_new(ProcessResult, (_PROCESSED, mid, value, None, attempts, None))
            except BaseException:
                if lease is not None and not effect_done:
                    await self._release(lease)
                raise
            finally:
                _current_lease.reset(lease_token)
        except BaseException as exc:
            failure_type = self._mark_failed(span, exc)
            raise
        finally:
            telemetry.duration.record(
                time.perf_counter() - started,
                dt.duration_attrs if failure_type is None else dt.failure_attrs(failure_type),
            )
            if token is not None:
                otel_context.detach(token)
            if span is not INVALID_SPAN:
                span.end()

    @staticmethod
    def _mark_failed(span: Span, error: BaseException | None) -> str:
        error_type = error_type_name(error) if error is not None else n.ERROR_TYPE_OTHER
        if span.is_recording():
            span.set_attribute(n.ATTR_ERROR_TYPE, error_type)
            if error is not None:
                span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, error_type))
        return error_type

    def _finish(
        self,
        dt: DestinationTelemetry,
        outcome: Outcome,
        message_id: str | None,
        *,
        result: Any = None,
        error: BaseException | None = None,
        attempts: int = 0,
        entry: DeadLetterEntry | None = None,
    ) -> ProcessResult:
        dt.outcomes[outcome].value += 1
        self._seed_counts[_SEED_COUNTER[outcome]] += 1
        if outcome is Outcome.DEAD_LETTERED:  # the seed's messages_failed counts every failed message
            self._seed_counts[n.COUNTER_FAILED] += 1
        return _tuple_new(ProcessResult, (outcome, message_id, result, error, attempts, entry))

    def _dedup_failed(
        self, mid: str, dt: DestinationTelemetry, span: Span, exc: Exception
    ) -> ProcessResult | None:
        """The store failed to answer a claim: defer (fail-closed) or return ``None`` to go on (fail-open)."""
        dt.dedup["error"].value += 1
        self._seed_counts[n.COUNTER_DEDUP_ERRORS] += 1
        if span.is_recording():
            span.add_event(n.EVENT_DEDUP_ERROR, {n.ATTR_ERROR_TYPE: error_type_name(exc)})
        if not self._dedup_policy.fail_open:
            unavailable = DeduplicationUnavailableError(f"dedup store failed: {exc!r}")
            unavailable.__cause__ = exc
            return self._finish(dt, Outcome.DEFERRED, mid, error=unavailable)
        log.warning("dedup store failed; processing %r without deduplication (fail_open)", mid)
        return None

    def _took_over(self, mid: str, dt: DestinationTelemetry, span: Span) -> None:
        """A claim replaced an expired lease: its owner may have run the effect; count the possible duplicate."""
        dt.dedup["takeover"].value += 1
        self._seed_counts[n.COUNTER_TAKEOVERS] += 1
        if span.is_recording():
            span.add_event(n.EVENT_DEDUP_TAKEOVER)
        log.info("message %r: took over an expired lease (possible duplicate execution)", mid)

    def _not_new(self, mid: str, status: ClaimStatus, dt: DestinationTelemetry, span: Span) -> ProcessResult:
        dt.dedup[status].value += 1
        if status is ClaimStatus.IN_PROGRESS:
            if span.is_recording():
                span.add_event(n.EVENT_DEDUP_IN_PROGRESS)
            return self._finish(dt, Outcome.IN_PROGRESS, mid, error=MessageInProgressError(mid))
        if span.is_recording():
            span.add_event(
                n.EVENT_DEDUP_CONFLICT if status is ClaimStatus.CONFLICT else n.EVENT_DEDUP_DUPLICATE
            )
        return self._finish(dt, Outcome.DUPLICATE, mid)

    async def _mark_dead_lettered(self, lease: Lease) -> None:
        """After a confirmed DLQ write: complete the claim for one lease period, not for the dedup TTL.

        A crash between the DLQ write and the acknowledgement redelivers the message; within this window
        the redelivery is a duplicate (acknowledged, not dead-lettered twice). After it, the id is free
        again, so a replay or a later delivery runs it. :class:`~streamwarden.DeadLetterReplayer` treats a
        completion younger than the window as this marker, not as a real completion.
        """
        try:
            if await self._dedup_store.complete(lease, self._dedup_policy.lease, None):
                return
        except Exception:
            log.exception("could not mark %r as dead-lettered in the dedup store", lease.message_id)
        await self._release(lease)

    async def _release(self, lease: Lease) -> None:
        try:
            await self._dedup_store.release(lease)
        except Exception:  # the lease expires by itself; the message is redelivered then
            log.exception("could not release dedup lease for %r", lease.message_id)

    async def _attempt(
        self, breaker: CircuitBreaker, processor: Processor, message: Any, timeout: float | None
    ) -> Any:
        """One retry attempt: breaker admission, the processor under its timeout, the outcome recorded."""
        admission = breaker.admit()
        try:
            awaitable = processor(message)
            if type(awaitable) is not CoroutineType and not inspect.isawaitable(awaitable):
                raise InvalidProcessorError(
                    f"processor returned {type(awaitable).__name__}, not an awaitable: use an async def function"
                )
            result = await run_with_timeout(awaitable, timeout)
        except Exception as exc:
            breaker.record_failure(admission, exc, self.classifier.classify(exc))
            raise
        except BaseException:
            breaker.abandon(admission)
            raise
        breaker.record_success(admission)
        return result

    async def _retry(
        self,
        mid: str,
        env: Envelope | None,
        headers: Any,
        message: Any,
        processor: Processor,
        dt: DestinationTelemetry,
        lease: Lease | None,
        first_error: Exception,
        started: float,
    ) -> ProcessResult | _Retried:
        """The slow path after a failed first attempt: tenacity retries, then DLQ or deferral.

        Success returns :class:`_Retried`; :meth:`process` completes the claim, as on the fast path.
        """
        breaker = self.circuit_breaker
        deadline = self._retry_policy.deadline
        attempts = 1

        async def again() -> Any:
            nonlocal attempts
            attempts += 1
            remaining = None if deadline is None else deadline - (self._clock() - started)
            return await self._attempt(breaker, processor, message, self._clip_timeout(remaining))

        try:
            value = await self.retrier.retry_after(
                first_error, again, started=started, on_retry=functools.partial(self._on_retry, dt)
            )
        except CircuitOpenError as rejected:
            return await self._defer(mid, dt, lease, rejected, attempts)
        except Exception as final:
            if self._defer_exhausted and self.retrier.should_retry(final):
                # retries ran out on an error that may pass: leave it to redelivery (and, if it keeps
                # failing, to the poison check) instead of filling the DLQ during an outage
                return await self._defer(mid, dt, lease, final, attempts)
            if env is None:
                env = Envelope(mid, message, headers if isinstance(headers, Mapping) else {})
            return await self._fail(env, dt, lease, final, attempts)
        return _Retried(value, attempts)

    async def _poison(
        self,
        mid: str,
        env: Envelope | None,
        headers: Mapping[str, str],
        message: Any,
        delivery: int,
        dt: DestinationTelemetry,
        lease: Lease | None,
    ) -> ProcessResult:
        """Delivered too often (crashes, lost acks): dead-letter as ``poison`` without another attempt."""
        error = PoisonMessageError(mid, delivery, self._poison_max_deliveries)
        if env is None:
            env = Envelope(mid, message, headers, delivery_count=delivery)
        return await self._fail(env, dt, lease, error, 0, DeadLetterReason.POISON)

    def _on_retry(self, dt: DestinationTelemetry, details: RetryDetails) -> None:
        self.telemetry.on_retry(dt, details.attempt, details.delay, error_type_name(details.error))
        self._seed_counts[n.COUNTER_RETRIES] += 1
        _call_hook(self._on_retry_hook, details)

    async def _complete(self, lease: Lease, fingerprint: str | None, dt: DestinationTelemetry) -> None:
        try:
            if not await self._dedup_store.complete(lease, self._dedup_policy.ttl, fingerprint):
                self._lease_lost(lease)
        except Exception as exc:
            self._completion_failed(lease, dt, exc)

    def _completion_failed(self, lease: Lease, dt: DestinationTelemetry, exc: Exception) -> None:
        """The effect happened but the completion mark did not: a redelivery may run it again."""
        dt.dedup["error"].value += 1
        self._seed_counts[n.COUNTER_DEDUP_ERRORS] += 1
        log.error("could not complete dedup record for %r: %r", lease.message_id, exc)

    def _lease_lost(self, lease: Lease) -> None:
        self._seed_counts[n.COUNTER_LEASES_LOST] += 1
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(n.EVENT_DEDUP_LEASE_LOST)
        log.warning(
            "dedup lease for %r expired before completion; another owner may run it", lease.message_id
        )

    async def _defer(
        self, mid: str, dt: DestinationTelemetry, lease: Lease | None, error: BaseException, attempts: int
    ) -> ProcessResult:
        if lease is not None:
            await self._release(lease)
        return self._finish(dt, Outcome.DEFERRED, mid, error=error, attempts=attempts)

    async def _fail(
        self,
        env: Envelope,
        dt: DestinationTelemetry,
        lease: Lease | None,
        error: BaseException,
        attempts: int,
        reason: str = DeadLetterReason.ERROR,
    ) -> ProcessResult:
        error_class = self.classifier.classify(error)
        entry: DeadLetterEntry | None = None
        if self.settings.dlq_enabled and not isinstance(error, InvalidProcessorError):
            try:
                entry = await self.error_handler.dead_letter(
                    env,
                    error,
                    error_class,
                    attempts=attempts,
                    reason=reason,
                    destination=dt.destination,
                    dt=dt,
                )
            except DeadLetterError as dlq_error:
                error.add_note(
                    f"streamwarden: dead-letter write failed, message not acknowledged: {dlq_error}"
                )
        if lease is not None:
            if entry is None:
                await self._release(lease)
            else:
                await self._mark_dead_lettered(lease)
        if entry is None:
            return self._finish(dt, Outcome.FAILED, env.id, error=error, attempts=attempts)
        _call_hook(self._on_dead_letter_hook, entry)
        return self._finish(dt, Outcome.DEAD_LETTERED, env.id, error=error, attempts=attempts, entry=entry)

    async def _reject_invalid(
        self, message: Any, invalid: InvalidMessageError, dt: DestinationTelemetry, started: float
    ) -> ProcessResult:
        telemetry = self.telemetry
        telemetry.invalid_messages.add(1, {**dt.metric_attrs, n.ATTR_DLQ_REASON: invalid.reason})
        self._seed_counts[n.COUNTER_INVALID] += 1
        span = telemetry.tracer.start_span(
            dt.span_name, kind=trace.SpanKind.CONSUMER, attributes=dt.span_attrs
        )
        error_type = self._mark_failed(span, invalid)
        entry: DeadLetterEntry | None = None
        try:
            with trace.use_span(span, end_on_exit=False):
                if self.settings.dlq_enabled:
                    try:
                        entry = await self.error_handler.dead_letter(
                            message,
                            invalid,
                            ErrorClass.PERMANENT,
                            attempts=0,
                            reason=invalid.reason,
                            destination=dt.destination,
                            dt=dt,
                        )
                    except DeadLetterError as dlq_error:
                        invalid.add_note(f"streamwarden: dead-letter write failed: {dlq_error}")
        finally:
            telemetry.duration.record(time.perf_counter() - started, dt.failure_attrs(error_type))
            span.end()
        if entry is None:
            return self._finish(dt, Outcome.FAILED, None, error=invalid)
        _call_hook(self._on_dead_letter_hook, entry)
        return self._finish(dt, Outcome.DEAD_LETTERED, None, error=invalid, entry=entry)
