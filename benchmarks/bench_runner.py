"""End-to-end throughput of RedisStreamConsumer against a bare consumer-group loop and the seed's design.

Run from the repository root::

    .venv/bin/python benchmarks/bench_runner.py             # 20_000 messages x 3 rounds per case
    .venv/bin/python benchmarks/bench_runner.py --quick     # 2_000 messages x 1 round: a smoke run

One redis-server (started here, loopback, no persistence) serves every case. Each case reads a stream
that was filled before the clock started and is timed until every entry is acknowledged:

* ``bare``: ``XREADGROUP`` (64) -> ``json.loads`` + ``await handler(msg)`` -> ``XACK`` each entry;
  ``bare_batch_ack`` acknowledges the batch in one ``XACK`` (the cheapest correct loop);
* ``seed``: the seed's per-message design around the same loop: ``EXISTS dedup:{id}``, the handler,
  ``SETEX`` (sent as ``SET … EX``: redis-py deprecates ``setex``), ``INCRBY`` of a metrics key, ``XACK``; with telemetry on, one span and one counter add per
  message (what instrumenting the seed would cost);
* ``runner``: ``RedisStreamConsumer`` + ``ReliabilityLayer`` on Redis (batch dedup claim, bounded
  concurrency 64, completion, ``XACK`` by outcome); ``runner_deferred`` with
  ``dedup_defer_completions=True`` (completion marks ride on the next batch claim).

OpenTelemetry's global providers can be set once per process, so the script runs itself three times:
``--mode nosdk`` (no SDK: telemetry off), ``--mode sdk`` (SDK providers with exporters that only count,
as an application would install them, every span sampled) and ``--mode sdk10`` (the same with
``KeepFailures(ParentBased(TraceIdRatioBased(0.1)))``, 10% of traces kept, failures always). The ``sdk``
process also profiles one runner run with cProfile and reports the share of CPU time spent in
``opentelemetry`` frames. The ``sdk10`` process then runs a check: 2,000 messages of which 5% fail for
good, and every dead-letter entry's ``trace_id``/``span_id`` must be an exported span.

Every case also reports the Redis server's time per message: ``CONFIG RESETSTAT`` after the stream is
filled, ``INFO commandstats`` (usec, summed over commands) when the case is done, divided by the count.

``--rss-messages 500000`` adds a separate run: the runner (telemetry off, default settings) consumes that
many messages, fed in chunks while it runs, and the process RSS (``/proc/self/status`` VmRSS) is sampled
every 25,000 messages; the report compares the RSS after warm-up (20% of the run) with the end.

``--latency-ms 0.5`` puts a TCP proxy (its own process) between every client and Redis that adds that
round-trip time, as a network between hosts would; loopback round trips are ~0.03 ms.

Targets (issue 11): (a) the runner with telemetry OFF, default settings, reaches >= 0.5x the throughput
of the bare loop with one XACK per batch; (b) with telemetry ON, every span sampled, >= 10x the seed
design's throughput (seed also with telemetry on); (c) with 10% parent-based sampling >= 0.35x the bare
batched loop, and every dead letter of the check run has an exported trace.
Exit status 0 whatever the numbers, unless ``--check`` (then 1 on a FAIL); 2 when a case did not do what
it claims (nothing acknowledged, no span exported).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import io
import itertools
import json
import pstats
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import redis.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, load_average, print_table
from soak import free_port, local_redis

DEFAULT_COUNT = 20_000
QUICK_COUNT = 2_000
DEFAULT_ROUNDS = 3
BATCH = 64
TTL = 3600
TARGET_OFF_VS_BARE_BATCH = 0.5
TARGET_ON_VS_SEED = 10.0
TARGET_SAMPLED_VS_BARE_BATCH = 0.35
SAMPLED_RATIO = 0.1
TRACE_CHECK_COUNT = 2_000
RSS_EVERY = 25_000
PACKAGES = ("streamwarden", "redis", "hiredis", "opentelemetry-api", "opentelemetry-sdk")
MODES = ("nosdk", "sdk", "sdk10")

# (id, label, mode) in table order
CASES: tuple[tuple[str, str, str], ...] = (
    ("bare", "bare loop: XREADGROUP -> handler -> XACK per entry", "nosdk"),
    ("bare_batch_ack", "bare loop, one XACK per batch", "nosdk"),
    ("bare_batch_ack_py", "bare loop, one XACK per batch, redis-py's pure-Python parser", "nosdk"),
    ("runner_off", "runner, telemetry OFF", "nosdk"),
    ("runner_off_deferred", "runner, telemetry OFF, deferred completions", "nosdk"),
    ("seed_off", "seed design: EXISTS + SET EX + INCRBY per msg, telemetry OFF", "nosdk"),
    ("bare_sdk", "bare loop (SDK process)", "sdk"),
    ("seed_on", "seed design, telemetry ON (1 span + 1 counter per msg)", "sdk"),
    ("runner_on", "runner, telemetry ON", "sdk"),
    ("runner_on_deferred", "runner, telemetry ON, deferred completions", "sdk"),
    ("bare_sdk10", "bare loop, one XACK per batch (10% sampling process)", "sdk10"),
    ("runner_on_sampled", "runner, telemetry ON, 10% parent-based sampling", "sdk10"),
)
LABELS = {case_id: label for case_id, label, _ in CASES}

_streams = itertools.count()


class BenchmarkError(Exception):
    """A case did not do what it claims: its number would mean nothing."""


async def handler(message: Any) -> dict[str, Any]:
    """The processor every case runs: async, returns a small dict, does nothing else."""
    return {"ok": True}


async def fill(client: redis.asyncio.Redis, count: int) -> tuple[str, str]:
    """A new stream holding ``count`` messages with new ids, and its group; untimed."""
    n = next(_streams)
    stream, group = f"bench-{n}", "g"
    for start in range(0, count, 1000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(count, start + 1000)):
            pipe.xadd(stream, {"id": f"m{n}-{i}", "payload": '{"symbol":"ACME","side":"buy","qty":10}'})
        await pipe.execute()
    await client.xgroup_create(stream, group, id="0")
    return stream, group


SERVER_USEC: list[float] = [0.0]  # the Redis server time of the last case run, usec


async def reset_server_stats(client: redis.asyncio.Redis) -> None:
    await client.config_resetstat()


async def record_server_time(client: redis.asyncio.Redis) -> None:
    """Sum of ``usec`` over ``INFO commandstats`` since the last reset (the CONFIG/INFO calls are noise)."""
    stats = await client.info("commandstats")
    SERVER_USEC[0] = float(sum(v["usec"] for v in stats.values() if isinstance(v, dict)))


async def acked(client: redis.asyncio.Redis, stream: str, group: str, count: int) -> None:
    info = next(g for g in await client.xinfo_groups(stream) if g["name"] in (group, group.encode()))
    if int(info["pending"]) != 0 or int(info["entries-read"]) != count:
        raise BenchmarkError(f"{stream}: {info['entries-read']} read, {info['pending']} pending of {count}")


# --- cases -----------------------------------------------------------------------------------------------
def bare_case(client: redis.asyncio.Redis, *, batch_ack: bool) -> Callable[[int], Awaitable[float]]:
    async def run(count: int) -> float:
        stream, group = await fill(client, count)
        await reset_server_stats(client)
        done = 0
        started = time.perf_counter()
        while done < count:
            reply = await client.xreadgroup(group, "bare", {stream: ">"}, count=BATCH, block=100)
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    await handler(json.loads(fields[b"payload"]))
                    if not batch_ack:
                        await client.xack(stream, group, entry_id)
                if batch_ack:
                    await client.xack(stream, group, *(entry_id for entry_id, _ in entries))
                done += len(entries)
        elapsed = time.perf_counter() - started
        await record_server_time(client)
        await acked(client, stream, group, count)
        return elapsed

    return run


def seed_case(client: redis.asyncio.Redis, *, telemetry: bool) -> Callable[[int], Awaitable[float]]:
    """The seed's process_message_reliably around the bare loop: its dedup and metrics I/O per message."""
    from opentelemetry import metrics, trace
    from opentelemetry.trace import SpanKind

    tracer = trace.get_tracer("seed")
    counter = metrics.get_meter("seed").create_counter("seed.messages", unit="{message}")
    attrs = {"messaging.system": "redis", "messaging.destination.name": "bench"}

    async def process(message_id: str, payload: Any) -> None:
        if await client.exists(f"dedup:{message_id}"):
            await client.incrby("reliability:metrics:messages_deduplicated", 1)
            return
        await handler(payload)
        await client.set(f"dedup:{message_id}", "processed", ex=TTL)
        await client.incrby("reliability:metrics:messages_processed_successfully", 1)

    async def run(count: int) -> float:
        stream, group = await fill(client, count)
        await reset_server_stats(client)
        done = 0
        started = time.perf_counter()
        while done < count:
            reply = await client.xreadgroup(group, "seed", {stream: ">"}, count=BATCH, block=100)
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    message_id, payload = fields[b"id"].decode(), json.loads(fields[b"payload"])
                    if telemetry:
                        with tracer.start_as_current_span(
                            "process bench",
                            kind=SpanKind.CONSUMER,
                            attributes={**attrs, "messaging.message.id": message_id},
                        ):
                            await process(message_id, payload)
                            counter.add(1, attrs)
                    else:
                        await process(message_id, payload)
                    await client.xack(stream, group, entry_id)
                done += len(entries)
        elapsed = time.perf_counter() - started
        await record_server_time(client)
        await acked(client, stream, group, count)
        return elapsed

    return run


