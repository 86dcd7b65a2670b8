"""Test support shared by the suites: OpenTelemetry SDK readers, a hand-moved clock, a recording sleep,
a layer builder, and the two poll-until helpers for conditions that other tasks, processes or servers
make true (``eventually`` in async tests, ``wait_until`` for external processes in sync code).

The ``otel``, ``clock`` and ``sleep`` fixtures of tests/conftest.py hand these to the tests.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from streamwarden import ReliabilityLayer, ReliabilitySettings

__all__ = [
    "LAYER_OPTIONS",
    "Clock",
    "Otel",
    "OtlpTraceReceiver",
    "RecordingSleep",
    "build_layer",
    "eventually",
    "make_otel",
    "wait_until",
]

_T = TypeVar("_T")


@dataclass
class Otel:
    """Providers plus helpers to read what was emitted. Make one with :func:`make_otel` (or take the
    ``otel`` fixture) and :meth:`shutdown` it after use."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    spans_exporter: InMemorySpanExporter
    reader: InMemoryMetricReader

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        """Finished spans (called ``name``)."""
        found = list(self.spans_exporter.get_finished_spans())
        return [s for s in found if name is None or s.name == name]

    def events(self, name: str) -> list[Any]:
        return [e for s in self.spans() for e in s.events if e.name == name]

    def points(self, metric: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, value) for every data point of ``metric`` (sum/gauge value or histogram count)."""
        data = self.reader.get_metrics_data()
        out: list[tuple[dict[str, Any], Any]] = []
        if data is None:
            return out
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name != metric:
                        continue
                    for p in m.data.data_points:
                        value = getattr(p, "value", None)
                        if value is None:
                            value = p.count
                        out.append((dict(p.attributes or {}), value))
        return out

    def value(self, metric: str, **attrs: Any) -> Any:
        """Sum of the points of ``metric`` whose attributes include ``attrs`` (dots spelled as __)."""
        wanted = {k.replace("__", "."): v for k, v in attrs.items()}
        total = 0
        for point_attrs, value in self.points(metric):
            if all(point_attrs.get(k) == v for k, v in wanted.items()):
                total += value
        return total

    def shutdown(self) -> None:
        """Stop both providers (no background threads are left behind)."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def make_otel() -> Otel:
    """Fresh SDK providers with in-memory span exporter and metric reader (shut them down after use)."""
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    return Otel(tp, mp, exporter, reader)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingSleep:
    """An injected sleep: records the delays and moves the clock instead of waiting."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.clock.advance(delay)


#: Keyword arguments of :func:`build_layer` that go to ``ReliabilityLayer`` itself, not to its settings.
LAYER_OPTIONS = frozenset(
    {
        "dedup_store",
        "dead_letter_store",
        "classifier",
        "breakers",
        "on_retry",
        "on_dead_letter",
        "sleep",
        "clock",
        "messaging_system",
    }
)


def build_layer(redis_client: Any = None, otel: Otel | None = None, **kwargs: Any) -> ReliabilityLayer:
    """``ReliabilityLayer(redis_client, ReliabilitySettings(**settings), **options)`` wired to ``otel``'s
    providers (none: the global ones). Keywords in :data:`LAYER_OPTIONS` (stores, classifier, breakers,
    hooks, sleep, clock) go to the layer, every other keyword is a setting."""
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in LAYER_OPTIONS}
    return ReliabilityLayer(
        redis_client,
        ReliabilitySettings(**kwargs),
        tracer_provider=otel.tracer_provider if otel else None,
        meter_provider=otel.meter_provider if otel else None,
        **options,
    )


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float = 15.0,
    step: float = 0.01,
    *,
    what: str = "condition",
) -> float:
    """Wait until ``condition()`` (or the awaitable it returns) holds, polling every ``step`` seconds,
    and return the seconds waited; fails the test after ``timeout`` seconds.

    For conditions another task, process or server makes true; never a substitute for an injected clock.
    """
    started = time.monotonic()
    deadline = started + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(step)


def wait_until(probe: Callable[[], _T | None], *, timeout: float, interval: float = 0.25, what: str) -> _T:
    """Poll ``probe`` until it returns something truthy, and return that; fail after ``timeout`` s.

    Synchronous, for external processes and servers: a probe raising ``OSError`` or ``ValueError`` (not up
    yet, or a partial answer) counts as not yet.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = probe()
        except (OSError, ValueError) as exc:  # not up yet, or a partial answer
            last_error = exc
            result = None
        if result:
            return result
        if time.monotonic() >= deadline:
            suffix = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{suffix}")
        time.sleep(interval)


class OtlpTraceReceiver:
    """A real OTLP/gRPC trace receiver on a free loopback port: ``with OtlpTraceReceiver() as r`` and
    point ``OTEL_EXPORTER_OTLP_ENDPOINT`` at ``r.endpoint``; ``r.spans`` holds every span received."""

    def __init__(self) -> None:
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.spans: list[Any] = []
        received = self.spans

        class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:
                received.extend(s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> OtlpTraceReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop(None)

    def named(self, name: str) -> list[Any]:
        """The received spans called ``name``."""
        return [s for s in self.spans if s.name == name]
