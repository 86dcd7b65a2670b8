"""The handler misbehaves: poison messages, permanent errors, a downstream outage.

Scenarios 6, 7 and 11 of issue 4 and findings 3 and 7 of issue 9 (see docs/faults.md).
"""

from __future__ import annotations

import asyncio
import time

from _faultlib import ConsumerProcess, FaultRig, ids_of, ok_messages

DEFER = {
    "STREAMWARDEN_EXHAUSTED_TRANSIENT_ACTION": "defer",
    "STREAMWARDEN_MAX_RETRIES": "1",
}


async def test_poison_message_is_dead_lettered_after_n_runs_while_others_flow(rig: FaultRig) -> None:
    """A message failing on every run is dead-lettered as poison after N runs of its handler, and acked."""
    await rig.create_group()
    await rig.produce([("poison", {"action": "fail_transient"})])
    others = ok_messages("flow", 20, sleep_ms=20)
    await rig.produce(others)
    settings = {
        **DEFER,
        "STREAMWARDEN_POISON_MAX_DELIVERIES": "3",
        "STREAMWARDEN_CIRCUIT_BREAKER_THRESHOLD": "50",
    }
    rig.spawn("c1", settings=settings, claim_idle_ms=200)
    await rig.wait(rig.settled)
    await rig.stop_all()

    [entry] = await rig.dlq()
    assert (entry["message_id"], entry["reason"], entry["attempts"]) == ("poison", "poison", "0")
    ledger = rig.ledger()
    # runs 1..3 each ran the handler twice (first attempt + 1 retry) and deferred; the 4th claim is poison
    assert len(ledger.starts("poison")) == 6
    assert ledger.effect_counts() == {mid: 1 for mid in ids_of(others)}
    assert max(e["t"] for e in ledger.effects()) < float(entry["dead_lettered_at"]), "others were not held up"
    counters = await rig.counters()
    assert counters["messages_dead_lettered"] == 1
    assert counters["messages_deferred"] == 3


async def test_poison_pill_that_kills_its_consumer_is_dead_lettered_after_n_crashes(rig: FaultRig) -> None:
    """A message that SIGKILLs every consumer running it is dead-lettered unrun after N runs."""
    await rig.create_group()
    await rig.produce([("pill", {"action": "crash"})])
    settings = {"STREAMWARDEN_POISON_MAX_DELIVERIES": "2", "STREAMWARDEN_DEDUP_LEASE": "1.0"}
    settings["STREAMWARDEN_PROCESSING_TIMEOUT"] = "0.8"
    rig.spawn("c1", settings=settings)

    async def supervised() -> bool:  # the orchestrator restarts whatever died
        if not rig.consumers[-1].alive():
            rig.spawn("c1", settings=settings)
        return await rig.settled()

    await rig.wait(supervised, timeout=30)
    await rig.stop_all()

    [entry] = await rig.dlq()
    assert (entry["message_id"], entry["reason"], entry["attempts"]) == ("pill", "poison", "0")
    # only runs count: redeliveries answered IN_PROGRESS while the dead owner's lease lasted do not
    assert len(rig.ledger().starts("pill")) == 2
    assert [c.proc.returncode for c in rig.consumers] == [-9, -9, 0]


async def test_a_killer_message_crashes_alone_and_its_healthy_batch_mates_are_not_poison(
    rig: FaultRig,
) -> None:
    """A message that kills its process, read in one batch with 7 healthy ones: after the first crash it
    only ever runs alone; it is dead-lettered as poison after N runs; no healthy message reaches the DLQ.

    Before issue 9 poison came from the stream's delivery count: every restart re-ran the whole batch
    beside the killer, each crash counted a delivery for all of them, and all 8 went to the DLQ.
    """
    await rig.create_group()
    healthy = ok_messages("h", 7, sleep_ms=300)
    batch = [*healthy[:3], ("killer", {"action": "crash"}), *healthy[3:]]
    await rig.produce(batch)
    settings = {
        "STREAMWARDEN_POISON_MAX_DELIVERIES": "3",
        "STREAMWARDEN_DEDUP_LEASE": "1.0",
        "STREAMWARDEN_PROCESSING_TIMEOUT": "0.8",
    }
    rig.spawn("c1", settings=settings)

    async def supervised() -> bool:  # the orchestrator restarts whatever died
        if not rig.consumers[-1].alive():
            rig.spawn("c1", settings=settings)
        return await rig.settled()

    await rig.wait(supervised, timeout=60)
    await rig.stop_all()

    ledger = rig.ledger()
    [entry] = await rig.dlq()
    assert (entry["message_id"], entry["reason"]) == ("killer", "poison")
    assert len(ledger.starts("killer")) == 3, "crashed poison_max_deliveries times, then dead-lettered unrun"
    assert ledger.effect_counts() == {mid: 1 for mid in ids_of(healthy)}
    assert all(len(ledger.starts(mid)) <= 2 for mid in ids_of(healthy)), "once beside it, at most once more"
    killer_starts = [s["t"] for s in ledger.starts("killer")]
    for began in killer_starts[1:]:  # after the first crash the killer only runs alone
        assert not [r for r in ledger.runs() if r[2] < began < r[3]], f"something ran beside it at {began}"
    assert await rig.lost(ids_of(batch)) == set()
    assert [c.proc.returncode for c in rig.consumers] == [-9, -9, -9, 0]


