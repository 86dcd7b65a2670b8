"""``streamwarden demo``: a trading-signal stream through the reliability layer, faults included.

The embedded demo needs no Redis. A producer emits trading signals into an in-process queue that
behaves like a stream with redelivery (a message that is not acknowledged comes back with its
delivery count raised). Workers run each message through :class:`~streamwarden.ReliabilityLayer`
against a simulated broker API that has:

* occasional transient faults (``ConnectionError``), retried with backoff;
* a downstream outage window in which every call fails, so the circuit breaker opens, messages are
  deferred (not acknowledged, redelivered later) and the breaker closes again after the outage;
* poison signals (malformed quantity) that fail permanently and go to the dead-letter queue at once;
* re-sent signals (duplicates), which the dedup claim answers without running the handler;
* a few messages without an id, dead-lettered with reason ``missing_id``.

At the end the numbers must reconcile: every unique signal was executed exactly once or sits in the
DLQ, and every re-send was counted as a duplicate. ``--live`` runs an endless stream instead (for the
compose stack and the end-to-end alert tests), with an optional control endpoint that starts and ends
the outage on demand and reports the live counts.

The Redis demo (:func:`run_redis_demo`) runs the same workload through consumer runners on a real
stream. It owns a fixed set of keys and deletes them when it starts, so repeated runs are correct and
nothing else on that Redis is touched: the stream ``streamwarden-demo`` (and its consumer group), the
dead-letter stream of the destination ``streamwarden-demo``, the dedup records of its scope and the
fleet counters of the service ``streamwarden-demo``.

The Kafka demo (:func:`run_kafka_demo`, aiokafka imported only there) runs it through a topic: the
topic is created when missing, each run reads in a group of its own whose offsets start at the topic's
end, the members share Redis (dedup scope ``{topic}/streamwarden-demo``, its dead letters, the fleet
counters of ``config.service_name``: ``streamwarden-demo-kafka`` from the CLI; all deleted first) or,
without Redis, one member runs on the embedded stores with dead letters in the ``{topic}.dlq`` topic
(purged first).

The pieces, in reading order: the workload (:class:`_Workload`), the simulated downstream
(:class:`BrokerAPI`) and its outage schedule (:func:`_outage_schedule`, :func:`_outage_window`), the
embedded stream and its workers (:class:`_EmbeddedRun`), the Redis run (:class:`_RedisRun`), the Kafka
run (:class:`_KafkaRun`), and the reconciliation (:func:`_reconcile_ledger`, :func:`_reconcile`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import random
import re
import signal
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol

from ._breaker import BreakerTransition
from ._counters import with_rates
from ._dlq import DeadLetterEntry
from ._envelope import Envelope
from ._layer import Outcome, ProcessResult, ReliabilityLayer, dedup_scope
from ._redis._counters import RedisCounterStore
from ._redis._dedup import RedisDedupStore
from ._redis._dlq import RedisDeadLetterStore
from ._redis._wire import as_text
from ._settings import ReliabilitySettings

if TYPE_CHECKING:
    from ._runners import RedisStreamConsumer

__all__ = [
    "DEMO_GROUP",
    "DEMO_KAFKA_SERVICE",
    "DEMO_SERVICE",
    "DEMO_STREAM",
    "DEMO_TOPIC",
    "KAFKA_DEMO_CONSUMER_OPTIONS",
    "ControlServer",
    "DemoConfig",
    "DemoControls",
    "DemoReport",
    "run_demo",
    "run_kafka_demo",
    "run_redis_demo",
]

#: The Redis demo's stream (also its destination: DLQ stream, metric labels); fixed, so repeated runs
#: reuse one label value and clean up after the previous run.
DEMO_STREAM = "streamwarden-demo"
#: The Redis demo's consumer group.
DEMO_GROUP = "streamwarden-demo"
#: Service name of the embedded and the Redis demo (fleet counters, telemetry resource).
DEMO_SERVICE = "streamwarden-demo"
#: Service name of the Kafka demo: its own fleet counters beside a Redis demo on the same Redis.
DEMO_KAFKA_SERVICE = "streamwarden-demo-kafka"
#: The Kafka demo's default topic (also its destination: DLQ, dedup scope, metric labels).
DEMO_TOPIC = "trading.signals"

SYMBOLS = ("AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "TSLA", "META", "BTC-USD", "ETH-USD", "EURUSD")
STRATEGIES = ("momentum", "mean-reversion", "pairs", "breakout")


@dataclass
class DemoConfig:
    """Knobs of the demo workload; the defaults finish in well under a minute."""

    messages: int = 4000
    rate: float = 800.0
    concurrency: int = 16
    duplicate_ratio: float = 0.08
    poison_ratio: float = 0.01
    missing_id_ratio: float = 0.002
    transient_fault_ratio: float = 0.03
    outage_start: float = 0.35
    outage_length: float = 0.15
    latency_ms: tuple[float, float] = (0.5, 3.0)
    workload: int = 1  # which random workload: the same number gives the same signals and faults
    live: bool = False
    max_seconds: float | None = None
    outage_every: float | None = None
    outage_duration: float = 20.0
    service_name: str = DEMO_SERVICE
    destination: str = "trading.signals"


@dataclass
class DemoReport:
    """What happened, from the stream's side and from the layer's side."""

    produced: int = 0
    unique_ids: int = 0
    resent: int = 0
    executed: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    dlq_reasons: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    redeliveries: int = 0
    transitions: list[tuple[str, str]] = field(default_factory=list)
    elapsed: float = 0.0
    problems: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    produced_ids: set[str] = field(default_factory=set)
    missing_ids: int = 0
    #: one line per dead letter: id, reason, error type, entry id and the failed attempt's trace
    dead_letters: list[dict[str, Any]] = field(default_factory=list)

    def note_dead_letters(self, entries: Iterable[DeadLetterEntry]) -> None:
        """Keep what an operator needs to go from a dead letter to its trace (``--json`` prints it)."""
        self.dead_letters = [
            {
                "message_id": entry.message_id,
                "reason": entry.reason,
                "error_type": entry.error_type,
                "entry_id": entry.entry_id,
                "trace_id": entry.trace_id,
                "span_id": entry.span_id,
            }
            for entry in entries
        ]

    @property
    def reconciled(self) -> bool:
        """Whether the stream's ledger and the layer's counts agree."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "produced": self.produced,
            "unique_ids": self.unique_ids,
            "resent": self.resent,
            "executed": self.executed,
            "outcomes": dict(self.outcomes),
            "dlq_reasons": dict(self.dlq_reasons),
            "retries": self.retries,
            "redeliveries": self.redeliveries,
            "breaker_transitions": [f"{a}->{b}" for a, b in self.transitions],
            "elapsed_seconds": round(self.elapsed, 3),
            "reconciled": self.reconciled,
            "problems": self.problems,
            "metrics": self.metrics,
            "dead_letters": self.dead_letters,
        }


