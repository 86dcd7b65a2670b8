"""Helpers of the DLQ, counters, shared-breaker, security and CLI suites (plain functions, no fixtures,
so importing them never shadows the dedup suite's conftest).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from streamwarden import ReliabilityLayer, ReliabilitySettings
from streamwarden._dlq import DeadLetterEntry


async def create_acl_user(admin: Any, name: str, password: str, rules: Sequence[str]) -> None:
    """``ACL SETUSER name on >password rules...`` through an admin client."""
    await admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", *rules)


@dataclass
class Otel:
    """An SDK tracer provider and meter provider whose output tests can read."""

    exporter: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)
    reader: InMemoryMetricReader = field(default_factory=InMemoryMetricReader)
    tracer_provider: TracerProvider = field(init=False)
    meter_provider: MeterProvider = field(init=False)

    def __post_init__(self) -> None:
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        """Finished spans (called ``name``)."""
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def points(self, metric: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, value) of every data point of ``metric`` collected now."""
        data = self.reader.get_metrics_data()
        out: list[tuple[dict[str, Any], Any]] = []
        if data is None:
            return out
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == metric:
                        out += [(dict(p.attributes or {}), p.value) for p in m.data.data_points]  # type: ignore[union-attr]
        return out

    def shutdown(self) -> None:
        """Stop both providers (no background threads are left behind)."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


async def no_sleep(_: float) -> None:
    """A sleep that returns at once (retry backoff in tests)."""


def make_layer(
    store: Any,
    *,
    otel: Otel | None = None,
    redis_client: Any = None,
    sleep: Callable[[float], Awaitable[object]] = no_sleep,
    **settings: Any,
) -> ReliabilityLayer:
    """A layer on ``store`` (its dead-letter store) with quick, deterministic settings."""
    settings.setdefault("max_retries", 0)
    settings.setdefault("processing_timeout", None)
    settings.setdefault("destination", "orders")
    return ReliabilityLayer(
        redis_client,
        ReliabilitySettings(**settings),
        dead_letter_store=store,
        tracer_provider=otel.tracer_provider if otel else None,
        meter_provider=otel.meter_provider if otel else None,
        sleep=sleep,
    )


class Handler:
    """An async processor that fails (``ValueError`` by default) while ``fail`` is true; records calls."""

    def __init__(self, fail: bool = True, error: Callable[[], BaseException] | None = None) -> None:
        self.fail = fail
        self.error = error or (lambda: ValueError("bad price: password=hunter2"))
        self.calls: list[Any] = []

    async def __call__(self, message: Any) -> str:
        self.calls.append(message)
        if self.fail:
            raise self.error()
        return "ok"


#: Calls of :func:`ok_handler`, for CLI replay tests (``--handler _fixtures_dlq:ok_handler``).
OK_HANDLER_CALLS: list[Any] = []


async def ok_handler(message: Any) -> str:
    """A processor that always succeeds (CLI replay tests import it by name)."""
    OK_HANDLER_CALLS.append(message)
    return "ok"


async def failing_handler(message: Any) -> str:
    """A processor that always fails permanently (CLI replay tests import it by name)."""
    raise ValueError(f"still broken: {message!r}")


def entry(destination: str = "orders", **fields: Any) -> DeadLetterEntry:
    """A dead-letter entry with plausible defaults."""
    now = time.time()
    values: dict[str, Any] = {
        "message_id": "m-1",
        "destination": destination,
        "payload": {"id": "m-1", "price": 10},
        "reason": "error",
        "error_type": "ValueError",
        "error_class": "permanent",
        "error_message": "bad price",
        "attempts": 1,
        "service": "svc",
        "headers": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        "traceback": "Traceback (most recent call last):\nValueError: bad price\n",
        "first_failed_at": now,
        "dead_lettered_at": now,
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "00f067aa0ba902b7",
    }
    values.update(fields)
    return DeadLetterEntry(**values)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, step: float = 0.005) -> float:
    """Poll ``predicate`` until true (seconds waited) or fail after ``timeout``.

    For cross-process propagation only, where there is nothing to await: the test passes as soon as
    the condition holds, never because time passed.
    """
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(step)
    return time.monotonic() - started


async def commands_processed(client: Any) -> int:
    """``total_commands_processed`` of the server (the INFO call itself counts as one)."""
    info = await client.info("stats")
    return int(info["total_commands_processed"])
