"""The Kafka TLS and SASL options of the CLI (``--kafka-security-protocol`` and friends), and the SASL
password never printed.

What runs against what (Tansu speaks PLAINTEXT only):

* option parsing, validation and the aiokafka keyword arguments: in process, through a probe command
  carrying the shared option group, and through every real Kafka command for the group's presence;
* TLS: a CA, a server and a client certificate made with the ``openssl`` CLI. ``consume``, ``dlq count``
  and ``demo`` run through a loopback TLS proxy (this test's, server certificate from that CA, client
  certificates required) in front of a Tansu broker that advertises the proxy: every connection of the
  CLI's aiokafka clients is TLS up to the proxy, plain TCP after it. TLS is terminated by the test's
  proxy, never by a broker;
* SASL: never against a broker that accepts it. Tansu refuses every mechanism (``SaslHandshake`` error
  33), so only the one-line error (bounded in time) and the redaction of the password are tested here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pprint
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
from _kafka_suite import HANDLERS
from aiokafka import AIOKafkaProducer
from click.testing import CliRunner

from _kafka_broker import KafkaBroker, tansu_binary
from _support import eventually, wait_until
from streamwarden._cli import main
from streamwarden._cli._common import (
    KafkaConnection,
    RootGroup,
    kafka_connection_options,
    log_level_option,
)
from streamwarden._cli._consume import _KafkaOptions
from streamwarden._cli._ops import KafkaDlqTarget
from streamwarden._kafka import KafkaDeadLetterStore

CLI = Path(sys.executable).parent / "streamwarden"
# quotes, a backslash and a non-ASCII letter: the forms a repr escapes must be scrubbed too; the ASCII
# tail is what the checks look for in any output (an escaped form of the rest still contains it)
PASSWORD = "P\u00e4'ss\"w\\0rd-sw-test-Zq9"
PASSWORD_TAIL = "0rd-sw-test-Zq9"


def assert_no_password(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text
        assert PASSWORD_TAIL not in text, text[-3000:]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI process: no STREAMWARDEN_* or OTEL_* of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMWARDEN_", "OTEL_"))}
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def _no_streamwarden_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("STREAMWARDEN_"):
            monkeypatch.delenv(name)


# --- certificates -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    """A test CA, a server certificate (127.0.0.1, localhost) and a client certificate it signed; a
    second CA that signed nothing here; an encrypted copy of the client key; a file that is no PEM."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_key_encrypted: Path
    other_ca: Path
    not_pem: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _signed(
    directory: Path, name: str, ca: tuple[Path, Path], extensions: str, serial: int
) -> tuple[Path, Path]:
    cert, key, csr, ext = (directory / f"{name}{suffix}" for suffix in (".pem", ".key", ".csr", ".ext"))
    ext.write_text(extensions)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-set_serial", str(serial),
        "-out", str(cert), "-days", "2", "-extfile", str(ext),
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Made with the openssl CLI (a test requirement like redis-server: missing is an error, not a skip)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl CLI is needed to make the test certificates")
    directory = tmp_path_factory.mktemp("pki")
    ca = _ca(directory, "sw-test-ca")
    other_ca, _ = _ca(directory, "sw-other-ca")
    common = "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\nbasicConstraints=CA:FALSE\n"
    server = _signed(
        directory,
        "server",
        ca,
        common + "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        serial=2,
    )
    client = _signed(directory, "client", ca, common + "extendedKeyUsage=clientAuth\n", serial=3)
    encrypted = directory / "client-encrypted.key"
    _openssl("pkey", "-in", str(client[1]), "-aes256", "-passout", "pass:sw-key-pass", "-out", str(encrypted))
    not_pem = directory / "not.pem"
    not_pem.write_text("not a certificate\n")
    return Pki(ca[0], server[0], server[1], client[0], client[1], encrypted, other_ca, not_pem)


# --- the option group, in process ---------------------------------------------------------------------
_captured: list[KafkaConnection] = []


@click.group(cls=RootGroup)
def probe_cli() -> None:
    """A command group holding one probe command with the shared Kafka connection options."""


@probe_cli.command()
@click.option("--kafka-bootstrap", default=None)
@kafka_connection_options
def probe(kafka_bootstrap: str | None, kafka_connection: KafkaConnection) -> None:
    """Keep what the options gave."""
    _captured.append(kafka_connection)


