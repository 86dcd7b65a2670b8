"""Bounded Kafka soak: ``streamwarden consume --kafka-bootstrap`` processes under chaos, reconciled to the message.

The long, manual mode of ``tests/kafka_faults`` (same rig, same ledger handler, same oracle). Run from
the repository root::

    .venv/bin/python benchmarks/soak_kafka.py                      # 20_000 messages, 3 consumers, <= 600 s
    .venv/bin/python benchmarks/soak_kafka.py --messages 3000 --seconds 120 --kill-every 2

It starts a Tansu broker and a redis-server of its own, produces the workload to a topic of
``--partitions`` partitions (``--keys`` distinct keys), and keeps ``--consumers`` consumer processes
running the fault suite's handler (``tests/faults/_fault_handler.py``). While the records flow:

* every ~``--kill-every`` s a random consumer gets ``kill -9``; every ~``--term-every`` s one gets
  SIGTERM (a graceful leave); every ~``--stop-every`` s one is frozen with SIGSTOP for ``--stop-ms``;
  every ~``--stall-every`` s the broker is frozen for ``--stall-ms``. A supervisor restarts whatever
  died, so each change is a rebalance;
* the workload has ``--permanent`` failures (dead-lettered as ``error``), ``--killers`` messages that
  SIGKILL the consumer running them (each must end as ``poison``), and healthy messages that sleep
  ``--handler-ms`` on average.

When every partition is committed to its end the consumers get SIGTERM and the run is reconciled; it
exits 0 only if: lost = 0 (every id ran to its effect or is dead-lettered); every killer is poison and
every permanent failure is dead-lettered; no healthy id is dead-lettered; every duplicate execution has
a counted takeover (per id); nothing was committed that did not finish; every consumer sent SIGTERM
exited within ``TERM_GRACE_S`` (one that did not is killed, named, and the run is still reconciled).
Exit status 1 when a check fails, 2 when the run did not settle within ``--seconds``.

The harness must stay light beside the consumers it watches (it shares their cores): its settle poll and
the reconciliation follow the ledger incrementally (``LedgerTail``: each poll parses only the lines
appended since the last one) and check each partition's records once, when the commit passes them. The
summary reports the harness's CPU (``harness_cpu_s``, and its share of one core over the run) and that
of the settle polls alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # soak (local_redis)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # _kafka_broker, _support
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "faults"))  # _faultlib
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kafka_faults"))  # the rig
from _kafkalib import KafkaConsumerProcess, KafkaFaultRig

from _kafka_broker import KafkaBroker
from soak import local_redis

SETTINGS = {
    "STREAMWARDEN_DEDUP_LEASE": "3.0",
    "STREAMWARDEN_PROCESSING_TIMEOUT": "2.0",
    "STREAMWARDEN_MAX_RETRIES": "0",
    "STREAMWARDEN_POISON_MAX_DELIVERIES": "5",
    "STREAMWARDEN_CIRCUIT_BREAKER_THRESHOLD": "1000",  # killers and failures must not open it here
}
# A consumer sent SIGTERM must be gone this long after (its shutdown_timeout is 5 s): else it is named in
# the failures and killed, as an orchestrator would after its grace period.
TERM_GRACE_S = 30.0


def _log(message: str) -> None:
    print(f"[soak-kafka {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def plan(args: argparse.Namespace) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, str]]:
    """The workload in topic order, and the kind of every id (ok, permanent, killer)."""
    rng = random.Random(args.seed)
    killer_at = set(
        rng.sample(range(args.messages // 10, max(args.messages // 10 + 1, args.messages // 2)), args.killers)
    )
    messages: list[tuple[str, dict[str, Any]]] = []
    kinds: dict[str, str] = {}
    for i in range(args.messages):
        mid = f"s{i}"
        if rng.random() < args.permanent:
            kinds[mid], payload = "permanent", {"action": "fail_permanent"}
        else:
            kinds[mid], payload = "ok", {"action": "ok"}
            if args.handler_ms > 0:
                payload["sleep_ms"] = round(rng.expovariate(1 / args.handler_ms), 1)
        messages.append((mid, payload))
        if i in killer_at:
            kinds[f"k{i}"] = "killer"
            messages.append((f"k{i}", {"action": "crash"}))
    return messages, kinds


async def soak(args: argparse.Namespace, workdir: Path, redis_url: str, broker: KafkaBroker) -> int:
    rng = random.Random(args.seed + 1)
    rig = KafkaFaultRig(broker, redis_url, workdir, topic="soak", group="soakers")
    options: dict[str, Any] = {
        "concurrency": args.concurrency,
        "batch_size": args.concurrency,
        "ordering": args.ordering,
        "shutdown_timeout": 5.0,
        "settings": SETTINGS,
    }
    events: Counter[str] = Counter()
    try:
        await rig.create_topic(args.partitions)
        messages, kinds = plan(args)
        for start in range(0, len(messages), 2000):
            await rig.produce(
                messages[start : start + 2000], key=lambda mid: f"key{zlib.crc32(mid.encode()) % args.keys}"
            )
        _log(f"produced {len(messages)} records ({Counter(kinds.values())})")
        slots: dict[str, KafkaConsumerProcess] = {}
        for n in range(args.consumers):
            slots[f"c{n}"] = rig.spawn(f"c{n}", **options)
        started = time.monotonic()
        due = {
            kind: started + every
            for kind, every in (
                ("kill", args.kill_every),
                ("term", args.term_every),
                ("stop", args.stop_every),
                ("stall", args.stall_every),
            )
            if every > 0
        }
        frozen: dict[str, float] = {}
        terminating: dict[int, tuple[KafkaConsumerProcess, float]] = {}  # pid -> (member, exit deadline)
        ignored_term: list[str] = []  # members still running TERM_GRACE_S after their SIGTERM
        settled = False
        cpu_started = time.process_time()
        polls: list[float] = []  # the CPU seconds of each settle poll
        while time.monotonic() - started < args.seconds:
            now = time.monotonic()
            for name, member in slots.items():  # the supervisor: whatever died is restarted
                if not member.alive():
                    events["restarts"] += 1
                    slots[name] = rig.spawn(name, **options)
            for name, until in list(frozen.items()):
                if now >= until:
                    slots[name].sigcont()
                    del frozen[name]
            for pid, (member, deadline) in list(terminating.items()):
                if not member.alive():
                    del terminating[pid]
                elif now >= deadline:
                    ignored_term.append(_ignored(member))
                    member.kill()  # the supervisor restarts it at the next tick
                    del terminating[pid]
            for kind, when in list(due.items()):
                if now < when:
                    continue
                every = {"kill": args.kill_every, "term": args.term_every, "stop": args.stop_every}
                due[kind] = now + rng.uniform(0.5, 1.5) * every.get(kind, args.stall_every)
                name = rng.choice(sorted(slots))
                if kind == "kill":
                    slots[name].kill()
                elif kind == "term":
                    slots[name].sigterm()
                    terminating[slots[name].pid] = (slots[name], now + TERM_GRACE_S)
                elif kind == "stop" and name not in frozen:
                    slots[name].sigstop()
                    frozen[name] = now + args.stop_ms / 1000
                elif kind == "stall":
                    broker.pause()
                    await asyncio.sleep(args.stall_ms / 1000)  # the stall's length is the fault
                    broker.resume()
                events[kind] += 1
            poll_started = time.process_time()
            try:
                settled = await rig.settled()
            except AssertionError:  # committed but never processed: a real failure
                raise
            except Exception:  # a stalled broker, a member restarting: not settled yet
                settled = False
            polls.append(time.process_time() - poll_started)
            if settled:
                break
            await asyncio.sleep(0.2)  # the chaos loop's tick
        elapsed = time.monotonic() - started
        harness = {
            "harness_cpu_s": round(time.process_time() - cpu_started, 2),
            "harness_cpu_share": round((time.process_time() - cpu_started) / elapsed, 3),
            "settle_polls": len(polls),
            "settle_poll_cpu_s": round(sum(polls), 2),
            "settle_poll_cpu_ms_max": round(1000 * max(polls, default=0.0), 1),
        }
        for name in list(frozen):
            slots[name].sigcont()
        ignored_term += await stop_all(rig)
        # every consumer process has been reaped now (the broker and redis-server not yet)
        harness["consumers_cpu_s"] = round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
            + resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime,
            1,
        )
        _log(f"harness {harness}")
        if not settled:
            committed = await rig.committed()
            ends = rig.ends()
            done = sum(committed.get(p, 0) for p in ends)  # offsets are dense here: no transactions
            _log(
                f"did not settle within {args.seconds}s: committed {done} of {sum(ends.values())} records"
                f" (per partition {committed}, ends {ends}); events {dict(events)}"
            )
            return 2
        return await reconcile(rig, kinds, events, elapsed, len(messages), harness, ignored_term, args)
    finally:
        await rig.close()


def _ignored(member: KafkaConsumerProcess) -> str:
    """Name a member that ignored SIGTERM, with where its log stops (e.g. in its first group join)."""
    last = member.stderr().strip().rsplit("\n", 1)[-1][:200]
    assigned = "never assigned" if not member.assignments() else f"{member.assignments()} assignments"
    _log(
        f"{member.name} (pid {member.pid}) still running {TERM_GRACE_S:.0f}s after SIGTERM ({assigned}): {last}"
    )
    return f"{member.name} pid {member.pid} ({assigned})"


async def stop_all(rig: KafkaFaultRig) -> list[str]:
    """SIGTERM every live consumer; kill the ones still running ``TERM_GRACE_S`` later and name them."""
    for member in rig.consumers:
        member.sigterm()
    deadline = time.monotonic() + TERM_GRACE_S
    ignored = []
    for member in rig.consumers:
        try:
            await asyncio.to_thread(member.proc.wait, max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            ignored.append(_ignored(member))
            member.kill()
    return ignored


async def reconcile(
    rig: KafkaFaultRig,
    kinds: dict[str, str],
    events: Counter[str],
    elapsed: float,
    count: int,
    harness: dict[str, Any],
    ignored_term: list[str],
    args: argparse.Namespace,
) -> int:
    reconcile_started = time.process_time()
    dead = {e["message_id"]: e["reason"] for e in await rig.dlq()}
    failures = []
    if ignored_term:
        failures.append(
            f"{len(ignored_term)} consumers ignored SIGTERM for {TERM_GRACE_S:.0f}s: {ignored_term}"
        )
    lost = await rig.lost(kinds)
    if lost:
        failures.append(f"lost {len(lost)}: {sorted(lost)[:10]}")
    wrong = {
        mid: dead.get(mid) for mid, kind in kinds.items() if kind == "killer" and dead.get(mid) != "poison"
    }
    if wrong:
        failures.append(f"killers not dead-lettered as poison: {wrong}")
    missing = [mid for mid, kind in kinds.items() if kind == "permanent" and mid not in dead]
    if missing:
        failures.append(f"permanent failures not dead-lettered: {missing[:10]}")
    healthy_dead = {mid: reason for mid, reason in dead.items() if kinds.get(mid) == "ok"}
    if healthy_dead:
        failures.append(
            f"{len(healthy_dead)} healthy ids dead-lettered: {dict(list(healthy_dead.items())[:10])}"
        )
    try:
        rig.assert_duplicates_counted()  # the whole ledger, through the rig's tail (counts per id)
        await rig.assert_no_unprocessed_committed()
    except AssertionError as exc:
        failures.append(str(exc))
    counters = await rig.counters()
    summary = {
        "records": count,
        "seconds": round(elapsed, 1),
        "records_per_s": round(count / elapsed, 1),
        "events": dict(events),
        "rebalances_logged": sum(c.assignments() for c in rig.consumers),
        "processes": len(rig.consumers),
        "ledger_lines": dict(rig.tail.phases),
        "effects": sum(rig.tail.effects.values()),
        "duplicate_executions": rig.tail.duplicate_executions(),
        "duplicated_ids": sum(1 for n in rig.tail.effects.values() if n > 1),
        "takeovers_logged": sum(rig.tail.takeovers.values()),
        "takeovers_logged_of_duplicated_ids": sum(
            rig.tail.takeovers[mid] for mid, n in rig.tail.effects.items() if n > 1
        ),
        "takeovers_counted": counters["dedup_takeovers"],
        "dead_lettered": dict(Counter(dead.values())),
        "lost": len(lost),
        **harness,
        "reconcile_cpu_s": round(time.process_time() - reconcile_started, 2),
        "failures": failures,
        "options": {k: v for k, v in vars(args).items() if k != "json"},
    }
    print(json.dumps(summary, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    for failure in failures:
        _log(f"FAIL {failure}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--consumers", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--keys", type=int, default=64)
    parser.add_argument("--ordering", choices=("key", "partition", "unordered"), default="key")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=600.0, help="give up (exit 2) after this long")
    parser.add_argument("--kill-every", type=float, default=8.0, help="seconds between kill -9 (0: never)")
    parser.add_argument("--term-every", type=float, default=12.0, help="seconds between SIGTERMs (0: never)")
    parser.add_argument("--stop-every", type=float, default=0.0, help="seconds between SIGSTOPs (0: never)")
    parser.add_argument("--stop-ms", type=float, default=4000.0)
    parser.add_argument(
        "--stall-every", type=float, default=0.0, help="seconds between broker stalls (0: never)"
    )
    parser.add_argument("--stall-ms", type=float, default=4000.0)
    parser.add_argument("--permanent", type=float, default=0.002, help="share of permanent failures")
    parser.add_argument("--killers", type=int, default=2, help="messages that SIGKILL their consumer")
    parser.add_argument("--handler-ms", type=float, default=2.0, help="mean handler time of healthy messages")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ["SW_FAULT_FSYNC"] = "0"  # the kernel keeps written lines across kill -9; no power loss here
    with (
        tempfile.TemporaryDirectory(prefix="soak-kafka-") as workdir,
        local_redis(prefix="soak-kafka-redis-") as port,
        KafkaBroker() as broker,
    ):
        return asyncio.run(soak(args, Path(workdir), f"redis://127.0.0.1:{port}/0", broker))


if __name__ == "__main__":
    sys.exit(main())
