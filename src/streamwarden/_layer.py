"""``ReliabilityLayer``: one message through dedup, breaker, retries, timeout, DLQ, with telemetry.

Pipeline for one message (see ``docs/architecture.md``)::

    envelope -> process span -> dedup claim (scope: destination/group) -> poison? -> breaker admits?
             -> attempt (timeout) -> retries (lease checked before each)
             -> success: complete claim          -> PROCESSED
             -> failure: classify -> DLQ write   -> DEAD_LETTERED (id marked dead-lettered for one lease)
             -> breaker open / store down        -> DEFERRED      (claim given back, not acknowledged)
             -> lease lost to another owner      -> IN_PROGRESS   (not ours to run or acknowledge)

:meth:`ReliabilityLayer.process` returns a :class:`ProcessResult` whose :class:`Outcome` tells a stream
runner whether to acknowledge. :meth:`ReliabilityLayer.process_message_reliably` keeps the original
module's contract: the processor's result, ``None`` for a duplicate, otherwise the original exception
re-raised after it was handled.

A claim is never given back once the handler may have started its effect without reporting a result
(cancelled, process killed): the lease expires and the next owner's claim is a counted takeover.

The success path is kept cheap on purpose (see ``benchmarks/``): no tenacity loop, no timer per
message, no synchronous metric instrument other than the latency histogram, no attribute work on
non-recording spans.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import CoroutineType
from typing import Any, NamedTuple, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import _internal as _metrics_api
from opentelemetry.trace import INVALID_SPAN, Span, Status, StatusCode

from . import _names as n
from ._breaker import BreakerRegistry, BreakerState, BreakerTransition, CircuitBreaker
from ._classify import ErrorClass, ErrorClassifier
from ._compat import DeduplicationManager, MetricsCollector
from ._dead_letters import ErrorHandler
from ._dedup import (
    BatchCompletingStore,
    ClaimResult,
    ClaimStatus,
    ClosableStore,
    DedupStore,
    EvictionCheckedStore,
    Lease,
    LocalDedupStore,
    ScopedStore,
)
from ._dlq import DeadLetterEntry, DeadLetterReason, DeadLetterStore, format_traceback_safely
from ._envelope import Envelope, envelope_from_message, fingerprint_or_none
from ._exceptions import (
    CircuitOpenError,
    ConfigurationError,
    DeduplicationUnavailableError,
    HandlerAborted,
    InvalidMessageError,
    InvalidProcessorError,
    MessageInProgressError,
    PoisonMessageError,
    StreamwardenError,
    add_note,
    describe,
    error_text,
    error_type_name,
    reported_type,
)
from ._redis import RedisDeadLetterStore
from ._retry import Retrier, RetryDetails
from ._settings import ReliabilitySettings
from ._telemetry import GLOBAL_PROVIDERS_FROM_ENV, DestinationTelemetry, telemetry_for
from ._timeout import run_with_timeout, watchdog
from ._types import Clock, DedupResult, Outcome, Processor, RedisClient, Sleep

__all__ = ["Outcome", "ProcessResult", "ReliabilityLayer", "StagedCompletion", "current_lease", "dedup_scope"]

log = logging.getLogger("streamwarden")

T = TypeVar("T")

_ACKED = frozenset({Outcome.PROCESSED, Outcome.DUPLICATE, Outcome.DEAD_LETTERED})
_COUNTER_OF_OUTCOME = {
    Outcome.PROCESSED: n.COUNTER_PROCESSED,
    Outcome.DUPLICATE: n.COUNTER_DEDUPLICATED,
    Outcome.IN_PROGRESS: n.COUNTER_IN_PROGRESS,
    Outcome.DEAD_LETTERED: n.COUNTER_DEAD_LETTERED,
    Outcome.DEFERRED: n.COUNTER_DEFERRED,
    Outcome.FAILED: n.COUNTER_FAILED,
}


class StagedCompletion:
    """A dedup completion the layer left to its caller, to be written together with others (group
    commit): the lease to complete, the record's TTL and the payload fingerprint.

    A stream runner stages the completions of the messages that finish while its previous commit is in
    flight and writes them, with their acknowledgements, in one round trip. Until it is written, the
    record stays leased: a crash in between lets the lease expire and the redelivery is a counted
    takeover (``ClaimResult.takeover``), never an uncounted re-execution.
    """

    __slots__ = ("fingerprint", "lease", "route", "ttl")

    def __init__(self, route: _Route, lease: Lease, ttl: float, fingerprint: str | None) -> None:
        self.route = route
        self.lease = lease
        self.ttl = ttl
        self.fingerprint = fingerprint

    @property
    def store(self) -> DedupStore:
        """The dedup store the completion belongs to."""
        return self.route.store

    def __repr__(self) -> str:
        return f"<StagedCompletion {self.lease.message_id!r} fence={self.lease.fencing_token}>"


class ProcessResult(NamedTuple):
    """The outcome of one message, with the processor's result or the error that ended it."""

    outcome: Outcome
    message_id: str | None
    result: Any = None
    error: BaseException | None = None
    attempts: int = 0
    dead_letter: DeadLetterEntry | None = None
    completion: StagedCompletion | None = None
    """The dedup completion left to the caller (``process(stage_completion=True)``): write it with
    :meth:`ReliabilityLayer.write_completions` (or a transport that commits it with its acknowledgement),
    then pass the answers to :meth:`ReliabilityLayer.settle_completions`."""

    @property
    def should_ack(self) -> bool:
        """Acknowledge only after success, a confirmed DLQ write, or a confirmed duplicate."""
        return self.outcome in _ACKED


