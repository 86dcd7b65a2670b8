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
the outage on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ._breaker import BreakerTransition
from ._envelope import Envelope
from ._layer import Outcome, ReliabilityLayer
from ._redis._wire import as_text
from ._settings import ReliabilitySettings

__all__ = ["DemoConfig", "DemoReport", "run_demo", "run_redis_demo"]

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
    seed: int = 1
    live: bool = False
    max_seconds: float | None = None
    outage_every: float | None = None
    outage_duration: float = 20.0
    service_name: str = "streamwarden-demo"
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

    Deterministic for a seed (its own RNG), shared by the embedded and the Redis demo.
    """

    def __init__(self, config: DemoConfig, report: DemoReport) -> None:
        self._config = config
        self._report = report
        self._rng = random.Random(config.seed)
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


async def run_demo(
    config: DemoConfig,
    *,
    layer: ReliabilityLayer | None = None,
    on_progress: Callable[[DemoReport, int], None] | None = None,
    stop: asyncio.Event | None = None,
    control: Callable[[BrokerAPI, DemoReport], None] | None = None,
) -> DemoReport:
    """Run the workload; returns the report (``report.problems`` lists reconciliation failures)."""
    fault_rng = random.Random(config.seed + 1)  # the broker's latency and faults (content: _Workload)
    settings = ReliabilitySettings(
        service_name=config.service_name,
        destination=config.destination,
        max_retries=3,
        retry_initial_delay=0.005,
        retry_max_delay=0.05,
        retry_deadline=2.0,
        processing_timeout=1.0,
        circuit_breaker_threshold=5,
        circuit_breaker_timeout=0.5,
    )
    layer = layer or ReliabilityLayer(None, settings)
    report = DemoReport()
    broker = BrokerAPI(config, fault_rng)
    stream = _Stream()
    stop = stop or asyncio.Event()
    if control is not None:
        control(broker, report)

    def on_transition(event: BreakerTransition) -> None:
        report.transitions.append((event.from_state, event.to_state))

    layer.circuit_breaker.add_transition_listener(on_transition)
    workload = _Workload(config, report)
    started = time.monotonic()
    in_flight = 0
    done_producing = asyncio.Event()

    async def produce() -> None:
        interval = 1.0 / config.rate if config.rate > 0 else 0.0
        next_at = time.monotonic()
        while not stop.is_set():
            if config.max_seconds is not None and time.monotonic() - started >= config.max_seconds:
                break
            message = workload.next_message()
            if message is None:
                break
            stream.queue.put_nowait(message)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif report.produced % 64 == 0:
                await asyncio.sleep(0)
        done_producing.set()

    async def outage_schedule() -> None:
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

    drained = asyncio.Event()

    async def work() -> None:
        nonlocal in_flight
        while True:
            message = await stream.queue.get()
            if message is None:
                return
            in_flight += 1
            try:
                result = await layer.process(message, broker.execute)
                report.outcomes[result.outcome.value] += 1
                if result.dead_letter is not None:
                    report.dlq_reasons[result.dead_letter.reason] += 1
                if not result.should_ack:
                    # A real stream redelivers after a visibility timeout. Waiting also keeps the
                    # simulation honest: an in-progress answer takes no time, and a worker that
                    # re-queued it at once would spin without letting the lease holder finish.
                    await asyncio.sleep(min(0.05, layer.circuit_breaker.retry_after() or 0.01))
                    stream.redeliver(message)
            finally:
                in_flight -= 1
            if on_progress is not None:
                on_progress(report, stream.queue.qsize())
            if done_producing.is_set() and in_flight == 0 and stream.queue.empty():
                drained.set()

    producer = asyncio.create_task(produce())
    outages = asyncio.create_task(outage_schedule())
    workers = [asyncio.create_task(work()) for _ in range(config.concurrency)]
    try:
        await producer
        if not config.live and not (stream.queue.empty() and in_flight == 0):
            await drained.wait()  # every message acknowledged: nothing left in the stream
    finally:
        for _ in workers:
            stream.queue.put_nowait(None)
        if config.live:
            for task in workers:
                task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        outages.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await outages
        broker.outage = False
    report.elapsed = time.monotonic() - started
    report.redeliveries = stream.redeliveries
    report.executed = sum(broker.executed.values())
    report.metrics = await layer.metrics_collector.get_reliability_metrics()
    report.retries = int(report.metrics.get("retry_attempts", 0))
    if not config.live:
        entries = await layer.dead_letter_store.list(limit=report.produced + 1)
        _reconcile(report, broker, Counter(entry.message_id for entry in entries))
    return report


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


class ControlServer:
    """``--control-port``: POST/DELETE /outage, GET /status (on 127.0.0.1 unless ``--control-host``)."""

    def __init__(self, port: int, loop: asyncio.AbstractEventLoop, *, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.loop = loop
        self.broker: BrokerAPI | None = None
        self.report: DemoReport | None = None
        self._server: ThreadingHTTPServer | None = None

    def attach(self, broker: BrokerAPI, report: DemoReport) -> None:
        self.broker, self.report = broker, report

    def start(self) -> None:
        control = self

        class Handler(BaseHTTPRequestHandler):
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
                if self.path.rstrip("/") != "/outage" or control.broker is None:
                    self._reply(404, {"error": "not found"})
                    return
                broker = control.broker
                control.loop.call_soon_threadsafe(setattr, broker, "outage", value)
                self._reply(200, {"outage": value})

            def do_POST(self) -> None:
                self._set_outage(True)

            def do_DELETE(self) -> None:
                self._set_outage(False)

            def do_GET(self) -> None:
                if self.path.rstrip("/") != "/status" or control.report is None:
                    self._reply(404, {"error": "not found"})
                    return
                body = control.report.as_dict()
                body["outage"] = bool(control.broker and control.broker.outage)
                self._reply(200, body)

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        threading.Thread(
            target=self._server.serve_forever, name="streamwarden-demo-control", daemon=True
        ).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM/SIGINT set ``stop`` (graceful end of a live demo)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


async def run_redis_demo(
    config: DemoConfig,
    redis_url: str,
    *,
    consumers: int = 3,
    on_progress: Callable[[DemoReport, int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> DemoReport:
    """The same workload through Redis: a stream, ``consumers`` runners in one consumer group, the Redis
    dedup store, dead-letter queue and counters. Unacknowledged entries come back via XAUTOCLAIM.

    The stream (``{key_prefix}:demo:<run>``) is deleted at the end; dead letters stay in Redis for
    ``streamwarden dlq list`` and are purged by ``streamwarden dlq purge``.
    """
    import uuid

    import redis.asyncio

    from ._runners._redis_streams import RedisStreamConsumer, StreamProducer

    fault_rng = random.Random(config.seed + 1)
    run = uuid.uuid4().hex[:8]
    stream = f"streamwarden:demo:{config.destination}:{run}"
    settings = ReliabilitySettings(
        service_name=config.service_name,
        destination=stream,
        max_retries=3,
        retry_initial_delay=0.005,
        retry_max_delay=0.05,
        retry_deadline=2.0,
        processing_timeout=1.0,
        dedup_lease=5.0,
        circuit_breaker_threshold=5,
        circuit_breaker_timeout=0.5,
        exhausted_transient_action="defer",
        poison_max_deliveries=None,  # the outage redelivers messages often; poison here is by content
    )
    client = redis.asyncio.Redis.from_url(redis_url)
    report = DemoReport()
    broker = BrokerAPI(config, fault_rng)
    stop = stop or asyncio.Event()
    layers = [ReliabilityLayer(client, settings) for _ in range(consumers)]
    runners = [
        RedisStreamConsumer(
            client,
            stream=stream,
            group="demo",
            consumer=f"demo-{i}",
            handler=broker.execute,
            layer=layer,
            batch_size=32,
            block_ms=100,
            concurrency=max(1, config.concurrency // consumers),
            claim_idle_ms=300,
            claim_every_s=0.1,
        )
        for i, layer in enumerate(layers)
    ]
    for layer in layers:
        layer.circuit_breaker.add_transition_listener(
            lambda e: report.transitions.append((e.from_state, e.to_state))
        )
    producer = StreamProducer(client, stream)
    started = time.monotonic()
    try:
        await runners[0].ensure_group()
        tasks = [asyncio.create_task(r.run()) for r in runners]
        workload = _Workload(config, report)
        outage_at = config.messages * config.outage_start
        outage_until = config.messages * (config.outage_start + config.outage_length)
        while not stop.is_set() and (message := workload.next_message()) is not None:
            broker.outage = outage_at <= report.produced < outage_until
            await producer.send(message, message_id=message.get("id"))
            await asyncio.sleep(1.0 / config.rate)
            if on_progress is not None and report.produced % 25 == 0:
                on_progress(report, 0)
        broker.outage = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not stop.is_set():
            info = await client.xpending(stream, "demo")
            lag = [g for g in await client.xinfo_groups(stream) if as_text(g.get("name")) == "demo"]
            if int(info["pending"]) == 0 and lag and int(lag[0].get("lag") or 0) == 0:
                break
            await asyncio.sleep(0.1)
        for r in runners:
            r.stop()
        await asyncio.gather(*tasks)
        report.elapsed = time.monotonic() - started
        for r in runners:
            for outcome, count in r.stats.outcomes.items():
                report.outcomes[outcome] += count
            report.redeliveries += r.stats.reclaimed
        report.executed = sum(broker.executed.values())
        for layer in layers:
            await layer.aclose()
        report.metrics = await layers[0].metrics_collector.get_reliability_metrics()
        report.retries = int(report.metrics.get("retry_attempts", 0))
        entries = await layers[0].dead_letter_store.list(stream, limit=report.produced + 1)
        for entry in entries:
            report.dlq_reasons[entry.reason] += 1
        _reconcile_ledger(report, broker, Counter(entry.message_id for entry in entries))
    finally:
        await client.delete(stream)
        await client.aclose()
    return report


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
