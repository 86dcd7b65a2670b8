"""``streamwarden dlq|metrics|breakers`` through click's CliRunner against a real redis-server."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import click
import pytest
import redis.asyncio
from _fixtures_dlq import OK_HANDLER_CALLS, entry
from click.testing import CliRunner, Result

from streamwarden import BreakerPolicy, BreakerRegistry, MetricsCollector
from streamwarden import _names as n
from streamwarden._classify import ErrorClass
from streamwarden._cli._ops import DEFAULT_TRACE_URL_TEMPLATE, parse_time, register, trace_url
from streamwarden._redis._breaker import SharedBreakerSync
from streamwarden._redis._dlq import RedisDeadLetterStore


@pytest.fixture
def cli() -> click.Group:
    """A bare group with the operator commands registered, as the lead's main group will have them."""

    @click.group()
    def group() -> None:
        """streamwarden (test)."""

    register(group)
    return group


@pytest.fixture
def invoke(cli: click.Group, redis_url: str) -> Any:
    """``await invoke(*args, input=None)``: run the CLI in a worker thread (it runs its own loop)."""
    runner = CliRunner()

    async def run(*args: str, input: str | None = None, env: dict[str, str | None] | None = None) -> Result:
        environment = {"STREAMWARDEN_REDIS_URL": redis_url, **(env or {})}
        return await asyncio.to_thread(runner.invoke, cli, list(args), input=input, env=environment)

    return run


@pytest.fixture
async def store(redis_client: redis.asyncio.Redis) -> RedisDeadLetterStore:
    """The Redis DLQ store the CLI reads (default key prefix), emptied before the test."""
    return RedisDeadLetterStore(redis_client)


async def test_list_shows_entries_and_filters(store: RedisDeadLetterStore, invoke: Any) -> None:
    """dlq list prints a table; --json and filters select entries."""
    first = await store.add(entry(message_id="m-1"))
    await store.add(entry("payments", message_id="m-2", error_type="KeyError"))
    table = await invoke("dlq", "list")
    assert table.exit_code == 0, table.output
    assert "m-1" in table.output
    assert "m-2" in table.output
    assert "\x1b[" not in table.output  # not a TTY: no colour codes
    only = await invoke("dlq", "list", "--error-type", "ValueError", "--since", "1h", "--json")
    assert only.exit_code == 0, only.output
    rows = [json.loads(line) for line in only.output.splitlines()]
    assert [r["entry_id"] for r in rows] == [first]
    assert rows[0]["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    none = await invoke("dlq", "list", "--until", "2000-01-01T00:00:00Z")
    assert "no dead letters match" in none.output


async def test_show_prints_every_field_and_the_trace_link(store: RedisDeadLetterStore, invoke: Any) -> None:
    """dlq show prints each field, the trace id and a link from the (env) template."""
    entry_id = await store.add(entry(source_ref="orders:5-0", attempts=4))
    shown = await invoke(
        "dlq", "show", entry_id, env={"STREAMWARDEN_TRACE_URL": "https://ui/{trace_id}/{span_id}"}
    )
    assert shown.exit_code == 0, shown.output
    for expected in (
        f"entry id: {entry_id}",
        "message id: m-1",
        "error type: ValueError",
        "attempts: 4",
        "source ref: orders:5-0",
        "trace id: 0af7651916cd43dd8448eb211c80319c",
        "trace link: https://ui/0af7651916cd43dd8448eb211c80319c/00f067aa0ba902b7",
        'payload: {"id": "m-1", "price": 10}',
        "traceback:",
    ):
        assert expected in shown.output
    as_json = json.loads((await invoke("dlq", "show", entry_id, "--json")).output)
    assert as_json["trace_url"] == trace_url(DEFAULT_TRACE_URL_TEMPLATE, as_json["trace_id"], None)
    missing = await invoke("dlq", "show", "orders/1-0")
    assert missing.exit_code == 1
    assert "no dead letter" in missing.output


async def test_count(store: RedisDeadLetterStore, invoke: Any) -> None:
    """dlq count reports per destination and in total."""
    for _ in range(3):
        await store.add(entry())
    await store.add(entry("payments"))
    counted = json.loads((await invoke("dlq", "count", "--json")).output)
    assert counted == {"destinations": {"orders": 3, "payments": 1}, "total": 4}
    one = json.loads((await invoke("dlq", "count", "-d", "payments", "--json")).output)
    assert one["total"] == 1
    table = await invoke("dlq", "count")
    assert "total" in table.output


async def test_purge_asks_unless_yes(store: RedisDeadLetterStore, invoke: Any) -> None:
    """dlq purge asks for confirmation (declining keeps everything); --yes purges at once."""
    for _ in range(2):
        await store.add(entry())
    await store.add(entry("payments"))
    declined = await invoke("dlq", "purge", input="n\n")
    assert declined.exit_code == 1
    assert "Delete 3 dead letter(s)" in declined.output
    assert await store.count() == 3
    confirmed = await invoke("dlq", "purge", "-d", "payments", input="y\n")
    assert confirmed.exit_code == 0, confirmed.output
    assert await store.count() == 2
    forced = await invoke("dlq", "purge", "--yes")
    assert "purged 2" in forced.output
    assert await store.count() == 0


async def test_replay_dry_run_then_replay(store: RedisDeadLetterStore, invoke: Any) -> None:
    """dlq replay --dry-run changes nothing; a real replay runs the handler once and removes the entry;
    a second replay finds nothing."""
    OK_HANDLER_CALLS.clear()
    entry_id = await store.add(entry(message_id="cli-1", payload={"id": "cli-1", "qty": 1}))
    dry = await invoke("dlq", "replay", "--handler", "_fixtures_dlq:ok_handler", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["counts"]["dry_run"] == 1
    assert OK_HANDLER_CALLS == []
    done = await invoke("dlq", "replay", "--handler", "_fixtures_dlq:ok_handler", "--rate", "0")
    assert done.exit_code == 0, done.output
    assert "processed 1" in done.output
    assert OK_HANDLER_CALLS == [{"id": "cli-1", "qty": 1}]
    assert await store.get(entry_id) is None
    again = await invoke("dlq", "replay", "--handler", "_fixtures_dlq:ok_handler", "--entry-id", entry_id)
    assert again.exit_code == 0
    assert "not found" in again.output
    assert len(OK_HANDLER_CALLS) == 1


async def test_replay_failure_exits_nonzero(store: RedisDeadLetterStore, invoke: Any) -> None:
    """A replay that fails again exits 1 and leaves one entry with the attempts added up."""
    await store.add(entry(message_id="cli-2", payload={"id": "cli-2"}, attempts=2))
    failed = await invoke("dlq", "replay", "--handler", "_fixtures_dlq:failing_handler", "--json")
    assert failed.exit_code == 1
    report = json.loads(failed.output)
    assert report["counts"]["failed"] == 1
    [left] = await store.list()
    assert left.attempts == 3


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        pytest.param("no_colon", "module:function", id="no-colon"),
        pytest.param("_fixtures_dlq:nope", "cannot load", id="missing-attr"),
        pytest.param("no_such_module_x:f", "cannot load", id="missing-module"),
        pytest.param("_fixtures_dlq:OK_HANDLER_CALLS", "not callable", id="not-callable"),
        pytest.param("json:loads", "not async", id="sync-function"),
    ],
)
async def test_replay_rejects_bad_handlers(invoke: Any, handler: str, message: str) -> None:
    """--handler must name an importable async callable."""
    result = await invoke("dlq", "replay", "--handler", handler)
    assert result.exit_code == 2
    assert message in result.output


