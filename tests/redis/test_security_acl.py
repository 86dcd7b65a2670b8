"""ACL users: the least-privilege user of docs/security.md, applied as written, runs a real consumer
workload and nothing more; permission errors are configuration errors."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions
from _fixtures_dlq import Handler, make_layer
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from _redis_server import RedisServer
from _support import Otel, eventually
from streamwarden import (
    BreakerPolicy,
    BreakerRegistry,
    Envelope,
    ErrorClass,
    ErrorClassifier,
    InMemoryDeadLetterStore,
    Outcome,
    RedisStreamConsumer,
    ReliabilityLayer,
    ReliabilitySettings,
    StreamProducer,
)
from streamwarden import _names as n
from streamwarden._redis._breaker import SharedBreakerSync, read_shared_breakers
from streamwarden._redis._dlq import RedisDeadLetterStore
from streamwarden._replay import DeadLetterReplayer, ReplayResult

PASSWORD = "s3cret-pw"
SECURITY_MD = Path(__file__).resolve().parents[2] / "docs" / "security.md"


@dataclass(frozen=True)
class DocumentedUser:
    """The ``ACL SETUSER`` of docs/security.md: the user name and its rules, the password filled in."""

    name: str
    rules: tuple[str, ...]

    @property
    def granted(self) -> set[str]:
        """The commands the rules grant one by one (``+cmd``), lower case."""
        return {rule[1:].lower() for rule in self.rules if rule.startswith("+") and not rule.startswith("+@")}


def documented_user() -> DocumentedUser:
    """Parse the one ```acl block of docs/security.md (continuation lines joined, ``#`` comments
    dropped) and put the test password in place of ``PASSWORD``."""
    blocks = re.findall(r"^```acl\n(.*?)^```", SECURITY_MD.read_text(), flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, "docs/security.md must hold exactly one ```acl block"
    words = " ".join(line.split("#", 1)[0] for line in blocks[0].splitlines()).split()
    assert [w.upper() for w in words[:2]] == ["ACL", "SETUSER"]
    rules = tuple(f">{PASSWORD}" if word == ">PASSWORD" else word for word in words[3:])
    return DocumentedUser(words[2], rules)