def runner_case(client: redis.asyncio.Redis, *, deferred: bool) -> Callable[[int], Awaitable[float]]:
    from streamwarden import ReliabilityLayer, ReliabilitySettings
    from streamwarden._runners._redis_streams import RedisStreamConsumer

    layer = ReliabilityLayer(
        client, ReliabilitySettings(service_name="bench-runner", dedup_defer_completions=deferred)
    )

    async def run(count: int) -> float:
        stream, group = await fill(client, count)
        await reset_server_stats(client)
        runner = RedisStreamConsumer(
            client, stream=stream, group=group, consumer="runner", handler=handler, layer=layer,
            batch_size=BATCH, concurrency=BATCH, block_ms=100, claim_every_s=3600, metrics_every_s=3600,
        )  # fmt: skip
        stats = runner.stats
        started = time.perf_counter()
        task = asyncio.create_task(runner.run())
        while stats.acked < count and not task.done():  # noqa: ASYNC110 - the runner exposes counters
            await asyncio.sleep(0.002)
        elapsed = time.perf_counter() - started
        runner.stop()
        await task
        await record_server_time(client)
        await layer.aclose()  # deferred completions and counters reach Redis before the next FLUSHALL
        if stats.outcomes != {"processed": count}:
            raise BenchmarkError(f"runner: outcomes {stats.outcomes} for {count} new messages")
        await acked(client, stream, group, count)
        return elapsed

    return run