async def test_one_always_failing_message_neither_opens_the_breaker_nor_stalls_readiness(
    rig: FaultRig,
) -> None:
    """A message that fails every attempt (5 retries each run) does not open the breaker for the others:
    the consumer keeps reading and /readyz stays 200 while it is deferred and redelivered.

    Before issue 9 one run's retries counted one failure each: the breaker opened (threshold 5), reading
    paused and /readyz answered 503 for every other message.
    """
    await rig.create_group()
    await rig.produce([("stubborn", {"action": "fail_transient"})])
    others = ok_messages("flow", 60, sleep_ms=20)
    await rig.produce(others)
    settings = {
        **DEFER,
        "STREAMWARDEN_MAX_RETRIES": "5",
        "STREAMWARDEN_CIRCUIT_BREAKER_THRESHOLD": "5",
        "STREAMWARDEN_CIRCUIT_BREAKER_TIMEOUT": "5",
        "STREAMWARDEN_POISON_MAX_DELIVERIES": "4",
    }
    consumer = rig.spawn("c1", settings=settings, health=True, claim_idle_ms=300, concurrency=4, batch_size=4)
    await rig.wait(lambda: _readyz_is(consumer, 200))
    codes: list[int] = []

    async def settled_while_ready() -> bool:
        codes.append(await asyncio.to_thread(consumer.readyz))
        return await rig.settled()

    await rig.wait(settled_while_ready, timeout=60)
    await rig.stop_all()

    assert len(codes) >= 3, "sampled while the stubborn message was being deferred"
    assert set(codes) == {200}, f"/readyz answered {sorted(set(codes))}"
    counters = await rig.counters()
    assert counters["circuit_breaker_opened"] == 0
    assert rig.ledger().effect_counts() == {mid: 1 for mid in ids_of(others)}
    [entry] = await rig.dlq()
    assert (entry["message_id"], entry["reason"]) == ("stubborn", "poison")


async def _readyz_is(consumer: ConsumerProcess, code: int) -> bool:
    return await asyncio.to_thread(consumer.readyz) == code


RAISING = ["raise_system_exit", "raise_keyboard_interrupt", "raise_cancelled", "raise_base"]


async def test_base_exceptions_from_the_handler_fail_only_their_message(rig: FaultRig) -> None:
    """SystemExit, KeyboardInterrupt, its own CancelledError or a custom BaseException from a handler fail
    that message (dead-lettered); the process keeps consuming and stops only on SIGTERM, with its stats.

    Before issue 9 SystemExit ended the process with status 0 and no "stopped" line, killing its
    in-flight batch-mates; the others ended as "Task exception was never retrieved".
    """
    await rig.create_group()
    raising = [(f"r-{action}", {"action": action}) for action in RAISING]
    others = ok_messages("ok", 10, sleep_ms=50)
    await rig.produce([*others[:5], *raising, *others[5:]])
    consumer = rig.spawn("c1")
    await rig.wait(rig.settled)
    more = ok_messages("later", 3)
    await rig.produce(more)
    await rig.wait(lambda: rig.ledger().executed_ids() >= set(ids_of(more)))
    assert consumer.alive(), consumer.stderr()
    await rig.stop_all()

    assert consumer.proc.returncode == 0
    stats = consumer.stats_line()
    assert stats["outcomes"] == {"processed": 13, "dead_lettered": 4}
    assert {e["message_id"] for e in await rig.dlq()} == set(ids_of(raising))
    assert "never retrieved" not in consumer.stderr()
    assert rig.ledger().effect_counts() == {mid: 1 for mid in ids_of(others + more)}


async def test_non_retryable_error_is_dead_lettered_on_the_first_attempt(rig: FaultRig) -> None:
    """A permanent error goes to the DLQ on the first attempt, without retries, and is acknowledged."""
    await rig.create_group()
    await rig.produce([("broken", {"action": "fail_permanent"}), *ok_messages("ok", 3)])
    rig.spawn("c1", settings={"STREAMWARDEN_MAX_RETRIES": "5"})
    await rig.wait(rig.settled)
    await rig.stop_all()

    [entry] = await rig.dlq()
    assert (entry["message_id"], entry["reason"], entry["attempts"]) == ("broken", "error", "1")
    assert (entry["error_type"], entry["error_class"]) == ("ValueError", "permanent")
    assert len(rig.ledger().starts("broken")) == 1
    counters = await rig.counters()
    assert counters["retry_attempts"] == 0
    assert counters["messages_dead_lettered"] == 1


