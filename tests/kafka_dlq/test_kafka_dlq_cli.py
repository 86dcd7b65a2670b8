"""``streamwarden dlq list|count|show|replay|purge --kafka-bootstrap ...`` against a real broker (a clean
one for this module, so "every DLQ topic" means this module's) and a real Redis for the replay's dedup
records: the main path as real processes, the refusals through click's runner (in-process, faster)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _kafka_dlq_support import FAST, entry
from click.testing import CliRunner, Result

from _kafka_broker import KafkaBroker
from streamwarden._cli import main
from streamwarden._kafka import KafkaDeadLetterStore

CLI = Path(sys.executable).parent / "streamwarden"
HANDLERS = """
import json
import os
from pathlib import Path


async def ok(message):
    with Path(os.environ["SW_TEST_OUT"]).open("a") as out:
        out.write(json.dumps(getattr(message, "payload", message)) + "\\n")
"""


@pytest.fixture(scope="module")
def cli_broker() -> Iterator[KafkaBroker]:
    """A broker of this module's own: destination-less commands see only its topics."""
    with KafkaBroker() as broker:
        yield broker


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """One ``streamwarden`` process (no inherited STREAMWARDEN_* settings), bounded in time."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMWARDEN_", "OTEL_"))}
    environment.update(NO_COLOR="1", COLUMNS="200", SW_TEST_OUT=str(cwd / "effects.jsonl"), **(env or {}))
    return subprocess.run(
        [str(CLI), *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=60, check=False
    )


async def invoke(*args: str) -> Result:
    """The CLI in-process (in a worker thread: it runs its own event loop)."""
    return await asyncio.to_thread(CliRunner().invoke, main, list(args), env={"COLUMNS": "200"})


async def test_list_count_show_replay_purge(cli_broker: KafkaBroker, redis_url: str, tmp_path: Path) -> None:
    """The dlq commands read the Kafka DLQ topics; replay runs each entry once, a second replay none."""
    (tmp_path / "handlers.py").write_text(HANDLERS)
    async with KafkaDeadLetterStore(cli_broker.bootstrap, **FAST) as store:
        first = await store.add(entry("orders", message_id="m-1", payload={"id": "m-1"}))
        await store.add(entry("orders", message_id="m-2", payload={"id": "m-2"}, error_type="KeyError"))
        await store.add(entry("payments", message_id="p-1"))
    bootstrap = ["--kafka-bootstrap", cli_broker.bootstrap]

    listed = run(["dlq", "list", *bootstrap, "--json"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["message_id"] for r in rows] == ["m-1", "m-2", "p-1"]
    keys = await invoke("dlq", "list", *bootstrap, "--topic", "orders", "--error-type", "KeyError", "--json")
    assert [json.loads(line)["message_id"] for line in keys.output.splitlines()] == ["m-2"]
    table = await invoke("dlq", "list", *bootstrap)
    assert "orders.dlq/0/0" in table.output

    counted = run(
        ["dlq", "count", "--json"], tmp_path, {"STREAMWARDEN_KAFKA_BOOTSTRAP": cli_broker.bootstrap}
    )
    assert counted.returncode == 0, counted.stderr
    assert json.loads(counted.stdout) == {"destinations": {"orders": 2, "payments": 1}, "total": 3}
    typo = await invoke("dlq", "count", *bootstrap, "-d", "order")
    assert typo.exit_code == 1
    assert "no dead-letter queue for destination 'order'" in typo.output

    shown = run(["dlq", "show", first, *bootstrap, "--json"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert (data["entry_id"], data["message_id"], data["consumer_group"]) == (first, "m-1", "billing")
    assert data["trace_url"] is not None
    text = await invoke("dlq", "show", first, *bootstrap)
    assert f"entry id: {first}" in text.output
    assert "traceback:" in text.output
    missing = await invoke("dlq", "show", "orders.dlq/0/99", *bootstrap)
    assert missing.exit_code == 1
    assert "no dead letter" in missing.output
    malformed = await invoke("dlq", "show", "orders/1-0", *bootstrap)
    assert malformed.exit_code == 2
    assert "TOPIC/PARTITION/OFFSET" in malformed.output

    replay = [
        "dlq",
        "replay",
        *bootstrap,
        "--topic",
        "orders",
        "--handler",
        "handlers:ok",
        "--redis-url",
        redis_url,
    ]
    replayed = run([*replay, "--json", "--rate", "0"], tmp_path)
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["counts"]["processed"] == 2
    effects = (tmp_path / "effects.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in effects) == ["m-1", "m-2"]
    again = run([*replay, "--json"], tmp_path)  # another process: the markers say both are done
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["items"] == []
    assert len((tmp_path / "effects.jsonl").read_text().splitlines()) == 2

    after = await invoke("dlq", "count", *bootstrap, "--json")
    assert json.loads(after.output) == {"destinations": {"payments": 1}, "total": 1}
    one_topic = await invoke("dlq", "list", *bootstrap, "--dlq-topic", "payments.dlq", "--json")
    assert [json.loads(line)["message_id"] for line in one_topic.output.splitlines()] == ["p-1"]
    purged = await invoke("dlq", "purge", *bootstrap, "--yes")
    assert purged.exit_code == 0, purged.output
    assert "purged 1 dead letter(s)" in purged.output
    empty = await invoke("dlq", "count", *bootstrap, "--json")
    assert json.loads(empty.output)["total"] == 0


def test_an_unreachable_broker_is_one_error_line(tmp_path: Path) -> None:
    """Nothing listens at --kafka-bootstrap: exit 1 and a single ``error:`` line, no aiokafka log noise."""
    broker = KafkaBroker()  # never started: its port is free
    try:
        failed = run(["dlq", "count", "--kafka-bootstrap", broker.bootstrap], tmp_path)
    finally:
        broker.close()
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1, failed.stderr
    assert lines[0].startswith("error: reading the Kafka dead-letter queue failed")


async def test_dlq_topic_needs_kafka_bootstrap() -> None:
    """--dlq-topic without --kafka-bootstrap is a usage error (exit 2), not a silent Redis read; a
    --dlq-topic that is no topic name is refused before anything connects."""
    failed = await invoke("dlq", "list", "--dlq-topic", "orders.dlq")
    assert failed.exit_code == 2
    assert "--dlq-topic needs --kafka-bootstrap" in failed.output
    bad = await invoke("dlq", "list", "--kafka-bootstrap", "127.0.0.1:1", "--dlq-topic", "a/b")
    assert bad.exit_code == 2
    assert "not a Kafka topic name" in bad.output


def test_without_aiokafka_only_the_kafka_path_needs_it(tmp_path: Path) -> None:
    """aiokafka is optional: ``import streamwarden`` and the CLI load without it, and --kafka-bootstrap
    says what to install (one line, exit 1)."""
    code = (
        "import sys\n"
        "sys.modules['aiokafka'] = None  # as if not installed: importing it raises ImportError\n"
        "import streamwarden\n"
        "from streamwarden._cli import main\n"
        "main(['dlq', 'list', '--kafka-bootstrap', '127.0.0.1:1'])\n"
    )
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMWARDEN_", "OTEL_"))}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "pip install 'streamwarden[kafka]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