# --- one mode, in its own process ----------------------------------------------------------------------
class CountingSdk:
    """Global SDK providers whose exporters only count (BatchSpanProcessor, a periodic metric reader)."""

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

        self.tracer_provider = TracerProvider(sampler=sampler) if sampler is not None else TracerProvider()
        self.tracer_provider.add_span_processor(BatchSpanProcessor(Spans()))
        reader = PeriodicExportingMetricReader(Metrics(), export_interval_millis=3_600_000)
        self.meter_provider = MeterProvider(metric_readers=[reader])
        trace.set_tracer_provider(self.tracer_provider)
        metrics.set_meter_provider(self.meter_provider)
        self.spans = spans

    def exported(self) -> dict[str, int]:
        self.tracer_provider.force_flush()
        return dict(self.spans)


def otel_share(profile: cProfile.Profile) -> dict[str, Any]:
    """Share of the profiled CPU time (own time of each function) spent in opentelemetry's frames."""
    stats = pstats.Stats(profile, stream=io.StringIO())
    total = otel = 0.0
    for (filename, _line, _name), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        total += tottime
        if "opentelemetry" in filename:
            otel += tottime
    return {"total_s": round(total, 3), "otel_s": round(otel, 3), "share": otel / total if total else 0.0}


def ratio_sampler() -> Any:
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from streamwarden import KeepFailures

    return KeepFailures(ParentBased(TraceIdRatioBased(SAMPLED_RATIO)))


