"""rediss:// with certificate verification against a TLS-enabled redis-server and a private CA."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
import redis.asyncio
from _fixtures_dlq import Handler, make_layer
from _tls import ServerCertificate, make_ca, make_server_cert
from click.testing import CliRunner, Result
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from _redis_server import RedisServer, _free_port
from streamwarden import Outcome, ReliabilityLayer, ReliabilitySettings
from streamwarden._cli import main
from streamwarden._cli._ops import register
from streamwarden._redis._dlq import RedisDeadLetterStore


@dataclass(frozen=True)
class TlsServer:
    """A redis-server with a TLS port, the certificate it serves, and a CA that did not sign it."""

    server: RedisServer
    tls_port: int
    cert: ServerCertificate
    wrong_ca: Path

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/0"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """One TLS-enabled redis-server per module (plain port kept for the harness's readiness check)."""
    directory = tmp_path_factory.mktemp("tls")
    cert = make_server_cert(directory, make_ca(directory, "streamwarden-test-ca"))
    wrong = make_ca(directory, "some-other-ca")
    port = _free_port()
    args = [
        "--tls-port", str(port),
        "--tls-cert-file", str(cert.cert),
        "--tls-key-file", str(cert.key),
        "--tls-ca-cert-file", str(cert.ca.cert),
        "--tls-auth-clients", "no",
    ]  # fmt: skip
    with RedisServer(args) as server:
        yield TlsServer(server, port, cert, wrong.cert)


@pytest.fixture
async def tls_client(tls: TlsServer) -> AsyncIterator[redis.asyncio.Redis]:
    """A client that verifies the server against the right CA."""
    client = redis.asyncio.Redis.from_url(
        tls.url, ssl_ca_certs=str(tls.cert.ca.cert), ssl_cert_reqs="required"
    )
    await client.flushall()
    yield client
    await client.aclose()


async def test_verified_tls_connection_runs_the_dlq(tls_client: redis.asyncio.Redis) -> None:
    """With the right CA, the full Redis stack works over TLS: dedup, dead letters, counters."""
    layer = ReliabilityLayer(tls_client, ReliabilitySettings(max_retries=0, processing_timeout=None))
    result = await layer.process({"id": "tls-1"}, Handler(fail=True))
    assert result.outcome is Outcome.DEAD_LETTERED
    store = layer.dead_letter_store
    assert isinstance(store, RedisDeadLetterStore)
    [stored] = await store.list()
    assert stored.message_id == "tls-1"
    await layer.metrics_collector.flush()
    assert (await layer.metrics_collector.get_reliability_metrics())["messages_dead_lettered"] == 1
    ssl_info = tls_client.connection_pool.connection_kwargs
    assert ssl_info["ssl_cert_reqs"] == "required"


@pytest.mark.parametrize(
    "trust",
    [pytest.param("wrong-ca", id="wrong-ca"), pytest.param("system-store", id="system-store")],
)
async def test_unverifiable_server_fails_closed(tls: TlsServer, trust: str) -> None:
    """A server the client cannot verify is never talked to: the layer defers (not acknowledged) and
    runs nothing."""
    options: dict[str, Any] = {"ssl_cert_reqs": "required", "retry": Retry(NoBackoff(), 0)}
    if trust == "wrong-ca":
        options["ssl_ca_certs"] = str(tls.wrong_ca)
    client = redis.asyncio.Redis.from_url(tls.url, socket_connect_timeout=2, **options)
    try:
        with pytest.raises(redis.exceptions.ConnectionError, match="certificate verify failed"):
            await client.ping()
        layer = ReliabilityLayer(client, ReliabilitySettings(processing_timeout=None))
        handler = Handler(fail=False)
        result = await layer.process({"id": "tls-2"}, handler)
        assert result.outcome is Outcome.DEFERRED
        assert not result.should_ack
        assert handler.calls == []
    finally:
        await client.aclose()


async def test_dlq_write_over_unverified_tls_fails_closed(tls: TlsServer) -> None:
    """A dead letter that cannot be written to an unverified server leaves the message unacknowledged."""
    client = redis.asyncio.Redis.from_url(
        tls.url, ssl_ca_certs=str(tls.wrong_ca), ssl_cert_reqs="required", retry=Retry(NoBackoff(), 0)
    )
    try:
        layer = make_layer(RedisDeadLetterStore(client))
        result = await layer.process({"id": "tls-3"}, Handler(fail=True))
        assert result.outcome is Outcome.FAILED
        assert not result.should_ack
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("use_right_ca", "exit_code"),
    [pytest.param(True, 0, id="right-ca"), pytest.param(False, 1, id="wrong-ca")],
)
async def test_cli_verifies_the_server(tls: TlsServer, use_right_ca: bool, exit_code: int) -> None:
    """The CLI's --tls-ca-file decides whom it trusts; a wrong CA is a clean connection error."""

    @click.group()
    def cli() -> None:
        """test"""

    register(cli)
    ca = tls.cert.ca.cert if use_right_ca else tls.wrong_ca
    args = ["dlq", "count", "--json", "--redis-url", tls.url, "--tls-ca-file", str(ca)]
    result = await asyncio.to_thread(CliRunner().invoke, cli, args)
    assert result.exit_code == exit_code, result.output
    if not use_right_ca:
        assert "certificate verify failed" in result.output


def _main(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


async def test_cli_reads_the_ca_from_the_environment(tls: TlsServer) -> None:
    """STREAMWARDEN_REDIS_URL and STREAMWARDEN_REDIS_TLS_CA_FILE are enough for a verified connection."""
    env = {"STREAMWARDEN_REDIS_URL": tls.url, "STREAMWARDEN_REDIS_TLS_CA_FILE": str(tls.cert.ca.cert)}
    result = await asyncio.to_thread(_main, "dlq", "count", "--json", env=env)
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.stdout)["total"], int)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(
            ["consume", "--stream", "orders", "--group", "g", "--handler", "asyncio:sleep"], id="consume"
        ),
        pytest.param(["demo", "--messages", "10"], id="demo"),
        pytest.param(["breakers"], id="breakers"),
    ],
)
async def test_every_command_refuses_an_unverified_server_in_one_line(
    tls: TlsServer, command: list[str]
) -> None:
    """consume, demo and the operator commands verify the server with --tls-ca-file: a wrong CA is one
    line, exit code 1, before anything is read or written."""
    args = [*command, "--redis-url", tls.url, "--tls-ca-file", str(tls.wrong_ca)]
    result = await asyncio.to_thread(_main, *args)
    assert result.exit_code == 1, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: cannot reach Redis at {tls.url}: ")
    assert "certificate verify failed" in line


def test_ca_file_needs_a_tls_url(tls: TlsServer) -> None:
    """--tls-ca-file with a plain redis:// URL is a usage error (it would be silently ignored)."""
    result = _main("dlq", "count", "--redis-url", tls.server.url, "--tls-ca-file", str(tls.cert.ca.cert))
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert "--tls-ca-file needs a rediss:// URL" in line