@probe_cli.command("log-sasl")
@click.option("--kafka-bootstrap", default=None)
@kafka_connection_options
@log_level_option("DEBUG")
def log_sasl(kafka_bootstrap: str | None, kafka_connection: KafkaConnection) -> None:
    """Log what aiokafka logs at DEBUG when it sends a SASL PLAIN authenticate request: the request with
    the credentials in its bytes, made by aiokafka's own authenticator and request classes."""
    from aiokafka.conn import SaslPlainAuthenticator
    from aiokafka.protocol.admin import SaslAuthenticateRequest_v1

    authenticator = SaslPlainAuthenticator(
        loop=None,
        sasl_plain_username=kafka_connection.sasl_username,
        sasl_plain_password=kafka_connection.sasl_password,
    )
    payload, _ = next(authenticator._authenticator)
    request = SaslAuthenticateRequest_v1(payload)
    logging.getLogger("aiokafka.conn").debug("Request to %s:%d %d: %s", "127.0.0.1", 9, 3, request)


def connect(args: list[str], env: dict[str, str] | None = None) -> KafkaConnection:
    """The :class:`KafkaConnection` that ``probe --kafka-bootstrap 127.0.0.1:9 ARGS`` gets."""
    _captured.clear()
    result = CliRunner().invoke(probe_cli, ["probe", "--kafka-bootstrap", "127.0.0.1:9", *args], env=env)
    assert result.exit_code == 0, result.output
    [connection] = _captured
    return connection


def test_plaintext_by_default() -> None:
    """Without options the connection is PLAINTEXT and the aiokafka arguments say only that."""
    connection = connect([])
    assert connection.client_options() == {"security_protocol": "PLAINTEXT"}
    assert connection.store_options() == {"client_options": {"security_protocol": "PLAINTEXT"}}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_ssl_gives_the_aiokafka_arguments(mechanism: str, pki: Pki) -> None:
    """SASL_SSL with a mechanism, a user, the password from the variable and a CA file: the aiokafka
    keyword arguments of every client, with a verifying TLS context that trusts the CA."""
    connection = connect(
        [
            "--kafka-security-protocol", "SASL_SSL", "--kafka-sasl-mechanism", mechanism,
            "--kafka-sasl-username", "svc", "--kafka-ssl-cafile", str(pki.ca),
            "--kafka-request-timeout-ms", "1500",
        ],
        {"STREAMWARDEN_KAFKA_SASL_PASSWORD": PASSWORD},
    )  # fmt: skip
    options = connection.client_options(session_timeout_ms=6000)
    context = options.pop("ssl_context")
    assert options == {
        "session_timeout_ms": 6000,
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "svc",
        "sasl_plain_password": PASSWORD,
        "request_timeout_ms": 1500,
    }
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    # the CA file was loaded, and nothing else (the system's CAs are not added beside it)
    assert [str(ca["subject"]) for ca in context.get_ca_certs()] == ["((('commonName', 'sw-test-ca'),),)"]
    # the store takes the request timeout as its own argument, the rest for all its clients
    store = connection.store_options()
    assert store["request_timeout_ms"] == 1500
    assert "request_timeout_ms" not in store["client_options"]
    assert store["client_options"]["sasl_plain_password"] == PASSWORD


def test_everything_from_the_environment(tmp_path: Path, pki: Pki) -> None:
    """Every option has its STREAMWARDEN_KAFKA_* variable (values in any case); the password file's
    trailing newline is not part of the password; the client certificate and key are loaded."""
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    connection = connect(
        [],
        {
            "STREAMWARDEN_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
            "STREAMWARDEN_KAFKA_SASL_MECHANISM": "scram-sha-512",
            "STREAMWARDEN_KAFKA_SASL_USERNAME": "svc",
            "STREAMWARDEN_KAFKA_SASL_PASSWORD_FILE": str(password_file),
            "STREAMWARDEN_KAFKA_SSL_CAFILE": str(pki.ca),
            "STREAMWARDEN_KAFKA_SSL_CERTFILE": str(pki.client_cert),
            "STREAMWARDEN_KAFKA_SSL_KEYFILE": str(pki.client_key),
            "STREAMWARDEN_KAFKA_REQUEST_TIMEOUT_MS": "2000",
        },
    )
    assert connection.security_protocol == "SASL_SSL"
    assert connection.sasl_mechanism == "SCRAM-SHA-512"
    assert connection.sasl_password == PASSWORD
    assert connection.request_timeout_ms == 2000
    assert connection.ssl_certfile == str(pki.client_cert)
    assert connection.ssl_context is not None