def read_only_operator_rules() -> tuple[str, ...]:
    """The keys and commands of the read-only operator row of docs/security.md's role table."""
    row = next(
        line for line in SECURITY_MD.read_text().splitlines() if line.startswith("| operator, read-only")
    )
    keys, commands = (re.findall(r"`([^`]+)`", cell) for cell in row.split(" | ")[1:3])
    return ("resetkeys", *keys, "resetchannels", "-@all", *" ".join(commands).split())


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    """A redis-server of this module's own: ACL users must not leak into the shared server."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def connect(acl_server: RedisServer) -> AsyncIterator[Callable[..., redis.asyncio.Redis]]:
    """``connect(user=None, password=None)``: clients (no retries) closed after the test; the
    server is flushed first."""
    made: list[redis.asyncio.Redis] = []

    def new(user: str | None = None, password: str | None = None) -> redis.asyncio.Redis:
        client = redis.asyncio.Redis.from_url(
            acl_server.url, username=user, password=password, retry=Retry(NoBackoff(), 0)
        )
        made.append(client)
        return client

    await new().flushall()
    yield new
    for client in made:
        await client.aclose()


@pytest.fixture
async def least_privileged(connect: Callable[..., redis.asyncio.Redis]) -> redis.asyncio.Redis:
    """A client of the documented user, created exactly as docs/security.md writes it."""
    user = documented_user()
    await connect().execute_command("ACL", "SETUSER", user.name, *user.rules)
    return connect(user.name, PASSWORD)


async def test_documented_user_runs_a_real_consumer_workload(
    least_privileged: redis.asyncio.Redis, connect: Callable[..., redis.asyncio.Redis]
) -> None:
    """Under the documented rules, a RedisStreamConsumer on ``orders`` runs its messages through a
    layer on Redis (dedup, DLQ write, counters); the failed one is replayed from the DLQ; nothing is
    left pending and no command was refused."""
    client, admin = least_privileged, connect()
    layer = ReliabilityLayer(
        client, ReliabilitySettings(max_retries=0, processing_timeout=None, destination="orders")
    )
    producer = StreamProducer(client, "orders")
    done = asyncio.Event()
    runs: list[Any] = []

    async def handler(envelope: Envelope) -> str:
        runs.append(envelope.payload)
        if len(runs) >= 4:
            done.set()
        if envelope.payload == {"n": "bad"}:
            raise ValueError("bad order")
        return "ok"

    for i in range(3):
        await producer.send({"n": i}, message_id=f"ok-{i}")
    await producer.send({"n": "bad"}, message_id="bad-1")
    consumer = RedisStreamConsumer(
        client, stream="orders", group="billing", consumer="c1", handler=handler, layer=layer, block_ms=20
    )
    running = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(done.wait(), timeout=15.0)
        store = layer.dead_letter_store
        assert isinstance(store, RedisDeadLetterStore)

        async def settled() -> bool:
            pending = await admin.xpending("orders", "billing")
            return int(pending["pending"]) == 0 and await store.count("orders") == 1

        await eventually(settled)
    finally:
        consumer.stop()
        await asyncio.wait_for(running, timeout=15.0)
    assert sorted(str(m) for m in runs) == sorted(str({"n": x}) for x in (0, 1, 2, "bad"))
    (entry,) = await store.list("orders")
    assert entry.message_id == "bad-1"

    async def fixed(message: Any) -> str:
        return "ok"

    report = await DeadLetterReplayer(layer, store, rate_per_second=None).replay(fixed)
    assert [i.result for i in report.items] == [ReplayResult.PROCESSED]
    assert await store.count("orders") == 0
    await layer.metrics_collector.flush()
    assert (await layer.metrics_collector.get_reliability_metrics())[n.COUNTER_TOTAL] >= 5
    await layer.aclose()


async def test_documented_user_runs_breakers_and_dlq_operations(
    least_privileged: redis.asyncio.Redis,
) -> None:
    """The shared breaker state and the DLQ's list/count/purge work under the documented user too."""
    client = least_privileged
    layer = ReliabilityLayer(client, ReliabilitySettings(max_retries=0, processing_timeout=None))
    assert (await layer.process({"id": "acl-1"}, Handler(fail=True))).outcome is Outcome.DEAD_LETTERED
    store = layer.dead_letter_store
    assert isinstance(store, RedisDeadLetterStore)
    assert await store.refresh_depths() == {"default": 1}
    await layer.verify_stores()  # CONFIG GET is refused: the eviction check is skipped, not failed
    registry = BreakerRegistry(BreakerPolicy(failure_threshold=1, reset_timeout=30.0))
    sync = SharedBreakerSync(client, registry)
    breaker = registry.get("dep")
    breaker.record_failure(breaker.admit(), ConnectionError("down"), ErrorClass.TRANSIENT)
    assert await sync.publish_pending() == 1
    await sync.poll_once()
    assert [s.state for s in await read_shared_breakers(client)] == ["open"]
    assert await store.purge() == 1
    assert await store.count() == 0


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(("SCAN", "0"), id="scan"),
        pytest.param(("KEYS", "*"), id="keys"),
        pytest.param(("RANDOMKEY",), id="randomkey"),
        pytest.param(("FLUSHALL",), id="flushall"),
        pytest.param(("CONFIG", "GET", "maxmemory"), id="config"),
        pytest.param(("SET", "other-app:key", "1"), id="foreign-key-write"),
        pytest.param(("HGETALL", "other-app:hash"), id="foreign-key-read"),
        pytest.param(("XADD", "payments", "*", "f", "v"), id="another-stream"),
        pytest.param(("SUBSCRIBE", "streamwarden:x"), id="pubsub"),
    ],
)
async def test_documented_user_is_really_limited(
    least_privileged: redis.asyncio.Redis, command: tuple[str, ...]
) -> None:
    """The user can neither list key names (SCAN, KEYS, RANDOMKEY) nor run dangerous commands, nor
    touch keys, streams or channels outside its own."""
    with pytest.raises(redis.exceptions.NoPermissionError):
        await least_privileged.execute_command(*command)


async def test_documented_user_holds_no_dangerous_command(
    connect: Callable[..., redis.asyncio.Redis],
) -> None:
    """The documented rules start from ``-@all`` and grant single commands, none of them in Redis'
    ``@dangerous`` category; the server agrees (ACL DRYRUN refuses the keyspace listings)."""
    admin = connect()
    user = documented_user()
    assert "-@all" in user.rules
    assert not [rule for rule in user.rules if rule.startswith("+@")]
    dangerous = {as_name(c) for c in await admin.command_list(category="dangerous")}
    assert user.granted.isdisjoint(dangerous)
    assert {"scan", "keys", "randomkey"}.isdisjoint(user.granted)
    await admin.execute_command("ACL", "SETUSER", user.name, *user.rules)
    for command in (("SCAN", "0"), ("KEYS", "*"), ("RANDOMKEY",)):
        verdict = as_name(await admin.execute_command("ACL", "DRYRUN", user.name, *command))
        assert "no permissions" in verdict


