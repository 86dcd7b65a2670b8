"""Fixtures of the unit suite: layers on the embedded stores wired to the test's SDK providers, hand-moved
clock and recording sleep (the ``otel``, ``clock`` and ``sleep`` fixtures of tests/conftest.py).

Layers under test get the providers explicitly (``tracer_provider=``, ``meter_provider=``), the pattern
of the OpenTelemetry contrib instrumentations; nothing touches the global providers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import streamwarden as sw
from _support import Clock, Otel, RecordingSleep, build_layer


@pytest.fixture
def make_layer(otel: Otel, clock: Clock, sleep: RecordingSleep) -> Callable[..., sw.ReliabilityLayer]:
    """Build a layer on the embedded stores wired to the test's providers, clock and sleep."""

    def make(**settings: Any) -> sw.ReliabilityLayer:
        settings.setdefault("retry_jitter", False)
        return build_layer(None, otel, clock=clock, sleep=sleep, **settings)

    return make