def test_ssl_alone_uses_the_system_cas() -> None:
    """SSL without a CA file: a verifying context (the system's CAs), no SASL arguments."""
    options = connect(["--kafka-security-protocol", "SSL"]).client_options()
    assert set(options) == {"security_protocol", "ssl_context"}
    assert options["ssl_context"].verify_mode == ssl.CERT_REQUIRED


def _usage_cases(tmp: Path, pki: Pki) -> list[tuple[list[str], dict[str, str], str]]:
    empty = tmp / "empty"
    empty.write_text("\n")
    latin1 = tmp / "latin1"
    latin1.write_bytes(b"p\xe4ss\n")
    two_lines = tmp / "two-lines"
    two_lines.write_text("one\ntwo\n")
    password = {"STREAMWARDEN_KAFKA_SASL_PASSWORD": PASSWORD}
    sasl = ["--kafka-security-protocol", "SASL_PLAINTEXT", "--kafka-sasl-username", "svc"]
    ssl_ = ["--kafka-security-protocol", "SSL"]
    return [
        (["--kafka-security-protocol", "SASL_SSL"], password, "SASL_SSL needs --kafka-sasl-username"),
        (["--kafka-security-protocol", "SASL_PLAINTEXT", "--kafka-sasl-username", "svc"], {}, "needs the SASL password"),
        ([*sasl, "--kafka-sasl-password-file", str(empty)], password, "give the SASL password once"),
        (["--kafka-sasl-username", "svc"], {}, "--kafka-sasl-username needs --kafka-security-protocol SASL_"),
        ([], password, "STREAMWARDEN_KAFKA_SASL_PASSWORD needs --kafka-security-protocol SASL_"),
        (["--kafka-security-protocol", "SSL", "--kafka-sasl-mechanism", "PLAIN"], password, "needs --kafka-security-protocol SASL_"),
        ([*sasl, "--kafka-ssl-cafile", str(pki.ca)], password, "--kafka-ssl-cafile needs --kafka-security-protocol SSL"),
        ([*ssl_, "--kafka-ssl-cafile", str(tmp / "missing.pem")], {}, "does not exist"),
        ([*ssl_, "--kafka-ssl-keyfile", str(pki.client_key)], {}, "--kafka-ssl-keyfile needs --kafka-ssl-certfile"),
        ([*ssl_, "--kafka-ssl-cafile", str(pki.not_pem)], {}, "cannot load"),
        ([*ssl_, "--kafka-ssl-certfile", str(pki.client_cert), "--kafka-ssl-keyfile", str(pki.server_key)], {}, "cannot load the client certificate"),
        ([*ssl_, "--kafka-ssl-certfile", str(pki.client_cert), "--kafka-ssl-keyfile", str(pki.client_key_encrypted)], {}, "encrypted private key"),
        ([*sasl, "--kafka-sasl-password-file", str(tmp / "missing")], {}, "cannot read"),
        ([*sasl, "--kafka-sasl-password-file", str(pki.ca / "x")], {}, "cannot read"),  # not a directory
        ([*sasl, "--kafka-sasl-password-file", str(empty)], {}, "is empty"),
        ([*sasl, "--kafka-sasl-password-file", str(latin1)], {}, "not UTF-8"),
        ([*sasl, "--kafka-sasl-password-file", str(two_lines)], {}, "more than one line"),
        (["--kafka-security-protocol", "SASL"], {}, "is not one of"),
        (["--kafka-request-timeout-ms", "0"], {}, "--kafka-request-timeout-ms"),
    ]  # fmt: skip


