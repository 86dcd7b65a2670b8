"""OpenTelemetry instrumentation: every span, event and metric streamwarden emits goes through here.

Library code uses the OpenTelemetry **API** only. An application that configures its own SDK gets
streamwarden's signals in its pipeline; :func:`configure_telemetry` sets one up for applications that
want ours (OTLP exporter, Prometheus endpoint).

**Hot-path cost.** One SDK counter ``add`` with three attributes costs ~6 µs, about as much as
everything else streamwarden does per message. So per-message *counters* (messages by outcome, dedup
results, consumed messages) are aggregated in-process in plain integer cells, one per attribute set,
and reported through observable counters when a reader collects: the exported series are the same
cumulative monotonic sums, for about 50 ns per message. The latency *histogram* is recorded per message
inside the process span, so the SDK can attach exemplars (trace links). Rare events (retries, breaker
transitions, rejections, dead letters) use ordinary synchronous instruments.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.metrics import CallbackOptions, NoOpMeterProvider, Observation
from opentelemetry.metrics import _internal as _metrics_internal
from opentelemetry.trace import Link, NoOpTracerProvider, ProxyTracerProvider, Span, SpanContext, SpanKind

from . import _names as n
from ._breaker import (
    BreakerPolicy,
    BreakerRegistry,
    BreakerRejection,
    BreakerState,
    BreakerTransition,
    CircuitBreaker,
)
from ._classify import ErrorClassifier
from ._dlq import DeadLetterReason
from ._types import DedupResult, Outcome

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

__all__ = ["DestinationTelemetry", "Telemetry", "configure_telemetry"]

log = logging.getLogger("streamwarden.telemetry")

try:
    from importlib.metadata import version as _pkg_version

    _VERSION = _pkg_version("streamwarden")
except Exception:  # pragma: no cover - running from a source tree without metadata
    _VERSION = "0"

_NOOP_TRACER_PROVIDERS = (ProxyTracerProvider, NoOpTracerProvider)
_SEVERITY = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
_STATE_VALUES = tuple(state.value for state in BreakerState)

_ENV_TRACER_PROVIDER = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
#: The global providers may come from OTEL_PYTHON_*_PROVIDER variables, created on first use: then the
#: hot path cannot tell "no SDK" from a module attribute and asks every time.
GLOBAL_PROVIDERS_FROM_ENV = _ENV_TRACER_PROVIDER or "OTEL_PYTHON_METER_PROVIDER" in os.environ


def _global_tracer_provider() -> object:
    """``trace.get_tracer_provider()`` without its per-call ``os.environ`` lookup (~0.5 µs)."""
    if not _ENV_TRACER_PROVIDER:
        provider = getattr(trace, "_TRACER_PROVIDER", _MISSING)
        if provider is None:
            return _PROXY_MARKER
        if provider is not _MISSING:
            return provider
    return trace.get_tracer_provider()


_MISSING = object()
_PROXY_MARKER = ProxyTracerProvider()

# plain str keys: a dict lookup by an enum member of another class costs ~0.1 µs more (rich compare)
OUTCOMES = tuple(o.value for o in Outcome)
# "takeover" counts NEW claims that replaced an expired lease (also counted as "new"): possible duplicates.
DEDUP_RESULTS = tuple(r.value for r in DedupResult)


class Cell:
    """A mutable integer; the hot path does ``cell.value += 1``."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class DestinationTelemetry:
    """Precomputed names, attribute sets and counter cells for one destination (and consumer group)."""

    __slots__ = (
        "_failure_attrs",
        "consumed",
        "dedup",
        "destination",
        "duration_attrs",
        "group",
        "metric_attrs",
        "outcomes",
        "span_attrs",
        "span_name",
        "system",
    )

    def __init__(self, service: str, destination: str, group: str | None, system: str) -> None:
        self.destination = destination
        self.group = group
        self.system = system
        self.span_name = n.SPAN_PROCESS.format(destination=destination)
        semconv: dict[str, Any] = {
            n.ATTR_MESSAGING_SYSTEM: system,
            n.ATTR_MESSAGING_OPERATION_NAME: n.OPERATION_PROCESS,
            n.ATTR_MESSAGING_DESTINATION: destination,
        }
        if group:
            semconv[n.ATTR_MESSAGING_CONSUMER_GROUP] = group
        self.span_attrs = {**semconv, n.ATTR_MESSAGING_OPERATION_TYPE: n.OPERATION_PROCESS}
        self.duration_attrs = {n.ATTR_SERVICE_NAME: service, **semconv}
        self.metric_attrs = {n.ATTR_SERVICE_NAME: service, n.ATTR_MESSAGING_DESTINATION: destination}
        self.consumed = Cell()
        self.outcomes: dict[str, Cell] = {o: Cell() for o in OUTCOMES}
        self.dedup: dict[str, Cell] = {r: Cell() for r in DEDUP_RESULTS}
        self._failure_attrs: dict[str, dict[str, Any]] = {}

    def failure_attrs(self, error_type: str) -> dict[str, Any]:
        """Duration attributes plus ``error.type`` (cached per error type)."""
        attrs = self._failure_attrs.get(error_type)
        if attrs is None:
            if len(self._failure_attrs) >= 256:  # bound cardinality against pathological error types
                error_type = n.ERROR_TYPE_OTHER
            attrs = self._failure_attrs.setdefault(
                error_type, {**self.duration_attrs, n.ATTR_ERROR_TYPE: error_type}
            )
        return attrs


