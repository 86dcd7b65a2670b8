"""Per-message cost of streamwarden's ReliabilityLayer next to a bare handler call and the telemetry floor.

Run from the repository root::

    .venv/bin/python benchmarks/bench_overhead.py            # 50_000 messages x 5 rounds per case
    .venv/bin/python benchmarks/bench_overhead.py --quick    # 2_000 messages: a smoke run, not a measurement

OpenTelemetry's global providers can be set only once per process, so the script runs itself twice as
a subprocess: ``--mode nosdk`` (no SDK provider installed: bare calls, the layer with telemetry
off, tenacity, pybreaker) and ``--mode sdk`` (the SDK installed globally as an application would:
its own bare baseline, the telemetry floor, the layer with telemetry on). The parent prints one table
and checks the two targets of issue 2:

(a) layer with telemetry ON   <= 1.3 x the telemetry floor (median per-message cost);
(b) layer with telemetry OFF  <= 5 µs per message above a bare ``await handler(msg)``.

The exit status is 0 whatever the numbers, unless ``--check`` is given (then 1 on a FAIL). A case that
does not do what it claims (a "unique" message that was not processed, a layer with telemetry on that
exported no span) stops the run with status 2: such a number would be meaningless.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import FunctionCase, environment, load_average, markdown_table, measure, print_table, summarize

DEFAULT_COUNT = 50_000
QUICK_COUNT = 2_000
DEFAULT_ROUNDS = 5
STORE_CAP = 50_000  # max_entries of the "dedup store full" case (the default store holds 1,000,000)
TARGET_ON_RATIO = 1.3  # (a) layer with telemetry on / telemetry floor
TARGET_OFF_ABOVE_BARE_US = 5.0  # (b) layer with telemetry off minus bare, µs per message

# (id, label, subprocess) in table order. The smoke test checks every id appears in the JSON.
CASES: tuple[tuple[str, str, str], ...] = (
    ("bare_nosdk", "bare `await handler(msg)` (no-SDK process)", "nosdk"),
    ("bare_sdk", "bare `await handler(msg)` (SDK process)", "sdk"),
    ("otel_floor", "telemetry floor: handler + 1 span + counter + histogram", "sdk"),
    ("layer_on", "layer, telemetry ON, new ids", "sdk"),
    ("layer_on_duplicate", "layer, telemetry ON, duplicate", "sdk"),
    ("layer_off", "layer, telemetry OFF, new ids", "nosdk"),
    ("layer_off_seed_api", "layer, telemetry OFF, new ids, process_message_reliably", "nosdk"),
    ("layer_off_no_timeout", "layer, telemetry OFF, new ids, processing_timeout=None", "nosdk"),
    ("layer_off_duplicate", "layer, telemetry OFF, duplicate", "nosdk"),
    ("layer_off_store_full", f"layer, telemetry OFF, new ids, dedup store full ({STORE_CAP:,} ids)", "nosdk"),
    ("tenacity", "tenacity AsyncRetrying around the handler (no retry)", "nosdk"),
    ("pybreaker", "pybreaker CircuitBreaker.calling() around a sync no-op", "nosdk"),
)
LABELS = {case_id: label for case_id, label, _ in CASES}
BARE_OF_MODE = {"nosdk": "bare_nosdk", "sdk": "bare_sdk"}

PACKAGES = ("streamwarden", "opentelemetry-api", "opentelemetry-sdk", "tenacity", "pybreaker", "rich")

# Attributes of the floor's span and metric records: what a hand-instrumented consumer would set.
SPAN_NAME = "process orders"
SPAN_ATTRS = {
    "messaging.system": "bench",
    "messaging.operation.type": "process",
    "messaging.destination.name": "orders",
}
METRIC_ATTRS = {
    "service.name": "bench",
    "messaging.system": "bench",
    "messaging.destination.name": "orders",
}

_batches = itertools.count()


class BenchmarkError(Exception):
    """A case did not do what it claims, or a subprocess failed: its numbers would mean nothing."""


async def handler(msg: dict[str, Any]) -> dict[str, Any]:
    """The message processor every case calls: async, returns a small dict, does nothing else."""
    return {"ok": True, "id": msg["id"]}


def noop(msg: dict[str, Any]) -> None:
    """The sync no-op pybreaker guards."""


def new_messages(count: int) -> list[dict[str, Any]]:
    """``count`` messages with ids never used before in this process."""
    batch = next(_batches)
    return [
        {"id": f"m{batch}-{i}", "data": {"symbol": "ACME", "side": "buy", "qty": 10}} for i in range(count)
    ]


# --- cases shared by both processes ----------------------------------------------------------------
def bare_case(case_id: str) -> FunctionCase:
    async def run(count: int) -> float:
        msgs = new_messages(count)
        call = handler
        started = time.perf_counter()
        for msg in msgs:
            await call(msg)
        return time.perf_counter() - started

    return FunctionCase(case_id, LABELS[case_id], run)


def layer_case(
    case_id: str,
    *,
    processing_timeout: float | None = 30.0,
    duplicate: bool = False,
    seed_api: bool = False,
    store_cap: int | None = None,
) -> FunctionCase:
    """The layer on the embedded stores (``redis_client=None``), default settings otherwise.

    ``store_cap`` gives the embedded dedup store that ``max_entries`` and fills it before the first
    run, so every new id evicts the oldest: the steady state of a long-running consumer (the default
    store reaches it after 1,000,000 ids, or when ids start expiring after ``deduplication_ttl``).
    """
    from streamwarden import InMemoryDedupStore, ReliabilityLayer, ReliabilitySettings

    store = InMemoryDedupStore(max_entries=store_cap) if store_cap else None
    layer = ReliabilityLayer(
        None, ReliabilitySettings(processing_timeout=processing_timeout), dedup_store=store
    )
    counts = layer.metrics_collector.counts
    expected = "messages_deduplicated" if duplicate else "messages_processed_successfully"
    the_duplicate = {"id": f"dup-{case_id}", "data": {"symbol": "ACME", "side": "buy", "qty": 10}}
    primed = filled = False

    async def run(count: int) -> float:
        nonlocal primed, filled
        if store is not None and store_cap and not filled:
            for i in range(store_cap):
                await store.mark_completed(f"fill-{i}", 3600.0)
            filled = True
        if duplicate:
            if not primed:  # processed once, a duplicate ever after
                await layer.process(the_duplicate, handler)
                primed = True
            msgs = [the_duplicate] * count
        else:
            msgs = new_messages(count)
        before = counts[expected]
        if seed_api:
            call = layer.process_message_reliably
            started = time.perf_counter()
            for msg in msgs:
                await call(msg, handler)
            elapsed = time.perf_counter() - started
        else:
            process = layer.process
            started = time.perf_counter()
            for msg in msgs:
                await process(msg, handler)
            elapsed = time.perf_counter() - started
        if counts[expected] - before != count:
            raise BenchmarkError(
                f"{case_id}: {counts[expected] - before} of {count} messages counted as {expected}"
            )
        return elapsed

    return FunctionCase(case_id, LABELS[case_id], run)


# --- no SDK: bare, layer with telemetry off, tenacity, pybreaker ---------------------------------------
def tenacity_case() -> FunctionCase:
    """``AsyncRetrying`` built per message (as ``@retry`` does per call), the layer's policy shape."""
    from tenacity import AsyncRetrying, stop_after_attempt, wait_random_exponential

    async def run(count: int) -> float:
        msgs = new_messages(count)
        started = time.perf_counter()
        for msg in msgs:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(4), wait=wait_random_exponential(multiplier=0.1, max=10), reraise=True
            ):
                with attempt:
                    await handler(msg)
        return time.perf_counter() - started

    return FunctionCase("tenacity", LABELS["tenacity"], run)


