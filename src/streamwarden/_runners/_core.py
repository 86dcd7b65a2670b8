"""The transport-neutral consumer core: what every consumer-group runner does, whatever the broker.

One loop per consumer::

    reclaim idle entries of dead consumers (periodically, at most `room` of them) ─► claimed ONE BY ONE
    read at most `room` new entries ─────────────────────────────────────────────► ONE batch claim
        ─► entries free to start run on a pool of long-lived workers (at most ``concurrency``; a
           worker taking a job wakes the next only if more wait, so a handler that never suspends
           runs a whole batch in one go); entries waiting for a predecessor (same key / id) or for
           the isolation gate get a task of their own: layer.process(claim=..., stage_completion=True)
        ─► ack the entries whose Outcome says so (group commit: one ack call for all that finished
           while the previous one was in flight)

``room`` is ``concurrency`` minus the messages in flight: the runner never reads, reclaims or claims an
entry it has no slot for, so a claim is made right before its handler can start and its lease does not
run down while it waits for a slot (issue 9, finding 1).

**Suspects run alone.** A claim that comes back with ``takeover=True`` replaced the lease of an owner
that died (or stalled) mid-run: the message may be what killed it. It runs *alone*: the runner stops
reading and reclaiming, waits until nothing else is in flight, runs it, then resumes. A message that
crashes its process therefore only ever crashes alone, and only its own attempt counter (the dedup
record's, ``ClaimResult.attempt``) grows toward poison; its healthy batch-mates are not run beside it
again. Reclaimed entries are claimed one at a time for the same reason: the first takeover stops the
claiming, so the entries behind it are not charged an attempt if the suspect kills the process.

**Acknowledgement** follows :attr:`ProcessResult.should_ack` (processed, duplicate, dead-lettered after a
confirmed DLQ write). Anything else, and anything that escaped the layer, is *given back* to the
transport unacknowledged. A handler's ``SystemExit``, ``KeyboardInterrupt`` or its own
``CancelledError`` never ends the consumer or escapes a task unobserved: only a real cancellation of
the message's task (shutdown) propagates.

**Backpressure.** While the layer's circuit breaker is open the runner does not read; it resumes when
the breaker's open timeout has passed (the next message is the half-open trial). Deferred messages do
not hold the runner: they go back to the broker and the loop goes on reading.

**Errors.** The transport sorts broker errors into transient (back off with the injected
:class:`~streamwarden._retry.Backoff` and retry) and configuration errors (a missing permission, a key of
the wrong type, an argument the client refuses): those end :meth:`ConsumerRunner.run` with a
:class:`~streamwarden.ConfigurationError` that says what to fix, after a graceful drain.

**Shutdown.** :meth:`ConsumerRunner.stop` stops reading; in-flight messages get ``shutdown_timeout``
seconds to finish; the rest are cancelled and never acknowledged (the layer keeps the claim of a message
whose handler started, so its redelivery is a counted takeover, never an uncounted duplicate).

**Time.** ``clock`` (monotonic seconds), ``sleep`` and ``backoff`` are injected; nothing here calls
``time`` or ``random`` itself.

**The transport contract** (:class:`Transport`) is small on purpose, so a Kafka transport (aiokafka)
plugs into the same core:

* ``read(n)`` / ``reclaim(n)`` return at most ``n`` :class:`Delivery` objects; each carries the
  transport's own ``ref`` and an ``order_key``: deliveries sharing one run one after another, in the
  order read. Redis Streams: the entry's ``key`` field when ordering by key, else none. Kafka: the
  partition (``"{topic}/{partition}"``), which is per-partition ordering. Kafka's ``reclaim`` returns
  nothing: a dead member's partitions come back through a rebalance and are simply read again.
* ``ack(refs)`` is called with the refs whose outcome is final, in completion order, batched.
  Redis: ``XACK``. Kafka: mark the offsets complete and commit, per partition, the highest *contiguous*
  completed offset + 1 (a gap, i.e. a message still in flight or given back, holds the commit).
* ``give_back(refs)`` is called for refs that were not acknowledged (deferred, in progress elsewhere,
  failed DLQ write, abandoned at shutdown). Redis: nothing, the entry stays pending and is reclaimed
  after ``claim_idle_ms``. Kafka: the record is held and handed out again after a back-off; its
  offset stays open, so the contiguous commit never passes it.
* ``reroute(ref, error)`` (optional, :class:`Rerouting`) is offered first a delivery whose handler ran
  and failed retriably. Kafka with retry topics: the record is copied to a retry topic with a due time
  and its offset settles once the copy is confirmed (Spring Kafka's non-blocking retries).
* ``classify(error)`` sorts an exception into :class:`ErrorKind` (or ``None``: not a broker error) and
  ``explain(error)`` says in one line what to fix for a configuration error.
* ``backlog()`` (lag, pending) feeds the gauges and the health answer; ``ping()`` the health answer;
  ``ensure_group()`` creates the consumer group if needed (Kafka: nothing, the group coordinator does).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import inspect
import logging
import math
import signal
import time
from collections.abc import Awaitable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from .. import _names as n
from .._breaker import BreakerState
from .._dedup import ClaimResult, ClaimStatus
from .._dlq import DepthRefreshing
from .._envelope import Envelope
from .._exceptions import ConfigurationError
from .._layer import ProcessResult, ReliabilityLayer, StagedCompletion
from .._retry import Backoff, ExponentialBackoff
from .._types import Clock, Outcome, Processor, Sleep
from ._health import Health

__all__ = [
    "Backlog",
    "CommittingTransport",
    "ConsumerRunner",
    "ConsumerStats",
    "Delivery",
    "ErrorKind",
    "Pausable",
    "Reclaimed",
    "Rerouting",
    "Transport",
    "require_async_handler",
]

log = logging.getLogger("streamwarden.runner")

# Seconds a shutdown waits, after shutdown_timeout, for cancelled messages to finish cancelling.
_CANCEL_GRACE_S = 2.0
# Bound on stopping each background companion (shared breaker sync, counter flusher) at shutdown.
_COMPANION_STOP_S = 1.0
# Tries of one group commit (completions + acknowledgements) before its entries are left to redelivery.
_COMMIT_TRIES = 3
# Bound on each I/O a health check makes (ping, DLQ depth, backlog).
_PROBE_S = 2.0
_DEFERRED = Outcome.DEFERRED
# Per outcome, its name in ConsumerStats.outcomes and whether it is acknowledged
# (ProcessResult.should_ack): one dict lookup per message instead of an enum attribute and a property.
_SETTLE: dict[Outcome, tuple[str, bool]] = {
    outcome: (outcome.value, ProcessResult(outcome, None).should_ack) for outcome in Outcome
}


class ErrorKind(enum.Enum):
    """How the runner treats a broker error."""

    TRANSIENT = "transient"  # back off and retry: connection, timeout, loading, busy, failover
    CONFIGURATION = "configuration"  # stop with a ConfigurationError: retrying cannot fix it


@dataclass(frozen=True, slots=True)
class Delivery:
    """One entry a transport handed to the core: its transport reference, envelope and ordering key."""

    ref: Hashable
    envelope: Envelope
    order_key: str | None = None


class Reclaimed(NamedTuple):
    """What one reclaim scan found: deliveries taken over, refs lost to the broker, whether to scan on."""

    deliveries: Sequence[Delivery]
    lost: Sequence[str] = ()
    more: bool = False


class Backlog(NamedTuple):
    """The group's backlog: entries not yet delivered (lag), delivered but not acknowledged (pending),
    and the age in seconds of the oldest of those (``None`` when unknown or nothing is pending)."""

    lag: int | None
    pending: int | None
    oldest_pending_age: float | None = None


@runtime_checkable
class Transport(Protocol):
    """A broker's consumer group, as the core needs it (see the module docstring for the contract)."""

    name: str
    destination: str
    group: str

    async def ensure_group(self) -> None:
        """Create the consumer group if it does not exist."""

    async def read(self, max_count: int) -> Sequence[Delivery]:
        """New deliveries, at most ``max_count``; may wait for some (bounded)."""

    async def reclaim(self, max_count: int) -> Reclaimed:
        """Take over at most ``max_count`` entries that dead consumers left unacknowledged."""

    async def ack(self, refs: Sequence[Hashable]) -> None:
        """Acknowledge (commit) ``refs``, whose outcome is final."""

    def give_back(self, refs: Sequence[Hashable]) -> None:
        """``refs`` were not acknowledged: make sure the broker delivers them again later."""

    async def backlog(self) -> Backlog:
        """Lag and pending count of the group."""

    async def ping(self) -> None:
        """Raise unless the broker answers."""

    def classify(self, error: BaseException) -> ErrorKind | None:
        """Transient, configuration, or ``None`` when ``error`` is not a broker error at all."""

    def explain(self, error: BaseException) -> str:
        """One line: what went wrong and what to fix, for a configuration error."""


