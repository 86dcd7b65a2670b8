"""OpenTelemetry SDK fixtures: an in-memory span exporter and metric reader per test.

Layers under test get these providers explicitly (``tracer_provider=``, ``meter_provider=``), the
pattern of the OpenTelemetry contrib instrumentations; nothing touches the global providers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import streamwarden as sw


@dataclass
class Otel:
    """Providers plus helpers to read what was emitted."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    spans_exporter: InMemorySpanExporter
    reader: InMemoryMetricReader

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
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
                        out.append((dict(p.attributes), value))
        return out

    def value(self, metric: str, **attrs: Any) -> Any:
        """Sum of the points of ``metric`` whose attributes include ``attrs`` (dots spelled as __)."""
        wanted = {k.replace("__", "."): v for k, v in attrs.items()}
        total = 0
        for point_attrs, value in self.points(metric):
            if all(point_attrs.get(k) == v for k, v in wanted.items()):
                total += value
        return total


@pytest.fixture
def otel() -> Iterator[Otel]:
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    yield Otel(tp, mp, exporter, reader)
    tp.shutdown()
    mp.shutdown()


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


class RecordingSleep:
    """An injected sleep: records the delays and moves the clock instead of waiting."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.clock.advance(delay)


@pytest.fixture
def sleep(clock: Clock) -> RecordingSleep:
    return RecordingSleep(clock)


@pytest.fixture
def make_layer(otel: Otel, clock: Clock, sleep: RecordingSleep) -> Callable[..., sw.ReliabilityLayer]:
    """Build a layer on the embedded stores wired to the test's providers, clock and sleep."""

    def make(**settings: Any) -> sw.ReliabilityLayer:
        options = {
            k: settings.pop(k)
            for k in list(settings)
            if k in {"dedup_store", "dead_letter_store", "classifier"}
        }
        settings.setdefault("retry_jitter", False)
        return sw.ReliabilityLayer(
            None,
            sw.ReliabilitySettings(**settings),
            tracer_provider=otel.tracer_provider,
            meter_provider=otel.meter_provider,
            clock=clock,
            sleep=sleep,
            **options,
        )

    return make
