"""Deduplication on Redis, side by side, against one local redis-server this script starts itself.

Run from the repository root::

    .venv/bin/python benchmarks/bench_dedup_redis.py            # 5_000 messages x 5 rounds per case
    .venv/bin/python benchmarks/bench_dedup_redis.py --quick    # a smoke run, not a measurement

Every case processes ``count`` new message ids one after another (one consumer, one connection, a
no-op handler) and is timed end to end, flushes included:

* ``seed``: the seed's design as documented: ``EXISTS dedup:{id}``, the handler, ``SETEX``, then
  ``INCRBY`` of a metric key: three round trips per message (its breaker and error path add no I/O).
* ``powertools``: AWS Lambda Powertools' ``idempotent_function`` with its Redis ``CachePersistenceLayer``
  and its own synchronous ``redis.Redis`` client, as documented (a stub Lambda context supplies the
  in-progress expiry, the equivalent of a lease). Needs ``pip install 'aws-lambda-powertools[redis,aws-sdk]'``
  (its idempotency package imports boto3); skipped with a note when missing.
* ``sw_message``: ``ReliabilityLayer`` + ``RedisDedupStore``, telemetry off (no SDK): claim + complete.
* ``sw_message_deferred``: the same with ``defer_completions=True``: each completion rides along in the
  next claim's script (the crash window is documented in docs/dedup.md).
* ``sw_batch``: ``claim_many`` of 100 ids, the handler per new id, ``complete_many``: two round trips
  per 100 messages (the layer has no batch entry point yet: the store is driven directly).
* ``sw_batch_deferred``: the same, completions riding along with the next ``claim_many``.

``redis-benchmark`` gives the ceiling: ``SET key:__rand_int__ v NX PX 60000`` with random keys, with 50
connections (the server's rate) and with one (one connection, one request at a time, like these loops).

The table shows messages per second (median of the rounds), the ratio to the seed design and the
round trips per message (commands clients sent, from INFO commandstats without the commands that Lua
scripts run inside the server). The targets of issue 3 are checked at the end:
per-message >= 2x the seed and ahead of Powertools, batch claims >= 10x the seed. Exit status 0 unless
``--check`` is given and a target is missed. Only loopback traffic; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import redis.asyncio

import redis
from _common import FunctionCase, environment, load_average, markdown_table, measure, print_table
from streamwarden import ClaimStatus, Lease, ReliabilityLayer, ReliabilitySettings
from streamwarden._redis._dedup import RedisDedupStore

DEFAULT_COUNT = 5_000
QUICK_COUNT = 300
DEFAULT_ROUNDS = 5
BATCH = 100
TTL = 3600
LEASE = 120.0
TARGET_MESSAGE_VS_SEED = 2.0
TARGET_BATCH_VS_SEED = 10.0
# Not counted as round trips: the benchmark's own bookkeeping, and the commands Lua scripts run inside
# the server (INFO commandstats counts those too).
SERVER_COMMANDS_IGNORED = {"info", "flushall", "hello", "client", "ping", "script", "config"} | {
    "time", "hmget", "hincrby", "hset", "hdel", "pexpire", "pttl",
}  # fmt: skip

CASES: tuple[tuple[str, str], ...] = (
    ("seed", "seed design: EXISTS + SETEX + INCRBY per message"),
    ("powertools", "AWS Lambda Powertools idempotent_function, Redis layer (sync)"),
    ("sw_message", "streamwarden layer, claim + complete per message"),
    ("sw_message_deferred", "streamwarden layer, deferred completions"),
    ("sw_batch", f"streamwarden claim_many({BATCH}) + complete_many"),
    ("sw_batch_deferred", f"streamwarden claim_many({BATCH}), deferred completions"),
)
LABELS = dict(CASES)


# --- a redis-server of our own ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def local_redis() -> Iterator[int]:
    """A throw-away redis-server on a free loopback port (no persistence); yields the port."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found on PATH")
    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as workdir:
        port = _free_port()
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        proc = subprocess.Popen(
            [*args, "--dir", workdir, "--logfile", str(Path(workdir) / "redis.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            probe = redis.Redis(host="127.0.0.1", port=port)
            deadline = time.monotonic() + 10
            while True:
                try:
                    probe.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit(f"redis-server did not start on port {port}") from None
                    time.sleep(0.01)
            probe.close()
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- the cases ----------------------------------------------------------------------------------------


class Ids:
    """Fresh message ids for every run, so each run processes only new ids."""

    def __init__(self) -> None:
        self.run = 0

    def batch(self, count: int) -> list[dict[str, Any]]:
        self.run += 1
        return [{"id": f"r{self.run}-{i}", "amount": i} for i in range(count)]


async def handler(message: dict[str, Any]) -> None:
    """The no-op processor every case runs per new message."""


def seed_case(client: redis.asyncio.Redis, ids: Ids) -> Callable[[int], Awaitable[float]]:
    """The seed's ReliabilityLayer.process_message_reliably, its dedup and metrics I/O as documented."""

    async def process(message: dict[str, Any]) -> Any:
        message_id = message.get("id")
        if await client.exists(f"dedup:{message_id}"):
            await client.incrby("reliability:metrics:messages_deduplicated", 1)
            return None
        result = await handler(message)
        # SETEX as documented, sent as a raw command: redis-py 8 deprecates setex() and its warning
        # wrapper would add per-call Python work that is not part of the design.
        await client.execute_command("SETEX", f"dedup:{message_id}", TTL, "processed")
        await client.incrby("reliability:metrics:messages_processed_successfully", 1)
        return result

    async def run(count: int) -> float:
        messages = ids.batch(count)
        started = time.perf_counter()
        for message in messages:
            await process(message)
        return time.perf_counter() - started

    return run


class _StubLambdaContext:
    """What Powertools reads from a Lambda context: the time left, i.e. the in-progress expiry."""

    def get_remaining_time_in_millis(self) -> int:
        return int(LEASE * 1000)


def powertools_case(port: int, ids: Ids) -> Callable[[int], Awaitable[float]] | str:
    """Powertools' documented idempotent_function over a CachePersistenceLayer; a reason when missing."""
    try:
        from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function
        from aws_lambda_powertools.utilities.idempotency.persistence.cache import CachePersistenceLayer
    except ImportError as missing:
        return f"not installed ({missing.name}): pip install 'aws-lambda-powertools[redis,aws-sdk]'"
    client = redis.Redis(host="127.0.0.1", port=port)
    config = IdempotencyConfig(event_key_jmespath="id", expires_after_seconds=TTL)
    config.register_lambda_context(_StubLambdaContext())  # type: ignore[arg-type]
    persistence = CachePersistenceLayer(client=client)

    @idempotent_function(data_keyword_argument="message", persistence_store=persistence, config=config)
    def process(message: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    async def run(count: int) -> float:
        messages = ids.batch(count)
        started = time.perf_counter()
        for message in messages:
            process(message=message)
        return time.perf_counter() - started

    return run


def streamwarden_case(
    client: redis.asyncio.Redis, ids: Ids, *, defer: bool
) -> Callable[[int], Awaitable[float]]:
    """The layer on RedisDedupStore, telemetry off (no SDK in this process)."""

    async def run(count: int) -> float:
        messages = ids.batch(count)
        store = RedisDedupStore(client, defer_completions=defer)
        layer = ReliabilityLayer(None, ReliabilitySettings(), dedup_store=store)
        started = time.perf_counter()
        for message in messages:
            result = await layer.process(message, handler)
            if result.outcome != "processed":
                raise SystemExit(f"streamwarden case did not process {message['id']}: {result}")
        await store.aclose()  # deferred completions are part of the cost
        return time.perf_counter() - started

    return run


def batch_case(client: redis.asyncio.Redis, ids: Ids, *, defer: bool) -> Callable[[int], Awaitable[float]]:
    """claim_many of BATCH ids, the handler per new id, complete_many of their leases."""

    async def run(count: int) -> float:
        messages = ids.batch(count)
        store = RedisDedupStore(client, defer_completions=defer)
        started = time.perf_counter()
        for start in range(0, count, BATCH):
            chunk = messages[start : start + BATCH]
            claims = await store.claim_many([m["id"] for m in chunk], LEASE)
            leases: list[Lease] = []
            for message, claim in zip(chunk, claims, strict=True):
                if claim.status is ClaimStatus.NEW and claim.lease is not None:
                    await handler(message)
                    leases.append(claim.lease)
            if len(leases) != len(chunk):
                raise SystemExit("batch case met an id that was not new")
            await store.complete_many(leases, TTL)
        await store.aclose()
        return time.perf_counter() - started

    return run


# --- measuring ----------------------------------------------------------------------------------------


def server_commands(client: redis.Redis) -> int:
    """Commands clients sent so far (one round trip each here: nothing is pipelined on one node)."""
    stats: dict[str, Any] = client.info("commandstats")
    return sum(
        int(value["calls"])
        for name, value in stats.items()
        if name.removeprefix("cmdstat_").split("|")[0] not in SERVER_COMMANDS_IGNORED
    )


def redis_benchmark(port: int, requests: int, connections: int) -> float | str:
    """``redis-benchmark`` SET NX PX rate with random keys (requests per second); a reason when missing."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return "redis-benchmark not found"
    command = [binary, "-h", "127.0.0.1", "-p", str(port), "-q", "-n", str(requests), "-r", "100000000"]
    command += ["-c", str(connections), "-P", "1", "SET", "key:__rand_int__", "v", "NX", "PX", "60000"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    found = re.findall(r"([0-9.]+) requests per second", done.stdout)
    return float(found[-1]) if found else f"no rate in output: {done.stdout[-200:]!r}"


async def run_all(port: int, count: int, rounds: int, warmup: int) -> dict[str, Any]:
    client = redis.asyncio.Redis(host="127.0.0.1", port=port)
    sync_client = redis.Redis(host="127.0.0.1", port=port)
    ids = Ids()
    skipped: dict[str, str] = {}
    runners: dict[str, Callable[[int], Awaitable[float]]] = {
        "seed": seed_case(client, ids),
        "sw_message": streamwarden_case(client, ids, defer=False),
        "sw_message_deferred": streamwarden_case(client, ids, defer=True),
        "sw_batch": batch_case(client, ids, defer=False),
        "sw_batch_deferred": batch_case(client, ids, defer=True),
    }
    found = powertools_case(port, ids)
    if isinstance(found, str):
        skipped["powertools"] = found
    else:
        runners["powertools"] = found
    order = [case_id for case_id, _ in CASES if case_id in runners]

    def flushing(runner: Callable[[int], Awaitable[float]]) -> Callable[[int], Awaitable[float]]:
        async def run(n: int) -> float:
            await client.flushall()  # every case starts from an empty server
            return await runner(n)

        return run

    cases = [FunctionCase(case_id, LABELS[case_id], flushing(runners[case_id])) for case_id in order]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Powertools warns about its deprecated Redis class names
        samples = await measure(cases, count=count, rounds=rounds, warmup=warmup, tag="dedup: ")
        commands: dict[str, float] = {}
        for case in cases:
            await client.flushall()
            before = server_commands(sync_client)
            await case.runner(count)
            commands[case.id] = (server_commands(sync_client) - before) / count
    await client.aclose()
    sync_client.close()
    results: dict[str, Any] = {}
    for case_id in order:
        per_message_us = statistics.median(samples[case_id]["gc_on"])
        results[case_id] = {
            "label": LABELS[case_id],
            "msgs_per_s": 1e6 / per_message_us,
            "best_msgs_per_s": 1e6 / min(samples[case_id]["gc_on"]),
            "us_per_msg": per_message_us,
            "commands_per_msg": commands[case_id],
        }
    seed_rate = results["seed"]["msgs_per_s"]
    for entry in results.values():
        entry["vs_seed"] = entry["msgs_per_s"] / seed_rate
    return {"cases": results, "skipped": skipped}


def checks(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cases = results["cases"]
    seed = cases["seed"]["msgs_per_s"]
    message = max(cases["sw_message"]["msgs_per_s"], cases["sw_message_deferred"]["msgs_per_s"])
    batch = cases["sw_batch"]["msgs_per_s"]
    out = {
        "per_message_vs_seed": {
            "target": f">= {TARGET_MESSAGE_VS_SEED}x",
            "value": message / seed,
            "passed": message / seed >= TARGET_MESSAGE_VS_SEED,
        },
        "batch_vs_seed": {
            "target": f">= {TARGET_BATCH_VS_SEED}x",
            "value": batch / seed,
            "passed": batch / seed >= TARGET_BATCH_VS_SEED,
        },
    }
    if "powertools" in cases:
        ratio = message / cases["powertools"]["msgs_per_s"]
        out["per_message_vs_powertools"] = {"target": "> 1x", "value": ratio, "passed": ratio > 1.0}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--count", type=int, default=None, help=f"messages per case per round ({DEFAULT_COUNT})"
    )
    parser.add_argument("--rounds", type=int, default=None, help=f"rounds ({DEFAULT_ROUNDS})")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few messages, one round")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table too")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    count = args.count or (QUICK_COUNT if args.quick else DEFAULT_COUNT)
    rounds = args.rounds or (1 if args.quick else DEFAULT_ROUNDS)
    count = max(BATCH, count // BATCH * BATCH)  # whole batches
    with local_redis() as port:
        results = asyncio.run(run_all(port, count, rounds, warmup=min(count, 1_000)))
        bench_requests = 2_000 if args.quick else 100_000
        ceiling = {
            f"redis-benchmark SET NX PX, {c} connection{'s' if c > 1 else ''}": redis_benchmark(
                port, bench_requests, c
            )
            for c in (50, 1)
        }
    results["ceiling"] = ceiling
    results["checks"] = checks(results)
    results["environment"] = environment(["redis", "aws-lambda-powertools", "streamwarden"])
    results["environment"]["load_average"] = load_average()
    results["parameters"] = {"count": count, "rounds": rounds, "batch": BATCH}

    headers = ["case", "msgs/s", "vs seed", "µs/msg", "round trips/msg"]
    rows = [
        [
            entry["label"],
            f"{entry['msgs_per_s']:,.0f}",
            f"{entry['vs_seed']:.2f}x",
            f"{entry['us_per_msg']:.1f}",
            f"{entry['commands_per_msg']:.2f}",
        ]
        for entry in results["cases"].values()
    ]
    seed_rate = results["cases"]["seed"]["msgs_per_s"]
    for label, rate in ceiling.items():
        if isinstance(rate, float):
            rows.append([f"ceiling: {label}", f"{rate:,.0f}", f"{rate / seed_rate:.2f}x", "", "1.00"])
        else:
            rows.append([f"ceiling: {label}", rate, "", "", ""])
    for case_id, reason in results["skipped"].items():
        rows.append([LABELS[case_id], f"skipped: {reason}", "", "", ""])
    print_table(f"Dedup on Redis: {count} messages x {rounds} rounds, median", headers, rows)
    if args.markdown:
        print(markdown_table(headers, rows))
    failed = False
    for name, check in results["checks"].items():
        verdict = "PASS" if check["passed"] else "FAIL"
        failed |= not check["passed"]
        print(f"{verdict}  {name}: {check['value']:.2f}x (target {check['target']})")
    if args.quick:
        print("(--quick: a smoke run; the numbers are not a measurement)")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 1 if (args.check and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