def pybreaker_case() -> FunctionCase:
    import pybreaker

    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)

    async def run(count: int) -> float:
        msgs = new_messages(count)
        started = time.perf_counter()
        for msg in msgs:
            with breaker.calling():
                noop(msg)
        return time.perf_counter() - started

    return FunctionCase("pybreaker", LABELS["pybreaker"], run)


def nosdk_cases() -> tuple[list[FunctionCase], dict[str, Any]]:
    cases = [
        bare_case("bare_nosdk"),
        layer_case("layer_off"),
        layer_case("layer_off_seed_api", seed_api=True),
        layer_case("layer_off_no_timeout", processing_timeout=None),
        layer_case("layer_off_duplicate", duplicate=True),
        layer_case("layer_off_store_full", store_cap=STORE_CAP),
        tenacity_case(),
        pybreaker_case(),
    ]
    return cases, {}


async def nosdk_check(sanity: dict[str, Any]) -> None:
    """No provider was installed, before or during the run (redis-py imports SDK modules: that is fine)."""
    from opentelemetry import metrics, trace

    sanity["tracer_provider"] = type(trace.get_tracer_provider()).__name__
    sanity["meter_provider"] = type(metrics.get_meter_provider()).__name__
    if (
        sanity["tracer_provider"] != "ProxyTracerProvider"
        or sanity["meter_provider"] != "_ProxyMeterProvider"
    ):
        raise BenchmarkError(
            f"nosdk mode: an OpenTelemetry provider is installed ({sanity}); telemetry is not off"
        )