_USAGE_IDS = [
    "sasl-without-user", "sasl-without-password", "password-twice", "user-without-sasl",
    "password-variable-without-sasl", "mechanism-without-sasl", "cafile-without-tls", "missing-cafile",
    "key-without-cert", "cafile-not-pem", "key-of-another-cert", "encrypted-key", "missing-password-file",
    "password-file-path-not-a-directory", "empty-password-file", "password-file-not-utf8",
    "password-file-two-lines", "unknown-protocol", "timeout-out-of-range",
]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_USAGE_IDS)), ids=_USAGE_IDS)
def test_combinations_that_cannot_work_are_one_usage_error_line(case: int, tmp_path: Path, pki: Pki) -> None:
    """Each is one ``error:`` line (exit status 2) before anything connects; none shows the password."""
    args, env, message = _usage_cases(tmp_path, pki)[case]
    _captured.clear()
    result = CliRunner().invoke(probe_cli, ["probe", "--kafka-bootstrap", "127.0.0.1:9", *args], env=env)
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert _captured == []
    assert_no_password(result.output)


KAFKA_COMMANDS = {
    "consume": ["consume", "--topic", "t", "--group", "g", "--handler", "x:y"],
    "demo": ["demo"],
    "dlq-list": ["dlq", "list"],
    "dlq-show": ["dlq", "show", "t.dlq/0/1"],
    "dlq-count": ["dlq", "count"],
    "dlq-replay": ["dlq", "replay", "--handler", "x:y"],
    "dlq-purge": ["dlq", "purge", "--yes"],
}


@pytest.mark.parametrize("command", list(KAFKA_COMMANDS.values()), ids=list(KAFKA_COMMANDS))
def test_every_kafka_command_has_the_options(command: list[str]) -> None:
    """The group is on every command that takes --kafka-bootstrap, and validated there; without
    --kafka-bootstrap a security flag is a usage error, not silently ignored."""
    runner = CliRunner()
    result = runner.invoke(
        main, [*command, "--kafka-bootstrap", "127.0.0.1:9", "--kafka-security-protocol", "SASL_SSL"]
    )
    assert result.exit_code == 2, result.output
    assert "SASL_SSL needs --kafka-sasl-username" in result.output
    result = runner.invoke(main, [*command, "--kafka-security-protocol", "SSL"])
    assert result.exit_code == 2, result.output
    assert "--kafka-security-protocol needs --kafka-bootstrap" in result.output


@pytest.mark.parametrize("command", list(KAFKA_COMMANDS.values()), ids=list(KAFKA_COMMANDS))
def test_help_never_shows_the_password(command: list[str], tmp_path: Path) -> None:
    """--help lists the options and shows no default or value of the password, whatever is set."""
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD)
    env = {
        "STREAMWARDEN_KAFKA_SASL_PASSWORD": PASSWORD,
        "STREAMWARDEN_KAFKA_SASL_PASSWORD_FILE": str(password_file),
        "STREAMWARDEN_KAFKA_SASL_USERNAME": "svc",
    }
    result = CliRunner().invoke(main, [*command, "--help"], env=env)
    assert result.exit_code == 0, result.output
    assert "--kafka-sasl-password-file" in result.output
    assert "--kafka-sasl-password " not in result.output  # no password flag
    assert_no_password(result.output)


