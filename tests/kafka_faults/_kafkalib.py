"""The Kafka rig of the fault-injection suite: a broker, ``streamwarden consume --kafka-bootstrap`` processes,
the ledger, and probes of the group's committed offsets, the dead letters and the counters.

A :class:`KafkaFaultRig` owns one topic on its own Tansu broker (``tests/_kafka_broker.py``: the test may
SIGSTOP or kill it), one consumer group, a redis-server for the dedup records, counters and (by default)
the dead letters, a ledger directory that the shared handler ``tests/faults/_fault_handler.py`` appends
to (used as is: its actions, marker files and takeover lines are transport-neutral), and every consumer
process it spawns; :meth:`KafkaFaultRig.close` kills them all.

**The oracle** (:meth:`KafkaFaultRig.assert_oracle`), after the group settled:

* lost = 0: every produced id ran to its ``effect`` or sits in the dead-letter queue;
* every duplicate execution is counted: for each id, ``effects - 1 <= takeovers`` (the ``takeover``
  line is written before the handler runs again, so a second run without one is an uncounted
  duplicate);
* nothing committed ran to nothing: every record below the committed offset of its partition ran to
  its effect or is dead-lettered (:meth:`KafkaFaultRig.assert_no_unprocessed_committed`, checked at
  every poll of :meth:`KafkaFaultRig.settled`). Offsets are read before the ledger and the DLQ: a
  commit always follows the effect or the confirmed DLQ write, so what was committed when the offsets
  were read is visible in what is read after.

The checks a poll repeats are incremental, so a long soak's poll costs what changed since the last one:
the ledger is followed by a ``LedgerTail`` (new lines only, running counts per id), the Redis DLQ from
the last entry seen, and each partition's records are checked once, when the committed offset first
passes them (what is done stays done: ledger lines and dead letters are only ever added).

The ledger lines themselves (``Ledger``, ``LedgerTail``) are ``tests/faults/_faultlib.py``'s, reused as is.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio
import redis.exceptions
from _faultlib import Ledger, LedgerTail, free_port
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from _kafka_broker import KafkaBroker
from _support import eventually

KAFKA_FAULTS_DIR = Path(__file__).resolve().parent
FAULTS_DIR = KAFKA_FAULTS_DIR.parent / "faults"
HANDLER = "_fault_handler:handle"
KEY_PREFIX = "streamwarden"
SERVICE = "kafka-faults"
ID_HEADER = "message_id"
# A probe of the broker (committed offsets) gives up after this long: the broker may be SIGSTOPped.
PROBE_S = 3.0

# Settings every consumer gets unless a test overrides them: short leases so takeovers happen in
# seconds, fast retries, the breaker out of the way unless a scenario wants it.
BASE_SETTINGS: dict[str, str] = {
    "STREAMWARDEN_DEDUP_LEASE": "2.0",
    "STREAMWARDEN_PROCESSING_TIMEOUT": "1.5",
    "STREAMWARDEN_RETRY_INITIAL_DELAY": "0.01",
    "STREAMWARDEN_RETRY_MAX_DELAY": "0.05",
    "STREAMWARDEN_SERVICE_NAME": SERVICE,
}
# CLI options: a 2 s session (Tansu answers a JoinGroup after ~1 s with it; a dead member's partitions
# move after 2 s), a revoke timeout below it, a short poll so stops and pauses are quick.
BASE_OPTIONS: dict[str, Any] = {
    "concurrency": 8,
    "batch_size": 8,
    "block_ms": 100,
    "ordering": "unordered",
    "session_timeout_ms": 2000,
    "revoke_timeout": 1.0,
    "shutdown_timeout": 5.0,
    "flush_every": 0.25,
}


def consume_command() -> list[str]:
    """The ``streamwarden`` entry point of this interpreter's environment."""
    script = Path(sys.executable).parent / "streamwarden"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from streamwarden._cli import main; main()"]


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


# The transport's INFO line at each assignment: "consumer c1 assigned orders/0, orders/1" ("nothing").
_ASSIGNED = re.compile(r"consumer \S+ assigned ((?:nothing|[\w.-]+/\d+(?:, [\w.-]+/\d+)*))")