async def trace_check(client: redis.asyncio.Redis, tracer_provider: Any) -> dict[str, Any]:
    """2,000 messages through the runner, 5% failing for good: does every DLQ entry point at an exported
    span? (A span exporter that keeps ids, beside the counting one.)"""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from streamwarden import ReliabilityLayer, ReliabilitySettings
    from streamwarden._runners._redis_streams import RedisStreamConsumer

    exporter = InMemorySpanExporter()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    layer = ReliabilityLayer(client, ReliabilitySettings(service_name="bench-trace-check"))

    async def failing(message: Any) -> dict[str, Any]:
        payload = getattr(message, "payload", message)  # the runner hands the handler its Envelope
        if payload.get("n", 0) % 20 == 0:
            raise ValueError("permanent failure (trace check)")
        return {"ok": True}

    stream, group = f"trace-check-{next(_streams)}", "g"
    pipe = client.pipeline(transaction=False)
    for i in range(TRACE_CHECK_COUNT):
        pipe.xadd(stream, {"id": f"tc-{i}", "payload": json.dumps({"n": i})})
    await pipe.execute()
    await client.xgroup_create(stream, group, id="0")
    runner = RedisStreamConsumer(
        client, stream=stream, group=group, consumer="tc", handler=failing, layer=layer,
        batch_size=BATCH, concurrency=BATCH, block_ms=100, claim_every_s=3600, metrics_every_s=3600,
    )  # fmt: skip
    task = asyncio.create_task(runner.run())
    deadline = time.monotonic() + 120
    while runner.stats.acked < TRACE_CHECK_COUNT and not task.done() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    runner.stop()
    await task
    tracer_provider.force_flush()
    exported = {(format(sp.context.trace_id, "032x"), format(sp.context.span_id, "016x"))
                for sp in exporter.get_finished_spans()}  # fmt: skip
    entries = await layer.dead_letter_store.list(destination=stream, limit=TRACE_CHECK_COUNT)
    traced = sum(1 for e in entries if (e.trace_id, e.span_id) in exported)
    await layer.aclose()
    return {"dead_lettered": len(entries), "traced": traced, "spans": len(exported),
            "outcomes": dict(runner.stats.outcomes)}  # fmt: skip


async def rss_run(client: redis.asyncio.Redis, total: int) -> dict[str, Any]:
    """The runner over ``total`` messages fed in chunks while it runs; VmRSS every RSS_EVERY messages."""
    from streamwarden import ReliabilityLayer, ReliabilitySettings
    from streamwarden._runners._redis_streams import RedisStreamConsumer

    def rss_kib() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    layer = ReliabilityLayer(client, ReliabilitySettings(service_name="bench-rss"))
    stream, group = f"rss-{next(_streams)}", "g"
    await client.xgroup_create(stream, group, id="0", mkstream=True)
    runner = RedisStreamConsumer(
        client, stream=stream, group=group, consumer="rss", handler=handler, layer=layer,
        batch_size=BATCH, concurrency=BATCH, block_ms=100, metrics_every_s=3600,
    )  # fmt: skip
    task = asyncio.create_task(runner.run())
    samples: list[tuple[int, int]] = []
    fed = 0
    started = time.perf_counter()
    deadline = time.monotonic() + 1800
    while runner.stats.acked < total and not task.done() and time.monotonic() < deadline:
        if fed - runner.stats.acked < 20_000 and fed < total:  # keep the stream short: feed in chunks
            pipe = client.pipeline(transaction=False)
            for i in range(fed, min(total, fed + 5_000)):
                pipe.xadd(stream, {"id": f"rss-{i}", "payload": '{"symbol":"ACME","side":"buy","qty":10}'},
                          maxlen=100_000, approximate=True)  # fmt: skip
            await pipe.execute()
            fed = min(total, fed + 5_000)
        if runner.stats.acked >= (len(samples) + 1) * RSS_EVERY:
            samples.append((runner.stats.acked, rss_kib()))
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    runner.stop()
    await task
    await layer.aclose()
    warm = next((kib for done, kib in samples if done >= total * 0.2), samples[0][1] if samples else 0)
    end = samples[-1][1] if samples else 0
    return {"messages": runner.stats.acked, "seconds": elapsed, "samples": samples,
            "rss_after_warmup_kib": warm, "rss_end_kib": end}  # fmt: skip