@runtime_checkable
class CommittingTransport(Protocol):
    """A transport that writes dedup completions together with its acknowledgements (group commit)."""

    async def commit(self, refs: Sequence[Hashable], staged: Sequence[StagedCompletion]) -> list[bool] | None:
        """Complete ``staged`` and acknowledge ``refs`` in one round trip; the completions' answers, or
        ``None`` when this transport cannot for these completions (the core then writes them through
        the layer, then calls ``ack``). Raises when nothing is known to have landed."""


@runtime_checkable
class Pausable(Protocol):
    """A transport that can stop fetching without leaving its group (Kafka: ``consumer.pause``).

    The core calls :meth:`pause` when it stops reading because the circuit breaker is open and
    :meth:`resume` when it reads again; a transport without these methods simply is not read meanwhile.
    """

    def pause(self) -> None:
        """Stop fetching (keep the membership and the heartbeats)."""

    def resume(self) -> None:
        """Fetch again."""


@runtime_checkable
class Rerouting(Protocol):
    """A transport that can send a failed message on for a later try instead of taking it back
    (Kafka: a retry topic with a due time, :class:`~._kafka.KafkaTransport`).

    The core offers it a delivery whose handler ran and failed retriably (``DEFERRED`` after at least
    one attempt) before giving it back; the transport answers ``True`` when it takes the delivery over
    (it settles the offset itself once the copy is confirmed, and holds it for a local redelivery if
    the copy fails), ``False`` to have it given back as usual.
    """

    def reroute(self, ref: Hashable, error: BaseException | None) -> bool:
        """Take ``ref`` over for a later try elsewhere; ``False`` when this transport will not."""


@dataclass
class ConsumerStats:
    """Counters of one runner (also visible as OpenTelemetry metrics)."""

    read: int = 0
    reclaimed: int = 0
    acked: int = 0
    not_acked: int = 0
    lost: int = 0
    redis_errors: int = 0
    paused_for_breaker: int = 0
    isolated: int = 0
    escaped: int = 0
    rerouted: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


class _Companion(Protocol):
    async def stop(self) -> None: ...


# --- the isolation gate ---------------------------------------------------------------------------------
@dataclass(slots=True)
class _Ticket:
    """What one message holds at the gate; released by a done callback, whatever happened to the task."""

    shared: bool = False
    queued: bool = False
    exclusive: bool = False


class _Job:
    """A message run by the worker pool (claimed with its batch, no predecessor, not a suspect).

    Later messages of its chain wait for it through :meth:`finished` (a future made only if asked).
    """

    __slots__ = ("_future", "claim", "delivery", "done", "keys", "ticket")

    def __init__(self, delivery: Delivery, claim: Any, ticket: _Ticket, keys: tuple[Hashable, ...]) -> None:
        self.delivery = delivery
        self.claim = claim
        self.ticket = ticket
        self.keys = keys
        self.done = False
        self._future: asyncio.Future[None] | None = None

    async def finished(self) -> None:
        """Until the job has run (whatever its outcome)."""
        if self.done:
            return
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._future)

    def finish(self) -> None:
        self.done = True
        if self._future is not None and not self._future.done():
            self._future.set_result(None)