class BrokerAPI:
    """The simulated downstream: latency, random transient faults, an outage switch."""

    def __init__(self, config: DemoConfig, rng: random.Random) -> None:
        self._config = config
        self._rng = rng
        self.outage = False
        self.executed: Counter[str] = Counter()

    async def execute(self, message: Any) -> dict[str, Any]:
        payload = message.payload if isinstance(message, Envelope) else message
        data = payload["data"]
        low, high = self._config.latency_ms
        await asyncio.sleep(self._rng.uniform(low, high) / 1000.0)
        if self.outage:
            raise ConnectionError("broker API unreachable (outage)")
        qty = data["qty"]
        if not isinstance(qty, int | float) or qty <= 0:
            raise ValueError(f"invalid quantity {qty!r} for {data['symbol']}")
        if self._rng.random() < self._config.transient_fault_ratio:
            raise ConnectionError("broker API connection reset")
        message_id = message.id if isinstance(message, Envelope) else payload["id"]
        self.executed[message_id] += 1
        return {"order_id": f"ord-{message_id}", "status": "filled"}


def _signal(i: int, rng: random.Random, config: DemoConfig) -> dict[str, Any]:
    poison = rng.random() < config.poison_ratio
    message: dict[str, Any] = {
        "id": f"sig-{i:07d}",
        "data": {
            "symbol": rng.choice(SYMBOLS),
            "side": rng.choice(("buy", "sell")),
            "qty": "ten" if poison else rng.randint(1, 500),
            "price": round(rng.uniform(10, 1000), 2),
            "strategy": rng.choice(STRATEGIES),
        },
    }
    if rng.random() < config.missing_id_ratio:
        del message["id"]
    return message


class _Workload:
    """The stream's content: new signals and re-sends of recent ones, recorded in the report's ledger.

    Deterministic for ``config.workload`` (its own RNG), shared by the embedded and the Redis demo.
    """

    def __init__(self, config: DemoConfig, report: DemoReport) -> None:
        self._config = config
        self._report = report
        self._rng = random.Random(config.workload)
        self._recent: deque[dict[str, Any]] = deque(maxlen=500)
        self._next = 0

    def next_message(self) -> dict[str, Any] | None:
        """The next message to produce, or ``None`` once ``config.messages`` signals exist (not live)."""
        config, report, rng = self._config, self._report, self._rng
        if not config.live and self._next >= config.messages:
            return None
        if self._recent and rng.random() < config.duplicate_ratio:
            message = rng.choice(self._recent)
            report.resent += 1
        else:
            message = _signal(self._next, rng, config)
            self._next += 1
            report.unique_ids += 1
            if "id" in message:
                report.produced_ids.add(message["id"])
                self._recent.append(message)
            else:
                report.missing_ids += 1
        report.produced += 1
        return message