async def run_mode(mode: str, port: int, count: int, rounds: int, rss_messages: int = 0) -> dict[str, Any]:
    sdk = CountingSdk() if mode == "sdk" else CountingSdk(ratio_sampler()) if mode == "sdk10" else None
    client = redis.asyncio.Redis(host="127.0.0.1", port=port)
    # the loop as issue 11 measured it: redis-py without hiredis (its pure-Python RESP3 reply parser)
    from redis._parsers import _AsyncRESP3Parser

    py_client = redis.asyncio.Redis(
        connection_pool=redis.asyncio.ConnectionPool(
            host="127.0.0.1", port=port, parser_class=_AsyncRESP3Parser
        )
    )
    try:
        if mode == "sdk10":
            cases = {
                "bare_sdk10": bare_case(client, batch_ack=True),
                "runner_on_sampled": runner_case(client, deferred=False),
            }
        elif mode == "sdk":
            cases = {
                "bare_sdk": bare_case(client, batch_ack=False),
                "seed_on": seed_case(client, telemetry=True),
                "runner_on": runner_case(client, deferred=False),
                "runner_on_deferred": runner_case(client, deferred=True),
            }
        else:
            cases = {
                "bare": bare_case(client, batch_ack=False),
                "bare_batch_ack": bare_case(client, batch_ack=True),
                "bare_batch_ack_py": bare_case(py_client, batch_ack=True),
                "runner_off": runner_case(client, deferred=False),
                "runner_off_deferred": runner_case(client, deferred=True),
                "seed_off": seed_case(client, telemetry=False),
            }
        for run in cases.values():  # warm-up: connections, scripts, imports
            await run(min(count, 500))
        samples: dict[str, list[float]] = {case_id: [] for case_id in cases}
        server_us: dict[str, list[float]] = {case_id: [] for case_id in cases}
        for round_no in range(rounds):
            for case_id, run in cases.items():
                await client.flushall()
                samples[case_id].append(count / await run(count))
                server_us[case_id].append(SERVER_USEC[0] / count)
            print(f"[{mode}] round {round_no + 1}/{rounds} done", file=sys.stderr, flush=True)
        out: dict[str, Any] = {"cases": samples, "server_us": server_us}
        if mode == "sdk10" and sdk is not None:
            await client.flushall()
            out["trace_check"] = await trace_check(client, sdk.tracer_provider)
        elif mode == "nosdk" and rss_messages:
            await client.flushall()
            out["rss"] = await rss_run(client, rss_messages)
            print(f"[{mode}] rss run done", file=sys.stderr, flush=True)
        if mode == "sdk" and sdk is not None:
            exported = sdk.exported()
            if not exported.get("streamwarden"):
                raise BenchmarkError(f"telemetry ON exported no streamwarden span: {exported}")
            profile = cProfile.Profile()
            run = cases["runner_on"]
            profile.enable()
            await run(count)
            profile.disable()
            out["otel_profile"] = otel_share(profile)
            out["spans_exported"] = sdk.exported()
        elif mode == "nosdk":
            from opentelemetry import trace

            if type(trace.get_tracer_provider()).__name__ != "ProxyTracerProvider":
                raise BenchmarkError("nosdk mode has a tracer provider installed: telemetry is not off")
        return out
    finally:
        await client.aclose()
        await py_client.aclose()


# --- an optional delaying TCP proxy, in its own process --------------------------------------------------
def serve_proxy(listen: int, target: int, rtt_ms: float) -> None:
    """Forward 127.0.0.1:listen to 127.0.0.1:target, delaying every chunk by half ``rtt_ms`` each way.

    Threads and ``time.sleep`` rather than asyncio: the event loop's timers round waits up to whole
    milliseconds, which would turn a 0.25 ms delay into 1 ms or more per hop.
    """
    delay = rtt_ms / 2000

    def pump(source: socket.socket, sink: socket.socket) -> None:
        chunks: collections.deque[tuple[float, bytes]] = collections.deque()
        ready = threading.Condition()

        def send() -> None:
            while True:
                with ready:
                    while not chunks:
                        ready.wait()
                    due, data = chunks.popleft()
                if not data:
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)
                    return
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                with contextlib.suppress(OSError):
                    sink.sendall(data)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            with ready:
                chunks.append((time.perf_counter() + delay, data))
                ready.notify()
            if not data:
                break
        sender.join()

    def connection(client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", target))
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        down = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        down.start()
        pump(client, upstream)
        down.join()
        client.close()
        upstream.close()

    with socket.create_server(("127.0.0.1", listen)) as server:
        while True:
            client, _ = server.accept()
            threading.Thread(target=connection, args=(client,), daemon=True).start()


def measure_rtt(port: int, pings: int = 200) -> float:
    """Median milliseconds of a PING from a plain socket (the round trip every command pays)."""
    samples = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for _ in range(pings):
            started = time.perf_counter()
            sock.sendall(b"PING\r\n")
            sock.recv(64)
            samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def start_proxy(target: int, rtt_ms: float) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--proxy", f"{port}:{target}:{rtt_ms}"], stdin=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the latency proxy did not start") from None
            time.sleep(0.01)


