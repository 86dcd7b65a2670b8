"""``streamwarden consume --kafka-bootstrap ... --topic ...`` as a real process against the real broker:
every message handled once, dead letters in the Kafka DLQ topic or in Redis, commits that survive a
SIGTERM, and usage errors that are one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from _kafka_suite import HANDLERS, committed_offsets, produce
from aiokafka import AIOKafkaProducer
from click.testing import CliRunner

from _support import eventually
from streamwarden._cli import main
from streamwarden._kafka import KafkaDeadLetterStore

CLI = Path(sys.executable).parent / "streamwarden"


class Consumer:
    """One ``streamwarden consume`` process; the file its handler appends to."""

    def __init__(self, workdir: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.out = workdir / "effects.jsonl"
        self.stderr_path = workdir / "stderr.txt"
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMWARDEN_", "OTEL_"))}
        environment.update(env or {}, SW_TEST_OUT=str(self.out))
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [str(CLI), "consume", *args],
                cwd=workdir,
                env=environment,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def effects(self) -> list[dict[str, object]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines()]

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "kafka_cli_handlers.py").write_text(HANDLERS)
    return tmp_path


@pytest.fixture
def consumers() -> Iterator[list[Consumer]]:
    started: list[Consumer] = []
    yield started
    for consumer in started:
        consumer.kill()


async def test_consume_kafka_topic_with_kafka_dlq(
    workdir: Path,
    consumers: list[Consumer],
    bootstrap: str,
    make_topic: Callable[..., Awaitable[str]],
    group: str,
    producer: AIOKafkaProducer,
) -> None:
    """No Redis: the embedded dedup store, dead letters in {topic}.dlq; SIGTERM exits 0 after committing."""
    topic = await make_topic(2)
    await produce(producer, topic, 20, partitions=2)
    consumer = Consumer(
        workdir,
        [
            "--kafka-bootstrap", bootstrap, "--topic", topic, "--group", group,
            "--consumer-name", "cli-1", "--handler", "kafka_cli_handlers:handle",
            "--ordering", "partition", "--session-timeout-ms", "2000", "--block-ms", "100",
        ],
        {"STREAMWARDEN_MAX_RETRIES": "0"},
    )  # fmt: skip
    consumers.append(consumer)
    await eventually(lambda: len(consumer.effects()) == 19, timeout=30, what="19 handled")
    await eventually(
        lambda: _committed(bootstrap, group, topic, {0: 10, 1: 10}), timeout=30, what="committed"
    )
    assert consumer.terminate() == 0, consumer.stderr()
    assert sorted(e["n"] for e in consumer.effects()) == [n for n in range(20) if n != 3]
    err = consumer.stderr()
    assert "no --redis-url" in err
    assert "dead letters to kafka" in err
    async with KafkaDeadLetterStore(bootstrap) as store:
        [entry] = await store.list(topic)
    assert entry.message_id == "m3"


async def _committed(bootstrap: str, group: str, topic: str, wanted: dict[int, int]) -> bool:
    return await committed_offsets(bootstrap, group, topic, len(wanted)) == wanted


async def test_consume_kafka_topic_with_redis_stores(
    workdir: Path,
    consumers: list[Consumer],
    bootstrap: str,
    make_topic: Callable[..., Awaitable[str]],
    group: str,
    producer: AIOKafkaProducer,
    redis_url: str,
    redis_client: object,
) -> None:
    """With --redis-url the dedup records and dead letters are in Redis (the default --dlq then)."""
    topic = await make_topic(1)
    await produce(producer, topic, 6)
    consumer = Consumer(
        workdir,
        [
            "--kafka-bootstrap", bootstrap, "--topic", topic, "--group", group,
            "--handler", "kafka_cli_handlers:handle", "--session-timeout-ms", "2000", "--block-ms", "100",
        ],
        {"STREAMWARDEN_MAX_RETRIES": "0", "STREAMWARDEN_REDIS_URL": redis_url},
    )  # fmt: skip
    consumers.append(consumer)
    await eventually(lambda: _committed(bootstrap, group, topic, {0: 6}), timeout=30, what="committed")
    assert consumer.terminate() == 0, consumer.stderr()
    assert len(consumer.effects()) == 5
    assert "dead letters to redis" in consumer.stderr()
    from streamwarden._redis._dlq import RedisDeadLetterStore

    store = RedisDeadLetterStore(redis_client)
    [entry] = await store.list(topic)
    assert entry.message_id == "m3"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kafka-bootstrap", "127.0.0.1:9"], "--kafka-bootstrap needs --topic"),
        (["--kafka-bootstrap", "127.0.0.1:9", "--topic", "t", "--stream", "s"], "not both"),
        (["--kafka-bootstrap", "127.0.0.1:9", "--topic", "t", "--claim-idle-ms", "5"], "Redis streams only"),
        (["--stream", "s", "--ordering", "key"], "Kafka (--kafka-bootstrap) only"),
        (["--stream", "s", "--topic", "t"], "--topic needs --kafka-bootstrap"),
        (
            ["--kafka-bootstrap", "127.0.0.1:9", "--topic", "t", "--dlq", "redis"],
            "--dlq redis needs --redis-url",
        ),
        (["--stream", "s", "--retry-delays", "5"], "Kafka (--kafka-bootstrap) only"),
        (["--kafka-bootstrap", "127.0.0.1:9", "--topic", "t", "--retry-delays", "5,0"], "above 0"),
        (["--kafka-bootstrap", "127.0.0.1:9", "--topic", "t", "--retry-delays", "5,soon"], "not a number"),
        (
            ["--kafka-bootstrap", "127.0.0.1:9", "--topic", "t", "--retry-delays", ",".join("1" * 11)],
            "at most 10",
        ),
    ],
    ids=[
        "no-topic",
        "both",
        "redis-option",
        "kafka-option",
        "topic-alone",
        "dlq-redis-without-redis",
        "retry-delays-on-redis",
        "retry-delay-zero",
        "retry-delay-not-a-number",
        "too-many-retry-delays",
    ],
)
def test_usage_errors(args: list[str], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixing the two transports' options is a one-line usage error."""
    for name in list(os.environ):
        if name.startswith("STREAMWARDEN_"):
            monkeypatch.delenv(name)
    result = CliRunner().invoke(main, ["consume", "--group", "g", "--handler", "json:loads", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_the_demo_without_a_broker_is_one_error_line() -> None:
    """No broker listens: one ``error: cannot reach Kafka`` line and exit status 1, no traceback. (A
    ``consume`` process instead backs off and retries: a broker that is down may come back.)"""
    command = ["demo", "--kafka-bootstrap", "127.0.0.1:1"]
    done = subprocess.run(
        [sys.executable, "-c", "from streamwarden._cli import main; main()", *command],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("error: cannot reach Kafka"), errors
    assert "Traceback" not in done.stderr