class Telemetry:
    """Tracer, meter and instruments for one service, shared by every layer using the same providers."""

    def __init__(
        self,
        service_name: str,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        self.service_name = service_name
        self.tracer = trace.get_tracer(
            n.INSTRUMENTATION_NAME, _VERSION, tracer_provider=tracer_provider, schema_url=n.SCHEMA_URL
        )
        self._tracer_provider = tracer_provider
        #: True once tracing is known to be on (read directly on the hot path; see tracing_enabled). With
        #: explicit providers it is decided here; with the global ones, when an SDK shows up.
        self.tracing_on = tracer_provider is not None and not isinstance(
            tracer_provider, _NOOP_TRACER_PROVIDERS
        )
        self._meter_provider = meter_provider
        #: True once metrics are known to be on (read directly on the hot path; see metrics_enabled)
        self.metrics_on = meter_provider is not None and not isinstance(meter_provider, NoOpMeterProvider)
        meter = metrics.get_meter(
            n.INSTRUMENTATION_NAME, _VERSION, meter_provider=meter_provider, schema_url=n.SCHEMA_URL
        )
        self.meter = meter
        self._destinations: dict[tuple[str, str | None, str], DestinationTelemetry] = {}
        self._lock = threading.Lock()
        self._dlq_depth_sources: list[Callable[[], Mapping[str, int]]] = []
        self._breakers: list[CircuitBreaker] = []
        self._registries: dict[tuple[BreakerPolicy, Callable[[], float]], BreakerRegistry] = {}
        self._service_attrs = {n.ATTR_SERVICE_NAME: service_name}

        self.duration = meter.create_histogram(
            n.METRIC_PROCESS_DURATION,
            unit="s",
            description="Duration of processing one message, all attempts included.",
            explicit_bucket_boundaries_advisory=list(n.DURATION_BUCKETS),
        )
        meter.create_observable_counter(
            n.METRIC_CONSUMED_MESSAGES,
            callbacks=[self._observe_consumed],
            unit="{message}",
            description="Messages handed to streamwarden for processing.",
        )
        meter.create_observable_counter(
            n.METRIC_MESSAGES,
            callbacks=[self._observe_outcomes],
            unit="{message}",
            description="Messages by final outcome.",
        )
        meter.create_observable_counter(
            n.METRIC_DEDUP_CHECKS,
            callbacks=[self._observe_dedup],
            unit="{check}",
            description="Deduplication claims by result.",
        )
        self.retry_attempts = meter.create_counter(
            n.METRIC_RETRY_ATTEMPTS, unit="{retry}", description="Retries scheduled after a failed attempt."
        )
        self.retry_outcomes = meter.create_counter(
            n.METRIC_RETRY_OUTCOMES,
            unit="{message}",
            description="Messages whose first attempt failed, by how their retries ended.",
        )
        meter.create_observable_gauge(
            n.METRIC_BREAKER_FAILURES,
            callbacks=[self._observe_breaker_failures],
            unit="{failure}",
            description="Consecutive failures counted by each circuit breaker (it opens at the threshold).",
        )
        meter.create_observable_gauge(
            n.METRIC_BREAKER_THRESHOLD,
            callbacks=[self._observe_breaker_thresholds],
            unit="{failure}",
            description="Consecutive failures that open each circuit breaker.",
        )
        meter.create_observable_gauge(
            n.METRIC_BREAKER_RETRY_AFTER,
            callbacks=[self._observe_breaker_retry_after],
            unit="s",
            description="Seconds until an open circuit breaker lets a half-open trial through (0 unless open).",
        )
        # Observed at collection from each breaker's current state, so a scrape never sees a state
        # change half-applied (a -1 without its +1).
        meter.create_observable_up_down_counter(
            n.METRIC_BREAKER_STATUS,
            callbacks=[self._observe_breakers],
            unit="{state}",
            description="1 for the current state of each circuit breaker, 0 for the others.",
        )
        self.breaker_transitions = meter.create_counter(
            n.METRIC_BREAKER_TRANSITIONS, unit="{transition}", description="Circuit breaker state changes."
        )
        self.breaker_rejections = meter.create_counter(
            n.METRIC_BREAKER_REJECTIONS, unit="{call}", description="Calls refused by an open breaker."
        )
        self.dlq_messages = meter.create_counter(
            n.METRIC_DLQ_MESSAGES, unit="{message}", description="Messages written to the dead-letter queue."
        )
        meter.create_observable_gauge(
            n.METRIC_DLQ_DEPTH,
            callbacks=[self._observe_dlq_depth],
            unit="{message}",
            description="Entries currently in the dead-letter queue.",
        )
        self.dlq_replays = meter.create_counter(
            n.METRIC_DLQ_REPLAYS, unit="{message}", description="Dead letters replayed, by result."
        )
        self.dlq_write_errors = meter.create_counter(
            n.METRIC_DLQ_WRITE_ERRORS,
            unit="{error}",
            description="Dead-letter writes that were not confirmed (the message was not acknowledged).",
        )
        self._consumer_sources: list[Callable[[], Iterable[tuple[str, float, Mapping[str, Any]]]]] = []
        meter.create_observable_gauge(
            n.METRIC_CONSUMER_LAG,
            callbacks=[lambda options: self._observe_consumer(n.METRIC_CONSUMER_LAG)],
            unit="{message}",
            description="Entries in the stream not yet delivered to the consumer group (Redis >= 7).",
        )
        meter.create_observable_gauge(
            n.METRIC_CONSUMER_PARTITION_LAG,
            callbacks=[lambda options: self._observe_consumer(n.METRIC_CONSUMER_PARTITION_LAG)],
            unit="{message}",
            description="Kafka: records of one partition not yet committed by the group (high watermark - committed).",
        )
        meter.create_observable_gauge(
            n.METRIC_CONSUMER_OLDEST_PENDING_AGE,
            callbacks=[lambda options: self._observe_consumer(n.METRIC_CONSUMER_OLDEST_PENDING_AGE)],
            unit="s",
            description="Age of the oldest entry delivered to the group and not yet acknowledged.",
        )
        meter.create_observable_gauge(
            n.METRIC_CONSUMER_PENDING,
            callbacks=[lambda options: self._observe_consumer(n.METRIC_CONSUMER_PENDING)],
            unit="{message}",
            description="Entries delivered to the group but not yet acknowledged.",
        )
        self.consumer_lost = meter.create_counter(
            n.METRIC_CONSUMER_LOST,
            unit="{message}",
            description="Pending stream entries deleted (trimmed) before they were processed.",
        )
        self.retry_topic_records = meter.create_counter(
            n.METRIC_RETRY_TOPIC_RECORDS,
            unit="{message}",
            description="Kafka: failed messages sent on to a retry topic (result sent) or not (send_failed: held locally).",
        )
        self.invalid_messages = meter.create_counter(
            n.METRIC_INVALID_MESSAGES,
            unit="{message}",
            description="Messages rejected before processing (missing id, not a mapping).",
        )

    # --- per destination ------------------------------------------------------------------------
    def destination(self, destination: str, group: str | None, system: str) -> DestinationTelemetry:
        """The (cached) telemetry for one destination and consumer group."""
        key = (destination, group, system)
        found = self._destinations.get(key)
        if found is None:
            with self._lock:
                found = self._destinations.get(key)
                if found is None:
                    found = self._destinations[key] = DestinationTelemetry(
                        self.service_name, destination, group, system
                    )
                    self._precreate(found)
        return found

    def _precreate(self, dt: DestinationTelemetry) -> None:
        """Export the rare-event counters of a new destination at 0 now, so the first event is a rise of
        a known series and ``increase()`` sees it (a series born at 10 reads as no increase at all)."""
        self.dlq_write_errors.add(0, dt.metric_attrs)
        for result in (n.RETRY_SUCCEEDED, n.RETRY_EXHAUSTED):
            self.retry_outcomes.add(0, {**dt.metric_attrs, n.ATTR_RETRY_RESULT: result})
        # plain str values: the SDK keeps an enum-valued attribute set as a series of its own, and the
        # exporter then shows two series with one label set (Prometheus keeps the first, the 0)
        for reason in (DeadLetterReason.INVALID_MESSAGE.value, DeadLetterReason.MISSING_ID.value):
            self.invalid_messages.add(0, {**dt.metric_attrs, n.ATTR_DLQ_REASON: reason})

    def _observe_consumed(self, options: CallbackOptions) -> Iterable[Observation]:
        for dt in list(self._destinations.values()):
            yield Observation(dt.consumed.value, dt.duration_attrs)

    def _observe_outcomes(self, options: CallbackOptions) -> Iterable[Observation]:
        for dt in list(self._destinations.values()):
            for outcome, cell in dt.outcomes.items():
                # every outcome from the start, 0 included: increase() then sees the first one
                yield Observation(cell.value, {**dt.metric_attrs, n.ATTR_OUTCOME: outcome})

    def _observe_dedup(self, options: CallbackOptions) -> Iterable[Observation]:
        for dt in list(self._destinations.values()):
            for result, cell in dt.dedup.items():
                yield Observation(cell.value, {**dt.metric_attrs, n.ATTR_DEDUP_RESULT: result})

    def add_dlq_depth_source(self, source: Callable[[], Mapping[str, int]]) -> None:
        """Report ``source()`` (destination -> depth) as ``streamwarden.dlq.depth`` at each collection."""
        if source not in self._dlq_depth_sources:
            self._dlq_depth_sources.append(source)

    def _observe_dlq_depth(self, options: CallbackOptions) -> Iterable[Observation]:
        # Every source reports the whole queue of a destination (several layers, or several store objects,
        # over one Redis stream each see all of it): the depth is the largest report, never their sum.
        totals: dict[str, int] = {}
        for source in list(self._dlq_depth_sources):
            try:
                for dest, depth in source().items():
                    totals[dest] = max(totals.get(dest, 0), depth)
            except Exception:
                log.exception("dead-letter depth source failed")
        for dest, depth in totals.items():
            yield Observation(depth, {**self._service_attrs, n.ATTR_MESSAGING_DESTINATION: dest})

    def consumer_attrs(self, destination: str, group: str) -> dict[str, Any]:
        """The attributes of a consumer's own signals (lag, pending, oldest pending age, lost)."""
        return {
            n.ATTR_SERVICE_NAME: self.service_name,
            n.ATTR_MESSAGING_DESTINATION: destination,
            n.ATTR_MESSAGING_CONSUMER_GROUP: group,
        }

    def send_span(
        self, destination: str, message_id: str | None, system: str
    ) -> AbstractContextManager[Span]:
        """The PRODUCER ``send {destination}`` span around writing one message; the consumer's process
        span links to it through the ``traceparent`` written with the message."""
        attributes: dict[str, Any] = {
            n.ATTR_MESSAGING_SYSTEM: system,
            n.ATTR_MESSAGING_OPERATION_NAME: n.OPERATION_SEND,
            n.ATTR_MESSAGING_OPERATION_TYPE: n.OPERATION_SEND,
            n.ATTR_MESSAGING_DESTINATION: destination,
        }
        if message_id:
            attributes[n.ATTR_MESSAGING_MESSAGE_ID] = message_id
        return self.tracer.start_as_current_span(
            n.SPAN_SEND.format(destination=destination), kind=SpanKind.PRODUCER, attributes=attributes
        )

    def add_consumer_gauge_source(
        self, source: Callable[[], Iterable[tuple[str, float, Mapping[str, Any]]]]
    ) -> None:
        """Report ``source()`` rows ``(metric name, value, attributes)`` as the consumer gauges.

        Sources return cached values: a metric callback never does I/O.
        """
        self._consumer_sources.append(source)

    def _observe_consumer(self, metric: str) -> Iterable[Observation]:
        rows: list[Observation] = []
        for source in list(self._consumer_sources):
            try:
                rows.extend(Observation(v, dict(a)) for name, v, a in source() if name == metric)
            except Exception:
                log.exception("consumer gauge source failed")
        return rows

    def _observe_breakers(self, options: CallbackOptions) -> Iterable[Observation]:
        # One series set per breaker name: breakers of the same name (two layers of one service in one
        # process, each with its own registry) report the least healthy state, so a scrape never shows
        # a name closed and open at once.
        for name, breaker in self._breakers_by_name().items():
            current = breaker.state
            for state in BreakerState:
                yield Observation(
                    1 if state == current else 0,
                    {**self._service_attrs, n.ATTR_BREAKER_NAME: name, n.ATTR_BREAKER_STATE: state},
                )

    def _breakers_by_name(self) -> dict[str, CircuitBreaker]:
        """One breaker per name: the least healthy of those sharing it (see :meth:`_observe_breakers`)."""
        chosen: dict[str, CircuitBreaker] = {}
        for breaker in list(self._breakers):
            known = chosen.get(breaker.name)
            if known is None or _SEVERITY[breaker.state] > _SEVERITY[known.state]:
                chosen[breaker.name] = breaker
        return chosen

    def _observe_breaker_failures(self, options: CallbackOptions) -> Iterable[Observation]:
        for name, breaker in self._breakers_by_name().items():
            yield Observation(breaker.failure_count, {**self._service_attrs, n.ATTR_BREAKER_NAME: name})

    def _observe_breaker_thresholds(self, options: CallbackOptions) -> Iterable[Observation]:
        for name, breaker in self._breakers_by_name().items():
            yield Observation(
                breaker.policy.failure_threshold, {**self._service_attrs, n.ATTR_BREAKER_NAME: name}
            )

    def _observe_breaker_retry_after(self, options: CallbackOptions) -> Iterable[Observation]:
        for name, breaker in self._breakers_by_name().items():
            yield Observation(
                max(breaker.retry_after(), 0.0), {**self._service_attrs, n.ATTR_BREAKER_NAME: name}
            )

    # --- spans ----------------------------------------------------------------------------------
    def tracing_enabled(self) -> bool:
        """Whether spans can be recorded: an SDK (or any real provider) is installed.

        Without one the API hands out no-op spans anyway; asking first skips ~1 µs of no-op work per
        message. Checked on every call, so an SDK configured after the layer was built is picked up.
        """
        if self.tracing_on:
            return True
        provider: object = self._tracer_provider
        if provider is None:
            provider = _global_tracer_provider()
        # A global provider, once set, cannot be replaced (the API forbids it): cache a yes for good.
        self.tracing_on = not isinstance(provider, _NOOP_TRACER_PROVIDERS)
        return self.tracing_on

    def metrics_enabled(self) -> bool:
        """Whether metrics are recorded: a meter provider was given or an SDK is installed globally.

        Without one the latency histogram is a no-op; skipping it (and its two clock reads) saves
        ~0.4 µs per message. A global provider, once set, cannot be replaced: a yes is cached for good.
        """
        if self.metrics_on:
            return True
        provider: object = self._meter_provider
        if provider is None:
            provider = getattr(_metrics_internal, "_METER_PROVIDER", None)
        self.metrics_on = provider is not None and not isinstance(provider, NoOpMeterProvider)
        return self.metrics_on

    def start_process_span(
        self,
        dt: DestinationTelemetry,
        message_id: str,
        delivery: int,
        headers: Mapping[str, str],
        extra: Mapping[str, str | int] | None = None,
    ) -> Span:
        """Start the CONSUMER ``process {destination}`` span, linked to a ``traceparent`` header;
        ``extra``: the transport's attributes of this message (Kafka: partition, offset, key).

        Callers on the hot path ask :meth:`tracing_enabled` first and skip this without an SDK.
        """
        links = _links_from(headers)
        attributes = {
            **dt.span_attrs,
            n.ATTR_MESSAGING_MESSAGE_ID: message_id,
            n.ATTR_DELIVERY_ATTEMPT: delivery,
        }
        if extra:
            attributes.update(extra)
        return self.tracer.start_span(
            dt.span_name, kind=SpanKind.CONSUMER, attributes=attributes, links=links
        )

    def dlq_send_span(
        self,
        destination: str,
        dlq_name: str,
        reason: str,
        error_type: str,
        system: str,
        unsampled_parent: SpanContext | None = None,
    ) -> AbstractContextManager[Span]:
        """The PRODUCER ``send {destination}.dlq`` span around a dead-letter write (current span: its
        parent, the failed ``process`` span). ``dlq_name`` is where the entry really goes (the Redis key
        or the Kafka topic), for ``messaging.destination.name``.

        ``unsampled_parent``: the failed ``process`` span was not sampled (a ratio sampler). The span is
        then a new root, linked to that context and marked ``streamwarden.sampling.keep`` so that
        :class:`~streamwarden.KeepFailures` exports it: every dead letter has a trace.
        """
        attributes: dict[str, Any] = {
            n.ATTR_MESSAGING_SYSTEM: system,
            n.ATTR_MESSAGING_OPERATION_NAME: n.OPERATION_SEND,
            n.ATTR_MESSAGING_OPERATION_TYPE: n.OPERATION_SEND,
            n.ATTR_MESSAGING_DESTINATION: dlq_name,
            n.ATTR_DLQ_REASON: reason,
            n.ATTR_ERROR_TYPE: error_type,
        }
        links: list[Link] = []
        context = None
        if unsampled_parent is not None:
            attributes[n.ATTR_SAMPLING_KEEP] = True
            links.append(Link(unsampled_parent))
            context = otel_context.Context()  # no parent: a root span of its own trace
        return self.tracer.start_as_current_span(
            n.SPAN_DLQ_SEND.format(destination=destination),
            context=context,
            kind=SpanKind.PRODUCER,
            attributes=attributes,
            links=links,
            record_exception=False,
            set_status_on_exception=False,
        )

    def replay_span(
        self, destination: str, entry_id: str, message_id: str | None, links: Sequence[Link], system: str
    ) -> AbstractContextManager[Span]:
        """The CONSUMER ``process {destination}.dlq`` span of one replayed dead letter, linked to the
        failed attempt and the producer's context."""
        attributes: dict[str, Any] = {
            n.ATTR_MESSAGING_SYSTEM: system,
            n.ATTR_MESSAGING_OPERATION_NAME: n.OPERATION_PROCESS,
            n.ATTR_MESSAGING_OPERATION_TYPE: n.OPERATION_PROCESS,
            n.ATTR_MESSAGING_DESTINATION: f"{destination}.dlq",
            n.ATTR_DLQ_ENTRY_ID: entry_id,
        }
        if message_id:
            attributes[n.ATTR_MESSAGING_MESSAGE_ID] = message_id
        return self.tracer.start_as_current_span(
            n.SPAN_DLQ_REPLAY.format(destination=destination),
            kind=SpanKind.CONSUMER,
            links=list(links),
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=True,
        )

    # --- rare events ----------------------------------------------------------------------------
    def on_retry(self, dt: DestinationTelemetry, attempt: int, delay: float, error_type: str) -> None:
        """Count a retry and add the ``streamwarden.retry`` event to the current span."""
        self.retry_attempts.add(1, {**dt.metric_attrs, n.ATTR_ERROR_TYPE: error_type})
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(
                n.EVENT_RETRY,
                {n.ATTR_RETRY_ATTEMPT: attempt, n.ATTR_RETRY_DELAY: delay, n.ATTR_ERROR_TYPE: error_type},
            )

    def on_dead_letter(
        self, dt: DestinationTelemetry, error_type: str, error_class: str, reason: str, entry_id: str
    ) -> None:
        """Count a confirmed dead letter and mark it on the current span."""
        self.dlq_messages.add(
            1,
            {
                **dt.metric_attrs,
                n.ATTR_ERROR_TYPE: error_type,
                n.ATTR_ERROR_CLASS: error_class,
                n.ATTR_DLQ_REASON: reason,
            },
        )
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(
                n.EVENT_DEAD_LETTERED,
                {n.ATTR_DLQ_REASON: reason, n.ATTR_DLQ_ENTRY_ID: entry_id, n.ATTR_ERROR_TYPE: error_type},
            )

    def breaker_registry(
        self, policy: BreakerPolicy, *, classifier: ErrorClassifier | None, clock: Callable[[], float]
    ) -> BreakerRegistry:
        """The breakers of this service in this process (one registry per policy and clock).

        A breaker stands for a dependency of the service: two layers of one service in one process that
        name the same breaker share its state (one opening it stops the other from calling the failing
        dependency) and its signals (one state per name). Pass ``breakers=`` to a layer for a registry
        of its own.
        """
        key = (policy, clock)
        with self._lock:
            registry = self._registries.get(key)
            if registry is None:
                registry = self._registries[key] = BreakerRegistry(policy, classifier=classifier, clock=clock)
        return registry

    def watch_breaker(self, breaker: CircuitBreaker) -> None:
        """Emit status, transition and rejection signals for ``breaker`` (once per breaker)."""
        if any(b is breaker for b in self._breakers):
            return
        self._breakers.append(breaker)
        attrs = {**self._service_attrs, n.ATTR_BREAKER_NAME: breaker.name}

        def on_transition(event: BreakerTransition) -> None:
            self.breaker_transitions.add(
                1,
                {**attrs, n.ATTR_BREAKER_FROM: str(event.from_state), n.ATTR_BREAKER_TO: str(event.to_state)},
            )
            span = trace.get_current_span()
            if span.is_recording():
                span.add_event(
                    n.EVENT_BREAKER_STATE_CHANGE,
                    {
                        n.ATTR_BREAKER_NAME: event.name,
                        n.ATTR_BREAKER_FROM: event.from_state,
                        n.ATTR_BREAKER_TO: event.to_state,
                    },
                )

        def on_rejection(event: BreakerRejection) -> None:
            self.breaker_rejections.add(1, attrs)
            span = trace.get_current_span()
            if span.is_recording():
                span.add_event(
                    n.EVENT_BREAKER_REJECTED,
                    {n.ATTR_BREAKER_NAME: event.name, n.ATTR_BREAKER_STATE: event.state},
                )

        breaker.add_transition_listener(on_transition)
        breaker.add_rejection_listener(on_rejection)
        # every transition series and the rejection series exist at 0 from the start (see _precreate)
        self.breaker_rejections.add(0, attrs)
        for before in _STATE_VALUES:
            for after in _STATE_VALUES:
                if before != after:
                    self.breaker_transitions.add(
                        0, {**attrs, n.ATTR_BREAKER_FROM: before, n.ATTR_BREAKER_TO: after}
                    )


def _links_from(headers: Mapping[str, str]) -> list[Link] | None:
    """A link to the producer's context in ``headers``; ``None`` when there is none or it is garbage
    (a hostile or malformed ``traceparent`` never fails the message)."""
    try:
        if not headers or "traceparent" not in headers:
            return None
        ctx = propagate.extract(headers)
        parent = trace.get_current_span(ctx).get_span_context()
    except Exception:
        return None
    if not parent.is_valid:
        return None
    return [Link(parent)]


_shared: dict[tuple[int, int, str], Telemetry] = {}
_shared_lock = threading.Lock()


def telemetry_for(
    service_name: str,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> Telemetry:
    """The :class:`Telemetry` shared by every layer of ``service_name`` on the same providers.

    Sharing keeps one set of instruments per meter, so two layers never register the same
    observable instrument twice and their counts add up in the same series.
    """
    key = (id(tracer_provider), id(meter_provider), service_name)
    with _shared_lock:
        found = _shared.get(key)
        if found is None:
            found = _shared[key] = Telemetry(
                service_name, tracer_provider=tracer_provider, meter_provider=meter_provider
            )
            found._provider_refs = (tracer_provider, meter_provider)  # type: ignore[attr-defined]
        return found


def configure_telemetry(
    service_name: str | None = None,
    *,
    otlp_endpoint: str | None = None,
    prometheus_port: int | None = None,
    prometheus_host: str = "127.0.0.1",
    export_interval_ms: int | None = None,
    set_global: bool = True,
    sampler: Any = None,
) -> tuple[Any, Any]:
    """Set up the OpenTelemetry SDK for an application; returns ``(tracer_provider, meter_provider)``.

    Honours the standard variables: ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (resource),
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` (used when ``otlp_endpoint`` is not given; no OTLP export when
    neither is set), ``OTEL_EXPORTER_OTLP_*`` options read by the exporters themselves, and
    ``OTEL_METRIC_EXPORT_INTERVAL``. ``prometheus_port`` starts a ``/metrics`` endpoint (the
    conventional port is 9464) bound to ``prometheus_host``.

    Sampling: ``sampler`` (default: the SDK's, from ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``)
    is wrapped in :class:`~streamwarden.KeepFailures`, so a dead-lettered message always has an exported
    trace, however low the ratio.
    """
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import _get_from_env_or_default

    from ._sampling import KeepFailures

    attributes: dict[str, str] = {}
    if service_name and not os.environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = service_name
    resource = Resource.create(attributes)
    endpoint = otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")

    chosen = sampler if sampler is not None else _get_from_env_or_default()
    keep = chosen if isinstance(chosen, KeepFailures) else KeepFailures(chosen)
    tracer_provider = SdkTracerProvider(resource=resource, sampler=keep)
    readers: list[MetricReader] = []
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        readers.append(
            PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=endpoint), export_interval_millis=export_interval_ms
            )
        )
    if prometheus_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        start_http_server(prometheus_port, addr=prometheus_host)
        readers.append(PrometheusMetricReader())
    meter_provider = SdkMeterProvider(resource=resource, metric_readers=readers)
    if set_global:
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
    return tracer_provider, meter_provider