class _IsolationGate:
    """Shared/exclusive gate: normal messages share it, a suspect takes it alone.

    A queued suspect blocks new shared entries (so it is not starved), waits until the shared holders
    are gone, runs, and lets the others in again. All bookkeeping is synchronous: releasing never awaits,
    so a cancellation cannot leave the gate half-released.
    """

    def __init__(self) -> None:
        self._shared = 0
        self._queued = 0
        self._exclusive = False
        self._waiters = 0
        self._changed = asyncio.Event()

    @property
    def isolating(self) -> bool:
        """A suspect is waiting or running: no new work may start."""
        return self._exclusive or self._queued > 0

    def _notify(self) -> None:
        if self._waiters:  # the common case, nobody waiting, costs no Event per message
            self._changed.set()
            self._changed = asyncio.Event()

    async def _wait(self) -> None:
        self._waiters += 1
        try:
            await self._changed.wait()
        finally:
            self._waiters -= 1

    def try_shared(self, ticket: _Ticket) -> bool:
        """Take a shared place now if no suspect is waiting or running."""
        if self.isolating:
            return False
        self._shared += 1
        ticket.shared = True
        return True

    async def shared(self, ticket: _Ticket) -> None:
        """Wait for a shared place."""
        while self.isolating:
            await self._wait()
        self._shared += 1
        ticket.shared = True

    def enqueue(self, ticket: _Ticket) -> None:
        """Announce a suspect: from now on nothing new starts until it has run."""
        self._queued += 1
        ticket.queued = True

    async def exclusive(self, ticket: _Ticket) -> None:
        """Wait until nothing else runs (after :meth:`enqueue`), then hold the gate alone."""
        while self._exclusive or self._shared:
            await self._wait()
        self._queued -= 1
        ticket.queued = False
        self._exclusive = True
        ticket.exclusive = True

    def release(self, ticket: _Ticket) -> None:
        """Give back whatever ``ticket`` holds (idempotent)."""
        if ticket.shared:
            ticket.shared = False
            self._shared -= 1
        if ticket.queued:
            ticket.queued = False
            self._queued -= 1
        if ticket.exclusive:
            ticket.exclusive = False
            self._exclusive = False
        self._notify()

    async def wait_clear(self) -> None:
        """Until no suspect is waiting or running."""
        while self.isolating:
            await self._wait()


# --- validation helpers -----------------------------------------------------------------------------------
def require_async_handler(handler: object) -> None:
    """Refuse a handler that is not an ``async def`` function (or an object with an async ``__call__``).

    A synchronous handler would run its side effect when the layer calls it and then fail (no awaitable),
    on every delivery, never acknowledged: refused at construction instead.
    """
    if not callable(handler):
        raise ConfigurationError(f"handler must be an async function, got {type(handler).__name__}")
    if inspect.iscoroutinefunction(handler) or asyncio.iscoroutinefunction(handler):
        return
    call = getattr(type(handler), "__call__", None)  # noqa: B004 - the class's, not the instance's
    if not isinstance(handler, type) and call is not None and inspect.iscoroutinefunction(call):
        return
    name = getattr(handler, "__qualname__", None) or type(handler).__name__
    raise ConfigurationError(
        f"handler {name} is not an async function: define it with `async def` (a synchronous handler "
        "would run its side effect on every delivery and never be acknowledged)"
    )


