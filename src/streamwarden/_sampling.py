"""Failures always traced, successes sampled: :class:`KeepFailures`.

With a ratio sampler (``ParentBased(TraceIdRatioBased(0.1))``, or ``OTEL_TRACES_SAMPLER=
parentbased_traceidratio`` with ``OTEL_TRACES_SAMPLER_ARG=0.1``) nine in ten ``process`` spans are not
recorded. When such a message is dead-lettered, the layer starts the ``send {destination}.dlq`` span as
a *new root* span, linked to the unsampled ``process`` span context, with the attribute
``streamwarden.sampling.keep=true``; :class:`KeepFailures` samples every span that carries it and asks
its delegate about the rest. The dead-letter entry then points (``trace_id``/``span_id``) at that
exported root span, so an operator goes from any DLQ entry to a trace, whatever the ratio.

:func:`~streamwarden.configure_telemetry` wraps the sampler it builds (from ``OTEL_TRACES_SAMPLER``)
in :class:`KeepFailures`; an application that builds its own ``TracerProvider`` wraps its sampler:
``TracerProvider(sampler=KeepFailures(ParentBased(TraceIdRatioBased(0.1))))``. The SDK's entry point
``OTEL_TRACES_SAMPLER=streamwarden_parentbased_traceidratio`` (for auto-configured applications) names
the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from . import _names as n

__all__ = ["KeepFailures", "parentbased_ratio_keeping_failures"]


class KeepFailures(Sampler):
    """Sample every span started with ``streamwarden.sampling.keep=true``; ``delegate`` decides the rest."""

    def __init__(self, delegate: Sampler) -> None:
        self.delegate = delegate

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        """Record and sample a span marked ``streamwarden.sampling.keep``; ask the delegate otherwise."""
        if attributes and attributes.get(n.ATTR_SAMPLING_KEEP) is True:
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, trace_state)
        return self.delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        """``KeepFailures{<the delegate's description>}``."""
        return f"KeepFailures{{{self.delegate.get_description()}}}"


def parentbased_ratio_keeping_failures(rate: Any = None) -> Sampler:
    """``KeepFailures(ParentBased(TraceIdRatioBased(rate)))``: the ``opentelemetry_traces_sampler``
    entry point ``streamwarden_parentbased_traceidratio`` (``OTEL_TRACES_SAMPLER_ARG`` is ``rate``)."""
    try:
        ratio = float(rate) if rate is not None else 1.0
    except (TypeError, ValueError):
        ratio = 1.0
    return KeepFailures(ParentBased(TraceIdRatioBased(min(max(ratio, 0.0), 1.0))))