class _Stream:
    """An in-process stream with redelivery: unacknowledged messages come back, counted."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Envelope | dict[str, Any] | None] = asyncio.Queue()
        self.redeliveries = 0

    def redeliver(self, message: Envelope | dict[str, Any]) -> None:
        self.redeliveries += 1
        if isinstance(message, Envelope):
            env = Envelope(
                message.id,
                message.payload,
                message.headers,
                message.destination,
                None,
                message.delivery_count + 1,
            )
        else:
            env = Envelope(str(message["id"]), message, {}, None, None, 2)
        self.queue.put_nowait(env)


def _demo_settings(config: DemoConfig, **overrides: Any) -> ReliabilitySettings:
    """The layer settings both demos use: short backoffs and a breaker that recovers in half a second."""
    options: dict[str, Any] = {
        "service_name": config.service_name,
        "destination": config.destination,
        "max_retries": 3,
        "retry_initial_delay": 0.005,
        "retry_max_delay": 0.05,
        "retry_deadline": 2.0,
        "processing_timeout": 1.0,
        "circuit_breaker_threshold": 5,
        "circuit_breaker_timeout": 0.5,
    }
    options.update(overrides)
    return ReliabilitySettings(**options)


def _fault_rng(config: DemoConfig) -> random.Random:
    """The broker's latency and faults: an RNG apart from the workload's, so content stays fixed."""
    return random.Random(config.workload + 1)


# --- outages -----------------------------------------------------------------------------------------
async def _outage_schedule(config: DemoConfig, broker: BrokerAPI, stop: asyncio.Event) -> None:
    """The embedded demo's outages: one window (a share of the expected run time), or with ``--live`` one
    every ``outage_every`` seconds for ``outage_duration`` seconds."""
    if config.live:
        if config.outage_every is None:
            return
        while not stop.is_set():
            await asyncio.sleep(config.outage_every)
            broker.outage = True
            await asyncio.sleep(config.outage_duration)
            broker.outage = False
        return
    expected = config.messages / config.rate if config.rate > 0 else 0.0
    await asyncio.sleep(expected * config.outage_start)
    broker.outage = True
    await asyncio.sleep(max(expected * config.outage_length, 1.0))
    broker.outage = False


def _outage_window(config: DemoConfig) -> range:
    """The stream demos' outage: while the producer writes these message numbers (see :class:`_Outage`)."""
    start = int(config.messages * config.outage_start)
    return range(start, int(config.messages * (config.outage_start + config.outage_length)))


# Bound on how long a stream demo's outage outlasts its window while the consumers have not felt it.
_OUTAGE_MAX_S = 10.0


class _Outage:
    """The stream demos' outage switch, moved by the producer loop: on from the first message of the
    window, off once the window was written *and* the consumers felt it (a circuit breaker opened since
    the outage began), or after :data:`_OUTAGE_MAX_S` seconds.

    A window of messages alone is a race: consumers that read the window's records only after the
    producer moved past it (a slow fetch, a busy machine) would never meet the outage. Counting failed
    calls is no measure either: a message's retries fail too, so a few messages "feel" it without ever
    opening a breaker.
    """

    def __init__(self, config: DemoConfig, broker: BrokerAPI, report: DemoReport) -> None:
        self._window = _outage_window(config)
        self._broker = broker
        self._report = report
        self._opened_before = 0
        self._started: float | None = None

    def _opened(self) -> int:
        return sum(1 for _old, new in self._report.transitions if new == "open")

    def update(self, produced: int) -> None:
        broker = self._broker
        if produced in self._window:
            if self._started is None:
                self._started = time.monotonic()
                self._opened_before = self._opened()
            broker.outage = True
        elif broker.outage and self._started is not None:
            felt = self._opened() > self._opened_before
            broker.outage = not felt and time.monotonic() - self._started < _OUTAGE_MAX_S


# --- the embedded demo -------------------------------------------------------------------------------
class DemoControls(Protocol):
    """What the control endpoint of a live demo may do; called on the demo's event loop."""

    def set_outage(self, on: bool) -> None:
        """Start (``True``) or end the downstream outage."""

    def status(self) -> dict[str, Any]:
        """The live counts (the report so far), plus ``outage``."""


