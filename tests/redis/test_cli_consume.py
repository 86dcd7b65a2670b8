"""``streamwarden consume`` as a real process against a real redis-server: the shared connection options
and their environment variables, INFO logs of what the layer decides, secrets kept out of every line,
and failures that are one line."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from click.testing import CliRunner

from _support import eventually
from streamwarden._cli import main
from streamwarden._redis._dlq import RedisDeadLetterStore
from streamwarden._runners import StreamProducer

CLI = Path(sys.executable).parent / "streamwarden"
PASSWORD = "Zq@7/xK#Rw?:Lp%zΩé@Nv8"  # '@', '/', '#', '?', ':', '%', unicode
HANDLERS = """
import json
import os
from pathlib import Path

OUT = Path(os.environ["SW_TEST_OUT"])


async def handle(message):
    payload = getattr(message, "payload", message)
    if payload.get("bad"):
        raise ValueError("bad order")
    with OUT.open("a") as out:
        out.write(json.dumps(payload) + "\\n")
"""


def pieces(secret: str, size: int = 4) -> list[str]:
    """Every substring of ``secret`` of ``size`` or more characters."""
    return [secret[i:j] for i in range(len(secret)) for j in range(i + size, len(secret) + 1)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Consumer:
    """One ``streamwarden consume`` process, its stderr and the file its handler appends to."""

    def __init__(self, workdir: Path, args: list[str], env: dict[str, str]) -> None:
        self.out = workdir / "effects.jsonl"
        self.stderr_path = workdir / "stderr.txt"
        self.stdout_path = workdir / "stdout.txt"
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMWARDEN_", "OTEL_"))}
        environment.update(env, SW_TEST_OUT=str(self.out))
        with self.stderr_path.open("wb") as err, self.stdout_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(CLI), "consume", *args], cwd=workdir, env=environment, stdout=out, stderr=err
            )

    def effects(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines()]

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def terminate(self) -> int:
        """SIGTERM and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A project directory holding the handler module ``cli_consume_handlers``."""
    (tmp_path / "cli_consume_handlers.py").write_text(HANDLERS)
    return tmp_path


@pytest.fixture
def consumers() -> Iterator[list[Consumer]]:
    """Consumers started by the test; killed if still running at the end."""
    started: list[Consumer] = []
    yield started
    for consumer in started:
        consumer.kill()


@pytest.fixture
async def acl_user(redis_client: redis.asyncio.Redis) -> str:
    """ACL user ``consumer`` with :data:`PASSWORD` on the session server (emptied first)."""
    await redis_client.execute_command(
        "ACL", "SETUSER", "consumer", "reset", "on", f">{PASSWORD}", "~*", "&*", "+@all"
    )
    return "consumer"


async def test_consume_with_env_credentials_logs_decisions_and_stops_cleanly(
    redis_client: redis.asyncio.Redis,
    redis_url: str,
    acl_user: str,
    workdir: Path,
    consumers: list[Consumer],
) -> None:
    """Credentials and key prefix from STREAMWARDEN_* variables; good messages run once, a bad one is
    dead-lettered under the prefix and logged at INFO; /healthz answers; SIGTERM stops it with exit 0."""
    health_port = _free_port()
    env = {
        "STREAMWARDEN_REDIS_URL": redis_url,
        "STREAMWARDEN_REDIS_USERNAME": acl_user,
        "STREAMWARDEN_REDIS_PASSWORD": PASSWORD,
        "STREAMWARDEN_KEY_PREFIX": "cliconsume",
        "STREAMWARDEN_MAX_RETRIES": "0",
    }
    args = [
        "--stream", "orders", "--group", "billing", "--consumer", "c1",
        "--handler", "cli_consume_handlers:handle", "--block-ms", "50", "--health-port", str(health_port),
    ]  # fmt: skip
    consumer = Consumer(workdir, args, env)
    consumers.append(consumer)
    producer = StreamProducer(redis_client, "orders")
    for i in range(3):
        await producer.send({"id": f"o-{i}"}, message_id=f"o-{i}")
    await producer.send({"id": "o-bad", "bad": True}, message_id="o-bad")
    store = RedisDeadLetterStore(redis_client, key_prefix="cliconsume")

    async def done() -> bool:
        assert consumer.proc.poll() is None, consumer.stderr()
        return len(consumer.effects()) == 3 and await store.count("orders") == 1

    await eventually(done, timeout=30)
    healthz = await asyncio.to_thread(
        urllib.request.urlopen, f"http://127.0.0.1:{health_port}/healthz", None, 5
    )
    assert healthz.status == 200
    healthz.close()
    assert consumer.terminate() == 0, consumer.stderr()
    assert sorted(e["id"] for e in consumer.effects()) == ["o-0", "o-1", "o-2"]
    [dead] = await store.list("orders")
    assert dead.message_id == "o-bad"
    stderr = consumer.stderr()
    assert f"consuming orders as c1 in group billing at {redis_url}" in stderr
    assert "stopped: read 4" in stderr
    assert re.search(r" INFO streamwarden[\w.]*: .*dead.?letter", stderr, re.IGNORECASE), stderr
    for piece in pieces(PASSWORD):
        assert piece not in stderr + consumer.stdout()


async def test_debug_logs_never_hold_the_password(
    redis_client: redis.asyncio.Redis,
    redis_url: str,
    acl_user: str,
    workdir: Path,
    consumers: list[Consumer],
) -> None:
    """With the raw password in --redis-url and --log-level DEBUG, no line on stdout or stderr holds
    any 4-character piece of it."""
    address = redis_url.removeprefix("redis://")
    args = [
        "--redis-url", f"redis://{acl_user}:{PASSWORD}@{address}", "--log-level", "DEBUG",
        "--stream", "audit", "--group", "g", "--handler", "cli_consume_handlers:handle", "--block-ms", "50",
    ]  # fmt: skip
    consumer = Consumer(workdir, args, {})
    consumers.append(consumer)
    await StreamProducer(redis_client, "audit").send({"id": "a-1"}, message_id="a-1")

    async def done() -> bool:
        assert consumer.proc.poll() is None, consumer.stderr()
        return len(consumer.effects()) == 1

    await eventually(done, timeout=30)
    assert consumer.terminate() == 0, consumer.stderr()
    output = consumer.stderr() + consumer.stdout()
    assert " DEBUG " in output
    assert f"redis://{acl_user}:***@{address}" in output
    leaked = [piece for piece in pieces(PASSWORD) if piece in output]
    assert not leaked, leaked


async def test_refused_password_fails_at_once_in_one_line(
    redis_url: str, acl_user: str, workdir: Path, consumers: list[Consumer]
) -> None:
    """A wrong password stops consume at start with one line and exit code 1 (no retry loop, no
    traceback, no piece of the password)."""
    wrong = PASSWORD[::-1]
    args = ["--stream", "orders", "--group", "g", "--handler", "cli_consume_handlers:handle"]
    env = {"STREAMWARDEN_REDIS_URL": redis_url, "STREAMWARDEN_REDIS_USERNAME": acl_user}
    consumer = Consumer(workdir, [*args, "--password", wrong], env)
    consumers.append(consumer)
    assert consumer.proc.wait(60) == 1
    stderr = consumer.stderr()
    assert stderr.startswith(f"error: Redis authentication failed at {redis_url}: "), stderr
    assert stderr.count("\n") == 1
    assert not [piece for piece in pieces(wrong) if piece in stderr]


def test_health_port_in_use_is_one_line(
    redis_url: str, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A taken --health-port is one line naming it, exit code 1."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("SW_TEST_OUT", str(workdir / "unused.jsonl"))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(
            main,
            [
                "consume", "--redis-url", redis_url, "--stream", "orders", "--group", "g",
                "--handler", "cli_consume_handlers:handle", "--health-port", str(port),
            ],
        )  # fmt: skip
    sys.modules.pop("cli_consume_handlers", None)
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [
        f"error: --health-port: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_unreachable_redis_fails_at_once_in_one_line(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """consume against a Redis that is not there is one line, exit code 1, instead of retrying forever."""
    monkeypatch.chdir(workdir)
    port = _free_port()
    result = CliRunner().invoke(
        main,
        [
            "consume", "--redis-url", f"redis://u:pw-secret@127.0.0.1:{port}/0", "--stream", "orders",
            "--group", "g", "--handler", "asyncio:sleep",
        ],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: cannot reach Redis at redis://u:***@127.0.0.1:{port}/0: ")
    assert "pw-secret" not in result.output
