"""Machinery of the fault-injection suite: consumer processes, the ledger, probes of stream and metrics.

A :class:`FaultRig` owns one stream on one redis-server, a ledger directory that the handler
(``_fault_handler.py``) appends to, a control directory of marker files, and every ``streamwarden
consume`` process it spawns; :meth:`FaultRig.close` kills them all (SIGCONT first, then SIGKILL).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio
import redis.exceptions

from _support import eventually

FAULTS_DIR = Path(__file__).resolve().parent
HANDLER = "_fault_handler:handle"
KEY_PREFIX = "streamwarden"
SERVICE = "faults"

# Settings every consumer gets unless a test overrides them: short leases so takeovers happen in
# seconds, fast retries, the breaker out of the way unless a scenario wants it.
BASE_SETTINGS: dict[str, str] = {
    "STREAMWARDEN_DEDUP_LEASE": "2.0",
    "STREAMWARDEN_PROCESSING_TIMEOUT": "1.5",
    "STREAMWARDEN_RETRY_INITIAL_DELAY": "0.01",
    "STREAMWARDEN_RETRY_MAX_DELAY": "0.05",
    "STREAMWARDEN_SERVICE_NAME": SERVICE,
}
BASE_OPTIONS: dict[str, Any] = {
    "concurrency": 8,
    "batch_size": 8,
    "block_ms": 100,
    "claim_every": 0.1,
    "claim_idle_ms": 600,
    "shutdown_timeout": 5.0,
    "flush_every": 0.25,
}


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def consume_command() -> list[str]:
    """The ``streamwarden`` entry point of this interpreter's environment."""
    script = Path(sys.executable).parent / "streamwarden"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from streamwarden._cli import main; main()"]


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


