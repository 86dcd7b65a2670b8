"""Failures always traced, successes sampled (issue 11): with a 10% parent-based ratio sampler wrapped in
KeepFailures, every dead-lettered message has an exported trace that its DLQ entry points to."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from _support import Otel, build_layer
from streamwarden import KeepFailures, Outcome
from streamwarden import _names as n

MESSAGES = 400


def sampled_otel(ratio: float, *, keep_failures: bool = True) -> Otel:
    sampler: Any = ParentBased(TraceIdRatioBased(ratio))
    if keep_failures:
        sampler = KeepFailures(sampler)
    exporter = InMemorySpanExporter()
    tp = TracerProvider(sampler=sampler)
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    return Otel(tp, MeterProvider(metric_readers=[reader]), exporter, reader)


async def handler(message: dict[str, Any]) -> str:
    if message["fail"]:
        raise ValueError(f"bad order {message['id']}")  # permanent: dead-lettered at once
    return "ok"


async def _run_batch(otel: Otel) -> list[Any]:
    layer = build_layer(otel=otel, service_name="sampling")
    results = [
        await layer.process({"id": f"m{i}", "fail": i % 10 == 0}, handler, destination="orders")
        for i in range(MESSAGES)
    ]
    return results


async def test_every_dead_letter_has_an_exported_trace_at_ten_percent() -> None:
    otel = sampled_otel(0.1)
    try:
        results = await _run_batch(otel)
        dead = [r for r in results if r.outcome is Outcome.DEAD_LETTERED]
        assert len(dead) == MESSAGES // 10
        spans = otel.spans()
        exported = {(format(s.context.trace_id, "032x"), format(s.context.span_id, "016x")) for s in spans}
        for result in dead:
            entry = result.dead_letter
            assert entry is not None
            assert entry.trace_id
            assert entry.span_id
            assert (entry.trace_id, entry.span_id) in exported, f"{entry.message_id}: no exported span"
        # successes were sampled: far fewer process spans than messages (10% +- noise), not all of them
        process_spans = [s for s in spans if s.name.startswith("process ")]
        assert len(process_spans) < MESSAGES // 2
        # a kept root links to the unsampled process span context it replaces
        roots = [s for s in spans if s.attributes and s.attributes.get(n.ATTR_SAMPLING_KEEP) is True]
        assert roots, "no dead letter needed a kept root (all failed process spans sampled?)"
        for root in roots:
            assert root.parent is None
            assert len(root.links) == 1
            assert not root.links[0].context.trace_flags.sampled
    finally:
        otel.tracer_provider.shutdown()
        otel.meter_provider.shutdown()


async def test_without_keep_failures_most_dead_letters_have_no_trace() -> None:
    """The control: the same run with the bare ratio sampler loses most failure traces (so the test above
    measures KeepFailures, not luck)."""
    otel = sampled_otel(0.1, keep_failures=False)
    try:
        results = await _run_batch(otel)
        exported = {format(s.context.span_id, "016x") for s in otel.spans()}
        dead = [r.dead_letter for r in results if r.outcome is Outcome.DEAD_LETTERED]
        traced = sum(1 for e in dead if e is not None and e.span_id in exported)
        assert traced < len(dead) // 2
    finally:
        otel.tracer_provider.shutdown()
        otel.meter_provider.shutdown()


async def test_a_sampled_process_span_keeps_the_dlq_span_as_its_child() -> None:
    otel = sampled_otel(1.0)
    try:
        layer = build_layer(otel=otel, service_name="sampling")
        result = await layer.process({"id": "x", "fail": True}, handler, destination="orders")
        assert result.dead_letter is not None
        [process] = otel.spans("process orders")
        assert result.dead_letter.span_id == format(process.context.span_id, "016x")
        [send] = [s for s in otel.spans() if s.kind.name == "PRODUCER"]
        assert send.parent is not None
        assert send.parent.span_id == process.context.span_id
        assert n.ATTR_SAMPLING_KEEP not in (send.attributes or {})
    finally:
        otel.tracer_provider.shutdown()
        otel.meter_provider.shutdown()


def test_configure_telemetry_wraps_the_environment_sampler() -> None:
    """OTEL_TRACES_SAMPLER=parentbased_traceidratio + ARG=0.1 through configure_telemetry: KeepFailures
    around it. And the SDK entry point name resolves to the same sampler (auto-configured apps)."""
    code = textwrap.dedent(
        """
        from importlib.metadata import entry_points
        from streamwarden import configure_telemetry
        tp, mp = configure_telemetry("svc", set_global=False)
        print(tp.sampler.get_description())
        [ep] = [e for e in entry_points(group="opentelemetry_traces_sampler")
                if e.name == "streamwarden_parentbased_traceidratio"]
        print(ep.load()("0.25").get_description())
        """
    )
    env = {
        **os.environ,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
    }
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    assert out[0].startswith("KeepFailures{ParentBased{root:TraceIdRatioBased{0.1}")
    assert out[1].startswith("KeepFailures{ParentBased{root:TraceIdRatioBased{0.25}")
