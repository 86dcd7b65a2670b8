"""Fleet-wide reliability counters (MetricsCollector) in one Redis hash per service, flushed in batches.

``Flushable(redis_client)`` counts in process memory on the hot path; a flush sends the
accumulated deltas here in one round trip::

    {prefix}:metrics:{service}      a hash: counter name -> total across every process of the service

:meth:`RedisCounterStore.add` is one ``MULTI``/``HINCRBY``.../``EXEC`` pipeline (one round trip, applied
all or nothing, so a failed flush can be retried without double counting what did arrive), and
:meth:`RedisCounterStore.totals` is one ``HGETALL``. There is no ``KEYS`` anywhere: the service name
says which hash to read.

Applications flush periodically with :func:`run_periodic_flush` or :class:`CounterFlusher`; a reply lost
after ``EXEC`` ran is the one case where a retried flush counts its deltas twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any

from .._counters import Flushable
from ._wire import as_text, safe_key_part

__all__ = ["CounterFlusher", "RedisCounterStore", "run_periodic_flush"]

log = logging.getLogger("streamwarden.metrics")


class RedisCounterStore:
    """A :class:`~streamwarden.CounterStore` on one Redis hash, ``{key_prefix}:metrics:{service_name}``."""

    def __init__(self, client: Any, *, service_name: str, key_prefix: str = "streamwarden") -> None:
        self.client = client
        self.service_name = service_name
        self.key = f"{key_prefix}:metrics:{safe_key_part(service_name)}"

    async def add(self, deltas: Mapping[str, int]) -> None:
        """Add ``deltas`` to the totals: one round trip, applied atomically."""
        items = [(name, int(delta)) for name, delta in deltas.items() if delta]
        if not items:
            return
        async with self.client.pipeline(transaction=True) as pipe:
            for name, delta in items:
                pipe.hincrby(self.key, name, delta)
            await pipe.execute()

    async def totals(self) -> dict[str, int]:
        """Every counter of the service (one ``HGETALL``)."""
        raw = await self.client.hgetall(self.key)
        return {as_text(k): int(v) for k, v in raw.items()}


async def run_periodic_flush(
    collector: Flushable,
    interval: float,
    *,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:
    """Flush ``collector`` every ``interval`` seconds until cancelled; a failed flush is logged and
    retried at the next tick (its deltas are kept)."""
    if interval <= 0:
        raise ValueError("interval must be positive")
    while True:
        await sleep(interval)
        try:
            # shielded: a stop must not cut a MULTI/EXEC short and leave it unknown whether it applied
            # (the next flush would then send those deltas again)
            await asyncio.shield(collector.flush())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("metrics flush failed; retrying in %gs: %r", interval, exc)


class CounterFlusher:
    """Runs :func:`run_periodic_flush` in a background task; flushes once more when stopped.

    >>> async def main(collector):  # doctest: +SKIP
    ...     async with CounterFlusher(collector, interval=5.0):
    ...         ...  # process messages
    """

    def __init__(
        self,
        collector: Flushable,
        interval: float = 5.0,
        *,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.collector = collector
        self.interval = interval
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start flushing in the background (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(
                run_periodic_flush(self.collector, self.interval, sleep=self._sleep),
                name="streamwarden-counter-flush",
            )

    async def stop(self, *, final_flush: bool = True) -> None:
        """Stop the background task and, by default, flush what is left (errors are logged)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if final_flush:
            try:
                await self.collector.flush()
            except Exception as exc:
                log.warning("final metrics flush failed: %r", exc)

    async def __aenter__(self) -> CounterFlusher:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