def _positive_int(name: str, value: object, *, minimum: int = 1, maximum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigurationError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ConfigurationError(f"{name} must be {bound}, got {value}")
    return value


def _seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigurationError(f"{name} must be a number of seconds, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        wanted = "0 or more" if allow_zero else "more than 0"
        raise ConfigurationError(f"{name} must be a finite number of seconds, {wanted}; got {value!r}")
    return number


def _wake(waiter: asyncio.Future[None], _done: object = None) -> None:
    """Resolve ``waiter`` unless it is done already (a done callback, or called by ``stop``)."""
    if not waiter.done():
        waiter.set_result(None)


def _chain_keys(delivery: Delivery) -> tuple[Hashable, ...]:
    """The keys of the chains ``delivery`` runs in: its message id (the same id twice in flight would
    only bounce as IN_PROGRESS: it runs after the first copy) and its order key, if any."""
    mid: Hashable = ("id", delivery.envelope.id)
    return (mid,) if delivery.order_key is None else (mid, ("key", delivery.order_key))


def _is_takeover(claim: ClaimResult | None) -> bool:
    return claim is not None and claim.status is ClaimStatus.NEW and claim.takeover


_LATE: Any = object()  # a delivery whose claim is made inside its task, after its predecessors


class ConsumerRunner:
    """Consume one transport's consumer group through ``layer``, acknowledging by outcome.

    See the module docstring for the loop, isolation of suspects, backpressure and shutdown.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        handler: Processor,
        layer: ReliabilityLayer,
        batch_size: int = 64,
        concurrency: int = 16,
        claim_every_s: float = 5.0,
        shutdown_timeout: float = 30.0,
        metrics_every_s: float = 5.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        backoff: Backoff | None = None,
    ) -> None:
        if not isinstance(layer, ReliabilityLayer):
            raise ConfigurationError(f"layer must be a ReliabilityLayer, got {type(layer).__name__}")
        require_async_handler(handler)
        self.batch_size = _positive_int("batch_size", batch_size, maximum=100_000)
        self.concurrency = _positive_int("concurrency", concurrency, maximum=100_000)
        self.claim_every_s = _seconds("claim_every_s", claim_every_s)
        self.shutdown_timeout = _seconds("shutdown_timeout", shutdown_timeout, allow_zero=True)
        self.metrics_every_s = _seconds("metrics_every_s", metrics_every_s)
        if not callable(clock) or not callable(sleep):
            raise ConfigurationError("clock and sleep must be callables (time.monotonic, asyncio.sleep)")
        if backoff is not None and not isinstance(backoff, Backoff):
            raise ConfigurationError(
                f"backoff must have reset() and compute(failures), got {type(backoff).__name__}"
            )
        self.transport = transport
        self.handler = handler
        self.layer = layer
        #: the Redis client of the layer's stores, for the shared breaker state (set by a runner that has one)
        self.companion_client: Any = None
        self._bind_group(layer, transport.group, transport.name)
        layer.prepare(transport.destination)
        self._clock = clock
        self._sleep = sleep
        self._backoff: Backoff = backoff if backoff is not None else ExponentialBackoff()
        self.stats = ConsumerStats()
        self._stop = asyncio.Event()
        # futures of the waits _unless_stopped is in, which stop() ends (see there)
        self._stop_waiters: set[asyncio.Future[None]] = set()
        self._gate = _IsolationGate()
        self._inflight: set[asyncio.Task[None]] = set()  # messages run by a task of their own
        # the worker pool: messages free to start run on long-lived workers, not a task each
        self._jobs: set[_Job] = set()  # queued or running on a worker
        self._queue: collections.deque[_Job] = collections.deque()
        self._idle: collections.deque[asyncio.Future[None]] = collections.deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._waking = 0  # workers woken (or started) that have not looked at the queue yet
        self._slot_freed: asyncio.Future[None] | None = None
        self._held: collections.deque[Delivery] = collections.deque()  # read, not yet claimed
        self._tails: dict[Hashable, asyncio.Task[None] | _Job] = {}  # last one per order key / message id
        self._acks: list[Hashable] = []
        self._staged: list[StagedCompletion] = []
        self._ack_task: asyncio.Task[None] | None = None
        self._last_claim = -math.inf
        self._reclaim_more = False
        self._last_metrics = -math.inf
        self._lag: int | None = None
        self._pending: int | None = None
        self._running = False
        self._paused = False
        self._backing_off = False
        self._fatal: ConfigurationError | None = None
        telemetry = layer.telemetry
        self._attrs = telemetry.consumer_attrs(transport.destination, transport.group)
        self._oldest_pending_age: float | None = None
        # a handler that ran and failed retriably goes on to a retry topic where the transport has one
        self._reroute = transport.reroute if isinstance(transport, Rerouting) else None
        self._lost_counter = telemetry.consumer_lost
        self._lost_counter.add(0, self._attrs)  # the series exists at 0, so increase() sees the first loss
        telemetry.add_consumer_gauge_source(self._gauge_values)

    @staticmethod
    def _bind_group(layer: ReliabilityLayer, group: str, system: str) -> None:
        """The layer's dedup scope and telemetry are per consumer group: bind it to this runner's (a
        layer already serving another group raises :class:`~streamwarden.ConfigurationError`), and
        name the broker in its spans and metrics (``messaging.system``)."""
        layer.bind_consumer_group(group, messaging_system=system)

    # --- public control -----------------------------------------------------------------------
    def stop(self) -> None:
        """Stop reading; in-flight messages finish (or are cancelled after ``shutdown_timeout``)."""
        self._stop.set()
        for waiter in self._stop_waiters:
            _wake(waiter)

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop.is_set()

    @property
    def in_flight(self) -> int:
        """Messages being processed right now."""
        return len(self._inflight) + len(self._jobs)

    async def run_until_signal(self) -> None:
        """:meth:`run`, stopping gracefully on SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        try:
            await self.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)

    async def run(self) -> None:
        """Consume until :meth:`stop`; returns after in-flight work finished or was abandoned.

        Raises :class:`~streamwarden.ConfigurationError` (after draining) when the broker refuses the
        consumer in a way retrying cannot fix.
        """
        if self._running:
            raise RuntimeError("this runner is already running")
        self._running = True
        self._fatal = None
        companions: list[_Companion] = []
        try:
            companions = await self._start_companions()
            await self._consume()
        finally:
            try:
                await self._drain()
            finally:
                await self._stop_companions(companions)
                self._running = False
        if self._fatal is not None:
            raise self._fatal

    async def _start_companions(self) -> list[_Companion]:
        """The layer's Redis companions, per its settings, whatever the transport: the shared breaker
        state (needs ``companion_client``, the Redis client of the stores) and the fleet counter
        flusher (when the layer's counters live in Redis)."""
        from .._redis._breaker import SharedBreakerSync
        from .._redis._counters import CounterFlusher

        settings = self.layer.settings
        companions: list[_Companion] = []
        try:
            if settings.shared_breaker and self.companion_client is not None:
                sync = SharedBreakerSync(
                    self.companion_client,
                    self.layer.breakers,
                    key_prefix=settings.key_prefix,
                    poll_interval=settings.shared_breaker_poll_interval,
                )
                await sync.start()
                companions.append(sync)
            if self.layer.metrics_collector.store is not None:
                flusher = CounterFlusher(
                    self.layer.metrics_collector, interval=settings.metrics_flush_interval
                )
                flusher.start()
                companions.append(flusher)
        except BaseException:
            await self._stop_companions(companions)
            raise
        return companions

    async def _stop_companions(self, companions: list[_Companion]) -> None:
        """Stop each companion within ``_COMPANION_STOP_S``: a frozen broker must not hold up exit."""
        for companion in reversed(companions):
            try:
                await asyncio.wait_for(companion.stop(), timeout=_COMPANION_STOP_S)
            except (Exception, TimeoutError) as exc:
                log.warning(
                    "stopping %s failed: %s", type(companion).__name__, self.layer.describe_error(exc)
                )

    # --- the loop -----------------------------------------------------------------------------
    async def _consume(self) -> None:
        failures = 0
        grouped = False  # ensure_group() succeeded since the last error
        while not self._stop.is_set():
            try:
                if not grouped:
                    # joining can wait long (Kafka: aiokafka's start() waits for the first assignment,
                    # and a broker that does not answer holds it for the request timeout): a stop must
                    # not wait for it
                    await self._unless_stopped(self.transport.ensure_group())
                    if self._stop.is_set():
                        break
                    grouped = True
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                kind = self.transport.classify(exc)
                if kind is None:
                    raise  # not a broker error: a bug, and hiding it behind retries would hide it for good
                if kind is ErrorKind.CONFIGURATION:
                    self._fail(exc)
                    return
                grouped = False
                failures += 1
                self.stats.redis_errors += 1
                self._backing_off = True
                delay = self._backoff.compute(failures)
                log.warning(
                    "%s error in consumer %s: %s; retrying in %.2fs",
                    self.transport.name,
                    self._consumer_name,
                    self.layer.describe_error(exc),
                    delay,
                )
                await self._sleep_or_stop(delay)
            else:
                if failures:
                    failures = 0
                    self._backoff.reset()
                    self._backing_off = False

    @property
    def _consumer_name(self) -> str:
        return str(getattr(self.transport, "consumer", self.transport.group))

    def _fail(self, exc: BaseException) -> None:
        """A configuration error: remember it (``run`` raises it after draining) and stop."""
        if self._fatal is None:
            fatal = ConfigurationError(self.transport.explain(exc))
            fatal.__cause__ = exc
            self._fatal = fatal
            log.error("consumer %s stops: %s", self._consumer_name, fatal)
        self._stop.set()

    async def _step(self) -> None:
        breaker = self.layer.circuit_breaker
        if breaker.state is BreakerState.OPEN:
            wait = breaker.retry_after()
            if wait > 0:
                self.stats.paused_for_breaker += 1
                if not self._paused:
                    self._paused = True
                    if isinstance(self.transport, Pausable):
                        self.transport.pause()
                await self._sleep_or_stop(wait)
                return
        if self._paused:
            self._paused = False
            if isinstance(self.transport, Pausable):
                self.transport.resume()
        now = self._clock()
        if now - self._last_metrics >= self.metrics_every_s:
            self._last_metrics = now
            await self.refresh_lag()
        if not await self._wait_for_room():
            return
        if self._held:  # reclaimed earlier, left unclaimed behind a suspect
            await self._dispatch_held()
            return
        room = self._room()
        if self._reclaim_more or now - self._last_claim >= self.claim_every_s:
            self._last_claim = now
            reclaimed = await self._unless_stopped(self.transport.reclaim(min(room, self.batch_size)))
            if reclaimed is None:  # stopped while Redis did not answer
                return
            self._reclaim_more = reclaimed.more
            if reclaimed.lost:
                self._count_lost(reclaimed.lost)
            if reclaimed.deliveries:
                self.stats.reclaimed += len(reclaimed.deliveries)
                self._held.extend(reclaimed.deliveries)
                await self._dispatch_held()
                return
        deliveries = await self._unless_stopped(self.transport.read(min(room, self.batch_size)))
        if deliveries:
            self.stats.read += len(deliveries)
            await self._dispatch_batch(deliveries)

    def _room(self) -> int:
        return self.concurrency - len(self._inflight) - len(self._jobs) - len(self._held)

    async def _wait_for_room(self) -> bool:
        """Until a slot is free and no suspect is isolating (``False`` if stopped first)."""
        while not self._stop.is_set():
            if self._gate.isolating:
                await self._until_stopped(self._gate.wait_clear())
            elif len(self._inflight) + len(self._jobs) >= self.concurrency:
                await self._until_stopped(self._a_slot_frees())
            else:
                return True
        return False

    def _count_lost(self, refs: Sequence[str]) -> None:
        self.stats.lost += len(refs)
        self._lost_counter.add(len(refs), self._attrs)
        log.error(
            "%s: %d delivered entries can never be processed (deleted, trimmed or unreadable): %s",
            self.transport.destination,
            len(refs),
            ", ".join(refs[:10]),
        )

    # --- dispatch -----------------------------------------------------------------------------
    def _predecessors(self, keys: Iterable[Hashable]) -> list[asyncio.Task[None] | _Job]:
        found: list[asyncio.Task[None] | _Job] = []
        for key in keys:
            tail = self._tails.get(key)
            if tail is not None and tail not in found:
                found.append(tail)
        return found

    async def _dispatch_batch(self, deliveries: Sequence[Delivery]) -> None:
        """New entries: one batch claim for those free to start, the rest claimed after their predecessors."""
        tails = self._tails
        seen: set[Hashable] = set()
        plan: list[tuple[Delivery, tuple[Hashable, ...], bool]] = []  # (delivery, chain keys, claim it now)
        for delivery in deliveries:
            keys = _chain_keys(delivery)
            for key in keys:  # a loop, not any(): no generator per delivery
                if key in seen or key in tails:
                    free = False
                    break
            else:
                free = True
            seen.update(keys)
            plan.append((delivery, keys, free))
        now = [d.envelope.id for d, _, free in plan if free]
        claims = iter(await self._claim(now) if now else ())
        suspects: list[_Ticket] = []
        deferred: list[tuple[Delivery, Any]] = []  # (delivery, its batch claim or _LATE)
        deferred_keys: set[Hashable] = set()
        for delivery, keys, free in plan:
            claim = next(claims) if free else _LATE
            # One suspect per batch: a second takeover (Kafka hands a dead member's records back through
            # read(), all at once) and whatever is chained behind it wait in _held, claimed one at a
            # time after the first suspect ran alone; their claims are given back unrun.
            takeover = claim is not _LATE and _is_takeover(claim)
            if (deferred_keys and not deferred_keys.isdisjoint(keys)) or (
                takeover and (suspects or deferred)
            ):
                deferred.append((delivery, claim))
                deferred_keys.update(keys)
                continue
            ticket = _Ticket()
            if takeover:
                suspects.append(ticket)  # queued after the batch-mates took their places
            elif claim is not _LATE:
                self._gate.try_shared(ticket)
            self._start(delivery, claim, ticket, keys)
        for ticket in suspects:
            self._gate.enqueue(ticket)
        if deferred:
            await self._defer_to_held(deferred)

    async def _defer_to_held(self, deferred: Sequence[tuple[Delivery, Any]]) -> None:
        """Hold deliveries back for one-at-a-time claiming, giving back their batch claims unrun (a
        takeover stays one). A claim the store will not give back stands: the delivery still waits in
        ``_held``, and its re-claim answers ``IN_PROGRESS`` until that lease runs out."""
        destination = self.transport.destination
        for delivery, claim in deferred:
            if claim is not _LATE and claim is not None:
                await self.layer.give_back_unrun(claim, destination=destination)
            self._held.append(delivery)

    async def _dispatch_held(self) -> None:
        """Reclaimed entries: claimed one at a time, and none after a takeover until it has run alone."""
        while self._held and not self._stop.is_set():
            if self._gate.isolating or len(self._inflight) + len(self._jobs) >= self.concurrency:
                return
            delivery = self._held.popleft()
            ticket = _Ticket()
            keys = _chain_keys(delivery)
            if self._predecessors(keys):
                self._start(delivery, _LATE, ticket, keys)
                continue
            [claim] = await self._claim([delivery.envelope.id])
            if _is_takeover(claim):
                self._gate.enqueue(ticket)
                self._start(delivery, claim, ticket, keys)
                return
            self._gate.try_shared(ticket)
            self._start(delivery, claim, ticket, keys)

    async def _claim(self, ids: Sequence[str]) -> list[ClaimResult | None]:
        """One round trip for ``ids``; on a store failure ``None`` each (the layer claims by itself and
        applies the store-failure policy)."""
        try:
            claims: list[ClaimResult | None] = list(
                await self.layer.claim_batch(ids, destination=self.transport.destination)
            )
        except Exception as exc:
            log.warning(
                "batch dedup claim of %d ids failed (%s); the layer claims them",
                len(ids),
                self.layer.describe_error(exc),
            )
            return [None] * len(ids)
        if len(claims) != len(ids):  # a store bug; claiming one by one is still correct
            log.error("batch dedup claim answered %d results for %d ids", len(claims), len(ids))
            return [None] * len(ids)
        return claims

    def _start(self, delivery: Delivery, claim: Any, ticket: _Ticket, keys: tuple[Hashable, ...]) -> None:
        """Run ``delivery`` (its chain ``keys``): on a worker when it is free to start now, else in a task
        of its own that waits for its predecessors, its claim or the gate."""
        if claim is not _LATE and ticket.shared:  # free to start now: a worker runs it
            job = _Job(delivery, claim, ticket, keys)
            self._jobs.add(job)
            for key in keys:
                self._tails[key] = job
            self._queue.append(job)
            self._wake_worker()
            return
        predecessors = self._predecessors(keys) if claim is _LATE else []
        task = asyncio.create_task(self._handle(delivery, claim, ticket, predecessors))
        self._inflight.add(task)
        # callbacks, not a finally in _handle: a task cancelled before it starts runs no finally
        task.add_done_callback(functools.partial(self._task_done, delivery, ticket, keys))
        for key in keys:
            self._tails[key] = task

    # --- the worker pool --------------------------------------------------------------------------
    def _wake_worker(self) -> None:
        """Make sure a worker will look at the queue: wake an idle one, or start one while the pool is
        below ``concurrency``. A worker that takes a job wakes the next one if jobs are left, so a
        handler that awaits I/O never holds up the queue, and one that does not runs a whole batch
        in one go (no task, no event-loop round per message)."""
        if self._waking:  # one is on its way already; it passes the baton on
            return
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._waking += 1
                return
        if len(self._workers) < self.concurrency:
            self._waking += 1
            worker = asyncio.get_running_loop().create_task(self._worker())
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        self._waking -= 1  # started by _wake_worker
        while True:
            if not self._queue:
                waiter: asyncio.Future[None] = loop.create_future()
                self._idle.append(waiter)
                try:
                    await waiter
                except asyncio.CancelledError:
                    if waiter.done() and not waiter.cancelled():  # woken, then cancelled
                        self._waking -= 1
                    raise
                self._waking -= 1
                continue
            job = self._queue.popleft()
            if self._queue:
                self._wake_worker()
            try:
                await self._handle(job.delivery, job.claim, job.ticket, ())
            except asyncio.CancelledError:  # shutdown: this job and the queued ones are given back
                self._job_done(job, given_back=True)
                while self._queue:
                    self._job_done(self._queue.popleft(), given_back=True)
                raise
            except BaseException as error:  # _handle catches everything else; a bug if not
                log.error(
                    "message worker: %s (a bug in the runner)",
                    self.layer.describe_error(error),
                    exc_info=error,
                )
                self._job_done(job, given_back=True)
                continue
            self._job_done(job, given_back=False)

    def _job_done(self, job: _Job, *, given_back: bool) -> None:
        self._jobs.discard(job)
        if given_back:  # a job that ran released its place in _handle (a finally)
            self._gate.release(job.ticket)
        for key in job.keys:
            if self._tails.get(key) is job:
                del self._tails[key]
        if given_back:
            self.transport.give_back((job.delivery.ref,))
        job.finish()
        self._free_slot()

    def _free_slot(self) -> None:
        freed = self._slot_freed
        if freed is not None:
            self._slot_freed = None
            if not freed.done():
                freed.set_result(None)

    def _a_slot_frees(self) -> Awaitable[None]:
        """Resolves when a message in flight (task or job) finishes. The future is made *now*, before
        the caller yields: a worker may finish a whole batch before an awaiting coroutine would run."""
        if self._slot_freed is None:
            self._slot_freed = asyncio.get_running_loop().create_future()
        return asyncio.shield(self._slot_freed)

    async def _until_no_jobs(self) -> None:
        while self._jobs:
            await self._a_slot_frees()

    def _task_done(
        self, delivery: Delivery, ticket: _Ticket, keys: tuple[Hashable, ...], task: asyncio.Task[None]
    ) -> None:
        self._inflight.discard(task)
        self._free_slot()
        self._gate.release(ticket)
        for key in keys:
            if self._tails.get(key) is task:
                del self._tails[key]
        if task.cancelled():  # abandoned at shutdown: never acknowledged
            self.transport.give_back((delivery.ref,))
        elif (error := task.exception()) is not None:  # observed, never lost
            log.error(
                "message task ended with %s (a bug in the runner)",
                self.layer.describe_error(error),
                exc_info=error,
            )

    async def _handle(
        self,
        delivery: Delivery,
        claim: Any,
        ticket: _Ticket,
        predecessors: Sequence[asyncio.Task[None] | _Job],
    ) -> None:
        env = delivery.envelope
        result: ProcessResult | None = None
        try:
            for previous in predecessors:  # its outcome is its own; only the order matters here
                if isinstance(previous, _Job):
                    await previous.finished()
                else:
                    await asyncio.wait((previous,))
            if claim is _LATE:
                [claim] = await self._claim([env.id])
                if _is_takeover(claim):
                    self._gate.enqueue(ticket)
            if ticket.queued:
                await self._gate.exclusive(ticket)
                self.stats.isolated += 1
                log.info("message %r: previous owner died running it; running it alone", env.id)
            elif not ticket.shared:
                await self._gate.shared(ticket)
            try:
                result = await self.layer.process(env, self.handler, claim=claim, stage_completion=True)
            finally:
                self._gate.release(ticket)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # a real cancellation (shutdown): not acknowledged, the broker redelivers
            self._escaped(env, "its own CancelledError")
        except BaseException as exc:  # SystemExit, KeyboardInterrupt, ... must not end the consumer
            self._escaped(env, self.layer.describe_error(exc))
        self._settle(delivery, result)

    def _escaped(self, env: Envelope, what: str) -> None:
        self.stats.escaped += 1
        log.error("message %r: %s escaped the reliability layer; not acknowledged", env.id, what)

    # --- acknowledgement ------------------------------------------------------------------------
    def _settle(self, delivery: Delivery, result: ProcessResult | None) -> None:
        if result is None:
            self.stats.not_acked += 1
            self.transport.give_back((delivery.ref,))
            return
        name, acked = _SETTLE[result.outcome]
        outcomes = self.stats.outcomes
        outcomes[name] = outcomes.get(name, 0) + 1
        if not acked:
            reroute = self._reroute
            if (
                reroute is not None
                and result.outcome is _DEFERRED
                and result.attempts > 0
                and reroute(delivery.ref, result.error)
            ):
                self.stats.rerouted += 1
                return
            self.stats.not_acked += 1
            self.transport.give_back((delivery.ref,))
            return
        self._acks.append(delivery.ref)
        if result.completion is not None:
            self._staged.append(result.completion)
        if self._ack_task is None:
            self._ack_task = asyncio.get_running_loop().create_task(self._send_acks())

    async def _send_acks(self) -> None:
        """Commit what finished, one round trip for all of it (group commit): the dedup completions and
        the acknowledgements of the entries that finished while the previous commit was in flight go
        together in the next one, so a batch costs a round trip or two, not one per message.

        A completion is written before (or atomically with) its acknowledgement, never after: a crash
        in between leaves the entry unacknowledged with its record leased, and the redelivery after the
        lease is a counted takeover. A commit that fails is tried again (``_COMMIT_TRIES`` times, both
        halves are idempotent); then the completions count as dedup errors and the entries stay
        pending, to be redelivered (and taken over) later.
        """
        try:
            while self._acks:
                refs, self._acks = self._acks, []
                staged, self._staged = self._staged, []
                for attempt in range(1, _COMMIT_TRIES + 1):
                    try:
                        await self._commit(refs, staged)
                    except Exception as exc:
                        self.stats.redis_errors += 1
                        kind = self.transport.classify(exc)
                        final = attempt == _COMMIT_TRIES or kind is not ErrorKind.TRANSIENT
                        log.warning(
                            "commit of %d entries failed (%s)%s",
                            len(refs),
                            self.layer.describe_error(exc),
                            "; they will be redelivered" if final else "; trying again",
                        )
                        if final:
                            if kind is ErrorKind.CONFIGURATION:
                                self._fail(exc)
                            if staged:
                                self.layer.settle_completions(staged, exc)
                            break
                        await self._sleep(self._backoff.compute(attempt))
                    else:
                        self.stats.acked += len(refs)
                        break
        finally:
            self._ack_task = None

    async def _commit(self, refs: Sequence[Hashable], staged: Sequence[StagedCompletion]) -> None:
        """One commit: through the transport's group commit where it can, else completions first (one
        round trip per store), then the acknowledgement."""
        transport = self.transport
        if staged and isinstance(transport, CommittingTransport):
            answers = await transport.commit(refs, staged)
            if answers is not None:
                self.layer.settle_completions(staged, answers)
                return
        if staged:
            written = await self.layer.write_completions(staged)
            self.layer.settle_completions(staged, written)
            # a failed write is counted; the entries are acknowledged anyway, as with an unstaged
            # completion that failed: the effect happened
        await transport.ack(refs)

    # --- waiting --------------------------------------------------------------------------------
    async def _unless_stopped(self, operation: Awaitable[Any]) -> Any:
        """The result of ``operation``, or ``None`` if :meth:`stop` comes first (it is then cancelled).

        A stop must not wait for a blocking read, above all when the broker does not answer (frozen, or
        partitioned away) and the read would last the socket timeout. Entries a cancelled read was
        handed are pending, unprocessed and unacknowledged: another consumer takes them over later.

        One task per call, the operation's: the loop waits on a future that the operation's end or
        :meth:`stop` resolves, not on a second task waiting for the stop event (this runs at every
        read and every wait for a slot).
        """
        task = asyncio.ensure_future(operation)
        woken: asyncio.Future[None] = task.get_loop().create_future()
        wake = functools.partial(_wake, woken)
        task.add_done_callback(wake)
        waiters = self._stop_waiters
        if self._stop.is_set():  # after the operation's first step, as a task waiting for the event
            task.get_loop().call_soon(wake)
        else:
            waiters.add(woken)
        try:
            await woken
        except BaseException:
            task.cancel()
            raise
        finally:
            waiters.discard(woken)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.wait((task,))
        if not task.cancelled():
            task.exception()  # an operation that failed as it was cancelled no longer matters
        return None

    async def _until_stopped(self, waiting: Awaitable[Any]) -> None:
        """Wait for ``waiting`` or :meth:`stop`, whichever comes first."""
        await self._unless_stopped(waiting)

    async def _sleep_or_stop(self, seconds: float) -> None:
        await self._unless_stopped(self._sleep(seconds))

    async def _wait_all(self, tasks: set[asyncio.Task[None]], seconds: float) -> set[asyncio.Task[None]]:
        """Wait until ``tasks`` are done or ``seconds`` passed (on the injected sleep); the unfinished."""
        pending = {t for t in tasks if not t.done()}
        if not pending:
            return pending
        timer = asyncio.ensure_future(self._sleep(seconds))
        try:
            while pending and not timer.done():
                await asyncio.wait({*pending, timer}, return_when=asyncio.FIRST_COMPLETED)
                pending = {t for t in pending if not t.done()}
        finally:
            timer.cancel()
        return pending

    # --- shutdown -------------------------------------------------------------------------------
    async def _drain(self) -> None:
        if self._held:  # read but never claimed: the broker redelivers them
            self.transport.give_back([d.ref for d in self._held])
            self._held.clear()
        waiting: set[asyncio.Task[None]] = set(self._inflight)
        jobs_done: asyncio.Task[None] | None = None
        if self._jobs:
            jobs_done = asyncio.ensure_future(self._until_no_jobs())
            waiting.add(jobs_done)
        pending = await self._wait_all(waiting, self.shutdown_timeout)
        if jobs_done is not None and not jobs_done.done():
            jobs_done.cancel()
        if jobs_done is not None:
            pending.discard(jobs_done)
        abandoned = len(pending) + len(self._jobs)
        if abandoned:
            for task in pending:
                task.cancel()
            log.warning("shutdown: abandoned %d in-flight messages (not acknowledged)", abandoned)
        # cancelling the workers gives back the jobs they run and the queued ones; a message whose
        # handler started keeps its claim (the lease expires; the redelivery is a counted takeover); one
        # that had not started releases it, unless the store does not answer
        workers = set(self._workers)
        for worker in workers:
            worker.cancel()
        if pending or self._jobs:
            stuck = await self._wait_all(pending | workers, _CANCEL_GRACE_S)
            if stuck:
                log.warning("shutdown: %d messages did not finish cancelling in time", len(stuck))
        elif workers:  # all idle: they end at once
            await asyncio.wait(workers)
        for waiter in self._idle:
            waiter.cancel()
        self._idle.clear()
        self._waking = 0  # workers cancelled before they ran never counted themselves off
        # a worker cancelled before it woke leaves its queue: give back whatever no worker ran
        while self._queue:
            self._job_done(self._queue.popleft(), given_back=True)
        for job in list(self._jobs):
            self._job_done(job, given_back=True)
        if self._ack_task is not None:  # the acknowledgements of what finished
            ack_task = self._ack_task
            if await self._wait_all({ack_task}, _CANCEL_GRACE_S):
                ack_task.cancel()
                await asyncio.wait((ack_task,))
                log.warning("shutdown: acknowledgements did not finish in time; they will be redelivered")

    # --- metrics and health -------------------------------------------------------------------
    async def refresh_lag(self) -> None:
        """Read the group's lag and pending count for the gauges and health; refresh the dead-letter
        depth cache so the gauge counts other processes' writes too."""
        store = self.layer.dead_letter_store
        if isinstance(store, DepthRefreshing):
            try:
                await store.refresh_depths()
            except Exception as exc:
                log.debug("refreshing DLQ depths failed: %s", self.layer.describe_error(exc))
        try:
            backlog = await self.transport.backlog()
        except Exception as exc:
            log.debug("reading the backlog failed: %s", self.layer.describe_error(exc))
            return
        self._lag, self._pending = backlog.lag, backlog.pending
        self._oldest_pending_age = backlog.oldest_pending_age

    def _gauge_values(self) -> list[tuple[str, float, Mapping[str, Any]]]:
        values: list[tuple[str, float, Mapping[str, Any]]] = []
        if self._lag is not None:
            values.append((n.METRIC_CONSUMER_LAG, self._lag, self._attrs))
        if self._pending is not None:
            values.append((n.METRIC_CONSUMER_PENDING, self._pending, self._attrs))
            # 0 when nothing is pending, so "the oldest pending message is old" has a quiet value
            age = self._oldest_pending_age if self._pending else 0.0
            if age is not None:
                values.append((n.METRIC_CONSUMER_OLDEST_PENDING_AGE, age, self._attrs))
        return values

    async def health(self) -> Health:
        """Readiness: consuming (running, not paused, not backing off), broker and DLQ reachable."""
        breakers = self.layer.breakers.states()
        broker_ok = await _probe(self.transport.ping())
        depth: int | None = None
        dlq_ok = True
        try:
            depth = await asyncio.wait_for(self.layer.dead_letter_store.count(), timeout=_PROBE_S)
        except (Exception, TimeoutError):
            dlq_ok = False
        if broker_ok:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.refresh_lag(), timeout=_PROBE_S)
        reasons = []
        if self._fatal is not None:
            reasons.append(f"configuration error: {self._fatal}")
        elif self.stopping:
            reasons.append("stopping")
        elif not self._running:
            reasons.append("not consuming (run() is not running)")
        if self.layer.circuit_breaker.state is BreakerState.OPEN:
            reasons.append("circuit breaker open (reading paused)")
        if self._backing_off:
            reasons.append(f"backing off after {self.transport.name} errors")
        if not broker_ok:
            reasons.append(f"{self.transport.name} unreachable")
        if not dlq_ok:
            reasons.append("dead-letter store unreachable")
        return Health(
            ready=not reasons,
            breakers=breakers,
            redis_ok=broker_ok,
            dlq_ok=dlq_ok,
            dlq_depth=depth,
            lag=self._lag,
            pending=self._pending,
            reason="; ".join(reasons),
            consuming=self._running and not self.stopping,
            paused_for_breaker=self._paused,
            backing_off=self._backing_off,
            in_flight=len(self._inflight) + len(self._jobs),
            error=None if self._fatal is None else str(self._fatal),
        )


async def _probe(check: Awaitable[Any]) -> bool:
    try:
        await asyncio.wait_for(check, timeout=_PROBE_S)
    except (Exception, TimeoutError):
        return False
    return True