_NO_HEADERS: dict[str, str] = {}
# Enum members bound once: reading ``Outcome.PROCESSED`` costs ~70 ns on Python 3.11, four times per message.
_PROCESSED = Outcome.PROCESSED
_DEAD_LETTERED = Outcome.DEAD_LETTERED
_FAILED = Outcome.FAILED
_NEW = ClaimStatus.NEW
_NEW_KEY = ClaimStatus.NEW.value  # plain str keys for the per-destination cells (see _telemetry.OUTCOMES)
_PROCESSED_KEY = Outcome.PROCESSED.value
_TOTAL = n.COUNTER_TOTAL
_COUNT_PROCESSED = n.COUNTER_PROCESSED
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


class _Route:
    """What the layer needs per (destination, consumer group): telemetry, and the dedup store of that
    scope with its synchronous twins. Built once per destination, read on every message."""

    __slots__ = ("claim_nowait", "complete_nowait", "dt", "scope", "store")

    def __init__(self, dt: DestinationTelemetry, store: DedupStore, scope: str) -> None:
        self.dt = dt
        self.store = store
        self.scope = scope
        self.claim_nowait: Callable[[str, float, str | None], ClaimResult] | None = _nowait_twin(
            store, "claim"
        )
        self.complete_nowait: Callable[[Lease, float, str | None], bool] | None = _nowait_twin(
            store, "complete"
        )


class _LeaseLost(StreamwardenError):
    """Internal: the lease ran out between attempts and could not be extended; stop retrying."""

    retriable = False


def dedup_scope(destination: str, group: str | None) -> str:
    """The default dedup scope of a destination read by a consumer group: ``destination/group``.

    Two groups reading one stream each process every message, and one id on two streams is two
    messages. Without a group (the per-message API) the scope is the destination alone.
    """
    return destination if group is None else f"{destination}/{group}"