@pytest.mark.parametrize("username", ["svc", 'o"k'], ids=["plain-user", "user-with-a-quote"])
def test_the_sasl_request_aiokafka_logs_at_debug_is_scrubbed(username: str) -> None:
    """aiokafka logs its SASL PLAIN authenticate request, credentials included, at DEBUG; the CLI's log
    lines show it without the password, in whichever quoting the bytes' repr picked."""
    result = CliRunner().invoke(
        probe_cli,
        ["log-sasl", "--kafka-bootstrap", "127.0.0.1:9", "--kafka-security-protocol", "SASL_PLAINTEXT",
         "--kafka-sasl-username", username],
        env={"STREAMWARDEN_KAFKA_SASL_PASSWORD": PASSWORD},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "SaslAuthenticateRequest_v1(sasl_auth_bytes=b" in result.output
    assert "***" in result.output
    assert_no_password(result.output)


def test_reprs_hide_the_password(pki: Pki) -> None:
    """repr/str/format of every object that holds the password: the connection, the aiokafka arguments
    (also inside consume's runner options and pprint), the dlq command's target and the Kafka store."""
    connection = connect(
        ["--kafka-security-protocol", "SASL_SSL", "--kafka-sasl-username", "svc", "--kafka-ssl-cafile", str(pki.ca)],
        {"STREAMWARDEN_KAFKA_SASL_PASSWORD": PASSWORD},
    )  # fmt: skip
    options = connection.client_options(session_timeout_ms=6000)
    assert options["sasl_plain_password"] == PASSWORD  # the value is there, only never shown
    runner_options = _KafkaOptions(
        bootstrap_servers="127.0.0.1:9", topic="t", group="g", consumer="c", concurrency=1, batch_size=1,
        poll_timeout_ms=100, ordering="key", id_header="message_id", start_from="earliest",
        revoke_timeout=1.0, shutdown_timeout=1.0, consumer_options=options,
    )  # fmt: skip
    store = KafkaDeadLetterStore("127.0.0.1:9", **connection.store_options())
    shown = [
        repr(connection), str(connection), f"{connection}", repr(options), str(options), f"{options}",
        pprint.pformat(options), repr(runner_options), repr(KafkaDlqTarget("127.0.0.1:9", None, connection)),
        repr(store), repr(connection.store_options()),
    ]  # fmt: skip
    assert_no_password(*shown)
    assert "sasl_password='***'" in repr(connection)
    assert "'sasl_plain_password': '***'" in repr(options)
    assert "SASL_SSL" in repr(store)


def test_the_store_refuses_options_it_sets_itself() -> None:
    """client_options may not set what the store sets per client (a clash would be a TypeError inside
    aiokafka at the first write) nor its own arguments."""
    for key in ("acks", "group_id", "request_timeout_ms", "bootstrap_servers"):
        with pytest.raises(ValueError, match=key):
            KafkaDeadLetterStore("127.0.0.1:9", client_options={key: 1})


# --- against brokers ----------------------------------------------------------------------------------
def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[subprocess.CompletedProcess[str], float]:
    """One CLI process (bounded); its result and its wall time."""
    started = time.monotonic()
    done = subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, env=clean_env(**(env or {})), timeout=timeout, check=False
    )  # fmt: skip
    return done, time.monotonic() - started


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return errors[0]


SASL_ARGS = ["--kafka-security-protocol", "SASL_PLAINTEXT", "--kafka-sasl-username", "svc"]


@pytest.mark.parametrize(
    ("command", "mechanism"),
    [
        (["dlq", "count"], "PLAIN"),
        (["dlq", "list", "--json"], "SCRAM-SHA-512"),
        (["--debug", "dlq", "count"], "SCRAM-SHA-256"),
        (["demo", "--messages", "20", "--log-level", "DEBUG"], "PLAIN"),
    ],
    ids=["dlq-count", "dlq-list", "dlq-count-debug", "demo-debug-log"],
)
def test_sasl_against_a_plaintext_broker_is_one_error_line(
    command: list[str], mechanism: str, kafka_broker: KafkaBroker
) -> None:
    """Tansu refuses the SASL handshake: one ``error:`` line naming the security and the broker's refusal,
    within seconds; the password appears nowhere (stdout, stderr, DEBUG log lines); with --debug the
    traceback is shown and the password still is not."""
    done, elapsed = run_cli(
        *command, "--kafka-bootstrap", kafka_broker.bootstrap, *SASL_ARGS, "--kafka-sasl-mechanism", mechanism,
        "--kafka-request-timeout-ms", "2000", env={"STREAMWARDEN_KAFKA_SASL_PASSWORD": PASSWORD},
    )  # fmt: skip
    assert_no_password(done.stdout, done.stderr)
    assert elapsed < 30, elapsed
    if command[0] == "--debug":
        assert done.returncode == 1
        assert "Traceback" in done.stderr
        return
    line = one_error_line(done)
    assert f"security SASL_PLAINTEXT, {mechanism} as 'svc'" in line
    assert "UnsupportedSaslMechanism" in line
    if "DEBUG" in command:
        assert " DEBUG aiokafka" in done.stderr  # the log was on, and scrubbed


def test_sasl_ssl_to_no_broker_is_one_error_line(tmp_path: Path, pki: Pki) -> None:
    """Nothing listens: one line, the password (from a file) nowhere."""
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    done, elapsed = run_cli(
        "dlq", "count", "--kafka-bootstrap", f"127.0.0.1:{port}", "--kafka-security-protocol", "SASL_SSL",
        "--kafka-sasl-username", "svc", "--kafka-sasl-password-file", str(password_file),
        "--kafka-ssl-cafile", str(pki.ca), "--kafka-request-timeout-ms", "1000",
    )  # fmt: skip
    line = one_error_line(done)
    assert "security SASL_SSL, PLAIN as 'svc'" in line
    assert_no_password(done.stdout, done.stderr)
    assert elapsed < 30, elapsed