# --- consumer processes -----------------------------------------------------------------------------
@dataclass
class KafkaConsumerProcess:
    """One ``streamwarden consume --kafka-bootstrap`` OS process."""

    name: str
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    health_port: int | None = None
    stopped: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def kill(self) -> None:
        """``kill -9`` and reap."""
        if self.alive():
            if self.stopped:
                self.sigcont()
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def sigstop(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        self.stopped = True

    def sigcont(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    def sigterm(self) -> None:
        if self.alive():
            if self.stopped:
                self.sigcont()
            self.proc.send_signal(signal.SIGTERM)

    async def terminate(self, timeout: float = 30.0) -> float:
        """SIGTERM and wait for the exit (off the event loop); returns the seconds it took."""
        started = time.monotonic()
        self.sigterm()
        await asyncio.to_thread(self.proc.wait, timeout)
        return time.monotonic() - started

    def assignments(self) -> int:
        """How many partition assignments this member logged (one per rebalance it took part in)."""
        return len(_ASSIGNED.findall(self.stderr()))

    def assigned(self) -> set[int]:
        """The partitions of this member's last logged assignment."""
        found = _ASSIGNED.findall(self.stderr())
        if not found or found[-1].strip() == "nothing":
            return set()
        return {int(part.rsplit("/", 1)[1]) for part in found[-1].split(", ")}

    def stats_line(self) -> dict[str, Any]:
        """The ``stopped: read …, acked …`` line a consumer prints when it exits gracefully."""
        found = re.search(
            r"stopped: read (\d+), acked (\d+), not acked (\d+), outcomes (\{.*?\})",
            self.stderr().replace("\n", " "),
        )
        if found is None:
            raise AssertionError(f"{self.name} printed no stats line; stderr:\n{self.stderr()}")
        import ast

        return {
            "read": int(found.group(1)),
            "acked": int(found.group(2)),
            "not_acked": int(found.group(3)),
            "outcomes": ast.literal_eval(found.group(4)),  # the CLI prints a dict repr
        }

    def readyz(self) -> int:
        """The status code of this consumer's ``/readyz`` (0 when it does not answer)."""
        assert self.health_port is not None, "spawned without health=True"
        url = f"http://127.0.0.1:{self.health_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)
        except OSError:
            return 0


@dataclass(frozen=True)
class Produced:
    """Where one produced message landed."""

    message_id: str
    partition: int
    offset: int


# --- the rig ----------------------------------------------------------------------------------------
class KafkaFaultRig:
    """One topic and group on a broker of this test's own, its consumer processes, ledger and markers."""

    def __init__(
        self,
        broker: KafkaBroker,
        redis_url: str,
        workdir: Path,
        *,
        topic: str = "orders",
        group: str = "workers",
    ) -> None:
        self.broker = broker
        self.redis_url = redis_url
        self.topic = topic
        self.group = group
        self.partitions = 0
        self.ledger_dir = workdir / "ledger"
        self.ctrl_dir = workdir / "ctrl"
        self.log_dir = workdir / "logs"
        for d in (self.ledger_dir, self.ctrl_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=10)
        self.consumers: list[KafkaConsumerProcess] = []
        self.produced: list[Produced] = []
        self.dead_lettered: set[str] = set()  # every id ever seen in the DLQ (a purge does not unsee it)
        self.tail = LedgerTail(self.ledger_dir)  # the ledger as it grows: running counts per id
        self._by_partition: dict[int, list[Produced]] = {}  # in offset order
        self._checked: dict[int, int] = {}  # per partition: how many records were found done below a commit
        self._dlq_seen = ""  # the last Redis DLQ entry id folded into dead_lettered
        self._kafka_dlq = False  # a member was spawned with dlq="kafka" ({topic}.dlq may hold entries)
        self._producer: AIOKafkaProducer | None = None
        self._reader: AIOKafkaConsumer | None = None

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    # -- the topic ------------------------------------------------------------------------------
    async def create_topic(self, partitions: int = 1) -> None:
        """Create the topic up front, so consumers started later still read every record."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(self.topic, partitions, 1)])
        finally:
            await admin.close()
        self.partitions = partitions

    async def produce(
        self,
        messages: Iterable[tuple[str, Mapping[str, Any]]],
        *,
        key: Callable[[str], str | None] = lambda _mid: None,
        partition: int | Callable[[int], int] | None = None,
    ) -> list[Produced]:
        """Send each ``(message id, payload)`` with the id in the ``message_id`` header, confirmed by the
        broker; round-robin over the partitions unless ``partition`` (a number, or ``i -> number``)."""
        if self._producer is None:
            self._producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap, enable_idempotence=False, acks="all", linger_ms=2
            )
            await self._producer.start()
        futures = []
        items = list(messages)
        base = len(self.produced)
        for i, (message_id, payload) in enumerate(items):
            if partition is None:
                where = (base + i) % max(1, self.partitions)
            else:
                where = partition(i) if callable(partition) else partition
            k = key(message_id)
            futures.append(
                await self._producer.send(
                    self.topic,
                    value=json.dumps(payload).encode(),
                    key=None if k is None else k.encode(),
                    partition=where,
                    headers=[(ID_HEADER, message_id.encode())],
                )
            )
        out = []
        for (message_id, _), future in zip(items, futures, strict=True):
            meta = await future
            out.append(Produced(message_id, meta.partition, meta.offset))
        self.produced += out
        for produced in out:  # each partition's offsets only grow, send after send
            self._by_partition.setdefault(produced.partition, []).append(produced)
        return out

    def where(self, message_id: str) -> Produced:
        [found] = [p for p in self.produced if p.message_id == message_id]
        return found

    def ends(self) -> dict[int, int]:
        """The end offset of every partition the rig produced to."""
        return {partition: records[-1].offset + 1 for partition, records in self._by_partition.items()}

    async def committed(self) -> dict[int, int]:
        """The group's committed offset per partition (0 where nothing is committed), read by a
        consumer that never joins the group; bounded by :data:`PROBE_S` (``TimeoutError``)."""
        if self._reader is None:
            reader = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                group_id=self.group,
                enable_auto_commit=False,
                request_timeout_ms=int(PROBE_S * 1000),
            )
            await asyncio.wait_for(reader.start(), timeout=PROBE_S)
            self._reader = reader
        try:
            offsets = {}
            for p in range(self.partitions):
                found = await asyncio.wait_for(
                    self._reader.committed(TopicPartition(self.topic, p)), timeout=PROBE_S
                )
                offsets[p] = found if found is not None and found >= 0 else 0
            return offsets
        except BaseException:
            reader, self._reader = self._reader, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.stop(), timeout=PROBE_S)
            raise

    # -- processes ------------------------------------------------------------------------------
    def spawn(
        self,
        name: str,
        *,
        settings: Mapping[str, str] | None = None,
        dlq: str = "redis",
        health: bool = False,
        **options: Any,
    ) -> KafkaConsumerProcess:
        """Start ``streamwarden consume --kafka-bootstrap`` as member ``name``; ``options`` are CLI options
        (snake_case; ``True`` for a flag). Dedup records and counters live in Redis; dead letters there
        too unless ``dlq="kafka"`` (``{topic}.dlq``)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMWARDEN_", "OTEL_"))}
        env.update(BASE_SETTINGS)
        env.update(settings or {})
        env.update(
            PYTHONPATH=os.pathsep.join([str(FAULTS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            SW_FAULT_LEDGER_DIR=str(self.ledger_dir),
            SW_FAULT_CTRL_DIR=str(self.ctrl_dir),
            NO_COLOR="1",
            COLUMNS="400",
        )
        merged = {**BASE_OPTIONS, **options}
        argv = [
            *consume_command(), "consume",
            "--kafka-bootstrap", self.bootstrap,
            "--topic", self.topic,
            "--group", self.group,
            "--consumer-name", name,
            "--handler", HANDLER,
            "--redis-url", self.redis_url,
            "--dlq", dlq,
        ]  # fmt: skip
        for key, value in merged.items():
            flag = f"--{key.replace('_', '-')}"
            if value is True:
                argv.append(flag)
            elif value is not False:
                argv += [flag, str(value)]
        health_port = None
        if health:
            health_port = free_port()
            argv += ["--health-port", str(health_port)]
        incarnation = sum(1 for c in self.consumers if c.name == name)
        stderr_path = self.log_dir / f"{name}.{incarnation}.stderr"
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT, env=env, cwd=FAULTS_DIR
            )
        consumer = KafkaConsumerProcess(name, proc, stderr_path, health_port=health_port)
        self.consumers.append(consumer)
        self._kafka_dlq = self._kafka_dlq or dlq == "kafka"
        return consumer

    def live(self) -> list[KafkaConsumerProcess]:
        return [c for c in self.consumers if c.alive()]

    async def stop_all(self, timeout: float = 30.0) -> None:
        """SIGTERM every live consumer and wait until they exited (they flush their counters on exit)."""
        for consumer in self.consumers:
            consumer.sigterm()
        for consumer in self.consumers:
            await asyncio.to_thread(consumer.proc.wait, timeout)

    async def close(self) -> None:
        for consumer in self.consumers:
            consumer.kill()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader.stop(), timeout=PROBE_S)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), timeout=PROBE_S)
        await self.client.aclose()

    def diagnostics(self) -> str:
        """Every consumer's stderr (its tail), for assertion messages."""
        return "\n".join(
            f"--- {c.name} (pid {c.pid}, rc {c.proc.poll()}) ---\n{c.stderr()[-4000:]}"
            for c in self.consumers
        )

    # -- marker files ---------------------------------------------------------------------------
    def release(self) -> None:
        """Let every ``hang_*`` handler continue."""
        (self.ctrl_dir / "release").touch()

    def outage(self, on: bool) -> None:
        """Start or end a downstream outage (every handler fails transiently while it lasts)."""
        path = self.ctrl_dir / "outage"
        if on:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    # -- outcomes -------------------------------------------------------------------------------
    def ledger(self) -> Ledger:
        return Ledger.read(self.ledger_dir)

    async def dlq(self) -> list[dict[str, str]]:
        """The dead-letter entries of the topic, fields as text, from Redis and, once a member was spawned
        with ``dlq="kafka"``, from ``{topic}.dlq``."""
        entries = await self.client.xrange(f"{KEY_PREFIX}:dlq:{self.topic}", "-", "+")
        found = [{_text(k): _text(v) for k, v in fields.items()} for _, fields in entries]
        self.dead_lettered.update(e["message_id"] for e in found)
        return found + (await self.kafka_dlq() if self._kafka_dlq else [])

    async def kafka_dlq(self) -> list[dict[str, str]]:
        """The live entries of ``{topic}.dlq`` (none when the topic does not exist)."""
        from streamwarden._kafka import KafkaDeadLetterStore

        store = KafkaDeadLetterStore(self.bootstrap, read_timeout=PROBE_S, request_timeout_ms=2000)
        try:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            await admin.start()
            try:
                if store.dlq_topic(self.topic) not in await admin.list_topics():
                    return []
            finally:
                await admin.close()
            entries = await store.list(self.topic, limit=10_000)
        finally:
            await store.aclose()
        found = [
            {"message_id": e.message_id or "", "reason": e.reason, "attempts": str(e.attempts)}
            for e in entries
        ]
        self.dead_lettered.update(e["message_id"] for e in found)
        return found

    async def counters(self, service: str = SERVICE) -> Counter[str]:
        """The counters hash ``streamwarden:metrics:{service}`` (what the consumers flushed; 0 if absent)."""
        raw = await self.client.hgetall(f"{KEY_PREFIX}:metrics:{service}")
        return Counter({_text(k): int(v) for k, v in raw.items()})

    async def dedup_record(self, message_id: str) -> dict[str, str]:
        """The Redis dedup record of ``message_id`` (``s`` state, ``f`` fencing token, ``e`` deadline ms,
        ``a`` handler runs), whatever its scope (``{topic}/{group}``)."""
        import hashlib

        digest = hashlib.sha256(message_id.encode()).hexdigest()
        keys = [k async for k in self.client.scan_iter(match=f"{KEY_PREFIX}:dedup:*:{digest}", count=1000)]
        assert len(keys) == 1, f"expected one dedup record of {message_id!r}, found {keys}"
        return {_text(k): _text(v) for k, v in (await self.client.hgetall(keys[0])).items()}

    async def _read_outcomes(self) -> None:
        """Fold what was added since the last call: new ledger lines, new dead letters."""
        start = f"({self._dlq_seen}" if self._dlq_seen else "-"
        entries = await self.client.xrange(f"{KEY_PREFIX}:dlq:{self.topic}", start, "+")
        for entry_id, fields in entries:
            self.dead_lettered.add({_text(k): _text(v) for k, v in fields.items()}["message_id"])
            self._dlq_seen = _text(entry_id)
        if self._kafka_dlq:
            await self.kafka_dlq()  # a topic read from its start: small in the tests that use it
        self.tail.read_new()

    def _done(self, message_id: str) -> bool:
        return message_id in self.tail.effects or message_id in self.dead_lettered

    async def done_ids(self) -> set[str]:
        """Ids that ran to their effect or were seen in the DLQ (before a purge, too)."""
        await self._read_outcomes()
        return set(self.tail.effects) | self.dead_lettered

    async def lost(self, message_ids: Iterable[str] | None = None) -> set[str]:
        """Ids (default: every one produced) that neither ran to their effect nor reached the DLQ."""
        wanted = set(message_ids) if message_ids is not None else {p.message_id for p in self.produced}
        return wanted - await self.done_ids()

    async def assert_no_unprocessed_committed(self, committed: Mapping[int, int] | None = None) -> None:
        """Every record below its partition's committed offset ran to its effect or is dead-lettered."""
        offsets = committed if committed is not None else await self.committed()
        await self._read_outcomes()
        unprocessed: list[str] = []
        reached: dict[int, int] = {}
        for partition, records in self._by_partition.items():
            start = self._checked.get(partition, 0)  # the records before were done at an earlier check
            stop = bisect.bisect_left(records, offsets.get(partition, 0), key=lambda p: p.offset)
            unprocessed += [p.message_id for p in records[start:stop] if not self._done(p.message_id)]
            reached[partition] = max(start, stop)
        assert not unprocessed, f"committed but never processed: {sorted(unprocessed)} (offsets {offsets})"
        self._checked.update(reached)

    async def settled(self) -> bool:
        """Every partition committed up to its end; checks :meth:`assert_no_unprocessed_committed`."""
        offsets = await self.committed()
        await self.assert_no_unprocessed_committed(offsets)
        return all(offsets.get(p, 0) >= end for p, end in self.ends().items())

    def assert_duplicates_counted(self, ledger: Ledger | None = None) -> None:
        """Every id that ran to its effect twice or more has a takeover line for each run beyond the first
        (in ``ledger``, or else in the whole ledger as read so far by :attr:`tail`, brought up to date)."""
        if ledger is None:
            self.tail.read_new()
            uncounted = self.tail.uncounted_duplicates()
        else:
            takeovers = Counter(r["id"] for r in ledger.of("takeover"))
            uncounted = {
                mid: (n, takeovers[mid])
                for mid, n in ledger.effect_counts().items()
                if n - 1 > takeovers[mid]
            }
        assert not uncounted, f"uncounted duplicate executions (effects, takeovers): {uncounted}"

    async def assert_oracle(self, message_ids: Iterable[str] | None = None) -> Ledger:
        """lost = 0, every duplicate execution counted, nothing committed unprocessed; the ledger."""
        assert await self.lost(message_ids) == set(), "lost messages"
        ledger = self.ledger()
        self.assert_duplicates_counted(ledger)
        await self.assert_no_unprocessed_committed()
        return ledger

    async def wait(self, condition: Any, timeout: float = 30.0, *, what: str = "condition") -> None:
        """:func:`eventually`, with every consumer's stderr in the failure message.

        A condition that cannot reach the broker or Redis yet (stalled, restarting) is false.
        """

        async def probe() -> bool:
            try:
                value = condition()
                return bool(await value) if inspect.isawaitable(value) else bool(value)
            except (redis.exceptions.ConnectionError, OSError, TimeoutError, KafkaError):
                return False

        try:
            await eventually(probe, timeout=timeout, step=0.05, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics()}") from None


def ok_messages(prefix: str, count: int, **payload: Any) -> list[tuple[str, dict[str, Any]]]:
    """``count`` messages that simply succeed."""
    return [(f"{prefix}{i}", {"action": "ok", **payload}) for i in range(count)]


def ids_of(messages: Sequence[tuple[str, Any]]) -> list[str]:
    return [message_id for message_id, _ in messages]