# --- the parent: both modes, one table -------------------------------------------------------------------
def run_child(mode: str, port: int, count: int, rounds: int, rss_messages: int = 0) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        proc = subprocess.run(
            [sys.executable, __file__, "--mode", mode, "--port", str(port), "--count", str(count),
             "--rounds", str(rounds), "--child-json", out.name, "--rss-messages", str(rss_messages)],
            check=False,
        )  # fmt: skip
        if proc.returncode == 2:
            raise SystemExit(2)
        if proc.returncode != 0:
            raise SystemExit(f"--mode {mode} failed with status {proc.returncode}")
        result: dict[str, Any] = json.loads(Path(out.name).read_text())
        return result


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    cases = {}
    for case_id, _label, mode in CASES:
        rates = results[mode]["cases"][case_id]
        rate = statistics.median(rates)
        server = statistics.median(results[mode]["server_us"][case_id])
        cases[case_id] = {"msgs_per_s": rate, "us_per_msg": 1e6 / rate, "rounds": rates, "server_us": server}
    off_vs_batch = cases["runner_off"]["msgs_per_s"] / cases["bare_batch_ack"]["msgs_per_s"]
    off_vs_batch_py = cases["runner_off"]["msgs_per_s"] / cases["bare_batch_ack_py"]["msgs_per_s"]
    on_vs_seed = cases["runner_on"]["msgs_per_s"] / cases["seed_on"]["msgs_per_s"]
    on_deferred_vs_seed = cases["runner_on_deferred"]["msgs_per_s"] / cases["seed_on"]["msgs_per_s"]
    sampled_vs_batch = cases["runner_on_sampled"]["msgs_per_s"] / cases["bare_batch_ack"]["msgs_per_s"]
    sampled_vs_seed = cases["runner_on_sampled"]["msgs_per_s"] / cases["seed_on"]["msgs_per_s"]
    check = results["sdk10"]["trace_check"]
    checks = {
        "runner_off_vs_bare_batch": {
            "target": f">= {TARGET_OFF_VS_BARE_BATCH}x",
            "value": off_vs_batch,
            "passed": off_vs_batch >= TARGET_OFF_VS_BARE_BATCH,
        },
        "runner_off_vs_bare_batch_pure_python_parser": {
            "target": f">= {TARGET_OFF_VS_BARE_BATCH}x (the baseline as issue 11 measured it)",
            "value": off_vs_batch_py,
            "passed": off_vs_batch_py >= TARGET_OFF_VS_BARE_BATCH,
        },
        "runner_sampled_vs_bare_batch": {
            "target": f">= {TARGET_SAMPLED_VS_BARE_BATCH}x",
            "value": sampled_vs_batch,
            "passed": sampled_vs_batch >= TARGET_SAMPLED_VS_BARE_BATCH,
        },
        "runner_sampled_vs_seed_on": {
            "target": f">= {TARGET_ON_VS_SEED}x",
            "value": sampled_vs_seed,
            "passed": sampled_vs_seed >= TARGET_ON_VS_SEED,
        },
        "dead_letters_traced_at_10pct": {
            "target": "100% (of >= 1)",
            "value": check["traced"] / check["dead_lettered"] if check["dead_lettered"] else 0.0,
            "passed": check["dead_lettered"] > 0 and check["traced"] == check["dead_lettered"],
        },
        "runner_on_vs_seed_on": {
            "target": f">= {TARGET_ON_VS_SEED}x",
            "value": on_vs_seed,
            "passed": on_vs_seed >= TARGET_ON_VS_SEED,
        },
        "runner_on_deferred_vs_seed_on": {
            "target": f">= {TARGET_ON_VS_SEED}x",
            "value": on_deferred_vs_seed,
            "passed": on_deferred_vs_seed >= TARGET_ON_VS_SEED,
        },
    }
    return {
        "cases": cases,
        "checks": checks,
        "otel_profile": results["sdk"]["otel_profile"],
        "trace_check": check,
        "rss": results["nosdk"].get("rss"),
    }


