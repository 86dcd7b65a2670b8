"""Every misuse of the ``streamwarden`` command line is one ``error:`` line on stderr, exit code 2 (usage)
or 1, and no traceback unless ``--debug``; plus the shared pieces behind that (URL redaction, handler
loading, JSON that is always UTF-8)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st

from streamwarden._cli import main
from streamwarden._cli._common import (
    Secrets,
    json_text,
    load_handler,
    parse_redis_url,
    printable,
    redact_url,
)

CLI = Path(sys.executable).parent / "streamwarden"
HANDLERS = """
import functools

async def ok(message):
    return message

def sync(message):
    return message

class Orders:
    def __init__(self):
        self.seen = []

    async def handle(self, message):
        self.seen.append(message)
        return "handled"

    @staticmethod
    async def static(message):
        return "static"

class Callable:
    async def __call__(self, message):
        return "called"

class NeedsArgs:
    def __init__(self, url):
        self.url = url

    async def handle(self, message):
        return message

instance = Callable()
partial = functools.partial(ok)
NOT_CALLABLE = 3
"""


@pytest.fixture
def handlers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A handler module in the current directory (as a user's project would have it); yields its name."""
    name = f"cli_handlers_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(HANDLERS)
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run ``streamwarden ARGS`` in process, without inherited STREAMWARDEN_* or OTEL variables."""
    return CliRunner().invoke(main, list(args), env=env)


def assert_one_error_line(result: Result, exit_code: int, *fragments: str) -> str:
    """The command failed with ``exit_code``, printed exactly one ``error:`` line on stderr holding
    every fragment, and no traceback; returns the line."""
    assert result.exit_code == exit_code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.output
    assert result.stdout == ""
    return lines[0]


_CONSUME = ["consume", "--stream", "orders", "--group", "g", "--handler", "json:loads"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        pytest.param(["demo", "--messages", "0"], "--messages", id="demo-zero-messages"),
        pytest.param(["demo", "--rate", "0"], "--rate", id="demo-zero-rate"),
        pytest.param(["demo", "--rate", "nan"], "not a finite number", id="demo-nan-rate"),
        pytest.param(["demo", "--rate", "inf"], "not a finite number", id="demo-infinite-rate"),
        pytest.param(["demo", "--concurrency", "0"], "--concurrency", id="demo-zero-concurrency"),
        pytest.param(["demo", "--max-seconds", "-1"], "--max-seconds", id="demo-negative-max-seconds"),
        pytest.param(["demo", "--control-port", "0"], "--control-port", id="demo-port-0"),
        pytest.param(["demo", "--prometheus-port", "70000"], "--prometheus-port", id="demo-port-too-big"),
        pytest.param(["demo", "--outage-every", "5"], "only applies with --live", id="demo-outage-not-live"),
        pytest.param(
            ["demo", "--live", "--messages", "5"], "does not apply with --live", id="demo-messages-live"
        ),
        pytest.param(
            ["demo", "--consumers", "2"], "only applies with --redis-url", id="demo-consumers-embedded"
        ),
        pytest.param(
            ["demo", "--live", "--redis-url", "redis://127.0.0.1:1/0"],
            "embedded stores only",
            id="demo-live-redis",
        ),
        pytest.param(
            ["demo", "--redis-url", "http://127.0.0.1:1/0"], "unsupported scheme 'http'", id="demo-http-url"
        ),
        pytest.param(["demo", "--password", "x"], "--password needs --redis-url", id="demo-password-no-url"),
        pytest.param(["demo", "--workload", "many"], "--workload", id="demo-workload-not-a-number"),
        pytest.param([*_CONSUME, "--block-ms", "-1"], "--block-ms", id="consume-negative-block"),
        pytest.param([*_CONSUME, "--block-ms", "0"], "--block-ms", id="consume-block-forever"),
        pytest.param([*_CONSUME, "--concurrency", "0"], "--concurrency", id="consume-zero-concurrency"),
        pytest.param([*_CONSUME, "--batch-size", "0"], "--batch-size", id="consume-zero-batch"),
        pytest.param([*_CONSUME, "--claim-every", "0"], "--claim-every", id="consume-zero-claim-every"),
        pytest.param([*_CONSUME, "--claim-idle-ms", "-5"], "--claim-idle-ms", id="consume-negative-idle"),
        pytest.param(
            [*_CONSUME, "--shutdown-timeout", "-1"], "--shutdown-timeout", id="consume-negative-shutdown"
        ),
        pytest.param([*_CONSUME, "--flush-every", "0"], "--flush-every", id="consume-zero-flush"),
        pytest.param([*_CONSUME, "--health-port", "-1"], "--health-port", id="consume-negative-port"),
        pytest.param([*_CONSUME, "--log-level", "LOUD"], "--log-level", id="consume-log-level"),
        pytest.param(
            [*_CONSUME, "--redis-url", "http://u:pw@127.0.0.1/0"], "unsupported scheme", id="consume-http"
        ),
        pytest.param(
            [*_CONSUME, "--redis-url", "127.0.0.1:6379"], "is not a Redis URL", id="consume-no-scheme"
        ),
        pytest.param(
            [*_CONSUME, "--redis-url", "redis://127.0.0.1:port/0"], "--redis-url", id="consume-bad-port"
        ),
        pytest.param(
            [*_CONSUME, "--redis-url", "redis://127.0.0.1:1/zero"], "database number", id="consume-bad-db"
        ),
        pytest.param([*_CONSUME, "--key-prefix", "a b"], "--key-prefix", id="consume-bad-prefix"),
        pytest.param(
            [*_CONSUME, "--tls-ca-file", "/nonexistent/ca.pem"], "--tls-ca-file", id="consume-no-ca"
        ),
        pytest.param(
            ["consume", "--stream", "", "--group", "g", "--handler", "json:loads"],
            "--stream",
            id="consume-empty-stream",
        ),
        pytest.param(
            ["consume", "--group", "g", "--handler", "json:loads"], "--stream", id="consume-missing-stream"
        ),
        pytest.param([*_CONSUME[:-1], "json"], "module:function", id="handler-no-colon"),
        pytest.param([*_CONSUME[:-1], "json:loads"], "not async", id="handler-sync"),
        pytest.param([*_CONSUME[:-1], "no_such_module_x:f"], "cannot load", id="handler-missing-module"),
        pytest.param(["dlq", "list", "--limit", "0"], "--limit", id="dlq-list-zero-limit"),
        pytest.param(["dlq", "list", "--since", "yesterday-ish"], "is not a time", id="dlq-list-bad-since"),
        pytest.param(["dlq", "list", "--until", "1e999"], "is not a time", id="dlq-list-infinite-until"),
        pytest.param(["dlq", "list", "-d", ""], "--destination", id="dlq-list-empty-destination"),
        pytest.param(["dlq", "show", "no-slash"], "DESTINATION/STREAM-ID", id="dlq-show-bad-id"),
        pytest.param(
            ["dlq", "replay", "--handler", "json:loads", "--rate", "-1"], "--rate", id="dlq-replay-rate"
        ),
        pytest.param(["dlq", "replay", "--handler", "json:loads"], "not async", id="dlq-replay-sync-handler"),
        pytest.param(["metrics", "--redis-url", "redis://"], "no host", id="metrics-no-host"),
        pytest.param(["breakers", "--redis-url", "rediss://h:0/0"], "port 0", id="breakers-port-0"),
        pytest.param(["no-such-command"], "No such command", id="unknown-command"),
        pytest.param(["demo", "--no-such-option"], "No such option", id="unknown-option"),
    ],
)
def test_misuse_is_one_usage_line(args: list[str], fragment: str) -> None:
    """A bad value, a missing or contradictory option is one 'error:' line naming it, exit code 2."""
    line = assert_one_error_line(invoke(*args), 2, fragment)
    assert "--help" in line  # where to look next


def test_usage_line_never_echoes_url_credentials() -> None:
    """A rejected --redis-url is shown with its credentials replaced, even when it cannot be parsed."""
    result = invoke(*_CONSUME, "--redis-url", "http://admin:Sup3rS3cret@127.0.0.1/0")
    line = assert_one_error_line(result, 2, "http://admin:***@127.0.0.1/0")
    assert "Sup3r" not in line
    garbled = invoke(*_CONSUME, "--redis-url", "redis://admin:Sup3r/S3cr#et@127.0.0.1:notaport/0")
    assert "S3cr" not in assert_one_error_line(garbled, 2, "redis://admin:***@127.0.0.1:notaport/0")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param(
            {"STREAMWARDEN_MAX_RETRIES": "abc"},
            ["STREAMWARDEN_MAX_RETRIES='abc': Input should be a valid integer"],
            id="not-an-integer",
        ),
        pytest.param(
            {"STREAMWARDEN_MAX_RETRIES": "-1", "STREAMWARDEN_EXHAUSTED_TRANSIENT_ACTION": "bogus"},
            [
                "STREAMWARDEN_MAX_RETRIES='-1': Input should be greater than or equal to 0",
                "STREAMWARDEN_EXHAUSTED_TRANSIENT_ACTION='bogus': Input should be 'dead_letter' or 'defer'",
            ],
            id="two-bad-variables",
        ),
        pytest.param(
            {"STREAMWARDEN_DEDUP_LEASE": "1"},
            ["invalid settings: dedup_lease (1s) must be longer than processing_timeout"],
            id="inconsistent",
        ),
    ],
)
def test_invalid_settings_variables_are_one_line_each(env: dict[str, str], expected: list[str]) -> None:
    """Bad STREAMWARDEN_* values fail consume with one line per variable (name, value, what is
    allowed), exit code 1, before anything connects."""
    result = invoke("consume", "--stream", "s", "--group", "g", "--handler", "asyncio:sleep", env=env)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == len(expected), lines
    for line, text in zip(lines, expected, strict=True):
        assert line.startswith("error: ")
        assert text in line
    assert "Traceback" not in result.output
    assert "pydantic" not in result.output


def test_invalid_settings_stop_the_demo_too() -> None:
    """The embedded demo reads STREAMWARDEN_* settings as well: a bad one is one line, exit code 1."""
    result = invoke("demo", "--messages", "10", env={"STREAMWARDEN_DEDUP_FAILURE_MODE": "maybe"})
    assert_one_error_line(
        result, 1, "STREAMWARDEN_DEDUP_FAILURE_MODE='maybe'", "'fail_closed' or 'fail_open'"
    )


def test_debug_shows_the_traceback() -> None:
    """With --debug the same failure shows the traceback of its cause."""
    env = {"STREAMWARDEN_MAX_RETRIES": "abc"}
    quiet = invoke("consume", "--stream", "s", "--group", "g", "--handler", "asyncio:sleep", env=env)
    assert "Traceback" not in quiet.output
    loud = invoke(
        "--debug", "consume", "--stream", "s", "--group", "g", "--handler", "asyncio:sleep", env=env
    )
    assert loud.exit_code != 0
    assert isinstance(loud.exception, Exception)
    assert type(loud.exception).__name__ == "ValidationError"


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something else is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_control_port_in_use_is_one_line(busy_port: int) -> None:
    """A demo control port that is taken is one line naming the option and the address, exit code 1."""
    result = invoke("demo", "--live", "--max-seconds", "5", "--control-port", str(busy_port))
    assert_one_error_line(result, 1, "--control-port", f"127.0.0.1:{busy_port}", "Address already in use")


def test_bad_host_is_one_line() -> None:
    """A control host that does not resolve is one line, exit code 1."""
    result = invoke(
        "demo",
        "--live",
        "--max-seconds",
        "5",
        "--control-port",
        "1",
        "--control-host",
        "no-such-host.invalid",
    )
    assert_one_error_line(result, 1, "--control-port", "no-such-host.invalid")


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed ``streamwarden`` script in a child process."""
    return subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd, check=False
    )


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("STREAMWARDEN_", "OTEL_"))}