# --- SDK: bare, telemetry floor, layer with telemetry on -----------------------------------------------
class _Sdk:
    """Global SDK providers as an application sets them up, exporting to exporters that only count."""

    def __init__(self) -> None:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import (
            HistogramDataPoint,
            MetricExporter,
            MetricExportResult,
            MetricsData,
            PeriodicExportingMetricReader,
        )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

        spans_by_scope: dict[str, int] = {}
        histogram_counts: dict[str, int] = {}

        class CountingSpanExporter(SpanExporter):
            def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                for span in spans:
                    scope = span.instrumentation_scope.name if span.instrumentation_scope else "?"
                    spans_by_scope[scope] = spans_by_scope.get(scope, 0) + 1
                return SpanExportResult.SUCCESS

        class CountingMetricExporter(MetricExporter):
            def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> Any:
                for resource_metrics in metrics_data.resource_metrics:
                    for scope_metrics in resource_metrics.scope_metrics:
                        for metric in scope_metrics.metrics:
                            for point in metric.data.data_points:
                                if isinstance(point, HistogramDataPoint):
                                    histogram_counts[metric.name] = point.count + histogram_counts.get(
                                        metric.name, 0
                                    )
                return MetricExportResult.SUCCESS

            def force_flush(self, timeout_millis: float = 10_000) -> bool:
                return True

            def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
                pass

        resource = Resource.create({"service.name": "streamwarden-bench"})
        self.tracer_provider = TracerProvider(resource=resource)
        self.tracer_provider.add_span_processor(BatchSpanProcessor(CountingSpanExporter()))
        # A real app exports every 10-60 s; an hour keeps collections out of the timed loops.
        reader = PeriodicExportingMetricReader(CountingMetricExporter(), export_interval_millis=3_600_000)
        self.meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        trace.set_tracer_provider(self.tracer_provider)
        metrics.set_meter_provider(self.meter_provider)
        self.spans_by_scope = spans_by_scope
        self.histogram_counts = histogram_counts

    def flush(self) -> dict[str, Any]:
        """Export everything recorded so far; what the exporters saw (cumulative metrics)."""
        self.histogram_counts.clear()
        self.tracer_provider.force_flush()
        self.meter_provider.force_flush()
        return {"spans_by_scope": dict(self.spans_by_scope), "histogram_counts": dict(self.histogram_counts)}


def floor_case() -> FunctionCase:
    """One CONSUMER span as the current span, one counter add, one histogram record, around the handler."""
    from opentelemetry import metrics, trace
    from opentelemetry.trace import SpanKind

    tracer = trace.get_tracer("bench")
    meter = metrics.get_meter("bench")
    counter = meter.create_counter("bench.messages", unit="{message}")
    histogram = meter.create_histogram("bench.process.duration", unit="s")

    async def run(count: int) -> float:
        msgs = new_messages(count)
        start_span = tracer.start_as_current_span
        consumer = SpanKind.CONSUMER
        started = time.perf_counter()
        for msg in msgs:
            t0 = time.perf_counter()
            with start_span(
                SPAN_NAME, kind=consumer, attributes={**SPAN_ATTRS, "messaging.message.id": msg["id"]}
            ):
                await handler(msg)
                counter.add(1, METRIC_ATTRS)
                histogram.record(time.perf_counter() - t0, METRIC_ATTRS)
        return time.perf_counter() - started

    return FunctionCase("otel_floor", LABELS["otel_floor"], run)


def sdk_cases() -> tuple[list[FunctionCase], dict[str, Any]]:
    sdk = _Sdk()  # before any tracer or layer exists, as an application does at start-up
    cases = [
        bare_case("bare_sdk"),
        floor_case(),
        layer_case("layer_on"),
        layer_case("layer_on_duplicate", duplicate=True),
    ]
    return cases, {"sdk": sdk}


