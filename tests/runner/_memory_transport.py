"""An in-memory consumer group implementing the runner core's ``Transport`` contract.

A second, real transport for the transport-neutral core (the way an in-memory store sits beside the
Redis one): a list of entries, a pending list with owners and delivery times on an injected clock, and
a record of every call the core makes (read and reclaim sizes, ack batches, give-backs), so tests can
check *how* the core drives a broker without a broker. Reads block until entries arrive (like
``XREADGROUP BLOCK``); the core cancels a blocked read on stop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from streamwarden._envelope import Envelope
from streamwarden._runners._core import Backlog, Delivery, ErrorKind, Reclaimed


class Refused(Exception):
    """A broker refusal that retrying cannot fix (the memory twin of NOPERM / WRONGTYPE)."""


@dataclass
class _Pending:
    consumer: str
    since: float
    deliveries: int


class MemoryGroup:
    """One consumer's view of an in-memory consumer group."""

    name = "memory"

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        destination: str = "orders",
        group: str = "g",
        consumer: str = "c1",
        claim_idle: float = 60.0,
    ) -> None:
        self.clock = clock
        self.destination = destination
        self.group = group
        self.consumer = consumer
        self.claim_idle = claim_idle
        self.entries: list[tuple[str, dict[str, Any], str | None]] = []  # (ref, payload, order key)
        self.delivered = 0  # entries handed out by read()
        self.pending: dict[str, _Pending] = {}
        self.acked: list[Hashable] = []
        self.reads: list[int] = []
        self.reclaims: list[int] = []
        self.ack_calls: list[list[Hashable]] = []
        self.given_back: list[Hashable] = []
        self.errors: deque[BaseException] = deque()  # raised by reads, one each (see fail)
        self.ack_gate: asyncio.Event | None = None  # when set, the first ack call waits for it
        self._arrived = asyncio.Event()
        self._poked = False

    # --- the test's side ----------------------------------------------------------------------------
    def add(self, message_id: str, payload: Any = None, *, key: str | None = None) -> str:
        """Append an entry; returns its ref."""
        ref = f"{len(self.entries) + 1}-0"
        self.entries.append((ref, {"id": message_id, "payload": payload}, key))
        self._arrived.set()
        return ref

    def fail(self, error: BaseException) -> None:
        """The next read (or the one waiting now) raises ``error``."""
        self.errors.append(error)
        self._arrived.set()

    def poke(self) -> None:
        """A read waiting now returns empty, as ``XREADGROUP`` does when its BLOCK time is up."""
        self._poked = True
        self._arrived.set()

    def orphan(self, message_id: str, payload: Any = None, *, dead: str = "dead", deliveries: int = 1) -> str:
        """An entry a consumer that died read and never acknowledged (idle since now)."""
        ref = self.add(message_id, payload)
        self.delivered += 1
        self.pending[ref] = _Pending(dead, self.clock(), deliveries)
        return ref

    def _delivery(self, index: int, deliveries: int) -> Delivery:
        ref, fields, key = self.entries[index]
        env = Envelope(
            id=fields["id"],
            payload=fields["payload"],
            destination=self.destination,
            source_ref=ref,
            delivery_count=deliveries,
            key=key,
        )
        return Delivery(ref=ref, envelope=env, order_key=key)

    def _index(self, ref: str) -> int:
        return int(ref.split("-")[0]) - 1

    # --- Transport ----------------------------------------------------------------------------------
    async def ensure_group(self) -> None:
        return None

    async def read(self, max_count: int) -> Sequence[Delivery]:
        self.reads.append(max_count)
        while not self.errors and self.delivered >= len(self.entries) and not self._poked:
            self._arrived.clear()
            await self._arrived.wait()
        self._poked = False
        if self.errors:
            raise self.errors.popleft()
        out = []
        while self.delivered < len(self.entries) and len(out) < max_count:
            ref = self.entries[self.delivered][0]
            self.pending[ref] = _Pending(self.consumer, self.clock(), 1)
            out.append(self._delivery(self.delivered, 1))
            self.delivered += 1
        return out

    async def reclaim(self, max_count: int) -> Reclaimed:
        self.reclaims.append(max_count)
        now = self.clock()
        out = []
        for ref, entry in self.pending.items():
            if len(out) >= max_count:
                break
            if now - entry.since >= self.claim_idle:
                entry.consumer, entry.since = self.consumer, now
                entry.deliveries += 1
                out.append(self._delivery(self._index(ref), entry.deliveries))
        return Reclaimed(out)

    async def ack(self, refs: Sequence[Hashable]) -> None:
        self.ack_calls.append(list(refs))
        if self.ack_gate is not None and len(self.ack_calls) == 1:
            await self.ack_gate.wait()
        for ref in refs:
            if self.pending.pop(str(ref), None) is not None:
                self.acked.append(ref)

    def give_back(self, refs: Sequence[Hashable]) -> None:
        self.given_back.extend(refs)

    async def backlog(self) -> Backlog:
        return Backlog(len(self.entries) - self.delivered, len(self.pending))

    async def ping(self) -> None:
        return None

    def classify(self, error: BaseException) -> ErrorKind | None:
        if isinstance(error, Refused):
            return ErrorKind.CONFIGURATION
        if isinstance(error, ConnectionError | TimeoutError):
            return ErrorKind.TRANSIENT
        return None

    def explain(self, error: BaseException) -> str:
        return f"memory group {self.group!r} refused: {error}"

    # --- reading back -------------------------------------------------------------------------------
    def refs_of(self, *message_ids: str) -> set[Hashable]:
        wanted = set(message_ids)
        return {ref for ref, fields, _ in self.entries if fields["id"] in wanted}

    def acked_ids(self) -> list[str]:
        by_ref: Mapping[Hashable, str] = {ref: fields["id"] for ref, fields, _ in self.entries}
        return [by_ref[ref] for ref in self.acked]