# --- consumer processes -----------------------------------------------------------------------------
@dataclass
class ConsumerProcess:
    """One ``streamwarden consume`` OS process."""

    name: str
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    prometheus_port: int | None = None
    stopped: bool = False
    health_port: int | None = None

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
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def sigstop(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        self.stopped = True

    def sigcont(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    def terminate(self, timeout: float = 30.0) -> float:
        """SIGTERM and wait for the exit; returns the seconds it took."""
        started = time.monotonic()
        if self.alive():
            if self.stopped:
                self.sigcont()
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        return time.monotonic() - started

    def stats_line(self) -> dict[str, Any]:
        """The ``stopped: read …, lost …`` line a consumer prints when it exits gracefully."""
        found = re.search(
            r"stopped: read (\d+), reclaimed (\d+), acked (\d+), not acked (\d+), lost (\d+), outcomes (\{.*?\})",
            self.stderr().replace("\n", " "),
        )
        if found is None:
            raise AssertionError(f"{self.name} printed no stats line; stderr:\n{self.stderr()}")
        keys = ("read", "reclaimed", "acked", "not_acked", "lost")
        stats: dict[str, Any] = {k: int(v) for k, v in zip(keys, found.groups()[:5], strict=True)}
        stats["outcomes"] = ast.literal_eval(found.group(6))  # the CLI prints a dict repr
        return stats

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

    def scrape(self, metric: str) -> float:
        """Sum of every sample of ``metric`` on this consumer's Prometheus ``/metrics`` (0 when absent)."""
        assert self.prometheus_port is not None, "spawned without prometheus=True"
        url = f"http://127.0.0.1:{self.prometheus_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as response:
            body = response.read().decode()
        total = 0.0
        for line in body.splitlines():
            if line.startswith(metric) and line[len(metric) : len(metric) + 1] in ("{", " "):
                total += float(line.rsplit(" ", 1)[1])
        return total


# --- the ledger -------------------------------------------------------------------------------------
@dataclass
class Ledger:
    """Every line every handler process wrote, in file order per process."""

    records: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, directory: Path) -> Ledger:
        """Every complete line of every ``ledger-*.jsonl`` in ``directory`` (see :class:`LedgerTail`)."""
        return cls(LedgerTail(directory).read_new())

    def of(self, phase: str, message_id: str | None = None) -> list[dict[str, Any]]:
        return [
            r for r in self.records if r["phase"] == phase and (message_id is None or r["id"] == message_id)
        ]

    def effects(self, message_id: str | None = None) -> list[dict[str, Any]]:
        return self.of("effect", message_id)

    def starts(self, message_id: str | None = None) -> list[dict[str, Any]]:
        return self.of("start", message_id)

    def effect_counts(self) -> Counter[str]:
        return Counter(r["id"] for r in self.effects())

    def executed_ids(self) -> set[str]:
        return set(self.effect_counts())

    def duplicate_executions(self) -> int:
        """Executions beyond the first of each id (side effects that happened twice or more)."""
        return sum(n - 1 for n in self.effect_counts().values())

    def takeovers(self, message_id: str | None = None) -> int:
        """Takeovers the consumers logged (durable: written before the handler ran)."""
        return len(self.of("takeover", message_id))

    def duplicate_invocations(self) -> int:
        """Handler entries beyond the first of each id (effect or not)."""
        return sum(n - 1 for n in Counter(r["id"] for r in self.starts()).values())

    def runs(self) -> list[tuple[str, int, float, float]]:
        """Completed executions ``(id, pid, start t, effect t)``: a start paired with the effect of the
        same process and lease (fencing token)."""
        begun: dict[tuple[str, int, Any], float] = {}
        out: list[tuple[str, int, float, float]] = []
        for record in self.records:
            key = (record["id"], record["pid"], record.get("fence"))
            if record["phase"] == "start":
                begun[key] = record["t"]
            elif record["phase"] == "effect" and key in begun:
                out.append((record["id"], record["pid"], begun.pop(key), record["t"]))
        return out

    def overlapping_runs(self) -> list[tuple[str, int, int]]:
        """``(id, pid, pid)`` for every two executions of one id by two processes that overlapped in time."""
        by_id: dict[str, list[tuple[int, float, float]]] = {}
        for mid, pid, began, ended in self.runs():
            by_id.setdefault(mid, []).append((pid, began, ended))
        found = []
        for mid, runs in by_id.items():
            for i, (pid_a, start_a, end_a) in enumerate(runs):
                for pid_b, start_b, end_b in runs[i + 1 :]:
                    if pid_a != pid_b and start_a < end_b and start_b < end_a:
                        found.append((mid, pid_a, pid_b))
        return found


@dataclass
class LedgerTail:
    """The ledger read as it grows, for checks repeated while it grows (a soak's settle poll).

    Each :meth:`read_new` parses only what was appended since the last call: it remembers how far it
    read each file, and a last line without its newline yet (a write still landing) is left for the next
    call. What it parsed is folded into running counts (effects and takeovers per id, lines per phase)
    and returned, so a poll costs the new lines, not the whole ledger.
    """

    directory: Path
    effects: Counter[str] = field(default_factory=Counter)
    takeovers: Counter[str] = field(default_factory=Counter)
    phases: Counter[str] = field(default_factory=Counter)
    _offsets: dict[str, int] = field(default_factory=dict)

    def read_new(self) -> list[dict[str, Any]]:
        """The complete lines appended since the last call, in file order per process."""
        records: list[dict[str, Any]] = []
        for path in sorted(self.directory.glob("ledger-*.jsonl")):
            offset = self._offsets.get(path.name, 0)
            if path.stat().st_size <= offset:
                continue
            with path.open("rb") as file:
                file.seek(offset)
                chunk = file.read()
            end = chunk.rfind(b"\n") + 1  # 0: no complete line yet
            if end == 0:
                continue
            parsed = [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]
            for record in parsed:
                self.phases[record["phase"]] += 1
                if record["phase"] == "effect":
                    self.effects[record["id"]] += 1
                elif record["phase"] == "takeover":
                    self.takeovers[record["id"]] += 1
            self._offsets[path.name] = offset + end
            records += parsed
        return records

    def duplicate_executions(self) -> int:
        """Executions beyond the first of each id, so far."""
        return sum(n - 1 for n in self.effects.values())

    def uncounted_duplicates(self) -> dict[str, tuple[int, int]]:
        """``{id: (effects, takeovers)}`` for every id that ran more often than 1 + its takeovers."""
        return {
            mid: (n, self.takeovers[mid]) for mid, n in self.effects.items() if n - 1 > self.takeovers[mid]
        }


# --- the rig ----------------------------------------------------------------------------------------
class FaultRig:
    """One stream, one group, its consumer processes, ledger and marker files."""

    def __init__(
        self, redis_url: str, workdir: Path, *, stream: str = "orders", group: str = "workers"
    ) -> None:
        self.redis_url = redis_url
        self.stream = stream
        self.group = group
        self.ledger_dir = workdir / "ledger"
        self.ctrl_dir = workdir / "ctrl"
        self.log_dir = workdir / "logs"
        for d in (self.ledger_dir, self.ctrl_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=10)
        self.consumers: list[ConsumerProcess] = []
        self.entry_of: dict[str, list[str]] = {}  # message id -> stream entry ids

    # -- processes ------------------------------------------------------------------------------
    def spawn(
        self,
        name: str,
        *,
        settings: Mapping[str, str] | None = None,
        url: str | None = None,
        prometheus: bool = False,
        health: bool = False,
        **options: Any,
    ) -> ConsumerProcess:
        """Start ``streamwarden consume`` as consumer ``name``; ``options`` are CLI options (snake_case)."""
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
            "--redis-url", url or self.redis_url,
            "--stream", self.stream,
            "--group", self.group,
            "--consumer", name,
            "--handler", HANDLER,
        ]  # fmt: skip
        for key, value in merged.items():
            flag = f"--{key.replace('_', '-')}"
            if value is True:
                argv.append(flag)
            elif value is not False:
                argv += [flag, str(value)]
        port = health_port = None
        if prometheus:
            port = free_port()
            argv += ["--prometheus-port", str(port)]
        if health:
            health_port = free_port()
            argv += ["--health-port", str(health_port)]
        incarnation = sum(1 for c in self.consumers if c.name == name)
        stderr_path = self.log_dir / f"{name}.{incarnation}.stderr"
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT, env=env, cwd=FAULTS_DIR
            )
        consumer = ConsumerProcess(name, proc, stderr_path, port, health_port=health_port)
        self.consumers.append(consumer)
        return consumer

    async def stop_all(self, timeout: float = 30.0) -> None:
        """SIGTERM every live consumer and wait until they exited (they flush their counters on exit)."""
        for consumer in self.consumers:
            if consumer.alive():
                if consumer.stopped:
                    consumer.sigcont()
                consumer.proc.send_signal(signal.SIGTERM)
        for consumer in self.consumers:
            await asyncio.to_thread(consumer.proc.wait, timeout)

    async def close(self) -> None:
        for consumer in self.consumers:
            if consumer.alive():
                if consumer.stopped:
                    consumer.proc.send_signal(signal.SIGCONT)
                consumer.proc.send_signal(signal.SIGKILL)
            consumer.proc.wait(10)
        await self.client.aclose()

    def diagnostics(self) -> str:
        """Every consumer's stderr, for assertion messages."""
        return "\n".join(f"--- {c.name} (pid {c.pid}) ---\n{c.stderr()}" for c in self.consumers)

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

    # -- the stream -----------------------------------------------------------------------------
    async def create_group(self) -> None:
        """Create the stream and group up front (consumers started later still see every entry)."""
        await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)

    async def produce(self, messages: Iterable[tuple[str, Mapping[str, Any]]]) -> list[str]:
        """``XADD`` each ``(message id, payload)``; returns the stream entry ids."""
        pipe = self.client.pipeline(transaction=False)
        items = list(messages)
        for message_id, payload in items:
            pipe.xadd(self.stream, {"id": message_id, "payload": json.dumps(payload)})
        entry_ids = [_text(e) for e in await pipe.execute()]
        for (message_id, _), entry_id in zip(items, entry_ids, strict=True):
            self.entry_of.setdefault(message_id, []).append(entry_id)
        return entry_ids

    async def pending(self) -> list[dict[str, Any]]:
        """The group's pending entries: ``message_id`` (stream id), ``consumer``, ``times_delivered``."""
        rows = await self.client.xpending_range(self.stream, self.group, min="-", max="+", count=100_000)
        return [
            {
                "entry": _text(r["message_id"]),
                "consumer": _text(r["consumer"]),
                "times_delivered": int(r["times_delivered"]),
            }
            for r in rows
        ]

    async def acked_message_ids(self) -> set[str]:
        """Message ids of stream entries the group delivered and no longer holds pending (acknowledged)."""
        groups = await self.client.xinfo_groups(self.stream)
        info = next(g for g in groups if _text(g["name"]) == self.group)
        last = _order(_text(info["last-delivered-id"]))
        pending = {p["entry"] for p in await self.pending()}
        entries = await self.client.xrange(self.stream, "-", "+")
        return {  # the message id is the id field, or the entry id without one (as the consumer reads it)
            _text(fields.get(b"id") or entry_id)
            for entry_id, fields in entries
            if _order(_text(entry_id)) <= last and _text(entry_id) not in pending
        }

    async def settled(self) -> bool:
        """Every entry was delivered and none is pending; checks :meth:`assert_no_unprocessed_acked`."""
        await self.assert_no_unprocessed_acked()
        groups = await self.client.xinfo_groups(self.stream)
        info = next(g for g in groups if _text(g["name"]) == self.group)
        last_entry = await self.client.xrevrange(self.stream, "+", "-", count=1)
        delivered = not last_entry or _order(_text(info["last-delivered-id"])) >= _order(
            _text(last_entry[0][0])
        )
        return delivered and int(info["pending"]) == 0

    async def assert_no_unprocessed_acked(self) -> None:
        """Every acknowledged entry's message ran to its side effect or sits in the DLQ.

        The stream is read before the ledger and the DLQ: an ack always follows the effect or the
        confirmed DLQ write, so whatever was acked at that moment is visible in what is read after.
        """
        acked = await self.acked_message_ids()
        done = self.ledger().executed_ids() | {e["message_id"] for e in await self.dlq()}
        unprocessed = acked - done
        assert not unprocessed, f"acknowledged but never processed: {sorted(unprocessed)}"

    # -- outcomes -------------------------------------------------------------------------------
    def ledger(self) -> Ledger:
        return Ledger.read(self.ledger_dir)

    async def dlq(self) -> list[dict[str, str]]:
        """The dead-letter entries of this stream, fields as text."""
        entries = await self.client.xrange(f"{KEY_PREFIX}:dlq:{self.stream}", "-", "+")
        return [{_text(k): _text(v) for k, v in fields.items()} for _, fields in entries]

    async def counters(self, service: str = SERVICE) -> Counter[str]:
        """The seed counters hash ``streamwarden:metrics:{service}`` (what the consumers flushed; 0 if absent)."""
        raw = await self.client.hgetall(f"{KEY_PREFIX}:metrics:{service}")
        return Counter({_text(k): int(v) for k, v in raw.items()})

    async def dedup_record(self, message_id: str) -> dict[str, str]:
        """The Redis dedup record of ``message_id`` (``s`` state, ``f`` fencing token, ``e`` deadline ms,
        ``a`` handler runs), in whatever scope it lives (the consumers use ``{stream}/{group}``)."""
        import hashlib

        digest = hashlib.sha256(message_id.encode()).hexdigest()
        keys = [k async for k in self.client.scan_iter(match=f"{KEY_PREFIX}:dedup:*:{digest}", count=1000)]
        assert len(keys) == 1, f"expected one dedup record of {message_id!r}, found {keys}"
        return {_text(k): _text(v) for k, v in (await self.client.hgetall(keys[0])).items()}

    async def lost(self, message_ids: Iterable[str]) -> set[str]:
        """Ids that neither ran to their effect nor reached the DLQ."""
        done = self.ledger().executed_ids() | {e["message_id"] for e in await self.dlq()}
        return set(message_ids) - done

    async def wait(self, condition: Any, timeout: float = 20.0) -> None:
        """:func:`eventually`, with every consumer's stderr in the failure message.

        A condition that cannot reach Redis or a consumer's /metrics yet (restarting, starting) is false.
        """

        async def probe() -> bool:
            try:
                value = condition()
                return bool(await value) if inspect.isawaitable(value) else bool(value)
            except (redis.exceptions.ConnectionError, OSError):
                return False

        try:
            await eventually(probe, timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics()}") from None


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def ok_messages(prefix: str, count: int, **payload: Any) -> list[tuple[str, dict[str, Any]]]:
    """``count`` messages that simply succeed."""
    return [(f"{prefix}{i}", {"action": "ok", **payload}) for i in range(count)]


def ids_of(messages: Sequence[tuple[str, Any]]) -> list[str]:
    return [message_id for message_id, _ in messages]
