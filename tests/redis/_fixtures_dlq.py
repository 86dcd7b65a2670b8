"""Helpers of the DLQ, counters, shared-breaker, security and CLI suites (plain functions, no fixtures,
so importing them never shadows the dedup suite's conftest). The OpenTelemetry capture, clock, sleep and
poll-until helpers are tests/_support.py's.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from _support import Clock, Otel, RecordingSleep, build_layer
from streamwarden import ReliabilityLayer
from streamwarden._dlq import DeadLetterEntry


async def create_acl_user(admin: Any, name: str, password: str, rules: Sequence[str]) -> None:
    """``ACL SETUSER name on >password rules...`` through an admin client."""
    await admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", *rules)


def make_layer(
    store: Any,
    *,
    otel: Otel | None = None,
    redis_client: Any = None,
    sleep: Callable[[float], Awaitable[object]] | None = None,
    **settings: Any,
) -> ReliabilityLayer:
    """A layer on ``store`` (its dead-letter store) with quick, deterministic settings; retry backoff
    returns at once (a :class:`RecordingSleep`) unless ``sleep`` is given."""
    settings.setdefault("max_retries", 0)
    settings.setdefault("processing_timeout", None)
    settings.setdefault("destination", "orders")
    return build_layer(
        redis_client,
        otel,
        dead_letter_store=store,
        sleep=sleep if sleep is not None else RecordingSleep(Clock()),
        **settings,
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


async def commands_processed(client: Any) -> int:
    """``total_commands_processed`` of the server (the INFO call itself counts as one)."""
    info = await client.info("stats")
    return int(info["total_commands_processed"])
