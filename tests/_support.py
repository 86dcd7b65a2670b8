"""Test support shared by the suites: OpenTelemetry SDK readers, a hand-moved clock, a recording sleep,
and ``eventually`` for conditions that other processes make true."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

__all__ = ["Clock", "Otel", "RecordingSleep", "eventually", "make_otel"]


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


async def eventually(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 15.0) -> None:
    """Wait until ``condition()`` holds, polling; fails the test after ``timeout`` seconds.

    For conditions another task, process or server makes true; never a substitute for an injected clock.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)
