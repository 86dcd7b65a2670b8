"""Fixtures of the unit suite: SDK providers per test, a hand-moved clock, a recording sleep.

Layers under test get the providers explicitly (``tracer_provider=``, ``meter_provider=``), the pattern
of the OpenTelemetry contrib instrumentations; nothing touches the global providers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

import streamwarden as sw
from _support import Clock, Otel, RecordingSleep, make_otel


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = make_otel()
    yield o
    o.tracer_provider.shutdown()
    o.meter_provider.shutdown()


@pytest.fixture
def clock() -> Clock:
    return Clock()


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