@pytest.mark.parametrize(
    ("args", "extra_env", "exit_code", "fragment"),
    [
        pytest.param([*_CONSUME, "--block-ms", "-1"], {}, 2, "--block-ms", id="usage"),
        pytest.param(
            ["consume", "--stream", "s", "--group", "g", "--handler", "asyncio:sleep"],
            {"STREAMWARDEN_MAX_RETRIES": "lots"},
            1,
            "STREAMWARDEN_MAX_RETRIES='lots'",
            id="settings",
        ),
        pytest.param(
            ["dlq", "count", "--redis-url", "redis://user:pa55word@127.0.0.1:1/0"],
            {},
            1,
            "cannot reach Redis at redis://user:***@127.0.0.1:1/0",
            id="unreachable",
        ),
    ],
)
def test_real_process_prints_one_line_and_exits(
    args: list[str], extra_env: dict[str, str], exit_code: int, fragment: str
) -> None:
    """In a real process: the exit code, and stderr is exactly one 'error:' line."""
    result = run_cli(*args, env={**_clean_env(), **extra_env})
    assert result.returncode == exit_code, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ")
    assert fragment in result.stderr
    assert "pa55word" not in result.stderr


def test_prometheus_port_in_use_is_one_line(busy_port: int) -> None:
    """A taken --prometheus-port is one line, exit code 1 (a real process: telemetry is process-global)."""
    result = run_cli("demo", "--messages", "10", "--prometheus-port", str(busy_port), env=_clean_env())
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"--prometheus-port: cannot listen on 127.0.0.1:{busy_port}" in result.stderr


