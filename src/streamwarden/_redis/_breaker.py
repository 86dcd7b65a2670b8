"""Circuit-breaker state shared across processes through Redis, off the hot path.

pybreaker's ``CircuitRedisStorage`` makes every call a blocking Redis round trip. Here every process
keeps its own :class:`~streamwarden.CircuitBreaker`, which admits and records calls in memory exactly
as without sharing, and a :class:`SharedBreakerSync` task beside it:

* **publishes** local transitions: a transition listener (synchronous, no I/O) notes the new state and
  wakes the task, which writes it to ``{prefix}:breaker:{name}``, a hash of ``state``, ``opened_until``
  (epoch seconds), ``version`` (incremented on every publication), ``origin`` (the publishing instance)
  and ``updated_at``. Only ``open`` and ``closed`` are published: a half-open trial is local.
* **polls** every ``poll_interval`` seconds: one pipelined ``HGETALL`` per breaker, all breakers in one
  round trip. A publication with a newer version from another instance is adopted: ``open`` forces
  the local breaker open until ``opened_until``; ``closed`` closes it.

So the message path performs **zero** Redis round trips for the breaker; a process pays one round trip
per poll interval, plus one per local transition. The price is propagation delay: another process
adopts an open breaker at most ``poll_interval`` (plus a round trip) after it opened, and keeps
admitting calls (which its own breaker may count) meanwhile. See ``docs/shared-breaker.md``.

Conflicts resolve by arrival order at Redis (the highest version wins); a hash lost with a Redis
restart starts again at version 1 and is adopted as news. Adopted transitions are real
local transitions: they emit the usual telemetry, and each process counts its own opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .._breaker import BreakerRegistry, BreakerState, BreakerTransition, CircuitBreaker
from ._wire import as_text, safe_key_part

__all__ = ["SharedBreakerState", "SharedBreakerSync", "read_shared_breakers"]

log = logging.getLogger("streamwarden.breaker")

_SHARED_STATES = (BreakerState.OPEN, BreakerState.CLOSED)


@dataclass(frozen=True, slots=True)
class SharedBreakerState:
    """One breaker's published state, as stored in Redis."""

    name: str
    state: str
    opened_until: float
    version: int
    origin: str
    updated_at: float

    def retry_after(self, now: float) -> float:
        """Seconds (from wall-clock ``now``) until an open breaker admits a trial; 0 when not open."""
        if self.state != BreakerState.OPEN:
            return 0.0
        return max(0.0, self.opened_until - now)


def breaker_key(key_prefix: str, name: str) -> str:
    """The Redis hash holding breaker ``name``'s shared state."""
    return f"{key_prefix}:breaker:{safe_key_part(name)}"


def breaker_index_key(key_prefix: str) -> str:
    """The Redis set of shared breaker names (so readers never scan the keyspace)."""
    return f"{key_prefix}:breaker-index"


def _parse(name: str, raw: Any) -> SharedBreakerState | None:
    if not raw:
        return None
    fields = {as_text(k): as_text(v) for k, v in raw.items()}
    try:
        return SharedBreakerState(
            name=name,
            state=fields.get("state", BreakerState.CLOSED),
            opened_until=float(fields.get("opened_until", "0")),
            version=int(fields.get("version", "0")),
            origin=fields.get("origin", ""),
            updated_at=float(fields.get("updated_at", "0")),
        )
    except ValueError:
        log.warning("ignoring malformed shared state of breaker %r: %r", name, fields)
        return None


async def read_shared_breakers(client: Any, *, key_prefix: str = "streamwarden") -> list[SharedBreakerState]:
    """Every shared breaker's published state (the index set, then one pipelined round trip)."""
    names = sorted(as_text(n) for n in await client.smembers(breaker_index_key(key_prefix)))
    if not names:
        return []
    async with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(breaker_key(key_prefix, name))
        replies = await pipe.execute()
    states = [_parse(name, raw) for name, raw in zip(names, replies, strict=True)]
    return [s for s in states if s is not None]


# --- forcing a local breaker -------------------------------------------------------------------------


def force_open(breaker: CircuitBreaker, retry_after: float) -> None:
    """Open ``breaker`` now so that it admits a trial after ``retry_after`` seconds."""
    breaker.force_open(retry_after)


def force_close(breaker: CircuitBreaker) -> None:
    """Close ``breaker`` now (resets its failure count)."""
    breaker.force_close()


