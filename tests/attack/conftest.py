"""Fixtures of the attack suite: every attack runs on the embedded stores and on a real redis-server.

``backend`` is parametrized ``embedded`` / ``redis``: ``backend.layer(**settings)`` builds
``ReliabilityLayer(None | redis_client, ReliabilitySettings(**settings))`` wired to the test's OpenTelemetry
providers, hand-moved clock and recording sleep (the ``otel``, ``clock`` and ``sleep`` fixtures of
tests/conftest.py). ``backend.stored_text()`` flattens everything the backend stored (every embedded dead
letter, or every key of the Redis server) into one string, so a test can look for text that must never be
stored.
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio

import streamwarden as sw
from _support import Clock, Otel, RecordingSleep, build_layer

_SRC_MARK = "/streamwarden/_"  # frames of the package under test (src/ or an installed copy)


def raised_from(exc: BaseException) -> str:
    """``file:function:line`` of the innermost streamwarden frame that ``exc`` passed (for the report)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _SRC_MARK in f.filename]
    if not frames:
        return "<outside streamwarden>"
    f = frames[-1]
    return f"{f.filename.rsplit('/', 1)[-1]}:{f.name}:{f.lineno}"


def describe(exc: BaseException) -> str:
    """Type and text of ``exc`` without trusting its ``__str__``, plus where in src/ it came from."""
    try:
        text = str(exc)[:200]
    except Exception:
        text = "<str() raised>"
    return f"{type(exc).__name__}: {text!r} from {raised_from(exc)}"


def flatten(value: Any) -> str:
    """Every string inside ``value`` (bytes decoded leniently), newline-separated, for substring checks."""
    out: list[str] = []
    stack: list[Any] = [value]
    seen: set[int] = set()  # containers already walked: a self-referential payload must not loop
    while stack:
        item = stack.pop()
        if isinstance(item, dict | list | tuple | set | frozenset):
            if id(item) in seen:
                continue
            seen.add(id(item))
        if isinstance(item, bytes | bytearray | memoryview):
            out.append(bytes(item).decode("utf-8", "backslashreplace"))
        elif isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
        else:
            try:
                out.append(repr(item))
            except Exception as exc:  # a hostile object in a stored entry must not break the check
                out.append(f"<unrepresentable {type(item).__name__}: {exc!r}>")
    return "\n".join(out)


async def dump_redis(client: redis.asyncio.Redis) -> str:
    """Every key and value on the server (strings, hashes, streams, lists, sets, sorted sets) as text."""
    parts: list[Any] = []
    async for key in client.scan_iter(count=1000):
        kind = await client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        value: Any
        if kind == "string":
            value = await client.get(key)
        elif kind == "hash":
            value = await client.hgetall(key)
        elif kind == "stream":
            value = await client.xrange(key, "-", "+")
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        elif kind == "set":
            value = await client.smembers(key)
        elif kind == "zset":
            value = await client.zrange(key, 0, -1, withscores=True)
        else:
            value = kind
        parts.append((key, value))
    return flatten(parts)


@dataclass
class Backend:
    """One storage backend under attack, with the test's telemetry, clock and sleep."""

    name: str
    client: redis.asyncio.Redis | None
    otel: Otel
    clock: Clock
    sleep: RecordingSleep
    layers: list[sw.ReliabilityLayer] = field(default_factory=list)

    def layer(self, **settings: Any) -> sw.ReliabilityLayer:
        """``ReliabilityLayer(client, ReliabilitySettings(**settings))`` on this backend (jitter off)."""
        settings.setdefault("sleep", self.sleep)
        settings.setdefault("retry_jitter", False)
        layer = build_layer(self.client, self.otel, clock=self.clock, **settings)
        self.layers.append(layer)
        return layer

    async def process(
        self, layer: sw.ReliabilityLayer, message: Any, handler: Any, **kwargs: Any
    ) -> sw.ProcessResult:
        """``layer.process(...)``; an exception escaping it fails the test, naming where it came from."""
        try:
            return await layer.process(message, handler, **kwargs)
        except Exception as exc:
            failure = f"process() raised {describe(exc)}"
        # failed outside the except block: a chained hostile exception would crash pytest's own reporting
        pytest.fail(failure, pytrace=False)

    def telemetry_text(self) -> str:
        """Everything the test's OpenTelemetry providers received, as text (see :func:`telemetry_text`)."""
        return telemetry_text(self.otel)

    async def stored_text(self) -> str:
        """Everything this backend stored: all embedded dead letters, or the whole Redis keyspace."""
        if self.client is not None:
            return await dump_redis(self.client)
        entries: list[sw.DeadLetterEntry] = []
        for layer in self.layers:
            entries.extend(await layer.dead_letter_store.list(limit=1_000_000))
        return flatten([[getattr(e, f.name) for f in dataclasses.fields(e)] for e in entries])


def telemetry_text(otel: Otel) -> str:
    """Every span name, status, attribute, event and link attribute, and every metric point's attributes."""
    pieces: list[Any] = []
    for span in otel.spans():
        pieces += [span.name, span.status.description or "", dict(span.attributes or {})]
        for event in span.events:
            pieces += [event.name, dict(event.attributes or {})]
        for link in span.links:
            pieces.append(dict(link.attributes or {}))
    data = otel.reader.get_metrics_data()
    for resource in data.resource_metrics if data is not None else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                pieces.append(metric.name)
                pieces += [dict(point.attributes or {}) for point in metric.data.data_points]
    return flatten(pieces)


@pytest.fixture(params=["embedded", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest, otel: Otel, clock: Clock, sleep: RecordingSleep) -> Backend:
    """The embedded stores (``redis_client=None``) or a real redis-server emptied for this test."""
    client = request.getfixturevalue("redis_client") if request.param == "redis" else None
    return Backend(request.param, client, otel, clock, sleep)


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """``caplog`` capturing every logger at every level (DEBUG and up)."""
    caplog.set_level(logging.DEBUG)
    return caplog