class _EmbeddedRun:
    """One embedded run: a producer, an outage schedule and ``concurrency`` workers on an in-process
    stream, until every message is acknowledged (or, live, until ``stop``)."""

    def __init__(
        self,
        config: DemoConfig,
        layer: ReliabilityLayer,
        stop: asyncio.Event,
        on_progress: Callable[[DemoReport, int], None] | None,
    ) -> None:
        self.config, self.layer, self.stop, self.on_progress = config, layer, stop, on_progress
        self.report = DemoReport()
        self.broker = BrokerAPI(config, _fault_rng(config))
        self.stream = _Stream()
        self.workload = _Workload(config, self.report)
        self.in_flight = 0
        self.done_producing = asyncio.Event()
        self.drained = asyncio.Event()
        self.started = time.monotonic()
        layer.circuit_breaker.add_transition_listener(self._on_transition)
        layer.prepare(config.destination)  # its counters exist at 0 before the first message

    def _on_transition(self, event: BreakerTransition) -> None:
        self.report.transitions.append((event.from_state, event.to_state))

    # DemoControls
    def set_outage(self, on: bool) -> None:
        """Start or end the outage (control endpoint)."""
        self.broker.outage = on

    def status(self) -> dict[str, Any]:
        """The report so far, with the live execution, redelivery, retry and time counts."""
        self._fill_live_counts(self.layer.metrics_collector.snapshot())
        body = self.report.as_dict()
        body["outage"] = self.broker.outage
        return body

    def _fill_live_counts(self, counts: dict[str, int]) -> None:
        report = self.report
        report.elapsed = time.monotonic() - self.started
        report.redeliveries = self.stream.redeliveries
        report.executed = sum(self.broker.executed.values())
        report.metrics = with_rates(counts)
        report.retries = int(report.metrics.get("retry_attempts", 0))

    async def produce(self) -> None:
        """Emit the workload at ``config.rate`` messages per second."""
        config, report = self.config, self.report
        interval = 1.0 / config.rate if config.rate > 0 else 0.0
        next_at = time.monotonic()
        while not self.stop.is_set():
            if config.max_seconds is not None and time.monotonic() - self.started >= config.max_seconds:
                break
            message = self.workload.next_message()
            if message is None:
                break
            self.stream.queue.put_nowait(message)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif report.produced % 64 == 0:
                await asyncio.sleep(0)
        self.done_producing.set()

    async def work(self) -> None:
        """One worker: take messages until the ``None`` sentinel."""
        while (message := await self.stream.queue.get()) is not None:
            self.in_flight += 1
            try:
                await self._handle(message)
            finally:
                self.in_flight -= 1
            if self.on_progress is not None:
                self.on_progress(self.report, self.stream.queue.qsize())
            if self.done_producing.is_set() and self.in_flight == 0 and self.stream.queue.empty():
                self.drained.set()

    async def _handle(self, message: Envelope | dict[str, Any]) -> None:
        result: ProcessResult = await self.layer.process(message, self.broker.execute)
        self.report.outcomes[result.outcome.value] += 1
        if result.dead_letter is not None:
            self.report.dlq_reasons[result.dead_letter.reason] += 1
        if not result.should_ack:
            # A real stream redelivers after a visibility timeout. Waiting also keeps the simulation
            # honest: an in-progress answer takes no time, and a worker that re-queued it at once would
            # spin without letting the lease holder finish.
            await asyncio.sleep(min(0.05, self.layer.circuit_breaker.retry_after() or 0.01))
            self.stream.redeliver(message)

    async def run(self) -> DemoReport:
        """Run to the end (every message acknowledged, or ``stop`` when live); reconcile unless live."""
        producer = asyncio.create_task(self.produce())
        outages = asyncio.create_task(_outage_schedule(self.config, self.broker, self.stop))
        workers = [asyncio.create_task(self.work()) for _ in range(self.config.concurrency)]
        try:
            await producer
            if not self.config.live and not (self.stream.queue.empty() and self.in_flight == 0):
                await self.drained.wait()  # every message acknowledged: nothing left in the stream
        finally:
            await self._shut_down(workers, outages)
        return await self._finish()

    async def _shut_down(self, workers: list[asyncio.Task[None]], outages: asyncio.Task[None]) -> None:
        for _ in workers:
            self.stream.queue.put_nowait(None)
        if self.config.live:
            for task in workers:
                task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        outages.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await outages
        self.broker.outage = False

    async def _finish(self) -> DemoReport:
        report = self.report
        metrics = await self.layer.metrics_collector.get_reliability_metrics()
        self._fill_live_counts({k: v for k, v in metrics.items() if isinstance(v, int)})
        report.metrics = metrics
        if not self.config.live:
            entries = await self.layer.dead_letter_store.list(limit=report.produced + 1)
            report.note_dead_letters(entries)
            _reconcile(report, self.broker, Counter(entry.message_id for entry in entries))
        return report


async def run_demo(
    config: DemoConfig,
    *,
    layer: ReliabilityLayer | None = None,
    on_progress: Callable[[DemoReport, int], None] | None = None,
    stop: asyncio.Event | None = None,
    control: Callable[[DemoControls], None] | None = None,
) -> DemoReport:
    """Run the workload on the embedded stores; returns the report (``report.problems`` lists
    reconciliation failures). ``control`` receives the run's :class:`DemoControls` before it starts."""
    run = _EmbeddedRun(
        config, layer or ReliabilityLayer(None, _demo_settings(config)), stop or asyncio.Event(), on_progress
    )
    if control is not None:
        control(run)
    return await run.run()


def _reconcile(report: DemoReport, broker: BrokerAPI, dead_letter_ids: Counter[str | None]) -> None:
    """The embedded run: the ledger checks, plus missing ids and the in-process counters."""
    problems = report.problems
    _reconcile_ledger(report, broker, dead_letter_ids)
    if dead_letter_ids.get(None, 0) != report.missing_ids:
        problems.append(
            f"{report.missing_ids} messages without id, {dead_letter_ids.get(None, 0)} in the DLQ"
        )
    duplicates = report.outcomes.get(Outcome.DUPLICATE.value, 0)
    metrics = report.metrics
    expected = {
        "messages_processed_successfully": report.outcomes.get(Outcome.PROCESSED.value, 0),
        "messages_deduplicated": duplicates,
        "messages_dead_lettered": report.outcomes.get(Outcome.DEAD_LETTERED.value, 0),
        "total_messages": report.produced + report.redeliveries,
    }
    for name, value in expected.items():
        if metrics.get(name) != value:
            problems.append(f"MetricsCollector {name}={metrics.get(name)} but the stream saw {value}")