async def sdk_check(sanity: dict[str, Any]) -> None:
    sdk: _Sdk = sanity.pop("sdk")
    seen = sdk.flush()
    sanity.update(seen)
    for scope in ("bench", "streamwarden"):
        if not seen["spans_by_scope"].get(scope):
            raise BenchmarkError(
                f"sdk mode: no span from {scope!r} reached the exporter; telemetry is not on"
            )
    for metric in ("bench.process.duration", "messaging.process.duration"):
        if not seen["histogram_counts"].get(metric):
            raise BenchmarkError(f"sdk mode: no {metric!r} histogram point was exported; telemetry is not on")


# --- one subprocess -------------------------------------------------------------------------------------
def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        if mode == "sdk":
            cases, sanity = sdk_cases()
        else:
            cases, sanity = nosdk_cases()
        warmup = min(args.count, 5_000)
        rounds = await measure(
            cases,
            count=args.count,
            rounds=args.rounds,
            warmup=warmup,
            gc_off_too=args.gc_off,
            tag=f"[{mode}] ",
        )
        if mode == "sdk":
            per_case = warmup + args.count * args.rounds * (2 if args.gc_off else 1)
            # the floor's spans; the layer's two cases, plus the duplicate case's first message
            sanity["spans_expected"] = {"bench": per_case, "streamwarden": 2 * per_case + 1}
        await (sdk_check if mode == "sdk" else nosdk_check)(sanity)
        return {"mode": mode, "rounds_us": rounds, "sanity": sanity}

    return asyncio.run(main())


