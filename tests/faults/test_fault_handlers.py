"""The handler misbehaves: poison messages, permanent errors, a downstream outage.

Scenarios 6, 7 and 11 of issue 4 (see docs/faults.md).
"""

from __future__ import annotations

import time

from _faultlib import FaultRig, ids_of, ok_messages

DEFER = {
    "STREAMWARDEN_EXHAUSTED_TRANSIENT_ACTION": "defer",
    "STREAMWARDEN_MAX_RETRIES": "1",
}


async def test_poison_message_is_dead_lettered_after_n_deliveries_while_others_flow(rig: FaultRig) -> None:
    """A message failing on every delivery is dead-lettered as poison after N deliveries and acked."""
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
    assert entry["delivery_count"] == "4"
    ledger = rig.ledger()
    # deliveries 1..3 ran (first attempt + 1 retry each, then deferred); delivery 4 was dead-lettered unrun
    assert sorted(s["delivery"] for s in ledger.starts("poison")) == [1, 1, 2, 2, 3, 3]
    assert ledger.effect_counts() == {mid: 1 for mid in ids_of(others)}
    assert max(e["t"] for e in ledger.effects()) < float(entry["dead_lettered_at"]), "others were not held up"
    counters = await rig.counters()
    assert counters["messages_dead_lettered"] == 1
    assert counters["messages_deferred"] == 3


async def test_poison_pill_that_kills_its_consumer_is_dead_lettered_after_n_crashes(rig: FaultRig) -> None:
    """A message that SIGKILLs every consumer running it is dead-lettered unrun after N deliveries."""
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
    assert (entry["message_id"], entry["reason"], entry["delivery_count"]) == ("pill", "poison", "3")
    # only runs count: redeliveries answered IN_PROGRESS while the dead owner's lease lasted do not
    assert [s["delivery"] for s in rig.ledger().starts("pill")] == [1, 2]
    assert [c.proc.returncode for c in rig.consumers] == [-9, -9, 0]


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


async def test_poison_is_detected_behind_a_long_pending_list(rig: FaultRig) -> None:
    """Delivery counts come from the pending list even with hundreds of other pending entries in between."""
    await rig.create_group()
    client = rig.client
    [first] = await rig.produce([("poison-a", {"action": "ok"})])
    await client.xreadgroup(rig.group, "dead-1", {rig.stream: ">"}, count=1)
    # batch size 8: one XAUTOCLAIM scans up to 80 entries, so it claims both poison entries; the 50
    # fresh entries between them outnumber what a single XPENDING range of the batch would return
    await rig.produce(ok_messages("busy", 50))
    await client.xreadgroup(rig.group, "busy-elsewhere", {rig.stream: ">"}, count=50)
    [last] = await rig.produce([("poison-b", {"action": "ok"})])
    await client.xreadgroup(rig.group, "dead-1", {rig.stream: ">"}, count=1)
    # both delivered 10 times already and idle for long; the ones in between were just delivered
    for entry in (first, last):
        await client.xclaim(rig.stream, rig.group, "dead-1", 0, [entry], idle=600_000, retrycount=10)

    rig.spawn("c1", settings={"STREAMWARDEN_POISON_MAX_DELIVERIES": "5"}, claim_idle_ms=60_000, batch_size=8)
    await rig.wait(lambda: _dlq_size(rig, 2))
    await rig.stop_all()
    entries = {e["message_id"]: e for e in await rig.dlq()}
    assert set(entries) == {"poison-a", "poison-b"}
    assert {e["reason"] for e in entries.values()} == {"poison"}
    assert {e["delivery_count"] for e in entries.values()} == {"11"}
    assert not rig.ledger().starts("poison-b"), "dead-lettered unrun, not mistaken for a first delivery"


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
    dead = {e["message_id"]: e for e in await rig.dlq()}
    for message_id, entry in dead.items():
        runs = {s["delivery"] for s in ledger.starts(message_id)}
        # a failed half-open trial is a real, failed delivery; a rejection is not
        assert len(runs) >= poison_max, f"{message_id} dead-lettered after {sorted(runs)} runs: {entry}"
    assert ledger.effect_counts() == {mid: 1 for mid in ids_of(messages) if mid not in dead}
