"""``streamwarden demo --redis-url``: the demo's workload through runners on a real stream."""

from __future__ import annotations

import json

from click.testing import CliRunner

import redis
from _redis_server import RedisServer
from streamwarden._cli import main
from streamwarden._demo import DEMO_STREAM


def _run_demo(url: str) -> dict[str, object]:
    result = CliRunner().invoke(
        main, ["demo", "--redis-url", url, "--messages", "600", "--rate", "3000", "--json"]
    )
    assert result.exit_code == 0, result.output
    report: dict[str, object] = json.loads(result.stdout)
    return report


def test_redis_demo_reconciles(redis_server_per_test: RedisServer) -> None:
    """Three runners on one group: every signal once or dead-lettered, every entry acknowledged, stream removed."""
    report = _run_demo(redis_server_per_test.url)
    assert report["reconciled"] is True, report["problems"]
    assert report["unique_ids"] == 600
    outcomes = report["outcomes"]
    assert isinstance(outcomes, dict)
    assert outcomes["processed"] > 500
    assert outcomes.get("duplicate", 0) > 0
    acked = outcomes["processed"] + outcomes.get("duplicate", 0) + outcomes.get("dead_lettered", 0)
    assert acked == report["produced"]
    client = redis.Redis.from_url(redis_server_per_test.url)
    try:
        assert not client.exists(DEMO_STREAM)
    finally:
        client.close()


def test_redis_demo_runs_twice_and_touches_only_its_own_keys(redis_server_per_test: RedisServer) -> None:
    """A second run right after the first starts from a clean slate of its own keys and reconciles
    too, with the same dead letters; keys of other applications and destinations are untouched."""
    client = redis.Redis.from_url(redis_server_per_test.url)
    try:
        others = {
            b"other-app:key": b"keep me",
            b"streamwarden:dedup:orders:0123": None,  # another scope's dedup record
            b"streamwarden:dlq:orders": None,  # another destination's dead letters
            b"streamwarden:metrics:billing": None,  # another service's counters
        }
        client.set(b"other-app:key", b"keep me")
        client.hset(b"streamwarden:dedup:orders:0123", "s", "c")
        client.xadd(b"streamwarden:dlq:orders", {"error_type": "ValueError"})
        client.hset(b"streamwarden:metrics:billing", "total_messages", 7)
        before = {key: client.dump(key) for key in others}

        first = _run_demo(redis_server_per_test.url)
        second = _run_demo(redis_server_per_test.url)

        for report in (first, second):
            assert report["reconciled"] is True, report["problems"]
        assert first["dlq_reasons"] == second["dlq_reasons"]  # dead letters of the last run only
        # the fleet counters restarted from zero: the second run's total is not added to the first's
        totals = [report["metrics"]["total_messages"] for report in (first, second)]  # type: ignore[index]
        assert second["produced"] <= totals[1] < totals[0] + second["produced"]  # type: ignore[operator]
        assert {key: client.dump(key) for key in others} == before
        dead_letter_streams = sorted(client.scan_iter(match="streamwarden:dlq:*"))
        assert dead_letter_streams == [b"streamwarden:dlq:orders", f"streamwarden:dlq:{DEMO_STREAM}".encode()]
        assert client.xlen(f"streamwarden:dlq:{DEMO_STREAM}") == sum(second["dlq_reasons"].values())  # type: ignore[union-attr]
    finally:
        client.close()


def test_redis_demo_links_every_consumer_span_to_its_producer(redis_server_per_test: RedisServer) -> None:
    """``demo --redis-url`` with OTLP on: the producer writes a ``send`` span and its traceparent with
    each entry, and the consumers' process spans link to them (0 of 4,464 were linked before); the report
    names the trace of every dead letter, and that trace was exported."""
    import os
    import subprocess
    import sys

    from _support import OtlpTraceReceiver

    with OtlpTraceReceiver() as receiver:
        env = {
            **os.environ,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }
        done = subprocess.run(
            [sys.executable, "-c", "from streamwarden._cli import main; main()", "demo", "--redis-url",
             redis_server_per_test.url, "--messages", "300", "--rate", "3000", "--json"],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["reconciled"] is True, report["problems"]
    sends = {span.span_id for span in receiver.named(f"send {DEMO_STREAM}")}
    processes = receiver.named(f"process {DEMO_STREAM}")
    assert len(sends) >= report["produced"]
    linked = [p for p in processes if any(link.span_id in sends for link in p.links)]
    assert processes
    assert len(linked) == len(processes)
    exported_traces = {span.trace_id.hex() for span in receiver.spans}
    dead = report["dead_letters"]
    assert dead
    assert all(line["trace_id"] in exported_traces for line in dead), dead