async def test_metrics_prints_fleet_counters_and_rates(
    redis_client: redis.asyncio.Redis, invoke: Any
) -> None:
    """metrics reads the service's hash and derives the rates."""
    collector = MetricsCollector(redis_client, service_name="pricing")
    collector.increment(n.COUNTER_TOTAL, 8)
    collector.increment(n.COUNTER_PROCESSED, 6)
    collector.increment(n.COUNTER_FAILED, 2)
    await collector.flush()
    table = await invoke("metrics", "--service", "pricing")
    assert table.exit_code == 0, table.output
    assert "messages_processed_successfully" in table.output
    assert "75.00%" in table.output
    data = json.loads((await invoke("metrics", "--service", "pricing", "--json")).output)
    assert data["total_messages"] == 8
    assert data["success_rate"] == 0.75
    assert data["error_rate"] == 0.25


async def test_breakers_prints_shared_states(redis_client: redis.asyncio.Redis, invoke: Any) -> None:
    """breakers lists each shared breaker with its state."""
    empty = await invoke("breakers")
    assert "no shared breaker state" in empty.output
    registry = BreakerRegistry(BreakerPolicy(failure_threshold=1, reset_timeout=60.0))
    sync = SharedBreakerSync(redis_client, registry)
    breaker = registry.get("payments-api")
    breaker.record_failure(breaker.admit(), ConnectionError("down"), ErrorClass.TRANSIENT)
    registry.get("ledger")
    await sync.publish_pending()
    table = await invoke("breakers")
    assert table.exit_code == 0, table.output
    assert "payments-api" in table.output
    assert "open" in table.output
    [state] = json.loads((await invoke("breakers", "--json")).output)
    assert state["name"] == "payments-api"
    assert state["state"] == "open"
    assert 0 < state["retry_after"] <= 60