class ReliabilityLayer:
    """Wraps a message processor with deduplication, a circuit breaker, retries, timeouts and a DLQ.

    ``redis_client=None`` runs on the embedded in-memory stores (one process). Every decision emits
    OpenTelemetry signals through the global providers unless ``tracer_provider`` / ``meter_provider``
    are given.

    Dedup records live in a *scope*: ``settings.dedup_scope`` when set (deliberate sharing), otherwise
    ``destination/consumer_group`` (see :func:`dedup_scope`), so every consumer group runs every message.
    """

    def __init__(
        self,
        redis_client: RedisClient | None = None,
        settings: ReliabilitySettings | None = None,
        *,
        classifier: ErrorClassifier | None = None,
        dedup_store: DedupStore | None = None,
        dead_letter_store: DeadLetterStore | None = None,
        breakers: BreakerRegistry | None = None,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.monotonic,
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
            dead_letter_store = RedisDeadLetterStore(
                redis_client, key_prefix=settings.key_prefix, **settings.dead_letter_store_options()
            )
        self.deduplication_manager = DeduplicationManager(
            redis_client,
            policy=settings.dedup_policy(),
            store=dedup_store,
            key_prefix=settings.key_prefix,
            clock=clock,
            store_options=settings.dedup_store_options(),
        )
        self.error_handler = ErrorHandler(
            settings, dead_letters=dead_letter_store, classifier=classifier, telemetry=self.telemetry
        )
        self.metrics_collector = MetricsCollector(
            redis_client, service_name=settings.service_name, key_prefix=settings.key_prefix
        )
        # shared by the layers of this service in this process (see Telemetry.breaker_registry)
        self.breakers = (
            breakers
            if breakers is not None
            else self.telemetry.breaker_registry(
                settings.breaker_policy(), classifier=classifier, clock=clock
            )
        )
        self.breakers.on_create(self._watch_breaker)
        self.circuit_breaker: CircuitBreaker = self.breakers.get(settings.circuit_breaker_name)
        self.retrier = Retrier(settings.retry_policy(), classifier=classifier, sleep=sleep, clock=clock)
        self._clock = clock
        self._system = messaging_system
        self._on_retry_hook = on_retry
        self._on_dead_letter_hook = on_dead_letter
        self._base_store = self.deduplication_manager.store
        self._dedup_policy = self.deduplication_manager.policy
        self._retry_policy = self.retrier.policy
        self._first_timeout = self._clip_timeout(self._retry_policy.deadline)
        # A claim made elsewhere (a batch) must have this much lease left before an attempt starts: an
        # attempt may run for its whole timeout, and it must not outlive the lease.
        self._lease_reserve = self._retry_policy.attempt_timeout or self._dedup_policy.lease / 10

        self._content_hash_ids = settings.missing_id_policy == "content_hash"
        self._group = settings.consumer_group
        # the routes of this layer's group by destination, of other groups by (destination, group)
        self._routes: dict[str | tuple[str, str], _Route] = {}
        self._id_field = settings.id_field
        self._defer_exhausted = settings.exhausted_transient_action == "defer"
        self._poison_max_attempts = settings.poison_max_deliveries or sys.maxsize
        self._default_destination = settings.destination
        # The collector's live counts (every counter key is present): the layer adds to them in place.
        self._counts = self.metrics_collector.counts
        self._align_manager()

    # --- stores and scopes ------------------------------------------------------------------------
    @property
    def consumer_group(self) -> str | None:
        """The consumer group this layer processes for (telemetry and the default dedup scope)."""
        return self._group

    def bind_consumer_group(self, group: str, *, messaging_system: str | None = None) -> None:
        """Set the consumer group of a layer built without one (a stream runner does this), and the
        ``messaging.system`` of its spans and metrics when the layer was built with the default.

        Raises :class:`~streamwarden.ConfigurationError` if the layer already serves another group.
        """
        if self._group is not None and self._group != group:
            raise ConfigurationError(
                f"this layer processes for consumer group {self._group!r}, not {group!r}; "
                "use one layer per group"
            )
        system = self._system
        if messaging_system is not None and system == n.MESSAGING_SYSTEM_DEFAULT:
            system = messaging_system
        if self._group == group and system == self._system:
            return
        self._group, self._system = group, system
        self._routes.clear()
        self._align_manager()

    def _align_manager(self) -> None:
        """Point the compatibility ``deduplication_manager`` at the scope of the default destination."""
        self.deduplication_manager.store = self.dedup_store_for(self._default_destination)

    def dedup_scope_for(self, destination: str, group: str | None = None) -> str:
        """The dedup scope of ``destination`` (for the layer's group, or ``group``)."""
        explicit = self.settings.dedup_scope
        return explicit if explicit is not None else dedup_scope(destination, group or self._group)

    def dedup_store_for(self, destination: str, group: str | None = None) -> DedupStore:
        """The dedup store holding the records of ``destination`` (in its scope)."""
        scope = self.dedup_scope_for(destination, group)
        store = self._base_store
        return store.scoped(scope) if isinstance(store, ScopedStore) else store

    @property
    def dedup_store(self) -> DedupStore:
        """The dedup store of the default destination (``settings.destination``)."""
        return self.dedup_store_for(self._default_destination)

    @property
    def dead_letter_store(self) -> DeadLetterStore:
        """The dead-letter store failed messages are written to."""
        return self.error_handler.dead_letters

    def _route(self, destination: str, group: str | None = None) -> _Route:
        if group is None or group == self._group:
            route = self._routes.get(destination)
            if route is None:
                route = self._routes[destination] = self._new_route(destination, self._group)
            return route
        key = (destination, group)
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = self._new_route(destination, group)
        return route

    def _new_route(self, destination: str, group: str | None) -> _Route:
        dt = self.telemetry.destination(destination, group, self._system)
        return _Route(dt, self.dedup_store_for(destination, group), self.dedup_scope_for(destination, group))

    def prepare(self, destination: str) -> None:
        """Set up ``destination`` now rather than at its first message: its telemetry (counters exported
        at 0 from the start, so the first event is a visible rise) and its dedup store. Runners call it
        when they start."""
        self._route(destination)

    async def claim_batch(
        self, message_ids: Sequence[str], *, destination: str, group: str | None = None
    ) -> list[ClaimResult]:
        """Claim a batch of ids of ``destination`` in one store round trip (a stream runner's batch).

        Hand each result to :meth:`process` as ``claim=``; the layer then owns the lease. Raises what the
        store raises; the runner falls back to letting :meth:`process` claim one by one.
        """
        return await self._route(destination, group).store.claim_many(message_ids, self._dedup_policy.lease)

    async def give_back_unrun(
        self, claim: ClaimResult, *, destination: str, group: str | None = None
    ) -> bool:
        """Give back a batch claim whose handler will not run now (a runner defers it): the run is not
        charged, and a takeover stays a takeover (an expired lease), so its message still runs alone
        when it is claimed again. ``False`` when the store could not (it does not answer, or it does not
        know ``keep_takeover``): the claim then stands and its lease runs out."""
        lease = claim.lease
        if claim.status is not _NEW or lease is None:
            return True
        store = self._route(destination, group).store
        try:
            if claim.takeover:
                return await store.release(lease, attempted=False, keep_takeover=True)
            return await store.release(lease, attempted=False)
        except TypeError:  # a store written before keep_takeover existed
            return False
        except Exception as exc:
            log.warning("could not give back the claim of %r: %s", lease.message_id, self.describe_error(exc))
            return False

    # --- wiring -----------------------------------------------------------------------------------
    def _watch_breaker(self, breaker: CircuitBreaker) -> None:
        self.telemetry.watch_breaker(breaker)
        breaker.add_transition_listener(self._on_transition)
        breaker.add_rejection_listener(self._count_rejection)

    def _on_transition(self, event: BreakerTransition) -> None:
        if event.to_state == BreakerState.OPEN:
            self._counts[n.COUNTER_BREAKER_OPENED] += 1
        log.info("circuit breaker %r: %s -> %s", event.name, event.from_state, event.to_state)

    def _count_rejection(self, _event: object) -> None:
        self._counts[n.COUNTER_BREAKER_REJECTIONS] += 1

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
        store = self._base_store
        if isinstance(store, EvictionCheckedStore):
            problem = await store.check_eviction_policy(refuse=self.settings.dedup_refuse_evicting_redis)
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
            ("deferred dedup completions", self._close_dedup),
            ("fleet counters", self.metrics_collector.flush),
        ):
            try:
                await asyncio.wait_for(step(), timeout=max(0.0, deadline - loop.time()))
            except (Exception, TimeoutError) as exc:
                log.warning("shutdown: could not flush %s: %r", what, exc)

    async def _close_dedup(self) -> None:
        if isinstance(self._base_store, ClosableStore):
            await self._base_store.aclose()

    async def __aenter__(self) -> ReliabilityLayer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- the original module's API ----------------------------------------------------------------
    async def process_message_reliably(self, message: Any, processor_func: Processor) -> Any:
        """Process ``message`` with full reliability (the original module's contract).

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

    def wrap(self, processor: Processor) -> Processor:
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
        group: str | None = None,
        stage_completion: bool = False,
    ) -> ProcessResult:
        """Process one message and return its :class:`ProcessResult`; never raises for a failed message.

        ``claim`` is the message's dedup claim when the caller made it (a stream runner claims a whole
        batch with :meth:`claim_batch`); the layer then owns that lease. ``group`` overrides the layer's
        consumer group for this message (a replay of another group's dead letter).

        ``stage_completion=True`` (a stream runner's group commit): on success the dedup completion is
        not written here but returned in :attr:`ProcessResult.completion`, for the caller to write with
        others in one round trip (:meth:`write_completions`, :meth:`settle_completions`). Embedded
        stores complete at once regardless (it costs nothing).

        Only a cancellation of the calling task propagates. Once the handler has started, a cancelled
        message keeps its claim until the lease expires, so a redelivery is a counted takeover.

        Here: read the message (:meth:`_read` off the fast path), open the span, claim the id
        (:meth:`_claim` off the fast path), check poison; :meth:`_run` runs the handler.
        """
        if not callable(processor):
            raise TypeError(f"processor must be an async callable, got {type(processor).__name__}")
        if destination is None:
            destination = (
                message.destination
                if type(message) is Envelope and message.destination
                else self._default_destination
            )
        route = (self._routes.get(destination) if group is None else None) or self._route(destination, group)
        dt = route.dt
        dt.consumed.value += 1
        self._counts[_TOTAL] += 1
        telemetry = self.telemetry
        # Without an SDK, the API's no-op span and histogram cost ~1.5 µs together: skip both. The global
        # providers are read as module attributes here, because a method call per message costs as much
        # as what it saves (an SDK set later is still picked up at the next message).
        traced = telemetry.tracing_on or (
            (trace._TRACER_PROVIDER is not None or GLOBAL_PROVIDERS_FROM_ENV) and telemetry.tracing_enabled()
        )
        timed = telemetry.metrics_on or (
            (_metrics_api._METER_PROVIDER is not None or GLOBAL_PROVIDERS_FROM_ENV)
            and telemetry.metrics_enabled()
        )
        started = time.perf_counter() if timed else 0.0
        headers: Mapping[str, str]
        if (
            type(message) is dict
            and type(mid := message.get(self._id_field)) is str
            and mid
            and type(headers := message.get("headers", _NO_HEADERS)) is dict
        ):
            env: Envelope | None = None  # built only when a slow path needs it
            delivery = 1
        else:
            read = self._read(message)
            if isinstance(read, InvalidMessageError):
                return await self._reject_invalid(message, read, dt)
            env = read
            mid, headers, delivery = env.id, env.headers, env.delivery_count
        if traced:
            span = telemetry.start_process_span(
                dt, mid, delivery, headers, env.attributes if env is not None else None
            )
            # attached even when sampled out: a dead letter then links its kept root span to this context
            token = otel_context.attach(trace.set_span_in_context(span))
        else:  # no SDK: skip the API's no-op span machinery entirely
            span, token = INVALID_SPAN, None
        failure_type: str | None = None
        handler_ran = False
        try:
            fingerprint = (
                fingerprint_or_none(env.payload if env is not None else message)
                if self._dedup_policy.detect_conflicts
                else None
            )
            if claim is None and route.claim_nowait is not None:
                claim = route.claim_nowait(mid, self._dedup_policy.lease, fingerprint)
            else:
                claimed = await self._claim(route, mid, fingerprint, claim, span)
                if type(claimed) is ProcessResult:
                    return claimed
                claim = claimed  # type: ignore[assignment]
            lease: Lease | None = None
            if claim is not None:
                if claim.status is not _NEW:
                    return self._not_new(mid, claim.status, dt, span)
                dt.dedup[_NEW_KEY].value += 1
                lease = claim.lease
                if claim.takeover:
                    self._took_over(mid, dt, span)
                if claim.attempt > self._poison_max_attempts:
                    return await self._poison(route, mid, env, headers, message, claim.attempt, lease)
            result = await self._run(
                route, mid, env, headers, message, processor, lease, fingerprint, stage_completion
            )
            handler_ran = result.attempts > 0
            if result.outcome is _PROCESSED:
                if span is not INVALID_SPAN and span.is_recording():
                    span.set_attribute(n.ATTR_OUTCOME, _PROCESSED)
            elif result.outcome is _DEAD_LETTERED or result.outcome is _FAILED:
                failure_type = self._mark_failed(span, result.error)
            return result
        except BaseException as exc:
            failure_type = self._mark_failed(span, exc)
            raise
        finally:
            # The latency histogram measures handler work: refusals, duplicates and messages that never
            # ran would make an outage look fast (they take ~0 s).
            if timed and handler_ran:
                telemetry.duration.record(
                    time.perf_counter() - started,
                    dt.duration_attrs if failure_type is None else dt.failure_attrs(failure_type),
                )
            if token is not None:
                otel_context.detach(token)
            if span is not INVALID_SPAN:
                span.end()

    async def _run(
        self,
        route: _Route,
        mid: str,
        env: Envelope | None,
        headers: Mapping[str, str],
        message: Any,
        processor: Processor,
        lease: Lease | None,
        fingerprint: str | None,
        stage: bool = False,
    ) -> ProcessResult:
        """Run the handler on a claimed message: the first attempt inline (the hot path, outside
        tenacity), retries and failure handling in :meth:`_after_failure`, then the completion mark."""
        lease_token = _current_lease.set(lease)
        handler_started = False
        try:
            breaker = self.circuit_breaker
            started_attempts = self._clock()
            try:
                admission = breaker.admit()
            except CircuitOpenError as rejected:
                return await self._defer(route, mid, lease, rejected, 0, ran=False)
            handler_started = True
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
                result = await self._after_failure(
                    route, mid, env, headers, message, processor, lease, first_error, started_attempts
                )
                if type(result) is ProcessResult:  # dead-lettered, deferred, failed or lease lost
                    return result
                assert type(result) is _Retried
                value, attempts = result.value, result.attempts
                lease = _current_lease.get()  # extended between attempts
            except BaseException as escaped:
                breaker.abandon(admission)
                aborted = self._aborted(escaped)
                if aborted is None:
                    raise  # a real cancellation of this task
                return await self._fail(route, mid, env, headers, message, lease, aborted, 1)
            else:
                breaker.record_success(admission)
                attempts = 1
            # The handler's effect has happened: the claim is completed, never released.
            staged: StagedCompletion | None = None
            if lease is not None:
                if route.complete_nowait is not None:  # embedded: completing costs nothing, do it now
                    try:
                        if not route.complete_nowait(lease, self._dedup_policy.ttl, fingerprint):
                            self._lease_lost(lease, route.dt)
                    except Exception as exc:
                        self._completion_failed(lease, route.dt, exc)
                elif stage:
                    staged = StagedCompletion(route, lease, self._dedup_policy.ttl, fingerprint)
                else:
                    await self._complete(route, lease, fingerprint)
            # _finish(PROCESSED) written out: the common case, on the hot path
            route.dt.outcomes[_PROCESSED_KEY].value += 1
            self._counts[_COUNT_PROCESSED] += 1
            return _tuple_new(ProcessResult, (_PROCESSED, mid, value, None, attempts, None, staged))
        except BaseException:
            # Cancelled. Before the handler started, the claim is given back at once (not an attempt);
            # after, it is kept until the lease expires: a redelivery is then a counted takeover.
            if lease is not None and not handler_started:
                await self._release(route, lease, attempted=False)
            raise
        finally:
            _current_lease.reset(lease_token)

    # --- reading and claiming ---------------------------------------------------------------------
    def _read(self, message: Any) -> Envelope | InvalidMessageError:
        """The message as an :class:`Envelope`, or why it cannot be one (never raises)."""
        try:
            return envelope_from_message(
                message, id_field=self._id_field, content_hash_ids=self._content_hash_ids
            )
        except InvalidMessageError as invalid:
            return invalid
        except Exception as broken:  # a mapping whose .get raises, a payload nested too deep: never a crash
            unreadable = InvalidMessageError(f"message could not be read: {error_text(broken)}")
            unreadable.__cause__ = broken
            return unreadable

    async def _claim(
        self,
        route: _Route,
        mid: str,
        fingerprint: str | None,
        claim: ClaimResult | None,
        span: Span,
    ) -> ClaimResult | ProcessResult | None:
        """The claim of ``mid``: made here (awaiting the store), or the caller's checked for freshness.

        Returns a :class:`ProcessResult` when the message must not run (store down and fail-closed, or
        a caller's lease that ran out), ``None`` to run without a claim (store down and fail-open).
        """
        if claim is None:
            try:
                return await route.store.claim(mid, self._dedup_policy.lease, fingerprint)
            except Exception as exc:
                return self._dedup_failed(mid, route.dt, span, exc)
        lease = claim.lease
        if claim.status is not _NEW or lease is None or self._has_time(lease):
            return claim
        # Claimed in a batch a while ago (the batch waited for slots): extend before running, or give up
        # the message to whoever holds it now. Never run on a lease that may already be someone else's.
        fresh = await self._extend(route, lease)
        if fresh is None:
            self._lease_lost(lease, route.dt)
            return self._finish(route.dt, Outcome.IN_PROGRESS, mid, error=MessageInProgressError(mid))
        return claim._replace(lease=fresh)

    def _has_time(self, lease: Lease) -> bool:
        return lease.expires_at - self._clock() >= self._lease_reserve

    async def _extend(self, route: _Route, lease: Lease) -> Lease | None:
        try:
            return await route.store.extend(lease, self._dedup_policy.lease)
        except Exception as exc:
            log.warning(
                "could not extend the dedup lease of %r: %s", lease.message_id, self.describe_error(exc)
            )
            return None

    # --- BaseExceptions from handlers -------------------------------------------------------------
    @staticmethod
    def _aborted(escaped: BaseException) -> HandlerAborted | None:
        """A handler's ``BaseException`` as a failure of its message, or ``None`` for a real cancellation.

        ``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit`` or a custom ``BaseException`` raised by a
        handler would end the event loop and every other in-flight message; a ``CancelledError`` that
        the handler raised itself (its task is not being cancelled) would look like a shutdown. Each fails
        this one message instead. ``KeyboardInterrupt`` from Ctrl-C lands here too when it hits inside a
        handler: run consumers under :meth:`RedisStreamConsumer.run_until_signal`, which handles signals.
        """
        if isinstance(escaped, asyncio.CancelledError):
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                return None
        aborted = HandlerAborted(escaped)
        aborted.__cause__ = escaped
        return aborted

    # --- outcomes ---------------------------------------------------------------------------------
    def _mark_failed(self, span: Span, error: BaseException | None) -> str:
        """Error status and ``error.type`` on the span, and the exception as a span event, redacted and
        bounded like a dead-letter entry (``Span.record_exception`` would export it verbatim)."""
        error_type = reported_type(error) if error is not None else n.ERROR_TYPE_OTHER
        if span.is_recording():
            span.set_attribute(n.ATTR_ERROR_TYPE, error_type)
            if error is not None:
                redactor = self.error_handler.redactor
                span.add_event(
                    "exception",
                    {
                        "exception.type": error_type,
                        "exception.message": DeadLetterEntry.bound_message(redactor.text(error_text(error))),
                        "exception.stacktrace": redactor.text(
                            format_traceback_safely(error, self.settings.dlq_max_traceback_chars)
                        ),
                    },
                )
            span.set_status(Status(StatusCode.ERROR, error_type))
        return error_type

    def describe_error(self, exc: BaseException) -> str:
        """An exception as text for a log line or an error message: never raising, secrets redacted."""
        return self.error_handler.redactor.text(describe(exc))

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
        self._counts[_COUNTER_OF_OUTCOME[outcome]] += 1
        if self.telemetry.tracing_on:
            span = trace.get_current_span()
            if span.is_recording():  # traces can be searched for deferred or dead-lettered messages
                span.set_attribute(n.ATTR_OUTCOME, outcome)
        if (
            outcome is Outcome.DEAD_LETTERED
        ):  # messages_failed counts every failed message (as in the original module)
            self._counts[n.COUNTER_FAILED] += 1
        return _tuple_new(ProcessResult, (outcome, message_id, result, error, attempts, entry, None))

    # --- dedup answers ----------------------------------------------------------------------------
    def _dedup_failed(
        self, mid: str, dt: DestinationTelemetry, span: Span, exc: Exception
    ) -> ProcessResult | None:
        """The store failed to answer a claim: defer (fail-closed) or return ``None`` to go on (fail-open)."""
        dt.dedup[DedupResult.ERROR].value += 1
        self._counts[n.COUNTER_DEDUP_ERRORS] += 1
        if span.is_recording():
            span.add_event(n.EVENT_DEDUP_ERROR, {n.ATTR_ERROR_TYPE: error_type_name(exc)})
        if not self._dedup_policy.fail_open:
            unavailable = DeduplicationUnavailableError(f"dedup store failed: {self.describe_error(exc)}")
            unavailable.__cause__ = exc
            return self._finish(dt, Outcome.DEFERRED, mid, error=unavailable)
        log.warning(
            "dedup store failed (%s); processing %r without deduplication", self.describe_error(exc), mid
        )
        return None

    def _took_over(self, mid: str, dt: DestinationTelemetry, span: Span) -> None:
        """A claim replaced an expired lease: its owner may have run the effect; count the possible duplicate."""
        dt.dedup[DedupResult.TAKEOVER].value += 1
        self._counts[n.COUNTER_TAKEOVERS] += 1
        if span.is_recording():
            span.add_event(n.EVENT_DEDUP_TAKEOVER)
        log.info("message %r: took over an expired lease (possible duplicate execution)", mid)

    def _not_new(self, mid: str, status: ClaimStatus, dt: DestinationTelemetry, span: Span) -> ProcessResult:
        dt.dedup[status].value += 1
        if status is ClaimStatus.IN_PROGRESS:
            if span.is_recording():
                span.add_event(n.EVENT_DEDUP_IN_PROGRESS, {n.ATTR_DEDUP_RESULT: status})
            return self._finish(dt, Outcome.IN_PROGRESS, mid, error=MessageInProgressError(mid))
        if span.is_recording():
            span.add_event(
                n.EVENT_DEDUP_CONFLICT if status is ClaimStatus.CONFLICT else n.EVENT_DEDUP_DUPLICATE,
                {n.ATTR_DEDUP_RESULT: status},
            )
        return self._finish(dt, Outcome.DUPLICATE, mid)

    async def _complete(self, route: _Route, lease: Lease, fingerprint: str | None) -> None:
        try:
            if not await route.store.complete(lease, self._dedup_policy.ttl, fingerprint):
                self._lease_lost(lease, route.dt)
        except Exception as exc:
            self._completion_failed(lease, route.dt, exc)

    async def write_completions(self, staged: Sequence[StagedCompletion]) -> list[bool] | BaseException:
        """Write staged completions, one ``complete_many`` round trip per store; the answers (``True``:
        completed, ``False``: the lease had been taken over), or the error that stopped the write.

        The caller passes what this returns to :meth:`settle_completions`; nothing here raises.
        """
        if not staged:
            return []
        answers: list[bool] = [False] * len(staged)
        by_store: dict[int, list[int]] = {}
        for index, item in enumerate(staged):
            by_store.setdefault(id(item.route.store), []).append(index)
        try:
            for indexes in by_store.values():
                items = [staged[i] for i in indexes]
                store = items[0].route.store
                leases = [item.lease for item in items]
                fingerprints = [item.fingerprint for item in items]
                if isinstance(store, BatchCompletingStore):
                    done = await store.complete_many(leases, items[0].ttl, fingerprints)
                else:
                    done = [
                        await store.complete(lease, items[0].ttl, fp)
                        for lease, fp in zip(leases, fingerprints, strict=True)
                    ]
                for i, ok in zip(indexes, done, strict=True):
                    answers[i] = ok
        except Exception as exc:
            return exc
        return answers

    def settle_completions(
        self, staged: Sequence[StagedCompletion], answers: Sequence[bool] | BaseException
    ) -> None:
        """Account for written staged completions: a refused one is a lost lease, an error is a dedup
        error (the effect happened, the mark did not: a redelivery is a counted takeover)."""
        if isinstance(answers, BaseException):
            for item in staged:
                self._completion_failed(item.lease, item.route.dt, answers)
            return
        for item, ok in zip(staged, answers, strict=True):
            if not ok:
                self._lease_lost(item.lease, item.route.dt)

    def _completion_failed(self, lease: Lease, dt: DestinationTelemetry, exc: BaseException) -> None:
        """The effect happened but the completion mark did not: a redelivery may run it again."""
        dt.dedup[DedupResult.ERROR].value += 1
        self._counts[n.COUNTER_DEDUP_ERRORS] += 1
        log.error("could not complete dedup record for %r: %s", lease.message_id, self.describe_error(exc))

    def _lease_lost(self, lease: Lease, dt: DestinationTelemetry) -> None:
        """Our lease expired and could not be kept (a pause, a slow handler): another owner may run it."""
        dt.dedup[DedupResult.LEASE_LOST].value += 1
        self._counts[n.COUNTER_LEASES_LOST] += 1
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(n.EVENT_DEDUP_LEASE_LOST)
        log.warning(
            "dedup lease for %r expired and was lost; another owner may run it (counted as a takeover there)",
            lease.message_id,
        )

    async def _mark_dead_lettered(self, route: _Route, lease: Lease) -> None:
        """After a confirmed DLQ write: mark the id dead-lettered for one lease period.

        A crash between the DLQ write and the acknowledgement redelivers the message; within this window
        the redelivery is a duplicate (acknowledged, not dead-lettered twice). After it, the id can run
        again (a replay, a new delivery). The marker is its own record state, never taken for a real
        completion: :class:`~streamwarden.DeadLetterReplayer` reads it with ``state()``.
        """
        try:
            if await route.store.mark_dead_lettered(lease, self._dedup_policy.lease):
                return
        except Exception as exc:
            log.error("could not mark %r as dead-lettered: %s", lease.message_id, self.describe_error(exc))
        await self._release(route, lease, attempted=True)

    async def _release(self, route: _Route, lease: Lease, *, attempted: bool) -> None:
        try:
            await route.store.release(lease, attempted=attempted)
        except Exception as exc:  # the lease expires by itself; the message is redelivered then
            log.error("could not release dedup lease for %r: %s", lease.message_id, self.describe_error(exc))

    # --- retries, deferral, dead letters -----------------------------------------------------------
    async def _attempt(
        self, breaker: CircuitBreaker, processor: Processor, message: Any, timeout: float | None
    ) -> Any:
        """One retry attempt: breaker admission, the processor under its timeout, the outcome recorded.

        A message counts once toward the breaker (its first attempt, in :meth:`process`): the failures
        of its retries are not counted again, so one message that keeps failing cannot open the breaker
        for every other message. A half-open trial's failure always counts (it re-opens the breaker).
        """
        admission = breaker.admit()
        try:
            awaitable = processor(message)
            if type(awaitable) is not CoroutineType and not inspect.isawaitable(awaitable):
                raise InvalidProcessorError(
                    f"processor returned {type(awaitable).__name__}, not an awaitable: use an async def function"
                )
            result = await run_with_timeout(awaitable, timeout)
        except Exception as exc:
            if admission.trial:
                breaker.record_failure(admission, exc, self.classifier.classify(exc))
            else:
                breaker.abandon(admission)
            raise
        except BaseException as escaped:
            breaker.abandon(admission)
            aborted = self._aborted(escaped)
            if aborted is None:
                raise
            raise aborted from escaped
        breaker.record_success(admission)
        return result

    async def _after_failure(
        self,
        route: _Route,
        mid: str,
        env: Envelope | None,
        headers: Mapping[str, str],
        message: Any,
        processor: Processor,
        lease: Lease | None,
        first_error: Exception,
        started: float,
    ) -> ProcessResult | _Retried:
        """The slow path after a failed first attempt: tenacity retries, then DLQ or deferral.

        Before each retry the lease is checked and extended if it runs low; a lease that cannot be kept
        stops the retries (another owner may hold the id now; it is not ours to run or acknowledge).
        Success returns :class:`_Retried`; :meth:`process` completes the claim, as on the fast path.
        """
        breaker = self.circuit_breaker
        deadline = self._retry_policy.deadline
        attempts = 1
        held = lease

        async def again() -> Any:
            nonlocal attempts, held
            if held is not None and not self._has_time(held):
                fresh = await self._extend(route, held)
                if fresh is None:
                    raise _LeaseLost(f"lease of {mid!r} lost between attempts")
                held = fresh
                _current_lease.set(fresh)
            attempts += 1
            remaining = None if deadline is None else deadline - (self._clock() - started)
            return await self._attempt(breaker, processor, message, self._clip_timeout(remaining))

        try:
            value = await self.retrier.retry_after(
                first_error, again, started=started, on_retry=functools.partial(self._on_retry, route.dt)
            )
        except _LeaseLost:
            assert held is not None
            self._retries_ended(route.dt, succeeded=False)
            self._lease_lost(held, route.dt)
            return self._finish(
                route.dt, Outcome.IN_PROGRESS, mid, error=MessageInProgressError(mid), attempts=attempts
            )
        except CircuitOpenError as rejected:
            self._retries_ended(route.dt, succeeded=False)
            return await self._defer(route, mid, held, rejected, attempts, ran=True)
        except Exception as final:
            self._retries_ended(route.dt, succeeded=False)
            if self._defer_exhausted and self.retrier.should_retry(final):
                # retries ran out on an error that may pass: leave it to redelivery (and, if it keeps
                # failing, to the poison check) instead of filling the DLQ during an outage
                return await self._defer(route, mid, held, final, attempts, ran=True)
            return await self._fail(route, mid, env, headers, message, held, final, attempts)
        self._retries_ended(route.dt, succeeded=True)
        return _Retried(value, attempts)

    def _retries_ended(self, dt: DestinationTelemetry, *, succeeded: bool) -> None:
        """Count how the retries of a message whose first attempt failed ended (the dashboard's
        "succeeded after retry" against "exhausted")."""
        result = n.RETRY_SUCCEEDED if succeeded else n.RETRY_EXHAUSTED
        self.telemetry.retry_outcomes.add(1, {**dt.metric_attrs, n.ATTR_RETRY_RESULT: result})

    def _on_retry(self, dt: DestinationTelemetry, details: RetryDetails) -> None:
        self.telemetry.on_retry(dt, details.attempt, details.delay, error_type_name(details.error))
        self._counts[n.COUNTER_RETRIES] += 1
        _call_hook(self._on_retry_hook, details)

    async def _defer(
        self, route: _Route, mid: str, lease: Lease | None, error: BaseException, attempts: int, *, ran: bool
    ) -> ProcessResult:
        """Not acknowledged: the message comes back later. The claim is given back at once.

        The give-back counts toward poison only when the handler ran and the dependency looked healthy
        (breaker closed): a refusal by the breaker, or failures during an outage, are not the message's
        fault and never make a healthy message poison.
        """
        if lease is not None:
            per_message = ran and self.circuit_breaker.state == BreakerState.CLOSED
            await self._release(route, lease, attempted=per_message)
        return self._finish(route.dt, Outcome.DEFERRED, mid, error=error, attempts=attempts)

    async def _poison(
        self,
        route: _Route,
        mid: str,
        env: Envelope | None,
        headers: Mapping[str, str],
        message: Any,
        attempt: int,
        lease: Lease | None,
    ) -> ProcessResult:
        """The handler already ran for this id as often as allowed: dead-letter it as ``poison``, unrun."""
        error = PoisonMessageError(mid, attempt - 1, self._poison_max_attempts)
        return await self._fail(route, mid, env, headers, message, lease, error, 0, DeadLetterReason.POISON)

    async def _fail(
        self,
        route: _Route,
        mid: str,
        env: Envelope | None,
        headers: Mapping[str, str],
        message: Any,
        lease: Lease | None,
        error: BaseException,
        attempts: int,
        reason: DeadLetterReason = DeadLetterReason.ERROR,
    ) -> ProcessResult:
        """Dead-letter the message (confirmed write, then the dead-letter mark), or FAILED if impossible."""
        dt = route.dt
        if env is None:
            env = Envelope(mid, message, headers, destination=dt.destination)
        entry: DeadLetterEntry | None = None
        if self.settings.dlq_enabled and not isinstance(error, InvalidProcessorError):
            try:
                entry = await self.error_handler.dead_letter(
                    env,
                    error,
                    self.classifier.classify(error),
                    attempts=attempts,
                    reason=reason,
                    destination=dt.destination,
                    dt=dt,
                    consumer_group=dt.group,
                )
            except Exception as dlq_error:  # DeadLetterError, or an entry that could not even be built
                add_note(
                    error, f"streamwarden: dead-letter write failed, message not acknowledged: {dlq_error}"
                )
                log.warning(
                    "message %r could not be dead-lettered (%s); not acknowledged, it will be redelivered",
                    mid,
                    self.describe_error(dlq_error),
                )
        if lease is not None:
            if entry is None:
                await self._release(route, lease, attempted=True)
            else:
                await self._mark_dead_lettered(route, lease)
        if entry is None:
            return self._finish(dt, Outcome.FAILED, mid, error=error, attempts=attempts)
        log.info("message %r dead-lettered (%s, %s): %s", mid, reason, entry.error_type, entry.entry_id)
        _call_hook(self._on_dead_letter_hook, entry)
        return self._finish(dt, Outcome.DEAD_LETTERED, mid, error=error, attempts=attempts, entry=entry)

    async def _reject_invalid(
        self, message: Any, invalid: InvalidMessageError, dt: DestinationTelemetry
    ) -> ProcessResult:
        """A message that cannot be read: dead-lettered as it came (reason ``invalid_message`` or
        ``missing_id``) and counted in ``streamwarden.invalid_messages``; never run, never a crash."""
        telemetry = self.telemetry
        telemetry.invalid_messages.add(1, {**dt.metric_attrs, n.ATTR_DLQ_REASON: invalid.reason})
        self._counts[n.COUNTER_INVALID] += 1
        span = telemetry.tracer.start_span(
            dt.span_name, kind=trace.SpanKind.CONSUMER, attributes=dt.span_attrs
        )
        self._mark_failed(span, invalid)
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
                            consumer_group=dt.group,
                        )
                    except Exception as dlq_error:
                        add_note(
                            invalid,
                            f"streamwarden: dead-letter write failed: {self.describe_error(dlq_error)}",
                        )
        finally:
            if span.is_recording():
                span.set_attribute(n.ATTR_OUTCOME, Outcome.FAILED if entry is None else Outcome.DEAD_LETTERED)
            span.end()
        if entry is None:
            return self._finish(dt, Outcome.FAILED, None, error=invalid)
        log.info("invalid message dead-lettered (%s): %s", invalid.reason, entry.entry_id)
        _call_hook(self._on_dead_letter_hook, entry)
        return self._finish(dt, Outcome.DEAD_LETTERED, None, error=invalid, entry=entry)