async def test_downstream_outage_opens_the_breaker_pauses_reading_and_dead_letters_nothing(
    rig: FaultRig,
) -> None:
    """During an outage the breaker opens and reading pauses; nothing reaches the DLQ; all is processed after."""
    await rig.create_group()
    messages = ok_messages("o", 150, sleep_ms=10)
    await rig.produce(messages)
    settings = {
        **DEFER,
        "STREAMWARDEN_CIRCUIT_BREAKER_THRESHOLD": "3",
        "STREAMWARDEN_CIRCUIT_BREAKER_TIMEOUT": "0.5",
    }
    rig.spawn("c1", settings=settings, concurrency=4, batch_size=4)
    await rig.wait(lambda: len(rig.ledger().effects()) >= 20)
    outage_began = time.time()
    rig.outage(True)
    # the breaker re-opens after each failed half-open trial: wait for a few cycles
    await rig.wait(lambda: _counter_at_least(rig, "circuit_breaker_opened", 3))
    rig.outage(False)
    outage_ended = time.time()
    await rig.wait(rig.settled, timeout=30)
    await rig.stop_all()

    ledger = rig.ledger()
    assert await rig.dlq() == [], "the outage dead-lettered nothing"
    assert ledger.effect_counts() == {mid: 1 for mid in ids_of(messages)}
    tried_during_outage = {s["id"] for s in ledger.starts() if outage_began <= s["t"] < outage_ended}
    untouched_backlog = set(ids_of(messages)) - {e["id"] for e in ledger.effects() if e["t"] < outage_began}
    # reading paused: what was in flight plus one trial per half-open window failed, not the backlog
    assert len(untouched_backlog) > 100
    assert len(tried_during_outage) <= 16, sorted(tried_during_outage)
    counters = await rig.counters()
    assert counters["circuit_breaker_opened"] >= 3
    assert counters["messages_deferred"] >= 1
    assert counters["messages_dead_lettered"] == 0


async def _counter_at_least(rig: FaultRig, name: str, value: int) -> bool:
    return (await rig.counters())[name] >= value


async def test_delivery_counts_from_a_long_pending_list_do_not_make_poison(rig: FaultRig) -> None:
    """Entries the stream delivered 11 times without a handler run are run once, not dead-lettered.

    Before issue 9 poison read the stream's delivery counts (an XPENDING per id): both went to the DLQ
    unrun. Now only handler runs, counted in the dedup record, make poison.
    """
    await rig.create_group()
    client = rig.client
    [first] = await rig.produce([("stale-a", {"action": "ok"})])
    await client.xreadgroup(rig.group, "dead-1", {rig.stream: ">"}, count=1)
    await rig.produce(ok_messages("busy", 50))
    await client.xreadgroup(rig.group, "busy-elsewhere", {rig.stream: ">"}, count=50)
    [last] = await rig.produce([("stale-b", {"action": "ok"})])
    await client.xreadgroup(rig.group, "dead-1", {rig.stream: ">"}, count=1)
    for entry in (first, last):  # delivered 10 more times (crashes, outages), never run
        await client.xclaim(rig.stream, rig.group, "dead-1", 0, [entry], idle=600_000, retrycount=10)

    rig.spawn("c1", settings={"STREAMWARDEN_POISON_MAX_DELIVERIES": "5"}, claim_idle_ms=60_000, batch_size=8)
    await rig.wait(lambda: rig.ledger().executed_ids() >= {"stale-a", "stale-b"})
    await rig.stop_all()
    assert await rig.dlq() == []
    assert {mid: len(rig.ledger().starts(mid)) for mid in ("stale-a", "stale-b")} == {
        "stale-a": 1,
        "stale-b": 1,
    }


async def _dlq_size(rig: FaultRig, size: int) -> bool:
    return len(await rig.dlq()) >= size


async def test_long_outage_does_not_turn_waiting_messages_into_poison(rig: FaultRig) -> None:
    """Breaker rejections over many half-open cycles cost no delivery: only handler runs count toward poison."""
    await rig.create_group()
    messages = ok_messages("w", 60, sleep_ms=10)
    await rig.produce(messages)
    poison_max = 4
    settings = {
        **DEFER,
        "STREAMWARDEN_CIRCUIT_BREAKER_THRESHOLD": "3",
        "STREAMWARDEN_CIRCUIT_BREAKER_TIMEOUT": "0.3",
        "STREAMWARDEN_POISON_MAX_DELIVERIES": str(poison_max),
    }
    rig.spawn("c1", settings=settings, concurrency=4, batch_size=4, claim_idle_ms=300)
    await rig.wait(lambda: len(rig.ledger().effects()) >= 8)
    rig.outage(True)
    await rig.wait(lambda: _counter_at_least(rig, "circuit_breaker_opened", 12))
    rig.outage(False)
    await rig.wait(rig.settled, timeout=30)
    await rig.stop_all()

    ledger = rig.ledger()
    counters = await rig.counters()
    assert counters["circuit_breaker_rejections"] > 4 * poison_max, "many rejected deliveries happened"
    # failures while the breaker was open or half-open are the dependency's, not the message's
    assert await rig.dlq() == []
    assert ledger.effect_counts() == {mid: 1 for mid in ids_of(messages)}