async def test_unreachable_redis_is_a_clean_error(invoke: Any, redis_server_factory: Any) -> None:
    """A Redis that is down gives a one-line error, exit code 1, and no password in it."""
    server = redis_server_factory()
    url = f"redis://user:secretpw@127.0.0.1:{server.port}/0"
    server.kill()
    result = await invoke("dlq", "count", "--redis-url", url)
    assert result.exit_code == 1
    assert (
        result.stderr
        == f"error: cannot reach Redis at redis://user:***@127.0.0.1:{server.port}/0: "
        + (result.stderr.split(f"{server.port}/0: ", 1)[1])
    )
    assert result.stderr.count("\n") == 1
    assert "secretpw" not in result.output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("15m", 1_000_000.0 - 900, id="minutes"),
        pytest.param("2h", 1_000_000.0 - 7200, id="hours"),
        pytest.param("1700000000", 1_700_000_000.0, id="epoch"),
        pytest.param("2024-01-01T00:00:00Z", 1_704_067_200.0, id="iso-z"),
        pytest.param("2024-01-01T01:00:00+01:00", 1_704_067_200.0, id="iso-offset"),
        pytest.param("2024-01-01T00:00:00", 1_704_067_200.0, id="iso-naive-is-utc"),
    ],
)
def test_parse_time(text: str, expected: float) -> None:
    """--since/--until accept ages, epoch seconds and ISO 8601 times."""
    assert parse_time(text, now=1_000_000.0) == expected


def test_parse_time_rejects_garbage() -> None:
    """An unreadable time is a usage error."""
    with pytest.raises(click.BadParameter):
        parse_time("yesterday-ish")


_COLOUR = re.compile(r"\x1b\[[0-9;]*3[0-7](;[0-9]+)*m")


@pytest.mark.parametrize(
    ("env", "coloured"),
    [
        pytest.param({}, False, id="not-a-tty"),
        pytest.param({"FORCE_COLOR": "1"}, True, id="terminal"),
        pytest.param({"FORCE_COLOR": "1", "NO_COLOR": "1"}, False, id="terminal-NO_COLOR"),
    ],
)
async def test_colour_follows_the_terminal_and_no_color(
    redis_client: redis.asyncio.Redis, invoke: Any, env: dict[str, str], coloured: bool
) -> None:
    """Colour only on a terminal, and never with NO_COLOR."""
    registry = BreakerRegistry(BreakerPolicy(failure_threshold=1, reset_timeout=60.0))
    sync = SharedBreakerSync(redis_client, registry)
    breaker = registry.get("colourful")
    breaker.record_failure(breaker.admit(), ConnectionError("down"), ErrorClass.TRANSIENT)
    await sync.publish_pending()
    result = await invoke("breakers", env={"NO_COLOR": None, "FORCE_COLOR": None, **env})
    assert result.exit_code == 0, result.output
    assert "colourful" in result.output
    assert bool(_COLOUR.search(result.output)) is coloured


# --- misuse and hostile input ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["dlq", "purge", "-d", "paymnets", "--yes"], id="purge-yes"),
        pytest.param(["dlq", "purge", "-d", "paymnets"], id="purge-asks"),
        pytest.param(["dlq", "count", "-d", "paymnets"], id="count"),
        pytest.param(["dlq", "list", "-d", "paymnets"], id="list"),
        pytest.param(
            ["dlq", "replay", "-d", "paymnets", "--handler", "_fixtures_dlq:ok_handler"], id="replay"
        ),
    ],
)
async def test_unknown_destination_is_an_error(
    store: RedisDeadLetterStore, invoke: Any, args: list[str]
) -> None:
    """A --destination that names no dead-letter queue (a typo) is one error line and exit code 1,
    never 'purged 0'; nothing is deleted."""
    await store.add(entry("payments"))
    result = await invoke(*args)
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [
        "error: no dead-letter queue for destination 'paymnets' (known destinations: 'payments')"
    ]
    assert "purged" not in result.output
    assert await store.count() == 1