class SharedBreakerSync:
    """Shares the state of local circuit breakers through Redis in a background task.

    ``breakers`` is a :class:`~streamwarden.BreakerRegistry` (every breaker it holds or creates later is
    shared, e.g. ``layer.breakers``) or an iterable of breakers. Use it as ``async with
    SharedBreakerSync(client, layer.breakers):`` or call :meth:`start` / :meth:`stop`.
    :meth:`publish_pending` and :meth:`poll_once` run one step by hand (tests, custom loops).
    """

    def __init__(
        self,
        client: Any,
        breakers: BreakerRegistry | Iterable[CircuitBreaker],
        *,
        key_prefix: str = "streamwarden",
        poll_interval: float = 0.5,
        instance_id: str | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self.client = client
        self.key_prefix = key_prefix
        self.poll_interval = poll_interval
        self.instance_id = instance_id or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self._wall = wall_clock
        self._breakers: dict[str, CircuitBreaker] = {}
        self._seen: dict[str, int] = {}
        self._pending: dict[str, tuple[str, float, float]] = {}  # name -> (state, opened_until, at)
        self._adopting: str | None = None
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Redis round trips made by this instance (publications and polls), for measurements.
        self.round_trips = 0
        if isinstance(breakers, BreakerRegistry):
            breakers.on_create(self.watch)
        else:
            for breaker in breakers:
                self.watch(breaker)

    def watch(self, breaker: CircuitBreaker) -> None:
        """Share ``breaker`` (idempotent)."""
        if self._breakers.get(breaker.name) is breaker:
            return
        self._breakers[breaker.name] = breaker
        breaker.add_transition_listener(self._on_transition)

    # --- hot side: no I/O --------------------------------------------------------------------------
    def _on_transition(self, event: BreakerTransition) -> None:
        if event.name == self._adopting or event.to_state not in _SHARED_STATES:
            return
        breaker = self._breakers.get(event.name)
        if breaker is None:
            return
        now = self._wall()
        opened_until = now + breaker.retry_after() if event.to_state == BreakerState.OPEN else 0.0
        self._pending[event.name] = (event.to_state, opened_until, now)
        self._wakeup.set()

    # --- background side ---------------------------------------------------------------------------
    async def publish_pending(self) -> int:
        """Write the local transitions noted since the last call; returns how many were published."""
        if not self._pending:
            return 0
        pending, self._pending = self._pending, {}
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                for name, (state, opened_until, at) in pending.items():
                    key = breaker_key(self.key_prefix, name)
                    pipe.hincrby(key, "version", 1)
                    pipe.hset(
                        key,
                        mapping={
                            "state": state,
                            "opened_until": repr(opened_until),
                            "origin": self.instance_id,
                            "updated_at": repr(at),
                        },
                    )
                # every time, not once: the index must survive a Redis restart like the hashes do
                pipe.sadd(breaker_index_key(self.key_prefix), *pending)
                replies = await pipe.execute()
        except BaseException:
            # keep them for the next attempt unless a newer local transition replaced them meanwhile
            for name, value in pending.items():
                self._pending.setdefault(name, value)
            raise
        finally:
            self.round_trips += 1
        for i, name in enumerate(pending):
            self._seen[name] = max(self._seen.get(name, 0), int(replies[2 * i]))
        return len(pending)

    async def poll_once(self) -> list[str]:
        """Read every shared breaker once and adopt newer remote states; returns the names adopted."""
        names = list(self._breakers)
        if not names:
            return []
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(breaker_key(self.key_prefix, name))
                replies = await pipe.execute()
        finally:
            self.round_trips += 1
        adopted: list[str] = []
        for name, raw in zip(names, replies, strict=True):
            remote = _parse(name, raw)
            if remote is None:
                self._seen.pop(name, None)  # no state (yet, or lost with a Redis restart): start over
                continue
            seen = self._seen.get(name, 0)
            if remote.version == seen:
                continue
            # A lower version than seen means the hash was lost (restart, failover, flush) and written
            # anew: it is news too.
            self._seen[name] = remote.version
            if remote.origin == self.instance_id or name in self._pending:
                continue  # ours, or a newer local transition is about to be published
            if self._adopt(self._breakers[name], remote):
                adopted.append(name)
        return adopted

    def _adopt(self, breaker: CircuitBreaker, remote: SharedBreakerState) -> bool:
        self._adopting = breaker.name
        try:
            if remote.state == BreakerState.OPEN:
                retry_after = remote.retry_after(self._wall())
                if retry_after <= 0 or breaker.state == BreakerState.OPEN:
                    return False
                force_open(breaker, retry_after)
                log.info("breaker %r opened by %s for %.3gs", breaker.name, remote.origin, retry_after)
                return True
            if remote.state == BreakerState.CLOSED and breaker.state != BreakerState.CLOSED:
                force_close(breaker)
                log.info("breaker %r closed by %s", breaker.name, remote.origin)
                return True
            return False
        finally:
            self._adopting = None

    async def run(self) -> None:
        """Publish and poll until cancelled; Redis errors are logged and the loop goes on."""
        failing = False
        while True:
            self._wakeup.clear()  # before the I/O: a transition noted during it wakes the next wait
            try:
                await self.publish_pending()
                await self.poll_once()
                if failing:
                    log.info("shared breaker state reachable again")
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("shared breaker state unavailable, breakers act locally: %r", exc)
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.poll_interval)

    async def start(self) -> None:
        """Adopt the current shared state, then run :meth:`run` in a background task."""
        if self._task is not None and not self._task.done():
            return
        try:
            await self.poll_once()
        except Exception as exc:
            log.warning("shared breaker state unavailable at start: %r", exc)
        self._task = asyncio.create_task(self.run(), name="streamwarden-shared-breaker")

    async def stop(self) -> None:
        """Stop the background task, then publish what is still pending (errors are logged)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self.publish_pending()
        except Exception as exc:
            log.warning("could not publish final breaker states: %r", exc)

    async def __aenter__(self) -> SharedBreakerSync:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