def report(summary: dict[str, Any], count: int, rounds: int, rtt_ms: float) -> None:
    cases = summary["cases"]
    batch = cases["bare_batch_ack"]["msgs_per_s"]
    seed_on = cases["seed_on"]["msgs_per_s"]
    rows = []
    for case_id, label, _mode in CASES:
        rate = cases[case_id]["msgs_per_s"]
        rows.append([label, f"{rate:,.0f}", f"{cases[case_id]['us_per_msg']:.1f}",
                     f"{cases[case_id]['server_us']:.1f}", f"{rate / batch:.2f}x",
                     f"{rate / seed_on:.1f}x"])  # fmt: skip
    print_table(
        f"RedisStreamConsumer end to end ({count:,} msgs, median of {rounds} rounds, "
        f"PING round trip {rtt_ms:.3f} ms)",
        ["case", "msgs/s", "µs/msg", "Redis server µs/msg", "vs bare batched loop", "vs seed (tel. on)"],
        rows,
    )
    check = summary["trace_check"]
    print(
        f"trace check at {SAMPLED_RATIO:.0%} sampling: {check['traced']} of {check['dead_lettered']} "
        f"dead letters point at an exported span ({check['spans']} spans exported)"
    )
    rss = summary.get("rss")
    if rss:
        growth = rss["rss_end_kib"] - rss["rss_after_warmup_kib"]
        print(
            f"RSS over {rss['messages']:,} messages ({rss['messages'] / rss['seconds']:,.0f} msgs/s): "
            f"{rss['rss_after_warmup_kib'] / 1024:.1f} MiB after warm-up, {rss['rss_end_kib'] / 1024:.1f} MiB "
            f"at the end ({growth / 1024:+.1f} MiB); samples (msgs, MiB): "
            + ", ".join(f"{done // 1000}k:{kib / 1024:.1f}" for done, kib in rss["samples"])
        )
    for name, check in summary["checks"].items():
        verdict = "PASS" if check["passed"] else "FAIL"
        print(f"{verdict}  {name}: {check['value']:.2f}x (target {check['target']})")
    profile = summary["otel_profile"]
    print(
        f"OpenTelemetry share of the runner's CPU time (telemetry ON, cProfile own time): "
        f"{profile['share']:.1%} ({profile['otel_s']} s of {profile['total_s']} s)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_COUNT} messages, 1 round")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="round-trip time added by a TCP proxy (0: direct)"
    )
    parser.add_argument("--proxy", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--rss-messages",
        type=int,
        default=0,
        help="also run the runner over N messages sampling RSS (e.g. 500000)",
    )
    args = parser.parse_args(argv)
    if args.proxy is not None:
        listen, target, rtt_ms = args.proxy.split(":")
        serve_proxy(int(listen), int(target), float(rtt_ms))
        return 0
    if args.quick:
        args.count, args.rounds = QUICK_COUNT, 1
    if args.mode is not None:
        try:
            result = asyncio.run(run_mode(args.mode, args.port, args.count, args.rounds, args.rss_messages))
        except BenchmarkError as exc:
            print(f"benchmark error: {exc}", file=sys.stderr)
            return 2
        args.child_json.write_text(json.dumps(result))
        return 0
    load_before = load_average()
    with local_redis(prefix="bench-runner-") as port:
        proxy = None
        rtt_ms = measure_rtt(port)
        if args.latency_ms > 0:
            proxy, port = start_proxy(port, args.latency_ms)
            rtt_ms = measure_rtt(port)
        try:
            results = {
                mode: run_child(
                    mode, port, args.count, args.rounds, args.rss_messages if mode == "nosdk" else 0
                )
                for mode in MODES
            }
        finally:
            if proxy is not None:
                proxy.terminate()
                proxy.wait()
    summary = summarize(results)
    summary["latency_ms"] = args.latency_ms
    summary["measured_rtt_ms"] = rtt_ms
    summary["environment"] = environment(PACKAGES)
    summary["load_average"] = {"before": load_before, "after": load_average()}
    report(summary, args.count, args.rounds, rtt_ms)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    failed = [name for name, check in summary["checks"].items() if not check["passed"]]
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