async def test_non_utf8_ids_print_as_valid_json_and_tables(store: RedisDeadLetterStore, invoke: Any) -> None:
    """Entries whose ids are not UTF-8 print as valid UTF-8 JSON (escaped surrogates that read back to
    the same id) and as readable tables."""
    odd = "m-\udcff\udcfe"
    entry_id = await store.add(entry(message_id=odd, payload={"id": odd}, headers={"k\udcff": "v\udc80"}))
    listed = await invoke("dlq", "list", "--json")
    assert listed.exit_code == 0, listed.output
    [row] = [json.loads(line) for line in listed.stdout_bytes.decode("utf-8").splitlines()]
    assert row["message_id"] == odd
    shown = await invoke("dlq", "show", entry_id, "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout_bytes.decode("utf-8"))["message_id"] == odd
    table = await invoke("dlq", "show", entry_id)
    assert table.exit_code == 0, table.output
    assert "m-\\udcff\\udcfe" in table.stdout_bytes.decode("utf-8")
    assert (await invoke("dlq", "list")).exit_code == 0


#: A password with everything that breaks naive URL handling: '@', '/', '#', '?', ':', '%', unicode.
HOSTILE_PASSWORD = "Zq@7/xK#Rw?:Lp%zΩé@Nv8"


def pieces(secret: str, size: int = 4) -> list[str]:
    """Every substring of ``secret`` of ``size`` or more characters."""
    return [secret[i:j] for i in range(len(secret)) for j in range(i + size, len(secret) + 1)]


def assert_no_piece(secret: str, *outputs: str) -> None:
    """No output holds any 4-character piece of ``secret``."""
    for output in outputs:
        leaked = [piece for piece in pieces(secret) if piece in output]
        assert not leaked, (leaked, output)


@pytest.fixture
async def hostile_user(redis_client: redis.asyncio.Redis, redis_url: str) -> str:
    """An ACL user ``hostile`` whose password is :data:`HOSTILE_PASSWORD`; returns host:port/db."""
    await redis_client.execute_command(
        "ACL", "SETUSER", "hostile", "reset", "on", f">{HOSTILE_PASSWORD}", "~*", "&*", "+@all"
    )
    return redis_url.removeprefix("redis://")


@pytest.mark.parametrize(
    "how",
    [
        pytest.param("raw-url", id="raw-in-url"),
        pytest.param("encoded-url", id="percent-encoded-url"),
        pytest.param("options", id="options"),
        pytest.param("env", id="env"),
    ],
)
async def test_hostile_password_works_and_never_shows(
    store: RedisDeadLetterStore, invoke: Any, hostile_user: str, how: str
) -> None:
    """A password with '@', '/', '#', ':', '%' and unicode authenticates however it is given, and no
    output (tables, --json, errors, logs at DEBUG) holds any 4-character piece of it."""
    from urllib.parse import quote

    await store.add(entry(error_message="boom"))
    env: dict[str, str | None] = {}
    args: list[str] = []
    if how == "raw-url":
        args = ["--redis-url", f"redis://hostile:{HOSTILE_PASSWORD}@{hostile_user}"]
    elif how == "encoded-url":
        args = ["--redis-url", f"redis://hostile:{quote(HOSTILE_PASSWORD, safe='')}@{hostile_user}"]
    elif how == "options":
        args = [
            "--redis-url",
            f"redis://{hostile_user}",
            "--username",
            "hostile",
            "--password",
            HOSTILE_PASSWORD,
        ]
    else:
        env = {
            "STREAMWARDEN_REDIS_URL": f"redis://{hostile_user}",
            "STREAMWARDEN_REDIS_USERNAME": "hostile",
            "STREAMWARDEN_REDIS_PASSWORD": HOSTILE_PASSWORD,
        }
    results = [
        await invoke("dlq", "count", "--json", *args, env=env),
        await invoke("dlq", "list", *args, env=env),
        await invoke("metrics", "--json", *args, env=env),
        await invoke("breakers", *args, env=env),
        await invoke(
            "dlq", "replay", "--handler", "_fixtures_dlq:ok_handler", "--dry-run", "--log-level", "DEBUG",
            *args, env=env,
        ),
    ]  # fmt: skip
    for result in results:
        assert result.exit_code == 0, result.output
        assert_no_piece(HOSTILE_PASSWORD, result.stdout, result.stderr)
    assert json.loads(results[0].stdout)["total"] == 1


async def test_wrong_hostile_password_is_one_line(invoke: Any, hostile_user: str) -> None:
    """A refused password is one line naming the URL without its credentials, exit code 1."""
    wrong = HOSTILE_PASSWORD[::-1]
    result = await invoke("dlq", "count", "--redis-url", f"redis://hostile:{wrong}@{hostile_user}")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(
        f"error: Redis authentication failed at redis://hostile:***@{hostile_user}: "
    )
    assert result.stderr.count("\n") == 1
    assert_no_piece(wrong, result.output)


async def test_key_prefix_selects_the_queues(redis_client: redis.asyncio.Redis, invoke: Any) -> None:
    """--key-prefix (and STREAMWARDEN_KEY_PREFIX) select whose dead letters the commands read."""
    await RedisDeadLetterStore(redis_client, key_prefix="tenant-a").add(entry())
    assert (
        json.loads((await invoke("dlq", "count", "--json", "--key-prefix", "tenant-a")).output)["total"] == 1
    )
    from_env = await invoke("dlq", "count", "--json", env={"STREAMWARDEN_KEY_PREFIX": "tenant-a"})
    assert json.loads(from_env.output)["total"] == 1
    assert json.loads((await invoke("dlq", "count", "--json")).output)["total"] == 0