def test_tls_to_a_plaintext_broker_is_bounded_by_the_request_timeout(kafka_broker: KafkaBroker) -> None:
    """A TLS client hello to a PLAINTEXT listener gets no answer: the request timeout bounds it."""
    done, elapsed = run_cli(
        "dlq", "count", "--kafka-bootstrap", kafka_broker.bootstrap, "--kafka-security-protocol", "SSL",
        "--kafka-request-timeout-ms", "1000",
    )  # fmt: skip
    line = one_error_line(done)
    assert "security SSL" in line
    assert "TimeoutError" in line
    assert elapsed < 20, elapsed


def test_consume_with_sasl_against_a_plaintext_broker_never_prints_the_password(
    tmp_path: Path, kafka_broker: KafkaBroker
) -> None:
    """A consume process refused by the broker (it may retry or stop: the runner decides) logs at DEBUG
    without the password, until it is stopped."""
    (tmp_path / "sec_handlers.py").write_text(HANDLERS)
    err_path = tmp_path / "stderr.txt"
    env = clean_env(STREAMWARDEN_KAFKA_SASL_PASSWORD=PASSWORD, SW_TEST_OUT=str(tmp_path / "out.jsonl"))
    with err_path.open("wb") as err:
        proc = subprocess.Popen(
            [
                str(CLI), "consume", "--kafka-bootstrap", kafka_broker.bootstrap, "--topic", "sec-t",
                "--group", "sec-g", "--handler", "sec_handlers:handle", *SASL_ARGS, "--log-level", "DEBUG",
            ],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=err,
        )  # fmt: skip
    try:
        wait_until(
            lambda: "UnsupportedSaslMechanism" in err_path.read_text(errors="replace"),
            timeout=30,
            interval=0.1,
            what="the broker's refusal in the log",
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            stdout, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate(timeout=10)
    stderr = err_path.read_text(errors="replace")
    assert " DEBUG aiokafka" in stderr
    assert_no_password(stdout.decode(errors="replace"), stderr)


# --- TLS end to end, through a proxy ----------------------------------------------------------------
async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        writer.close()


class TlsProxy:
    """TLS on a loopback port (the test CA's server certificate, client certificates required), plain TCP
    to ``target_port``; its own event loop in a thread. Counts the TLS sessions it accepted."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.sessions = 0
        self.target_port = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(lambda loop, context: None)  # refused handshakes are expected
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-proxy", daemon=True)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    def start(self, target_port: int) -> None:
        self.target_port = target_port
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, sock=self._sock, ssl=self.context), self._loop
        ).result(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1  # called after the handshake, client certificate verified
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._tasks.discard(task)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def close(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()
        self._sock.close()


@dataclass
class TlsBroker:
    bootstrap: str
    proxy: TlsProxy
    pki: Pki

    def args(self, *, ca: Path | None = None, client_cert: bool = True) -> list[str]:
        """The CLI options that reach this broker over mutual TLS."""
        args = [
            "--kafka-bootstrap", self.bootstrap, "--kafka-security-protocol", "SSL",
            "--kafka-ssl-cafile", str(ca or self.pki.ca), "--kafka-request-timeout-ms", "5000",
        ]  # fmt: skip
        if client_cert:
            args += [
                "--kafka-ssl-certfile",
                str(self.pki.client_cert),
                "--kafka-ssl-keyfile",
                str(self.pki.client_key),
            ]
        return args

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
        return context


@pytest.fixture(scope="module")
def tls_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """A Tansu broker (PLAINTEXT, loopback) that advertises the TLS proxy in front of it."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    server.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    server.verify_mode = ssl.CERT_REQUIRED
    proxy = TlsProxy(server)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("tansu-tls") / "tansu.log"
    with log.open("ab") as out:
        tansu = subprocess.Popen(
            [
                str(tansu_binary()), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
                "--advertised-listener-url", f"tcp://127.0.0.1:{proxy.port}", "--storage-engine", "memory://tansu/",
            ],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": "warn"},
        )  # fmt: skip

    def listening() -> bool:
        if tansu.poll() is not None:
            raise RuntimeError(
                f"tansu exited with {tansu.returncode}: {log.read_text(errors='replace')[-2000:]}"
            )
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True

    try:
        wait_until(listening, timeout=20, interval=0.05, what="tansu listening")
        proxy.start(port)
        yield TlsBroker(f"127.0.0.1:{proxy.port}", proxy, pki)
    finally:
        proxy.close()
        tansu.terminate()
        try:
            tansu.wait(10)
        except subprocess.TimeoutExpired:
            tansu.kill()
            tansu.wait(10)


async def test_consume_and_the_dlq_commands_over_mutual_tls(tmp_path: Path, tls_broker: TlsBroker) -> None:
    """consume over TLS (its consumer and its Kafka DLQ store): every record handled, the poison one
    dead-lettered; ``dlq count`` over TLS reads it back. All of it through the proxy's TLS sessions."""
    producer = AIOKafkaProducer(
        bootstrap_servers=tls_broker.bootstrap, security_protocol="SSL", ssl_context=tls_broker.client_context(),
        enable_idempotence=False, acks="all",
    )  # fmt: skip
    topic = f"sec-{os.getpid()}-{time.monotonic_ns() % 10**8}"
    await producer.start()
    try:
        for n in range(6):
            await producer.send_and_wait(
                topic, json.dumps({"n": n}).encode(), headers=[("message_id", f"m{n}".encode())]
            )
    finally:
        await producer.stop()
    sessions_before = tls_broker.proxy.sessions
    (tmp_path / "sec_handlers.py").write_text(HANDLERS)
    out = tmp_path / "out.jsonl"
    env = clean_env(STREAMWARDEN_MAX_RETRIES="0", SW_TEST_OUT=str(out))
    err_path = tmp_path / "stderr.txt"
    with err_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            str(CLI), "consume", *tls_broker.args(), "--topic", topic, "--group", f"{topic}-g",
            "--handler", "sec_handlers:handle", "--session-timeout-ms", "6000", "--block-ms", "100",
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        with contextlib.suppress(AssertionError):  # the assertion below says what was handled
            await eventually(
                lambda: (
                    proc.returncode is not None or (out.exists() and len(out.read_text().splitlines()) == 5)
                ),
                timeout=60,
                step=0.1,
                what="five records handled",
            )
        handled = (
            sorted(json.loads(line)["n"] for line in out.read_text().splitlines()) if out.exists() else []
        )
        assert handled == [0, 1, 2, 4, 5], err_path.read_text(errors="replace")[-3000:]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err_path.read_text(errors="replace")[-3000:]
    assert tls_broker.proxy.sessions > sessions_before
    done = await asyncio.to_thread(
        subprocess.run,
        [str(CLI), "dlq", "count", *tls_broker.args(), "--topic", topic, "--json"],
        capture_output=True, text=True, env=clean_env(), timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["destinations"] == {topic: 1}


def test_the_demo_over_mutual_tls(tls_broker: TlsBroker) -> None:
    """The Kafka demo (admin, producer, consumer, Kafka DLQ store) over TLS reconciles."""
    sessions_before = tls_broker.proxy.sessions
    done, _ = run_cli("demo", *tls_broker.args(), "--messages", "60", "--rate", "300", "--json", timeout=90)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["reconciled"], report["problems"]
    assert report["unique_ids"] == 60
    assert tls_broker.proxy.sessions > sessions_before


@pytest.mark.parametrize(
    ("variant", "expected"),
    [("other-ca", "CERTIFICATE_VERIFY_FAILED"), ("no-client-cert", "closed")],
    ids=["other-ca", "no-client-cert"],
)
def test_tls_that_does_not_verify_is_one_error_line(
    variant: str, expected: str, tls_broker: TlsBroker
) -> None:
    """A broker certificate from another CA, or no client certificate where one is required: one line."""
    if variant == "other-ca":
        args = tls_broker.args(ca=tls_broker.pki.other_ca)
    else:
        args = tls_broker.args(client_cert=False)
    done, elapsed = run_cli("dlq", "count", *args)
    line = one_error_line(done)
    assert expected in line, line
    assert "security SSL" in line
    assert elapsed < 30, elapsed