class _ControlHandler(BaseHTTPRequestHandler):
    """The requests of :class:`ControlServer` (a subclass per server sets ``control``)."""

    control: ControlServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _set_outage(self, value: bool) -> None:
        if self.path.rstrip("/") != "/outage" or self.control.controls is None:
            self._reply(404, {"error": "not found"})
            return
        self.control.on_loop(lambda controls: controls.set_outage(value))
        self._reply(200, {"outage": value})

    def do_POST(self) -> None:
        self._set_outage(True)

    def do_DELETE(self) -> None:
        self._set_outage(False)

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/status" or self.control.controls is None:
            self._reply(404, {"error": "not found"})
            return
        self._reply(200, self.control.on_loop(lambda controls: controls.status()))


class ControlServer:
    """``--control-port``: POST/DELETE /outage, GET /status (on 127.0.0.1 unless ``--control-host``).

    Requests are served on a thread; what they read or change is done on the demo's event loop.
    """

    def __init__(self, port: int, loop: asyncio.AbstractEventLoop, *, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.loop = loop
        self.controls: DemoControls | None = None
        self._server: ThreadingHTTPServer | None = None

    def attach(self, controls: DemoControls) -> None:
        """Serve the controls of a running demo (``run_demo(control=server.attach)``)."""
        self.controls = controls

    def on_loop(self, call: Callable[[DemoControls], Any]) -> Any:
        """``call(controls)`` on the event loop, from a request thread; ``None`` before attach."""
        controls = self.controls
        if controls is None:
            return None
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(call(controls))
            except Exception as exc:
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return done.result(timeout=10)

    def start(self) -> None:
        """Listen (raises ``OSError`` when the port is taken) and serve on a daemon thread."""
        handler = type("ControlHandler", (_ControlHandler,), {"control": self})
        self._server = ThreadingHTTPServer((self.host, self.port), handler)
        threading.Thread(
            target=self._server.serve_forever, name="streamwarden-demo-control", daemon=True
        ).start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM/SIGINT set ``stop`` (graceful end of a live demo)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


# --- the Redis demo ----------------------------------------------------------------------------------
class _RedisRun:
    """One Redis run: ``consumers`` stream runners in one group, the producer, reconciliation."""

    def __init__(
        self,
        config: DemoConfig,
        client: Any,
        *,
        consumers: int,
        key_prefix: str,
        stop: asyncio.Event,
        on_progress: Callable[[DemoReport, int], None] | None,
    ) -> None:
        self.config, self.client, self.stop, self.on_progress = config, client, stop, on_progress
        self.settings = _demo_settings(
            config,
            destination=DEMO_STREAM,
            consumer_group=DEMO_GROUP,
            key_prefix=key_prefix,
            dedup_lease=5.0,
            exhausted_transient_action="defer",
            poison_max_deliveries=None,  # the outage redelivers messages often; poison here is by content
        )
        self.report = DemoReport()
        self.broker = BrokerAPI(config, _fault_rng(config))
        self.layers = [ReliabilityLayer(client, self.settings) for _ in range(consumers)]
        self.runners = [self._runner(i, layer) for i, layer in enumerate(self.layers)]
        for layer in self.layers:
            layer.circuit_breaker.add_transition_listener(
                lambda e: self.report.transitions.append((e.from_state, e.to_state))
            )

    def _runner(self, index: int, layer: ReliabilityLayer) -> RedisStreamConsumer:
        """Consumer ``demo-{index}``: small batches and quick takeovers, so the demo runs in seconds."""
        from ._runners import RedisStreamConsumer

        return RedisStreamConsumer(
            self.client,
            stream=DEMO_STREAM,
            group=DEMO_GROUP,
            consumer=f"demo-{index}",
            handler=self.broker.execute,
            layer=layer,
            batch_size=32,
            block_ms=100,
            concurrency=max(1, self.config.concurrency // len(self.layers)),
            claim_idle_ms=300,
            claim_every_s=0.1,
        )

    async def reset(self) -> None:
        """Delete the demo's own keys, and only those: its stream (with the group), the dead letters of
        its destination, the dedup records of its scope and its service's fleet counters."""
        await self.client.delete(DEMO_STREAM)
        await _reset_redis_keys(self.client, self.layers[0], DEMO_STREAM)

    async def produce(self) -> None:
        """Write the workload to the stream at ``config.rate``, the broker down inside the outage window."""
        from ._runners import StreamProducer

        producer = StreamProducer(self.client, DEMO_STREAM, service_name=DEMO_SERVICE)
        workload, report = _Workload(self.config, self.report), self.report
        outage = _Outage(self.config, self.broker, report)
        while not self.stop.is_set() and (message := workload.next_message()) is not None:
            outage.update(report.produced)
            await producer.send(message, message_id=message.get("id"))
            await asyncio.sleep(1.0 / self.config.rate)
            if self.on_progress is not None and report.produced % 25 == 0:
                self.on_progress(report, 0)
        self.broker.outage = False

    async def wait_drained(self, timeout: float = 120.0) -> None:
        """Until every entry was delivered to the group and acknowledged (or ``timeout``, or ``stop``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            info = await self.client.xpending(DEMO_STREAM, DEMO_GROUP)
            groups = await self.client.xinfo_groups(DEMO_STREAM)
            lag = [g for g in groups if as_text(g.get("name")) == DEMO_GROUP]
            if int(info["pending"]) == 0 and lag and int(lag[0].get("lag") or 0) == 0:
                return
            await asyncio.sleep(0.1)

    async def run(self) -> DemoReport:
        """Reset, consume while producing, drain, stop the runners, reconcile; the stream is deleted."""
        started = time.monotonic()
        await self.reset()
        try:
            await self.runners[0].ensure_group()
            tasks = [asyncio.create_task(r.run()) for r in self.runners]
            await self.produce()
            await self.wait_drained()
            for r in self.runners:
                r.stop()
            await asyncio.gather(*tasks)
            self.report.elapsed = time.monotonic() - started
            await self._collect()
        finally:
            await self.client.delete(DEMO_STREAM)
        return self.report

    async def _collect(self) -> None:
        await _collect_run(
            self.report,
            self.broker,
            self.layers,
            DEMO_STREAM,
            outcomes=[r.stats.outcomes for r in self.runners],
            redeliveries=sum(r.stats.reclaimed for r in self.runners),
        )


async def run_redis_demo(
    config: DemoConfig,
    client: Any,
    *,
    consumers: int = 3,
    key_prefix: str = "streamwarden",
    on_progress: Callable[[DemoReport, int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> DemoReport:
    """The same workload through Redis (``client``, which the caller closes): the stream
    :data:`DEMO_STREAM`, ``consumers`` runners in the group :data:`DEMO_GROUP`, the Redis dedup store,
    dead-letter queue and counters. Unacknowledged entries come back via XAUTOCLAIM.

    The demo first deletes its own keys (see the module docstring), so a run never sees the previous
    one's records; the stream is deleted at the end, dead letters stay for ``streamwarden dlq list``
    until the next run. Run one Redis demo at a time per Redis and key prefix.
    """
    run = _RedisRun(
        config,
        client,
        consumers=consumers,
        key_prefix=key_prefix,
        stop=stop or asyncio.Event(),
        on_progress=on_progress,
    )
    return await run.run()


# --- the Kafka demo ----------------------------------------------------------------------------------
#: aiokafka options of the Kafka demo's consumers: a 6 s session (Tansu holds a JoinGroup for about half
#: of it, so a join takes ~3 s) with heartbeats well inside it; fresh metadata, so the group settles fast.
KAFKA_DEMO_CONSUMER_OPTIONS: dict[str, Any] = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 500,
    "metadata_max_age_ms": 2000,
}


class _KafkaRun:
    """One Kafka run: the topic (created when missing), ``consumers`` runners in one group, the producer
    and reconciliation. With ``client`` (Redis) the layers share its dedup store, dead-letter queue and
    counters; without it one runner on the embedded stores, dead letters in the ``{topic}.dlq`` topic.
    ``client_options`` (TLS, SASL, request timeout) go to every aiokafka client of the run."""

    def __init__(
        self,
        config: DemoConfig,
        bootstrap: str,
        topic: str,
        client: Any,
        *,
        consumers: int,
        partitions: int,
        key_prefix: str,
        consumer_options: dict[str, Any],
        client_options: Mapping[str, Any],
        stop: asyncio.Event,
        on_progress: Callable[[DemoReport, int], None] | None,
    ) -> None:
        from ._runners._kafka import KafkaConsumerRunner, KafkaOrdering

        self.config, self.bootstrap, self.topic, self.client = config, bootstrap, topic, client
        self.client_options = client_options
        self.stop, self.on_progress = stop, on_progress
        self.partitions = partitions
        # A group of its own per run, its offsets set to the topic's end before it has members (a broker
        # refuses that commit from outside a group that has or had members: Tansu keeps them). The dedup
        # scope stays fixed, so each run deletes the previous run's records as the Redis demo does.
        self.group = f"{DEMO_GROUP}-{uuid.uuid4().hex[:12]}"
        self.settings = _demo_settings(
            config,
            destination=topic,
            consumer_group=self.group,
            dedup_scope=dedup_scope(topic, DEMO_GROUP),
            key_prefix=key_prefix,
            dedup_lease=5.0,
            exhausted_transient_action="defer",
            poison_max_deliveries=None,  # Kafka has no delivery count; poison here is by content
        )
        self.report = DemoReport()
        self.broker = BrokerAPI(config, _fault_rng(config))
        self.dead_letters: Any = None
        if client is None:
            from ._kafka import KafkaDeadLetterStore

            consumers = 1  # the embedded dedup store is per process: one member, or a rebalance runs twice
            store_client_options = dict(client_options)
            store_options = self.settings.dead_letter_store_options()
            if "request_timeout_ms" in store_client_options:  # the store takes it as its own argument
                store_options["request_timeout_ms"] = store_client_options.pop("request_timeout_ms")
            self.dead_letters = KafkaDeadLetterStore(
                bootstrap, client_options=store_client_options, **store_options
            )
        self.layers = [
            ReliabilityLayer(client, self.settings, dead_letter_store=self.dead_letters)
            for _ in range(consumers)
        ]
        self.runners = [
            KafkaConsumerRunner(
                bootstrap_servers=bootstrap,
                topic=topic,
                group=self.group,
                consumer=f"demo-{i}",
                handler=self.broker.execute,
                layer=layer,
                ordering=KafkaOrdering.KEY,
                batch_size=32,
                concurrency=max(1, config.concurrency // consumers),
                poll_timeout_ms=100,
                revoke_timeout=2.0,
                shutdown_timeout=10.0,
                consumer_options={**consumer_options, **client_options},
                redis_client=client,
            )
            for i, layer in enumerate(self.layers)
        ]
        for layer in self.layers:
            layer.circuit_breaker.add_transition_listener(
                lambda e: self.report.transitions.append((e.from_state, e.to_state))
            )

    async def reset(self) -> None:
        """Create the topic when missing and set the run's group's offsets to its end (the records of
        earlier runs stay, unread); delete the demo's Redis keys of the topic (as the Redis demo does) or
        purge its DLQ topic."""
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, **self.client_options)
        await admin.start()
        try:
            if self.topic not in await admin.list_topics():
                await admin.create_topics([NewTopic(self.topic, self.partitions, 1)])
        finally:
            await admin.close()
        reader = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            **self.client_options,
        )
        await reader.start()
        try:
            found = reader.partitions_for_topic(self.topic)
            deadline = time.monotonic() + 10.0
            while not found and time.monotonic() < deadline:  # metadata of a topic just created
                await reader.topics()  # a metadata round trip
                await asyncio.sleep(0.1)
                found = reader.partitions_for_topic(self.topic)
            if not found:
                raise RuntimeError(f"Kafka topic {self.topic!r} has no partitions in the metadata")
            self.partitions = len(found)
            tps = [TopicPartition(self.topic, p) for p in sorted(found)]
            reader.assign(tps)
            ends = await reader.end_offsets(tps)
            await reader.commit({tp: ends[tp] for tp in tps})  # a new group takes it from outside
        finally:
            await reader.stop()
        if self.client is not None:
            await _reset_redis_keys(self.client, self.layers[0], self.topic)
        else:
            await self.dead_letters.purge(self.topic)

    async def wait_assigned(self, timeout: float = 60.0) -> None:
        """Until the group is settled: every partition owned by exactly one runner, and every runner that
        can have one owns one (so no rebalance runs while the workload flows)."""
        wanted = min(len(self.runners), self.partitions)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            owned = [r.kafka_transport.assignment() for r in self.runners]
            covered = len(set().union(*owned)) == sum(len(o) for o in owned) == self.partitions
            if covered and sum(1 for o in owned if o) == wanted:
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"the consumer group did not settle on {self.topic!r} within {timeout:g}s")

    async def produce(self) -> None:
        """Write the workload to the topic at ``config.rate``, keyed by symbol (the ordering key), the
        broker down inside the outage window. A signal without id goes without key: its id is then
        ``{topic}/{partition}/{offset}``, since Kafka has no message without an address."""
        from aiokafka import AIOKafkaProducer

        from ._runners._kafka import TopicProducer

        client = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, enable_idempotence=False, acks="all", **self.client_options
        )
        await client.start()
        try:
            producer = TopicProducer(client, self.topic, service_name=self.config.service_name)
            workload, report = _Workload(self.config, self.report), self.report
            outage = _Outage(self.config, self.broker, report)
            while not self.stop.is_set() and (message := workload.next_message()) is not None:
                outage.update(report.produced)
                message_id = message.get("id")
                key = message["data"]["symbol"] if message_id is not None else None
                await producer.send(message, message_id=message_id, key=key)
                await asyncio.sleep(1.0 / self.config.rate)
                if self.on_progress is not None and report.produced % 25 == 0:
                    self.on_progress(report, 0)
        finally:
            self.broker.outage = False
            await client.stop()

    async def wait_drained(self, timeout: float = 120.0) -> None:
        """Until every record was read and acknowledged (or ``timeout``, or ``stop``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            acked = sum(
                r.stats.outcomes.get(o.value, 0)
                for r in self.runners
                for o in (Outcome.PROCESSED, Outcome.DUPLICATE, Outcome.DEAD_LETTERED)
            )
            if acked >= self.report.produced:
                backlogs = [await r.kafka_transport.backlog() for r in self.runners]
                if all(b.lag == 0 and b.pending == 0 for b in backlogs):
                    return
            await asyncio.sleep(0.1)

    async def run(self) -> DemoReport:
        """Reset, start the runners and wait for the group, produce, drain, stop, reconcile."""
        started = time.monotonic()
        try:
            await self.reset()
            tasks = [asyncio.create_task(r.run()) for r in self.runners]
            try:
                await self.wait_assigned()
                await self.produce()
                await self.wait_drained()
            finally:
                for r in self.runners:
                    r.stop()
                await asyncio.gather(*tasks)
            self.report.elapsed = time.monotonic() - started
            await self._collect()
        finally:
            if self.dead_letters is not None:
                await self.dead_letters.aclose()
        return self.report

    async def _collect(self) -> None:
        await _collect_run(
            self.report,
            self.broker,
            self.layers,
            self.topic,
            outcomes=[r.stats.outcomes for r in self.runners],
            # given back, read again from the same member
            redeliveries=sum(r.stats.not_acked for r in self.runners),
        )


async def run_kafka_demo(
    config: DemoConfig,
    bootstrap: str,
    *,
    topic: str = DEMO_TOPIC,
    client: Any = None,
    consumers: int = 3,
    partitions: int = 3,
    key_prefix: str = "streamwarden",
    consumer_options: dict[str, Any] | None = None,
    client_options: Mapping[str, Any] | None = None,
    on_progress: Callable[[DemoReport, int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> DemoReport:
    """The same workload through Kafka at ``bootstrap`` (needs aiokafka): the topic ``topic`` (created
    with ``partitions`` partitions when missing), ``consumers`` :class:`KafkaConsumerRunner` members of
    the group :data:`DEMO_GROUP` ordered by key (the symbol). With ``client`` (Redis, which the caller
    closes) the members share its dedup store, DLQ and counters, whose keys of this run are deleted first
    as in :func:`run_redis_demo`; without it one member runs on the embedded stores and dead letters go
    to the ``{topic}.dlq`` topic, purged first. The group's offsets are moved to the topic's end before
    the run, so earlier runs' records are not read. Run one Kafka demo at a time per topic.

    ``client_options`` are aiokafka keyword arguments for every client of the run (``security_protocol``,
    ``ssl_context``, ``sasl_mechanism``, ``sasl_plain_username``, ``sasl_plain_password``,
    ``request_timeout_ms``); ``consumer_options`` only for the runners' consumers.
    """
    run = _KafkaRun(
        config,
        bootstrap,
        topic,
        client,
        consumers=consumers,
        partitions=partitions,
        key_prefix=key_prefix,
        consumer_options=dict(consumer_options or KAFKA_DEMO_CONSUMER_OPTIONS),
        client_options=client_options or {},
        stop=stop or asyncio.Event(),
        on_progress=on_progress,
    )
    return await run.run()


async def _reset_redis_keys(client: Any, layer: ReliabilityLayer, destination: str) -> None:
    """Delete a Redis-backed demo's keys of ``destination``, and only those: its dead letters, the dedup
    records of its scope and the fleet counters of the layer's service."""
    settings = layer.settings
    prefix = settings.key_prefix
    await RedisDeadLetterStore(client, key_prefix=prefix).purge(destination)
    await client.delete(RedisCounterStore(client, service_name=settings.service_name, key_prefix=prefix).key)
    store = layer.dedup_store_for(destination)
    if isinstance(store, RedisDedupStore):
        # every record of the scope shares the key of one record up to its id digest
        scope_prefix = store.key("streamwarden-demo").rpartition(":")[0] + ":"
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", scope_prefix) + "*"
        batch: list[Any] = []
        async for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await client.unlink(*batch)
                batch.clear()
        if batch:
            await client.unlink(*batch)


async def _collect_run(
    report: DemoReport,
    broker: BrokerAPI,
    layers: Sequence[ReliabilityLayer],
    destination: str,
    *,
    outcomes: Iterable[Mapping[str, int]],
    redeliveries: int,
) -> None:
    """The end of a stream demo's run: the runners' outcomes, the layers closed, their counters, the
    destination's dead letters, and the reconciliation against the simulated downstream."""
    for counts in outcomes:
        for outcome, count in counts.items():
            report.outcomes[outcome] += count
    report.redeliveries += redeliveries
    report.executed = sum(broker.executed.values())
    for layer in layers:
        await layer.aclose()
    report.metrics = await layers[0].metrics_collector.get_reliability_metrics()
    report.retries = int(report.metrics.get("retry_attempts", 0))
    entries = await layers[0].dead_letter_store.list(destination, limit=report.produced + 1)
    for entry in entries:
        report.dlq_reasons[entry.reason] += 1
    report.note_dead_letters(entries)
    _reconcile_ledger(report, broker, Counter(entry.message_id for entry in entries))


def _reconcile_ledger(report: DemoReport, broker: BrokerAPI, dead_letter_ids: Counter[str | None]) -> None:
    """Zero loss and exactly-once execution, checked from the stream's ledger, not from the layer."""
    problems = report.problems
    twice = sorted(mid for mid, count in broker.executed.items() if count > 1)
    if twice:
        problems.append(f"{len(twice)} signals executed more than once, e.g. {twice[:3]}")
    lost = sorted(
        mid for mid in report.produced_ids if mid not in broker.executed and mid not in dead_letter_ids
    )
    if lost:
        problems.append(f"{len(lost)} signals neither executed nor dead-lettered, e.g. {lost[:3]}")
    acked = sum(
        report.outcomes.get(o.value, 0) for o in (Outcome.PROCESSED, Outcome.DUPLICATE, Outcome.DEAD_LETTERED)
    )
    if acked != report.produced:
        problems.append(f"acknowledged deliveries {acked} != produced messages {report.produced}")
    duplicates = report.outcomes.get(Outcome.DUPLICATE.value, 0)
    if duplicates > report.resent:
        problems.append(f"duplicates {duplicates} exceed re-sent signals {report.resent}")