async def test_read_only_operator_reads_and_cannot_write(connect: Callable[..., redis.asyncio.Redis]) -> None:
    """The read-only operator of the role table (as written there) lists, shows and counts dead letters
    and reads counters and breakers, and cannot write or delete any of them."""
    admin = connect()
    writer = ReliabilityLayer(admin, ReliabilitySettings(max_retries=0, processing_timeout=None))
    assert (await writer.process({"id": "ro-1"}, Handler(fail=True))).outcome is Outcome.DEAD_LETTERED
    await writer.metrics_collector.flush()
    await admin.execute_command(
        "ACL", "SETUSER", "operator", "reset", "on", f">{PASSWORD}", *read_only_operator_rules()
    )
    reader = connect("operator", PASSWORD)
    store = RedisDeadLetterStore(reader)
    (entry,) = await store.list()
    assert entry.entry_id is not None
    assert await store.get(entry.entry_id) == entry
    assert await store.count() == 1
    assert await read_shared_breakers(reader) == []
    with pytest.raises(redis.exceptions.NoPermissionError):
        await store.delete(entry.entry_id)
    with pytest.raises(redis.exceptions.NoPermissionError):
        await reader.hset("streamwarden:dlq-index", "x", "y")
    with pytest.raises(redis.exceptions.NoPermissionError):
        await reader.execute_command("SCAN", "0")


def as_name(value: Any) -> str:
    """A reply value as ``str``."""
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.mark.parametrize(
    ("user", "password"),
    [
        pytest.param("orders-svc", "wrong", id="wrong-password"),
        pytest.param("nobody", PASSWORD, id="unknown-user"),
    ],
)
async def test_bad_credentials_fail_closed(
    connect: Callable[..., redis.asyncio.Redis],
    least_privileged: redis.asyncio.Redis,
    user: str,
    password: str,
) -> None:
    """Wrong ACL credentials: an authentication error, and the layer processes nothing."""
    client = connect(user, password)
    with pytest.raises(redis.exceptions.AuthenticationError):
        await client.ping()
    handler = Handler(fail=False)
    result = await ReliabilityLayer(client, ReliabilitySettings(processing_timeout=None)).process(
        {"id": "auth-1"}, handler
    )
    assert result.outcome is Outcome.DEFERRED
    assert handler.calls == []


async def test_permission_errors_are_permanent_and_never_trip_the_breaker(
    least_privileged: redis.asyncio.Redis,
) -> None:
    """A handler hitting NOPERM is not retried and, past the breaker threshold, leaves it closed."""

    async def handler(message: Any) -> None:
        await least_privileged.flushall()  # denied by the ACL: a real NoPermissionError

    layer = make_layer(InMemoryDeadLetterStore(), circuit_breaker_threshold=2, max_retries=3)
    for i in range(3):
        result = await layer.process({"id": f"np-{i}"}, handler)
        assert result.outcome is Outcome.DEAD_LETTERED
        assert isinstance(result.error, redis.exceptions.NoPermissionError)
        assert result.attempts == 1
        assert result.dead_letter is not None
        assert result.dead_letter.error_class == "permanent"
    assert layer.circuit_breaker.state == "closed"
    assert ErrorClassifier().classify(redis.exceptions.NoPermissionError("x")) is ErrorClass.PERMANENT


async def test_dlq_write_denied_by_acl_is_not_acknowledged(
    connect: Callable[..., redis.asyncio.Redis], otel: Otel
) -> None:
    """A user without write access to the DLQ keys: the layer returns FAILED (not acknowledged) and
    counts streamwarden.dlq.write_errors; nothing is written."""
    admin = connect()
    user = documented_user()
    rules = [r for r in user.rules if not r.startswith("~")]
    rules += ["~streamwarden:dlq-index", "%R~streamwarden:dlq:*"]  # may read dead letters, not write them
    await admin.execute_command("ACL", "SETUSER", "reader", *rules)
    store = RedisDeadLetterStore(connect("reader", PASSWORD))
    layer = ReliabilityLayer(
        None,
        ReliabilitySettings(max_retries=0, processing_timeout=None, destination="orders"),
        dead_letter_store=store,
        meter_provider=otel.meter_provider,
    )
    result = await layer.process({"id": "denied-1"}, Handler(fail=True))
    assert result.outcome is Outcome.FAILED
    assert not result.should_ack
    assert any("dead-letter write failed" in note for note in getattr(result.error, "__notes__", []))
    errors = otel.points(n.METRIC_DLQ_WRITE_ERRORS)
    assert [value for _, value in errors] == [1]
    assert errors[0][0][n.ATTR_MESSAGING_DESTINATION] == "orders"
    assert await admin.xlen("streamwarden:dlq:orders") == 0
    assert await store.list() == []  # reading is still allowed
