"""Helpers of the Kafka dead-letter suite (plain functions and constants; the fixtures are conftest's)."""

from __future__ import annotations

import time
from typing import Any

from streamwarden._dlq import DeadLetterEntry

__all__ = ["FAST", "entry"]

#: short client timeouts: a test never waits long for a broker that is not answering
FAST: dict[str, Any] = {"request_timeout_ms": 2_000, "delivery_timeout": 5.0, "read_timeout": 10.0}


def entry(destination: str, **fields: Any) -> DeadLetterEntry:
    """A dead-letter entry with every field set to something plausible (nothing a redactor changes)."""
    now = time.time()
    values: dict[str, Any] = {
        "message_id": "m-1",
        "destination": destination,
        "payload": {"id": "m-1", "price": 10},
        "reason": "error",
        "error_type": "ValueError",
        "error_class": "permanent",
        "error_message": "bad price",
        "attempts": 3,
        "service": "orders-service",
        "headers": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "k": "v"},
        "traceback": 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad price\n',
        "first_failed_at": now - 5.0,
        "dead_lettered_at": now,
        "delivery_count": 2,
        "source_ref": f"{destination}/0/41",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "00f067aa0ba902b7",
        "consumer_group": "billing",
        "earlier_traces": ("00-11111111111111111111111111111111-2222222222222222-01",),
    }
    values.update(fields)
    return DeadLetterEntry(**values)
