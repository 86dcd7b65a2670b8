"""Bounded soak: a producer and N ``streamwarden consume`` processes under chaos, reconciled to the message.

Run from the repository root::

    .venv/bin/python benchmarks/soak.py                       # 200_000 messages, 3 consumers, <= 600 s
    .venv/bin/python benchmarks/soak.py --messages 3000 --seconds 60 --kill-every 2 --pause-every 3

It starts a redis-server of its own on a free loopback port, a producer (this process) and
``--consumers`` consumer processes running the fault suite's handler (``tests/faults/_fault_handler.py``:
it appends ``start`` / ``effect`` / ``takeover`` lines to a per-process ledger). While the stream flows:

* every ~``--kill-every`` s a random consumer gets ``kill -9`` and is restarted (a new *incarnation*,
  with its own ``STREAMWARDEN_SERVICE_NAME`` and so its own counters hash);
* every ~``--term-every`` s a random consumer gets SIGTERM (a graceful stop: it finishes or abandons its
  in-flight work within its shutdown timeout) and is restarted;
* every ~``--stop-every`` s a random consumer is frozen with SIGSTOP for ``--stop-ms`` (longer than the
  dedup lease: the others take its work over) and resumed with SIGCONT;
* every ~``--pause-every`` s Redis is frozen for writes with ``CLIENT PAUSE --pause-ms WRITE``;
* the workload has ``--duplicates`` re-sent ids, ``--poison`` messages that always fail (transiently, so
  they are deferred and redelivered until their handler runs make them poison), ``--killers`` messages
  that SIGKILL the consumer running them (each must end as poison after ``--poison-max`` runs, having
  crashed only alone), ``--transient`` messages that fail once or twice before they succeed, and
  ``--permanent`` failures. Whatever died (a kill, a killer message) is restarted by a supervisor.

When every entry is acknowledged the consumers get SIGTERM (they flush their counters and exit), and
the run is reconciled. It exits 0 only if all of these hold:

1. **lost = 0**: every produced id ran to its side effect or sits in the DLQ; nothing is pending;
2. every poison and killer id is dead-lettered as ``poison`` (a killer after at most ``--poison-max``
   runs), every permanent failure as ``error``, no healthy id is;
3. duplicate executions (ids whose effect ran more than once) <= takeovers (the claims that replaced an
   expired lease, logged durably before the handler ran): every duplicate is a counted one;
4. the counters hashes agree with the durable facts: for every incarnation that exited gracefully,
   exactly (processed = its effects, takeovers = its takeover lines, dead-lettered = DLQ entries
   naming it); for every killed incarnation, never more (what it had not flushed died with it).

Exit status 1 when a check fails, 2 when the run did not settle within ``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio

ROOT = Path(__file__).resolve().parents[1]
HANDLER_DIR = ROOT / "tests" / "faults"
HANDLER = "_fault_handler:handle"
STREAM = "soak"
GROUP = "soakers"
KEY_PREFIX = "streamwarden"

# Consumer settings: short leases and claim idle times so crashes are recovered in seconds.
SETTINGS = {
    "STREAMWARDEN_DEDUP_LEASE": "3.0",
    "STREAMWARDEN_PROCESSING_TIMEOUT": "2.0",
    "STREAMWARDEN_EXHAUSTED_TRANSIENT_ACTION": "defer",
    "STREAMWARDEN_MAX_RETRIES": "2",
    "STREAMWARDEN_RETRY_INITIAL_DELAY": "0.005",
    "STREAMWARDEN_RETRY_MAX_DELAY": "0.02",
    "STREAMWARDEN_CIRCUIT_BREAKER_THRESHOLD": "200",  # poison alone can trip it in the tail of a run
    "STREAMWARDEN_CIRCUIT_BREAKER_TIMEOUT": "2.0",
}
OPTIONS = {
    "concurrency": 32,
    "batch-size": 64,
    "block-ms": 200,
    "claim-every": 0.5,
    "claim-idle-ms": 1500,
    "shutdown-timeout": 10,
    "flush-every": 0.5,
}


def _log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


# --- a redis-server of our own ------------------------------------------------------------------------
def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def local_redis(prefix: str = "soak-redis-") -> Iterator[int]:
    """A throw-away redis-server on a free loopback port (no persistence); yields the port."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found on PATH")
    with tempfile.TemporaryDirectory(prefix=prefix) as workdir:
        port = free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", workdir, "--logfile", str(Path(workdir) / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                        sock.sendall(b"PING\r\n")
                        if sock.recv(64).startswith(b"+PONG"):
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"redis-server did not start on port {port}")
                time.sleep(0.01)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- the workload -------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What the producer sends: (message id, payload) in stream order, and the kind of every id."""

    entries: list[tuple[str, dict[str, Any]]]
    kinds: dict[str, str]


def make_plan(args: argparse.Namespace) -> Plan:
    rng = random.Random(args.seed)
    killer_at = set(
        rng.sample(range(args.messages // 10, max(args.messages // 10 + 1, args.messages // 2)), args.killers)
    )
    keyed: list[tuple[float, str, dict[str, Any]]] = []
    kinds: dict[str, str] = {}
    for i in range(args.messages):
        mid = f"s{i}"
        roll = rng.random()
        if roll < args.poison:
            kind, payload = "poison", {"action": "fail_transient"}
        elif roll < args.poison + args.permanent:
            kind, payload = "permanent", {"action": "fail_permanent"}
        elif roll < args.poison + args.permanent + args.transient:
            kind, payload = "transient", {"action": "ok", "fail_transient_n": rng.randint(1, 2)}
        else:
            kind, payload = "ok", {"action": "ok"}
        if args.handler_ms > 0 and kind != "poison":  # work in flight, for the kills to land in
            payload["sleep_ms"] = round(rng.expovariate(1 / args.handler_ms), 1)
        kinds[mid] = kind
        keyed.append((float(i), mid, payload))
        if i in killer_at:  # a message that SIGKILLs whoever runs it, right after this one
            kid = f"k{i}"
            kinds[kid] = "killer"
            keyed.append((i + 0.5, kid, {"action": "crash"}))
        if rng.random() < args.duplicates:  # re-sent a little later, as a retrying producer would
            keyed.append((i + rng.uniform(1, 2000), mid, payload))
    keyed.sort(key=lambda item: item[0])
    return Plan([(mid, payload) for _, mid, payload in keyed], kinds)


# --- consumer processes -------------------------------------------------------------------------------
@dataclass
class Incarnation:
    """One consumer process: ``name`` is its consumer name, ``service`` its counters hash."""

    name: str
    number: int
    proc: subprocess.Popen[bytes]
    log: Path
    killed: bool = False  # ended by SIGKILL (chaos or a killer message): its last counts died with it
    frozen_until: float | None = None  # SIGSTOPped until then (loop time)
    died_at: float | None = None  # when the supervisor noticed it was gone

    @property
    def service(self) -> str:
        return service_name(self.name, self.number)


def service_name(name: str, number: int) -> str:
    return f"soak-{name}-{number}"


@dataclass
class Fleet:
    """The consumer processes of the run, every incarnation ever started."""

    redis_url: str
    workdir: Path
    poison_max: int = 5
    incarnations: list[Incarnation] = field(default_factory=list)

    def start(self, name: str) -> Incarnation:
        number = sum(1 for inc in self.incarnations if inc.name == name)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMWARDEN_", "OTEL_"))}
        env.update(SETTINGS)
        env.update(
            STREAMWARDEN_POISON_MAX_DELIVERIES=str(self.poison_max),
            STREAMWARDEN_SERVICE_NAME=service_name(name, number),
            PYTHONPATH=os.pathsep.join(p for p in (str(HANDLER_DIR), env.get("PYTHONPATH", "")) if p),
            SW_FAULT_LEDGER_DIR=str(self.workdir / "ledger"),
            SW_FAULT_CTRL_DIR=str(self.workdir / "ctrl"),
            SW_FAULT_FSYNC="0",  # kill -9 cannot lose written lines; fsync only guards against power loss
            NO_COLOR="1",
        )
        argv = [
            *_consume_command(), "consume", "--redis-url", self.redis_url, "--stream", STREAM,
            "--group", GROUP, "--consumer", name, "--handler", HANDLER,
        ]  # fmt: skip
        for option, value in OPTIONS.items():
            argv += [f"--{option}", str(value)]
        log = self.workdir / "logs" / f"{name}.{number}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=HANDLER_DIR
            )
        incarnation = Incarnation(name, number, proc, log)
        self.incarnations.append(incarnation)
        return incarnation

    def live(self) -> list[Incarnation]:
        return [inc for inc in self.incarnations if inc.proc.poll() is None]

    def running(self) -> list[Incarnation]:
        """Live and not frozen: the ones chaos may hit next."""
        return [inc for inc in self.live() if inc.frozen_until is None]

    def kill(self, incarnation: Incarnation) -> None:
        incarnation.killed = True
        incarnation.proc.send_signal(signal.SIGKILL)
        incarnation.proc.wait(10)

    def terminate(self, incarnation: Incarnation) -> None:
        """SIGTERM: the consumer stops gracefully; the supervisor restarts it once it has exited."""
        incarnation.proc.send_signal(signal.SIGTERM)

    def freeze(self, incarnation: Incarnation, until: float) -> None:
        incarnation.proc.send_signal(signal.SIGSTOP)
        incarnation.frozen_until = until

    def thaw(self, incarnation: Incarnation) -> None:
        if incarnation.frozen_until is not None and incarnation.proc.poll() is None:
            incarnation.proc.send_signal(signal.SIGCONT)
        incarnation.frozen_until = None

    def supervise(self, now: float, rng: random.Random) -> int:
        """Resume frozen consumers whose time is up; restart consumers that are gone (after a short
        delay, as an orchestrator would). Returns how many died of a killer message since last time."""
        crashed = 0
        latest: dict[str, Incarnation] = {}
        for inc in self.incarnations:
            latest[inc.name] = inc
            if inc.frozen_until is not None and now >= inc.frozen_until:
                self.thaw(inc)
        for name, inc in latest.items():
            if inc.proc.poll() is None:
                continue
            if inc.died_at is None:
                inc.died_at = now + rng.uniform(0.1, 0.8)
                if inc.proc.returncode == -signal.SIGKILL and not inc.killed:
                    inc.killed = True  # a killer message took it down
                    crashed += 1
            elif now >= inc.died_at:
                self.start(name)
        return crashed

    def stop_all(self, timeout: float = 60.0) -> None:
        for inc in self.live():
            self.thaw(inc)
            inc.proc.send_signal(signal.SIGTERM)
        for inc in self.incarnations:
            try:
                inc.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                inc.killed = True
                inc.proc.kill()
                inc.proc.wait()

    def kill_all(self) -> None:
        for inc in self.live():
            self.thaw(inc)
            inc.proc.kill()
            inc.proc.wait()


def _consume_command() -> list[str]:
    script = Path(sys.executable).parent / "streamwarden"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from streamwarden._cli import main; main()"]


# --- the run ------------------------------------------------------------------------------------------
@dataclass
class Chaos:
    kills: int = 0
    terms: int = 0
    stops: int = 0
    pauses: int = 0
    crashes: int = 0  # consumers a killer message took down


async def produce(
    client: redis.asyncio.Redis, plan: Plan, *, rate: float, chunk: int = 100, max_lag: int = 20_000
) -> None:
    """XADD the plan in pipelined chunks at ``rate`` entries/s (0: as fast as the backlog allows)."""
    started = time.monotonic()
    for start in range(0, len(plan.entries), chunk):
        if rate > 0:
            await asyncio.sleep(max(0.0, started + start / rate - time.monotonic()))
        while ((await _group_info(client)).get("lag") or 0) > max_lag:  # noqa: ASYNC110 - Redis state
            await asyncio.sleep(0.05)
        pipe = client.pipeline(transaction=False)
        for mid, payload in plan.entries[start : start + chunk]:
            pipe.xadd(STREAM, {"id": mid, "payload": json.dumps(payload, separators=(",", ":"))})
        await pipe.execute()


async def chaos(
    client: redis.asyncio.Redis, fleet: Fleet, args: argparse.Namespace, stats: Chaos, stop: asyncio.Event
) -> None:
    """Random kill -9, SIGTERM and SIGSTOP/SIGCONT of consumers, short CLIENT PAUSEs of Redis, and a
    supervisor restarting whatever died."""
    rng = random.Random(args.seed + 1)
    loop = asyncio.get_running_loop()

    def next_at(every: float) -> float:
        return loop.time() + rng.uniform(0.5, 1.5) * every if every > 0 else math.inf

    next_kill, next_term = next_at(args.kill_every), next_at(args.term_every)
    next_stop, next_pause = next_at(args.stop_every), next_at(args.pause_every)
    while not stop.is_set():
        now = loop.time()
        stats.crashes += fleet.supervise(now, rng)
        victims = fleet.running()
        if now >= next_kill:
            if victims:
                fleet.kill(rng.choice(victims))
                stats.kills += 1
            next_kill = next_at(args.kill_every)
        elif now >= next_term:
            if victims:
                fleet.terminate(rng.choice(victims))
                stats.terms += 1
            next_term = next_at(args.term_every)
        elif now >= next_stop:
            if len(victims) > 1:  # someone must be left to take its work over
                fleet.freeze(rng.choice(victims), now + args.stop_ms / 1000)
                stats.stops += 1
            next_stop = next_at(args.stop_every)
        if now >= next_pause:
            await client.execute_command("CLIENT", "PAUSE", args.pause_ms, "WRITE")
            stats.pauses += 1
            next_pause = loop.time() + args.pause_ms / 1000 + rng.uniform(0.5, 1.5) * args.pause_every
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.05)


async def _group_info(client: redis.asyncio.Redis) -> dict[str, Any]:
    for info in await client.xinfo_groups(STREAM):
        if _text(info["name"]) == GROUP:
            return {_text(k): v for k, v in info.items()}
    return {}


async def settled(client: redis.asyncio.Redis, produced: int) -> bool:
    """Every produced entry was delivered to the group and none is pending."""
    info = await _group_info(client)
    return int(info.get("entries-read") or 0) >= produced and int(info["pending"]) == 0


@dataclass
class Facts:
    """Durable facts read after the run: ledger lines, DLQ entries, counters hashes."""

    effects: Counter[str]
    starts: Counter[str]
    effects_by_pid: Counter[int]
    takeovers_by_pid: Counter[int]
    dlq: list[dict[str, str]]
    counters: dict[str, Counter[str]]
    takeovers_by_id: Counter[str]


def read_ledgers(
    workdir: Path,
) -> tuple[Counter[str], Counter[str], Counter[int], Counter[int], Counter[str]]:
    """Effects and starts per id, effects and takeovers per process, takeovers per id, from every ledger."""
    takeovers_by_id: Counter[str] = Counter()
    effects: Counter[str] = Counter()
    starts: Counter[str] = Counter()
    effects_by_pid: Counter[int] = Counter()
    takeovers_by_pid: Counter[int] = Counter()
    for path in (workdir / "ledger").glob("ledger-*.jsonl"):
        with open(path) as fh:
            for line in fh:
                record = json.loads(line)
                phase = record["phase"]
                if phase == "effect":
                    effects[record["id"]] += 1
                    effects_by_pid[record["pid"]] += 1
                elif phase == "start":
                    starts[record["id"]] += 1
                elif phase == "takeover":
                    takeovers_by_pid[record["pid"]] += 1
                    takeovers_by_id[record["id"]] += 1
    return effects, starts, effects_by_pid, takeovers_by_pid, takeovers_by_id


async def gather_facts(client: redis.asyncio.Redis, workdir: Path, fleet: Fleet) -> Facts:
    effects, starts, effects_by_pid, takeovers_by_pid, takeovers_by_id = await asyncio.to_thread(
        read_ledgers, workdir
    )
    raw = await client.xrange(f"{KEY_PREFIX}:dlq:{STREAM}", "-", "+")
    dlq = [{_text(k): _text(v) for k, v in fields.items()} for _, fields in raw]
    counters: dict[str, Counter[str]] = {}
    for inc in fleet.incarnations:
        values = await client.hgetall(f"{KEY_PREFIX}:metrics:{inc.service}")
        counters[inc.service] = Counter({_text(k): int(v) for k, v in values.items()})
    return Facts(effects, starts, effects_by_pid, takeovers_by_pid, dlq, counters, takeovers_by_id)


def reconcile(
    plan: Plan, facts: Facts, fleet: Fleet, pending: int, poison_max: int
) -> tuple[dict[str, Any], list[str]]:
    """The report numbers and the list of failed checks (empty: reconciled)."""
    problems: list[str] = []
    kinds = plan.kinds
    dlq_ids = Counter(e.get("message_id", "") for e in facts.dlq)
    dlq_reasons = Counter(e["reason"] for e in facts.dlq)
    executed = set(facts.effects)
    lost = sorted(set(kinds) - executed - set(dlq_ids))
    duplicates = sum(n - 1 for n in facts.effects.values())
    takeovers_durable = sum(facts.takeovers_by_pid.values())
    totals: Counter[str] = Counter()
    for values in facts.counters.values():
        totals.update(values)

    if lost:
        problems.append(f"lost {len(lost)} messages: {lost[:10]}")
    if pending:
        problems.append(f"{pending} entries still pending")
    reasons_of: dict[str, set[str]] = defaultdict(set)
    for entry in facts.dlq:
        reasons_of[entry.get("message_id", "")].add(entry["reason"])
    for mid, kind in kinds.items():
        reasons = reasons_of.get(mid, set())
        if kind in ("poison", "killer") and reasons != {"poison"}:
            problems.append(f"{kind} {mid} dead-lettered as {reasons or 'nothing'}")
        elif kind == "killer" and facts.starts[mid] > poison_max:
            problems.append(f"killer {mid} ran {facts.starts[mid]} times, more than {poison_max}")
        elif kind == "permanent" and reasons != {"error"}:
            problems.append(f"permanent failure {mid} dead-lettered as {reasons or 'nothing'}")
        elif kind in ("ok", "transient") and (reasons or mid not in executed):
            problems.append(f"healthy {mid}: executed={mid in executed}, dead-lettered as {reasons}")
    if duplicates > takeovers_durable:
        problems.append(f"{duplicates} duplicate executions but only {takeovers_durable} counted takeovers")
    # per id: every extra execution of an id follows a counted takeover of that same id
    uncounted = {
        mid: n - 1 - facts.takeovers_by_id[mid]
        for mid, n in facts.effects.items()
        if n - 1 > facts.takeovers_by_id[mid]
    }
    if uncounted:
        problems.append(
            f"{sum(uncounted.values())} uncounted duplicate executions, e.g. {sorted(uncounted)[:5]}"
        )

    per_incarnation = []
    dlq_by_service = Counter(e.get("service", "") for e in facts.dlq)
    for inc in fleet.incarnations:
        pid = inc.proc.pid
        durable = {
            "messages_processed_successfully": facts.effects_by_pid[pid],
            "dedup_takeovers": facts.takeovers_by_pid[pid],
            "messages_dead_lettered": dlq_by_service[inc.service],
        }
        flushed = facts.counters[inc.service]
        graceful = not inc.killed and inc.proc.returncode == 0
        for name, value in durable.items():
            if graceful and flushed[name] != value:
                problems.append(
                    f"{inc.service} exited cleanly but its {name} = {flushed[name]}, facts say {value}"
                )
            if not graceful and flushed[name] > value:
                problems.append(f"{inc.service}: {name} = {flushed[name]} exceeds the facts ({value})")
        per_incarnation.append(
            {"service": inc.service, "graceful": graceful, "flushed": dict(flushed), **durable}
        )

    unflushed = {
        name: sum(r[name] for r in per_incarnation) - totals[name]
        for name in ("messages_processed_successfully", "dedup_takeovers", "messages_dead_lettered")
    }
    report = {
        "unique_ids": len(kinds),
        "produced": len(plan.entries),
        "resent_duplicates": len(plan.entries) - len(kinds),
        "kinds": dict(Counter(kinds.values())),
        "processed": len(executed),
        "duplicate_executions": duplicates,
        "duplicate_deliveries_answered": totals["messages_deduplicated"],
        "dead_lettered": len(facts.dlq),
        "dead_lettered_ids": len(dlq_ids),
        "dead_lettered_by_reason": dict(dlq_reasons),
        "lost": len(lost),
        "takeovers_durable": takeovers_durable,
        "uncounted_duplicates": sum(
            max(0, n - 1 - facts.takeovers_by_id[mid]) for mid, n in facts.effects.items()
        ),
        "takeovers_metrics": totals["dedup_takeovers"],
        "metrics_totals": {k: totals[k] for k in sorted(totals)},
        "unflushed_by_killed_processes": unflushed,
        "incarnations": len(fleet.incarnations),
        "per_incarnation": per_incarnation,
    }
    return report, problems


async def run(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], list[str], bool]:
    plan = make_plan(args)
    for sub in ("ledger", "ctrl", "logs"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    with local_redis() as port:
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.asyncio.Redis.from_url(url, socket_timeout=30)
        fleet = Fleet(url, workdir, poison_max=args.poison_max)
        stats = Chaos()
        stop_chaos = asyncio.Event()
        started = time.monotonic()
        deadline = started + args.seconds
        done = False
        try:
            await client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
            for n in range(args.consumers):
                fleet.start(f"c{n + 1}")
            producer = asyncio.create_task(produce(client, plan, rate=args.rate))
            chaos_task = asyncio.create_task(chaos(client, fleet, args, stats, stop_chaos))
            last_report = 0.0
            while time.monotonic() < deadline:
                if producer.done():
                    producer.result()
                    if await settled(client, len(plan.entries)):
                        done = True
                        break
                now = time.monotonic()
                if now - last_report >= 5:
                    last_report = now
                    info = await _group_info(client)
                    _log(
                        f"{now - started:5.0f}s read {info.get('entries-read')}/{len(plan.entries)} "
                        f"lag {info.get('lag')} pending {info.get('pending')} "
                        f"kills {stats.kills} terms {stats.terms} stops {stats.stops} "
                        f"crashes {stats.crashes} pauses {stats.pauses}"
                    )
                await asyncio.sleep(0.2)
            elapsed = time.monotonic() - started
            stop_chaos.set()
            await chaos_task
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
            await client.execute_command("CLIENT", "UNPAUSE")
            await asyncio.to_thread(fleet.stop_all)
            pending = int((await _group_info(client)).get("pending", 0))
            facts = await gather_facts(client, workdir, fleet)
            report, problems = reconcile(plan, facts, fleet, pending, args.poison_max)
            report.update(
                messages=args.messages,
                consumers=args.consumers,
                kills=stats.kills,
                terms=stats.terms,
                stops=stats.stops,
                crashes=stats.crashes,
                pauses=stats.pauses,
                elapsed_s=round(elapsed, 1),
                throughput_msgs_per_s=round(len(plan.entries) / elapsed, 1),
                settled=done,
            )
            if not done:
                problems.insert(0, f"not settled within {args.seconds}s")
            return report, problems, done
        finally:
            fleet.kill_all()
            await client.aclose()


def print_report(report: dict[str, Any], problems: list[str]) -> None:
    rows = [
        ("messages produced (stream entries)", report["produced"]),
        ("  unique ids", report["unique_ids"]),
        ("  re-sent duplicates", report["resent_duplicates"]),
        ("  kinds", ", ".join(f"{k} {v}" for k, v in sorted(report["kinds"].items()))),
        ("processed (ids whose effect ran)", report["processed"]),
        ("duplicate executions (effect ran twice)", report["duplicate_executions"]),
        ("  not preceded by a counted takeover of that id", report["uncounted_duplicates"]),
        ("duplicate deliveries answered (metrics)", report["duplicate_deliveries_answered"]),
        ("dead-lettered (entries / ids)", f"{report['dead_lettered']} / {report['dead_lettered_ids']}"),
        ("  by reason", ", ".join(f"{k} {v}" for k, v in sorted(report["dead_lettered_by_reason"].items()))),
        ("lost", report["lost"]),
        (
            "takeovers (durable log / metrics hash)",
            f"{report['takeovers_durable']} / {report['takeovers_metrics']}",
        ),
        (
            "kill -9 / SIGTERM / SIGSTOP / killer crashes / Redis pauses",
            f"{report['kills']} / {report['terms']} / {report['stops']} / {report['crashes']} / {report['pauses']}",
        ),
        ("consumer incarnations", report["incarnations"]),
        ("counts that died unflushed with killed processes", report["unflushed_by_killed_processes"]),
        ("elapsed / throughput", f"{report['elapsed_s']} s / {report['throughput_msgs_per_s']} msgs/s"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label.ljust(width)}  {value}")
    if problems:
        print("NOT RECONCILED:")
        for problem in problems[:50]:
            print(f"  - {problem}")
    else:
        print(
            "RECONCILED: lost 0; every duplicate execution is a counted takeover; metrics agree with the facts"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=200_000, help="unique message ids")
    parser.add_argument("--consumers", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=600.0, help="cap on the whole run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duplicates", type=float, default=0.10, help="share of ids re-sent")
    parser.add_argument("--poison", type=float, default=0.02, help="share of ids that always fail")
    parser.add_argument("--transient", type=float, default=0.05, help="share failing once or twice")
    parser.add_argument("--permanent", type=float, default=0.005, help="share failing permanently")
    parser.add_argument("--rate", type=float, default=0.0, help="produced entries/s (0: no limit)")
    parser.add_argument("--handler-ms", type=float, default=2.0, help="mean handler time, ms")
    parser.add_argument("--killers", type=int, default=2, help="messages that SIGKILL their consumer")
    parser.add_argument("--poison-max", type=int, default=5, help="handler runs before poison")
    parser.add_argument("--kill-every", type=float, default=5.0, help="mean s between kill -9 (0: never)")
    parser.add_argument("--term-every", type=float, default=7.0, help="mean s between SIGTERMs (0: never)")
    parser.add_argument("--stop-every", type=float, default=9.0, help="mean s between SIGSTOPs (0: never)")
    parser.add_argument("--stop-ms", type=int, default=4000, help="SIGSTOP duration (past the 3 s lease)")
    parser.add_argument("--pause-every", type=float, default=8.0, help="mean s between pauses (0: never)")
    parser.add_argument("--pause-ms", type=int, default=300, help="CLIENT PAUSE duration")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--workdir", type=Path, default=None, help="keep ledgers and logs here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="streamwarden-soak-"))
    _log(f"workdir {workdir}")
    report, problems, done = asyncio.run(run(args, workdir))
    report["problems"] = problems
    print_report(report, problems)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    if args.workdir is None and not problems:
        shutil.rmtree(workdir, ignore_errors=True)
    elif problems:
        _log(f"kept {workdir} for inspection")
    if not done:
        return 2
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
