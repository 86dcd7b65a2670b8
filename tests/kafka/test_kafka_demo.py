"""``streamwarden demo --kafka-bootstrap`` as a real process against the real broker (Tansu) and a real
redis-server: the workload reconciles (every signal executed once or dead-lettered, every re-send
counted), the dead letters are where the report says, a second run starts from a clean slate, and
options of other modes are one-line usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from click.testing import CliRunner

from streamwarden._cli import main
from streamwarden._kafka import KafkaDeadLetterStore
from streamwarden._redis._dlq import RedisDeadLetterStore

CLI = Path(sys.executable).parent / "streamwarden"
MESSAGES = 200


def run_demo(*args: str) -> dict[str, Any]:
    """One ``streamwarden demo ... --json`` process (bounded); its report, after checking it exited 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMWARDEN_", "OTEL_"))}
    done = subprocess.run(
        [str(CLI), "demo", "--messages", str(MESSAGES), "--rate", "150", "--json", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def check_ledger(report: dict[str, Any]) -> None:
    """The report's own numbers add up: each produced record acknowledged once, nothing lost."""
    assert report["reconciled"], report["problems"]
    assert report["problems"] == []
    outcomes = report["outcomes"]
    assert report["unique_ids"] == MESSAGES
    assert report["produced"] == report["unique_ids"] + report["resent"]
    acked = outcomes.get("processed", 0) + outcomes.get("duplicate", 0) + outcomes.get("dead_lettered", 0)
    assert acked == report["produced"]
    # every signal ran once (re-sends never ran the handler), or was dead-lettered
    assert outcomes.get("processed", 0) + outcomes.get("dead_lettered", 0) == report["unique_ids"]
    assert outcomes.get("duplicate", 0) == report["resent"]
    assert report["executed"] == outcomes["processed"]
    assert outcomes["dead_lettered"] == len(report["dead_letters"]) == sum(report["dlq_reasons"].values())
    assert outcomes["dead_lettered"] > 0  # the workload's poison signals
    assert report["metrics"]["messages_processed_successfully"] == outcomes["processed"]
    assert report["metrics"]["messages_dead_lettered"] == outcomes["dead_lettered"]
    # the outage (while the producer writes signals 30-45 %, 0.2 s at 150/s) opened the breaker ...
    assert "closed->open" in report["breaker_transitions"]
    assert outcomes.get("deferred", 0) > 0
    assert report["breaker_transitions"][-1].endswith("->closed")  # ... and it closed again


async def test_kafka_demo_with_redis_reconciles(bootstrap: str, redis_url: str) -> None:
    """Three members of one group on a 3-partition topic, Redis sharing dedup, DLQ and counters: the run
    reconciles, and the Redis DLQ of the topic holds exactly the dead letters the report lists."""
    topic = f"demo-{uuid.uuid4().hex[:8]}"
    report = run_demo("--kafka-bootstrap", bootstrap, "--redis-url", redis_url, "--topic", topic)
    check_ledger(report)
    client = redis.Redis.from_url(redis_url)
    try:
        entries = await RedisDeadLetterStore(client).list(topic, limit=1000)
    finally:
        await client.aclose()
    assert len(entries) == len(report["dead_letters"])
    assert {e.entry_id for e in entries} == {d["entry_id"] for d in report["dead_letters"]}
    assert {e.reason for e in entries} == set(report["dlq_reasons"])


async def test_kafka_demo_embedded_twice_dead_letters_in_the_dlq_topic(bootstrap: str) -> None:
    """Without Redis one member on the embedded stores, dead letters in ``{topic}.dlq``. A second run on
    the same topic reads none of the first run's records and purges its dead letters first: the same
    numbers again, and the DLQ topic holds the second run's entries only."""
    topic = f"demo-{uuid.uuid4().hex[:8]}"
    first = run_demo("--kafka-bootstrap", bootstrap, "--topic", topic)
    check_ledger(first)
    second = run_demo("--kafka-bootstrap", bootstrap, "--topic", topic)
    check_ledger(second)
    for name in ("produced", "unique_ids", "resent", "dlq_reasons"):  # the workload is seeded
        assert second[name] == first[name], name
    assert second["outcomes"]["dead_lettered"] == first["outcomes"]["dead_lettered"]
    async with KafkaDeadLetterStore(bootstrap) as dlq:
        entries = await dlq.list(topic, limit=1000)
    assert len(entries) == len(second["dead_letters"])
    assert {e.entry_id for e in entries} == {d["entry_id"] for d in second["dead_letters"]}
    assert {e.message_id for e in entries} == {d["message_id"] for d in first["dead_letters"]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--topic", "t"], "--topic only applies with --kafka-bootstrap"),
        (
            ["--kafka-bootstrap", "127.0.0.1:9", "--live"],
            "--live runs on the embedded stores only, not with --kafka-bootstrap",
        ),
        (
            ["--kafka-bootstrap", "127.0.0.1:9", "--control-port", "8123"],
            "--control-port runs on the embedded stores only, not with --kafka-bootstrap",
        ),
        (
            ["--kafka-bootstrap", "127.0.0.1:9", "--consumers", "2"],
            "--consumers only applies with --redis-url",
        ),
        (["--kafka-bootstrap", " "], "must not be empty"),
    ],
    ids=["topic-alone", "live", "control-port", "consumers-without-redis", "blank-bootstrap"],
)
def test_usage_errors(args: list[str], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Options the Kafka demo would ignore are one-line usage errors, before anything connects."""
    for name in list(os.environ):
        if name.startswith("STREAMWARDEN_"):
            monkeypatch.delenv(name)
    result = CliRunner().invoke(main, ["demo", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