# --- handlers ----------------------------------------------------------------------------------------
async def test_load_handler_accepts_async_forms(handlers: str) -> None:
    """Functions, bound methods (the class is created once), static methods, async __call__ objects and
    partials of async functions load."""
    assert await load_handler(f"{handlers}:ok")("m") == "m"
    method = load_handler(f"{handlers}:Orders.handle")
    assert await method("m") == "handled"
    assert method.__self__.seen == ["m"]  # type: ignore[attr-defined]
    assert await load_handler(f"{handlers}:Orders.static")("m") == "static"
    assert await load_handler(f"{handlers}:instance")("m") == "called"
    assert await load_handler(f"{handlers}:partial")("m") == "m"


@pytest.mark.parametrize(
    ("attr", "fragment"),
    [
        pytest.param("sync", "not async", id="sync-function"),
        pytest.param("Orders", "not callable", id="a-class"),
        pytest.param("NOT_CALLABLE", "not callable", id="not-callable"),
        pytest.param("Orders.missing", "cannot load", id="missing-method"),
        pytest.param("NeedsArgs.handle", "cannot create NeedsArgs()", id="class-needs-arguments"),
        pytest.param("Orders.", "module:function", id="empty-part"),
    ],
)
def test_load_handler_refuses(handlers: str, attr: str, fragment: str) -> None:
    """What cannot serve as an async handler is a usage error that says why."""
    with pytest.raises(click.BadParameter, match=fragment):
        load_handler(f"{handlers}:{attr}")