def run_child(mode: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out = workdir / f"{mode}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--mode", mode, "--result-file", str(out)]
    command += ["-n", str(args.count), "--rounds", str(args.rounds)] + (["--gc-off"] if args.gc_off else [])
    # The numbers must not depend on the caller's OTEL_* / STREAMWARDEN_* settings (sampler, BSP sizes...).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "STREAMWARDEN_"))}
    proc = subprocess.run(command, env=env, check=False)
    if proc.returncode != 0:
        raise BenchmarkError(f"the {mode} subprocess failed with exit status {proc.returncode}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


# --- combining and reporting ----------------------------------------------------------------------------
def combine(children: Sequence[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    samples: dict[str, dict[str, list[float]]] = {}
    mode_of: dict[str, str] = {}
    for child in children:
        for case_id, per_gc in child["rounds_us"].items():
            samples[case_id] = per_gc
            mode_of[case_id] = child["mode"]
    stats = {case_id: summarize(per_gc["gc_on"]) for case_id, per_gc in samples.items()}
    floor = stats["otel_floor"]["median"]
    cases: dict[str, Any] = {}
    for case_id, label, _ in CASES:
        mode = mode_of[case_id]
        bare = stats[BARE_OF_MODE[mode]]["median"]
        entry: dict[str, Any] = {
            "label": label,
            "process": mode,
            "median_us": stats[case_id]["median"],
            "min_us": stats[case_id]["min"],
            "above_bare_us": stats[case_id]["median"] - bare,
            "ratio_to_floor": stats[case_id]["median"] / floor,
            "rounds_us": samples[case_id]["gc_on"],
        }
        if samples[case_id]["gc_off"]:
            entry["gc_off_median_us"] = summarize(samples[case_id]["gc_off"])["median"]
            entry["gc_off_rounds_us"] = samples[case_id]["gc_off"]
        cases[case_id] = entry
    on_ratio = cases["layer_on"]["median_us"] / floor
    off_above = cases["layer_off"]["median_us"] - cases["bare_nosdk"]["median_us"]
    checks = {
        "telemetry_on_vs_floor": {
            "description": "layer with telemetry ON <= 1.3x the telemetry floor (medians)",
            "value": on_ratio,
            "limit": TARGET_ON_RATIO,
            "layer_us": cases["layer_on"]["median_us"],
            "floor_us": floor,
            "passed": on_ratio <= TARGET_ON_RATIO,
        },
        "telemetry_off_above_bare": {
            "description": "layer with telemetry OFF <= 5 µs per message above bare (medians)",
            "value": off_above,
            "limit": TARGET_OFF_ABOVE_BARE_US,
            "layer_us": cases["layer_off"]["median_us"],
            "bare_us": cases["bare_nosdk"]["median_us"],
            "passed": off_above <= TARGET_OFF_ABOVE_BARE_US,
        },
    }
    sanity = {child["mode"]: child["sanity"] for child in children}
    meta = environment(PACKAGES) | {"messages_per_round": args.count, "rounds": args.rounds, "gc": "enabled"}
    return {"meta": meta, "cases": cases, "checks": checks, "sanity": sanity}


def table_rows(results: dict[str, Any], gc_off: bool) -> tuple[list[str], list[list[str]]]:
    headers = ["case", "µs/msg median", "min", "above bare µs", "x floor"]
    if gc_off:
        headers.append("median, gc off")
    rows = []
    for case in results["cases"].values():
        row = [
            case["label"],
            f"{case['median_us']:.2f}",
            f"{case['min_us']:.2f}",
            f"{case['above_bare_us']:+.2f}",
            f"{case['ratio_to_floor']:.2f}",
        ]
        if gc_off:
            row.append(f"{case['gc_off_median_us']:.2f}")
        rows.append(row)
    return headers, rows


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    meta = results["meta"]
    print(
        f"streamwarden overhead: {meta['messages_per_round']:,} messages x {meta['rounds']} rounds per case, "
        f"gc enabled; Python {meta['python']}, {meta['cpus']} CPUs, {meta['date']}, source {meta['source']}"
    )
    title = "per-message cost (µs), median and min of the rounds"
    headers, rows = table_rows(results, args.gc_off)
    print_table(title, headers, rows)
    if args.markdown:
        print()
        print(markdown_table(headers, rows))
    on = results["checks"]["telemetry_on_vs_floor"]
    off = results["checks"]["telemetry_off_above_bare"]
    print()
    print(
        f"(a) {'PASS' if on['passed'] else 'FAIL'}: layer with telemetry ON {on['layer_us']:.2f} µs = "
        f"{on['value']:.2f}x the telemetry floor {on['floor_us']:.2f} µs (target <= {on['limit']:.2f}x)"
    )
    print(
        f"(b) {'PASS' if off['passed'] else 'FAIL'}: layer with telemetry OFF {off['layer_us']:.2f} µs = "
        f"{off['value']:+.2f} µs above bare {off['bare_us']:.2f} µs (target <= {off['limit']:.1f} µs)"
    )
    sdk = results["sanity"]["sdk"]
    exported = ", ".join(
        f"{scope} {sdk['spans_by_scope'].get(scope, 0):,}/{expected:,}"
        for scope, expected in sdk["spans_expected"].items()
    )
    print(f"spans exported/started, by scope: {exported} (a full BatchSpanProcessor queue drops the rest)")
    load = meta["load_average_1m"]
    if load["before"] is not None:
        print(
            f"load average (1 min) before/after: {load['before']:.2f}/{load['after']:.2f} on {meta['cpus']} CPUs"
            " (other work on the machine inflates the medians; min is the least disturbed figure)"
        )
    if args.quick:
        print("--quick: a smoke run; the numbers are not a measurement")


def source_revision() -> str:
    """The git commit the numbers belong to, ``+dirty`` when ``src/`` has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", "--count", type=int, default=DEFAULT_COUNT, help="messages per round and case")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="timed rounds per case")
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_COUNT:,} messages per round (smoke test)"
    )
    parser.add_argument("--gc-off", action="store_true", help="also time every case with gc disabled")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--mode", choices=("sdk", "nosdk"), help=argparse.SUPPRESS)  # internal
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    if args.quick:
        args.count = QUICK_COUNT
    if args.count < 1 or args.rounds < 1:
        parser.error("--count and --rounds must be at least 1")
    if args.mode and not args.result_file:
        parser.error("--mode needs --result-file")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except BenchmarkError as error:
        print(f"benchmark error: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.mode:
        args.result_file.write_text(json.dumps(run_mode(args.mode, args)))
        return 0
    started = time.perf_counter()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="streamwarden-bench-") as tmp:
        # One after the other: on a small machine two benchmark processes would time each other.
        children = [run_child(mode, args, Path(tmp)) for mode in ("nosdk", "sdk")]
    results = combine(children, args)
    results["meta"]["wall_seconds"] = time.perf_counter() - started
    results["meta"]["load_average_1m"] = {"before": load_before, "after": load_average()}
    results["meta"]["source"] = source_revision()
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    failed = [name for name, check in results["checks"].items() if not check["passed"]]
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