def test_sync_handler_is_refused_by_consume(handlers: str) -> None:
    """consume refuses a sync handler before connecting: one line explaining why."""
    result = invoke("consume", "--stream", "s", "--group", "g", "--handler", f"{handlers}:sync")
    assert_one_error_line(result, 2, "not async", "never be acknowledged")


# --- URLs and secrets --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param(
            "redis://u:hunter@2Secret@host:6379/0", "redis://u:***@host:6379/0", id="at-in-password"
        ),
        pytest.param("redis://u:pa/ss#wo?rd@host/0", "redis://u:***@host/0", id="slash-hash-question"),
        pytest.param("redis://:only-pw@host", "redis://***@host", id="no-user"),
        pytest.param("redis://lonely@host", "redis://***@host", id="lone-credential"),
        pytest.param("redis://host:6379/0", "redis://host:6379/0", id="no-credentials"),
        pytest.param(
            "rediss://u:p@host/0?password=qs&db=1", "rediss://u:***@host/0?password=***&db=1", id="query"
        ),
        pytest.param("u:secret@host", "***@host", id="not-a-url"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    """Credentials up to the last '@' and secret query values are replaced."""
    assert redact_url(url) == shown


PASSWORD_CHARS = st.characters(codec="utf-8", exclude_characters="%\x00\r\n")


@settings(max_examples=300, deadline=None)
@given(password=st.text(PASSWORD_CHARS, min_size=1, max_size=40))
def test_any_password_round_trips_and_never_shows(password: str) -> None:
    """Whatever a password holds ('@', '/', '#', ':', unicode...), the URL parser hands it to Redis
    unchanged and the printed form holds no 4-character piece of it that the template does not."""
    url = f"redis://user:{password}@h:1/0"
    parsed = parse_redis_url(url)
    assert parsed.password == password
    assert parsed.username == "user"
    assert parsed.url == "redis://h:1/0"
    template = "redis://user:***@h:1/0"
    assert parsed.display == template
    for size in range(4, len(password) + 1):
        for start in range(len(password) - size + 1):
            piece = password[start : start + size]
            assert piece not in redact_url(url) or piece in template


def test_percent_escapes_in_credentials_are_decoded() -> None:
    """Percent-encoded credentials are decoded, as redis-py does."""
    parsed = parse_redis_url("redis://us%40er:p%2Fw%25@h/0")
    assert (parsed.username, parsed.password) == ("us@er", "p/w%")


def test_secrets_scrub_every_form() -> None:
    """A remembered secret is scrubbed raw and percent-encoded, and URLs lose their credentials."""
    secrets = Secrets()
    secrets.add("p@ss/wörd")
    text = "p@ss/wörd p%40ss%2Fw%C3%B6rd redis://x:other@h/0"
    assert secrets.scrub(text) == "*** *** redis://x:***@h/0"


def test_json_text_is_valid_utf8_for_non_utf8_ids() -> None:
    """Lone surrogates (non-UTF-8 bytes of an id) are escaped: the text encodes, and reads back equal."""
    value = {"message_id": "m-\udcff\udc80", "text": "naïve"}
    text = json_text(value)
    text.encode("utf-8")  # would raise on a lone surrogate
    assert "naïve" in text
    assert json.loads(text) == value
    assert printable("m-\udcff") == "m-\\udcff"
